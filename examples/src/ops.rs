//! What the deal-flow processes (`deal-flow-coordinator`, `deal-flow-load`) share: where the
//! store is, logging, the owner id, the simulated back office and the signals that stop them.

use std::sync::Arc;
use std::time::Duration;

use saga_core::{Engine, EngineBuilder, SagaStore};
use saga_redis::{RedisStore, RedisStoreBuilder, UnsafeServerConfig};

use crate::deal::DealFlow;
use crate::ledger::OfficeStore;
use crate::redis_office::RedisOffice;
use crate::services::{Backoffice, Directory};
use crate::sourcing::Sourcing;
use crate::world::{Faults, World};

/// An error of a deal-flow process, for people.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the sagas, books and ledger live: one Redis server or a Redis Cluster.
#[derive(Clone, Debug, clap::Args)]
pub struct StoreArgs {
    /// A standalone Redis server, e.g. `redis://127.0.0.1:6379`. A URL with a password is
    /// better given with `--redis-url-file` or the environment: a command line shows in `ps`.
    #[arg(
        long,
        env = "REDIS_URL",
        hide_env_values = true,
        required_unless_present_any = ["cluster_urls", "redis_url_file"]
    )]
    pub redis_url: Option<String>,
    /// Read the standalone server's URL from this file (its first line), so that a password
    /// never reaches the command line.
    #[arg(
        long,
        env = "REDIS_URL_FILE",
        hide_env_values = true,
        conflicts_with_all = ["redis_url", "cluster_urls"]
    )]
    pub redis_url_file: Option<std::path::PathBuf>,
    /// A Redis Cluster instead: some of its nodes' URLs, comma-separated.
    #[arg(
        long,
        env = "REDIS_CLUSTER_URLS",
        hide_env_values = true,
        value_delimiter = ',',
        conflicts_with = "redis_url"
    )]
    pub cluster_urls: Vec<String>,
    /// Prefix of every key (sagas, books and ledger). Processes that share a prefix share
    /// their sagas and their ledger.
    #[arg(
        long,
        env = "SAGA_KEY_PREFIX",
        hide_env_values = true,
        default_value = "dealflow"
    )]
    pub key_prefix: String,
    /// Partition count, fixed at deployment (every process of one prefix must agree).
    #[arg(long, env = "SAGA_PARTITIONS", hide_env_values = true, default_value_t = saga_redis::DEFAULT_PARTITIONS)]
    pub partitions: u16,
    /// TLS to Redis (`rediss://` URLs): a private CA and a client certificate.
    #[command(flatten)]
    pub tls: RedisTlsArgs,
    /// Start even though Redis has this configuration, which is refused because it loses
    /// every saga on the server's next restart: `aof-acl-replay-loss` (AOF on and a
    /// `default` user that may not run the store's writes, redis/redis#14541). Logged as an
    /// error at every start; fix the server instead (see docs/DEPLOY.md).
    #[arg(
        long,
        env = "SAGA_ALLOW_UNSAFE_REDIS_CONFIG",
        hide_env_values = true,
        value_enum,
        value_delimiter = ','
    )]
    pub allow_unsafe_redis_config: Vec<UnsafeRedisConfig>,
}

/// TLS to Redis: the CA to trust and the client certificate for mutual TLS, as PEM files.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RedisTlsArgs {
    /// For `rediss://`: trust only the CA certificate(s) in this PEM file, instead of the
    /// system's root certificates (for a private CA).
    #[arg(long, env = "REDIS_CA_FILE", hide_env_values = true)]
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// For `rediss://` to a server that asks for client certificates (`tls-auth-clients`):
    /// this certificate (PEM file), with `--redis-client-key`.
    #[arg(
        long,
        env = "REDIS_CLIENT_CERT",
        hide_env_values = true,
        requires = "redis_client_key"
    )]
    pub redis_client_cert: Option<std::path::PathBuf>,
    /// The private key (PEM file) of `--redis-client-cert`.
    #[arg(
        long,
        env = "REDIS_CLIENT_KEY",
        hide_env_values = true,
        requires = "redis_client_cert"
    )]
    pub redis_client_key: Option<std::path::PathBuf>,
}

impl RedisTlsArgs {
    /// `builder` with these TLS settings.
    pub fn apply(&self, mut builder: RedisStoreBuilder) -> RedisStoreBuilder {
        if let Some(ca) = &self.redis_ca_file {
            builder = builder.tls_ca_file(ca);
        }
        if let (Some(cert), Some(key)) = (&self.redis_client_cert, &self.redis_client_key) {
            builder = builder.tls_client_certificate_files(cert, key);
        }
        builder
    }
}

/// A Redis configuration the store refuses unless allowed (`--allow-unsafe-redis-config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnsafeRedisConfig {
    /// AOF on and a `default` user that may not run the store's writes: the next restart
    /// loses every saga (redis/redis#14541).
    AofAclReplayLoss,
}

impl From<UnsafeRedisConfig> for UnsafeServerConfig {
    fn from(config: UnsafeRedisConfig) -> Self {
        match config {
            UnsafeRedisConfig::AofAclReplayLoss => UnsafeServerConfig::AofAclReplayLoss,
        }
    }
}

impl StoreArgs {
    /// Connects the saga store and the back office's books and ledger (same prefix).
    ///
    /// # Errors
    /// A connection failed or the store refused the settings.
    pub async fn connect(&self) -> Result<(Arc<dyn SagaStore>, Arc<RedisOffice>), BoxError> {
        let mut builder = self.tls.apply(
            RedisStore::builder()
                .key_prefix(self.key_prefix.clone())
                .partitions(self.partitions),
        );
        for config in &self.allow_unsafe_redis_config {
            builder = builder.allow_unsafe_server_config((*config).into());
        }
        let url = self.standalone_url()?;
        match (&url, self.cluster_urls.as_slice()) {
            (Some(url), []) => {
                let builder = builder.url(url.clone());
                // The office talks to the same server: same CA, same client certificate.
                let tls = builder.tls_certificates()?;
                let store = builder.connect().await?;
                let office = RedisOffice::connect_with_tls(url, &self.key_prefix, tls).await?;
                Ok((Arc::new(store), Arc::new(office)))
            }
            (None, urls) if !urls.is_empty() => {
                let builder = builder.cluster(urls.iter().cloned());
                let tls = builder.tls_certificates()?;
                let store = builder.connect().await?;
                let office =
                    RedisOffice::connect_cluster_with_tls(urls, &self.key_prefix, tls).await?;
                Ok((Arc::new(store), Arc::new(office)))
            }
            _ => Err("give either --redis-url or --cluster-urls".into()),
        }
    }

    /// The standalone URL: `--redis-url`, or the first line of `--redis-url-file`.
    ///
    /// # Errors
    /// The file cannot be read or is empty (the error names the file, never its content).
    pub fn standalone_url(&self) -> Result<Option<String>, BoxError> {
        let Some(path) = &self.redis_url_file else {
            return Ok(self.redis_url.clone());
        };
        let text = std::fs::read_to_string(path).map_err(|err| {
            format!(
                "cannot read the Redis URL from {}: {err}; give a readable file with the URL on its first line",
                path.display()
            )
        })?;
        match text.lines().next().map(str::trim) {
            Some(url) if !url.is_empty() => Ok(Some(url.to_owned())),
            _ => Err(format!(
                "{} holds no Redis URL; write the URL (redis://user:password@host:port) on its first line",
                path.display()
            )
            .into()),
        }
    }

    /// Where the store is, for people (passwords hidden).
    #[must_use]
    pub fn describe(&self) -> String {
        if let Some(path) = &self.redis_url_file {
            return match self.standalone_url() {
                Ok(Some(url)) => format!("Redis at {}", saga_redis::redact_url(&url)),
                _ => format!("Redis at the URL in {}", path.display()),
            };
        }
        match &self.redis_url {
            Some(url) => format!("Redis at {}", saga_redis::redact_url(url)),
            None => format!(
                "Redis Cluster at {}",
                self.cluster_urls
                    .iter()
                    .map(|u| saga_redis::redact_url(u))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (with the current span), for log shippers and tests.
    Json,
}

/// Sends logs to stderr in `format` at `default_level` (e.g. `info`); `RUST_LOG` overrides it.
pub fn init_logs(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// `<hostname>-<pid>`: the hostname from `HOSTNAME` or `/etc/hostname` (`localhost` when
/// neither says).
#[must_use]
pub fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Parses a probability between 0 and 1.
///
/// # Errors
/// Not a number, or out of range.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not between 0 and 1"))
    }
}

/// Parses a latency range in milliseconds: `5` or `5..40`.
///
/// # Errors
/// Not numbers, or the range is reversed.
pub fn parse_latency(text: &str) -> Result<(u64, u64), String> {
    let (low, high) = text.split_once("..").unwrap_or((text, text));
    let parse = |t: &str| {
        t.trim()
            .parse::<u64>()
            .map_err(|e| format!("`{t}` is not a number of milliseconds: {e}"))
    };
    let (low, high) = (parse(low)?, parse(high)?);
    if low > high {
        return Err(format!("{low}..{high} is reversed"));
    }
    Ok((low, high))
}

/// Parses `step=duration`, e.g. `update_portfolio=3s`.
///
/// # Errors
/// No `=`, or not a duration.
pub fn parse_throttle(text: &str) -> Result<(String, Duration), String> {
    let (step, after) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not step=duration, e.g. update_portfolio=3s"))?;
    let after = humantime::parse_duration(after).map_err(|e| format!("`{after}`: {e}"))?;
    Ok((step.to_owned(), after))
}

/// The simulated services' behaviour; every process of one deployment must use the same
/// values so that the seeded faults agree.
#[derive(Clone, Debug, clap::Args)]
pub struct WorldArgs {
    /// Probability of a transient fault (503, timeout, 429 with retry-after) per call.
    #[arg(long, env = "DEAL_FLOW_FAULT_RATE", hide_env_values = true, default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_rate: f64,
    /// Seed of the fault injection and the company directory.
    #[arg(
        long,
        env = "DEAL_FLOW_SEED",
        hide_env_values = true,
        default_value_t = 7
    )]
    pub seed: u64,
    /// Simulated service latency in milliseconds, `5` or `5..40`.
    #[arg(long, default_value = "1..4", value_parser = parse_latency)]
    pub latency_ms: (u64, u64),
    /// Refuse the first attempt of this step with 429 and this retry-after, e.g.
    /// `update_portfolio=3s` (shows durable timers).
    #[arg(long, value_parser = parse_throttle)]
    pub throttle: Option<(String, Duration)>,
}

impl WorldArgs {
    /// The back office over `office`, with these faults.
    #[must_use]
    pub fn backoffice(&self, office: Arc<dyn OfficeStore>) -> Backoffice {
        let mut world = World::new(Faults {
            seed: self.seed,
            rate: self.fault_rate,
            fail_at: None,
            throttle: self.throttle.clone(),
        });
        world.latency_ms = self.latency_ms;
        Backoffice::new(world, Directory::generate(self.seed, 200), office, 1_000)
    }
}

/// An engine builder over `store` with both deal-flow saga types registered.
#[must_use]
pub fn engine_builder(store: Arc<dyn SagaStore>, owner: &str) -> EngineBuilder {
    Engine::builder_shared(store)
        .register(Sourcing)
        .register(DealFlow)
        .owner(owner)
}

/// Completes on SIGINT or SIGTERM.
///
/// # Errors
/// The signal handlers could not be installed.
pub fn shutdown_signal()
-> Result<impl std::future::Future<Output = &'static str> + Send + 'static, BoxError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}
