//! The nemesis harness: real coordinator processes on real redis-servers, a seeded fault
//! schedule (kills, pauses past the lease, Redis restarts, `CLIENT PAUSE`, `maxmemory`,
//! `SCRIPT FLUSH`, proxy faults on one coordinator's link), a steady client load, then the
//! invariants checked from the participants' side. [`run`] does it all; the `saga-chaos`
//! binary is its command line.
//!
//! A run: start Redis (durable) and N coordinators (`saga-chaos coordinator`, short
//! lease); submit deal sagas for the fault phase while the schedule runs; heal everything;
//! wait (bounded) until every saga ended; check; stop every process by pid.

pub mod faults;
pub mod invariants;
pub mod load;
pub mod processes;
pub mod report;
pub mod rig;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use saga_core::{Classify as _, ClientRetry, EngineError, RetryPolicy, SagaStatus};
use saga_examples::ledger::OfficeStore as _;
use saga_examples::ops::{StoreArgs, engine_builder};

use self::faults::Nemesis;
use self::invariants::FenceLines;
use self::processes::{Backend, CoordinatorProc, CoordinatorSpec, Fsync};
use self::report::{Counts, Report};
use self::rig::{READY_BOUND, Rig};
use self::schedule::{FaultKind, Plan, Planned};
use crate::FaultProxy;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Length of the fault phase (and of the load).
    pub seconds: u64,
    /// The seed of the schedule and the deals.
    pub seed: u64,
    /// Coordinator processes.
    pub coordinators: usize,
    /// A local 3-master Redis Cluster instead of one server.
    pub cluster: bool,
    /// The fault kinds to draw from (empty: every kind that applies).
    pub faults: Vec<FaultKind>,
    /// Sagas started per second.
    pub rate: f64,
    /// The coordinators' lease.
    pub lease: Duration,
    /// How long to wait, after healing, for every saga to end.
    pub quiesce: Duration,
    /// Every n-th start is delivered twice.
    pub duplicate_every: usize,
    /// Share of watchlisted deals (they compensate).
    pub watchlist_rate: f64,
    /// The simulated services' latency in ms, `5` or `5..40` (slower sagas keep more
    /// leases held at any moment, so faults catch more of them mid-step).
    pub service_latency_ms: String,
    /// How Redis persists writes.
    pub fsync: Fsync,
    /// Keep the run's directory (coordinator and Redis logs).
    pub keep_dir: bool,
    /// This binary (re-executed as `saga-chaos coordinator`).
    pub exe: PathBuf,
}

impl Options {
    /// The kinds this run draws from.
    ///
    /// # Errors
    /// A selected kind does not apply to the mode, or none was left.
    pub fn kinds(&self) -> Result<Vec<FaultKind>, NemesisError> {
        if self.faults.is_empty() {
            return Ok(schedule::ALL_KINDS
                .into_iter()
                .filter(|k| k.applies(self.cluster))
                .collect());
        }
        if let Some(kind) = self.faults.iter().find(|k| !k.applies(self.cluster)) {
            return Err(NemesisError::CannotRun(format!(
                "the fault `{kind}` does not apply to this mode (a cluster has no proxy in front of its nodes and no single-node restart; a standalone server has no failover); leave it out of --faults"
            )));
        }
        Ok(self.faults.clone())
    }

    /// The schedule of this run.
    ///
    /// # Errors
    /// As [`Options::kinds`].
    pub fn schedule(&self) -> Result<Vec<Planned>, NemesisError> {
        let kinds = self.kinds()?;
        Ok(schedule::generate(&Plan {
            seed: self.seed,
            phase: Duration::from_secs(self.seconds),
            kinds: &kinds,
            coordinators: self.coordinators,
            redis_nodes: if self.cluster { 3 } else { 1 },
            lease: self.lease,
        }))
    }

    /// The command line that runs this schedule again.
    #[must_use]
    pub fn command_line(&self) -> String {
        let mut line = format!(
            "saga-chaos --seed {} --seconds {} --coordinators {} --rate {} --lease {} --service-latency-ms {} --duplicate-every {} --watchlist-rate {} --quiesce {}",
            self.seed,
            self.seconds,
            self.coordinators,
            self.rate,
            humantime::format_duration(self.lease),
            self.service_latency_ms,
            self.duplicate_every,
            self.watchlist_rate,
            humantime::format_duration(self.quiesce),
        );
        if self.cluster {
            line.push_str(" --cluster");
        }
        match self.fsync {
            Fsync::Always => {}
            Fsync::Everysec => line.push_str(" --redis-fsync everysec"),
            Fsync::Off => line.push_str(" --redis-fsync off"),
        }
        if !self.faults.is_empty() {
            let names: Vec<&str> = self.faults.iter().map(|k| k.name()).collect();
            line.push_str(&format!(" --faults {}", names.join(",")));
        }
        line
    }
}

/// Why a run could not be made (exit status 2), as opposed to a violation.
#[derive(Debug, thiserror::Error)]
pub enum NemesisError {
    /// Something the run needs is missing or did not start.
    #[error("cannot run the nemesis: {0}")]
    CannotRun(String),
}

fn cannot(what: impl std::fmt::Display) -> NemesisError {
    NemesisError::CannotRun(what.to_string())
}

/// Runs the whole nemesis; `progress` receives a line at each stage (for stderr).
///
/// # Errors
/// [`NemesisError::CannotRun`]: Redis or a coordinator did not start, the store could not
/// be read for the checks.
pub fn run(options: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report, NemesisError> {
    let planned = options.schedule()?;
    let dir = tempfile::Builder::new()
        .prefix("saga-chaos-")
        .tempdir()
        .map_err(|e| cannot(format!("cannot create a temporary directory: {e}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| cannot(format!("cannot start the async runtime: {e}")))?;
    progress(&format!(
        "starting {} and {} coordinators (logs in {})",
        if options.cluster {
            "a 3-master Redis Cluster"
        } else {
            "a durable redis-server"
        },
        options.coordinators,
        dir.path().display()
    ));
    let backend = Backend::start(options.cluster, options.fsync).map_err(cannot)?;
    let prefix = format!("chaos-{:x}-{}", options.seed, std::process::id());
    let proxies = match backend.standalone_addr() {
        Some(addr) => (0..options.coordinators)
            .map(|_| runtime.block_on(FaultProxy::start(addr)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(cannot)?,
        None => Vec::new(),
    };
    let urls = backend.urls();
    let store_args = StoreArgs {
        redis_url: if options.cluster {
            None
        } else {
            urls.first().cloned()
        },
        redis_url_file: None,
        cluster_urls: if options.cluster { urls } else { Vec::new() },
        key_prefix: prefix.clone(),
        partitions: saga_redis::DEFAULT_PARTITIONS,
        tls: saga_examples::ops::RedisTlsArgs::default(),
        allow_unsafe_redis_config: Vec::new(),
    };
    let (store, office) = runtime
        .block_on(store_args.connect())
        .map_err(|e| cannot(format!("cannot connect to Redis: {e}")))?;
    let client_retry = RetryPolicy::client_default().with_max_elapsed(Duration::from_secs(30));
    let engine = engine_builder(store.clone(), "saga-chaos-client")
        .client_retry(client_retry.clone())
        .build()
        .map_err(cannot)?;
    let spec = CoordinatorSpec {
        exe: options.exe.clone(),
        dir: dir.path().to_path_buf(),
        prefix,
        lease: options.lease,
        service_latency_ms: options.service_latency_ms.clone(),
    };
    let mut rig = Rig {
        backend,
        proxies,
        spec,
        coordinators: Vec::new(),
        retired: Vec::new(),
        down: vec![false; options.coordinators],
        paused: vec![false; options.coordinators],
        restarts: 0,
        unexpected_exits: Vec::new(),
        store,
        runtime: runtime.handle().clone(),
        began: Instant::now(),
    };
    for n in 0..options.coordinators {
        let flags = rig.store_flags(n);
        let coordinator = CoordinatorProc::spawn(&rig.spec, n, 0, &flags).map_err(cannot)?;
        rig.coordinators.push(coordinator);
    }
    for coordinator in &mut rig.coordinators {
        coordinator.wait_ready(READY_BOUND).map_err(cannot)?;
    }
    progress(&format!(
        "fault phase: {} s, {} sagas/s, {} faults",
        options.seconds,
        options.rate,
        planned.len()
    ));
    rig.began = Instant::now();
    let load = runtime.spawn(load::run(
        engine.clone(),
        load::LoadConfig {
            seed: options.seed,
            rate: options.rate,
            duration: Duration::from_secs(options.seconds),
            duplicate_every: options.duplicate_every,
            watchlist_rate: options.watchlist_rate,
        },
    ));
    let mut nemesis = Nemesis::new(planned.len());
    run_schedule(&mut rig, &mut nemesis, &planned, progress);
    let load = runtime
        .block_on(load)
        .map_err(|e| cannot(format!("the load task failed: {e}")))?;
    progress(&format!(
        "load done: {} acknowledged of {} submitted; healing everything",
        load.acknowledged.len(),
        load.submitted
    ));
    let healed = rig.heal_all();
    let quiet = runtime.block_on(invariants::wait_quiet(
        &engine,
        &load.acknowledged,
        options.quiesce,
    ));
    progress(&format!(
        "quiet after {:.1} s ({} unfinished); checking",
        quiet.waited.as_secs_f64(),
        quiet.unfinished.len()
    ));
    let retry = ClientRetry::new(client_retry);
    let sagas = runtime
        .block_on(retry.run("read the sagas", EngineError::is_transient, || {
            saga_examples::report::collect(&engine)
        }))
        .map_err(|e| cannot(format!("cannot read the sagas for the checks: {e}")))?;
    let books = runtime
        .block_on(retry.run(
            "read the books",
            |err: &saga_examples::services::ServiceError| err.classify().is_transient(),
            || office.snapshot(),
        ))
        .map_err(|e| cannot(format!("cannot read the ledger for the checks: {e}")))?;
    let check = saga_examples::report::check_ledger(&sagas, &books);
    let totals = saga_examples::report::totals(&sagas, load.duplicate_starts, &books);
    rig.stop_all(Duration::from_secs(15));
    let fence_lines = rig
        .all_incarnations()
        .map(|c| FenceLines::count(&c.stderr()))
        .fold(FenceLines::default(), FenceLines::plus);
    let mut verdicts = vec![
        invariants::Verdict {
            name: "healed",
            pass: healed.is_ok(),
            details: vec![healed.err().unwrap_or_else(|| {
                "every coordinator up and every fault healed before the wait".into()
            })],
        },
        invariants::acknowledged_terminal(&sagas, &load.acknowledged),
        invariants::started_equals_terminal(&sagas),
        invariants::ledger(&check),
        invariants::histories_fold(&sagas),
        invariants::no_write_across_leases(&sagas),
        invariants::pauses_fenced(&nemesis.pauses, options.lease, |owner| {
            rig.all_incarnations()
                .find(|c| c.owner == owner)
                .map(|c| c.stderr())
                .unwrap_or_default()
        }),
        invariants::faults_fired(planned.len(), &nemesis.observations),
        invariants::idempotent_starts(&load.duplicate_mismatches, load.duplicate_starts),
    ];
    if !quiet.unfinished.is_empty() {
        verdicts.push(invariants::Verdict {
            name: "quiescence",
            pass: false,
            details: quiet.unfinished.iter().take(20).cloned().collect(),
        });
    }
    let mut fired_by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for obs in nemesis.observations.iter().filter(|o| o.fired) {
        *fired_by_kind.entry(obs.kind.name().to_owned()).or_default() += 1;
    }
    let count = |status| totals.by_status.get(&status).copied().unwrap_or_default();
    let counts = Counts {
        submitted: load.submitted,
        acknowledged: load.acknowledged.len(),
        start_errors: load.start_errors,
        duplicate_starts: load.duplicate_starts,
        store_sagas: totals.sagas,
        completed: count(SagaStatus::Completed),
        compensated: count(SagaStatus::Compensated),
        failed: count(SagaStatus::Failed),
        effects: check.effects,
        compensations: check.compensations,
        retries: totals.retries,
        resumes: totals.resumes,
        fenced_writes: fence_lines.write_fenced
            + fence_lines.renewal_rejected
            + fence_lines.refused,
        dropped_at_lapse: fence_lines.lapsed,
        coordinator_restarts: rig.restarts,
        unexpected_exits: rig.unexpected_exits.len(),
    };
    let pass = verdicts.iter().all(|v| v.pass);
    let log_dir = if options.keep_dir {
        for n in 0..rig.backend.nodes() {
            let _ = std::fs::write(
                dir.path().join(format!("redis-{n}.log")),
                rig.backend.log(n),
            );
        }
        Some(dir.keep().display().to_string())
    } else {
        None
    };
    let report = Report {
        seed: options.seed,
        reproduce: options.command_line(),
        mode: if options.cluster {
            "cluster"
        } else {
            "standalone"
        },
        seconds: options.seconds,
        coordinators: options.coordinators,
        schedule: planned,
        faults: nemesis.observations,
        fired_by_kind,
        counts,
        fence_lines,
        unexpected_exits: rig.unexpected_exits.clone(),
        quiet_ms: u64::try_from(quiet.waited.as_millis()).unwrap_or(u64::MAX),
        load,
        invariants: verdicts,
        pass,
        log_dir,
    };
    // Coordinators first (by their handles), then the proxies and Redis.
    drop(rig);
    Ok(report)
}

/// Injects and heals each planned fault at its time (wall clock from the start of the
/// phase), restarting any coordinator that exits on its own in between.
fn run_schedule(
    rig: &mut Rig,
    nemesis: &mut Nemesis,
    planned: &[Planned],
    progress: &mut dyn FnMut(&str),
) {
    // Heals sort before injections at the same instant.
    let mut actions: Vec<(Duration, bool, usize)> = planned
        .iter()
        .flat_map(|p| [(p.at, true, p.index), (p.at + p.hold, false, p.index)])
        .collect();
    actions.sort_by_key(|&(at, inject, index)| (at, inject, index));
    for (at, inject, index) in actions {
        let due = rig.began + at;
        loop {
            rig.supervise();
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
        let fault = &planned[index];
        if inject {
            progress(&format!(
                "{:>7.2}s inject {fault}",
                rig.began.elapsed().as_secs_f64()
            ));
            nemesis.inject(rig, fault);
        } else {
            nemesis.heal(rig, fault);
        }
    }
}
