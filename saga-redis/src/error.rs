//! Errors: connecting, and mapping Redis errors to [`StoreError`] (script replies: see
//! `scripts::reply`).

use redis::{ErrorKind, RedisError, ServerErrorKind};
use saga_core::{SagaId, StoreError};
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
    /// A TLS setting is unusable: a file that cannot be read, PEM without a certificate, a
    /// key that does not belong to the client certificate, or TLS material for a URL that
    /// is not `rediss://`.
    #[error("cannot use the TLS {what} {origin}: {problem}")]
    Tls {
        /// Which setting (`CA certificate`, `client certificate`, `client key`, ...).
        what: String,
        /// The file it was read from, or the builder method that was given it.
        origin: String,
        /// What is wrong with it and what to give instead.
        problem: String,
    },
    /// The server would lose every saga on its next restart (see
    /// [`ServerIssue::AofReplayLoss`](crate::ServerIssue::AofReplayLoss)): AOF is on, the
    /// `default` user may not run the store's writes, and the server re-checks `EXEC`'s ACL
    /// as that user while loading its AOF (redis/redis#14541).
    #[error(
        "refusing to use Redis at {node} ({server}): AOF is on and the default user {problem}; this server re-checks EXEC's ACL \
         as the default user while loading its AOF (redis/redis#14541, fixed in Redis 8.6.0; Valkey has the same bug, valkey-io/valkey#3983), \
         so after a crash or restart it silently drops every saga write (the scripts' writes are logged as MULTI/EXEC) and comes back without any saga. \
         Fix the server: {workaround}. To start anyway, accepting that loss, allow it explicitly \
         (RedisStoreBuilder::allow_unsafe_server_config(UnsafeServerConfig::AofAclReplayLoss), or --allow-unsafe-redis-config aof-acl-replay-loss)",
        workaround = crate::check::REPLAY_WORKAROUND
    )]
    AofReplayLoss {
        /// The node (`host:port`).
        node: String,
        /// The server and its version, e.g. `Redis 7.0.15`.
        server: String,
        /// What the `default` user lacks.
        problem: String,
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

/// Whether a command inside a script was refused by the ACL. Redis answers that with a plain
/// `ERR` ("The user executing the script can't run this command or subcommand", "... can't
/// access at least one of the keys ...", "... can't publish to the channel ..."), not
/// `NOPERM`, and retrying it cannot help.
fn is_script_acl_refusal(err: &RedisError) -> bool {
    err.code() == Some("ERR")
        && err
            .detail()
            .is_some_and(|detail| detail.contains("The user executing the script can't"))
}

/// Maps a Redis error of operation `op` to a store error, keeping the source:
///
/// - `WRONGTYPE` (data of the wrong type under one of the store's keys) is
///   [`StoreError::Corrupt`];
/// - `NOPERM`, an ACL refusal inside a script, and refused credentials (`WRONGPASS`,
///   `NOAUTH`) are [`StoreError::Refused`]:
///   not transient, since only a change of the ACL or the URL fixes them, so clients fail at
///   once with what to change instead of retrying;
/// - everything else is [`StoreError::Unavailable`], which callers retry: connection loss
///   (refused, reset, broken pipe), timeouts (a `CLIENT PAUSE` outlasting the response
///   timeout), `LOADING`, `BUSY`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `READONLY` during
///   a failover, and `OOM` (see [`StoreError::is_transient`] for why). An error this list
///   does not know stays retryable: retrying a permanent error only delays its report by the
///   caller's bound, while failing on a transient one would drop work a blip should not.
pub(crate) fn redis_error(op: &str, saga: Option<SagaId>, err: RedisError) -> StoreError {
    if err.code() == Some("WRONGTYPE") {
        return StoreError::Corrupt {
            saga: saga.unwrap_or(SagaId(Uuid::nil())),
            problem: format!("{op}: {err}"),
        };
    }
    if matches!(err.kind(), ErrorKind::Server(ServerErrorKind::NoPerm))
        || err.code() == Some("NOPERM")
        || is_script_acl_refusal(&err)
    {
        return StoreError::Refused {
            message: format!(
                "{op}: {err}; the Redis user lacks a permission the store needs (EVALSHA, SCRIPT LOAD, PUBLISH and SUBSCRIBE on the wake channel, and the keys under the prefix)"
            ),
            source: Some(Box::new(err)),
        };
    }
    if is_auth_error(&err) {
        return StoreError::Refused {
            message: format!("{op}: {err}; check the user and password in the URL"),
            source: Some(Box::new(err)),
        };
    }
    let hint = match err.kind() {
        ErrorKind::Server(ServerErrorKind::BusyLoading) => {
            "; the server is loading its data, retry shortly"
        }
        _ if err.code() == Some("OOM") => {
            "; Redis is over its maxmemory: purge old terminal sagas (saga purge, or a coordinator's retention) or raise maxmemory"
        }
        _ => "",
    };
    StoreError::Unavailable {
        message: format!("{op}: {err}{hint}"),
        source: Some(Box::new(err)),
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
    use super::redis_error;
    use redis::{ErrorKind, RedisError};

    fn server_error(code: &str, detail: &str) -> RedisError {
        redis::make_extension_error(code.to_owned(), Some(detail.to_owned()))
    }

    fn io_error(kind: std::io::ErrorKind) -> RedisError {
        RedisError::from(std::io::Error::from(kind))
    }

    #[test]
    fn blips_are_transient() {
        let blips = [
            io_error(std::io::ErrorKind::ConnectionRefused),
            io_error(std::io::ErrorKind::ConnectionReset),
            io_error(std::io::ErrorKind::BrokenPipe),
            io_error(std::io::ErrorKind::TimedOut),
            RedisError::from((ErrorKind::Io, "timed out")),
            server_error("LOADING", "Redis is loading the dataset in memory"),
            server_error("BUSY", "Redis is busy running a script"),
            server_error("TRYAGAIN", "Multiple keys request during rehashing of slot"),
            server_error("CLUSTERDOWN", "The cluster is down"),
            server_error("MASTERDOWN", "Link with MASTER is down"),
            server_error("READONLY", "You can't write against a read only replica."),
            server_error("OOM", "command not allowed when used memory > 'maxmemory'."),
        ];
        for err in blips {
            let text = err.to_string();
            let mapped = redis_error("load", None, err);
            assert!(
                mapped.is_transient(),
                "{text} must be transient: {mapped:?}"
            );
        }
    }

    #[test]
    fn refusals_and_corruption_are_not_transient() {
        let refused = [
            server_error(
                "NOPERM",
                "User app has no permissions to run the 'evalsha' command",
            ),
            server_error(
                "WRONGPASS",
                "invalid username-password pair or user is disabled.",
            ),
            server_error("NOAUTH", "Authentication required."),
            server_error(
                "ERR",
                "The user executing the script can't publish to the channel mentioned in the command script: b0cd, on @user_script:1.",
            ),
        ];
        for err in refused {
            let text = err.to_string();
            let mapped = redis_error("load", None, err);
            assert!(
                matches!(mapped, saga_core::StoreError::Refused { .. }) && !mapped.is_transient(),
                "{text} must be refused: {mapped:?}"
            );
        }
        let wrong_type = redis_error(
            "load",
            None,
            server_error(
                "WRONGTYPE",
                "Operation against a key holding the wrong kind of value",
            ),
        );
        assert!(matches!(wrong_type, saga_core::StoreError::Corrupt { .. }));
        assert!(!wrong_type.is_transient());
    }

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
