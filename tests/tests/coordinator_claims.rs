//! How the coordinator keeps its workers busy whatever the store's latency: the claim loop
//! runs beside the workers, slots free up the moment runs end, sagas started on the
//! coordinator's own engine go straight to a free worker with their lease, and waiting for
//! such a saga costs no store read.
//!
//! The store answers every call after a latency (virtual: time is paused, so nothing here is
//! timed); every wait below is on a condition, with a bound.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use saga_core::{
    Classify, Coordinator, CoordinatorReport, Engine, MemoryStore, Saga, SagaContext, SagaError,
    SagaId, SagaStatus, SagaStore, StartOptions, StepContext, saga_step,
};
use saga_tests::{SlowStore, until};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// What the gated step reports: how many run at once, the most that ever did, and the gate
/// that holds them.
#[derive(Debug)]
struct Activity {
    running: AtomicUsize,
    most: AtomicUsize,
    open: watch::Sender<bool>,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            open: watch::Sender::new(false),
        })
    }

    fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

#[derive(Debug, thiserror::Error, Classify)]
#[error("test step failed")]
#[classify(permanent)]
struct TestError;

/// Counts itself running, waits for the gate, and succeeds.
#[saga_step(no_compensation, timeout = "none", retry(max_attempts = 1))]
async fn gated(ctx: &StepContext, value: u32) -> Result<u32, TestError> {
    let activity = ctx.resource::<Arc<Activity>>().map_err(|_| TestError)?;
    let now = activity.running.fetch_add(1, Ordering::SeqCst) + 1;
    activity.most.fetch_max(now, Ordering::SeqCst);
    let mut open = activity.open.subscribe();
    let _ = open.wait_for(|open| *open).await;
    activity.running.fetch_sub(1, Ordering::SeqCst);
    Ok(value)
}

/// Succeeds at once.
#[saga_step(no_compensation, timeout = "none", retry(max_attempts = 1))]
async fn quick(ctx: &StepContext, value: u32) -> Result<u32, TestError> {
    let _ = ctx;
    Ok(value + 1)
}

struct GatedSaga;

impl Saga for GatedSaga {
    type Input = u32;
    type Output = u32;
    const NAME: &'static str = "gated";
    async fn run(&self, saga: &mut SagaContext, input: u32) -> Result<u32, SagaError> {
        saga.run(Gated, input).await
    }
}

struct QuickSaga;

impl Saga for QuickSaga {
    type Input = u32;
    type Output = u32;
    const NAME: &'static str = "quick";
    async fn run(&self, saga: &mut SagaContext, input: u32) -> Result<u32, SagaError> {
        let one = saga.run(Quick, input).await?;
        saga.run(Quick, one).await
    }
}

type Store = Arc<SlowStore<MemoryStore>>;

fn slow_store(latency: Duration) -> Store {
    Arc::new(SlowStore::new(MemoryStore::new(), latency))
}

fn engine(store: &Store, activity: &Arc<Activity>, owner: &str) -> Engine {
    let shared: Arc<dyn SagaStore> = Arc::clone(store) as Arc<dyn SagaStore>;
    Engine::builder_shared(shared)
        .register(GatedSaga)
        .register(QuickSaga)
        .resource(Arc::clone(activity))
        .owner(owner)
        .build()
        .unwrap()
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<CoordinatorReport>,
}

impl Running {
    fn spawn(engine: &Engine, workers: usize) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        // A long poll interval: only the store's wake-ups and full batches make it claim.
        let coordinator = Coordinator::new(engine.clone())
            .workers(workers)
            .poll_interval(Duration::from_secs(3600));
        let task = tokio::spawn(coordinator.run(async {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    async fn stop(self) -> CoordinatorReport {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

async fn start<S: Saga<Input = u32>>(engine: &Engine, input: u32) -> SagaId {
    engine
        .start_with::<S>(&input, StartOptions::default())
        .await
        .unwrap()
        .id
}

#[tokio::test(start_paused = true)]
async fn with_a_slow_store_every_worker_is_busy_when_enough_sagas_are_due() {
    const WORKERS: usize = 6;
    const SAGAS: u32 = 20;
    let store = slow_store(Duration::from_millis(20));
    let activity = Activity::new();
    // Submitted by a client (no coordinator on its engine): every saga is due in the store.
    let client = engine(&store, &activity, "client");
    let mut ids = Vec::new();
    for i in 0..SAGAS {
        ids.push(start::<GatedSaga>(&client, i).await);
    }
    let worker = engine(&store, &activity, "worker");
    let coordinator = Running::spawn(&worker, WORKERS);

    until("every worker runs a saga", 10_000, || {
        activity.running() == WORKERS
    })
    .await;
    // More than enough is due, yet never more than the pool runs at once.
    assert_eq!(activity.most.load(Ordering::SeqCst), WORKERS);
    activity.open.send_replace(true);
    for id in &ids {
        let outcome = client.wait(*id, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed, "saga {id}");
    }
    assert_eq!(activity.most.load(Ordering::SeqCst), WORKERS);
    let report = coordinator.stop().await;
    assert_eq!(report.runs, u64::from(SAGAS));
    assert_eq!(report.finished, u64::from(SAGAS));
    // Batched: far fewer claims than sagas (each claim takes every free worker's share).
    let claims = store.calls("claim_due");
    assert!(
        claims < SAGAS as usize,
        "{claims} claim calls for {SAGAS} sagas: claims are not batched"
    );
}

#[tokio::test(start_paused = true)]
async fn runs_end_and_free_their_workers_while_a_claim_is_in_flight() {
    const WORKERS: usize = 4;
    let store = slow_store(Duration::from_millis(5));
    let activity = Activity::new();
    let worker = engine(&store, &activity, "worker");
    let coordinator = Running::spawn(&worker, WORKERS);
    // The first claim (at start) finds nothing; hold every later one.
    until("the first claim answered", 10_000, || {
        store.calls("claim_due") >= 1 && store.claims_in_flight() == 0
    })
    .await;
    store.hold_claims();

    // Two sagas started on the coordinator's own engine run on two of its workers at once.
    let a = start::<GatedSaga>(&worker, 1).await;
    let b = start::<GatedSaga>(&worker, 2).await;
    until("both local sagas run", 10_000, || activity.running() == 2).await;
    // A saga submitted elsewhere wakes the claim loop, which claims for the two free
    // workers; that claim now hangs.
    let client = engine(&store, &activity, "client");
    let c = start::<QuickSaga>(&client, 3).await;
    until("a claim is in flight", 10_000, || {
        store.claims_in_flight() == 1
    })
    .await;

    // The gated runs end while the claim is in flight: their workers free up at once, and a
    // new local start runs on one of them.
    activity.open.send_replace(true);
    for id in [a, b] {
        let outcome = worker.wait(id, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed);
    }
    let d = start::<QuickSaga>(&worker, 4).await;
    let outcome = worker.wait(d, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.output, Some(serde_json::json!(6)));
    assert_eq!(
        store.claims_in_flight(),
        1,
        "the claim was still in flight while the local sagas ran"
    );
    assert_eq!(
        client.outcome(c).await.unwrap().status,
        SagaStatus::Running,
        "the client's saga waits for the held claim"
    );

    store.release_claims();
    let outcome = client.wait(c, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let report = coordinator.stop().await;
    assert_eq!(report.runs, 4);
    assert_eq!(report.finished, 4);
}

#[tokio::test(start_paused = true)]
async fn a_saga_started_where_a_worker_is_free_runs_there_and_its_wait_reads_nothing() {
    let store = slow_store(Duration::from_millis(2));
    let activity = Activity::new();
    let worker = engine(&store, &activity, "worker");
    let coordinator = Running::spawn(&worker, 8);
    until("the first claim answered", 10_000, || {
        store.calls("claim_due") >= 1 && store.claims_in_flight() == 0
    })
    .await;
    let claims_before = store.calls("claim_due");

    for i in 0..10 {
        let id = start::<QuickSaga>(&worker, i).await;
        let outcome = worker.wait(id, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed);
        assert_eq!(outcome.output, Some(serde_json::json!(i + 2)));
    }
    // Created with the lease and handed to a worker: no claim, no load, no read to wait.
    assert_eq!(store.calls("create"), 10);
    assert_eq!(
        store.calls("claim_due"),
        claims_before,
        "no claim round trip"
    );
    assert_eq!(store.calls("claim"), 0);
    assert_eq!(
        store.calls("load"),
        0,
        "neither the run nor the wait read the saga"
    );

    // A waiter that comes after the end still reads nothing; one on another engine reads the
    // finished saga once.
    let id = start::<QuickSaga>(&worker, 100).await;
    worker.wait(id, Duration::from_secs(3600)).await.unwrap();
    let again = worker.wait(id, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(again.status, SagaStatus::Completed);
    assert_eq!(store.calls("load"), 0);
    let other = engine(&store, &activity, "other");
    let seen = other.wait(id, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(seen, again);
    assert_eq!(store.calls("load"), 1);

    let report = coordinator.stop().await;
    assert_eq!(report.runs, 11);
    assert_eq!(report.finished, 11);
}

#[tokio::test(start_paused = true)]
async fn a_start_with_every_worker_busy_is_stored_due_and_claimed_when_one_frees() {
    let store = slow_store(Duration::from_millis(2));
    let activity = Activity::new();
    let worker = engine(&store, &activity, "worker");
    let coordinator = Running::spawn(&worker, 1);
    let busy = start::<GatedSaga>(&worker, 1).await;
    until("the worker is busy", 10_000, || activity.running() == 1).await;
    // No free worker: created without a lease, due for any coordinator.
    let queued = start::<QuickSaga>(&worker, 2).await;
    let stored = store.load(queued).await.unwrap().unwrap();
    assert!(stored.lease.is_none(), "a queued saga holds no lease");
    activity.open.send_replace(true);
    for id in [busy, queued] {
        let outcome = worker.wait(id, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed);
    }
    let report = coordinator.stop().await;
    assert_eq!(report.runs, 2);
    assert_eq!(report.finished, 2);
}

#[tokio::test(start_paused = true)]
async fn sagas_started_during_shutdown_are_left_due_for_other_coordinators() {
    let store = slow_store(Duration::from_millis(2));
    let activity = Activity::new();
    let worker = engine(&store, &activity, "worker");
    let coordinator = Running::spawn(&worker, 4);
    let report = coordinator.stop().await;
    assert_eq!(report.runs, 0);
    // The coordinator is gone: a start on its engine takes no lease and stays due.
    let id = start::<QuickSaga>(&worker, 1).await;
    let stored = store.load(id).await.unwrap().unwrap();
    assert!(stored.lease.is_none());
    let other = engine(&store, &activity, "other");
    let outcome = other.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
}

#[tokio::test(start_paused = true)]
async fn retention_purges_only_terminal_sagas_older_than_the_period_while_others_run() {
    const HOUR: Duration = Duration::from_secs(3600);
    let store = slow_store(Duration::from_millis(1));
    let activity = Activity::new();
    let worker = engine(&store, &activity, "worker");
    let (stop, stopped) = oneshot::channel::<()>();
    let coordinator = Coordinator::new(worker.clone())
        .workers(4)
        .poll_interval(HOUR)
        .retention(Some(HOUR))
        .housekeeping_interval(Duration::from_secs(60));
    let task = tokio::spawn(coordinator.run(async {
        let _ = stopped.await;
    }));
    let mut old = Vec::new();
    for i in 0..5 {
        let id = start::<QuickSaga>(&worker, i).await;
        worker.wait(id, HOUR).await.unwrap();
        old.push(id);
    }
    let running = start::<GatedSaga>(&worker, 9).await;
    until("the gated saga runs", 10_000, || activity.running() == 1).await;
    // Half the period: nothing is old enough yet.
    tokio::time::sleep(HOUR / 2).await;
    for id in &old {
        assert!(
            store.load(*id).await.unwrap().is_some(),
            "saga {id} purged too early"
        );
    }
    let recent = start::<QuickSaga>(&worker, 7).await;
    worker.wait(recent, HOUR).await.unwrap();
    // Past the period for the first five (each round runs every minute).
    tokio::time::sleep(HOUR / 2 + Duration::from_secs(120)).await;
    for id in &old {
        assert!(
            store.load(*id).await.unwrap().is_none(),
            "saga {id} outlived the retention"
        );
        assert!(store.events(*id).await.is_err(), "its history went with it");
    }
    let kept = store
        .load(recent)
        .await
        .unwrap()
        .expect("a younger saga is kept");
    assert_eq!(kept.status, SagaStatus::Completed);
    let still = store
        .load(running)
        .await
        .unwrap()
        .expect("a running saga is never purged");
    assert_eq!(still.status, SagaStatus::Running);
    // The running saga finishes normally after all that time.
    activity.open.send_replace(true);
    let outcome = worker.wait(running, HOUR).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let _ = stop.send(());
    let report = task.await.unwrap();
    assert_eq!(report.finished, 7);
}

#[tokio::test(start_paused = true)]
async fn without_retention_nothing_is_purged() {
    let store = slow_store(Duration::from_millis(1));
    let activity = Activity::new();
    let worker = engine(&store, &activity, "worker");
    let (stop, stopped) = oneshot::channel::<()>();
    let coordinator = Coordinator::new(worker.clone())
        .poll_interval(Duration::from_secs(3600))
        .retention(None)
        .housekeeping_interval(Duration::from_secs(3600));
    let task = tokio::spawn(coordinator.run(async {
        let _ = stopped.await;
    }));
    let id = start::<QuickSaga>(&worker, 1).await;
    worker.wait(id, Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(saga_core::DEFAULT_RETENTION * 2).await;
    assert!(store.load(id).await.unwrap().is_some());
    assert_eq!(store.calls("purge"), 0);
    let _ = stop.send(());
    task.await.unwrap();
}
