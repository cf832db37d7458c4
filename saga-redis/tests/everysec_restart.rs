//! A redis-server crash with `appendfsync everysec` (what a deployment that chose it risks):
//! the writes of about the last second may be lost, so sagas started or advanced just before
//! the kill can be missing or behind what their coordinator saw. The promise is convergence
//! without duplicates: after the restart every saga the store still holds runs to its end
//! (a coordinator whose claim or commits were lost is fenced or finds its lease gone, and the
//! saga resumes from what survived, re-running lost steps with the same keys), every history
//! folds to its stored state, and no position succeeds twice. How many acknowledged writes
//! were lost is printed, not asserted: it depends on where the fsync second fell.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use saga_core::store::ListQuery;
use saga_core::{
    Compensation, Coordinator, Engine, EventKind, HttpStatus, RetryPolicy, Saga, SagaContext,
    SagaError, SagaId, SagaState, SagaStatus, SagaStore, StartOptions, Step, StepContext,
};
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers};

const STEPS: u32 = 5;
const SAGAS: usize = 40;

/// Calls per idempotency key, as the participant saw them.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<String, u32>>>);

struct Work;

impl Step for Work {
    type Input = u64;
    type Output = u64;
    type Error = HttpStatus;
    const NAME: &'static str = "work";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, input: u64) -> Result<u64, HttpStatus> {
        let calls = ctx.resource::<Calls>().map_err(|_| HttpStatus::new(500))?;
        *calls
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(ctx.idempotency_key().to_owned())
            .or_default() += 1;
        // Keeps writes flowing while the server is killed.
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(input + 1)
    }
}

struct Chain;

impl Saga for Chain {
    type Input = u64;
    type Output = u64;
    const NAME: &'static str = "everysec_chain";

    async fn run(&self, saga: &mut SagaContext, mut value: u64) -> Result<u64, SagaError> {
        for _ in 0..STEPS {
            value = saga.run(Work, value).await?;
        }
        Ok(value)
    }
}

async fn stored_sagas(store: &dyn SagaStore) -> BTreeMap<SagaId, SagaStatus> {
    let query = ListQuery {
        saga_type: Some(Chain::NAME.into()),
        limit: 1000,
        ..ListQuery::default()
    };
    let page = store
        .list(&query)
        .await
        .unwrap_or_else(|err| panic!("list: {err}"));
    page.sagas.into_iter().map(|s| (s.id, s.status)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout)]
async fn an_everysec_server_crash_converges_without_duplicates() {
    if !can_spawn_servers("an_everysec_server_crash_converges_without_duplicates") {
        return;
    }
    let mut server = RedisServer::start(ServerConfig::new().fsync_every_second());
    let store: Arc<dyn SagaStore> = Arc::new(support::store(&server.url(), "everysec").await);
    let calls = Calls::default();
    let engine = Engine::builder_shared(Arc::clone(&store))
        .register(Chain)
        .resource(calls.clone())
        .owner("coordinator-a")
        // Short leases: a lease whose claim was lost with the crash lapses soon.
        .lease_ttl(Duration::from_secs(2))
        .inline_wait_max(Duration::from_millis(100))
        .store_retry(
            RetryPolicy::default()
                .with_max_attempts(60)
                .with_initial_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_millis(500)),
        )
        .build()
        .unwrap_or_else(|err| panic!("{err}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(
        Coordinator::new(engine.clone())
            .workers(8)
            .poll_interval(Duration::from_millis(50))
            .run(async {
                let _ = stopped.await;
            }),
    );
    let mut acknowledged = Vec::new();
    for n in 0..SAGAS {
        let started = engine
            .start_with::<Chain>(
                &(n as u64 * 100),
                StartOptions::key(format!("everysec-{n}")),
            )
            .await
            .unwrap_or_else(|err| panic!("start: {err}"));
        acknowledged.push(started.id);
    }
    // Kill the server while the sagas are mid-way (bounded wait on progress).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let running = calls.0.lock().unwrap_or_else(PoisonError::into_inner).len();
        if running >= SAGAS * 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap_or_else(|err| panic!("restart: {err}"));

    // Converge: every saga the store holds reaches its end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let survivors = loop {
        let sagas = stored_sagas(&*store).await;
        if sagas.values().all(|status| status.is_terminal()) {
            break sagas;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sagas still running 90 s after the restart: {sagas:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = stop.send(());
    coordinator
        .await
        .unwrap_or_else(|err| panic!("coordinator: {err}"));

    let mut lost = 0;
    for id in &acknowledged {
        let Some(status) = survivors.get(id) else {
            lost += 1;
            continue;
        };
        assert_eq!(*status, SagaStatus::Completed, "saga {id}");
        let state = engine
            .state(*id)
            .await
            .unwrap_or_else(|err| panic!("state: {err}"));
        let history = engine
            .history(*id)
            .await
            .unwrap_or_else(|err| panic!("history: {err}"));
        let folded = SagaState::fold(*id, &history).unwrap_or_else(|err| panic!("fold: {err}"));
        assert_eq!(
            folded.status, state.status,
            "saga {id}: fold and stored state disagree"
        );
        assert_eq!(
            folded.journal, state.journal,
            "saga {id}: fold and stored journal disagree"
        );
        let mut succeeded = BTreeMap::new();
        for event in &history {
            if let EventKind::StepSucceeded { position, .. } = &event.kind {
                *succeeded.entry(*position).or_insert(0) += 1;
            }
        }
        assert_eq!(succeeded.len(), STEPS as usize, "saga {id}: {succeeded:?}");
        assert!(
            succeeded.values().all(|n| *n == 1),
            "saga {id}: a position succeeded twice: {succeeded:?}"
        );
    }
    let reruns = calls
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .filter(|n| **n > 1)
        .count();
    println!(
        "everysec crash: {} of {SAGAS} acknowledged sagas survived ({lost} lost with the last \
         unsynced second), {reruns} step keys ran again after the restart",
        survivors.len()
    );
    drop(server);
}

/// Lets the gated step through once the test opens it.
#[derive(Clone)]
struct Gate(tokio::sync::watch::Receiver<bool>);

/// A step that counts its calls, then waits at the gate.
struct Gated;

impl Step for Gated {
    type Input = u64;
    type Output = u64;
    type Error = HttpStatus;
    const NAME: &'static str = "gated";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, input: u64) -> Result<u64, HttpStatus> {
        let calls = ctx.resource::<Calls>().map_err(|_| HttpStatus::new(500))?;
        *calls
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(ctx.idempotency_key().to_owned())
            .or_default() += 1;
        let mut gate = ctx
            .resource::<Gate>()
            .map_err(|_| HttpStatus::new(500))?
            .0
            .clone();
        gate.wait_for(|open| *open)
            .await
            .map_err(|_| HttpStatus::new(503))?;
        Ok(input + 1)
    }
}

/// Work, a gated step, work.
struct GatedChain;

impl Saga for GatedChain {
    type Input = u64;
    type Output = u64;
    const NAME: &'static str = "everysec_gated_chain";

    async fn run(&self, saga: &mut SagaContext, value: u64) -> Result<u64, SagaError> {
        let value = saga.run(Work, value).await?;
        let value = saga.run(Gated, value).await?;
        saga.run(Work, value).await
    }
}

const GATED_SAGAS: usize = 10;
const LOST_STARTS: usize = 3;

/// Copies the files of directory `from` into `to` (the AOF directory is flat).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|err| panic!("mkdir {}: {err}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|err| panic!("{}: {err}", from.display())) {
        let path = entry.unwrap_or_else(|err| panic!("{err}")).path();
        let target = to.join(path.file_name().unwrap_or_default());
        std::fs::copy(&path, &target)
            .unwrap_or_else(|err| panic!("copy {}: {err}", path.display()));
    }
}

async fn redis_cmd(url: &str, args: &[&str]) {
    let mut conn = support::raw(url).await;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    let _: redis::Value = cmd
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|err| panic!("{args:?}: {err}"));
}

/// Waits (bounded) until `done` holds for the calls seen so far.
async fn wait_calls(calls: &Calls, what: &str, done: impl Fn(&HashMap<String, u32>) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if done(&calls.0.lock().unwrap_or_else(PoisonError::into_inner)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The gated sagas the store holds; a transient error (the first call after a restart finds
/// the old connection broken) is retried within a bound.
async fn gated_sagas(store: &dyn SagaStore) -> BTreeMap<SagaId, SagaStatus> {
    let query = ListQuery {
        saga_type: Some(GatedChain::NAME.into()),
        limit: 1000,
        ..ListQuery::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.list(&query).await {
            Ok(page) => return page.sagas.into_iter().map(|s| (s.id, s.status)).collect(),
            Err(err) if err.is_transient() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("list: {err}"),
        }
    }
}

/// What `appendfsync everysec` risks, forced: an OS crash or power loss keeps of the AOF
/// only what was fsynced, a prefix of what Redis wrote. (A SIGKILL of redis-server alone
/// loses nothing Redis had written to the file: the page cache survives the process, so the
/// crash test above rarely loses anything.) The test takes that prefix itself: with every
/// saga waiting in its second step, writes are paused and the AOF directory copied (the
/// "last fsync"); then the sagas finish, three more sagas start and finish, the server is
/// SIGKILLed and restarted on the copy. Every write acknowledged after the copy is lost, for
/// certain: each saga is back at its second step `Started`, the three late sagas are gone.
///
/// Asserted: each surviving history is exactly what it was at the copy (a prefix of what the
/// coordinator saw: nothing reordered or half-applied); the engine re-runs the lost steps with
/// the same idempotency keys (the participant sees no new key, and counts each lost step's
/// key twice); every saga completes with each position succeeding once; a lost start repeated
/// with its idempotency key is the same saga and re-runs with the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::print_stdout, clippy::too_many_lines)]
async fn a_forced_loss_of_the_unsynced_tail_reruns_the_lost_steps_with_the_same_keys() {
    if !can_spawn_servers("a_forced_loss_of_the_unsynced_tail_reruns_the_lost_steps") {
        return;
    }
    let mut server = RedisServer::start(
        ServerConfig::new()
            .fsync_every_second()
            .directive("auto-aof-rewrite-percentage 0"),
    );
    let url = server.url();
    let store: Arc<dyn SagaStore> = Arc::new(support::store(&url, "forcedloss").await);
    let calls = Calls::default();
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    let engine = Engine::builder_shared(Arc::clone(&store))
        .register(GatedChain)
        .resource(calls.clone())
        .resource(Gate(gate))
        .owner("coordinator-a")
        .lease_ttl(Duration::from_secs(2))
        .inline_wait_max(Duration::from_millis(100))
        .store_retry(
            RetryPolicy::default()
                .with_max_attempts(60)
                .with_initial_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_millis(500)),
        )
        .build()
        .unwrap_or_else(|err| panic!("{err}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(
        Coordinator::new(engine.clone())
            .workers(16)
            .poll_interval(Duration::from_millis(50))
            .run(async {
                let _ = stopped.await;
            }),
    );
    let start = |n: usize| {
        let engine = engine.clone();
        async move {
            engine
                .start_with::<GatedChain>(&(n as u64 * 100), StartOptions::key(format!("loss-{n}")))
                .await
                .unwrap_or_else(|err| panic!("start: {err}"))
                .id
        }
    };
    let mut ids = Vec::new();
    for n in 0..GATED_SAGAS {
        ids.push(start(n).await);
    }
    // Every saga in its second step: its first step and the second's start are acknowledged.
    wait_calls(&calls, "every saga reaches the gate", |c| {
        c.len() == 2 * GATED_SAGAS
    })
    .await;
    let mut at_copy = BTreeMap::new();
    for id in &ids {
        at_copy.insert(
            *id,
            engine
                .history(*id)
                .await
                .unwrap_or_else(|err| panic!("{err}")),
        );
    }

    // The "last fsync": writes paused (so the copy is not taken mid-append), AOF copied.
    let aof = server.dir().join("appendonlydir");
    let synced = server.dir().join("synced-aof");
    redis_cmd(&url, &["CLIENT", "PAUSE", "10000", "WRITE"]).await;
    copy_dir(&aof, &synced);
    redis_cmd(&url, &["CLIENT", "UNPAUSE"]).await;

    // The writes the loss will take: the sagas finish, and three more start and finish.
    open_gate.send_replace(true);
    let mut late = Vec::new();
    for n in GATED_SAGAS..GATED_SAGAS + LOST_STARTS {
        late.push(start(n).await);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut before_kill = BTreeMap::new();
    loop {
        let sagas = gated_sagas(&*store).await;
        if sagas.len() == GATED_SAGAS + LOST_STARTS
            && sagas.values().all(|s| *s == SagaStatus::Completed)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sagas not completed before the kill: {sagas:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in ids.iter().chain(&late) {
        before_kill.insert(
            *id,
            engine
                .history(*id)
                .await
                .unwrap_or_else(|err| panic!("{err}")),
        );
    }
    let keys_before: std::collections::BTreeSet<String> = calls
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys_before.len(), 3 * (GATED_SAGAS + LOST_STARTS));

    // The crash that loses the unsynced tail.
    server.kill();
    std::fs::remove_dir_all(&aof).unwrap_or_else(|err| panic!("{err}"));
    copy_dir(&synced, &aof);
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap_or_else(|err| panic!("restart: {err}"));

    // Only the synced prefix survived: each history is what it was at the copy.
    let survivors = gated_sagas(&*store).await;
    assert_eq!(
        survivors.keys().copied().collect::<Vec<_>>(),
        at_copy.keys().copied().collect::<Vec<_>>(),
        "the sagas started after the copy are lost, the others kept"
    );
    for (id, history) in &at_copy {
        let now = engine
            .history(*id)
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        let now: Vec<_> = now.iter().map(|e| format!("{:?}", e.kind)).collect();
        let then: Vec<_> = history.iter().map(|e| format!("{:?}", e.kind)).collect();
        let full: Vec<_> = before_kill[id]
            .iter()
            .map(|e| format!("{:?}", e.kind))
            .collect();
        // The engine may have appended its resume of the saga since the restart.
        assert!(
            now.len() >= then.len() && now[..then.len()] == then[..],
            "saga {id}: the surviving history starts with what was synced"
        );
        assert!(
            full.len() > then.len() && full[..then.len()] == then[..],
            "saga {id}: the synced history is a strict prefix of what was acknowledged"
        );
    }

    // A lost start, repeated with its key: the same saga.
    for (i, n) in (GATED_SAGAS..GATED_SAGAS + LOST_STARTS).enumerate() {
        assert_eq!(start(n).await, late[i], "the same key gives the same saga");
    }

    // Converge.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let sagas = gated_sagas(&*store).await;
        if sagas.len() == GATED_SAGAS + LOST_STARTS
            && sagas.values().all(|s| *s == SagaStatus::Completed)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sagas still running 90 s after the restart: {sagas:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    coordinator
        .await
        .unwrap_or_else(|err| panic!("coordinator: {err}"));

    for id in ids.iter().chain(&late) {
        let state = engine
            .state(*id)
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        let history = engine
            .history(*id)
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        let folded = SagaState::fold(*id, &history).unwrap_or_else(|err| panic!("fold: {err}"));
        assert_eq!(folded.status, SagaStatus::Completed, "saga {id}");
        assert_eq!(folded.journal, state.journal, "saga {id}: fold and journal");
        let mut succeeded = BTreeMap::new();
        for event in &history {
            if let EventKind::StepSucceeded { position, .. } = &event.kind {
                *succeeded.entry(*position).or_insert(0) += 1;
            }
        }
        assert_eq!(succeeded.len(), 3, "saga {id}: {succeeded:?}");
        assert!(
            succeeded.values().all(|n| *n == 1),
            "saga {id}: {succeeded:?}"
        );
    }
    let calls = calls
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let keys_after: std::collections::BTreeSet<String> = calls.keys().cloned().collect();
    assert_eq!(
        keys_after, keys_before,
        "the lost steps ran again with the keys they had: no new key"
    );
    // Per surviving saga: the first step was synced (once), the second and third were lost
    // (twice); per lost start: all three twice.
    let twice = calls.values().filter(|n| **n == 2).count();
    let once = calls.values().filter(|n| **n == 1).count();
    assert_eq!(
        (once, twice),
        (GATED_SAGAS, 2 * GATED_SAGAS + 3 * LOST_STARTS),
        "each lost step ran exactly once more, each synced step never again: {calls:?}"
    );
    println!(
        "forced everysec loss: {} acknowledged step results and {LOST_STARTS} starts lost; \
         {twice} step keys re-run with their own key, every saga completed",
        2 * GATED_SAGAS
    );
    drop(server);
}
