//! The coordinator runtime: a pool of workers that claims due sagas from the store with a
//! lease and runs them — new sagas, sagas whose durable timer fired, and sagas whose lease
//! lapsed because their coordinator died (those resume from their journal).
//!
//! ```
//! use std::time::Duration;
//! use saga_core::{Coordinator, Engine, MemoryStore, Saga, SagaContext, SagaError, SagaStatus, StartOptions};
//!
//! struct Noop;
//! #[saga_core::async_trait]
//! impl Saga for Noop {
//!     type Input = ();
//!     type Output = ();
//!     const NAME: &'static str = "noop";
//!     async fn run(&self, _saga: &mut SagaContext, _input: ()) -> Result<(), SagaError> { Ok(()) }
//! }
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! let engine = Engine::builder(MemoryStore::new()).register(Noop).build()?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let workers = tokio::spawn(Coordinator::new(engine.clone()).workers(8).run(async { let _ = stopped.await; }));
//! // Any process can submit; the coordinator picks the saga up.
//! let started = engine.start::<Noop>(&(), StartOptions::default()).await?;
//! let outcome = engine.wait(started.id, Duration::from_secs(5)).await?;
//! assert_eq!(outcome.status, SagaStatus::Completed);
//! let _ = stop.send(());
//! let report = workers.await.unwrap();
//! assert_eq!(report.finished, 1);
//! # Ok::<_, saga_core::EngineError>(())
//! # }).unwrap();
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::store::Lease;
use crate::{Engine, EngineError, RunOutcome};

/// What a coordinator did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoordinatorReport {
    /// Sagas claimed and run (a saga woken by several timers counts once per run).
    pub runs: u64,
    /// Runs that ended in a terminal state.
    pub finished: u64,
    /// Runs that ended by setting a durable timer (the worker slot was freed).
    pub suspended: u64,
    /// Runs that stopped early: fenced, shutting down, or the store failed.
    pub interrupted: u64,
    /// Runs that ended with another error (quarantined, not found, ...).
    pub errors: u64,
    /// Sagas still running at the end of the shutdown grace period, whose leases were
    /// released so that other coordinators resume them at once.
    pub released_at_shutdown: u64,
}

/// A pool of workers running due sagas on one engine.
#[derive(Debug)]
pub struct Coordinator {
    engine: Engine,
    workers: usize,
    poll_interval: Duration,
    shutdown_grace: Duration,
}

impl Coordinator {
    /// A coordinator with 64 workers, a 250 ms poll interval (a fallback: stores with a
    /// wake-up signal are watched as well) and a 10 s shutdown grace period.
    #[must_use]
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            workers: 64,
            poll_interval: Duration::from_millis(250),
            shutdown_grace: Duration::from_secs(10),
        }
    }

    /// How many sagas run at once (at least 1).
    #[must_use]
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// How often the store is asked for due sagas when nothing signals new work (durable
    /// timers and lapsed leases are found this way).
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long in-flight steps may take to finish after shutdown begins.
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Runs until `shutdown` completes, then shuts down gracefully: stops claiming, lets the
    /// steps in flight finish (each saga then records its progress and releases its lease),
    /// and after the grace period aborts what still runs and releases those leases too, so
    /// other coordinators resume every saga at once rather than after its lease lapses.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> CoordinatorReport {
        let store = std::sync::Arc::clone(self.engine.store());
        let request = self.engine.claim_request();
        let mut wakeups = store.wakeups();
        let mut running: JoinSet<Result<RunOutcome, EngineError>> = JoinSet::new();
        let mut leases: HashMap<tokio::task::Id, Lease> = HashMap::new();
        let mut report = CoordinatorReport::default();
        tokio::pin!(shutdown);
        loop {
            if let Some(signal) = &mut wakeups {
                signal.borrow_and_update();
            }
            let free = self.workers.saturating_sub(running.len());
            let mut full_batch = false;
            if free > 0 {
                match store.claim_due(&request, free).await {
                    Ok(claimed) => {
                        full_batch = claimed.len() == free;
                        for lease in claimed {
                            let engine = self.engine.clone();
                            let task = lease.clone();
                            let handle =
                                running.spawn(async move { engine.run_claimed(task).await });
                            leases.insert(handle.id(), lease);
                            report.runs += 1;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "claiming due sagas failed; will retry");
                    }
                }
            }
            if full_batch {
                // More may be due: claim again as soon as a worker is free.
                tokio::task::yield_now().await;
            }
            tokio::select! {
                () = &mut shutdown => break,
                Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                    record(&mut report, &mut leases, joined);
                }
                () = changed(&mut wakeups), if !full_batch => {}
                () = tokio::time::sleep(self.poll_interval), if !full_batch => {}
                () = std::future::ready(()), if full_batch && running.len() < self.workers => {}
            }
        }
        tracing::info!(in_flight = running.len(), "coordinator shutting down");
        self.engine.begin_shutdown();
        let deadline = tokio::time::Instant::now() + self.shutdown_grace;
        while !running.is_empty() {
            tokio::select! {
                Some(joined) = running.join_next_with_id() => record(&mut report, &mut leases, joined),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        running.abort_all();
        while let Some(joined) = running.join_next_with_id().await {
            record(&mut report, &mut leases, joined);
        }
        for (_, lease) in leases.drain() {
            report.released_at_shutdown += 1;
            if let Err(err) = store.release(&lease).await {
                tracing::warn!(saga_id = %lease.saga_id, error = %err, "could not release a lease at shutdown; it lapses by itself");
            }
        }
        tracing::info!(?report, "coordinator stopped");
        report
    }
}

async fn changed(wakeups: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match wakeups {
        Some(signal) => {
            if signal.changed().await.is_err() {
                // The store dropped its signal: fall back to polling.
                *wakeups = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn record(
    report: &mut CoordinatorReport,
    leases: &mut HashMap<tokio::task::Id, Lease>,
    joined: Result<(tokio::task::Id, Result<RunOutcome, EngineError>), tokio::task::JoinError>,
) {
    match joined {
        Ok((id, result)) => {
            leases.remove(&id);
            match result {
                Ok(RunOutcome::Finished(_)) => report.finished += 1,
                Ok(RunOutcome::Suspended(_)) => report.suspended += 1,
                Err(EngineError::Interrupted { saga, reason }) => {
                    report.interrupted += 1;
                    tracing::info!(saga_id = %saga, %reason, "saga run interrupted");
                }
                Err(err) => {
                    report.errors += 1;
                    tracing::warn!(error = %err, "saga run failed");
                }
            }
        }
        // An aborted task keeps its lease entry: it is released after the grace period.
        Err(err) if err.is_cancelled() => {}
        Err(err) => {
            leases.remove(&err.id());
            report.errors += 1;
            tracing::error!(error = %err, "saga task panicked");
        }
    }
}
