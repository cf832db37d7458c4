//! Pivot semantics: once a `Compensation::Pivot` step has succeeded the saga only goes forward.
//! A later failure compensates nothing and ends the saga `Failed` (kind `AfterPivot`), an
//! operator retry continues forward, and a cancel is refused. Before the pivot nothing
//! changes. Each rule runs on the in-memory store (paused time) and on a real redis-server.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use saga_core::store::CancelOutcome;
use saga_core::{
    Compensation, Engine, EngineError, EventKind, FailureKind, GiveUpReason, Phase, RunOutcome,
    Saga, SagaEvent, SagaId, SagaStatus, SagaStore, StartOptions, StepStatus,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers};
use saga_tests::{
    Behavior, CrashingStore, Gate, Harness, Plan, PlanSaga, assert_fold_matches, count,
    events_named, fast_policy, single_terminal,
};

/// Four steps; step 1 is the pivot; steps after it retry quickly three times.
fn pivot_plan() -> Plan {
    Plan::linear(4)
        .with(1, |s| s.compensation = Compensation::Pivot)
        .with_all(|s| {
            s.policy = fast_policy(3);
            s.timeout = None;
        })
}

/// Where the scenarios run: an engine over the harness's script and ledger, on some store.
type Build = dyn Fn(&Harness, Plan) -> Engine;

fn on_memory(h: &Harness, plan: Plan) -> Engine {
    h.engine(plan)
}

/// The pivot flag of every `StepSucceeded`, by position.
fn pivot_flags(engine_history: &[saga_core::SagaEvent]) -> Vec<(u32, bool)> {
    engine_history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepSucceeded {
                position, pivot, ..
            } => Some((*position, *pivot)),
            _ => None,
        })
        .collect()
}

async fn failure_after_the_pivot_compensates_nothing(h: &Harness, build: &Build) {
    h.script.forward(3, [Behavior::Permanent]);
    let engine = build(h, pivot_plan());

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Failed);
    let (kind, error) = outcome.failure.clone().unwrap();
    assert_eq!(kind, FailureKind::AfterPivot);
    assert!(error.contains("step_d"), "{error}");
    assert!(error.contains("after the pivot `step_b`"), "{error}");
    assert!(error.contains("retry the saga"), "{error}");
    assert!(outcome.compensation_reason.is_none());
    assert!(
        h.ledger.effects_in(Phase::Compensate).is_empty(),
        "nothing is undone past the pivot"
    );
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(count(&history, "CompensationStarted"), 0);
    assert_eq!(count(&history, "StepCompensated"), 0);
    assert_eq!(single_terminal(&history), "SagaFailed");
    assert_eq!(
        pivot_flags(&history),
        [(0, false), (1, true), (2, false)],
        "the pivot's success is marked in the history"
    );
    let state = assert_fold_matches(&engine, outcome.id).await;
    let pivot = state.past_pivot.clone().unwrap();
    assert_eq!((pivot.position, pivot.step.as_str()), (1, "step_b"));
    assert_eq!(state.journal[3].status, StepStatus::Failed);
    let timeline = saga_core::timeline::render(&history);
    assert!(timeline.contains("PAST THE PIVOT"), "{timeline}");
}

async fn exhausted_retries_after_the_pivot_compensate_nothing(h: &Harness, build: &Build) {
    h.script.forward(2, vec![Behavior::Transient; 3]);
    let engine = build(h, pivot_plan());

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Failed);
    assert_eq!(outcome.failure.as_ref().unwrap().0, FailureKind::AfterPivot);
    assert_eq!(
        h.ledger.calls_of(2, Phase::Forward).len(),
        3,
        "the policy ran out"
    );
    assert!(h.ledger.calls_of(3, Phase::Forward).is_empty());
    assert!(h.ledger.effects_in(Phase::Compensate).is_empty());
    let history = engine.history(outcome.id).await.unwrap();
    let failed = events_named(&history, "StepFailed");
    assert!(matches!(
        failed[0].kind,
        EventKind::StepFailed {
            position: 2,
            reason: GiveUpReason::AttemptsExhausted,
            ..
        }
    ));
    assert_fold_matches(&engine, outcome.id).await;
}

async fn retry_after_the_pivot_continues_forward(h: &Harness, build: &Build) {
    h.script.forward(3, [Behavior::Permanent, Behavior::Ok]);
    let engine = build(h, pivot_plan());
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    let failed = engine.run_to_end(id).await.unwrap();
    assert_eq!(failed.failure.as_ref().unwrap().0, FailureKind::AfterPivot);

    // The cause is fixed: the retry runs the failed step again and the saga completes.
    assert_eq!(
        engine.retry(id, "shipping API fixed").await.unwrap(),
        SagaStatus::Running
    );
    let outcome = engine.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    let output: Vec<saga_tests::StepOutput> = outcome.output().unwrap().unwrap();
    assert_eq!(output.len(), 4);
    for step in 0..3 {
        assert_eq!(
            h.ledger.effects_of(step, Phase::Forward).len(),
            1,
            "step {step} ran once"
        );
    }
    assert_eq!(h.ledger.calls_of(3, Phase::Forward).len(), 2);
    assert!(h.ledger.effects_in(Phase::Compensate).is_empty());
    let history = engine.history(id).await.unwrap();
    assert_eq!(count(&history, "SagaRetried"), 1);
    assert_eq!(count(&history, "CompensationStarted"), 0);
    assert_eq!(history.last().unwrap().kind.name(), "SagaCompleted");
    let state = assert_fold_matches(&engine, id).await;
    assert_eq!(state.journal[3].status, StepStatus::Succeeded);
    assert!(state.failure.is_none());
}

async fn cancel_after_the_pivot_is_refused(h: &Harness, build: &Build) {
    let gate = Gate::new();
    h.script.forward(2, [Behavior::WaitThenOk(gate.clone())]);
    let engine = build(h, pivot_plan());
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    let runner = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    // Step 2 runs: the pivot (step 1) has succeeded and is recorded with step 2's start.
    gate.entered.notified().await;
    let err = engine.cancel(id, "customer withdrew").await.unwrap_err();
    assert!(
        matches!(&err, EngineError::PastPivot { saga, step, position: 1 } if *saga == id && step == "step_b"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("cannot be cancelled"), "{message}");
    assert!(message.contains("abandon"), "{message}");
    gate.release.notify_one();

    let outcome = runner.await.unwrap().unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let history = engine.history(id).await.unwrap();
    assert_eq!(
        count(&history, "CancelRequested"),
        0,
        "nothing was requested"
    );
    assert!(h.ledger.effects_in(Phase::Compensate).is_empty());
    assert_fold_matches(&engine, id).await;
}

async fn cancel_racing_the_pivot_is_refused_by_the_saga(h: &Harness, build: &Build) {
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let engine = build(h, pivot_plan());
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    let runner = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    // The pivot itself is running: the saga is not past it yet, so the request is taken.
    gate.entered.notified().await;
    assert_eq!(
        engine.cancel(id, "customer withdrew").await.unwrap(),
        CancelOutcome::Requested
    );
    gate.release.notify_one();

    // The pivot then succeeds: the saga goes on and records the refusal.
    let outcome = runner.await.unwrap().unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert!(h.ledger.effects_in(Phase::Compensate).is_empty());
    let history = engine.history(id).await.unwrap();
    assert_eq!(count(&history, "CancelRequested"), 1);
    let refused = events_named(&history, "CancelRefused");
    assert_eq!(refused.len(), 1, "refused once");
    assert!(matches!(
        &refused[0].kind,
        EventKind::CancelRefused { step, position: 1 } if step == "step_b"
    ));
    let state = assert_fold_matches(&engine, id).await;
    assert!(state.cancel_refused);
}

async fn failure_before_the_pivot_compensates_as_usual(h: &Harness, build: &Build) {
    // The pivot is step 2; step 1 fails for good before it runs.
    h.script.forward(1, [Behavior::Permanent]);
    let plan = Plan::linear(4)
        .with(2, |s| s.compensation = Compensation::Pivot)
        .with_all(|s| s.timeout = None);
    let engine = build(h, plan);

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    let undone: Vec<usize> = h
        .ledger
        .effects_in(Phase::Compensate)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(undone, [0]);
    assert!(h.ledger.calls_of(2, Phase::Forward).is_empty());
    let state = assert_fold_matches(&engine, outcome.id).await;
    assert!(state.past_pivot.is_none());
}

async fn a_pivot_that_fails_compensates_the_steps_before_it(h: &Harness, build: &Build) {
    h.script.forward(1, [Behavior::Permanent]);
    let engine = build(h, pivot_plan());

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    let undone: Vec<usize> = h
        .ledger
        .effects_in(Phase::Compensate)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(undone, [0]);
    let history = engine.history(outcome.id).await.unwrap();
    let why = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::CompensationSkipped {
                position: 1, why, ..
            } => Some(why.clone()),
            _ => None,
        })
        .unwrap();
    assert!(why.contains("pivot"), "{why}");
    let state = assert_fold_matches(&engine, outcome.id).await;
    assert!(state.past_pivot.is_none());
}

async fn the_first_pivot_to_succeed_is_the_point_of_no_return(h: &Harness, build: &Build) {
    h.script.forward(3, [Behavior::Permanent]);
    let plan = pivot_plan().with(2, |s| s.compensation = Compensation::Pivot);
    let engine = build(h, plan);

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.failure.as_ref().unwrap().0, FailureKind::AfterPivot);
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(pivot_flags(&history), [(0, false), (1, true), (2, false)]);
    let state = assert_fold_matches(&engine, outcome.id).await;
    assert_eq!(state.past_pivot.unwrap().position, 1);
}

/// A crash at every commit of a saga whose step fails for good past the pivot: resumed by a
/// fresh engine, every one ends `Failed` (`AfterPivot`), none is quarantined or compensated.
#[tokio::test(start_paused = true)]
async fn a_crash_at_any_commit_past_the_pivot_still_ends_failed_after_the_pivot() {
    let mut crashes = 0;
    for commits in 0.. {
        let h = Harness::new();
        h.script.forward(3, vec![Behavior::Permanent; 10]);
        let crashing = Arc::new(CrashingStore::after_commits(h.store.clone(), commits));
        let engine = h
            .builder_on(crashing.clone(), pivot_plan())
            .build()
            .unwrap();
        let key = format!("crash-{commits}");
        let id = SagaId::from_idempotency_key(PlanSaga::NAME, &key);
        let first = engine.execute::<PlanSaga>(&0, StartOptions::key(key)).await;
        if !crashing.crashed() {
            assert_eq!(first.unwrap().failure.unwrap().0, FailureKind::AfterPivot);
            break;
        }
        crashes += 1;
        let fresh = h.engine(pivot_plan());
        let outcome = fresh
            .run_to_end(id)
            .await
            .unwrap_or_else(|err| panic!("crash after {commits} commits: {err}"));
        assert_eq!(
            outcome.failure.as_ref().map(|f| f.0),
            Some(FailureKind::AfterPivot),
            "crash after {commits} commits: {outcome:?}"
        );
        assert!(h.ledger.effects_in(Phase::Compensate).is_empty());
        let history = fresh.history(id).await.unwrap();
        assert_eq!(single_terminal(&history), "SagaFailed");
        assert_fold_matches(&fresh, id).await;
    }
    assert!(
        crashes >= 5,
        "the saga commits at least 5 times before it ends"
    );
}

/// A cancel taken before the pivot, while the step before it was cut off by a crash: the step
/// is found applied by its check on resume, and the cancel still stops the saga before the
/// pivot (the resolution does not leak into the pivot's start).
#[tokio::test(start_paused = true)]
async fn a_cancel_before_the_pivot_survives_a_reconciled_step() {
    let h = Harness::new();
    h.script.reconcile_from_ledger(0);
    let plan = Plan::linear(3)
        .with(1, |s| s.compensation = Compensation::Pivot)
        .with_all(|s| {
            s.policy = fast_policy(3);
            s.timeout = None;
        });
    let crashing = Arc::new(CrashingStore::after_commits(h.store.clone(), 1));
    let engine = h
        .builder_on(crashing.clone(), plan.clone())
        .build()
        .unwrap();
    let id = SagaId::from_idempotency_key(PlanSaga::NAME, "k");
    let _ = engine.execute::<PlanSaga>(&0, StartOptions::key("k")).await;
    assert!(crashing.crashed());

    let fresh = h.engine(plan);
    assert_eq!(
        fresh.cancel(id, "stop").await.unwrap(),
        CancelOutcome::Requested
    );
    let outcome = fresh.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(
        h.ledger.calls_of(1, Phase::Forward).is_empty(),
        "the pivot never ran"
    );
    assert_eq!(h.ledger.effects_of(0, Phase::Compensate).len(), 1);
    assert_fold_matches(&fresh, id).await;
}

/// A pivot whose attempt timed out (its effect may have happened) when a cancel arrives: it
/// is settled first by running it again with its key; it goes through, so the saga is past
/// its pivot and goes forward, and the steps before it are not undone.
#[tokio::test(start_paused = true)]
async fn a_pivot_that_timed_out_is_settled_before_a_cancel_is_acted_on() {
    let h = Harness::new();
    h.script.forward(1, [Behavior::Timeout, Behavior::Ok]);
    let plan = Plan::linear(3).with(1, |s| {
        s.compensation = Compensation::Pivot;
        s.timeout = Some(Duration::from_millis(50));
        s.policy = fast_policy(3).with_initial_delay(Duration::from_secs(5));
    });
    let engine = h
        .builder(plan)
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap();
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    // The pivot's first attempt times out; its retry is a durable timer.
    assert!(matches!(
        engine.run_once(id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    assert_eq!(
        engine.cancel(id, "customer withdrew").await.unwrap(),
        CancelOutcome::Requested
    );

    let outcome = engine.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    assert!(h.ledger.effects_in(Phase::Compensate).is_empty());
    let history = engine.history(id).await.unwrap();
    assert_eq!(count(&history, "CancelRefused"), 1);
    assert_fold_matches(&engine, id).await;
}

/// A cancel that raced with the pivot leaves the store's cancel flag set; a run sleeping
/// through a durable timer past the pivot must not take that flag for a new cancel (it would
/// claim and suspend the saga over and over until the timer is due).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_cancel_does_not_wake_a_sleep_past_the_pivot() {
    let h = Harness::new();
    h.script.forward(
        2,
        [Behavior::RetryAfter(Duration::from_secs(2)), Behavior::Ok],
    );
    let engine = h
        .builder(pivot_plan())
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap();
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert!(matches!(
        engine.run_once(id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    // The race: the flag reaches the store as if the request had been checked before the pivot.
    let raced = SagaEvent {
        seq: 0,
        at: h.now(),
        kind: EventKind::CancelRequested {
            reason: "raced".into(),
        },
    };
    h.store
        .request_cancel(id, serde_json::to_string(&raced).unwrap())
        .await
        .unwrap();

    let outcome = tokio::time::timeout(Duration::from_secs(60), engine.run_to_end(id))
        .await
        .expect("the saga ends once its timer is due")
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let history = engine.history(id).await.unwrap();
    assert!(
        count(&history, "LeaseAcquired") <= 3,
        "claimed again and again while its timer ran: {:?}",
        saga_tests::kinds(&history)
    );
}

// ---------------------------------------------------------------------------------------
// In memory, on tokio's paused clock: one test per scenario, named `memory_<scenario>`.

macro_rules! on_memory {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(start_paused = true)]
                async fn $scenario() {
                    super::$scenario(&super::Harness::new(), &super::on_memory).await;
                }
            )*
        }
    };
}

on_memory!(
    failure_after_the_pivot_compensates_nothing,
    exhausted_retries_after_the_pivot_compensate_nothing,
    retry_after_the_pivot_continues_forward,
    cancel_after_the_pivot_is_refused,
    cancel_racing_the_pivot_is_refused_by_the_saga,
    failure_before_the_pivot_compensates_as_usual,
    a_pivot_that_fails_compensates_the_steps_before_it,
    the_first_pivot_to_succeed_is_the_point_of_no_return,
);

// ---------------------------------------------------------------------------------------
// On a real redis-server (AOF, appendfsync always), in real time.

/// Every scenario on one server, each on a store of its own key prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pivot_rules() {
    if !can_spawn_servers("redis_pivot_rules") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    let url = server.url();
    let mut prefix = 0_u32;
    let mut store = || {
        prefix += 1;
        let url = url.clone();
        let key_prefix = format!("pivot{prefix}");
        async move {
            let store: Arc<dyn SagaStore> = Arc::new(
                RedisStore::builder()
                    .url(url)
                    .key_prefix(key_prefix)
                    .connect()
                    .await
                    .expect("connect to the test redis-server"),
            );
            store
        }
    };
    macro_rules! on_redis {
        ($scenario:ident) => {{
            let store = store().await;
            let build = move |h: &Harness, plan: Plan| {
                h.builder_on(Arc::clone(&store), plan)
                    .build()
                    .expect("valid engine configuration")
            };
            $scenario(&Harness::new(), &build).await;
        }};
    }
    on_redis!(failure_after_the_pivot_compensates_nothing);
    on_redis!(exhausted_retries_after_the_pivot_compensate_nothing);
    on_redis!(retry_after_the_pivot_continues_forward);
    on_redis!(cancel_after_the_pivot_is_refused);
    on_redis!(cancel_racing_the_pivot_is_refused_by_the_saga);
    on_redis!(failure_before_the_pivot_compensates_as_usual);
    on_redis!(a_pivot_that_fails_compensates_the_steps_before_it);
    on_redis!(the_first_pivot_to_succeed_is_the_point_of_no_return);
}
