//! Typed interruption causes: each cause produced for real (a fenced write, a shutdown, a
//! lapsed lease, a store outage), told apart by the `EngineError` predicates and counted by
//! the coordinator from the type.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use saga_core::store::ClaimRequest;
use saga_core::{
    Coordinator, EngineError, Interruption, SagaId, SagaStatus, SagaStore, StartOptions, StoreError,
};
use saga_tests::{Behavior, CrashingStore, Gate, Harness, OWNER, Plan, PlanSaga, until};

/// Every predicate's answer, in a fixed order, so that one assertion shows them all.
fn predicates(err: &EngineError) -> [(&'static str, bool); 5] {
    [
        ("interrupted", err.is_interrupted()),
        ("fenced", err.is_fenced()),
        ("shutdown", err.is_shutdown()),
        ("lease_lapsed", err.is_lease_lapsed()),
        ("store_unavailable", err.is_store_unavailable()),
    ]
}

fn only(which: &str) -> [(&'static str, bool); 5] {
    [
        "interrupted",
        "fenced",
        "shutdown",
        "lease_lapsed",
        "store_unavailable",
    ]
    .map(|name| (name, name == "interrupted" || name == which))
}

/// Starts a saga whose step 1 waits on a gate, runs it on `engine` in a task, and returns
/// once the step is in flight.
async fn run_until_step_one(
    engine: &saga_core::Engine,
    gate: &Gate,
) -> (
    SagaId,
    tokio::task::JoinHandle<Result<saga_core::SagaOutcome, EngineError>>,
) {
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    let runner = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    gate.entered.notified().await;
    (id, runner)
}

#[tokio::test(start_paused = true)]
async fn a_fenced_lease_renewal_interrupts_the_run_as_fenced() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let plan = Plan::linear(3).with_all(|s| s.timeout = None);
    let engine = h.engine(plan);
    let (id, runner) = run_until_step_one(&engine, &gate).await;
    let before = engine.history(id).await.unwrap();

    // A restarted process of the same owner reclaims the saga: the fence moves on, and the
    // running attempt's next renewal is refused.
    h.store
        .claim(
            id,
            &ClaimRequest {
                owner: OWNER.into(),
                ttl: engine.config().lease_ttl,
            },
        )
        .await
        .unwrap();
    let err = runner.await.unwrap().unwrap_err();

    assert_eq!(predicates(&err), only("fenced"), "{err}");
    assert!(
        matches!(
            err.interruption(),
            Some(Interruption::Fenced { source }) if matches!(**source, StoreError::Fenced { .. })
        ),
        "{err:?}"
    );
    assert!(
        matches!(&err, EngineError::Interrupted { saga, .. } if *saga == id),
        "{err:?}"
    );
    let source = err.source().and_then(|cause| cause.source());
    assert!(
        source.is_some_and(|s| s.to_string().contains("write fenced")),
        "the store error is the cause's source: {source:?}"
    );
    assert_eq!(
        engine.history(id).await.unwrap().len(),
        before.len(),
        "the fenced run wrote nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_interrupts_the_run_as_shutting_down() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let engine = h.engine(Plan::linear(3));
    let (id, runner) = run_until_step_one(&engine, &gate).await;

    engine.begin_shutdown();
    gate.release.notify_one();
    let err = runner.await.unwrap().unwrap_err();

    assert_eq!(predicates(&err), only("shutdown"), "{err}");
    assert!(err.to_string().contains("shutting down"), "{err}");
    let stored = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(stored.lease, None, "the lease was released at shutdown");
    assert_eq!(stored.status, SagaStatus::Running);
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_cannot_be_renewed_interrupts_the_run_as_lapsed() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let plan = Plan::linear(3).with_all(|s| s.timeout = None);
    let link = Arc::new(CrashingStore::healthy(h.store.clone()));
    let engine = h.builder_on(link.clone(), plan).build().unwrap();
    let (_, runner) = run_until_step_one(&engine, &gate).await;

    // Every renewal fails from now on; paused time runs on to the end of the lease.
    link.crash_now();
    let err = runner.await.unwrap().unwrap_err();

    assert_eq!(predicates(&err), only("lease_lapsed"), "{err}");
    assert!(err.to_string().contains("lapsed"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_at_a_commit_interrupts_the_run_as_store_unavailable() {
    let h = Harness::new();
    let crashing = Arc::new(CrashingStore::after_commits(h.store.clone(), 1));
    let engine = h
        .builder_on(crashing.clone(), Plan::linear(3))
        .build()
        .unwrap();

    let err = engine
        .execute::<PlanSaga>(&0, StartOptions::key("outage"))
        .await
        .unwrap_err();

    assert!(crashing.crashed());
    assert_eq!(predicates(&err), only("store_unavailable"), "{err}");
    let store_error = err.interruption().and_then(Interruption::store_error);
    assert!(
        matches!(store_error, Some(StoreError::Unavailable { .. })),
        "{err:?}"
    );
}

#[test]
fn store_errors_outside_a_run_answer_the_predicates_too() {
    let unavailable = EngineError::Store(StoreError::Unavailable {
        message: "connection refused".into(),
        source: None,
    });
    assert!(unavailable.is_store_unavailable());
    assert!(!unavailable.is_interrupted());
    let fenced = EngineError::Store(StoreError::Fenced {
        saga: SagaId(uuid::Uuid::nil()),
        fence: 1,
        current_fence: 2,
        current_owner: None,
    });
    assert!(fenced.is_fenced());
    assert!(!fenced.is_store_unavailable());
}

#[tokio::test(start_paused = true)]
async fn the_coordinator_counts_interruptions_by_cause() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let plan = Plan::linear(3);
    let client = h.engine(plan.clone());
    let worker = h.builder(plan).owner("coordinator-a").build().unwrap();
    let watched = worker.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(
        Coordinator::new(worker)
            .shutdown_grace(Duration::from_secs(3600))
            .run(async {
                let _ = stopped.await;
            }),
    );
    client
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    gate.entered.notified().await;

    // The shutdown lets the step in flight finish; the run then stops at the next step.
    let _ = stop.send(());
    until("the coordinator began its shutdown", 10_000, || {
        watched.is_shutting_down()
    })
    .await;
    gate.release.notify_one();
    let report = coordinator.await.unwrap();

    assert_eq!(report.runs, 1, "{report:?}");
    assert_eq!(report.interrupted, 1, "{report:?}");
    assert_eq!(report.shut_down, 1, "{report:?}");
    assert_eq!(
        (report.fenced, report.lease_lapsed, report.store_unavailable),
        (0, 0, 0),
        "{report:?}"
    );
}
