//! The coordinator runtime: a pool of workers that claims due sagas from the store with a
//! lease and runs them — new sagas, sagas whose durable timer fired, and sagas whose lease
//! lapsed because their coordinator died (those resume from their journal).
//!
//! ```
//! use std::time::Duration;
//! use saga_core::{Coordinator, Engine, MemoryStore, Saga, SagaContext, SagaError, SagaStatus, StartOptions};
//!
//! struct Noop;
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
//! let started = engine.start_with::<Noop>(&(), StartOptions::default()).await?;
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
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::engine::{Dispatch, Handoff};
use crate::store::{ClaimRequest, Lease, SagaStore};
use crate::{Engine, EngineError, Interruption, RunOutcome};

/// The most sagas one claim asks the store for.
const MAX_CLAIM_BATCH: usize = 256;

/// How many claims may be in flight at once: with a slow store, workers that free up while
/// one claim waits for its reply are filled by the next, instead of idling for a round trip.
const MAX_CLAIMS_IN_FLIGHT: usize = 4;

/// What a coordinator did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoordinatorReport {
    /// Sagas claimed and run (a saga woken by several timers counts once per run).
    pub runs: u64,
    /// Runs that ended in a terminal state.
    pub finished: u64,
    /// Runs that ended by setting a durable timer (the worker slot was freed).
    pub suspended: u64,
    /// Runs that stopped early, whatever the cause ([`EngineError::Interrupted`]); the
    /// fields below count some causes on their own.
    pub interrupted: u64,
    /// Interrupted runs whose saga another coordinator took over ([`Interruption::Fenced`]).
    pub fenced: u64,
    /// Interrupted runs whose lease lapsed before it could be renewed
    /// ([`Interruption::LeaseLapsed`]).
    pub lease_lapsed: u64,
    /// Interrupted runs whose writes met an unavailable store
    /// ([`Interruption::StoreUnavailable`]).
    pub store_unavailable: u64,
    /// Runs stopped by this coordinator's shutdown before the grace period ended
    /// ([`Interruption::ShuttingDown`]).
    pub shut_down: u64,
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
    retention: Option<Duration>,
    housekeeping_interval: Duration,
}

/// How long a coordinator keeps terminal sagas by default: a week.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Coordinator {
    /// A coordinator with 64 workers, a 250 ms poll interval (a fallback: stores with a
    /// wake-up signal are watched as well), a 10 s shutdown grace period, and a retention of
    /// [`DEFAULT_RETENTION`] for terminal sagas, enforced every 30 s.
    #[must_use]
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            workers: 64,
            poll_interval: Duration::from_millis(250),
            shutdown_grace: Duration::from_secs(10),
            retention: Some(DEFAULT_RETENTION),
            housekeeping_interval: Duration::from_secs(30),
        }
    }

    /// How long terminal sagas (completed, compensated, failed) are kept after their last
    /// write before this coordinator deletes them with their histories, in small batches in
    /// the background; `None` keeps them until an operator purges them. Sagas that are not
    /// terminal are never touched. Without retention the store grows by every saga run.
    /// Failed sagas go too: an operator has the retention period to retry or inspect them
    /// (alert on `saga_stored_sagas{status="failed"}`).
    #[must_use]
    pub fn retention(mut self, keep: Option<Duration>) -> Self {
        self.retention = keep;
        self
    }

    /// How often retention runs and the store gauges (`saga_stored_sagas{status}`,
    /// `saga_due_sagas{partition}`) are refreshed (default 30 s).
    #[must_use]
    pub fn housekeeping_interval(mut self, every: Duration) -> Self {
        self.housekeeping_interval = every;
        self
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
    ///
    /// How work arrives: a claim loop, running beside the workers, takes batches of due
    /// sagas from the store whenever workers are free and the store signals new work (or the
    /// poll interval passes), with several claims in flight when the store is slow; and a
    /// saga started on this engine while a worker is free is created with its lease and
    /// handed to that worker directly. A worker slot is freed the moment its run ends.
    ///
    /// An engine whose shutdown has begun ([`Engine::begin_shutdown`](crate::Engine::begin_shutdown), which a previous
    /// coordinator's shutdown calls) runs nothing more: on such an engine `run` returns at
    /// once with an empty report, and a shutdown begun elsewhere during the run ends it as
    /// `shutdown` would, within a poll interval. (Otherwise every saga claimed would stop at once and be due again,
    /// claimed again, for ever.) Build a new engine for a new coordinator.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> CoordinatorReport {
        if self.engine.is_shutting_down() {
            tracing::warn!(
                "coordinator not started: its engine was shut down (irreversibly); build a new engine for a new coordinator"
            );
            return CoordinatorReport::default();
        }
        let store = Arc::clone(self.engine.store());
        let slots = Arc::new(Semaphore::new(self.workers));
        let (handoff_tx, mut handoffs) = mpsc::unbounded_channel::<Handoff>();
        self.engine.local().set_dispatch(Dispatch {
            slots: Arc::clone(&slots),
            handoff: handoff_tx.clone(),
        });
        let (stop_claiming, claiming_stopped) = watch::channel(false);
        let claimer = tokio::spawn(
            ClaimLoop {
                store: Arc::clone(&store),
                request: self.engine.claim_request(),
                slots: Arc::clone(&slots),
                handoff: handoff_tx,
                poll_interval: self.poll_interval,
                stop: claiming_stopped,
            }
            .run(),
        );
        let chores = tokio::spawn(crate::housekeeping::run(
            Arc::clone(&store),
            crate::housekeeping::Chores {
                retention: self.retention,
                every: self.housekeeping_interval,
            },
            stop_claiming.subscribe(),
        ));
        let mut running: JoinSet<Result<RunOutcome, EngineError>> = JoinSet::new();
        let mut leases: HashMap<tokio::task::Id, Lease> = HashMap::new();
        let mut report = CoordinatorReport::default();
        tokio::pin!(shutdown);
        // How soon a shutdown begun elsewhere (`Engine::begin_shutdown`) is seen by an idle
        // coordinator; a busy one sees it as each run ends.
        let mut shutdown_check = tokio::time::interval(self.poll_interval);
        shutdown_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                _ = shutdown_check.tick() => {
                    if self.engine.is_shutting_down() {
                        tracing::warn!("the engine was shut down under its coordinator: the coordinator stops");
                        break;
                    }
                }
                Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                    record(&mut report, &mut leases, joined);
                    if self.engine.is_shutting_down() {
                        tracing::warn!("the engine was shut down under its coordinator: the coordinator stops");
                        break;
                    }
                }
                Some(handoff) = handoffs.recv() => {
                    spawn_run(&self.engine, &mut running, &mut leases, handoff);
                    report.runs += 1;
                }
            }
        }
        tracing::info!(in_flight = running.len(), "coordinator shutting down");
        // No new work: neither from local starts nor from the store. A claim in flight is
        // let finish, so that the leases it takes are released below rather than stranded.
        self.engine.local().clear_dispatch(&slots);
        let _ = stop_claiming.send(true);
        if let Err(err) = claimer.await {
            tracing::error!(error = %err, "the claim loop panicked");
        }
        // Chores are not worth waiting for: an interrupted purge batch is atomic anyway.
        chores.abort();
        if let Err(err) = chores.await
            && !err.is_cancelled()
        {
            tracing::error!(error = %err, "the housekeeping task panicked");
        }
        handoffs.close();
        // Handed over but never started: free at once for other coordinators.
        while let Some(handoff) = handoffs.recv().await {
            report.released_at_shutdown += 1;
            if let Err(err) = store.release(&handoff.lease).await {
                tracing::warn!(saga_id = %handoff.lease.saga_id, error = %err, "could not release a lease at shutdown; it lapses by itself");
            }
        }
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
        for lease in leases.into_values() {
            report.released_at_shutdown += 1;
            if let Err(err) = store.release(&lease).await {
                tracing::warn!(saga_id = %lease.saga_id, error = %err, "could not release a lease at shutdown; it lapses by itself");
            }
        }
        tracing::info!(?report, "coordinator stopped");
        report
    }
}

/// Starts the run of a handed-over saga; its worker slot is freed when the task ends.
fn spawn_run(
    engine: &Engine,
    running: &mut JoinSet<Result<RunOutcome, EngineError>>,
    leases: &mut HashMap<tokio::task::Id, Lease>,
    handoff: Handoff,
) {
    let engine = engine.clone();
    let lease = handoff.lease.clone();
    let handle = running.spawn(async move {
        let Handoff {
            lease,
            state,
            local,
            permit,
        } = handoff;
        let _worker = permit;
        engine.run_handoff(lease, state, local).await
    });
    leases.insert(handle.id(), lease);
}

/// Claims due sagas for free workers, beside the workers (never blocking them).
struct ClaimLoop {
    store: Arc<dyn SagaStore>,
    request: ClaimRequest,
    slots: Arc<Semaphore>,
    handoff: mpsc::UnboundedSender<Handoff>,
    poll_interval: Duration,
    stop: watch::Receiver<bool>,
}

impl ClaimLoop {
    async fn run(mut self) {
        let mut wakeups = self.store.wakeups();
        let mut claims: JoinSet<bool> = JoinSet::new();
        // `look`: work may be due, claim once a worker is free. `backlog`: the last claim
        // came back full, so more is due than it took: keep claiming (several claims in
        // flight) as workers free up, without waiting for news. Both hold at start: there
        // may be work from before this coordinator started.
        let mut look = true;
        let mut backlog = true;
        loop {
            if !look {
                tokio::select! {
                    _ = self.stop.changed() => break,
                    () = changed(&mut wakeups) => look = true,
                    () = tokio::time::sleep(self.poll_interval) => look = true,
                    Some(joined) = claims.join_next(), if !claims.is_empty() => {
                        backlog = joined.unwrap_or(false);
                        look = backlog;
                    }
                }
                continue;
            }
            if claims.len() >= MAX_CLAIMS_IN_FLIGHT {
                tokio::select! {
                    _ = self.stop.changed() => break,
                    Some(joined) = claims.join_next() => backlog = joined.unwrap_or(false),
                }
                continue;
            }
            let first = tokio::select! {
                _ = self.stop.changed() => break,
                permit = Arc::clone(&self.slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                Some(joined) = claims.join_next(), if !claims.is_empty() => {
                    backlog = joined.unwrap_or(false);
                    continue;
                }
            };
            let mut permits = vec![first];
            while permits.len() < MAX_CLAIM_BATCH {
                match Arc::clone(&self.slots).try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            if let Some(signal) = &mut wakeups {
                // Marked seen before claiming, so that news during the claim wakes us again.
                signal.borrow_and_update();
            }
            claims.spawn(claim(
                Arc::clone(&self.store),
                self.request.clone(),
                permits,
                self.handoff.clone(),
            ));
            look = backlog;
        }
        // Claims in flight finish (their leases go to the coordinator, which releases them).
        while claims.join_next().await.is_some() {}
    }
}

/// One claim for `permits.len()` free workers; hands each claimed saga to a worker and frees
/// the permits it could not fill. Returns whether the batch was full (more may be due).
async fn claim(
    store: Arc<dyn SagaStore>,
    request: ClaimRequest,
    mut permits: Vec<OwnedSemaphorePermit>,
    handoff: mpsc::UnboundedSender<Handoff>,
) -> bool {
    let wanted = permits.len();
    match store.claim_due(&request, wanted).await {
        Ok(leases) => {
            let full = leases.len() >= wanted;
            for lease in leases {
                let Some(permit) = permits.pop() else {
                    // A store that returns more than asked: hand back the extra lease.
                    if let Err(err) = store.release(&lease).await {
                        tracing::warn!(saga_id = %lease.saga_id, error = %err, "could not release an extra claimed saga; it runs once its lease lapses");
                    }
                    continue;
                };
                let handed = Handoff {
                    lease,
                    state: None,
                    local: None,
                    permit,
                };
                if let Err(returned) = handoff.send(handed) {
                    // The coordinator is gone (it only stops after this task ends, so this
                    // is a panic elsewhere): let another coordinator take the saga at once.
                    let lease = returned.0.lease;
                    if let Err(err) = store.release(&lease).await {
                        tracing::warn!(saga_id = %lease.saga_id, error = %err, "could not release a claimed saga; it runs once its lease lapses");
                    }
                }
            }
            full
        }
        Err(err) => {
            tracing::warn!(error = %err, "claiming due sagas failed; will retry");
            false
        }
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
            let lease = leases.remove(&id);
            match result {
                Ok(RunOutcome::Finished(_)) => report.finished += 1,
                Ok(RunOutcome::Suspended(_)) => report.suspended += 1,
                Err(EngineError::Interrupted { saga, cause }) => {
                    report.interrupted += 1;
                    match cause {
                        Interruption::Fenced { .. } => report.fenced += 1,
                        Interruption::LeaseLapsed => report.lease_lapsed += 1,
                        Interruption::StoreUnavailable { .. } => report.store_unavailable += 1,
                        Interruption::ShuttingDown => report.shut_down += 1,
                        _ => {}
                    }
                    tracing::info!(saga_id = %saga, reason = %cause, "saga run interrupted");
                }
                Err(err) => {
                    report.errors += 1;
                    match lease {
                        Some(lease) => {
                            tracing::warn!(saga_id = %lease.saga_id, error = %err, "saga run failed");
                        }
                        None => tracing::warn!(error = %err, "saga run failed"),
                    }
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
