//! Serving the router on a TCP socket with graceful shutdown.

use std::future::{Future, IntoFuture};
use std::io;
use std::time::Duration;

use axum::Router;
use tokio::net::{TcpListener, ToSocketAddrs};

/// How long requests in flight (long polls included) may take to finish after shutdown
/// begins before their connections are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Binds `addr` and serves `router` until `shutdown` completes, then stops accepting
/// connections and lets the requests in flight finish, for at most [`SHUTDOWN_GRACE`].
///
/// # Errors
/// The address cannot be bound, or accepting connections fails.
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
/// Accepting connections fails.
pub async fn serve_listener<F>(router: Router, listener: TcpListener, shutdown: F) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "saga HTTP API listening"),
        Err(err) => tracing::warn!(error = %err, "saga HTTP API listening on an unknown address"),
    }
    let (began, mut beginning) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = began.send(true);
    };
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        _ = beginning.wait_for(|began| *began) => {}
    }
    tracing::info!(grace = ?SHUTDOWN_GRACE, "saga HTTP API shutting down; finishing requests in flight");
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still in flight after the grace period; dropping their connections");
            Ok(())
        }
    }
}
