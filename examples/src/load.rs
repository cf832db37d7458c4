//! `deal-flow-load`: a client-only process (its engine runs no workers) that submits deal-flow
//! sagas with idempotency keys, waits for every one of them, and prints totals, latencies and
//! the ledger check over every saga in the store.
//!
//! Running the same command twice submits nothing new: the keys derive from `--run-id` and
//! the saga's index, so the second run finds the first run's sagas and reports on them.
//!
//! It rides out store blips (a Redis restart, a `CLIENT PAUSE`, a failover): starts retry
//! for up to `--retry-for`, waits until `--timeout`, and the final report's reads for up to
//! `--retry-for` again. A start that still fails is counted (`start_errors`) and the run
//! goes on with the sagas that were acknowledged.
//!
//! With `--api-url` the starts and waits go through the coordinators' HTTP API instead, with
//! a bearer token (`--api-token-file` or `SAGA_API_TOKEN`) whose principal has the `start`
//! and `read` scopes; the keys are then `<run-id>/<index>`, scoped by the API to that
//! principal. The report and the ledger check still read the store directly, so the load
//! needs both the API and the store's flags. A token the API refuses (401, 403) ends the run.

use std::collections::BTreeSet;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use saga_core::{
    Classify as _, ClientRetry, Engine, EngineError, RetryPolicy, SagaId, SagaStatus, StartOptions,
    content_key,
};
use saga_http::client::{ApiClient, ClientError, WaitOutcome};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::coordinator::print_line;
use crate::deal::{DealFlow, DealRequest};
use crate::ledger::{OfficeState, OfficeStore};
use crate::ops::{self, BoxError, LogFormat, StoreArgs};
use crate::report;

/// Sagas waited for at once (each waiter reads its saga every 100 ms or on a wake-up).
const WAITERS: usize = 4;

/// Command-line flags.
#[derive(Debug, clap::Parser)]
#[command(name = "deal-flow-load", version)]
pub struct LoadArgs {
    /// Where the sagas, books and ledger live (the coordinators' store).
    #[command(flatten)]
    pub store: StoreArgs,
    /// Deal-flow sagas to submit.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Names this batch: the idempotency keys are `<run-id>/<index>`, so the same run id
    /// submits each saga once however often the command runs.
    #[arg(long, default_value = "load")]
    pub run_id: String,
    /// Seed of the generated deals.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of deals for watchlisted companies (their audit step refuses them, so their
    /// sagas compensate).
    #[arg(long, default_value_t = 0.05, value_parser = ops::parse_rate)]
    pub watchlist_rate: f64,
    /// Deliver every n-th start twice, as an at-least-once queue would (0: never).
    #[arg(long, default_value_t = 10)]
    pub duplicate_every: usize,
    /// Starts in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// How long to wait for every saga to end.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How long one start (and the final report) keeps retrying while the store is
    /// unavailable; waits retry until `--timeout`. `0s` fails at the first store error.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_for: Duration,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Submit and wait through the HTTP API instead of the store.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Where the coordinators' HTTP API is and how to authenticate. The token is read from a
/// file or from the `SAGA_API_TOKEN` environment variable, never from the command line.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ApiArgs {
    /// Start and wait for the sagas through the HTTP API at this URL (`http://host:port` or
    /// `https://host:port`) instead of the store; the report still reads the store.
    #[arg(long, env = "SAGA_API_URL", hide_env_values = true)]
    pub api_url: Option<String>,
    /// A file whose first line is the API bearer token (the token may also come from the
    /// `SAGA_API_TOKEN` environment variable). Its principal needs `start` and `read`.
    #[arg(long, env = "SAGA_API_TOKEN_FILE", hide_env_values = true)]
    pub api_token_file: Option<PathBuf>,
    /// For an `https` API: trust the CA certificate(s) in this PEM file instead of the
    /// system's.
    #[arg(long, env = "SAGA_API_CA_FILE", hide_env_values = true)]
    pub api_ca_file: Option<PathBuf>,
}

/// The environment variable that may hold the API token.
pub const API_TOKEN_ENV: &str = "SAGA_API_TOKEN";

impl ApiArgs {
    /// The API client, when `--api-url` is given.
    ///
    /// # Errors
    /// The URL, the token file or the CA file cannot be used.
    pub fn client(&self, retry_for: Duration) -> Result<Option<ApiClient>, BoxError> {
        let Some(url) = &self.api_url else {
            return Ok(None);
        };
        let mut client = ApiClient::new(url)?.retry_for(retry_for);
        if let Some(path) = &self.api_ca_file {
            client = client.ca_file(path)?;
        }
        if let Some(token) = self.token()? {
            client = client.token(&token);
        }
        Ok(Some(client))
    }

    /// The token: the first line of `--api-token-file`, else `SAGA_API_TOKEN`.
    fn token(&self) -> Result<Option<String>, BoxError> {
        if let Some(path) = &self.api_token_file {
            let text = std::fs::read_to_string(path).map_err(|err| {
                format!("cannot read the API token file {}: {err}", path.display())
            })?;
            let token = text.lines().next().unwrap_or_default().trim().to_owned();
            if token.is_empty() {
                return Err(format!(
                    "the API token file {} is empty; put the token (from `saga token new`) on its first line",
                    path.display()
                )
                .into());
            }
            return Ok(Some(token));
        }
        Ok(std::env::var(API_TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty()))
    }
}

/// Where starts and waits go: the store (through an engine) or the HTTP API.
#[derive(Clone)]
enum Submit {
    Store(Engine),
    Api(ApiClient),
}

/// A start that failed; `fatal` when no other start can succeed either (the API refused the
/// token).
struct StartFailed {
    error: BoxError,
    fatal: bool,
}

impl From<EngineError> for StartFailed {
    fn from(err: EngineError) -> Self {
        Self {
            error: err.into(),
            fatal: false,
        }
    }
}

impl From<ClientError> for StartFailed {
    fn from(err: ClientError) -> Self {
        let fatal = matches!(err.status(), Some(401 | 403));
        Self {
            error: err.into(),
            fatal,
        }
    }
}

/// How a wait ended.
enum Waited {
    Ended,
    /// Not seen ending in time (or set aside), with what was seen.
    Unfinished(String),
    /// An error a retry cannot fix.
    Failed(BoxError),
}

impl Submit {
    /// Starts deal `index`; returns its id and whether this call created it.
    async fn start(
        &self,
        run_id: &str,
        index: usize,
        request: &DealRequest,
    ) -> Result<(SagaId, bool), StartFailed> {
        match self {
            Self::Store(engine) => {
                let key = content_key(&["deal-flow-load", run_id, &index.to_string()]);
                let started = engine
                    .start_with::<DealFlow>(request, StartOptions::key(key))
                    .await?;
                Ok((started.id, started.created))
            }
            Self::Api(client) => {
                let input = serde_json::to_value(request).map_err(|err| StartFailed {
                    error: err.into(),
                    fatal: true,
                })?;
                let key = format!("{run_id}/{index}");
                let started = client
                    .start(<DealFlow as saga_core::Saga>::NAME, &input, Some(&key))
                    .await?;
                Ok((started.id, started.created))
            }
        }
    }

    async fn wait(&self, id: SagaId, timeout: Duration) -> Waited {
        match self {
            Self::Store(engine) => match engine.wait(id, timeout).await {
                Ok(_) => Waited::Ended,
                Err(EngineError::WaitTimedOut { status, .. }) => {
                    Waited::Unfinished(status.to_string())
                }
                // The store was still unavailable when the wait's time ran out.
                Err(err) if err.is_transient() => Waited::Unfinished(err.to_string()),
                Err(err) => Waited::Failed(err.into()),
            },
            Self::Api(client) => {
                // The server may shorten a long wait: wait again until the time is up.
                let deadline = Instant::now().checked_add(timeout);
                loop {
                    let left =
                        deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
                    match client.wait(id, left).await {
                        Ok(WaitOutcome::StillRunning { status }) if left.is_zero() => {
                            return Waited::Unfinished(status);
                        }
                        Ok(WaitOutcome::StillRunning { .. }) => {}
                        Ok(WaitOutcome::Quarantined { reason }) => {
                            return Waited::Unfinished(format!("quarantined: {reason}"));
                        }
                        Ok(_) => return Waited::Ended,
                        Err(err) if err.is_transient() => {
                            return Waited::Unfinished(err.to_string());
                        }
                        Err(err) => return Waited::Failed(err.into()),
                    }
                }
            }
        }
    }
}

/// The generated deal number `index` of a batch.
#[must_use]
pub fn deal_request(seed: u64, index: usize, watchlist_rate: f64) -> DealRequest {
    let mut rng = fastrand::Rng::with_seed(seed ^ (index as u64).wrapping_mul(0x9e37_79b9));
    DealRequest {
        company_id: format!("L-{seed}-{index:05}"),
        company_name: format!("Load Co {index}"),
        amount_musd: f64::from(rng.u32(1..=20)),
        score: rng.u32(70..=99),
        watchlisted: rng.f64() < watchlist_rate,
        committee: None,
    }
}

/// Runs the load; returns whether every start was acknowledged, the ledger check holds and
/// every acknowledged saga of this batch ended.
///
/// # Errors
/// The store could not be reached.
pub async fn run(args: LoadArgs) -> Result<bool, BoxError> {
    let api = args.api.client(args.retry_for)?;
    let (store, office) = args.store.connect().await?;
    let owner = format!("{}-client", ops::default_owner());
    let client_retry = if args.retry_for.is_zero() {
        RetryPolicy::no_retry()
    } else {
        RetryPolicy::client_default().with_max_elapsed(args.retry_for)
    };
    let engine = ops::engine_builder(store, &owner)
        .client_retry(client_retry.clone())
        .build()?;
    let mut out = std::io::stdout();
    let submit = announce(&mut out, &args, api, &engine)?;
    let began = Instant::now();
    let bar = progress_bar(args.count);
    let acknowledged = start_all(&args, &submit, &bar).await?;
    let submitted = began.elapsed();
    let unfinished = wait_all(&acknowledged.ids, &submit, &bar, args.timeout, began).await?;
    bar.finish_and_clear();
    let figures = RunFigures {
        elapsed: began.elapsed(),
        submitted,
        unfinished: unfinished.len(),
        acknowledged,
    };
    // Report over every saga in the store (reads: repeated whole after a store blip).
    let (sagas, office) = read_store(&engine, &*office, client_retry).await?;
    let totals = report::totals(&sagas, figures.acknowledged.duplicate_starts, &office);
    let check = report::check_ledger(&sagas, &office);
    let latencies = Latencies::of(&sagas, &figures.acknowledged.ids);
    print_report(&mut out, &figures, &totals, &check, &latencies)?;
    out.flush()?;
    let ok = check.holds() && figures.unfinished == 0 && figures.acknowledged.start_errors == 0;
    print_summary(ok, &figures, &totals, &check, &latencies)?;
    Ok(ok)
}

/// Says where the sagas go; returns the way there.
fn announce(
    out: &mut impl std::io::Write,
    args: &LoadArgs,
    api: Option<ApiClient>,
    engine: &Engine,
) -> std::io::Result<Submit> {
    match api {
        Some(client) => {
            writeln!(
                out,
                "deal-flow-load: {} deal sagas (run id `{}`) through the API at {}; report from {}, prefix `{}`",
                args.count,
                args.run_id,
                client.url(),
                args.store.describe(),
                args.store.key_prefix
            )?;
            Ok(Submit::Api(client))
        }
        None => {
            writeln!(
                out,
                "deal-flow-load: {} deal sagas (run id `{}`) on {}, prefix `{}`",
                args.count,
                args.run_id,
                args.store.describe(),
                args.store.key_prefix
            )?;
            Ok(Submit::Store(engine.clone()))
        }
    }
}

/// A bar of the sagas seen ending, hidden for a small batch written to a pipe.
fn progress_bar(count: usize) -> ProgressBar {
    if std::io::stdout().is_terminal() || count > 20 {
        let bar = ProgressBar::new(count as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} sagas ended {elapsed_precise}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    }
}

/// What the starts acknowledged.
struct Acknowledged {
    /// Sagas whose start returned: these must all end.
    ids: Vec<SagaId>,
    /// Starts answered with an existing saga.
    duplicate_starts: u64,
    /// Starts that failed for good; their sagas are not acknowledged.
    start_errors: usize,
}

/// Starts every saga of the batch, `--concurrency` at a time, delivering every
/// `--duplicate-every`-th twice.
async fn start_all(
    args: &LoadArgs,
    submit: &Submit,
    bar: &ProgressBar,
) -> Result<Acknowledged, BoxError> {
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut starts = JoinSet::new();
    for index in 0..args.count {
        let submit = submit.clone();
        let limit = Arc::clone(&limit);
        let request = deal_request(args.seed, index, args.watchlist_rate);
        let run_id = args.run_id.clone();
        let twice = args.duplicate_every > 0 && index % args.duplicate_every == 0;
        starts.spawn(async move {
            let _permit = limit.acquire().await;
            let (id, _) = submit.start(&run_id, index, &request).await?;
            let mut duplicates = 0_u64;
            if twice && !submit.start(&run_id, index, &request).await?.1 {
                duplicates += 1;
            }
            Ok::<_, StartFailed>((id, duplicates))
        });
    }
    let mut acknowledged = Acknowledged {
        ids: Vec::with_capacity(args.count),
        duplicate_starts: 0,
        start_errors: 0,
    };
    while let Some(joined) = starts.join_next().await {
        match joined? {
            Ok((id, duplicates)) => {
                acknowledged.ids.push(id);
                acknowledged.duplicate_starts += duplicates;
            }
            // The API refused the token: no start can succeed, so stop here.
            Err(failed) if failed.fatal => {
                bar.finish_and_clear();
                return Err(failed.error);
            }
            Err(failed) => {
                // Still failing after `--retry-for` (or not retryable): counted, not fatal.
                tracing::error!(error = %failed.error, "a start failed; its saga is not acknowledged");
                acknowledged.start_errors += 1;
            }
        }
    }
    Ok(acknowledged)
}

/// Waits for every saga of `ids` until `timeout` after `began`; returns those not seen
/// ending.
async fn wait_all(
    ids: &[SagaId],
    submit: &Submit,
    bar: &ProgressBar,
    timeout: Duration,
    began: Instant,
) -> Result<BTreeSet<SagaId>, BoxError> {
    // A few waiters at a time (each polls its saga), in submission order.
    let mut unfinished: BTreeSet<SagaId> = BTreeSet::new();
    let mut pending = ids.iter().copied();
    let mut waits = JoinSet::new();
    loop {
        while waits.len() < WAITERS {
            let Some(id) = pending.next() else { break };
            let submit = submit.clone();
            let timeout = timeout.saturating_sub(began.elapsed());
            waits.spawn(async move { (id, submit.wait(id, timeout).await) });
        }
        let Some(joined) = waits.join_next().await else {
            break;
        };
        let (id, outcome) = joined?;
        match outcome {
            Waited::Ended => {}
            Waited::Unfinished(seen) => {
                tracing::warn!(saga_id = %id, seen = %seen, "saga not seen ending in time");
                unfinished.insert(id);
            }
            Waited::Failed(err) => return Err(err),
        }
        bar.inc(1);
    }
    Ok(unfinished)
}

/// Every saga in the store and the books, each read retried whole after a store blip.
async fn read_store(
    engine: &Engine,
    office: &dyn OfficeStore,
    client_retry: RetryPolicy,
) -> Result<(Vec<report::SagaReport>, OfficeState), BoxError> {
    let retry = ClientRetry::new(client_retry);
    let sagas = retry
        .run(
            "read the sagas for the report",
            EngineError::is_transient,
            || report::collect(engine),
        )
        .await?;
    let office = retry
        .run(
            "read the books for the report",
            |err: &crate::services::ServiceError| err.classify().is_transient(),
            || office.snapshot(),
        )
        .await?;
    Ok((sagas, office))
}

/// This run's own figures.
struct RunFigures {
    elapsed: Duration,
    submitted: Duration,
    unfinished: usize,
    acknowledged: Acknowledged,
}

impl RunFigures {
    fn throughput_per_s(&self) -> f64 {
        self.acknowledged.ids.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The latencies of this run's sagas, in milliseconds.
struct Latencies {
    /// Start to end, of the sagas that ended.
    total: Vec<u64>,
    /// Start to the first step, of the sagas that got there.
    first: Vec<u64>,
}

impl Latencies {
    fn of(sagas: &[report::SagaReport], ids: &[SagaId]) -> Self {
        let mine: BTreeSet<SagaId> = ids.iter().copied().collect();
        let latencies: Vec<report::SagaLatency> = sagas
            .iter()
            .filter(|s| mine.contains(&s.state.id))
            .map(report::latency)
            .collect();
        Self {
            total: latencies.iter().filter_map(|l| l.total_ms).collect(),
            first: latencies.iter().filter_map(|l| l.first_step_ms).collect(),
        }
    }
}

/// The human-readable report: totals, this run's figures and the ledger check.
fn print_report(
    out: &mut impl std::io::Write,
    figures: &RunFigures,
    totals: &report::Totals,
    check: &report::LedgerCheck,
    latencies: &Latencies,
) -> std::io::Result<()> {
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
    let (total, first) = (&latencies.total, &latencies.first);
    writeln!(
        out,
        "Totals ({:.2}s, submitted in {:.2}s, {:.1} sagas/s)",
        figures.elapsed.as_secs_f64(),
        figures.submitted.as_secs_f64(),
        figures.throughput_per_s()
    )?;
    writeln!(out, "  store: {}", totals.line())?;
    writeln!(
        out,
        "  this run: {} sagas acknowledged, {} start errors, {} unfinished | saga latency p50 {} p99 {} | submit to first step p50 {} p99 {}",
        figures.acknowledged.ids.len(),
        figures.acknowledged.start_errors,
        figures.unfinished,
        ms(report::quantile(total, 0.5)),
        ms(report::quantile(total, 0.99)),
        ms(report::quantile(first, 0.5)),
        ms(report::quantile(first, 0.99)),
    )?;
    if check.holds() {
        writeln!(
            out,
            "Ledger check: OK — {} effects, each applied exactly once; {} compensations, each once and in reverse order; books match the outcomes",
            check.effects, check.compensations
        )?;
    } else {
        writeln!(out, "Ledger check: FAILED")?;
        for problem in &check.problems {
            writeln!(out, "  - {problem}")?;
        }
    }
    Ok(())
}

/// The `load_summary` JSON line, for scripts and tests.
fn print_summary(
    ok: bool,
    figures: &RunFigures,
    totals: &report::Totals,
    check: &report::LedgerCheck,
    latencies: &Latencies,
) -> std::io::Result<()> {
    let count = |status| totals.by_status.get(&status).copied().unwrap_or_default();
    let (total, first) = (&latencies.total, &latencies.first);
    let acknowledged = &figures.acknowledged;
    print_line(&serde_json::json!({
        "event": "load_summary",
        "ok": ok,
        "submitted": acknowledged.ids.len(),
        "acknowledged": acknowledged.ids.len(),
        "start_errors": acknowledged.start_errors,
        "unfinished": figures.unfinished,
        "store_sagas": totals.sagas,
        "completed": count(SagaStatus::Completed),
        "compensated": count(SagaStatus::Compensated),
        "failed": count(SagaStatus::Failed),
        "attempts": totals.attempts,
        "retries": totals.retries,
        "compensations": totals.compensations,
        "idempotency_hits": totals.idempotency_hits,
        "duplicate_starts": acknowledged.duplicate_starts,
        "resumes": totals.resumes,
        "elapsed_s": figures.elapsed.as_secs_f64(),
        "throughput_per_s": figures.throughput_per_s(),
        "latency_p50_ms": report::quantile(total, 0.5),
        "latency_p99_ms": report::quantile(total, 0.99),
        "first_step_p50_ms": report::quantile(first, 0.5),
        "first_step_p99_ms": report::quantile(first, 0.99),
        "ledger_ok": check.holds(),
        "effects": check.effects,
        "ledger_compensations": check.compensations,
        "problems": check.problems,
    }))
}
