//! Coordinator retention on Redis, standalone and on a 3-master cluster: terminal sagas older
//! than the period are purged in the background with their histories, younger ones and
//! running ones are kept, and a running saga finishes normally meanwhile. Every wait is on a
//! condition, with a bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_core::{
    Compensation, Coordinator, Engine, HttpStatus, Saga, SagaContext, SagaError, SagaStatus,
    SagaStore, StartOptions, Step, StepContext,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{shared_cluster, shared_server, unique_prefix};
use tokio::sync::watch;

const BOUND: Duration = Duration::from_secs(30);

/// Waits for the gate (a `watch<bool>` resource) when its input is odd.
struct Work;

impl Step for Work {
    type Input = u64;
    type Output = u64;
    type Error = HttpStatus;
    const NAME: &'static str = "work";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, input: u64) -> Result<u64, HttpStatus> {
        if input % 2 == 1 {
            let gate = ctx
                .resource::<watch::Sender<bool>>()
                .map_err(|_| HttpStatus::new(500))?;
            let mut open = gate.subscribe();
            let _ = open.wait_for(|open| *open).await;
        }
        Ok(input + 10)
    }
}

struct One;

impl Saga for One {
    type Input = u64;
    type Output = u64;
    const NAME: &'static str = "one";
    async fn run(&self, saga: &mut SagaContext, value: u64) -> Result<u64, SagaError> {
        saga.run(Work, value).await
    }
}

async fn retention_keeps_what_it_must(store: RedisStore) {
    let store = Arc::new(store);
    let gate = watch::Sender::new(false);
    let engine = Engine::builder_shared(Arc::clone(&store) as Arc<dyn SagaStore>)
        .register(One)
        .resource(gate.clone())
        .build()
        .unwrap();
    let keep = Duration::from_millis(400);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(
        Coordinator::new(engine.clone())
            .workers(8)
            .retention(Some(keep))
            .housekeeping_interval(Duration::from_millis(50))
            .run(async {
                let _ = stopped.await;
            }),
    );
    let wait = Duration::from_secs(20);
    let mut old = Vec::new();
    for i in 0..6 {
        let id = engine
            .start_with::<One>(&(i * 2), StartOptions::default())
            .await
            .unwrap()
            .id;
        assert_eq!(
            engine.wait(id, wait).await.unwrap().status,
            SagaStatus::Completed
        );
        old.push(id);
    }
    let running = engine
        .start_with::<One>(&1, StartOptions::default())
        .await
        .unwrap()
        .id;

    let started = Instant::now();
    for id in &old {
        while store.load(*id).await.unwrap().is_some() {
            assert!(started.elapsed() < BOUND, "saga {id} was never purged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(store.events(*id).await.is_err(), "its history is gone too");
    }
    // A saga that finished just now is kept (it is younger than the period).
    let recent = engine
        .start_with::<One>(&100, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert_eq!(
        engine.wait(recent, wait).await.unwrap().status,
        SagaStatus::Completed
    );
    assert!(store.load(recent).await.unwrap().is_some());
    let still = store
        .load(running)
        .await
        .unwrap()
        .expect("a running saga is never purged");
    assert_eq!(still.status, SagaStatus::Running);
    gate.send_replace(true);
    let outcome = engine.wait(running, wait).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.output, Some(serde_json::json!(11)));
    let _ = stop.send(());
    let report = task.await.unwrap();
    assert_eq!(report.finished, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_retention() {
    let store = RedisStore::builder()
        .url(shared_server().url())
        .key_prefix(unique_prefix("retention"))
        .connect()
        .await
        .unwrap();
    retention_keeps_what_it_must(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_retention() {
    let builder = RedisStore::builder().key_prefix(unique_prefix("retention"));
    let builder = match shared_cluster() {
        Some(cluster) => builder.cluster(cluster.urls()),
        None => builder.url(shared_server().url()),
    };
    retention_keeps_what_it_must(builder.connect().await.unwrap()).await;
}
