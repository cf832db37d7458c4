//! `deal-flow-coordinator`: one long-running coordinator process of the deal-flow example.
//! It runs workers for the `sourcing` and `deal_flow` sagas against the simulated back office
//! whose books and ledger live in Redis (same key prefix as the sagas), so that several
//! processes share one ledger; it serves the HTTP API, `/metrics`, `/healthz` and `/readyz`;
//! and on SIGINT or SIGTERM it shuts down gracefully (stops claiming, lets steps in flight
//! finish within the grace period, releases every lease) and prints its report as one JSON
//! line on stdout.
//!
//! Stdout carries exactly two JSON lines, for scripts and tests:
//! `{"event":"ready","owner":..,"http_addr":..}` once it serves and claims, and
//! `{"event":"stopped","signal":..,"runs":..,"finished":..,"interrupted":..,
//! "interrupted_by":{"fenced":..,"lease_lapsed":..,"store_unavailable":..,"shut_down":..},...}`
//! when it has stopped.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use saga_core::{Coordinator, CoordinatorReport, Engine, SagaStore};
use saga_http::{HttpApi, ServeConfig};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};

use crate::api::ApiArgs;
use crate::kill_plan::KillPlanStore;
use crate::ledger::OfficeStore;
use crate::ops::{self, BoxError, LogFormat, StoreArgs, WorldArgs};

/// Command-line flags (each also readable from the environment variable it names).
#[derive(Debug, clap::Parser)]
#[command(name = "deal-flow-coordinator", version)]
pub struct CoordinatorArgs {
    /// Where the sagas, books and ledger live.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Sagas run at once by this process.
    #[arg(
        long,
        env = "SAGA_WORKERS",
        hide_env_values = true,
        default_value_t = 64
    )]
    pub workers: usize,
    /// Lease length: how long after this process stops answering its sagas are resumed by
    /// another process.
    #[arg(long, env = "SAGA_LEASE", hide_env_values = true, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// How often the store is asked for due sagas when no wake-up arrives (timers, lapsed
    /// leases).
    #[arg(long, env = "SAGA_POLL_INTERVAL", hide_env_values = true, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// After SIGTERM, how long steps in flight may take to finish before their sagas are
    /// released unfinished (they resume elsewhere from their journal).
    #[arg(long, env = "SAGA_SHUTDOWN_GRACE", hide_env_values = true, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Backoffs up to this long are slept in the process; longer ones become durable timers
    /// in the store (the worker is freed and any process resumes the saga when it is due).
    #[arg(long, env = "SAGA_INLINE_WAIT_MAX", hide_env_values = true, default_value = "1s", value_parser = humantime::parse_duration)]
    pub inline_wait_max: Duration,
    /// How long finished sagas (completed, compensated, failed) are kept before this
    /// process deletes them with their histories, in small batches in the background;
    /// `off` keeps them until `saga purge`. Size it to Redis' memory: sagas per second ×
    /// retention × bytes per saga (see docs/PERFORMANCE.md).
    #[arg(long, env = "SAGA_RETENTION", hide_env_values = true, default_value = "7days", value_parser = parse_retention)]
    pub retention: Retention,
    /// Owner id written into every lease (unique per live process). Default
    /// `<hostname>-<pid>`.
    #[arg(long, env = "SAGA_OWNER", hide_env_values = true)]
    pub owner: Option<String>,
    /// Address of the HTTP API (`/sagas/...`, `/metrics`, `/healthz`, `/readyz`); port 0
    /// picks a free port (printed in the ready line); `off` serves nothing.
    #[arg(
        long,
        env = "SAGA_HTTP_ADDR",
        hide_env_values = true,
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: String,
    /// Who may call the HTTP API, and its connection limits.
    #[command(flatten)]
    pub api: ApiArgs,
    /// Log format on stderr.
    #[arg(long, env = "SAGA_LOG_FORMAT", hide_env_values = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The simulated services' faults and latency.
    #[command(flatten)]
    pub world: WorldArgs,
    /// Fault-injection hook for tests, never for production: with this seed the process
    /// SIGKILLs itself at a seeded point of each saga's life (see `saga_examples::kill_plan`).
    #[arg(long, hide = true)]
    pub kill_plan: Option<u64>,
}

/// `--retention`: a duration, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

fn parse_retention(text: &str) -> Result<Retention, String> {
    if text == "off" {
        return Ok(Retention(None));
    }
    humantime::parse_duration(text)
        .map(|keep| Retention(Some(keep)))
        .map_err(|e| format!("`{text}` is not a duration (like 7days or 12h) or `off`: {e}"))
}

fn parse_http_addr(text: &str) -> Result<Option<SocketAddr>, BoxError> {
    if text == "off" {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|e| format!("--http-addr `{text}` is not host:port or `off`: {e}").into())
}

/// Runs the coordinator until SIGINT or SIGTERM; returns its report.
///
/// # Errors
/// Startup failed: the store, the HTTP address, the metrics recorder or the signal handlers.
pub async fn run(args: CoordinatorArgs) -> Result<CoordinatorReport, BoxError> {
    let owner = args.owner.clone().unwrap_or_else(ops::default_owner);
    let metrics = saga_http::install_metrics()?;
    let stop_signal = ops::shutdown_signal()?;
    // Refuse a bad API configuration before touching the store.
    let http = match parse_http_addr(&args.http_addr)? {
        Some(addr) => Some((addr, args.api.prepare(addr)?)),
        None => None,
    };
    let engine = build_engine(&args, &owner).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (http, http_addr) = match http {
        Some((addr, (auth, serve_config))) => {
            let api = args.api.api(engine.clone(), metrics, auth);
            let (task, bound) = serve_http(api, addr, serve_config, &stopped).await?;
            (Some(task), Some(bound.to_string()))
        }
        None => (None, None),
    };
    let (coordinator_stop, coordinator_stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(
        Coordinator::new(engine)
            .workers(args.workers)
            .poll_interval(args.poll_interval)
            .shutdown_grace(args.shutdown_grace)
            .retention(args.retention.0)
            .run(async {
                let _ = coordinator_stopped.await;
            }),
    );
    tracing::info!(
        %owner,
        store = %args.store.describe(),
        prefix = %args.store.key_prefix,
        http_addr = http_addr.as_deref().unwrap_or("off"),
        workers = args.workers,
        lease = ?args.lease,
        retention = ?args.retention.0,
        "deal-flow coordinator running"
    );
    print_line(&serde_json::json!({
        "event": "ready",
        "owner": owner,
        "http_addr": http_addr,
        "scheme": args.api.scheme(),
    }))?;
    let signal = stop_signal.await;
    tracing::info!(signal, grace = ?args.shutdown_grace, "shutting down");
    let _ = coordinator_stop.send(());
    let report = coordinator.await?;
    // The API stays up while the coordinator drains (metrics stay readable), then stops.
    let _ = stop.send(true);
    if let Some(task) = http {
        log_http_end(task.await);
    }
    drop(stopped);
    print_stopped(signal, &owner, &report)?;
    Ok(report)
}

/// Connects to the store and builds the engine with the back office and the flags' leases,
/// waits and client retries.
async fn build_engine(args: &CoordinatorArgs, owner: &str) -> Result<Engine, BoxError> {
    let (store, office) = args.store.connect().await?;
    let store: Arc<dyn SagaStore> = match args.kill_plan {
        Some(seed) => Arc::new(KillPlanStore::wrap(store, &args.store, seed, args.workers).await?),
        None => store,
    };
    let office: Arc<dyn OfficeStore> = office;
    let engine = ops::engine_builder(store, owner)
        .resource(args.world.backoffice(office))
        .lease_ttl(args.lease)
        .inline_wait_max(args.inline_wait_max)
        // A start through the API retries a store blip for at most half its request
        // timeout, so the client hears why (503) before the request itself times out (408).
        .client_retry(
            saga_core::RetryPolicy::client_default()
                .with_max_elapsed(args.api.http_request_timeout / 2),
        )
        .build()?;
    Ok(engine)
}

/// Binds `addr` and serves `api` until `stopped` turns true; returns the server's task and
/// the address it listens on (a port 0 is resolved).
async fn serve_http(
    api: HttpApi,
    addr: SocketAddr,
    serve_config: ServeConfig,
    stopped: &watch::Receiver<bool>,
) -> Result<(JoinHandle<std::io::Result<()>>, SocketAddr), BoxError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let http_addr = listener.local_addr()?;
    let router = api.router();
    let mut http_stopped = stopped.clone();
    let http = tokio::spawn(saga_http::serve_with(
        router,
        listener,
        serve_config,
        async move {
            let _ = http_stopped.wait_for(|s| *s).await;
        },
    ));
    Ok((http, http_addr))
}

/// Logs how the HTTP API's task ended, when not cleanly.
fn log_http_end(ended: Result<std::io::Result<()>, JoinError>) {
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "HTTP API stopped with an error"),
        Err(err) => tracing::warn!(error = %err, "HTTP API task failed"),
    }
}

/// The `stopped` line on stdout.
fn print_stopped(signal: &str, owner: &str, report: &CoordinatorReport) -> std::io::Result<()> {
    print_line(&serde_json::json!({
        "event": "stopped",
        "signal": signal,
        "owner": owner,
        "runs": report.runs,
        "finished": report.finished,
        "suspended": report.suspended,
        "interrupted": report.interrupted,
        // Why runs were interrupted (they resume elsewhere from their journals).
        "interrupted_by": {
            "fenced": report.fenced,
            "lease_lapsed": report.lease_lapsed,
            "store_unavailable": report.store_unavailable,
            "shut_down": report.shut_down,
        },
        "errors": report.errors,
        "released_at_shutdown": report.released_at_shutdown,
    }))
}

/// Writes one JSON line on stdout and flushes it (stdout may be a pipe read line by line).
///
/// # Errors
/// Stdout is closed.
pub fn print_line(value: &serde_json::Value) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")?;
    out.flush()
}
