//! One connection: HTTP/1.1 over a watched socket, with a watchdog that closes it when a
//! phase outlasts its bound.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response, StatusCode, header};
use axum::response::IntoResponse as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt as _;

use super::ServeConfig;
use super::tls::TlsConfig;
use crate::error::ApiError;

/// Which slots a connection holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pool {
    /// A regular connection: every route, keep-alive.
    Main,
    /// Beyond the connection limit: health routes only, one request, then closed.
    Overflow,
}

/// The bounds of a connection's phases.
pub(super) struct Limits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    tls: Option<TlsConfig>,
}

impl From<&ServeConfig> for Limits {
    fn from(config: &ServeConfig) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            tls: config.tls.clone(),
        }
    }
}

/// What a connection is doing, as far as its bounds are concerned.
#[derive(Clone, Copy, Debug)]
struct Activity {
    /// Requests handed to the router and not answered yet.
    in_flight: usize,
    /// Requests answered on this connection.
    answered: u64,
    /// When the connection last had nothing in flight.
    idle_since: Instant,
    /// When the first byte of the next request's head arrived, if one did.
    head_started: Option<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: 0,
            answered: 0,
            idle_since: Instant::now(),
            head_started: None,
        }
    }

    /// When the connection must close if nothing changes; `None` while a request is being
    /// handled (the router bounds that).
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.in_flight > 0 {
            return None;
        }
        if let Some(started) = self.head_started {
            return Some(started + limits.header_read_timeout);
        }
        // A new connection has to send its first request as promptly as a head; only a
        // connection that has been useful gets the longer keep-alive allowance.
        let allowance = if self.answered == 0 {
            limits.header_read_timeout
        } else {
            limits.idle_timeout
        };
        Some(self.idle_since + allowance)
    }
}

/// A connection about to be served.
pub(super) struct Serving {
    pub(super) router: Router,
    pub(super) limits: Arc<Limits>,
    pub(super) pool: Pool,
    pub(super) stopping: watch::Receiver<bool>,
}

impl Serving {
    pub(super) async fn run(self, stream: TcpStream, peer: SocketAddr) {
        let _open = OpenGauge::new(self.pool);
        let (activity, watched) = watch::channel(Activity::new());
        let activity = Arc::new(activity);
        let io = WatchedIo {
            inner: stream,
            activity: activity.clone(),
        };
        let Some(tls) = self.limits.tls.clone() else {
            self.serve(io, activity, watched, peer).await;
            return;
        };
        match tokio::time::timeout(self.limits.header_read_timeout, tls.acceptor().accept(io)).await
        {
            Ok(Ok(stream)) => self.serve(stream, activity, watched, peer).await,
            Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
            Err(_) => {
                metrics::counter!(crate::metrics::HTTP_CONNECTIONS_TIMED_OUT_TOTAL, "phase" => "tls_handshake").increment(1);
                tracing::debug!(%peer, "TLS handshake timed out");
            }
        }
    }

    async fn serve<I>(
        self,
        io: I,
        activity: Arc<watch::Sender<Activity>>,
        mut watched: watch::Receiver<Activity>,
        peer: SocketAddr,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router;
        let pool = self.pool;
        let tracker = activity.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let router = router.clone();
            let answered = RequestInFlight::begin(tracker.clone());
            async move {
                let response = respond(router, pool, request).await;
                drop(answered);
                Ok::<_, Infallible>(response)
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        // The watchdog bounds heads (hyper's own timer would also cut idle keep-alive
        // connections at the head timeout).
        builder
            .header_read_timeout(None)
            .keep_alive(pool == Pool::Main);
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        let mut stopping = self.stopping;
        let mut asked_to_close = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                    return;
                }
                phase = lapsed(&mut watched, &self.limits) => {
                    metrics::counter!(crate::metrics::HTTP_CONNECTIONS_TIMED_OUT_TOTAL, "phase" => phase).increment(1);
                    tracing::debug!(%peer, phase, "closing a connection that outlasted its bound");
                    return;
                }
                changed = stopping.changed(), if !asked_to_close => {
                    if changed.is_err() || *stopping.borrow() {
                        asked_to_close = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// Routes one request: everything on a regular connection, health routes only on an
/// overflow connection.
async fn respond(router: Router, pool: Pool, request: Request<Incoming>) -> Response<Body> {
    let health = matches!(request.uri().path(), "/healthz" | "/readyz");
    if pool == Pool::Overflow && !health {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the server is at its connection limit; retry shortly (only /healthz and /readyz are answered now)",
        )
        .into_response();
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return response;
    }
    match router.oneshot(request.map(Body::new)).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Resolves when the connection's current phase has outlasted its bound, naming the phase.
async fn lapsed(watched: &mut watch::Receiver<Activity>, limits: &Limits) -> &'static str {
    loop {
        let activity = *watched.borrow_and_update();
        let Some(deadline) = activity.deadline(limits) else {
            if watched.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                let now = watched.borrow();
                if now.deadline(limits).is_some_and(|d| d <= Instant::now()) {
                    return if now.head_started.is_some() || now.answered == 0 {
                        "header"
                    } else {
                        "idle"
                    };
                }
            }
            changed = watched.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// Marks a request as in flight until dropped (answered, or its future dropped).
struct RequestInFlight {
    activity: Arc<watch::Sender<Activity>>,
}

impl RequestInFlight {
    fn begin(activity: Arc<watch::Sender<Activity>>) -> Self {
        activity.send_modify(|a| {
            a.in_flight += 1;
            a.head_started = None;
        });
        Self { activity }
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.activity.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            a.answered += 1;
            if a.in_flight == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

/// Counts open connections per pool in `saga_http_connections_open{pool}`.
struct OpenGauge(Pool);

impl OpenGauge {
    fn new(pool: Pool) -> Self {
        metrics::gauge!(crate::metrics::HTTP_CONNECTIONS_OPEN, "pool" => pool_name(pool))
            .increment(1.0);
        Self(pool)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::HTTP_CONNECTIONS_OPEN, "pool" => pool_name(self.0))
            .decrement(1.0);
    }
}

fn pool_name(pool: Pool) -> &'static str {
    match pool {
        Pool::Main => "main",
        Pool::Overflow => "overflow",
    }
}

/// The socket, noting when the first byte of a request head arrives.
struct WatchedIo {
    inner: TcpStream,
    activity: Arc<watch::Sender<Activity>>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.send_if_modified(|a| {
                if a.in_flight == 0 && a.head_started.is_none() {
                    a.head_started = Some(Instant::now());
                    true
                } else {
                    false
                }
            });
        }
        result
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
