//! Connecting to Redis and building the engine that operator actions go through.

use saga_core::Engine;
use saga_redis::{ConnectError, RedisStore};

use crate::cli::GlobalArgs;
use crate::error::CliError;

/// The owner id written by the CLI's engine (it never takes leases for these commands).
const OWNER: &str = "saga-cli";

/// Connects to the store the global flags name.
pub(crate) async fn store(global: &GlobalArgs) -> Result<RedisStore, CliError> {
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
    RedisStore::builder()
        .url(url)
        .key_prefix(global.key_prefix.clone())
        .partitions(global.partitions)
        // One attempt: an operator wants to hear at once that Redis is down.
        .reconnect_retries(1)
        .connect()
        .await
        .map_err(|err| connect_error(url, err))
}

/// An engine on `store` with no saga types: enough for retry, cancel, abandon and history.
pub(crate) fn engine(store: RedisStore) -> Result<Engine, CliError> {
    Engine::builder(store)
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
