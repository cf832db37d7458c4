//! The fault proxy: a loopback TCP proxy that forwards bytes between clients and one
//! upstream server, and injects the [`Fault`] currently set.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// The most client connections open at once; more are closed as soon as they are accepted
/// (a runaway reconnect loop must not exhaust file descriptors).
pub const MAX_CONNECTIONS: usize = 256;

/// How long connecting to the upstream server may take before the client connection is
/// closed.
pub const CONNECT_BOUND: Duration = Duration::from_secs(5);

/// Under [`Fault::DropReplies`], how long after the first lost reply the connection is
/// closed, so that the client notices the loss (by a closed connection rather than only by
/// its own response timeout).
pub const DROP_CLOSE_AFTER: Duration = Duration::from_millis(100);

/// Bytes read at once in each direction.
const CHUNK: usize = 16 * 1024;

/// Pause after a failed `accept` (descriptor exhaustion, say) before accepting again.
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);

/// The fault the proxy injects. Set with [`FaultProxy::set`]; it applies at once to open
/// connections and to new ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Forward every byte unchanged, both ways.
    #[default]
    None,
    /// Forward every chunk after this delay, both ways (each direction in order; a
    /// request-reply round trip takes at least twice the delay).
    Latency(Duration),
    /// Close every open connection at once and close each new one as soon as it is
    /// accepted: the client sees connection resets and refused reconnects.
    Reset,
    /// Accept connections but forward nothing and answer nothing, as a network partition
    /// does: bytes read in either direction are discarded, and the client sees only its own
    /// timeouts. A connection that lost bytes is closed when the fault changes (its byte
    /// stream cannot be resumed, just as a TCP connection across a long partition dies).
    Blackhole,
    /// Forward client-to-server bytes but discard server-to-client bytes: the command is
    /// applied by the server, its reply lost. [`DROP_CLOSE_AFTER`] after the first lost
    /// reply the connection is closed, so the client notices and reconnects (into the same
    /// fault while it lasts).
    DropReplies,
}

/// What the proxy has done since it started; read with [`FaultProxy::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Client connections accepted and forwarded to the upstream server.
    pub accepted: u64,
    /// Client connections closed at once: under [`Fault::Reset`], over
    /// [`MAX_CONNECTIONS`], or because the upstream server could not be reached.
    pub refused: u64,
    /// Open connections closed by a fault ([`Fault::Reset`], the end of a
    /// [`Fault::Blackhole`] that lost bytes, [`Fault::DropReplies`]).
    pub closed_by_fault: u64,
    /// Chunks of bytes discarded ([`Fault::Blackhole`], [`Fault::DropReplies`]).
    pub chunks_dropped: u64,
    /// Of those, server-to-client chunks (lost replies).
    pub replies_dropped: u64,
}

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The loopback listener could not be bound.
    #[error(
        "cannot listen on 127.0.0.1 for the fault proxy to {upstream}: {source}; check that the loopback interface is up and ports are available"
    )]
    Bind {
        /// The server the proxy would forward to.
        upstream: SocketAddr,
        /// The bind error.
        source: io::Error,
    },
}

/// Counters shared by the accept loop and the connection tasks.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    closed_by_fault: AtomicU64,
    chunks_dropped: AtomicU64,
    replies_dropped: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A TCP proxy on `127.0.0.1` to one upstream server, injecting the [`Fault`] currently
/// set. Dropping it stops the accept loop and closes every connection (their tasks are
/// aborted).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    fault: watch::Sender<Fault>,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`, with no
    /// fault.
    ///
    /// # Errors
    ///
    /// [`ProxyError::Bind`] when no loopback port can be bound.
    pub async fn start(upstream: SocketAddr) -> Result<Self, ProxyError> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|source| ProxyError::Bind { upstream, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ProxyError::Bind { upstream, source })?;
        let (fault, faults) = watch::channel(Fault::None);
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            faults,
            Arc::clone(&counters),
        ));
        tracing::debug!(%addr, %upstream, "fault proxy listening");
        Ok(Self {
            addr,
            upstream,
            fault,
            counters,
            accept,
        })
    }

    /// The proxy's address (`127.0.0.1:<port>`): clients connect here instead of upstream.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server the proxy forwards to.
    #[must_use]
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Injects `fault` from now on, on open connections and new ones.
    pub fn set(&self, fault: Fault) {
        tracing::info!(proxy = %self.addr, ?fault, "fault proxy: fault set");
        // `send_replace` works with no receiver too (when the accept loop has ended).
        self.fault.send_replace(fault);
    }

    /// The fault currently injected.
    #[must_use]
    pub fn fault(&self) -> Fault {
        self.fault.borrow().clone()
    }

    /// What the proxy has done so far.
    #[must_use]
    pub fn stats(&self) -> ProxyStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProxyStats {
            accepted: read(&self.counters.accepted),
            refused: read(&self.counters.refused),
            closed_by_fault: read(&self.counters.closed_by_fault),
            chunks_dropped: read(&self.counters.chunks_dropped),
            replies_dropped: read(&self.counters.replies_dropped),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept loop owns the connection tasks' JoinSet: aborting it drops the set,
        // which aborts every connection task.
        self.accept.abort();
    }
}

/// Accepts clients until aborted; each accepted connection runs in a task of `connections`,
/// which is dropped (aborting them all) with this future.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Fault>,
    counters: Arc<Counters>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(error = %err, "fault proxy: accept failed; retrying");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        // Reap finished connection tasks so the set does not grow with history.
        while connections.try_join_next().is_some() {}
        if *faults.borrow() == Fault::Reset {
            tracing::debug!(%peer, "fault proxy: connection refused (reset)");
            Counters::bump(&counters.refused);
            drop(client);
            continue;
        }
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::warn!(%peer, limit = MAX_CONNECTIONS, "fault proxy: too many connections; closing the new one");
            Counters::bump(&counters.refused);
            drop(client);
            continue;
        };
        let faults = faults.clone();
        let counters = Arc::clone(&counters);
        connections.spawn(async move {
            let _permit = permit;
            serve(client, peer, upstream, faults, &counters).await;
        });
    }
}

/// Forwards one client connection until either side closes, an I/O error, or a fault
/// closes it.
async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    faults: watch::Receiver<Fault>,
    counters: &Counters,
) {
    let server = match tokio::time::timeout(CONNECT_BOUND, TcpStream::connect(upstream)).await {
        Ok(Ok(server)) => server,
        Ok(Err(err)) => {
            tracing::warn!(%peer, %upstream, error = %err, "fault proxy: cannot reach the upstream server; closing the client connection");
            Counters::bump(&counters.refused);
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, %upstream, bound = ?CONNECT_BOUND, "fault proxy: connecting upstream timed out; closing the client connection");
            Counters::bump(&counters.refused);
            return;
        }
    };
    // Small request-reply messages: sending each chunk at once is what a client expects.
    for stream in [&client, &server] {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %err, "fault proxy: cannot set TCP_NODELAY");
        }
    }
    Counters::bump(&counters.accepted);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // Set once a byte was discarded: from then on this connection cannot resume forwarding.
    let tainted = AtomicBool::new(false);
    let to_server = Pump {
        direction: Direction::ToServer,
        faults: faults.clone(),
        counters,
        tainted: &tainted,
    };
    let to_client = Pump {
        direction: Direction::ToClient,
        faults,
        counters,
        tainted: &tainted,
    };
    // Either direction ending ends the connection: both halves are dropped (closed) here.
    let end = tokio::select! {
        end = to_server.run(client_read, server_write) => end,
        end = to_client.run(server_read, client_write) => end,
    };
    match end {
        Ok(End::Closed) => tracing::debug!(%peer, "fault proxy: connection closed by a peer"),
        Ok(End::Fault) => {
            Counters::bump(&counters.closed_by_fault);
            tracing::debug!(%peer, "fault proxy: connection closed by the fault");
        }
        Err(err) => {
            tracing::debug!(%peer, error = %err, "fault proxy: connection failed; closed");
        }
    }
}

/// Which way bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// Why a pump stopped.
#[derive(Debug)]
enum End {
    /// A peer closed its side.
    Closed,
    /// The fault closed the connection.
    Fault,
}

/// One direction of one connection.
struct Pump<'a> {
    direction: Direction,
    faults: watch::Receiver<Fault>,
    counters: &'a Counters,
    tainted: &'a AtomicBool,
}

impl Pump<'_> {
    async fn run(mut self, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> io::Result<End> {
        let mut buf = vec![0_u8; CHUNK];
        // Under `DropReplies`: when this connection is closed.
        let mut close_at: Option<Instant> = None;
        loop {
            let fault = self.faults.borrow_and_update().clone();
            if fault == Fault::Reset {
                return Ok(End::Fault);
            }
            let losing = matches!(fault, Fault::Blackhole | Fault::DropReplies);
            if !losing && self.tainted.load(Ordering::Relaxed) {
                return Ok(End::Fault);
            }
            let close = async {
                match close_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                read = from.read(&mut buf) => read?,
                changed = self.faults.changed() => {
                    if changed.is_err() {
                        // The proxy is gone: nothing can set a fault any more.
                        return Ok(End::Closed);
                    }
                    continue;
                }
                () = close => return Ok(End::Fault),
            };
            if read == 0 {
                return Ok(End::Closed);
            }
            // The fault may have changed while this chunk was read.
            let fault = self.faults.borrow().clone();
            match fault {
                Fault::None => to.write_all(&buf[..read]).await?,
                Fault::Latency(delay) => {
                    tokio::time::sleep(delay).await;
                    if *self.faults.borrow() == Fault::Reset {
                        return Ok(End::Fault);
                    }
                    to.write_all(&buf[..read]).await?;
                }
                Fault::Reset => return Ok(End::Fault),
                Fault::Blackhole => self.discard(),
                Fault::DropReplies => match self.direction {
                    Direction::ToServer => to.write_all(&buf[..read]).await?,
                    Direction::ToClient => {
                        self.discard();
                        Counters::bump(&self.counters.replies_dropped);
                        close_at.get_or_insert_with(|| Instant::now() + DROP_CLOSE_AFTER);
                    }
                },
            }
        }
    }

    fn discard(&self) {
        self.tainted.store(true, Ordering::Relaxed);
        Counters::bump(&self.counters.chunks_dropped);
    }
}
