//! Fault injection for the saga workspace: a fault proxy and the nemesis harness.
//!
//! [`FaultProxy`] is a small TCP proxy on a loopback port that sits between coordinators
//! (a [`RedisStore`](saga_redis::RedisStore) connected to [`FaultProxy::addr`]) and a Redis
//! server, and injects one [`Fault`] at a time, switchable while connections are open:
//! added latency, replies lost after the command reached Redis, connection resets and
//! blackholes. [`ProxyStats`] counts what each fault did, so that a test can assert that the
//! fault really happened instead of hoping it did.
//!
//! ```no_run
//! # async fn demo(redis: std::net::SocketAddr) -> Result<(), saga_chaos::ProxyError> {
//! use saga_chaos::{Fault, FaultProxy};
//!
//! let proxy = FaultProxy::start(redis).await?;
//! let url = format!("redis://{}", proxy.addr());
//! // ... connect a store to `url`, run sagas ...
//! proxy.set(Fault::DropReplies);
//! // ... the commands are applied, their answers lost ...
//! proxy.set(Fault::None);
//! # Ok(()) }
//! ```
//!
//! [`nemesis`] is the harness behind the `saga-chaos` binary: coordinator processes on
//! real redis-servers under a seeded schedule of kills, pauses past the lease, Redis
//! restarts, `CLIENT PAUSE`, `maxmemory`, `SCRIPT FLUSH`, proxy faults and (on a cluster)
//! failovers, with the invariants checked from the participants' ledger afterwards.

#![forbid(unsafe_code)]

pub mod nemesis;
mod proxy;

pub use proxy::{
    CONNECT_BOUND, DROP_CLOSE_AFTER, Fault, FaultProxy, MAX_CONNECTIONS, ProxyError, ProxyStats,
};
