//! Child sagas: `SagaContext::child` starts a child exactly once (its key comes from the
//! parent and the journal position, so a crash right after the start finds the same child)
//! and waits durably for its typed outcome; when the parent compensates after the child
//! completed, the child is reopened and undone as part of the parent's reverse order;
//! cancelling the parent cancels a running child; parent and child are linked both ways.
//! Coordinators run them for real, on memory and on a real redis-server.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use saga_core::store::ListQuery;
use saga_core::{
    CompensationReason, Engine, HttpStatus, MemoryStore, Outcome, Saga, SagaContext, SagaError,
    SagaId, SagaStatus, SagaStore, StepContext, saga_step,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers};
use saga_tests::CrashingStore;
use saga_tests::kinds;
use saga_tests::{Effects, RunningCoordinator, effects};

/// How long any one saga may take here before the test fails (never reached when it works).
const BOUND: Duration = Duration::from_secs(60);

#[saga_step(compensate = release_fund, timeout = "none")]
async fn reserve_fund(ctx: &StepContext, company: String) -> Result<String, HttpStatus> {
    effects(ctx)?.push(format!("reserve {company}"));
    Ok(format!("fund-{company}"))
}

async fn release_fund(ctx: &StepContext, _company: String, fund: String) -> Result<(), HttpStatus> {
    effects(ctx)?.push(format!("release {fund}"));
    Ok(())
}

#[saga_step(compensate = delete_deal, timeout = "none")]
async fn create_deal(ctx: &StepContext, company: String) -> Result<String, HttpStatus> {
    effects(ctx)?.push(format!("deal {company}"));
    Ok(format!("deal-{company}"))
}

async fn delete_deal(ctx: &StepContext, _company: String, deal: String) -> Result<(), HttpStatus> {
    effects(ctx)?.push(format!("delete {deal}"));
    Ok(())
}

#[saga_step(no_compensation, timeout = "none")]
async fn announce(ctx: &StepContext, what: String) -> Result<(), HttpStatus> {
    if what.contains("refuse") {
        return Err(HttpStatus::new(400));
    }
    effects(ctx)?.push(format!("announce {what}"));
    Ok(())
}

/// The child: creates a deal; `wait` makes it wait (an hour) for a signal first.
struct Deal;

impl Saga for Deal {
    type Input = (String, bool);
    type Output = String;
    const NAME: &'static str = "deal";

    async fn run(
        &self,
        saga: &mut SagaContext,
        (company, wait): (String, bool),
    ) -> Result<String, SagaError> {
        let deal = saga.run(CreateDeal, company).await?;
        if wait {
            saga.wait_for_signal::<bool>("go", Duration::from_secs(3600))
                .await?;
        }
        Ok(deal)
    }
}

/// The parent: reserves a fund, runs a child deal, announces it (an announcement containing
/// "refuse" fails for good: the parent compensates after its child completed).
struct Sourcing;

impl Saga for Sourcing {
    type Input = (String, bool);
    type Output = String;
    const NAME: &'static str = "sourcing";

    async fn run(
        &self,
        saga: &mut SagaContext,
        (company, wait): (String, bool),
    ) -> Result<String, SagaError> {
        saga.run(ReserveFund, company.clone()).await?;
        let deal = match saga.child(Deal, (company.clone(), wait)).await? {
            Outcome::Completed(deal) => deal,
            other => {
                return Err(SagaError::Aborted(format!(
                    "the deal did not go through: {other:?}"
                )));
            }
        };
        saga.run(Announce, deal.clone()).await?;
        Ok(deal)
    }
}

fn engine(store: Arc<dyn SagaStore>, effects: &Effects, owner: &str) -> Engine {
    Engine::builder_shared(store)
        .register(Sourcing)
        .register(Deal)
        .resource(effects.clone())
        .owner(owner)
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap()
}

async fn children_of(store: &dyn SagaStore) -> Vec<SagaId> {
    let query = ListQuery {
        saga_type: Some("deal".into()),
        limit: 100,
        ..ListQuery::default()
    };
    store
        .list(&query)
        .await
        .unwrap()
        .sagas
        .into_iter()
        .map(|s| s.id)
        .collect()
}

async fn a_child_runs_and_its_typed_outcome_returns(store: Arc<dyn SagaStore>) {
    let effects = Effects::default();
    let engine = engine(Arc::clone(&store), &effects, "coordinator-a");
    let running = RunningCoordinator::spawn(&engine);
    let parent = engine
        .start(Sourcing, ("acme".into(), false))
        .await
        .unwrap();
    let outcome = engine.wait(parent.id(), BOUND).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    assert_eq!(
        effects.all(),
        ["reserve acme", "deal acme", "announce deal-acme"]
    );
    // Linked both ways: the child names its parent, the parent's journal names the child.
    let children = children_of(&*store).await;
    assert_eq!(children.len(), 1, "exactly one child");
    let child = engine.state(children[0]).await.unwrap();
    let link = child.parent.expect("the child names its parent");
    assert_eq!(
        (link.id, link.saga_type.as_str()),
        (parent.id(), "sourcing")
    );
    let state = engine.state(parent.id()).await.unwrap();
    let started = state
        .journal
        .iter()
        .find(|r| r.name == "start_child")
        .expect("the parent's journal records the child's start");
    assert_eq!(started.position, link.position);
    assert_eq!(
        started
            .output
            .as_ref()
            .and_then(|o| o.get("id"))
            .and_then(|v| v.as_str()),
        Some(children[0].to_string().as_str())
    );
    let timeline = saga_core::timeline::render(&engine.history(parent.id()).await.unwrap());
    assert!(timeline.contains("child saga"), "{timeline}");
    running.stop().await;
}

async fn a_compensating_parent_undoes_its_completed_child_in_reverse_order(
    store: Arc<dyn SagaStore>,
) {
    let effects = Effects::default();
    let engine = engine(Arc::clone(&store), &effects, "coordinator-a");
    let running = RunningCoordinator::spawn(&engine);
    let parent = engine
        .start(Sourcing, ("refuse-corp".into(), false))
        .await
        .unwrap();
    let outcome = engine.wait(parent.id(), BOUND).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated, "{outcome:?}");
    assert_eq!(
        effects.all(),
        [
            "reserve refuse-corp",
            "deal refuse-corp",
            "delete deal-refuse-corp",
            "release fund-refuse-corp"
        ],
        "the child's steps are undone inside the parent's reverse order"
    );
    let child = children_of(&*store).await[0];
    let child_state = engine.state(child).await.unwrap();
    assert_eq!(child_state.status, SagaStatus::Compensated);
    assert_eq!(
        child_state.compensation_reason,
        Some(CompensationReason::ParentCompensating {
            parent: parent.id()
        })
    );
    let history = engine.history(child).await.unwrap();
    assert!(
        kinds(&history).contains(&"SagaReopened"),
        "{:?}",
        kinds(&history)
    );
    running.stop().await;
}

async fn cancelling_the_parent_cancels_its_running_child(store: Arc<dyn SagaStore>) {
    let effects = Effects::default();
    let engine = engine(Arc::clone(&store), &effects, "coordinator-a");
    let running = RunningCoordinator::spawn(&engine);
    let parent = engine
        .start(Sourcing, ("globex".into(), true))
        .await
        .unwrap();
    // The child waits an hour for its signal; the parent waits for the child.
    let bounded = tokio::time::Instant::now() + BOUND;
    let child = loop {
        if let Some(child) = children_of(&*store).await.first().copied()
            && engine
                .history(child)
                .await
                .unwrap()
                .iter()
                .any(|e| matches!(&e.kind, saga_core::EventKind::ValueRecorded { name, .. } if name.starts_with("signal_deadline")))
        {
            break child;
        }
        assert!(
            tokio::time::Instant::now() < bounded,
            "the child never started waiting"
        );
        tokio::task::yield_now().await;
        let _ = engine.wait(parent.id(), Duration::from_millis(20)).await;
    };
    engine
        .cancel(parent.id(), "the partner pulled out")
        .await
        .unwrap();
    let outcome = engine.wait(parent.id(), BOUND).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated, "{outcome:?}");
    let child_state = engine.state(child).await.unwrap();
    assert_eq!(child_state.status, SagaStatus::Compensated);
    assert!(
        matches!(&child_state.compensation_reason, Some(CompensationReason::Cancelled { reason }) if reason.contains(&parent.id().to_string())),
        "{:?}",
        child_state.compensation_reason
    );
    assert_eq!(
        effects.all(),
        [
            "reserve globex",
            "deal globex",
            "delete deal-globex",
            "release fund-globex"
        ]
    );
    running.stop().await;
}

/// A crash right after the child was created (before the parent recorded it): the resumed
/// parent finds the same child, not a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_right_after_the_child_start_finds_the_same_child() {
    let memory = MemoryStore::new();
    let effects = Effects::default();
    // Commit 1: the fund's StepStarted; 2: start_child's StepStarted (then the child is
    // created); 3, which would record the child's id, never lands.
    let crashing: Arc<dyn SagaStore> = Arc::new(CrashingStore::after_commits(memory.clone(), 2));
    // A short lease, so that the resumed coordinator need not wait long for the crashed one's.
    let doomed = Engine::builder_shared(Arc::clone(&crashing))
        .register(Sourcing)
        .register(Deal)
        .resource(effects.clone())
        .owner("coordinator-a")
        .lease_ttl(Duration::from_millis(300))
        .inline_wait_max(Duration::from_millis(50))
        .build()
        .unwrap();
    let parent = doomed
        .start(Sourcing, ("initech".into(), false))
        .await
        .unwrap();
    let crashed = doomed.run_once(parent.id()).await;
    assert!(crashed.is_err(), "the first run must crash: {crashed:?}");
    let store: Arc<dyn SagaStore> = Arc::new(memory);
    assert_eq!(
        children_of(&*store).await.len(),
        1,
        "the child was created before the crash"
    );
    let state = saga_core::SagaState::fold(
        parent.id(),
        &engine(Arc::clone(&store), &effects, "reader")
            .history(parent.id())
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(
        state
            .journal
            .iter()
            .all(|r| r.output.is_none() || r.name != "start_child"),
        "the child's id was not recorded before the crash"
    );

    let resumed = engine(Arc::clone(&store), &effects, "coordinator-b");
    let running = RunningCoordinator::spawn(&resumed);
    let outcome = resumed.wait(parent.id(), BOUND).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    assert_eq!(
        children_of(&*store).await.len(),
        1,
        "still exactly one child"
    );
    assert_eq!(
        effects.all(),
        ["reserve initech", "deal initech", "announce deal-initech"],
        "each effect once"
    );
    running.stop().await;
}

fn memory() -> Arc<dyn SagaStore> {
    Arc::new(MemoryStore::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_child_runs_and_its_typed_outcome_returns() {
    a_child_runs_and_its_typed_outcome_returns(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_compensating_parent_undoes_its_completed_child_in_reverse_order() {
    a_compensating_parent_undoes_its_completed_child_in_reverse_order(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cancelling_the_parent_cancels_its_running_child() {
    cancelling_the_parent_cancels_its_running_child(memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_child_sagas() {
    if !can_spawn_servers("redis_child_sagas") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    for scenario in 0..3 {
        let store: Arc<dyn SagaStore> = Arc::new(
            RedisStore::builder()
                .url(server.url())
                .key_prefix(format!("children-{scenario}"))
                .connect()
                .await
                .expect("connect to the test redis-server"),
        );
        match scenario {
            0 => a_child_runs_and_its_typed_outcome_returns(store).await,
            1 => a_compensating_parent_undoes_its_completed_child_in_reverse_order(store).await,
            _ => cancelling_the_parent_cancels_its_running_child(store).await,
        }
    }
}
