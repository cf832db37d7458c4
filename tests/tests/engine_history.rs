//! The event history: the stored state is a fold over it, it ends with exactly one terminal
//! event, and workflow futures can move between threads.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use saga_core::{
    Engine, EventKind, FailureKind, RunOutcome, SagaId, SagaState, SagaStatus, StartOptions,
};
use saga_tests::{
    Behavior, Gate, Harness, Plan, PlanSaga, assert_fold_matches, count, fast_policy,
    single_terminal,
};

/// Checks the fold and the terminal event of a finished saga and returns its state.
///
/// The comparison is exact, `cancel_requested` included: a cancel request is appended to the
/// history by the store (not by the engine's commit), and `Engine::state` merges the store's
/// cancel flag into the stored state, so both sides agree even when the request arrived
/// after the state the engine last wrote was encoded.
async fn check(engine: &Engine, id: SagaId, status: SagaStatus) -> SagaState {
    let state = assert_fold_matches(engine, id).await;
    assert_eq!(state.status, status);
    let history = engine.history(id).await.unwrap();
    let terminal = single_terminal(&history);
    let expected = match status {
        SagaStatus::Completed => "SagaCompleted",
        SagaStatus::Compensated => "SagaCompensated",
        _ => "SagaFailed",
    };
    assert_eq!(terminal, expected);
    // Sequence numbers are the history positions, and time never goes backwards.
    for (i, event) in history.iter().enumerate() {
        assert_eq!(event.seq, i as u64);
    }
    assert!(
        history.windows(2).all(|w| w[0].at <= w[1].at),
        "timestamps go backwards"
    );
    assert_eq!(state.updated_at, history.last().unwrap().at);
    state
}

#[tokio::test(start_paused = true)]
async fn folded_history_equals_the_stored_state_for_every_ending() {
    // Completed, with retries, a timeout and a durable timer on the way.
    let h = Harness::new();
    h.script
        .forward(1, [Behavior::Transient, Behavior::Timeout, Behavior::Ok]);
    h.script.forward(
        2,
        [Behavior::RetryAfter(Duration::from_secs(30)), Behavior::Ok],
    );
    let engine = h
        .builder(Plan::linear(4))
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap();
    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    let state = check(&engine, outcome.id, SagaStatus::Completed).await;
    assert_eq!(state.output, outcome.output);
    assert!(state.resumes >= 1, "the durable timer resumed it");

    // Compensated after a permanent failure, with a retried compensation.
    let h = Harness::new();
    h.script.forward(3, [Behavior::Permanent]);
    h.script.compensate(1, [Behavior::Transient, Behavior::Ok]);
    let engine = h.engine(Plan::linear(4));
    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    check(&engine, outcome.id, SagaStatus::Compensated).await;

    // Compensated after a cancel that arrived mid-step.
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(2, [Behavior::WaitThenOk(gate.clone())]);
    let engine = h.engine(Plan::linear(4).with_all(|s| s.timeout = None));
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::key("c"))
        .await
        .unwrap()
        .id;
    let runner = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    gate.entered.notified().await;
    engine.cancel(id, "stop").await.unwrap();
    gate.release.notify_one();
    runner.await.unwrap().unwrap();
    let state = check(&engine, id, SagaStatus::Compensated).await;
    assert!(state.cancel_requested);

    // Failed: a compensation that gives up.
    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    h.script.compensate(0, vec![Behavior::Transient; 5]);
    let engine = h.engine(Plan::linear(3).with(0, |s| s.compensation_policy = fast_policy(2)));
    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    let state = check(&engine, outcome.id, SagaStatus::Failed).await;
    assert_eq!(state.failure.unwrap().0, FailureKind::CompensationFailed);

    // Not finished: the workflow diverged from its journal, so the saga is set aside with
    // its history intact and still folding to its state, and no terminal event.
    let h = Harness::new();
    h.script
        .forward(1, [Behavior::RetryAfter(Duration::from_secs(60))]);
    let timer = |plan| {
        h.builder(plan)
            .inline_wait_max(Duration::from_millis(100))
            .build()
            .unwrap()
    };
    let first = timer(Plan::linear(3));
    let id = first
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert!(matches!(
        first.run_once(id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    let changed = timer(Plan::of([0, 2, 1]));
    changed.run_to_end(id).await.unwrap_err();
    let state = assert_fold_matches(&changed, id).await;
    assert_eq!(state.status, SagaStatus::Running);
    let history = changed.history(id).await.unwrap();
    for terminal in ["SagaCompleted", "SagaCompensated", "SagaFailed"] {
        assert_eq!(
            count(&history, terminal),
            0,
            "no terminal event: {history:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn folding_a_prefix_gives_the_state_at_that_point() {
    let h = Harness::new();
    h.script.forward(
        1,
        [Behavior::RetryAfter(Duration::from_secs(60)), Behavior::Ok],
    );
    let engine = h
        .builder(Plan::linear(3))
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
    let waiting = assert_fold_matches(&engine, id).await;
    let prefix = engine.history(id).await.unwrap().len();

    engine.run_to_end(id).await.unwrap();

    let history = engine.history(id).await.unwrap();
    assert_eq!(
        SagaState::fold(id, &history[..prefix]).unwrap(),
        waiting,
        "history was rewritten"
    );
    assert!(matches!(history[0].kind, EventKind::SagaStarted { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync_clone::<Engine>();

    let h = Harness::new();
    let engine = h.engine(Plan::linear(3));
    let execute = engine.execute::<PlanSaga>(&1, StartOptions::default());
    assert_send(&execute);
    drop(execute);
    assert_send(&engine.run_to_end(SagaId::random()));
    assert_send(&engine.run_due(4));

    // And for real: a spawned task on a multi-threaded runtime.
    let spawned = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .execute::<PlanSaga>(&1, StartOptions::default())
                .await
        }
    });
    let outcome = spawned.await.unwrap().unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let due = tokio::spawn({
        let engine = engine.clone();
        async move {
            let id = engine
                .start_with::<PlanSaga>(&2, StartOptions::default())
                .await?
                .id;
            engine.run_due(10).await.map(|runs| (id, runs))
        }
    });
    let (id, runs) = due.await.unwrap().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].0, id);
    assert!(matches!(&runs[0].1, Ok(RunOutcome::Finished(o)) if o.status == SagaStatus::Completed));
}
