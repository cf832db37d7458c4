//! Connecting to Redis and building the engine that operator actions go through.
//!
//! Every store call of a command, the connection included, rides out a store that is briefly
//! unavailable: it is retried with jittered backoff until `--retry-for` has passed since the
//! command started (see [`client_retry`]).

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use saga_core::{ClientRetry, Engine, RetryPolicy, RetryingStore, SagaStore};
use saga_redis::{ConnectError, RedisStore, RedisStoreBuilder, UnsafeServerConfig};

use crate::cli::GlobalArgs;
use crate::error::CliError;

/// The owner id written by the CLI's engine (it never takes leases for these commands).
const OWNER: &str = "saga-cli";

/// How this command retries: for `retry_for` from now in all, by the client policy's pauses.
/// `retried` is set once anything was retried (the final error then says for how long).
/// The operator hears of the first retry of each call on stderr when it is a terminal.
pub(crate) fn client_retry(retry_for: Duration, retried: Arc<AtomicBool>) -> ClientRetry {
    let policy = if retry_for.is_zero() {
        RetryPolicy::no_retry()
    } else {
        RetryPolicy::client_default().with_max_elapsed(retry_for)
    };
    let until = tokio::time::Instant::now()
        .checked_add(retry_for)
        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600));
    ClientRetry::new(policy)
        .until(until)
        .on_retry(move |notice| {
            retried.store(true, Ordering::Relaxed);
            if notice.retry == 1 {
                let left = notice
                    .gives_up_in
                    .map(|left| {
                        format!(
                            " for up to {}",
                            humantime::format_duration(whole_seconds(left))
                        )
                    })
                    .unwrap_or_default();
                crate::output::print_notice(&format!(
                    "{} failed ({}); retrying{left} (--retry-for)",
                    notice.operation, notice.error
                ));
            }
        })
}

fn whole_seconds(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs_f64().round() as u64)
}

/// Whether a failed connection may succeed when tried again: the server was unreachable (down,
/// restarting, not answering in time) or answered with a transient error. A bad URL, refused
/// credentials or a mismatched key prefix are not.
fn connect_is_transient(err: &ConnectError) -> bool {
    match err {
        ConnectError::Unreachable { .. } => true,
        ConnectError::Store(err) => err.is_transient(),
        _ => false,
    }
}

/// Connects to the store the global flags name (retrying as `retry` says), and wraps it so
/// that every command's store calls retry the same way.
pub(crate) async fn store(
    global: &GlobalArgs,
    retry: &ClientRetry,
) -> Result<Arc<dyn SagaStore>, CliError> {
    let from_file = match &global.redis_url_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                CliError::new(format!(
                    "cannot read the Redis URL from {}: {err}; give a readable file with the URL on its first line",
                    path.display()
                ))
            })?;
            text.lines().next().map(|line| line.trim().to_owned())
        }
        None => None,
    };
    let Some(url) = from_file
        .as_deref()
        .or(global.redis_url.as_deref())
        .filter(|url| !url.trim().is_empty())
    else {
        return Err(CliError::new(
            "no Redis URL: pass --redis-url redis://host:port, --redis-url-file, or set REDIS_URL",
        ));
    };
    let connected = retry
        .run("connecting to Redis", connect_is_transient, || {
            let builder = RedisStore::builder()
                .url(url)
                .key_prefix(global.key_prefix.clone())
                .partitions(global.partitions)
                // One reconnection attempt per call: the retries above and in the commands'
                // store wrapper decide how long to keep trying, not the connection manager.
                .reconnect_retries(1);
            tls_and_safety(builder, global).connect()
        })
        .await
        .map_err(|err| connect_error(url, err))?;
    warn_about_data_loss(&connected);
    Ok(Arc::new(RetryingStore::new(
        Arc::new(connected),
        retry.clone(),
    )))
}

/// `builder` with the TLS flags, and allowed to connect to a server that would lose every
/// saga on its next restart: the CLI is an operator tool, which must still be able to inspect
/// and repair such a deployment; it warns (see [`warn_about_data_loss`]) where the
/// coordinators refuse.
fn tls_and_safety(mut builder: RedisStoreBuilder, global: &GlobalArgs) -> RedisStoreBuilder {
    if let Some(ca) = &global.redis_ca_file {
        builder = builder.tls_ca_file(ca);
    }
    if let (Some(cert), Some(key)) = (&global.redis_client_cert, &global.redis_client_key) {
        builder = builder.tls_client_certificate_files(cert, key);
    }
    builder.allow_unsafe_server_config(UnsafeServerConfig::AofAclReplayLoss)
}

/// One `warning:` line on stderr per server setting that loses every saga on the next
/// restart of Redis (the milder findings are the coordinators' to report).
fn warn_about_data_loss(store: &RedisStore) {
    let mut err = std::io::stderr().lock();
    for finding in store.server_findings() {
        if finding.issue.loses_everything_on_restart() {
            let _ = writeln!(err, "warning: {finding}");
        }
    }
}

/// An engine on `store` with no saga types: enough for retry, cancel, abandon and history.
pub(crate) fn engine(store: Arc<dyn SagaStore>) -> Result<Engine, CliError> {
    Engine::builder_shared(store)
        .owner(OWNER)
        .build()
        .map_err(CliError::from)
}

fn connect_error(url: &str, err: ConnectError) -> CliError {
    match err {
        ConnectError::Unreachable { source, .. } => CliError::new(format!(
            "cannot reach Redis at {} ({source}); Redis must be running and reachable at that URL (set it with --redis-url or REDIS_URL)",
            saga_redis::redact_url(url)
        )),
        other => CliError::new(other.to_string()),
    }
}
