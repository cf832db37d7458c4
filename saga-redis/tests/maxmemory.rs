//! A server with a tiny `maxmemory` (512 KB above what it uses once the store is connected)
//! and `maxmemory-policy noeviction`, filled by sagas until Redis refuses writes (`OOM`). What is promised (saga-redis/README.md, SCRIPT_SAFETY.md):
//! a refused write is a clean, transient `StoreError::Unavailable` whose message says to
//! purge or raise `maxmemory`, and it writes nothing (Redis refuses a script without flags at
//! its first write command that may grow memory, before anything was written); what the
//! store holds stays consistent (every saga has its history, every history folds to its
//! saga's state); `purge` still works while Redis is full (its first write frees memory);
//! and once memory is raised every acknowledged saga completes, each effect applied once per
//! idempotency key. An evicting policy at start-up is warned about, not refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use saga_core::store::{ClaimOutcome, ListQuery, Schedule, SignalDelivery, Transition};
use saga_core::{
    Compensation, Coordinator, Engine, EngineError, EventKind, HttpStatus, RetryPolicy, Saga,
    SagaContext, SagaError, SagaId, SagaState, SagaStatus, SagaStore, StartOptions, Step,
    StepContext, StoreError, Timestamp,
};
use saga_redis::{RedisStore, ServerIssue};
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers};
use support::{LONG, event, ids_in_partition, new_saga, owner, raw, snapshot, state, step};

const STEPS: usize = 3;
/// Each step's output is its input, so every commit adds about this much to the saga.
const PAD: usize = 4096;
const MAX_STARTS: usize = 400;

/// Calls per idempotency key, as the participant saw them.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<String, u32>>>);

struct Pad;

impl Step for Pad {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "pad";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, input: String) -> Result<String, HttpStatus> {
        let calls = ctx.resource::<Calls>().map_err(|_| HttpStatus::new(500))?;
        *calls
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(ctx.idempotency_key().to_owned())
            .or_default() += 1;
        Ok(input)
    }
}

struct Fill;

impl Saga for Fill {
    type Input = String;
    type Output = u64;
    const NAME: &'static str = "maxmemory_fill";

    async fn run(&self, saga: &mut SagaContext, mut value: String) -> Result<u64, SagaError> {
        for _ in 0..STEPS {
            value = saga.run(Pad, value).await?;
        }
        Ok(value.len() as u64)
    }
}

fn build_engine(store: &Arc<dyn SagaStore>, calls: &Calls, owner: &str) -> Engine {
    Engine::builder_shared(Arc::clone(store))
        .register(Fill)
        .resource(calls.clone())
        .owner(owner)
        .lease_ttl(Duration::from_secs(2))
        .inline_wait_max(Duration::from_millis(100))
        .store_retry(
            RetryPolicy::default()
                .with_max_attempts(3)
                .with_initial_delay(Duration::from_millis(20))
                .with_max_delay(Duration::from_millis(50)),
        )
        // A start refused for lack of memory comes back at once.
        .client_retry(RetryPolicy::no_retry())
        .build()
        .unwrap()
}

fn start_coordinator(
    engine: &Engine,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<saga_core::CoordinatorReport>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(
        Coordinator::new(engine.clone())
            .workers(4)
            .poll_interval(Duration::from_millis(50))
            .shutdown_grace(Duration::from_secs(1))
            .retention(None)
            .run(async {
                let _ = stopped.await;
            }),
    );
    (stop, coordinator)
}

async fn fill_sagas(store: &dyn SagaStore) -> BTreeMap<SagaId, SagaStatus> {
    let page = store
        .list(&ListQuery {
            saga_type: Some(Fill::NAME.into()),
            limit: 1000,
            ..ListQuery::default()
        })
        .await
        .unwrap();
    assert!(page.next.is_none(), "fewer than 1000 sagas");
    page.sagas.into_iter().map(|s| (s.id, s.status)).collect()
}

/// A refusal for lack of memory: transient, and saying what to do.
fn assert_oom(what: &str, err: &StoreError) {
    let message = err.to_string();
    assert!(
        matches!(err, StoreError::Unavailable { .. }) && err.is_transient(),
        "{what}: OOM must be a transient Unavailable, got {err:?}"
    );
    assert!(
        message.contains("OOM") && message.contains("maxmemory") && message.contains("purge"),
        "{what}: the message names OOM and the remedies: {message}"
    );
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .unwrap();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("INFO memory has no {name}: {info}"))
    };
    (field("used_memory:"), field("maxmemory:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_refuses_writes_cleanly_and_every_saga_finishes_once_memory_is_raised() {
    if !can_spawn_servers("a_full_server_refuses_writes_cleanly") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().directive("maxmemory-policy noeviction"));
    let url = server.url();
    let mut conn = raw(&url).await;
    let redis_store = support::builder(&url, "maxmemory")
        .partitions(1)
        .connect()
        .await
        .unwrap();
    assert!(
        !redis_store
            .server_findings()
            .iter()
            .any(|f| matches!(f.issue, ServerIssue::EvictionPolicy { .. })),
        "noeviction is not warned about: {:?}",
        redis_store.server_findings()
    );
    let prefix = redis_store.keys().prefix().to_owned();

    // Probes driven through the store directly: one saga held by a lease, one finished.
    let [probe, finished, fresh] = ids_in_partition(&redis_store, 0, 3)[..] else {
        unreachable!()
    };
    let claim_of = |id| {
        let redis_store = &redis_store;
        async move {
            redis_store.create(new_saga(id)).await.unwrap();
            match redis_store.claim(id, &owner("probe", LONG)).await.unwrap() {
                ClaimOutcome::Claimed(lease) => lease,
                other => panic!("claim of a new saga: {other:?}"),
            }
        }
    };
    let probe_lease = claim_of(probe).await;
    let finished_lease = claim_of(finished).await;
    redis_store
        .commit(
            &finished_lease,
            Transition {
                commit_id: "done".into(),
                events: vec![event("done")],
                state: state(1),
                status: SagaStatus::Completed,
                schedule: Schedule::Finished,
            },
        )
        .await
        .unwrap();

    // The limit goes on once the store is connected, 512 KB above what the server uses
    // then: with the store's connections open an empty Redis 7 already uses about 1.3 MB,
    // so under `maxmemory 1mb` a store cannot even record its prefix (it fails to connect
    // with the same clean OOM error).
    let (used, _) = used_memory(&mut conn).await;
    let limit = used + 512 * 1024;
    println!("maxmemory: {used} bytes used before the limit of {limit}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(limit)
        .query_async(&mut conn)
        .await
        .unwrap();
    let store: Arc<dyn SagaStore> = Arc::new(redis_store.clone());
    let calls = Calls::default();
    let engine = build_engine(&store, &calls, "coordinator-a");

    // Phase 1: start sagas (each advanced by the coordinator) until Redis is full.
    let (stop, coordinator) = start_coordinator(&engine);
    let pad = "x".repeat(PAD);
    let mut acknowledged = BTreeSet::new();
    let refusal = loop {
        assert!(
            acknowledged.len() < MAX_STARTS,
            "{MAX_STARTS} sagas of {PAD} bytes fit in 512 KB: maxmemory is not in force"
        );
        let key = format!("fill-{}", acknowledged.len());
        match engine
            .start_with::<Fill>(&pad, StartOptions::key(key))
            .await
        {
            Ok(started) => {
                acknowledged.insert(started.id);
            }
            Err(err) => break err,
        }
    };
    match &refusal {
        EngineError::Store(err) => assert_oom("a start on a full server", err),
        other => panic!("a start on a full server fails with the store's OOM, got {other:?}"),
    }
    let _ = stop.send(());
    let report = coordinator.await.unwrap();
    println!(
        "maxmemory: {} sagas acknowledged before the first OOM; coordinator: {report:?}",
        acknowledged.len()
    );
    assert!(
        !acknowledged.is_empty(),
        "some sagas fit before Redis is full"
    );

    // Keep Redis over its limit whatever the connections freed: a script that has written
    // is never stopped for memory, so a first write that cannot be refused (DEL) lets this
    // one write past maxmemory. The filler lies outside the store's prefix.
    let _: () = redis::Script::new(
        "redis.call('DEL', KEYS[1] .. 'none') \
         for i = 1, 64 do redis.call('SET', KEYS[1] .. i, string.rep('f', 8192)) end",
    )
    .key("maxmemory-filler:")
    .invoke_async(&mut conn)
    .await
    .unwrap();
    let (used, max) = used_memory(&mut conn).await;
    assert_eq!(max, limit);
    assert!(used > max, "the server is over maxmemory: {used} > {max}");

    // Phase 2: every write the store makes is refused cleanly, and writes nothing.
    let before = snapshot(&mut conn, &prefix).await;
    assert_oom(
        "create",
        &redis_store.create(new_saga(fresh)).await.unwrap_err(),
    );
    assert_oom(
        "claim",
        &redis_store
            .claim(probe, &owner("probe", LONG))
            .await
            .unwrap_err(),
    );
    assert_oom(
        "renew",
        &redis_store.renew(&probe_lease, LONG).await.unwrap_err(),
    );
    assert_oom(
        "commit",
        &redis_store
            .commit(&probe_lease, step("c1", "step", 1))
            .await
            .unwrap_err(),
    );
    assert_oom(
        "request_cancel",
        &redis_store
            .request_cancel(probe, event("cancel"))
            .await
            .unwrap_err(),
    );
    assert_oom(
        "deliver_signal",
        &redis_store
            .deliver_signal(
                probe,
                SignalDelivery {
                    name: "go".into(),
                    key: "k".into(),
                    payload: "{}".into(),
                    at: Timestamp(1),
                    event: event("signal"),
                },
            )
            .await
            .unwrap_err(),
    );
    assert_oom(
        "quarantine",
        &redis_store.quarantine(probe, "test").await.unwrap_err(),
    );
    assert_oom(
        "operator_transition",
        &redis_store
            .operator_transition(
                probe,
                &[SagaStatus::Running],
                Transition {
                    commit_id: "op".into(),
                    events: vec![event("operator")],
                    state: state(2),
                    status: SagaStatus::Running,
                    schedule: Schedule::WakeAfter(Duration::ZERO),
                },
            )
            .await
            .unwrap_err(),
    );
    assert_oom(
        "guard_claim",
        &redis_store
            .guard_claim("effect", "fp", LONG)
            .await
            .unwrap_err(),
    );
    let after = snapshot(&mut conn, &prefix).await;
    assert!(
        before == after,
        "a write refused for lack of memory changed a key under the prefix"
    );

    // Reads still work, and what is stored is whole: every saga has its history, every
    // history folds to its stored state, and the refused start stored nothing.
    let stored = fill_sagas(&*store).await;
    assert_eq!(
        stored.keys().copied().collect::<BTreeSet<_>>(),
        acknowledged,
        "exactly the acknowledged sagas are stored (the refused start wrote nothing)"
    );
    for id in stored.keys() {
        let state = engine.state(*id).await.unwrap();
        let history = engine.history(*id).await.unwrap();
        assert!(
            matches!(
                history.first().map(|e| &e.kind),
                Some(EventKind::SagaStarted { .. })
            ),
            "saga {id} has its history"
        );
        let folded = SagaState::fold(*id, &history).unwrap();
        assert_eq!(folded.status, state.status, "saga {id}: fold and state");
        assert_eq!(folded.journal, state.journal, "saga {id}: fold and journal");
    }
    let names: Vec<String> = after.keys().cloned().collect();
    for name in &names {
        if let Some((base, id)) = name.split_once(":saga:") {
            assert!(
                names.contains(&format!("{base}:events:{id}")),
                "saga key {name} without its events"
            );
        }
        if let Some((base, id)) = name.split_once(":events:") {
            assert!(
                names.contains(&format!("{base}:saga:{id}")),
                "events key {name} without its saga"
            );
        }
    }

    // The remedy the message names works on a full server: purge's first write frees memory.
    assert_eq!(redis_store.purge(Duration::ZERO, 1).await.unwrap(), 1);
    assert!(
        redis_store.load(finished).await.unwrap().is_none(),
        "the oldest finished saga is purged"
    );

    // Phase 3: raise maxmemory; every acknowledged saga runs to its end.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("64mb")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A new engine, as after a restart of the coordinator's process: an engine whose
    // coordinator was shut down stays shutting down (see the report to the lead).
    let engine = build_engine(&store, &calls, "coordinator-b");
    let (stop, coordinator) = start_coordinator(&engine);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let sagas = fill_sagas(&*store).await;
        if sagas.values().all(|s| *s == SagaStatus::Completed) {
            assert_eq!(sagas.len(), acknowledged.len());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every acknowledged saga completed 60 s after maxmemory was raised: {sagas:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    coordinator.await.unwrap();

    for id in &acknowledged {
        let history = engine.history(*id).await.unwrap();
        let state = engine.state(*id).await.unwrap();
        let folded = SagaState::fold(*id, &history).unwrap();
        assert_eq!(folded.status, SagaStatus::Completed, "saga {id}");
        assert_eq!(folded.journal, state.journal, "saga {id}: fold and journal");
        let mut succeeded = BTreeMap::new();
        for event in &history {
            if let EventKind::StepSucceeded { position, .. } = &event.kind {
                *succeeded.entry(*position).or_insert(0) += 1;
            }
        }
        assert_eq!(succeeded.len(), STEPS, "saga {id}: {succeeded:?}");
        assert!(
            succeeded.values().all(|n| *n == 1),
            "saga {id}: a position succeeded twice: {succeeded:?}"
        );
    }
    let calls = calls
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(
        calls.len(),
        STEPS * acknowledged.len(),
        "one idempotency key per step of every saga"
    );
    let reruns = calls.values().filter(|n| **n > 1).count();
    println!(
        "maxmemory: all {} acknowledged sagas completed after the raise; {reruns} step keys ran \
         more than once",
        acknowledged.len()
    );
    drop(server);
}

/// An evicting policy is warned about at start-up (with what to set), not refused: the
/// store starts, and the finding is kept for the operator. server_check.rs covers the same
/// on a durable server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_policy_is_warned_at_start_up_not_refused() {
    if !can_spawn_servers("an_evicting_policy_is_warned_at_start_up_not_refused") {
        return;
    }
    let server = RedisServer::start(
        ServerConfig::new()
            .durable()
            .directive("maxmemory 64mb")
            .directive("maxmemory-policy allkeys-lru"),
    );
    let store: RedisStore = support::store(&server.url(), "evicting").await;
    let findings: Vec<_> = store
        .server_findings()
        .iter()
        .filter(|f| {
            matches!(&f.issue, ServerIssue::EvictionPolicy { policy } if policy == "allkeys-lru")
        })
        .collect();
    assert_eq!(findings.len(), 1, "{:?}", store.server_findings());
    assert!(findings[0].to_string().contains("noeviction"));
}
