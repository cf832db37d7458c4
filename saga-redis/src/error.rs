//! Errors: connecting, and mapping Redis errors and script replies to [`StoreError`].

use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use saga_core::{SagaId, SagaStatus, StoreError};
use uuid::Uuid;

/// Why [`RedisStoreBuilder::connect`](crate::RedisStoreBuilder::connect) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The builder's settings are invalid (no URL, a bad key prefix, a zero limit, ...).
    #[error("invalid Redis store configuration: {0}")]
    Config(String),
    /// A URL does not parse.
    #[error("invalid Redis URL {url}: {source}")]
    Url {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// The parse error.
        #[source]
        source: RedisError,
    },
    /// The server refused the credentials (or wants some and the URL has none).
    #[error(
        "Redis at {node} refused the credentials: {source}; put the right user and password in the URL \
         (redis://user:password@host:port for an ACL user, redis://:password@host:port for requirepass)"
    )]
    Auth {
        /// The server's address.
        node: String,
        /// The server's answer.
        #[source]
        source: RedisError,
    },
    /// The server could not be reached (or did not answer in time).
    #[error("cannot reach Redis at {node}: {source}")]
    Unreachable {
        /// The server's address (or the cluster's seed nodes).
        node: String,
        /// The connection error.
        #[source]
        source: RedisError,
    },
    /// The key prefix was set up with another partition count, which is fixed at deployment.
    #[error(
        "key prefix {prefix:?} was set up with {recorded} partitions, but this store is configured with \
         {configured}; the partition count is fixed at deployment: configure {recorded}, or use a new key prefix"
    )]
    PartitionMismatch {
        /// The key prefix.
        prefix: String,
        /// The partition count recorded in the meta key.
        recorded: u64,
        /// The partition count this store was built with.
        configured: u16,
    },
    /// The key prefix holds data in a key layout this version does not know.
    #[error(
        "key prefix {prefix:?} holds data in key layout version {recorded}, this saga-redis writes version \
         {supported}; use a matching saga-redis version"
    )]
    LayoutMismatch {
        /// The key prefix.
        prefix: String,
        /// The layout version recorded in the meta key.
        recorded: u64,
        /// The layout version of this crate.
        supported: u32,
    },
    /// Reading or writing the meta key failed.
    #[error("cannot set up key prefix: {0}")]
    Store(#[from] StoreError),
}

/// `true` when `err` says the credentials are wrong or missing.
pub(crate) fn is_auth_error(err: &RedisError) -> bool {
    matches!(err.kind(), ErrorKind::AuthenticationFailed)
        || matches!(err.code(), Some("WRONGPASS" | "NOAUTH"))
}

/// Maps a Redis error of operation `op` to a store error, keeping the source: `WRONGTYPE`
/// (data of the wrong type under one of the store's keys) is [`StoreError::Corrupt`];
/// everything else (connection loss, timeouts, a server busy loading, refused commands) is
/// [`StoreError::Unavailable`], which the caller may retry.
pub(crate) fn redis_error(op: &str, saga: Option<SagaId>, err: RedisError) -> StoreError {
    if err.code() == Some("WRONGTYPE") {
        return StoreError::Corrupt {
            saga: saga.unwrap_or(SagaId(Uuid::nil())),
            problem: format!("{op}: {err}"),
        };
    }
    let hint = match err.kind() {
        ErrorKind::Server(ServerErrorKind::NoPerm) => {
            "; the Redis user lacks a permission the store needs (EVALSHA, SCRIPT LOAD, and the keys under the prefix)"
        }
        ErrorKind::Server(ServerErrorKind::BusyLoading) => {
            "; the server is loading its data, retry shortly"
        }
        _ if is_auth_error(&err) => "; check the user and password in the URL",
        _ => "",
    };
    StoreError::Unavailable {
        message: format!("{op}: {err}{hint}"),
        source: Some(Box::new(err)),
    }
}

/// A script reply: an array whose first element names the outcome.
pub(crate) struct Reply {
    op: &'static str,
    items: std::vec::IntoIter<Value>,
}

impl Reply {
    /// Splits a script's reply into its outcome code and the rest.
    pub(crate) fn parse(op: &'static str, value: Value) -> Result<(String, Reply), StoreError> {
        let Value::Array(items) = value else {
            return Err(unexpected(
                op,
                &format!("a reply that is not an array: {value:?}"),
            ));
        };
        let mut reply = Reply {
            op,
            items: items.into_iter(),
        };
        let code = reply.string()?;
        Ok((code, reply))
    }

    /// The next element as text.
    pub(crate) fn string(&mut self) -> Result<String, StoreError> {
        match self.items.next() {
            Some(Value::BulkString(bytes)) => String::from_utf8(bytes)
                .map_err(|err| unexpected(self.op, &format!("a reply that is not UTF-8: {err}"))),
            Some(Value::SimpleString(text)) => Ok(text),
            Some(Value::Int(n)) => Ok(n.to_string()),
            other => Err(unexpected(
                self.op,
                &format!("{other:?} where text was expected"),
            )),
        }
    }

    /// The next element as a non-negative integer (an integer reply or its text).
    pub(crate) fn uint(&mut self) -> Result<u64, StoreError> {
        match self.items.next() {
            Some(Value::Int(n)) => {
                u64::try_from(n).map_err(|_| unexpected(self.op, &format!("negative number {n}")))
            }
            Some(Value::BulkString(bytes)) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| {
                    unexpected(self.op, &format!("{bytes:?} where a number was expected"))
                }),
            other => Err(unexpected(
                self.op,
                &format!("{other:?} where a number was expected"),
            )),
        }
    }

    /// The next element as a count of following items.
    pub(crate) fn count(&mut self) -> Result<usize, StoreError> {
        let n = self.uint()?;
        usize::try_from(n).map_err(|_| unexpected(self.op, &format!("count {n} too large")))
    }

    /// The next element as a saga status name.
    pub(crate) fn status(&mut self, saga: SagaId) -> Result<SagaStatus, StoreError> {
        let text = self.string()?;
        text.parse().map_err(|err| StoreError::Corrupt {
            saga,
            problem: format!("{err}"),
        })
    }

    /// The next element as a flag (0 or 1).
    pub(crate) fn flag(&mut self) -> Result<bool, StoreError> {
        Ok(self.uint()? != 0)
    }

    /// The remaining elements as text.
    pub(crate) fn rest(&mut self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::with_capacity(self.items.len());
        while self.items.len() > 0 {
            out.push(self.string()?);
        }
        Ok(out)
    }

    /// Turns the outcomes every script may answer with into their [`StoreError`]s:
    /// `not_found`, `fenced`, `not_writable`, `too_large`, `corrupt`, `invalid`; anything else
    /// is an unexpected reply.
    pub(crate) fn into_error(mut self, code: &str, saga: SagaId, fence: u64) -> StoreError {
        let decoded = match code {
            "not_found" => Ok(StoreError::NotFound(saga)),
            "fenced" => self.uint().and_then(|current_fence| {
                let owner = self.string()?;
                Ok(StoreError::Fenced {
                    saga,
                    fence,
                    current_fence,
                    current_owner: (!owner.is_empty()).then_some(owner),
                })
            }),
            "not_writable" => self
                .status(saga)
                .map(|status| StoreError::NotWritable { saga, status }),
            "too_large" => (|| {
                let what = self.string()?;
                let size = self.count()?;
                let limit = self.count()?;
                Ok(StoreError::TooLarge { what, size, limit })
            })(),
            "corrupt" => self
                .string()
                .map(|problem| StoreError::Corrupt { saga, problem }),
            "invalid" => self.string().map(StoreError::Invalid),
            other => Err(unexpected(self.op, &format!("outcome {other:?}"))),
        };
        decoded.unwrap_or_else(|err| err)
    }
}

/// A reply the store's scripts never give: a script of another version, or a proxy in the
/// way.
pub(crate) fn unexpected(op: &str, what: &str) -> StoreError {
    StoreError::Unavailable {
        message: format!(
            "{op}: unexpected reply from Redis: {what} (is another version of saga-redis's scripts loaded?)"
        ),
        source: None,
    }
}

/// `url` with its password (if any) replaced by `***`, for messages and logs.
///
/// ```
/// assert_eq!(saga_redis::redact_url("redis://app:secret@db:6379"), "redis://app:***@db:6379");
/// ```
#[must_use]
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://{credentials}@{host}"),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url as redact;

    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(
            redact("redis://:secret@localhost:6379"),
            "redis://:***@localhost:6379"
        );
        assert_eq!(
            redact("rediss://alice:pw@h:1/0"),
            "rediss://alice:***@h:1/0"
        );
        assert_eq!(redact("redis://localhost:6379"), "redis://localhost:6379");
    }
}
