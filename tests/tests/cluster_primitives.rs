//! Workflow primitives on a local 3-master Redis Cluster (spawned by `saga-redis-testkit`,
//! shared by the tests of this process, a fresh key prefix per test): a parent whose
//! children live in other partitions of the store (asserted by `KeyLayout::partition_of`,
//! each partition being one hash tag, so one slot) gets their outcomes; a signal to a saga
//! on the cluster resumes it; a parent that compensates reopens and undoes its completed
//! children. Two real coordinators run the sagas; every wait has a bound.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use saga_core::store::ListQuery;
use saga_core::{
    Engine, EventKind, HttpStatus, Outcome, Saga, SagaContext, SagaError, SagaId, SagaStatus,
    SagaStore, StepContext, saga_step,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{can_spawn_servers, shared_cluster, unique_prefix};
use saga_tests::{Effects, RunningCoordinator, effects};

/// How long any one saga may take here before the test fails (never reached when it works).
const BOUND: Duration = Duration::from_secs(60);

/// How many children the parent starts: enough to land in more than one partition.
const CHILDREN: usize = 6;

/// What the steps did.

#[saga_step(compensate = unbook, timeout = "none")]
async fn book(ctx: &StepContext, what: String) -> Result<String, HttpStatus> {
    effects(ctx)?.push(format!("book {what}"));
    Ok(format!("booked-{what}"))
}

async fn unbook(ctx: &StepContext, what: String, _booked: String) -> Result<(), HttpStatus> {
    effects(ctx)?.push(format!("unbook {what}"));
    Ok(())
}

#[saga_step(no_compensation, timeout = "none")]
async fn refuse(_ctx: &StepContext, _what: String) -> Result<(), HttpStatus> {
    Err(HttpStatus::new(400))
}

/// A child: one booking.
struct Leg;

impl Saga for Leg {
    type Input = usize;
    type Output = String;
    const NAME: &'static str = "cluster_leg";

    async fn run(&self, saga: &mut SagaContext, leg: usize) -> Result<String, SagaError> {
        saga.run(Book, format!("leg-{leg}")).await
    }
}

/// Books, starts `CHILDREN` legs, waits for each, then (`fail`) fails for good.
struct Trip;

impl Saga for Trip {
    type Input = bool;
    type Output = Vec<String>;
    const NAME: &'static str = "cluster_trip";

    async fn run(&self, saga: &mut SagaContext, fail: bool) -> Result<Vec<String>, SagaError> {
        saga.run(Book, "trip".into()).await?;
        let mut legs = Vec::new();
        for leg in 0..CHILDREN {
            legs.push(saga.start_child(Leg, leg).await?);
        }
        let mut booked = Vec::new();
        for leg in &legs {
            match saga.child_outcome(leg).await? {
                Outcome::Completed(b) => booked.push(b),
                other => return Err(SagaError::Aborted(format!("a leg failed: {other:?}"))),
            }
        }
        if fail {
            saga.run(Refuse, "trip".into()).await?;
        }
        Ok(booked)
    }
}

/// Books, waits up to an hour for `go`, books its payload.
struct Waiter;

impl Saga for Waiter {
    type Input = ();
    type Output = u32;
    const NAME: &'static str = "cluster_waiter";

    async fn run(&self, saga: &mut SagaContext, (): ()) -> Result<u32, SagaError> {
        saga.run(Book, "waiter".into()).await?;
        let Some(go) = saga
            .wait_for_signal::<u32>("go", Duration::from_secs(3600))
            .await?
        else {
            return Err(SagaError::Aborted("no go".into()));
        };
        saga.run(Book, format!("go-{go}")).await?;
        Ok(go)
    }
}

async fn store(test: &str) -> Option<Arc<RedisStore>> {
    if !can_spawn_servers(test) {
        return None;
    }
    let cluster = shared_cluster()?;
    let store = RedisStore::builder()
        .key_prefix(unique_prefix(test))
        .cluster(cluster.urls())
        .connect()
        .await
        .unwrap_or_else(|err| panic!("cannot connect to the test cluster: {err}"));
    Some(Arc::new(store))
}

fn engine(store: Arc<dyn SagaStore>, effects: &Effects, owner: &str) -> Engine {
    Engine::builder_shared(store)
        .register(Trip)
        .register(Leg)
        .register(Waiter)
        .resource(effects.clone())
        .owner(owner)
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap()
}

async fn legs(store: &dyn SagaStore) -> Vec<(SagaId, SagaStatus)> {
    let query = ListQuery {
        saga_type: Some("cluster_leg".into()),
        limit: 100,
        ..ListQuery::default()
    };
    store
        .list(&query)
        .await
        .unwrap()
        .sagas
        .into_iter()
        .map(|s| (s.id, s.status))
        .collect()
}

/// The partitions the parent and its children live in; asserts there are at least two.
fn assert_spread(store: &RedisStore, parent: SagaId, children: &[SagaId]) {
    let layout = store.keys();
    let partitions: BTreeSet<u16> = children.iter().map(|c| layout.partition_of(*c)).collect();
    let parent_partition = layout.partition_of(parent);
    assert!(
        partitions.len() >= 2 && partitions.iter().any(|p| *p != parent_partition),
        "children in partitions {partitions:?}, parent in {parent_partition} (of {}): not spread",
        layout.partitions()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_in_other_partitions_complete_and_the_parent_gets_their_outcomes() {
    let Some(redis) = store("cluster_children").await else {
        return;
    };
    let effects = Effects::default();
    let a = engine(redis.clone(), &effects, "coordinator-a");
    let b = engine(redis.clone(), &effects, "coordinator-b");
    let (ra, rb) = (RunningCoordinator::spawn(&a), RunningCoordinator::spawn(&b));
    let parent = a.start(Trip, false).await.unwrap();
    let outcome = a.wait(parent.id(), BOUND).await.unwrap();
    ra.stop().await;
    rb.stop().await;
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    let expected: Vec<String> = (0..CHILDREN).map(|l| format!("booked-leg-{l}")).collect();
    assert_eq!(
        outcome.output,
        Some(serde_json::to_value(&expected).unwrap())
    );
    let children = legs(redis.as_ref()).await;
    assert_eq!(children.len(), CHILDREN);
    assert!(
        children.iter().all(|(_, s)| *s == SagaStatus::Completed),
        "{children:?}"
    );
    let ids: Vec<SagaId> = children.iter().map(|(id, _)| *id).collect();
    assert_spread(&redis, parent.id(), &ids);
    // Each child names its parent in its history.
    for id in &ids {
        let history = a.history(*id).await.unwrap();
        let EventKind::SagaStarted { parent: link, .. } = &history[0].kind else {
            panic!("no SagaStarted");
        };
        assert_eq!(link.as_ref().map(|l| l.id), Some(parent.id()));
    }
    let mut done = effects.all();
    done.sort();
    assert_eq!(done.len(), CHILDREN + 1, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_resumes_a_saga_on_the_cluster() {
    let Some(redis) = store("cluster_signal").await else {
        return;
    };
    let effects = Effects::default();
    let a = engine(redis.clone(), &effects, "coordinator-a");
    let running = RunningCoordinator::spawn(&a);
    let handle = a.start(Waiter, ()).await.unwrap();
    // Bounded wait until the saga is waiting (its deadline journaled, no lease held).
    let mut waiting = false;
    for _ in 0..600 {
        let history = a.history(handle.id()).await.unwrap();
        let stored = redis.load(handle.id()).await.unwrap().unwrap();
        if stored.lease.is_none()
            && history.iter().any(|e| matches!(&e.kind, EventKind::ValueRecorded { name, .. } if name.starts_with("signal_deadline")))
        {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        waiting,
        "the saga never got to its wait: {:?}, {:?}",
        saga_tests::kinds(&a.history(handle.id()).await.unwrap()),
        redis.load(handle.id()).await.unwrap()
    );
    let other = engine(redis.clone(), &effects, "sender");
    other
        .signal(handle.id(), "go", &9_u32, "go-9")
        .await
        .unwrap();
    let outcome = a.wait(handle.id(), BOUND).await.unwrap();
    running.stop().await;
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    assert_eq!(outcome.output, Some(serde_json::json!(9)));
    assert_eq!(effects.all(), ["book waiter", "book go-9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensating_parent_reopens_and_undoes_its_completed_children() {
    let Some(redis) = store("cluster_compensate").await else {
        return;
    };
    let effects = Effects::default();
    let a = engine(redis.clone(), &effects, "coordinator-a");
    let b = engine(redis.clone(), &effects, "coordinator-b");
    let (ra, rb) = (RunningCoordinator::spawn(&a), RunningCoordinator::spawn(&b));
    let parent = a.start(Trip, true).await.unwrap();
    let outcome = a.wait(parent.id(), BOUND).await.unwrap();
    // The children compensate before the parent ends; wait for them with the same bound.
    let mut children = legs(redis.as_ref()).await;
    for _ in 0..600 {
        if children.len() == CHILDREN && children.iter().all(|(_, s)| s.is_terminal()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        children = legs(redis.as_ref()).await;
    }
    ra.stop().await;
    rb.stop().await;
    assert_eq!(outcome.status, SagaStatus::Compensated, "{outcome:?}");
    assert!(
        children.iter().all(|(_, s)| *s == SagaStatus::Compensated),
        "{children:?}"
    );
    let ids: Vec<SagaId> = children.iter().map(|(id, _)| *id).collect();
    assert_spread(&redis, parent.id(), &ids);
    let done = effects.all();
    for leg in 0..CHILDREN {
        for what in [format!("book leg-{leg}"), format!("unbook leg-{leg}")] {
            assert_eq!(
                done.iter().filter(|e| **e == what).count(),
                1,
                "{what}: {done:?}"
            );
        }
    }
    // The trip's own booking is undone last (it came first).
    assert_eq!(
        done.last().map(String::as_str),
        Some("unbook trip"),
        "{done:?}"
    );
}
