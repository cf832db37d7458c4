//! A cancel wakes a run that waits for its next attempt: an in-process backoff, or an
//! `execute` sleeping through a durable timer, compensates at once instead of at the retry
//! time. Paused tokio time: the clock only moves while every task waits, so "it ended before
//! the retry time" is an assertion on the virtual clock, not on wall time.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use saga_core::{
    CancelOutcome, Engine, EventKind, Jitter, Phase, RetryPolicy, SagaEvent, SagaId, SagaStatus,
    StartOptions, Timestamp,
};
use saga_tests::{Behavior, Harness, Plan, PlanSaga, assert_fold_matches, compensated_positions};

/// A backoff far longer than anything the test waits for.
const LONG: Duration = Duration::from_secs(3600);

/// Retries after exactly `delay`, with budget to spare.
fn slow_policy(delay: Duration) -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(5)
        .with_initial_delay(delay)
        .with_max_delay(delay)
        .with_max_elapsed(delay * 10)
        .with_jitter(Jitter::None)
}

/// Step 0 succeeds; step 1 fails transiently once, then would succeed after `delay`.
fn plan(h: &Harness, delay: Duration) -> Plan {
    h.script.forward(1, [Behavior::Transient, Behavior::Ok]);
    Plan::linear(3).with(1, |s| s.policy = slow_policy(delay))
}

/// The `next_retry_at` of step 1's first failed attempt, once the history holds it.
async fn first_retry_time(engine: &Engine, id: SagaId) -> Timestamp {
    for _ in 0..10_000 {
        if let Ok(history) = engine.history(id).await
            && let Some(at) = history.iter().find_map(|e| match &e.kind {
                EventKind::StepAttemptFailed {
                    position: 1,
                    next_retry_at,
                    ..
                } => Some(*next_retry_at),
                _ => None,
            })
        {
            return at;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("step 1 never recorded a failed attempt");
}

/// Starts `execute` of the plan saga in a task, keyed so the test knows its id.
fn spawn_execute(
    engine: &Engine,
    key: &str,
) -> (SagaId, tokio::task::JoinHandle<saga_core::SagaOutcome>) {
    let id = SagaId::from_idempotency_key("scripted", key);
    let runner = engine.clone();
    let options = StartOptions::key(key);
    let task = tokio::spawn(async move {
        runner
            .execute::<PlanSaga>(&0, options)
            .await
            .expect("execute ends")
    });
    (id, task)
}

/// Asserts the saga compensated step 0 without retrying step 1, and that nothing (not the
/// clock, not one event) reached the retry time.
async fn assert_compensated_before(h: &Harness, engine: &Engine, id: SagaId, retry_at: Timestamp) {
    assert!(
        h.now() < retry_at,
        "the clock reached the retry time {retry_at}: the cancel did not wake the wait"
    );
    let history: Vec<SagaEvent> = engine.history(id).await.unwrap();
    assert!(
        history.iter().all(|e| e.at < retry_at),
        "every event precedes the retry time {retry_at}"
    );
    assert!(
        history
            .iter()
            .any(|e| matches!(e.kind, EventKind::CancelRequested { .. })),
        "the cancel is recorded"
    );
    assert_eq!(compensated_positions(&history), [0]);
    assert_eq!(
        h.ledger.calls_of(1, Phase::Forward).len(),
        1,
        "step 1 is not attempted again after the cancel"
    );
    assert_fold_matches(engine, id).await;
}

#[tokio::test(start_paused = true)]
async fn cancel_wakes_execute_sleeping_through_a_durable_timer() {
    let h = Harness::new();
    // The default inline_wait_max (1 s) makes an hour's backoff a durable timer.
    let engine = h.engine(plan(&h, LONG));
    let (id, task) = spawn_execute(&engine, "durable");
    let retry_at = first_retry_time(&engine, id).await;

    assert_eq!(
        engine.cancel(id, "the deal fell through").await.unwrap(),
        CancelOutcome::Requested
    );
    let outcome = task.await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_compensated_before(&h, &engine, id, retry_at).await;
}

#[tokio::test(start_paused = true)]
async fn cancel_wakes_an_in_process_backoff() {
    let h = Harness::new();
    let delay = Duration::from_secs(8);
    // An 8 s backoff slept in process, holding the lease (30 s).
    let engine = h
        .builder(plan(&h, delay))
        .inline_wait_max(Duration::from_secs(10))
        .build()
        .unwrap();
    let (id, task) = spawn_execute(&engine, "inline");
    let retry_at = first_retry_time(&engine, id).await;

    engine.cancel(id, "the deal fell through").await.unwrap();
    let outcome = task.await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_compensated_before(&h, &engine, id, retry_at).await;
    let history = engine.history(id).await.unwrap();
    let runs = history
        .iter()
        .filter(|e| matches!(e.kind, EventKind::LeaseAcquired { .. }))
        .count();
    assert_eq!(runs, 1, "the in-process wait kept its lease: one run");
}

#[tokio::test(start_paused = true)]
async fn cancel_from_another_engine_wakes_a_durable_timer() {
    let h = Harness::new();
    let engine = h.engine(plan(&h, LONG));
    // Another process on the same store: its cancel reaches the sleeping run only through
    // the store's wake-up signal.
    let other = h
        .builder(Plan::linear(3))
        .owner("operator-console")
        .build()
        .unwrap();
    let (id, task) = spawn_execute(&engine, "cross");
    let retry_at = first_retry_time(&engine, id).await;

    assert_eq!(
        other
            .cancel(id, "cancelled from the console")
            .await
            .unwrap(),
        CancelOutcome::Requested
    );
    let outcome = task.await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_compensated_before(&h, &engine, id, retry_at).await;
}

#[tokio::test(start_paused = true)]
async fn a_cancel_of_another_saga_does_not_wake_the_wait() {
    let h = Harness::new();
    let engine = h.engine(plan(&h, Duration::from_secs(60)));
    let (id, task) = spawn_execute(&engine, "kept");
    let retry_at = first_retry_time(&engine, id).await;
    // Started without a coordinator, it never runs: it only needs to exist and be cancelled.
    let bystander = engine
        .start_with::<PlanSaga>(&1, StartOptions::key("bystander"))
        .await
        .unwrap();
    engine.cancel(bystander.id, "not this one").await.unwrap();

    let outcome = task.await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Completed);
    assert!(h.now() >= retry_at, "the wait ran to its retry time");
    assert_eq!(h.ledger.calls_of(1, Phase::Forward).len(), 2);
}
