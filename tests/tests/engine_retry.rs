//! Retries: classification, attempt limits, backoff and retry-after, timeouts.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use saga_core::{
    CompensationReason, EventKind, GiveUpReason, Phase, SagaEvent, SagaStatus, StartOptions,
    StepStatus, Timestamp,
};
use saga_tests::{
    Behavior, Harness, Plan, PlanSaga, assert_fold_matches, count, fast_policy, single_terminal,
    started_attempts,
};

/// `(attempt, backoff_seconds, next_retry_at, at)` of every `StepAttemptFailed` at `position`.
fn attempt_failures(history: &[SagaEvent], position: u32) -> Vec<(u32, f64, Timestamp, Timestamp)> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepAttemptFailed {
                position: p,
                attempt,
                backoff_seconds,
                next_retry_at,
                ..
            } if *p == position => Some((*attempt, *backoff_seconds, *next_retry_at, e.at)),
            _ => None,
        })
        .collect()
}

/// `(attempt, at)` of every `StepStarted` at `position`.
fn starts(history: &[SagaEvent], position: u32) -> Vec<(u32, Timestamp)> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepStarted {
                position: p,
                attempt,
                ..
            } if *p == position => Some((*attempt, e.at)),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn permanent_error_fails_the_step_at_once() {
    let h = Harness::new();
    h.script.forward(1, [Behavior::Permanent, Behavior::Ok]);
    let plan = Plan::linear(3).with(1, |s| s.policy = fast_policy(5));
    let engine = h.engine(plan);

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(
        h.ledger.calls_of(1, Phase::Forward).len(),
        1,
        "a permanent error is not retried"
    );
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(count(&history, "StepAttemptFailed"), 0);
    assert_eq!(started_attempts(&history, 1), [1]);
    let failed = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::StepFailed {
                position,
                attempt,
                reason,
                error,
                ..
            } => Some((*position, *attempt, *reason, error.class.is_transient())),
            _ => None,
        })
        .unwrap();
    assert_eq!(failed, (1, 1, GiveUpReason::Permanent, false));
    assert!(h.ledger.calls_of(2, Phase::Forward).is_empty());
    assert_fold_matches(&engine, outcome.id).await;
}

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_with_the_same_key() {
    let h = Harness::new();
    h.script
        .forward(1, [Behavior::Transient, Behavior::Transient, Behavior::Ok]);
    let engine = h.engine(Plan::linear(3));

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Completed);
    let calls = h.ledger.calls_of(1, Phase::Forward);
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(
        calls.iter().all(|c| c.key == calls[0].key),
        "one idempotency key for every attempt"
    );
    assert_eq!(h.ledger.effect_count(Phase::Forward, &calls[0].key), 1);

    let history = engine.history(outcome.id).await.unwrap();
    // fast_policy: 10 ms, then 20 ms, no jitter.
    let failures = attempt_failures(&history, 1);
    let backoffs: Vec<(u32, f64)> = failures.iter().map(|f| (f.0, f.1)).collect();
    assert_eq!(backoffs, [(1, 0.01), (2, 0.02)]);
    for (attempt, backoff, next_retry_at, at) in &failures {
        assert_eq!(*next_retry_at, at.plus(Duration::from_secs_f64(*backoff)));
        let (_, next_start) = starts(&history, 1)[*attempt as usize];
        assert!(
            next_start >= *next_retry_at,
            "attempt {} started before its retry time",
            attempt + 1
        );
    }
    let state = assert_fold_matches(&engine, outcome.id).await;
    assert_eq!(state.journal[1].attempts, 3);
    assert_eq!(state.journal[1].status, StepStatus::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn permanent_error_after_transient_ones_stops_retrying() {
    let h = Harness::new();
    h.script
        .forward(0, [Behavior::Transient, Behavior::Permanent, Behavior::Ok]);
    let plan = Plan::linear(2).with(0, |s| s.policy = fast_policy(5));
    let engine = h.engine(plan);

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(h.ledger.calls_of(0, Phase::Forward).len(), 2);
    assert!(
        h.ledger.effects().is_empty(),
        "nothing was applied, so nothing is undone"
    );
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(started_attempts(&history, 0), [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_is_respected_then_the_saga_compensates() {
    let h = Harness::new();
    h.script.forward(2, vec![Behavior::Transient; 10]);
    let plan = Plan::linear(4).with(2, |s| s.policy = fast_policy(3));
    let engine = h.engine(plan);

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(matches!(
        &outcome.compensation_reason,
        Some(CompensationReason::StepFailed {
            position: 2,
            reason: GiveUpReason::AttemptsExhausted,
            ..
        })
    ));
    let attempts: Vec<u32> = h
        .ledger
        .calls_of(2, Phase::Forward)
        .iter()
        .map(|c| c.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3]);
    let undone: Vec<usize> = h
        .ledger
        .effects_in(Phase::Compensate)
        .iter()
        .map(|e| e.step)
        .collect();
    assert_eq!(undone, [1, 0]);

    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(
        attempt_failures(&history, 2).len(),
        2,
        "the last failure is StepFailed, not a retry"
    );
    let last = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::StepFailed {
                attempt, reason, ..
            } => Some((*attempt, *reason)),
            _ => None,
        })
        .unwrap();
    assert_eq!(last, (3, GiveUpReason::AttemptsExhausted));
    assert_eq!(single_terminal(&history), "SagaCompensated");
    let state = assert_fold_matches(&engine, outcome.id).await;
    assert_eq!(state.journal[2].attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn single_attempt_policy_never_retries() {
    let h = Harness::new();
    h.script.forward(0, [Behavior::Transient, Behavior::Ok]);
    let plan = Plan::linear(1).with(0, |s| s.policy = saga_core::RetryPolicy::no_retry());
    let engine = h.engine(plan);
    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(h.ledger.calls_of(0, Phase::Forward).len(), 1);
}

async fn check_retry_after(inline_wait_max: Duration, hint: Duration) {
    let h = Harness::new();
    h.script
        .forward(1, [Behavior::RetryAfter(hint), Behavior::Ok]);
    // The policy alone would wait 10 ms; the server said to wait `hint`.
    let engine = h
        .builder(Plan::linear(3))
        .inline_wait_max(inline_wait_max)
        .build()
        .unwrap();

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Completed);
    let history = engine.history(outcome.id).await.unwrap();
    let failures = attempt_failures(&history, 1);
    assert_eq!(failures.len(), 1);
    let (attempt, backoff_seconds, next_retry_at, failed_at) = failures[0];
    assert_eq!(attempt, 1);
    assert!(
        (backoff_seconds - hint.as_secs_f64()).abs() < 1e-9,
        "backoff {backoff_seconds}"
    );
    assert_eq!(next_retry_at, failed_at.plus(hint));
    let second = starts(&history, 1)[1];
    assert_eq!(second.0, 2);
    assert!(
        second.1 >= failed_at.plus(hint),
        "attempt 2 at {} before {}",
        second.1,
        failed_at.plus(hint)
    );
    // The same on tokio's clock, as the step saw it.
    let calls = h.ledger.calls_of(1, Phase::Forward);
    assert!(calls[1].at - calls[0].at >= hint);
    assert_fold_matches(&engine, outcome.id).await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_when_slept_in_process() {
    check_retry_after(Duration::from_secs(10), Duration::from_secs(7)).await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_through_a_durable_timer() {
    check_retry_after(Duration::from_millis(100), Duration::from_secs(45)).await;
}

#[tokio::test(start_paused = true)]
async fn timeout_counts_as_transient() {
    let h = Harness::new();
    h.script.forward(1, [Behavior::Timeout, Behavior::Ok]);
    let plan = Plan::linear(3).with(1, |s| s.timeout = Some(Duration::from_secs(2)));
    let engine = h.engine(plan);

    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(outcome.status, SagaStatus::Completed);
    let calls = h.ledger.calls_of(1, Phase::Forward);
    assert_eq!(
        calls
            .iter()
            .map(|c| (c.attempt, c.behavior))
            .collect::<Vec<_>>(),
        [(1, "timeout"), (2, "ok")]
    );
    assert!(
        calls[1].at - calls[0].at >= Duration::from_secs(2),
        "the attempt ran until its timeout"
    );
    assert!(
        calls[1].at - calls[0].at < Duration::from_secs(3600),
        "and no longer"
    );
    let effects = h.ledger.effects_of(1, Phase::Forward);
    assert_eq!(effects.len(), 1);
    assert_eq!(
        effects[0].attempt, 2,
        "the timed-out attempt was cancelled before its effect"
    );

    let history = engine.history(outcome.id).await.unwrap();
    let error = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::StepAttemptFailed {
                position: 1, error, ..
            } => Some(error.clone()),
            _ => None,
        })
        .unwrap();
    assert!(error.timeout);
    assert!(error.class.is_transient());
    assert!(error.message.contains("timed out"), "{}", error.message);
    assert_fold_matches(&engine, outcome.id).await;
}

#[tokio::test(start_paused = true)]
async fn repeated_timeouts_exhaust_the_policy() {
    let h = Harness::new();
    h.script.forward(0, vec![Behavior::Timeout; 5]);
    let plan = Plan::linear(1).with(0, |s| s.policy = fast_policy(2));
    let engine = h.engine(plan);
    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(matches!(
        &outcome.compensation_reason,
        Some(CompensationReason::StepFailed {
            reason: GiveUpReason::AttemptsExhausted,
            ..
        })
    ));
    assert_eq!(h.ledger.calls_of(0, Phase::Forward).len(), 2);
    assert!(h.ledger.effects().is_empty());
}
