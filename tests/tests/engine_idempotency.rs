//! Idempotency: idempotent start, and the idempotency guard on its own and inside a step.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use saga_core::{
    Compensation, EngineError, GuardError, IdempotencyGuard, MemoryStore, Phase, RunOutcome, Saga,
    SagaContext, SagaError, SagaStatus, SagaStore, StartOptions, Step, StepContext,
};
use saga_tests::{Behavior, Gate, Harness, Plan, PlanSaga, ScriptError, assert_fold_matches};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(start_paused = true)]
async fn same_key_same_input_returns_the_existing_saga_without_a_second_run() {
    let h = Harness::new();
    let engine = h.engine(Plan::linear(3));

    let first = engine
        .execute::<PlanSaga>(&7, StartOptions::key("deal-42"))
        .await
        .unwrap();
    assert_eq!(first.status, SagaStatus::Completed);
    let history = engine.history(first.id).await.unwrap();

    let again = engine
        .start_with::<PlanSaga>(&7, StartOptions::key("deal-42"))
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    assert!(!again.created);
    let repeat = engine
        .execute::<PlanSaga>(&7, StartOptions::key("deal-42"))
        .await
        .unwrap();
    assert_eq!(
        repeat, first,
        "a repeated execute returns the recorded outcome"
    );

    for step in 0..3 {
        assert_eq!(
            h.ledger.calls_of(step, Phase::Forward).len(),
            1,
            "step {step} ran again"
        );
    }
    assert_eq!(
        engine.history(first.id).await.unwrap(),
        history,
        "nothing was appended"
    );

    // Another key is another saga.
    let other = engine
        .start_with::<PlanSaga>(&7, StartOptions::key("deal-43"))
        .await
        .unwrap();
    assert!(other.created);
    assert_ne!(other.id, first.id);
}

#[tokio::test(start_paused = true)]
async fn same_key_different_input_is_a_conflict() {
    let h = Harness::new();
    let engine = h.engine(Plan::linear(2));
    let first = engine
        .start_with::<PlanSaga>(&7, StartOptions::key("deal-42"))
        .await
        .unwrap();
    assert!(first.created);

    let conflict = engine
        .start_with::<PlanSaga>(&8, StartOptions::key("deal-42"))
        .await;
    match conflict {
        Err(EngineError::IdempotencyConflict { saga, key }) => {
            assert_eq!(saga, first.id);
            assert_eq!(key, "deal-42");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let conflict = engine
        .execute::<PlanSaga>(&8, StartOptions::key("deal-42"))
        .await;
    assert!(
        matches!(conflict, Err(EngineError::IdempotencyConflict { .. })),
        "{conflict:?}"
    );
    assert!(h.ledger.calls().is_empty(), "a conflict runs nothing");
    // The original saga is untouched and still runs with its own input.
    let outcome = engine.run_to_end(first.id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let inputs: Vec<u32> = outcome
        .output::<Vec<saga_tests::StepOutput>>()
        .unwrap()
        .unwrap()
        .iter()
        .map(|o| o.input)
        .collect();
    assert_eq!(inputs, [7, 8]);
}

#[tokio::test(start_paused = true)]
async fn repeated_start_of_a_waiting_saga_does_not_run_it_again() {
    let h = Harness::new();
    h.script
        .forward(1, [Behavior::RetryAfter(Duration::from_secs(60))]);
    let engine = h
        .builder(Plan::linear(3))
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap();
    let started = engine
        .start_with::<PlanSaga>(&1, StartOptions::key("k"))
        .await
        .unwrap();
    assert!(matches!(
        engine.run_once(started.id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));

    let again = engine
        .start_with::<PlanSaga>(&1, StartOptions::key("k"))
        .await
        .unwrap();
    assert_eq!((again.id, again.created), (started.id, false));
    assert_eq!(
        h.ledger.calls().len(),
        2,
        "step 0 once, step 1's first attempt once"
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_duplicate_execute_runs_the_saga_once() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let engine = h.engine(Plan::linear(3).with_all(|s| s.timeout = None));
    let execute = || {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .execute::<PlanSaga>(&3, StartOptions::key("dup"))
                .await
        })
    };

    let first = execute();
    gate.entered.notified().await;
    // The same request again (a client retry) while step 1 is in flight in this process.
    let second = execute();
    // Paused time: the clock only advances once every task is blocked, so after this the
    // duplicate has deterministically reached its wait for the local run (not a race).
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.release.notify_one();
    let first = first.await.unwrap();
    let second = second.await.unwrap();

    let first = first.expect("the first caller gets its outcome");
    let second = second.expect("the duplicate caller gets the same outcome");
    assert_eq!(first, second);
    assert_eq!(first.status, SagaStatus::Completed);
    assert_eq!(
        h.ledger.calls_of(1, Phase::Forward).len(),
        1,
        "step 1 ran twice at once"
    );
    assert_fold_matches(&engine, first.id).await;
}

#[tokio::test(start_paused = true)]
async fn run_to_end_of_a_saga_this_engine_is_running_waits_for_that_run() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let engine = h.engine(Plan::linear(3).with_all(|s| s.timeout = None));
    let id = engine
        .start_with::<PlanSaga>(&3, StartOptions::default())
        .await
        .unwrap()
        .id;
    let worker = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    gate.entered.notified().await;
    // Someone in the same process waits for the outcome the same way.
    let waiter = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    // Paused time: the clock only advances once every task is blocked, so after this the
    // waiter has deterministically reached its wait for the local run (not a race).
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.release.notify_one();

    let worker = worker
        .await
        .unwrap()
        .expect("the running worker is not fenced by its own process");
    let waiter = waiter.await.unwrap().unwrap();
    assert_eq!(worker, waiter);
    assert_eq!(worker.status, SagaStatus::Completed);
    assert_eq!(h.ledger.calls_of(1, Phase::Forward).len(), 1);
}

fn guard() -> IdempotencyGuard {
    IdempotencyGuard::new(Arc::new(MemoryStore::new()))
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(start_paused = true)]
async fn guard_runs_an_effect_once_and_returns_the_recorded_result() {
    let guard = guard();
    let runs = AtomicU32::new(0);
    let effect = || async { Ok::<u32, ScriptError>(100 + runs.fetch_add(1, Ordering::SeqCst)) };
    let first = guard
        .once("charge-1", &"card-9", HOUR, effect)
        .await
        .unwrap();
    let second = guard
        .once("charge-1", &"card-9", HOUR, effect)
        .await
        .unwrap();
    assert_eq!((first, second), (100, 100));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Another key is another effect.
    assert_eq!(
        guard
            .once("charge-2", &"card-9", HOUR, effect)
            .await
            .unwrap(),
        101
    );
}

#[tokio::test(start_paused = true)]
async fn guard_reports_a_concurrent_duplicate_as_in_progress() {
    let guard = guard();
    let gate = Gate::new();
    let holder = tokio::spawn({
        let guard = guard.clone();
        let gate = gate.clone();
        async move {
            guard
                .once("k", &1, HOUR, || async move {
                    gate.entered.notify_one();
                    gate.release.notified().await;
                    Ok::<_, ScriptError>("done".to_owned())
                })
                .await
        }
    });
    gate.entered.notified().await;

    let ran = AtomicU32::new(0);
    let duplicate = guard
        .once("k", &1, HOUR, || async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ScriptError>("duplicate".to_owned())
        })
        .await;
    match &duplicate {
        Err(err @ GuardError::InProgress { key, .. }) => {
            assert_eq!(key, "k");
            assert!(saga_core::Classify::classify(err).is_transient());
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0);

    gate.release.notify_one();
    assert_eq!(holder.await.unwrap().unwrap(), "done");
    let after = guard
        .once("k", &1, HOUR, || async {
            Ok::<_, ScriptError>("again".to_owned())
        })
        .await;
    assert_eq!(after.unwrap(), "done");
}

#[tokio::test(start_paused = true)]
async fn guard_rejects_a_different_request_under_the_same_key() {
    let guard = guard();
    guard
        .once("k", &1, HOUR, || async { Ok::<_, ScriptError>(1) })
        .await
        .unwrap();
    let ran = AtomicU32::new(0);
    let conflict = guard
        .once("k", &2, HOUR, || async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ScriptError>(2)
        })
        .await;
    match &conflict {
        Err(err @ GuardError::Conflict { .. }) => {
            assert!(!saga_core::Classify::classify(err).is_transient());
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert_eq!(ran.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn guard_runs_again_once_the_record_expires() {
    let guard = guard();
    let runs = AtomicU32::new(0);
    let effect = || async { Ok::<u32, ScriptError>(runs.fetch_add(1, Ordering::SeqCst)) };
    let ttl = Duration::from_secs(10);
    assert_eq!(guard.once("k", &1, ttl, effect).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        guard.once("k", &1, ttl, effect).await.unwrap(),
        0,
        "still remembered"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        guard.once("k", &1, ttl, effect).await.unwrap(),
        1,
        "expired: runs again"
    );
    // A different request conflicts while the record lives, and may use the key once it
    // has expired.
    assert!(matches!(
        guard.once("k", &2, ttl, effect).await,
        Err(GuardError::Conflict { .. })
    ));
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(guard.once("k", &2, ttl, effect).await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn guard_releases_the_key_when_the_effect_fails_and_expires_an_abandoned_claim() {
    let guard = guard().with_in_progress_ttl(Duration::from_secs(30));
    let failed = guard
        .once("k", &1, HOUR, || async {
            Err::<u32, _>(ScriptError::Unavailable)
        })
        .await;
    assert!(matches!(
        failed,
        Err(GuardError::Effect(ScriptError::Unavailable))
    ));
    assert_eq!(
        guard
            .once("k", &1, HOUR, || async { Ok::<u32, ScriptError>(5) })
            .await
            .unwrap(),
        5
    );

    // A holder that dies mid-effect blocks duplicates only until its claim lapses.
    let gate = Gate::new();
    let holder = tokio::spawn({
        let guard = guard.clone();
        let gate = gate.clone();
        async move {
            guard
                .once("j", &1, HOUR, || async move {
                    gate.entered.notify_one();
                    std::future::pending::<Result<u32, ScriptError>>().await
                })
                .await
        }
    });
    gate.entered.notified().await;
    holder.abort();
    let _ = holder.await;
    let blocked = guard
        .once("j", &1, HOUR, || async { Ok::<u32, ScriptError>(6) })
        .await;
    assert!(matches!(blocked, Err(GuardError::InProgress { .. })));
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(
        guard
            .once("j", &1, HOUR, || async { Ok::<u32, ScriptError>(7) })
            .await
            .unwrap(),
        7
    );
}

/// A payment service that counts charges, and can make the coordinator die right after
/// one (once).
#[derive(Default)]
struct Bank {
    charges: AtomicU32,
    die_after_charge: Mutex<Option<Arc<Gate>>>,
}

/// Charges through the idempotency guard, keyed by the step's idempotency key.
struct Charge;

impl Step for Charge {
    type Input = u32;
    type Output = u32;
    type Error = GuardError<ScriptError>;
    const NAME: &'static str = "charge";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, amount: u32) -> Result<u32, Self::Error> {
        let bank = ctx
            .resource::<Arc<Bank>>()
            .map_err(|e| GuardError::Effect(e.into()))?;
        let charge = ctx
            .guard()
            .once(ctx.idempotency_key(), &amount, HOUR, || async {
                Ok(bank.charges.fetch_add(1, Ordering::SeqCst) + 1)
            })
            .await?;
        let die = bank.die_after_charge.lock().unwrap().take();
        if let Some(gate) = die {
            gate.entered.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(charge)
    }
}

struct Checkout;

impl Saga for Checkout {
    type Input = u32;
    type Output = u32;
    const NAME: &'static str = "checkout";

    async fn run(&self, saga: &mut SagaContext, amount: u32) -> Result<u32, SagaError> {
        saga.run(Charge, amount).await
    }
}

#[tokio::test(start_paused = true)]
async fn guard_makes_a_re_run_step_apply_its_effect_once() {
    let h = Harness::new();
    let bank = Arc::new(Bank::default());
    let gate = Gate::new();
    *bank.die_after_charge.lock().unwrap() = Some(gate.clone());
    let build = || {
        h.builder(Plan::default())
            .register(Checkout)
            .resource(bank.clone())
            .build()
            .unwrap()
    };
    let engine = build();
    let id = engine
        .start_with::<Checkout>(&250, StartOptions::default())
        .await
        .unwrap()
        .id;
    let task = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    gate.entered.notified().await;
    task.abort();
    let _ = task.await;
    assert_eq!(bank.charges.load(Ordering::SeqCst), 1);

    let outcome = build().run_to_end(id).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(
        outcome.output::<u32>().unwrap(),
        Some(1),
        "the re-run got the recorded charge"
    );
    assert_eq!(
        bank.charges.load(Ordering::SeqCst),
        1,
        "the card was charged once"
    );
    let history = engine.history(id).await.unwrap();
    assert_eq!(
        saga_tests::started_attempts(&history, 0),
        [1, 1],
        "the step did run twice"
    );
    let store: &Arc<dyn SagaStore> = engine.store();
    assert!(store.load(id).await.unwrap().is_some());
}

/// Charges through the guard with a record TTL it is given, under a known schedule: at
/// most 3 attempts of at most 5 s, 1 s then 2 s apart. It records the key lifetime it saw.
struct ShortLivedCharge {
    ttl: Duration,
    seen_lifetime: Arc<Mutex<Option<Duration>>>,
}

impl Step for ShortLivedCharge {
    type Input = u32;
    type Output = u32;
    type Error = GuardError<ScriptError>;
    const NAME: &'static str = "short_lived_charge";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, amount: u32) -> Result<u32, Self::Error> {
        *self.seen_lifetime.lock().unwrap() = ctx.key_lifetime();
        let bank = ctx
            .resource::<Arc<Bank>>()
            .map_err(|e| GuardError::Effect(e.into()))?;
        ctx.guard()
            .once(ctx.idempotency_key(), &amount, self.ttl, || async {
                Ok(bank.charges.fetch_add(1, Ordering::SeqCst) + 1)
            })
            .await
    }

    fn retry_policy(&self) -> saga_core::RetryPolicy {
        saga_core::RetryPolicy::default()
            .with_max_attempts(3)
            .with_initial_delay(Duration::from_secs(1))
            .with_max_delay(Duration::from_secs(10))
    }

    fn timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(5))
    }
}

struct ShortLivedCheckout {
    ttl: Duration,
    seen_lifetime: Arc<Mutex<Option<Duration>>>,
}

impl Saga for ShortLivedCheckout {
    type Input = u32;
    type Output = u32;
    const NAME: &'static str = "short_lived_checkout";

    async fn run(&self, saga: &mut SagaContext, amount: u32) -> Result<u32, SagaError> {
        let step = ShortLivedCharge {
            ttl: self.ttl,
            seen_lifetime: Arc::clone(&self.seen_lifetime),
        };
        saga.run(step, amount).await
    }
}

/// With a 10 s lease and 2 allowed interruptions: 3 × 5 s of attempts, 1 s + 2 s of
/// backoff, and twice a 10 s lapsed lease with the 5 s attempt again.
const SHORT_LIVED_KEY_LIFETIME: Duration = Duration::from_secs(15 + 3 + 2 * (10 + 5));

fn short_lived_engine(
    h: &Harness,
    bank: &Arc<Bank>,
    ttl: Duration,
) -> (saga_core::Engine, Arc<Mutex<Option<Duration>>>) {
    let seen = Arc::new(Mutex::new(None));
    let engine = h
        .builder(Plan::default())
        .lease_ttl(Duration::from_secs(10))
        .max_interruptions(2)
        .register(ShortLivedCheckout {
            ttl,
            seen_lifetime: Arc::clone(&seen),
        })
        .resource(Arc::clone(bank))
        .build()
        .unwrap();
    (engine, seen)
}

#[tokio::test(start_paused = true)]
async fn a_guard_ttl_shorter_than_the_keys_lifetime_is_refused_before_the_effect() {
    let h = Harness::new();
    let bank = Arc::new(Bank::default());
    let too_short = SHORT_LIVED_KEY_LIFETIME - Duration::from_secs(1);
    let (engine, seen) = short_lived_engine(&h, &bank, too_short);

    let outcome = engine
        .execute::<ShortLivedCheckout>(&100, StartOptions::default())
        .await
        .unwrap();

    assert_eq!(*seen.lock().unwrap(), Some(SHORT_LIVED_KEY_LIFETIME));
    assert_eq!(
        bank.charges.load(Ordering::SeqCst),
        0,
        "nothing was charged"
    );
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let history = engine.history(outcome.id).await.unwrap();
    let attempts = saga_tests::started_attempts(&history, 0);
    assert_eq!(attempts, [1], "permanent: not retried");
    let failed = serde_json::to_string(&history).unwrap();
    assert!(
        failed.contains("shorter than the 48s") && failed.contains("at least 48s"),
        "the step's failure says what TTL is needed: {failed}"
    );

    // At the lifetime, the same step charges once.
    let h = Harness::new();
    let (engine, _) = short_lived_engine(&h, &bank, SHORT_LIVED_KEY_LIFETIME);
    let outcome = engine
        .execute::<ShortLivedCheckout>(&100, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(bank.charges.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn check_guard_ttl_rejects_a_short_ttl_at_configuration() {
    let h = Harness::new();
    let bank = Arc::new(Bank::default());
    let (engine, _) = short_lived_engine(&h, &bank, HOUR);
    let step = ShortLivedCharge {
        ttl: HOUR,
        seen_lifetime: Arc::default(),
    };

    let err = engine
        .check_guard_ttl(&step, Duration::from_secs(30))
        .unwrap_err();
    let EngineError::Config(message) = &err else {
        panic!("expected a configuration error, got {err:?}");
    };
    assert!(
        message.contains("short_lived_charge")
            && message.contains("forward")
            && message.contains("30s")
            && message.contains("at least 48s"),
        "{message}"
    );
    engine
        .check_guard_ttl(&step, SHORT_LIVED_KEY_LIFETIME)
        .unwrap();
    assert_eq!(
        engine
            .config()
            .key_lifetime(&step.retry_policy(), step.timeout()),
        Some(SHORT_LIVED_KEY_LIFETIME)
    );

    // A compensating step is checked over its compensation policy too (10 attempts of up
    // to 30 s by default: 431 s here, against 170 s forward).
    let err = engine
        .check_guard_ttl(&Refund, Duration::from_secs(300))
        .unwrap_err();
    assert!(err.to_string().contains("compensation"), "{err}");
    // A step without a timeout has no known bound: accepted.
    engine
        .check_guard_ttl(&Unbounded, Duration::from_secs(1))
        .unwrap();
}

/// A compensating step with the default policies and timeout.
struct Refund;

impl Step for Refund {
    type Input = u32;
    type Output = u32;
    type Error = ScriptError;
    const NAME: &'static str = "refund";
    const COMPENSATION: Compensation = Compensation::OnSuccess;

    async fn forward(&self, _ctx: &StepContext, amount: u32) -> Result<u32, ScriptError> {
        Ok(amount)
    }

    async fn compensate(
        &self,
        _ctx: &StepContext,
        _amount: u32,
        _output: Option<u32>,
    ) -> Result<(), ScriptError> {
        Ok(())
    }
}

/// A step whose attempts have no timeout.
struct Unbounded;

impl Step for Unbounded {
    type Input = u32;
    type Output = u32;
    type Error = ScriptError;
    const NAME: &'static str = "unbounded";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, _ctx: &StepContext, amount: u32) -> Result<u32, ScriptError> {
        Ok(amount)
    }

    fn timeout(&self) -> Option<Duration> {
        None
    }
}
