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

use std::collections::BTreeSet;
use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use saga_core::{
    Classify as _, ClientRetry, EngineError, RetryPolicy, SagaId, SagaStatus, StartOptions,
    content_key,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::coordinator::print_line;
use crate::deal::{DealFlow, DealRequest};
use crate::ledger::OfficeStore as _;
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
    }
}

/// Runs the load; returns whether every start was acknowledged, the ledger check holds and
/// every acknowledged saga of this batch ended.
///
/// # Errors
/// The store could not be reached.
pub async fn run(args: LoadArgs) -> Result<bool, BoxError> {
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
    writeln!(
        out,
        "deal-flow-load: {} deal sagas (run id `{}`) on {}, prefix `{}`",
        args.count,
        args.run_id,
        args.store.describe(),
        args.store.key_prefix
    )?;
    let began = Instant::now();
    let bar = if std::io::stdout().is_terminal() || args.count > 20 {
        let bar = ProgressBar::new(args.count as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} sagas ended {elapsed_precise}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    // Submit.
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut starts = JoinSet::new();
    for index in 0..args.count {
        let engine = engine.clone();
        let limit = Arc::clone(&limit);
        let request = deal_request(args.seed, index, args.watchlist_rate);
        let key = content_key(&["deal-flow-load", &args.run_id, &index.to_string()]);
        let twice = args.duplicate_every > 0 && index % args.duplicate_every == 0;
        starts.spawn(async move {
            let _permit = limit.acquire().await;
            let started = engine
                .start::<DealFlow>(&request, StartOptions::key(key.clone()))
                .await?;
            let mut duplicates = 0_u64;
            if twice
                && !engine
                    .start::<DealFlow>(&request, StartOptions::key(key))
                    .await?
                    .created
            {
                duplicates += 1;
            }
            Ok::<_, EngineError>((started.id, duplicates))
        });
    }
    // Acknowledged sagas (their start returned): these must all end.
    let mut ids = Vec::with_capacity(args.count);
    let mut duplicate_starts = 0;
    let mut start_errors = 0_usize;
    while let Some(joined) = starts.join_next().await {
        match joined? {
            Ok((id, duplicates)) => {
                ids.push(id);
                duplicate_starts += duplicates;
            }
            Err(err) => {
                // Still failing after `--retry-for` (or not retryable): counted, not fatal.
                tracing::error!(error = %err, "a start failed; its saga is not acknowledged");
                start_errors += 1;
            }
        }
    }
    let submitted = began.elapsed();
    // Wait for every saga: a few waiters at a time (each polls its saga), in submission order.
    let mut unfinished: BTreeSet<SagaId> = BTreeSet::new();
    let mut pending = ids.iter().copied();
    let mut waits = JoinSet::new();
    loop {
        while waits.len() < WAITERS {
            let Some(id) = pending.next() else { break };
            let engine = engine.clone();
            let timeout = args.timeout.saturating_sub(began.elapsed());
            waits.spawn(async move { (id, engine.wait(id, timeout).await) });
        }
        let Some(joined) = waits.join_next().await else {
            break;
        };
        let (id, outcome) = joined?;
        match outcome {
            Ok(_) => {}
            Err(EngineError::WaitTimedOut { status, .. }) => {
                tracing::warn!(saga_id = %id, %status, "saga did not end in time");
                unfinished.insert(id);
            }
            // The store was still unavailable when the wait's time ran out.
            Err(err) if err.is_transient() => {
                tracing::warn!(saga_id = %id, error = %err, "saga not seen ending in time");
                unfinished.insert(id);
            }
            Err(err) => return Err(err.into()),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let elapsed = began.elapsed();
    // Report over every saga in the store (reads: repeated whole after a store blip).
    let retry = ClientRetry::new(client_retry);
    let sagas = retry
        .run(
            "read the sagas for the report",
            EngineError::is_transient,
            || report::collect(&engine),
        )
        .await?;
    let office = retry
        .run(
            "read the books for the report",
            |err: &crate::services::ServiceError| err.classify().is_transient(),
            || office.snapshot(),
        )
        .await?;
    let totals = report::totals(&sagas, duplicate_starts, &office);
    let check = report::check_ledger(&sagas, &office);
    let mine: BTreeSet<SagaId> = ids.iter().copied().collect();
    let latencies: Vec<report::SagaLatency> = sagas
        .iter()
        .filter(|s| mine.contains(&s.state.id))
        .map(report::latency)
        .collect();
    let total: Vec<u64> = latencies.iter().filter_map(|l| l.total_ms).collect();
    let first: Vec<u64> = latencies.iter().filter_map(|l| l.first_step_ms).collect();
    let count = |status| totals.by_status.get(&status).copied().unwrap_or_default();
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
    writeln!(
        out,
        "Totals ({:.2}s, submitted in {:.2}s, {:.1} sagas/s)",
        elapsed.as_secs_f64(),
        submitted.as_secs_f64(),
        ids.len() as f64 / elapsed.as_secs_f64().max(1e-9)
    )?;
    writeln!(out, "  store: {}", totals.line())?;
    writeln!(
        out,
        "  this run: {} sagas acknowledged, {} start errors, {} unfinished | saga latency p50 {} p99 {} | submit to first step p50 {} p99 {}",
        ids.len(),
        start_errors,
        unfinished.len(),
        ms(report::quantile(&total, 0.5)),
        ms(report::quantile(&total, 0.99)),
        ms(report::quantile(&first, 0.5)),
        ms(report::quantile(&first, 0.99)),
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
    out.flush()?;
    let ok = check.holds() && unfinished.is_empty() && start_errors == 0;
    print_line(&serde_json::json!({
        "event": "load_summary",
        "ok": ok,
        "submitted": ids.len(),
        "acknowledged": ids.len(),
        "start_errors": start_errors,
        "unfinished": unfinished.len(),
        "store_sagas": totals.sagas,
        "completed": count(SagaStatus::Completed),
        "compensated": count(SagaStatus::Compensated),
        "failed": count(SagaStatus::Failed),
        "attempts": totals.attempts,
        "retries": totals.retries,
        "compensations": totals.compensations,
        "idempotency_hits": totals.idempotency_hits,
        "duplicate_starts": duplicate_starts,
        "resumes": totals.resumes,
        "elapsed_s": elapsed.as_secs_f64(),
        "throughput_per_s": ids.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        "latency_p50_ms": report::quantile(&total, 0.5),
        "latency_p99_ms": report::quantile(&total, 0.99),
        "first_step_p50_ms": report::quantile(&first, 0.5),
        "first_step_p99_ms": report::quantile(&first, 0.99),
        "ledger_ok": check.holds(),
        "effects": check.effects,
        "ledger_compensations": check.compensations,
        "problems": check.problems,
    }))?;
    Ok(ok)
}
