//! Retry classification of the redis crate's errors, for steps that call Redis themselves
//! (a cache, a counter, a queue): `RedisError` is foreign to both crates, so it is wrapped.

use saga_core::{Classify, ErrorClass};

/// A `redis::RedisError` as a step error, classified by what the redis crate says about
/// retrying it: dropped connections, timeouts, `TRYAGAIN`/`LOADING`/`BUSY`-style answers and
/// cluster redirections are transient; everything else (wrong type, bad arguments, auth,
/// script errors) is permanent.
///
/// ```
/// use saga_core::Classify;
/// use saga_redis::RedisFailure;
///
/// let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
/// assert!(RedisFailure(redis::RedisError::from(reset)).classify().is_transient());
/// let refused = redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "bad url"));
/// assert!(!RedisFailure(refused).classify().is_transient());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct RedisFailure(#[from] pub redis::RedisError);

impl Classify for RedisFailure {
    fn classify(&self) -> ErrorClass {
        classify_redis_error(&self.0)
    }
}

/// The class of a `redis::RedisError` (see [`RedisFailure`]).
#[must_use]
pub fn classify_redis_error(err: &redis::RedisError) -> ErrorClass {
    use redis::RetryMethod as R;
    if err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal() {
        return ErrorClass::TRANSIENT;
    }
    match err.retry_method() {
        R::Reconnect
        | R::RetryImmediately
        | R::WaitAndRetry
        | R::AskRedirect
        | R::MovedRedirect
        | R::ReconnectFromInitialConnections
        | R::RefreshSlotsAndRetry => ErrorClass::TRANSIENT,
        R::NoRetry => ErrorClass::Permanent,
        // `RetryMethod` is non-exhaustive: a method added by a later redis release is a way
        // to retry, so retrying a bounded number of times is the safer reading.
        _ => ErrorClass::TRANSIENT,
    }
}
