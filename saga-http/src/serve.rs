//! Serving a router on a TCP socket: a bounded number of connections, timeouts on every
//! phase of a connection, optional HTTPS and graceful shutdown.
//!
//! A connection is in one of three phases, each bounded:
//!
//! | phase | bound |
//! |---|---|
//! | new connection, nothing sent yet | [`ServeConfig::header_read_timeout`] (TLS handshake included) |
//! | a request's head is arriving | [`ServeConfig::header_read_timeout`] from its first byte |
//! | a request is being handled (body read included) | the router's own request timeout ([`ApiConfig::request_timeout`](crate::ApiConfig::request_timeout)) |
//! | idle between requests (keep-alive) | [`ServeConfig::idle_timeout`] |
//!
//! Connections beyond [`ServeConfig::max_connections`] get one of a few overflow slots that
//! answer `/healthz` and `/readyz` only (everything else gets 503 and the connection is
//! closed), so health checks keep answering while the server is full; beyond those, new
//! connections are closed at once. Open file descriptors therefore stay bounded however many
//! clients connect.

mod connection;
mod tls;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use tls::{TlsConfig, TlsConfigError};

/// How long requests in flight (long polls included) may take to finish after shutdown
/// begins before their connections are dropped (the default of
/// [`ServeConfig::shutdown_grace`]).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Connection limits and timeouts of the server.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServeConfig {
    /// How long a client has to send a request's head (request line and headers), from its
    /// first byte or, on a new connection, from the connection's start (TLS handshake
    /// included). Default 10 s. A client dripping its headers is disconnected after it.
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may stay idle between requests. Default 60 s.
    pub idle_timeout: Duration,
    /// The most connections served at once. Default 1024. Keep it well under the process'
    /// file descriptor limit (`ulimit -n`), leaving room for the store's connections.
    pub max_connections: usize,
    /// Extra connections, beyond `max_connections`, that answer only `/healthz` and
    /// `/readyz` (and 503 to anything else), then close. Default 16.
    pub overflow_connections: usize,
    /// How long requests in flight may take to finish after shutdown begins. Default
    /// [`SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
    /// HTTPS: serve TLS with this certificate and key instead of plain HTTP.
    pub tls: Option<TlsConfig>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            overflow_connections: 16,
            shutdown_grace: SHUTDOWN_GRACE,
            tls: None,
        }
    }
}

impl ServeConfig {
    /// Sets [`header_read_timeout`](Self::header_read_timeout).
    #[must_use]
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Sets [`idle_timeout`](Self::idle_timeout).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets [`max_connections`](Self::max_connections) (at least 1).
    #[must_use]
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Sets [`overflow_connections`](Self::overflow_connections) (0 closes every connection
    /// beyond the limit at once).
    #[must_use]
    pub fn overflow_connections(mut self, connections: usize) -> Self {
        self.overflow_connections = connections;
        self
    }

    /// Sets [`shutdown_grace`](Self::shutdown_grace).
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Serves HTTPS with `tls`.
    #[must_use]
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }
}

/// Binds `addr` and serves `router` with the default [`ServeConfig`] until `shutdown`
/// completes, then stops accepting connections and lets the requests in flight finish, for
/// at most [`SHUTDOWN_GRACE`].
///
/// # Errors
/// The address cannot be bound.
pub async fn serve<A, F>(router: Router, addr: A, shutdown: F) -> io::Result<()>
where
    A: ToSocketAddrs,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    serve_listener(router, listener, shutdown).await
}

/// As [`serve`], on a listener the caller bound (for port 0, or a socket handed over by a
/// supervisor).
///
/// # Errors
/// None today; the result leaves room for fatal listener errors.
pub async fn serve_listener<F>(router: Router, listener: TcpListener, shutdown: F) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    serve_with(router, listener, ServeConfig::default(), shutdown).await
}

/// Serves `router` on `listener` with `config` until `shutdown` completes; then stops
/// accepting, asks every connection to close after its request in flight, and waits for them
/// for at most [`ServeConfig::shutdown_grace`].
///
/// Errors accepting a connection (a client that reset, the process out of file descriptors)
/// are logged and retried after a short pause: the server keeps serving.
///
/// # Errors
/// None today; the result leaves room for fatal listener errors.
pub async fn serve_with<F>(
    router: Router,
    listener: TcpListener,
    config: ServeConfig,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    match listener.local_addr() {
        Ok(addr) => {
            tracing::info!(%addr, scheme, max_connections = config.max_connections, "saga HTTP API listening");
        }
        Err(err) => tracing::warn!(error = %err, "saga HTTP API listening on an unknown address"),
    }
    let main_slots = Arc::new(Semaphore::new(config.max_connections));
    let overflow_slots = Arc::new(Semaphore::new(config.overflow_connections));
    let limits = Arc::new(connection::Limits::from(&config));
    let (stopping, stop_watch) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        accept_failed(&err).await;
                        continue;
                    }
                };
                let (slot, pool) = if let Ok(slot) = main_slots.clone().try_acquire_owned() {
                    (slot, connection::Pool::Main)
                } else if let Ok(slot) = overflow_slots.clone().try_acquire_owned() {
                    metrics::counter!(crate::metrics::HTTP_CONNECTIONS_OVERFLOW_TOTAL).increment(1);
                    (slot, connection::Pool::Overflow)
                } else {
                    metrics::counter!(crate::metrics::HTTP_CONNECTIONS_REFUSED_TOTAL).increment(1);
                    tracing::debug!(%peer, "connection refused: every connection slot is taken");
                    drop(stream);
                    continue;
                };
                let serving = connection::Serving {
                    router: router.clone(),
                    limits: limits.clone(),
                    pool,
                    stopping: stop_watch.clone(),
                };
                connections.spawn(async move {
                    let _slot = slot;
                    serving.run(stream, peer).await;
                });
            }
        }
    }
    drop(listener);
    let grace = config.shutdown_grace;
    tracing::info!(
        ?grace,
        open = connections.len(),
        "saga HTTP API shutting down; finishing requests in flight"
    );
    let _ = stopping.send(true);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            open = connections.len(),
            "requests still in flight after the grace period; dropping their connections"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// Accept failures are per connection (reset before accept) or per process (out of file
/// descriptors); neither ends the server. The pause keeps an exhausted process from
/// spinning while connections close and free descriptors.
async fn accept_failed(err: &io::Error) {
    let per_connection = matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    );
    if per_connection {
        tracing::debug!(error = %err, "a connection failed before it was accepted");
        return;
    }
    metrics::counter!(crate::metrics::HTTP_ACCEPT_ERRORS_TOTAL).increment(1);
    tracing::warn!(error = %err, "cannot accept connections (out of file descriptors?); retrying shortly");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
