//! Compensation: exact reverse order, compensation modes, failing compensations, cancel.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use saga_core::Compensation;
use saga_core::store::CancelOutcome;
use saga_core::{
    CompensationReason, CompensationStatus, EventKind, FailureKind, GiveUpReason, Phase,
    SagaStatus, StartOptions, StepStatus,
};
use saga_tests::{
    Behavior, Gate, Harness, Plan, PlanSaga, assert_fold_matches, compensated_positions, count,
    fast_policy, single_terminal, skipped_positions,
};

#[tokio::test(start_paused = true)]
async fn permanent_failure_compensates_completed_steps_in_reverse_order() {
    let h = Harness::new();
    h.script.forward(3, [Behavior::Permanent]);
    let engine = h.engine(Plan::linear(4));

    let outcome = engine
        .execute::<PlanSaga>(&10, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(
        matches!(
            &outcome.compensation_reason,
            Some(CompensationReason::StepFailed { position: 3, reason: GiveUpReason::Permanent, step, .. })
                if step == "step_d"
        ),
        "{:?}",
        outcome.compensation_reason
    );
    // The effects: forward 0,1,2 once each, then their undo 2,1,0, each with its output.
    let forward: Vec<usize> = h
        .ledger
        .effects_in(Phase::Forward)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(forward, [0, 1, 2]);
    let undone: Vec<usize> = h
        .ledger
        .effects_in(Phase::Compensate)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(undone, [2, 1, 0]);
    for call in h
        .ledger
        .calls()
        .iter()
        .filter(|c| c.phase == Phase::Compensate)
    {
        assert_eq!(call.had_output, Some(true), "{call:?}");
    }
    // Compensation keys are per step, distinct from the forward keys.
    for step in 0..3 {
        let forward_key = &h.ledger.effects_of(step, Phase::Forward)[0].key;
        let undo_key = &h.ledger.effects_of(step, Phase::Compensate)[0].key;
        assert_ne!(forward_key, undo_key);
    }

    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(compensated_positions(&history), [2, 1, 0]);
    assert_eq!(
        skipped_positions(&history),
        [3],
        "the failed step had no effect to undo"
    );
    assert_eq!(count(&history, "CompensationStarted"), 1);
    assert_eq!(single_terminal(&history), "SagaCompensated");
    // CompensationStarted comes after the failure and before the first undo.
    let pos = |name: &str| history.iter().position(|e| e.kind.name() == name).unwrap();
    assert!(pos("StepFailed") < pos("CompensationStarted"));
    assert!(pos("CompensationStarted") < pos("StepCompensated"));

    let state = assert_fold_matches(&engine, outcome.id).await;
    assert_eq!(state.status, SagaStatus::Compensated);
    assert_eq!(state.journal[3].status, StepStatus::Failed);
    for record in &state.journal[..3] {
        assert_eq!(record.status, StepStatus::Succeeded);
        assert_eq!(
            record.compensation.as_ref().unwrap().status,
            CompensationStatus::Done
        );
    }
    assert_eq!(
        state.journal[3].compensation.as_ref().unwrap().status,
        CompensationStatus::Skipped
    );
}

#[tokio::test(start_paused = true)]
async fn always_step_that_fails_is_compensated_without_output() {
    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    let plan = Plan::linear(4).with(2, |s| s.compensation = Compensation::Always);
    let engine = h.engine(plan);

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    let undo: Vec<(usize, Option<bool>)> = h
        .ledger
        .calls()
        .iter()
        .filter(|c| c.phase == Phase::Compensate)
        .map(|c| (c.step, c.had_output))
        .collect();
    assert_eq!(undo, [(2, Some(false)), (1, Some(true)), (0, Some(true))]);
    assert!(
        h.ledger.calls_of(3, Phase::Forward).is_empty(),
        "no step after the failure runs"
    );
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(compensated_positions(&history), [2, 1, 0]);
    assert!(skipped_positions(&history).is_empty());
    assert_eq!(single_terminal(&history), "SagaCompensated");
}

#[tokio::test(start_paused = true)]
async fn step_without_compensation_is_skipped() {
    let h = Harness::new();
    h.script.forward(3, [Behavior::Permanent]);
    let plan = Plan::linear(4).with(1, |s| s.compensation = Compensation::None);
    let engine = h.engine(plan);

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(
        h.ledger.calls_of(1, Phase::Compensate).is_empty(),
        "a pivot is never undone"
    );
    let undone: Vec<usize> = h
        .ledger
        .effects_in(Phase::Compensate)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(undone, [2, 0]);
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(compensated_positions(&history), [2, 0]);
    assert_eq!(skipped_positions(&history), [3, 1]);
    let why = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::CompensationSkipped {
                position: 1, why, ..
            } => Some(why.clone()),
            _ => None,
        })
        .unwrap();
    assert!(why.contains("no compensation"), "{why}");
    let state = assert_fold_matches(&engine, outcome.id).await;
    let pivot = state.journal[1].compensation.as_ref().unwrap();
    assert_eq!(pivot.status, CompensationStatus::Skipped);
    assert_eq!(pivot.attempts, 0);
}

#[tokio::test(start_paused = true)]
async fn permanently_failing_compensation_ends_failed() {
    let h = Harness::new();
    h.script.forward(3, [Behavior::Permanent]);
    h.script.compensate(2, [Behavior::Permanent]);
    let engine = h.engine(Plan::linear(4));

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Failed);
    let (kind, error) = outcome.failure.clone().unwrap();
    assert_eq!(kind, FailureKind::CompensationFailed);
    assert!(
        error.contains("step_c") && error.contains("rejected"),
        "{error}"
    );
    // One attempt (permanent), and the saga stops there: stuck, for an operator.
    assert_eq!(h.ledger.calls_of(2, Phase::Compensate).len(), 1);
    assert!(h.ledger.calls_of(1, Phase::Compensate).is_empty());
    assert!(h.ledger.calls_of(0, Phase::Compensate).is_empty());

    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(count(&history, "SagaCompensated"), 0);
    assert_eq!(single_terminal(&history), "SagaFailed");
    let failed = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::CompensationAttemptFailed {
                position,
                attempt,
                error,
                ..
            } => Some((*position, *attempt, error.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!((failed.0, failed.1), (2, 1));
    assert!(!failed.2.class.is_transient());

    let state = assert_fold_matches(&engine, outcome.id).await;
    assert_eq!(state.status, SagaStatus::Failed);
    assert_eq!(state.failure, outcome.failure);
    let undo = state.journal[2].compensation.as_ref().unwrap();
    assert_eq!(
        undo.status,
        CompensationStatus::Failed,
        "gave up: it needs an operator"
    );
    assert!(undo.error.is_some());
    // A failed saga is terminal: running it again changes nothing.
    let again = engine.run_to_end(outcome.id).await.unwrap();
    assert_eq!(again.status, SagaStatus::Failed);
    assert_eq!(
        engine.history(outcome.id).await.unwrap().len(),
        history.len()
    );
}

#[tokio::test(start_paused = true)]
async fn compensation_that_exhausts_its_policy_ends_failed() {
    let h = Harness::new();
    h.script.forward(3, [Behavior::Permanent]);
    h.script.compensate(1, vec![Behavior::Transient; 10]);
    let plan = Plan::linear(4).with(1, |s| s.compensation_policy = fast_policy(3));
    let engine = h.engine(plan);

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Failed);
    assert_eq!(
        outcome.failure.as_ref().unwrap().0,
        FailureKind::CompensationFailed
    );
    let attempts: Vec<u32> = h
        .ledger
        .calls_of(1, Phase::Compensate)
        .iter()
        .map(|c| c.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(
        h.ledger.effects_of(2, Phase::Compensate).len(),
        1,
        "step 2 was undone first"
    );
    assert!(h.ledger.calls_of(0, Phase::Compensate).is_empty());
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(count(&history, "CompensationAttemptFailed"), 3);
    assert_eq!(single_terminal(&history), "SagaFailed");
    assert_fold_matches(&engine, outcome.id).await;
}

#[tokio::test(start_paused = true)]
async fn transient_compensation_failures_are_retried_until_done() {
    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    h.script
        .compensate(0, [Behavior::Transient, Behavior::Timeout, Behavior::Ok]);
    let engine = h.engine(Plan::linear(3));

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    let attempts: Vec<u32> = h
        .ledger
        .calls_of(0, Phase::Compensate)
        .iter()
        .map(|c| c.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(h.ledger.effects_of(0, Phase::Compensate).len(), 1);
    let history = engine.history(outcome.id).await.unwrap();
    let timeouts: Vec<bool> = history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::CompensationAttemptFailed { error, .. } => Some(error.timeout),
            _ => None,
        })
        .collect();
    assert_eq!(timeouts, [false, true]);
    assert_fold_matches(&engine, outcome.id).await;
}

#[tokio::test(start_paused = true)]
async fn workflow_abort_compensates() {
    // A workflow that returns its own error after two steps: both are undone.
    struct Aborting;

    impl saga_core::Saga for Aborting {
        type Input = u32;
        type Output = ();
        const NAME: &'static str = "aborting";

        async fn run(
            &self,
            saga: &mut saga_core::SagaContext,
            input: u32,
        ) -> Result<(), saga_core::SagaError> {
            saga.run(saga_tests::Scripted::<0>::default(), input)
                .await?;
            saga.run(saga_tests::Scripted::<1>::default(), input)
                .await?;
            Err(saga_core::SagaError::abort(
                "deal rejected by the committee",
            ))
        }
    }

    let h = Harness::new();
    let engine = h
        .builder(Plan::default())
        .register(Aborting)
        .build()
        .unwrap();
    let outcome = engine
        .execute::<Aborting>(&1, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(matches!(
        &outcome.compensation_reason,
        Some(CompensationReason::Aborted { message }) if message.contains("committee")
    ));
    let undone: Vec<usize> = h
        .ledger
        .effects_in(Phase::Compensate)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(undone, [1, 0]);
    assert_fold_matches(&engine, outcome.id).await;
}

#[tokio::test(start_paused = true)]
async fn cancel_while_a_step_is_blocked_compensates_what_completed() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let engine = h.engine(Plan::linear(4).with_all(|s| s.timeout = None));
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
    // Step 1 is in the middle of its forward action: cancel from this other task.
    assert_eq!(
        engine.cancel(id, "customer withdrew").await.unwrap(),
        CancelOutcome::Requested
    );
    gate.release.notify_one();
    let outcome = runner.await.unwrap().unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(
        matches!(&outcome.compensation_reason, Some(CompensationReason::Cancelled { reason }) if reason == "customer withdrew"),
        "{:?}",
        outcome.compensation_reason
    );
    // Step 1 finished its effect after the cancel arrived, so it is undone too; step 2 never
    // ran; step 3 was never reached.
    let forward: Vec<usize> = h
        .ledger
        .effects_in(Phase::Forward)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(forward, [0, 1]);
    assert!(h.ledger.calls_of(2, Phase::Forward).is_empty());
    let undone: Vec<usize> = h
        .ledger
        .effects_in(Phase::Compensate)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(undone, [1, 0]);

    let history = engine.history(id).await.unwrap();
    assert_eq!(count(&history, "CancelRequested"), 1);
    assert_eq!(compensated_positions(&history), [1, 0]);
    assert_eq!(single_terminal(&history), "SagaCompensated");
    let state = assert_fold_matches(&engine, id).await;
    assert!(state.cancel_requested);
    // A cancel after the end is refused.
    assert_eq!(
        engine.cancel(id, "too late").await.unwrap(),
        CancelOutcome::AlreadyFinished(SagaStatus::Compensated)
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_of_a_suspended_saga_compensates_on_its_next_run() {
    let h = Harness::new();
    // Step 2 is rate limited for a minute: a durable timer, the saga is released.
    h.script.forward(
        2,
        [Behavior::RetryAfter(std::time::Duration::from_secs(60))],
    );
    let engine = h
        .builder(Plan::linear(4))
        .inline_wait_max(std::time::Duration::from_millis(100))
        .build()
        .unwrap();
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    let first = engine.run_once(id).await.unwrap();
    assert!(
        matches!(first, saga_core::RunOutcome::Suspended(_)),
        "{first:?}"
    );

    assert_eq!(
        engine.cancel(id, "operator").await.unwrap(),
        CancelOutcome::Requested
    );
    let started = tokio::time::Instant::now();
    let outcome = engine.run_to_end(id).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(matches!(
        &outcome.compensation_reason,
        Some(CompensationReason::Cancelled { reason }) if reason == "operator"
    ));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "a cancel does not wait for the timer"
    );
    assert_eq!(
        h.ledger.calls_of(2, Phase::Forward).len(),
        1,
        "no retry after the cancel"
    );
    let undone: Vec<usize> = h
        .ledger
        .effects_in(Phase::Compensate)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(undone, [1, 0]);
    let history = engine.history(id).await.unwrap();
    assert_eq!(
        skipped_positions(&history),
        [2],
        "the retrying step never applied its effect"
    );
    assert_eq!(single_terminal(&history), "SagaCompensated");
    assert_fold_matches(&engine, id).await;
}

#[tokio::test(start_paused = true)]
async fn cancel_between_attempts_still_undoes_an_always_step() {
    let h = Harness::new();
    // Attempt 1 of step 1 times out at 1 s (its effect may be half done); attempt 2 is due
    // 10 ms later. The cancel lands in between.
    h.script.forward(1, [Behavior::Timeout, Behavior::Ok]);
    let plan = Plan::linear(3).with(1, |s| {
        s.compensation = Compensation::Always;
        s.timeout = Some(std::time::Duration::from_secs(1));
    });
    let engine = h.engine(plan);
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    let runner = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    // Paused time makes this exact: 1005 ms of virtual time lands after attempt 1's timeout
    // (1 s) and before attempt 2 (due 10 ms after it); the assertion below checks it.
    tokio::time::sleep(std::time::Duration::from_millis(1005)).await;
    assert_eq!(h.ledger.calls_of(1, Phase::Forward).len(), 1);
    engine.cancel(id, "operator").await.unwrap();
    let outcome = runner.await.unwrap().unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(
        h.ledger.calls_of(1, Phase::Forward).len(),
        1,
        "attempt 2 never ran"
    );
    // Step 1 declares Always and an attempt of it did run: it is undone without output.
    let undo: Vec<(usize, Option<bool>)> = h
        .ledger
        .calls()
        .iter()
        .filter(|c| c.phase == Phase::Compensate)
        .map(|c| (c.step, c.had_output))
        .collect();
    assert_eq!(undo, [(1, Some(false)), (0, Some(true))]);
    assert_fold_matches(&engine, id).await;
}

#[tokio::test(start_paused = true)]
async fn cancel_before_a_step_first_runs_skips_it() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(0, [Behavior::WaitThenOk(gate.clone())]);
    let plan = Plan::linear(3).with_all(|s| {
        s.compensation = Compensation::Always;
        s.timeout = None;
    });
    let engine = h.engine(plan);
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
    engine.cancel(id, "operator").await.unwrap();
    gate.release.notify_one();
    let outcome = runner.await.unwrap().unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    // Step 1's start was committed together with the cancel, so it never ran: even an
    // Always step has nothing to undo then.
    assert!(h.ledger.calls_of(1, Phase::Forward).is_empty());
    assert!(h.ledger.calls_of(1, Phase::Compensate).is_empty());
    let history = engine.history(id).await.unwrap();
    assert_eq!(skipped_positions(&history), [1]);
    assert_eq!(compensated_positions(&history), [0]);
}
