#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]

mod builder;
mod check;
mod claim;
mod classify;
mod connection;
mod error;
mod hints;
mod keys;
mod replay;
mod scripts;
mod store;
#[cfg(feature = "tls")]
mod tls;
mod wake;

pub use builder::{
    DEFAULT_PARTITIONS, DEFAULT_PREFIX, MAX_PARTITIONS, RedisStoreBuilder, ReplicaWait,
};
pub use check::{ServerFinding, ServerIssue, UnsafeServerConfig};
pub use classify::{RedisFailure, classify_redis_error};
pub use error::{ConnectError, redact_url};
pub use keys::KeyLayout;
pub use store::RedisStore;
