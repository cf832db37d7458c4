//! One run of the example: a sourcing saga per company, then a deal saga for each high
//! score; optionally a simulated crash after N effects followed by a restart that resumes
//! every unfinished saga from its journal.

use std::sync::Arc;
use std::time::Duration;

use saga_core::{Engine, EngineError, SagaId, SagaStatus, SagaStore, StartOptions, content_key};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::deal::{DealFlow, DealRequest};
use crate::ledger::OfficeStore;
use crate::services::{Backoffice, Company, Directory};
use crate::sourcing::{Sourcing, SourcingOutcome, SourcingRequest};
use crate::world::{Faults, World};

/// Settings of a run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Companies to source.
    pub companies: usize,
    /// Seed for the directory and the faults.
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
    let mut pending: Vec<Company> = office.directory.companies().to_vec();
    loop {
        let (finished, dups, tripped) =
            run_pipelines(&engine, &office, settings, &pending, &progress).await?;
        duplicate_starts += dups;
        if !tripped {
            break;
        }
        crashed = true;
        pending.retain(|company| !finished.contains(&company.id));
        // The "process" died: every task was aborted mid-flight, leases are still held in the
        // store. The restarted coordinator keeps its owner id, so it reclaims them at once.
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

/// Runs the pipeline of every company; returns the ids that finished, the duplicate starts,
/// and whether the crash switch tripped (in which case the rest were aborted).
async fn run_pipelines(
    engine: &Engine,
    office: &Backoffice,
    settings: &Settings,
    companies: &[Company],
    progress: &Arc<dyn Progress>,
) -> Result<(Vec<String>, u64, bool), EngineError> {
    let limit = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for (index, company) in companies.iter().enumerate() {
        let engine = engine.clone();
        let company = company.clone();
        let limit = Arc::clone(&limit);
        let progress = Arc::clone(progress);
        let date = settings.search_date.clone();
        // The first company's request is delivered twice, as a queue with at-least-once
        // delivery would: the idempotency key makes the second start a no-op.
        let duplicate = index == 0;
        tasks.spawn(async move {
            let _permit = limit.acquire().await;
            let result = pipeline(&engine, &company, &date, duplicate).await;
            progress.company_done();
            (company.id, result)
        });
    }
    let mut finished = Vec::new();
    let mut duplicates = 0;
    let crash = Arc::clone(&office.world.crash);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => return Ok((finished, duplicates, false)),
                Some(Ok((id, Ok(dups)))) => {
                    duplicates += dups;
                    finished.push(id);
                }
                Some(Ok((id, Err(err)))) => {
                    tracing::error!(company = %id, error = %err, "pipeline failed");
                    finished.push(id);
                }
                Some(Err(err)) => tracing::error!(error = %err, "pipeline task panicked"),
            },
            () = crash.wait_tripped() => {
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return Ok((finished, duplicates, true));
            }
        }
    }
}

/// Sources one company and, on a high score, books the deal. Every start is idempotent, so
/// after a restart the same calls find the existing sagas and resume them.
async fn pipeline(
    engine: &Engine,
    company: &Company,
    date: &str,
    duplicate: bool,
) -> Result<u64, EngineError> {
    let mut duplicates = 0;
    let request = SourcingRequest {
        company_id: company.id.clone(),
        sectors: vec!["fintech".into(), "ai".into(), "climate".into()],
        search_date: date.to_owned(),
    };
    let key = StartOptions::key(content_key(&["sourcing", &company.id, date]));
    let started = engine.start_with::<Sourcing>(&request, key.clone()).await?;
    if duplicate && !engine.start_with::<Sourcing>(&request, key).await?.created {
        duplicates += 1;
    }
    let sourced = engine.run_to_end(started.id).await?;
    let Some(outcome) = sourced.output::<SourcingOutcome>()? else {
        return Ok(duplicates);
    };
    if !outcome.high {
        return Ok(duplicates);
    }
    let deal = DealRequest {
        company_id: company.id.clone(),
        company_name: company.name.clone(),
        amount_musd: (f64::from(outcome.score) / 10.0).round(),
        score: outcome.score,
        watchlisted: company.watchlisted,
    };
    let key = StartOptions::key(content_key(&["deal", &company.id, date]));
    let started = engine.start_with::<DealFlow>(&deal, key.clone()).await?;
    if duplicate && !engine.start_with::<DealFlow>(&deal, key).await?.created {
        duplicates += 1;
    }
    engine.run_to_end(started.id).await?;
    Ok(duplicates)
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
