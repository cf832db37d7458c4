//! One run of the example: the companies are split into batches, one sourcing saga each
//! (which starts a child deal saga per high score), run by an in-process coordinator while a
//! simulated partner answers the deals' committee votes; optionally a simulated crash after N
//! effects, followed by a restart that resumes every unfinished saga from its journal.

use std::sync::Arc;
use std::time::Duration;

use saga_core::{
    Coordinator, Engine, EngineError, SagaId, SagaStatus, SagaStore, StartOptions, content_key,
};
use tokio::task::{JoinHandle, JoinSet};

use crate::deal::{CommitteeVote, DealFlow};
use crate::ledger::OfficeStore;
use crate::services::{Backoffice, Directory};
use crate::sourcing::{Sourcing, SourcingRequest};
use crate::world::{Faults, World};

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Companies to source.
    pub companies: usize,
    /// Companies per sourcing saga.
    pub batch_size: usize,
    /// Seed for the directory, the faults and the partner's decisions.
    pub seed: u64,
    /// Probability of a transient fault per call.
    pub fault_rate: f64,
    /// A step that fails permanently everywhere.
    pub fail_at: Option<String>,
    /// Crash the coordinator after this many applied effects, then restart it.
    pub crash_after: Option<u64>,
    /// Sagas run at once.
    pub concurrency: usize,
    /// The owner id of the coordinator (kept across the simulated restart).
    pub owner: String,
    /// The search date used in keys.
    pub search_date: String,
    /// How long a deal waits for the committee's decision.
    pub approval_timeout: Duration,
    /// Whether the simulated partner answers (`false`: every deal times out).
    pub partner: bool,
    /// The pause between two messages to the partners.
    pub partner_spacing: Duration,
}

/// What the run leaves behind for the report.
pub struct Run {
    /// The engine (after any restart).
    pub engine: Engine,
    /// The back office, its books and ledger.
    pub office: Backoffice,
    /// Starts answered with an existing saga (duplicate deliveries absorbed).
    pub duplicate_starts: u64,
    /// Whether the simulated crash happened.
    pub crashed: bool,
}

/// Observes progress (the progress bar).
pub trait Progress: Send + Sync {
    /// A company's pipeline finished.
    fn company_done(&self);
}

impl Progress for () {
    fn company_done(&self) {}
}

fn build_engine(
    store: &Arc<dyn SagaStore>,
    office: &Backoffice,
    owner: &str,
) -> Result<Engine, EngineError> {
    Engine::builder_shared(Arc::clone(store))
        .register(Sourcing)
        .register(DealFlow)
        .resource(office.clone())
        .owner(owner)
        .lease_ttl(Duration::from_secs(5))
        .inline_wait_max(Duration::from_secs(1))
        .build()
}

/// The "process": a coordinator and the simulated partner on one engine. Dropping it is the
/// abrupt stop of a crash (tasks aborted, leases left held).
struct Process {
    engine: Engine,
    coordinator: JoinHandle<saga_core::CoordinatorReport>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    partner: Option<JoinHandle<()>>,
}

impl Process {
    fn start(engine: Engine, settings: &Settings) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let coordinator = tokio::spawn(
            Coordinator::new(engine.clone())
                .workers(settings.concurrency)
                .poll_interval(Duration::from_millis(50))
                .retention(None)
                .run(async {
                    let _ = stopped.await;
                }),
        );
        let partner = settings
            .partner
            .then(|| tokio::spawn(crate::partner::run(engine.clone(), settings.seed)));
        Self {
            engine,
            coordinator,
            stop: Some(stop),
            partner,
        }
    }

    /// Stops gracefully: every saga has ended, so nothing is in flight.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(partner) = self.partner.take() {
            partner.abort();
        }
        if let Err(err) = (&mut self.coordinator).await {
            tracing::error!(error = %err, "the coordinator task failed");
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.coordinator.abort();
        if let Some(partner) = &self.partner {
            partner.abort();
        }
    }
}

/// Runs the whole scenario on `store`.
///
/// # Errors
/// An engine error that is not about one saga (the store failed).
pub async fn run(
    settings: &Settings,
    store: Arc<dyn SagaStore>,
    office_state: Arc<dyn OfficeStore>,
    progress: Arc<dyn Progress>,
) -> Result<Run, EngineError> {
    let world = World::new(Faults {
        seed: settings.seed,
        rate: settings.fault_rate,
        fail_at: settings.fail_at.clone(),
        throttle: None,
    });
    let directory = Directory::generate(settings.seed, settings.companies);
    let office = Backoffice::new(world, directory, office_state, 20);
    let mut engine = build_engine(&store, &office, &settings.owner)?;
    let mut duplicate_starts = 0;
    let mut crashed = false;
    if let Some(effects) = settings.crash_after {
        office.world.crash.arm(effects);
    }
    let mut pending = batches(&office, settings);
    loop {
        let process = Process::start(engine.clone(), settings);
        let (finished, dups, tripped) = run_batches(&process, &office, &pending, &progress).await?;
        duplicate_starts += dups;
        if !tripped {
            process.stop().await;
            break;
        }
        // The "process" died: every task is aborted mid-flight, leases are still held in the
        // store. The restarted coordinator keeps its owner id, so it reclaims them at once.
        drop(process);
        crashed = true;
        pending.retain(|batch| !finished.contains(&batch.company_ids));
        office.world.crash.reset();
        engine = build_engine(&store, &office, &settings.owner)?;
        tracing::warn!(
            remaining = pending.len(),
            "coordinator restarted after a simulated crash; resuming"
        );
    }
    Ok(Run {
        engine,
        office,
        duplicate_starts,
        crashed,
    })
}

/// The sourcing requests: the directory in batches of `batch_size`.
fn batches(office: &Backoffice, settings: &Settings) -> Vec<SourcingRequest> {
    let committee = Some(CommitteeVote {
        timeout_ms: u64::try_from(settings.approval_timeout.as_millis()).unwrap_or(u64::MAX),
    });
    office
        .directory
        .companies()
        .chunks(settings.batch_size.max(1))
        .map(|batch| SourcingRequest {
            company_ids: batch.iter().map(|c| c.id.clone()).collect(),
            sectors: vec!["fintech".into(), "ai".into(), "climate".into()],
            search_date: settings.search_date.clone(),
            committee: committee.clone(),
            partner_spacing_ms: u64::try_from(settings.partner_spacing.as_millis())
                .unwrap_or(u64::MAX),
        })
        .collect()
}

/// Starts every batch's sourcing saga and waits for them all; returns the batches that
/// finished, the duplicate starts, and whether the crash switch tripped (in which case the
/// rest were abandoned with the process).
async fn run_batches(
    process: &Process,
    office: &Backoffice,
    requests: &[SourcingRequest],
    progress: &Arc<dyn Progress>,
) -> Result<(Vec<Vec<String>>, u64, bool), EngineError> {
    let mut tasks = JoinSet::new();
    for (index, request) in requests.iter().enumerate() {
        let engine = process.engine.clone();
        let request = request.clone();
        let progress = Arc::clone(progress);
        // The first batch's request is delivered twice, as a queue with at-least-once
        // delivery would: the idempotency key makes the second start a no-op.
        let duplicate = index == 0;
        tasks.spawn(async move {
            let result = source(&engine, &request, duplicate).await;
            for _ in &request.company_ids {
                progress.company_done();
            }
            (request.company_ids, result)
        });
    }
    let mut finished = Vec::new();
    let mut duplicates = 0;
    let crash = Arc::clone(&office.world.crash);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => return Ok((finished, duplicates, false)),
                Some(Ok((ids, Ok(dups)))) => {
                    duplicates += dups;
                    finished.push(ids);
                }
                Some(Ok((ids, Err(err)))) => {
                    tracing::error!(companies = ?ids, error = %err, "sourcing batch failed");
                    finished.push(ids);
                }
                Some(Err(err)) => tracing::error!(error = %err, "sourcing task panicked"),
            },
            () = crash.wait_tripped() => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return Ok((finished, duplicates, true));
            }
        }
    }
}

/// Starts (or, after a restart, finds) one batch's sourcing saga and waits for it to end;
/// its deal sagas end before it does. Returns the duplicate starts.
async fn source(
    engine: &Engine,
    request: &SourcingRequest,
    duplicate: bool,
) -> Result<u64, EngineError> {
    let mut duplicates = 0;
    let mut parts: Vec<&str> = vec!["sourcing", &request.search_date];
    parts.extend(request.company_ids.iter().map(String::as_str));
    let key = StartOptions::key(content_key(&parts));
    let started = engine.start_with::<Sourcing>(request, key.clone()).await?;
    if duplicate && !engine.start_with::<Sourcing>(request, key).await?.created {
        duplicates += 1;
    }
    wait_ended(engine, started.id).await?;
    Ok(duplicates)
}

/// Waits until saga `id` has ended (a long bound: the run is over long before).
async fn wait_ended(engine: &Engine, id: SagaId) -> Result<SagaStatus, EngineError> {
    Ok(engine.wait(id, Duration::from_secs(3600)).await?.status)
}

/// Every saga in the store, by id.
///
/// # Errors
/// A store error.
pub async fn all_sagas(engine: &Engine) -> Result<Vec<(SagaId, SagaStatus, String)>, EngineError> {
    let mut out = Vec::new();
    let mut query = saga_core::store::ListQuery {
        limit: 500,
        ..Default::default()
    };
    loop {
        let page = engine.store().list(&query).await?;
        out.extend(
            page.sagas
                .iter()
                .map(|s| (s.id, s.status, s.saga_type.clone())),
        );
        match page.next {
            Some(next) => query.after = Some(next),
            None => return Ok(out),
        }
    }
}
