//! Issue 11 item 1: a SIGKILL at a random point of each of more than 1 000 sagas, with real
//! processes. 1 100 deal sagas are submitted to a real redis-server (AOF, `appendfsync
//! always`); then one `deal-flow-coordinator --kill-plan <seed>` at a time runs them and
//! SIGKILLs itself at each saga's seeded kill point (see `saga_examples::kill_plan`); every
//! time it dies it is started again, until every saga is terminal. Then: the kills caught at
//! least 1 000 distinct sagas in flight, every kill point was hit, every acknowledged saga is
//! terminal with one terminal event, every history folds to its stored state, and the ledger
//! shows each effect applied once and each compensation once, in reverse order.
//!
//! Reproduce a run's plan with `SAGA_KILL_PLAN_SEED=<seed>` (the seed is printed); keep the
//! coordinators' logs with `SAGA_KILL_PLAN_KEEP_LOGS=1` (the directory is printed). About 45 s
//! in a debug build on 2 cores.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_core::{Engine, EventKind, SagaId, SagaState, SagaStatus, StartOptions, content_key};
use saga_examples::deal::DealFlow;
use saga_examples::kill_plan::{KillPoint, commits_key, kill_point, killed_key, parked_key};
use saga_examples::ledger::OfficeStore as _;
use saga_examples::load::deal_request;
use saga_examples::ops::{StoreArgs, engine_builder};
use saga_examples::report;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers, unique_prefix};
use support::{POLL, Proc};

/// Sagas submitted.
const SAGAS: usize = 1100;
/// Distinct sagas that must have been in flight at a kill.
const MIN_KILLED: usize = 1000;
/// Sagas a coordinator runs at once (half of them parked at their points trigger a kill).
const WORKERS: &str = "64";
/// Lease: a killed process's sagas are due again when it lapses (claims skip unexpired
/// leases, even the same owner's).
const LEASE: &str = "1s";
/// At most this many coordinator processes.
const MAX_STARTS: usize = 150;
/// The whole run, from the first start to every saga terminal.
const RUN_BOUND: Duration = Duration::from_secs(150);
/// From the last start to every saga terminal: the kills are over, every lease of the last
/// killed process lapses and its sagas end.
const LAST_BOUND: Duration = Duration::from_secs(30);
/// The default seed of the kill plan.
const SEED: u64 = 20_261_202;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn store_args(url: &str, prefix: &str) -> StoreArgs {
    StoreArgs {
        redis_url: Some(url.to_owned()),
        cluster_urls: Vec::new(),
        redis_url_file: None,
        key_prefix: prefix.to_owned(),
        partitions: 16,
        tls: Default::default(),
        allow_unsafe_redis_config: Vec::new(),
    }
}

/// Starts every saga through a client-only engine (no workers); returns the acknowledged ids.
fn submit(rt: &tokio::runtime::Runtime, engine: &Engine) -> Vec<SagaId> {
    rt.block_on(async {
        let limit = Arc::new(tokio::sync::Semaphore::new(32));
        let mut starts = tokio::task::JoinSet::new();
        for index in 0..SAGAS {
            let engine = engine.clone();
            let limit = Arc::clone(&limit);
            starts.spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let request = deal_request(11, index, 0.1);
                let key = content_key(&["kill-every-saga", &index.to_string()]);
                engine
                    .start_with::<DealFlow>(&request, StartOptions::key(key))
                    .await
                    .unwrap_or_else(|err| panic!("start {index} failed: {err}"))
                    .id
            });
        }
        let mut ids = Vec::with_capacity(SAGAS);
        while let Some(id) = starts.join_next().await {
            ids.push(id.unwrap());
        }
        ids
    })
}

/// Sagas not terminal yet.
fn active(rt: &tokio::runtime::Runtime, engine: &Engine) -> u64 {
    rt.block_on(async {
        let counts = engine.store().count_by_status().await.unwrap();
        [SagaStatus::Running, SagaStatus::Compensating]
            .iter()
            .map(|s| counts.get(s).copied().unwrap_or(0))
            .sum()
    })
}

fn coordinator(dir: &tempfile::TempDir, url: &str, prefix: &str, seed: u64, n: usize) -> Proc {
    let args = [
        "--redis-url",
        url,
        "--key-prefix",
        prefix,
        "--partitions",
        "16",
        "--owner",
        "kill-plan-coordinator",
        "--log-format",
        "json",
        "--http-addr",
        "off",
        "--poll-interval",
        "50ms",
        "--lease",
        LEASE,
        "--workers",
        WORKERS,
        "--inline-wait-max",
        "300ms",
        "--fault-rate",
        "0.05",
        "--kill-plan",
        &seed.to_string(),
    ]
    .map(str::to_owned);
    Proc::spawn(
        dir,
        &format!("coordinator-{n}"),
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &args,
    )
}

fn redis_conn(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

#[test]
fn every_saga_survives_a_sigkill_at_its_own_point() {
    if !can_spawn_servers("every_saga_survives_a_sigkill_at_its_own_point") {
        return;
    }
    let seed = std::env::var("SAGA_KILL_PLAN_SEED")
        .ok()
        .map_or(SEED, |s| s.parse().expect("SAGA_KILL_PLAN_SEED is a u64"));
    println!("kill plan seed {seed} (SAGA_KILL_PLAN_SEED={seed} reproduces the plan)");
    let server = RedisServer::start(ServerConfig::new().durable());
    let url = server.url();
    let prefix = unique_prefix("kill_every_saga");
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let began = Instant::now();
    let (engine, office) = rt.block_on(async {
        let (store, office) = store_args(&url, &prefix).connect().await.unwrap();
        (
            engine_builder(store, "kill-every-saga-client")
                .build()
                .unwrap(),
            office,
        )
    });
    let ids = submit(&rt, &engine);
    assert_eq!(ids.len(), SAGAS, "every start was acknowledged");
    let submitted = began.elapsed();

    // One coordinator at a time; each SIGKILL of its own is followed by a new start.
    let run_began = Instant::now();
    let mut starts = 0;
    let mut proc = coordinator(&dir, &url, &prefix, seed, starts);
    starts += 1;
    let mut last_start = Instant::now();
    loop {
        if active(&rt, &engine) == 0 {
            break;
        }
        if let Some(status) = proc.exited() {
            assert_eq!(
                status.signal(),
                Some(9),
                "{} ended by {status}, not by its kill plan's SIGKILL:\n{}",
                proc.name(),
                proc.stderr()
            );
            assert!(
                starts < MAX_STARTS,
                "more than {MAX_STARTS} coordinator starts and sagas still active"
            );
            proc = coordinator(&dir, &url, &prefix, seed, starts);
            starts += 1;
            last_start = Instant::now();
            continue;
        }
        assert!(
            run_began.elapsed() < RUN_BOUND,
            "sagas still active {RUN_BOUND:?} after the first start ({starts} starts)"
        );
        assert!(
            last_start.elapsed() < LAST_BOUND,
            "sagas still active {LAST_BOUND:?} after the last start, which was not killed:\n{}",
            proc.stderr()
        );
        std::thread::sleep(POLL);
    }
    let last_to_terminal = last_start.elapsed();
    let run = run_began.elapsed();
    let status = proc.terminate();
    assert!(
        status.success(),
        "the last coordinator did not stop cleanly ({status}):\n{}",
        proc.stderr()
    );
    let kills = starts - 1;

    // What the kills caught.
    let mut conn = redis_conn(&url);
    let killed: BTreeSet<String> = redis::cmd("SMEMBERS")
        .arg(killed_key(&prefix))
        .query(&mut conn)
        .unwrap();
    let parked: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(parked_key(&prefix))
        .query(&mut conn)
        .unwrap();
    let submitted_ids: BTreeSet<String> = ids.iter().map(ToString::to_string).collect();
    assert!(
        killed.is_subset(&submitted_ids),
        "the killed set names sagas that were not submitted"
    );
    let mut by_point: BTreeMap<String, usize> = BTreeMap::new();
    for (id, point) in &parked {
        assert!(
            killed.contains(id),
            "parked saga {id} is not in the killed set"
        );
        let saga: SagaId = id.parse().unwrap();
        assert_eq!(
            *point,
            kill_point(seed, saga).label(),
            "saga {id} was parked at a point not its own"
        );
        *by_point.entry(point.clone()).or_default() += 1;
    }
    println!(
        "{SAGAS} sagas submitted in {:.1}s; {kills} SIGKILLs over {starts} coordinator starts in {:.1}s; {} distinct sagas in flight at a kill, {} of them parked at their own point {by_point:?}; last start to all terminal {:.1}s (bound {LAST_BOUND:?})",
        submitted.as_secs_f64(),
        run.as_secs_f64(),
        killed.len(),
        parked.len(),
        last_to_terminal.as_secs_f64(),
    );
    assert!(
        killed.len() >= MIN_KILLED,
        "only {} distinct sagas were in flight at a SIGKILL (want {MIN_KILLED})",
        killed.len()
    );
    // Those caught only in flight at other sagas' kills (none parked at its own point).
    let only_in_flight: Vec<(String, String, Option<u32>)> = killed
        .iter()
        .filter(|id| !parked.contains_key(*id))
        .map(|id| {
            let commits: Option<u32> = redis::cmd("HGET")
                .arg(commits_key(&prefix))
                .arg(id)
                .query(&mut conn)
                .unwrap();
            (
                id.clone(),
                kill_point(seed, id.parse().unwrap()).label(),
                commits,
            )
        })
        .collect();
    println!("killed only in flight (id, own point, life commits): {only_in_flight:?}");
    if std::env::var_os("SAGA_KILL_PLAN_KEEP_LOGS").is_some() {
        println!("coordinator logs kept in {}", dir.keep().display());
    }
    assert!(
        parked.len() >= MIN_KILLED,
        "only {} sagas were killed at their own point (want {MIN_KILLED})",
        parked.len()
    );
    for point in KillPoint::all() {
        assert!(
            by_point.get(&point.label()).copied().unwrap_or(0) >= 1,
            "no saga was killed at {}: {by_point:?}",
            point.label()
        );
    }

    // Every acknowledged saga ended, once, and its history folds to its stored state.
    let (sagas, books) = rt.block_on(async {
        let sagas = report::collect(&engine).await.unwrap();
        (sagas, office.snapshot().await.unwrap())
    });
    assert_eq!(
        sagas.len(),
        SAGAS,
        "the store holds exactly the submitted sagas"
    );
    let mut resumed = 0;
    let mut resume_gaps: Vec<Duration> = Vec::new();
    for saga in &sagas {
        let id = saga.state.id;
        assert!(
            saga.state.status.is_terminal(),
            "saga {id} is {}",
            saga.state.status
        );
        let terminal = saga
            .events
            .iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    EventKind::SagaCompleted { .. }
                        | EventKind::SagaCompensated
                        | EventKind::SagaFailed { .. }
                )
            })
            .count();
        assert_eq!(terminal, 1, "saga {id} has {terminal} terminal events");
        let folded = SagaState::fold(id, &saga.events).unwrap();
        assert_eq!(
            folded, saga.state,
            "saga {id}: its history does not fold to its state"
        );
        // How long each resume waited after the saga's previous write.
        for run in saga.events.windows(3) {
            if matches!(run[1].kind, EventKind::LeaseAcquired { .. })
                && matches!(run[2].kind, EventKind::SagaResumed { .. })
            {
                resume_gaps.push(run[1].at.since(run[0].at));
            }
        }
        let was_resumed = saga
            .events
            .iter()
            .any(|e| matches!(e.kind, EventKind::SagaResumed { .. }));
        resumed += usize::from(was_resumed);
        let key = id.to_string();
        if !killed.contains(&key) {
            continue;
        }
        // A killed run had claimed it, so the run that ended it held a later fence.
        let last_fence = saga
            .events
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::LeaseAcquired { fence, .. } => Some(fence),
                _ => None,
            })
            .next_back();
        assert!(
            last_fence.is_some_and(|f| f >= 2),
            "killed saga {id} was not claimed again after its kill: {last_fence:?}"
        );
        // Only a saga killed before its first commit has no journal to resume from.
        let never_committed = parked
            .get(&key)
            .is_some_and(|p| *p == KillPoint::Before(1).label());
        assert!(
            was_resumed || never_committed,
            "killed saga {id} was never resumed from its journal"
        );
    }
    resume_gaps.sort();
    // Not asserted: shows whether the restarted coordinator (same owner) took its own sagas
    // back at once or only once their leases lapsed.
    println!(
        "resume after the previous write: min {:?}, median {:?} (lease {LEASE})",
        resume_gaps.first(),
        resume_gaps.get(resume_gaps.len() / 2)
    );
    let check = report::check_ledger(&sagas, &books);
    println!(
        "{resumed} sagas resumed from their journals; ledger: {} effects, {} compensations",
        check.effects, check.compensations
    );
    assert!(check.holds(), "ledger check failed: {:#?}", check.problems);
}
