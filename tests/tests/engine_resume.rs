//! Resuming sagas: durable timers, crashes at every commit boundary and mid-step,
//! reconciliation, non-determinism and journaled values.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::store::{ClaimOutcome, ClaimRequest, SagaStore as _};
use saga_core::{
    CompensationStatus, Engine, EngineError, EventKind, MemoryStore, Phase, RunOutcome, Saga,
    SagaContext, SagaError, SagaId, SagaState, SagaStatus, StartOptions, StepStatus, Timestamp,
};
use saga_tests::{
    Behavior, CrashingStore, Effect, Gate, Harness, OWNER, Plan, PlanSaga, Scripted,
    assert_fold_matches, count, fast_policy, single_terminal, started_attempts,
};

const LONG: Duration = Duration::from_secs(60);

/// A harness engine whose backoffs above 100 ms become durable timers.
fn timer_engine(h: &Harness, plan: Plan) -> Engine {
    h.builder(plan)
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn attempt_numbers_continue_after_a_resume() {
    let h = Harness::new();
    h.script.forward(
        1,
        [
            Behavior::RetryAfter(LONG),
            Behavior::RetryAfter(LONG),
            Behavior::Ok,
        ],
    );
    let plan = Plan::linear(3).with(1, |s| s.policy = fast_policy(5));
    let first = timer_engine(&h, plan.clone());
    let id = first
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;

    let suspended = first.run_once(id).await.unwrap();
    let RunOutcome::Suspended(due) = suspended else {
        panic!("expected a durable timer: {suspended:?}")
    };
    let state = first.state(id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Running);
    let record = &state.journal[1];
    assert_eq!((record.status, record.attempts), (StepStatus::Retrying, 1));
    assert_eq!(record.next_retry_at, Some(due));
    assert_eq!(h.ledger.calls_of(1, Phase::Forward).len(), 1);
    drop(first);

    // Another coordinator (a new engine) picks the saga up. Claiming it before its timer is
    // due must neither run an attempt early nor reset the count.
    let second = timer_engine(&h, plan.clone());
    let early = second.run_once(id).await.unwrap();
    assert_eq!(early, RunOutcome::Suspended(due));
    assert_eq!(h.ledger.calls_of(1, Phase::Forward).len(), 1);

    let outcome = second.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let calls = h.ledger.calls_of(1, Phase::Forward);
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(calls.iter().all(|c| c.key == calls[0].key));
    for pair in calls.windows(2) {
        assert!(
            pair[1].at - pair[0].at >= LONG,
            "a retry ran before its retry-after"
        );
    }
    assert_eq!(
        h.ledger.calls_of(0, Phase::Forward).len(),
        1,
        "step 0 is replayed, not re-run"
    );

    let history = second.history(id).await.unwrap();
    assert_eq!(started_attempts(&history, 1), [1, 2, 3]);
    assert!(count(&history, "SagaResumed") >= 2);
    assert_eq!(single_terminal(&history), "SagaCompleted");
    let state = assert_fold_matches(&second, id).await;
    assert_eq!(state.journal[1].attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn max_attempts_counts_attempts_made_before_a_resume() {
    let h = Harness::new();
    h.script.forward(1, vec![Behavior::RetryAfter(LONG); 5]);
    let plan = Plan::linear(3).with(1, |s| s.policy = fast_policy(2));
    let first = timer_engine(&h, plan.clone());
    let id = first
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert!(matches!(
        first.run_once(id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    drop(first);

    let outcome = timer_engine(&h, plan).run_to_end(id).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(
        h.ledger.calls_of(1, Phase::Forward).len(),
        2,
        "2 attempts in all, not 2 per run"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lapsed_lease_lets_another_coordinator_resume() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::ApplyThenHang(gate.clone())]);
    let plan = Plan::linear(3).with_all(|s| s.timeout = None);
    let engine = h.engine(plan.clone());
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
    runner.abort();
    assert!(runner.await.unwrap_err().is_cancelled());

    // A different coordinator is refused while the dead one's lease lasts...
    let other = h.builder(plan).owner("coordinator-2").build().unwrap();
    match other.run_once(id).await {
        Err(EngineError::Busy { owner, .. }) => assert_eq!(owner, OWNER),
        other => panic!("expected Busy, got {other:?}"),
    }
    // ...and takes over once it lapses.
    tokio::time::sleep(engine.config().lease_ttl).await;
    let outcome = other.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let history = other.history(id).await.unwrap();
    let owners: Vec<&str> = history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::SagaResumed { owner, .. } => Some(owner.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(owners, ["coordinator-2"]);
}

#[tokio::test(start_paused = true)]
async fn compensation_attempts_continue_after_a_resume() {
    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    h.script.compensate(
        1,
        [
            Behavior::RetryAfter(LONG),
            Behavior::RetryAfter(LONG),
            Behavior::Ok,
        ],
    );
    let plan = Plan::linear(3).with(1, |s| s.compensation_policy = fast_policy(3));
    let first = timer_engine(&h, plan.clone());
    let id = first
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert!(matches!(
        first.run_once(id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    let state = first.state(id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Compensating);
    let undo = state.journal[1].compensation.clone().unwrap();
    assert_eq!(
        (undo.status, undo.attempts),
        (CompensationStatus::Retrying, 1)
    );
    drop(first);

    let outcome = timer_engine(&h, plan).run_to_end(id).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Compensated);
    let calls = h.ledger.calls_of(1, Phase::Compensate);
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(calls.iter().all(|c| c.key == calls[0].key));
    for pair in calls.windows(2) {
        assert!(pair[1].at - pair[0].at >= LONG);
    }
    assert_eq!(
        h.ledger.calls_of(2, Phase::Compensate).len(),
        0,
        "the failed step is skipped once"
    );
    assert_eq!(h.ledger.effects_of(0, Phase::Compensate).len(), 1);
    assert_eq!(
        h.ledger.calls_of(0, Phase::Forward).len(),
        1,
        "forward steps are only replayed"
    );
    let engine = h.engine(Plan::linear(3));
    let history = engine.history(id).await.unwrap();
    assert_eq!(saga_tests::skipped_positions(&history), [2]);
    assert_eq!(single_terminal(&history), "SagaCompensated");
    assert_fold_matches(&engine, id).await;
}

#[tokio::test(start_paused = true)]
async fn a_long_step_keeps_its_lease() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let plan = Plan::linear(3).with_all(|s| s.timeout = None);
    let engine = h.engine(plan.clone());
    let ttl = engine.config().lease_ttl;
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

    // Three lease lengths later the step is still running, and its lease is still held.
    tokio::time::sleep(ttl * 3).await;
    let other = h.builder(plan).owner("coordinator-2").build().unwrap();
    assert!(matches!(
        other.run_once(id).await,
        Err(EngineError::Busy { .. })
    ));
    assert!(
        other.run_due(10).await.unwrap().is_empty(),
        "a renewed lease is not due"
    );

    gate.release.notify_one();
    let outcome = runner.await.unwrap().unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(h.ledger.calls_of(1, Phase::Forward).len(), 1);
}

/// What was durable and applied when a coordinator died.
struct AtCrash {
    state: SagaState,
    effects: Vec<Effect>,
    history_len: usize,
}

impl AtCrash {
    async fn capture(h: &Harness, plan: &Plan, id: SagaId) -> Self {
        let engine = h.engine(plan.clone());
        Self {
            state: engine.state(id).await.unwrap(),
            effects: h.ledger.effects(),
            history_len: engine.history(id).await.unwrap().len(),
        }
    }

    /// Whether the effect of `step` in `phase` was applied before the crash but its success
    /// was not durably recorded: exactly the work a resume must redo.
    fn in_flight(&self, step: usize, phase: Phase) -> bool {
        let applied = self
            .effects
            .iter()
            .any(|e| e.step == step && e.phase == phase);
        let recorded = self.state.record(step as u32).is_some_and(|r| match phase {
            Phase::Forward => r.status == StepStatus::Succeeded,
            Phase::Compensate => r
                .compensation
                .as_ref()
                .is_some_and(|c| c.status == CompensationStatus::Done),
        });
        applied && !recorded
    }
}

/// Resumes a crashed saga with a fresh engine of the same owner and checks the guarantees:
/// recorded work is not redone, in-flight work is redone under the same key, and the saga
/// ends `expected`.
async fn resume_and_check(
    h: &Harness,
    plan: &Plan,
    id: SagaId,
    crash: &AtCrash,
    expected: SagaStatus,
) {
    let engine = h.engine(plan.clone());
    let outcome = engine.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, expected);

    for step in 0..plan.steps.len() {
        for phase in [Phase::Forward, Phase::Compensate] {
            let calls = h.ledger.calls_of(step, phase);
            let keys: BTreeSet<&str> = calls.iter().map(|c| c.key.as_str()).collect();
            assert!(
                keys.len() <= 1,
                "step {step} {phase:?} ran under several keys: {keys:?}"
            );
            let effects = h.ledger.effects_of(step, phase);
            if crash.in_flight(step, phase) {
                // At least once: re-run, with the same key (and attempt number), so the
                // system it calls can drop the duplicate.
                assert_eq!(
                    effects.len(),
                    2,
                    "step {step} {phase:?} in flight at the crash"
                );
                assert_eq!(effects[0].key, effects[1].key);
                assert_eq!(effects[0].attempt, effects[1].attempt);
            } else {
                assert!(
                    effects.len() <= 1,
                    "step {step} {phase:?} applied {} times",
                    effects.len()
                );
            }
        }
    }
    let history = engine.history(id).await.unwrap();
    // The resume takes the lease and, when the saga had made progress (a lease was recorded
    // before the crash), says that it resumed it. A crash before the first commit leaves
    // nothing to resume: the saga simply starts.
    let resumed = saga_tests::kinds(&history[crash.history_len..]);
    assert_eq!(resumed[0], "LeaseAcquired", "{resumed:?}");
    let progressed = crash.state.owner.is_some();
    assert_eq!(resumed[1] == "SagaResumed", progressed, "{resumed:?}");
    let terminal = if expected == SagaStatus::Completed {
        "SagaCompleted"
    } else {
        "SagaCompensated"
    };
    assert_eq!(single_terminal(&history), terminal);
    assert_fold_matches(&engine, id).await;
}

/// Crashes the saga after 0, 1, 2, ... commits until a run gets through, resuming each
/// crash with a fresh engine. Returns how many crash points there were.
async fn crash_at_every_commit(
    plan: &Plan,
    setup: impl Fn(&Harness),
    expected: SagaStatus,
) -> usize {
    for k in 0.. {
        let h = Harness::new();
        setup(&h);
        let crashing = Arc::new(CrashingStore::after_commits(h.store.clone(), k));
        let engine = h
            .builder_on(crashing.clone(), plan.clone())
            .build()
            .unwrap();
        let key = format!("crash-{k}");
        let id = SagaId::from_idempotency_key(PlanSaga::NAME, &key);

        let result = engine.execute::<PlanSaga>(&0, StartOptions::key(key)).await;

        if !crashing.crashed() {
            let outcome = result.unwrap();
            assert_eq!(outcome.status, expected);
            return k;
        }
        assert!(
            matches!(&result, Err(EngineError::Interrupted { saga, .. }) if *saga == id),
            "crash after {k} commits: {result:?}"
        );
        assert_eq!(crashing.commits(), k);
        let crash = AtCrash::capture(&h, plan, id).await;
        resume_and_check(&h, plan, id, &crash, expected).await;
    }
    unreachable!()
}

#[tokio::test(start_paused = true)]
async fn resume_after_a_crash_at_every_commit_of_a_completing_saga() {
    let plan = Plan::linear(4);
    let points = crash_at_every_commit(&plan, |_| {}, SagaStatus::Completed).await;
    // One commit per step start (carrying the previous step's result) and one to finish.
    assert_eq!(points, 5);
}

#[tokio::test(start_paused = true)]
async fn resume_after_a_crash_at_every_commit_of_a_compensating_saga() {
    let plan = Plan::linear(4);
    let setup = |h: &Harness| {
        h.script.forward(3, vec![Behavior::Permanent; 3]);
    };
    let points = crash_at_every_commit(&plan, setup, SagaStatus::Compensated).await;
    // 4 step starts, the failure, 3 undos and the end.
    assert_eq!(points, 9);
}

#[tokio::test(start_paused = true)]
async fn resume_after_a_crash_at_every_commit_of_a_retrying_saga() {
    // Step 1 fails transiently (slept in process), then is rate limited for a minute (a
    // durable timer), then succeeds: crash points fall on every attempt record too.
    let plan = Plan::linear(3).with(1, |s| s.policy = fast_policy(5));
    let setup = |h: &Harness| {
        h.script.forward(
            1,
            [
                Behavior::Transient,
                Behavior::RetryAfter(LONG),
                Behavior::Ok,
            ],
        );
    };
    let points = crash_at_every_commit(&plan, setup, SagaStatus::Completed).await;
    // Starts of step 0 and step 1, attempt 1 failed, attempt 2 started, attempt 2 failed
    // (durable timer), attempt 3 started (after the timer), step 2 started, end.
    assert_eq!(points, 8);
}

/// Runs the saga until step `step` (in `phase`) has applied its effect and hangs, kills the
/// coordinator's task there, and resumes with a fresh engine of the same owner.
async fn crash_mid_step(step: usize, phase: Phase) {
    let h = Harness::new();
    let gate = Gate::new();
    h.script
        .set(step, phase, [Behavior::ApplyThenHang(gate.clone())]);
    let expected = if phase == Phase::Compensate {
        h.script.forward(3, vec![Behavior::Permanent; 3]);
        SagaStatus::Compensated
    } else {
        SagaStatus::Completed
    };
    let plan = Plan::linear(4);
    let engine = h.engine(plan.clone());
    let key = format!("hang-{step}-{}", phase.as_str());
    let id = SagaId::from_idempotency_key(PlanSaga::NAME, &key);
    let task = tokio::spawn({
        let engine = engine.clone();
        async move { engine.execute::<PlanSaga>(&0, StartOptions::key(key)).await }
    });
    gate.entered.notified().await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop(engine);

    let crash = AtCrash::capture(&h, &plan, id).await;
    assert!(
        crash.in_flight(step, phase),
        "step {step} {phase:?} must be in flight"
    );
    resume_and_check(&h, &plan, id, &crash, expected).await;
    let calls = h.ledger.calls_of(step, phase);
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0].key, calls[1].key,
        "the re-run uses the same idempotency key"
    );

    let history = h.engine(plan).history(id).await.unwrap();
    if phase == Phase::Forward {
        let keys: Vec<&str> = history
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::StepStarted {
                    position,
                    idempotency_key,
                    ..
                } if *position as usize == step => Some(idempotency_key.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(keys, [calls[0].key.as_str(), calls[0].key.as_str()]);
    }
}

#[tokio::test(start_paused = true)]
async fn resume_after_a_crash_in_the_middle_of_every_step() {
    for step in 0..4 {
        crash_mid_step(step, Phase::Forward).await;
    }
}

#[tokio::test(start_paused = true)]
async fn resume_after_a_crash_in_the_middle_of_every_compensation() {
    for step in 0..3 {
        crash_mid_step(step, Phase::Compensate).await;
    }
}

#[tokio::test(start_paused = true)]
async fn reconcile_applied_prevents_re_running_an_ambiguous_step() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script
        .forward(2, [Behavior::ApplyThenHang(gate.clone())])
        .reconcile_from_ledger(2);
    let plan = Plan::linear(4);
    let engine = h.engine(plan.clone());
    let id = engine
        .start_with::<PlanSaga>(&5, StartOptions::default())
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

    let outcome = h.engine(plan).run_to_end(id).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(
        h.ledger.calls_of(2, Phase::Forward).len(),
        1,
        "the applied effect was not re-run"
    );
    assert_eq!(h.ledger.reconciles().len(), 1);
    let applied = h.ledger.effects_of(2, Phase::Forward)[0]
        .output
        .clone()
        .unwrap();
    let outputs: Vec<saga_tests::StepOutput> = outcome.output().unwrap().unwrap();
    assert_eq!(
        outputs[2], applied,
        "the reconciled output is the step's result"
    );
    let history = engine.history(id).await.unwrap();
    let reconciled = history
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::StepSucceeded {
                position: 2,
                reconciled,
                ..
            } => Some(*reconciled),
            _ => None,
        })
        .unwrap();
    assert!(reconciled);
    assert_fold_matches(&engine, id).await;
}

#[tokio::test(start_paused = true)]
async fn reconcile_not_applied_re_runs_the_step_once() {
    let h = Harness::new();
    let gate = Gate::new();
    // The step dies before its effect: the reconcile check finds nothing and it runs again.
    h.script
        .forward(1, [Behavior::WaitThenOk(gate.clone())])
        .reconcile_from_ledger(1);
    let plan = Plan::linear(3).with_all(|s| s.timeout = None);
    let engine = h.engine(plan.clone());
    let id = engine
        .start_with::<PlanSaga>(&5, StartOptions::default())
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

    let outcome = h.engine(plan).run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(h.ledger.calls_of(1, Phase::Forward).len(), 2);
    assert_eq!(h.ledger.effects_of(1, Phase::Forward).len(), 1);
    assert_eq!(h.ledger.reconciles().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn diverging_workflow_is_quarantined_without_compensating_until_its_code_is_back() {
    // Each alternative workflow diverges from a journal of step_a, step_b, then step_c
    // waiting on a durable timer.
    let alternatives = [
        ("calls another step at position 1", Plan::of([0, 3, 2, 1])),
        ("finishes before the recorded steps", Plan::of([0])),
    ];
    for (what, alternative) in alternatives {
        let h = Harness::new();
        h.script.forward(2, [Behavior::RetryAfter(LONG)]);
        let original = timer_engine(&h, Plan::linear(4));
        let id = original
            .start_with::<PlanSaga>(&0, StartOptions::default())
            .await
            .unwrap()
            .id;
        assert!(matches!(
            original.run_once(id).await.unwrap(),
            RunOutcome::Suspended(_)
        ));
        let before = original.state(id).await.unwrap();

        let changed = timer_engine(&h, alternative);
        let err = changed.run_to_end(id).await.unwrap_err();

        let EngineError::Quarantined { reason, .. } = &err else {
            panic!("{what}: expected Quarantined, got {err:?}");
        };
        assert!(reason.contains("non-deterministic"), "{what}: {reason}");
        assert!(reason.contains("saga retry"), "{what}: {reason}");
        let stored = h.store.load(id).await.unwrap().unwrap();
        assert_eq!(stored.status, SagaStatus::Running, "{what}: not failed");
        assert!(stored.quarantined.is_some(), "{what}: set aside");
        assert!(
            h.ledger.calls().iter().all(|c| c.phase == Phase::Forward),
            "{what}: nothing is undone"
        );
        assert_eq!(
            h.ledger.calls().len(),
            3,
            "{what}: no step runs after the divergence"
        );
        let history = changed.history(id).await.unwrap();
        assert_eq!(count(&history, "CompensationStarted"), 0, "{what}");
        assert_eq!(count(&history, "StepCompensated"), 0, "{what}");
        assert_eq!(count(&history, "SagaFailed"), 0, "{what}");
        let state = assert_fold_matches(&changed, id).await;
        assert_eq!(
            state.journal, before.journal,
            "{what}: the journal is kept as it was"
        );

        // The code the saga started under is deployed again: a retry resumes it where it
        // stopped, and recorded steps are not run again.
        original.retry(id, "original code deployed").await.unwrap();
        let outcome = original.run_to_end(id).await.unwrap();
        assert_eq!(outcome.status, SagaStatus::Completed, "{what}");
        let forward: Vec<u32> = h
            .ledger
            .calls()
            .iter()
            .filter(|c| c.phase == Phase::Forward && c.behavior == "ok")
            .map(|c| c.position)
            .collect();
        assert_eq!(forward, [0, 1, 2, 3], "{what}: each step succeeded once");
        assert_eq!(
            single_terminal(&original.history(id).await.unwrap()),
            "SagaCompleted"
        );
    }
}

/// Registered under the scripted saga's name: loses its lease to another coordinator in
/// the middle of its replay (a long pause), then diverges from the journal.
struct LosesItsLeaseThenDiverges {
    store: MemoryStore,
}

impl Saga for LosesItsLeaseThenDiverges {
    type Input = u32;
    type Output = ();
    const NAME: &'static str = PlanSaga::NAME;

    async fn run(&self, saga: &mut SagaContext, input: u32) -> Result<(), SagaError> {
        tokio::time::advance(Duration::from_secs(31)).await;
        let claimed = self
            .store
            .claim(
                saga.saga_id(),
                &ClaimRequest {
                    owner: "coordinator-2".into(),
                    ttl: Duration::from_secs(30),
                },
            )
            .await
            .unwrap();
        assert!(matches!(claimed, ClaimOutcome::Claimed(_)), "{claimed:?}");
        saga.run(Scripted::<3>::default(), input).await?;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_coordinator_that_lost_the_lease_does_not_quarantine_a_diverging_saga() {
    let h = Harness::new();
    h.script.forward(1, [Behavior::RetryAfter(LONG)]);
    let original = timer_engine(&h, Plan::linear(3));
    let id = original
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert!(matches!(
        original.run_once(id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    tokio::time::advance(LONG).await;

    let stale = Engine::builder(h.store.clone())
        .register(LosesItsLeaseThenDiverges {
            store: h.store.clone(),
        })
        .clock(Arc::clone(&h.clock) as Arc<dyn saga_core::Clock>)
        .owner("coordinator-1")
        .build()
        .unwrap();
    let err = stale.run_once(id).await.unwrap_err();

    assert!(
        matches!(err, EngineError::Interrupted { .. }),
        "a fenced run stops without writing: {err:?}"
    );
    let stored = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(
        stored.quarantined, None,
        "the new owner's saga is not set aside"
    );
    assert_eq!(
        stored.lease.map(|l| l.owner),
        Some("coordinator-2".to_owned()),
        "the new owner keeps its lease"
    );
}

#[tokio::test(start_paused = true)]
async fn diverging_step_name_is_reported() {
    let h = Harness::new();
    h.script.forward(1, [Behavior::RetryAfter(LONG)]);
    let original = timer_engine(&h, Plan::linear(3));
    let id = original
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert!(matches!(
        original.run_once(id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    let err = timer_engine(&h, Plan::of([4, 1, 2]))
        .run_to_end(id)
        .await
        .unwrap_err();
    let EngineError::Quarantined { reason, .. } = &err else {
        panic!("expected Quarantined, got {err:?}");
    };
    assert!(
        reason.contains("step_a") && reason.contains("step_e") && reason.contains("position 0"),
        "{reason}"
    );
}

/// A workflow that reads the journaled clock and a journaled uuid, then waits on a durable
/// timer, and reports what it saw on every run.
struct Stamped {
    seen: Arc<Mutex<Vec<(Timestamp, uuid::Uuid)>>>,
}

impl Saga for Stamped {
    type Input = u32;
    type Output = (Timestamp, uuid::Uuid, Timestamp);
    const NAME: &'static str = "stamped";

    async fn run(&self, saga: &mut SagaContext, input: u32) -> Result<Self::Output, SagaError> {
        let at = saga.now()?;
        let id = saga.uuid()?;
        self.seen.lock().unwrap().push((at, id));
        saga.run(Scripted::<0>::default(), input).await?;
        let after = saga.now()?;
        Ok((at, id, after))
    }
}

#[tokio::test(start_paused = true)]
async fn journaled_now_and_uuid_replay_the_recorded_values() {
    let h = Harness::new();
    h.script
        .forward(0, [Behavior::RetryAfter(LONG), Behavior::Ok]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let build = || {
        h.builder(Plan::default())
            .inline_wait_max(Duration::from_millis(100))
            .register(Stamped { seen: seen.clone() })
            .build()
            .unwrap()
    };
    let first = build();
    let id = first
        .start_with::<Stamped>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert!(matches!(
        first.run_once(id).await.unwrap(),
        RunOutcome::Suspended(_)
    ));
    drop(first);

    let second = build();
    let outcome = second.run_to_end(id).await.unwrap();

    assert_eq!(outcome.status, SagaStatus::Completed);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "the workflow ran again on resume");
    assert!(
        seen.iter().all(|v| *v == seen[0]),
        "replays see the recorded values: {seen:?}"
    );
    let (at, id_value, after): (Timestamp, uuid::Uuid, Timestamp) =
        outcome.output().unwrap().unwrap();
    assert_eq!((at, id_value), seen[0]);
    assert!(
        after.since(at) >= LONG,
        "a fresh now() after the wait is later"
    );
    assert!(
        h.now().since(at) >= LONG,
        "time did move on between the runs"
    );

    let history = second.history(id).await.unwrap();
    let values: Vec<(u32, &str)> = history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::ValueRecorded { position, name, .. } => Some((*position, name.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(
        values,
        [(0, "now"), (1, "uuid"), (3, "now")],
        "each value is recorded once"
    );
    assert_fold_matches(&second, id).await;
}

#[tokio::test(start_paused = true)]
async fn a_cut_off_coordinator_is_fenced_when_it_comes_back() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let plan = Plan::linear(3).with_all(|s| s.timeout = None);
    let link = Arc::new(CrashingStore::healthy(h.store.clone()));
    let cut_off = h.builder_on(link.clone(), plan.clone()).build().unwrap();
    let id = cut_off
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    let runner = tokio::spawn({
        let engine = cut_off.clone();
        async move { engine.run_to_end(id).await }
    });
    gate.entered.notified().await;

    // The coordinator loses the store mid-step: its renewals fail, its lease lapses, and
    // another coordinator finishes the saga.
    link.crash_now();
    tokio::time::sleep(cut_off.config().lease_ttl + Duration::from_secs(1)).await;
    let other = h.builder(plan).owner("coordinator-2").build().unwrap();
    let outcome = other.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let history = other.history(id).await.unwrap();

    // The first one comes back and finishes its step: its writes are refused.
    link.revive();
    gate.release.notify_one();
    let late = runner.await.unwrap();
    assert!(
        matches!(late, Err(EngineError::Interrupted { .. })),
        "{late:?}"
    );
    assert_eq!(
        other.history(id).await.unwrap(),
        history,
        "the fenced coordinator wrote nothing"
    );
    assert_eq!(other.state(id).await.unwrap().status, SagaStatus::Completed);
    let calls = h.ledger.calls_of(1, Phase::Forward);
    assert_eq!(
        calls.len(),
        2,
        "at least once: the takeover re-ran the step"
    );
    assert_eq!(calls[0].key, calls[1].key, "with the same key");
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_keeps_killing_its_coordinator_fails_after_max_interruptions() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script
        .forward(1, vec![Behavior::ApplyThenHang(gate.clone()); 3]);
    let plan = Plan::linear(3);
    let key = "crash-loop".to_owned();
    let id = SagaId::from_idempotency_key(PlanSaga::NAME, &key);
    for run in 0..3 {
        let engine = h
            .builder(plan.clone())
            .max_interruptions(2)
            .build()
            .unwrap();
        let task = tokio::spawn({
            let key = key.clone();
            async move { engine.execute::<PlanSaga>(&0, StartOptions::key(key)).await }
        });
        gate.entered.notified().await;
        task.abort();
        assert!(
            task.await.unwrap_err().is_cancelled(),
            "run {run} must hang in step 1"
        );
    }
    let engine = h.builder(plan).max_interruptions(2).build().unwrap();
    let outcome = engine.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let state = engine.state(id).await.unwrap();
    let record = state.record(1).unwrap();
    assert_eq!(record.status, StepStatus::Failed);
    assert_eq!(
        record.attempts, 1,
        "interrupted re-runs keep the attempt number"
    );
    assert_eq!(record.interruptions, 2);
    assert_eq!(
        h.ledger.calls_of(1, Phase::Forward).len(),
        3,
        "the step ran three times, then the engine gave up instead of a fourth run"
    );
    let history = engine.history(id).await.unwrap();
    assert!(history.iter().any(|e| matches!(
        &e.kind,
        EventKind::StepFailed {
            position: 1,
            reason: saga_core::GiveUpReason::InterruptedTooOften,
            ..
        }
    )));
    assert_fold_matches(&engine, id).await;
}

#[tokio::test(start_paused = true)]
async fn a_cancel_after_a_crash_mid_attempt_resolves_the_attempt_before_compensating() {
    // Step 1 applies its effect, then its coordinator dies before hearing of it; while no
    // coordinator runs the saga, a cancel arrives. The unfinished attempt must be resolved
    // (run again with the same key against an idempotent system) so that its effect is
    // undone too, rather than skipped as "did not complete".
    let h = Harness::new();
    h.script.dedupe_by_key();
    let gate = Gate::new();
    h.script
        .forward(1, [Behavior::ApplyThenHang(gate.clone()), Behavior::Ok]);
    let plan = Plan::linear(3);
    let engine = h.engine(plan.clone());
    let key = "crash-then-cancel".to_owned();
    let id = SagaId::from_idempotency_key(PlanSaga::NAME, &key);
    let task = tokio::spawn({
        let engine = engine.clone();
        async move { engine.execute::<PlanSaga>(&0, StartOptions::key(key)).await }
    });
    gate.entered.notified().await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    drop(engine);
    assert_eq!(
        h.ledger.effects_of(1, Phase::Forward).len(),
        1,
        "the effect happened"
    );

    let engine = h.engine(plan);
    engine.cancel(id, "operator").await.unwrap();
    let outcome = engine.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let calls = h.ledger.calls_of(1, Phase::Forward);
    assert_eq!(calls.len(), 2, "the cut-off attempt was run again once");
    assert_eq!(calls[0].key, calls[1].key, "with the same idempotency key");
    assert_eq!(
        h.ledger.effects_of(1, Phase::Forward).len(),
        1,
        "the idempotent system applied it once"
    );
    assert_eq!(
        h.ledger.effects_of(1, Phase::Compensate).len(),
        1,
        "and its effect was undone"
    );
    assert_eq!(h.ledger.effects_of(0, Phase::Compensate).len(), 1);
    assert!(
        h.ledger.calls_of(2, Phase::Forward).is_empty(),
        "no step after the cancel ran"
    );
    assert_fold_matches(&engine, id).await;
}
