//! Reconciled compensations: a compensation's own reconciliation check
//! (`Step::reconcile_compensation`) is asked before an undo whose outcome is unknown runs
//! again and before the compensation gives up, so an undo that was applied ends the saga
//! `Compensated` instead of `Failed`.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use saga_core::{
    CompensationRecord, CompensationStatus, Engine, EventKind, FailureKind, Phase,
    Phase::Compensate, Reconciled, RetryPolicy, Saga, SagaContext, SagaError, SagaEvent,
    SagaOutcome, SagaStatus, StartOptions, Step, StepContext, Timestamp, step_idempotency_key,
    timeline,
};
use saga_tests::{
    Behavior, Gate, Harness, Ledger, Plan, PlanSaga, ScriptError, Scripted, StepOutput, StepSpec,
    assert_fold_matches, compensated_positions, count, events_named, fast_policy, single_terminal,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What one call of a compensation's reconciliation check answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Looks the undo's key up in the ledger: `Applied` when an undo effect was applied under
    /// it, else `NotApplied` (what a system that records idempotency keys answers).
    Ledger,
    /// Cannot tell yet (a system whose records lag behind, say).
    Unknown,
    /// The check itself fails (transient).
    Fail,
}

/// One call of a compensation's reconciliation check.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Asked {
    step: usize,
    phase: Phase,
    key: String,
    attempt: u32,
    /// How many times the undo had been invoked when the check was asked.
    undo_calls_before: usize,
}

#[derive(Debug, Default)]
struct ChecksInner {
    answers: HashMap<usize, Vec<Answer>>,
    asked: Vec<Asked>,
}

/// The script of the compensation checks, per step index and call (calls past the end of
/// the list answer [`Answer::Ledger`]), and a record of every call. Registered as a resource.
#[derive(Clone, Debug, Default)]
struct UndoChecks(Arc<Mutex<ChecksInner>>);

impl UndoChecks {
    fn answer(&self, step: usize, answers: impl IntoIterator<Item = Answer>) -> &Self {
        self.0
            .lock()
            .unwrap()
            .answers
            .insert(step, answers.into_iter().collect());
        self
    }

    fn asked(&self) -> Vec<Asked> {
        self.0.lock().unwrap().asked.clone()
    }

    fn record(&self, asked: Asked) -> Answer {
        let mut inner = self.0.lock().unwrap();
        let call = inner.asked.iter().filter(|a| a.step == asked.step).count();
        let answer = inner
            .answers
            .get(&asked.step)
            .and_then(|list| list.get(call))
            .copied()
            .unwrap_or(Answer::Ledger);
        inner.asked.push(asked);
        answer
    }
}

/// `Scripted<I>` with a compensation reconciliation check that follows [`UndoChecks`].
#[derive(Clone, Debug)]
struct Checked<const I: usize>(Scripted<I>);

impl<const I: usize> Step for Checked<I> {
    type Input = u32;
    type Output = StepOutput;
    type Error = ScriptError;
    const NAME: &'static str = <Scripted<I> as Step>::NAME;
    const COMPENSATION: saga_core::Compensation = <Scripted<I> as Step>::COMPENSATION;

    async fn forward(&self, ctx: &StepContext, input: u32) -> Result<StepOutput, ScriptError> {
        self.0.forward(ctx, input).await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        input: u32,
        output: Option<StepOutput>,
    ) -> Result<(), ScriptError> {
        self.0.compensate(ctx, input, output).await
    }

    async fn reconcile_compensation(
        &self,
        ctx: &StepContext,
        _input: &u32,
        output: Option<&StepOutput>,
    ) -> Result<Reconciled<()>, ScriptError> {
        assert!(
            output.is_some(),
            "an OnSuccess undo is checked with its output"
        );
        let checks = ctx.resource::<UndoChecks>()?;
        let ledger = ctx.resource::<Ledger>()?;
        let answer = checks.record(Asked {
            step: I,
            phase: ctx.phase(),
            key: ctx.idempotency_key().to_owned(),
            attempt: ctx.attempt(),
            undo_calls_before: ledger.calls_of(I, Compensate).len(),
        });
        match answer {
            Answer::Ledger if ledger.effect_count(Compensate, ctx.idempotency_key()) > 0 => {
                Ok(Reconciled::Applied(()))
            }
            Answer::Ledger => Ok(Reconciled::NotApplied),
            Answer::Unknown => Ok(Reconciled::Unknown),
            Answer::Fail => Err(ScriptError::Unavailable),
        }
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.0.retry_policy()
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        self.0.compensation_retry_policy()
    }

    fn timeout(&self) -> Option<Duration> {
        self.0.timeout()
    }
}

/// [`PlanSaga`] with every step a [`Checked`] one (compensated on success). Step `p` gets
/// input `seed + p`.
#[derive(Clone, Debug)]
struct CheckedSaga {
    plan: Plan,
}

async fn run_checked(
    saga: &mut SagaContext,
    spec: &StepSpec,
    input: u32,
) -> Result<StepOutput, SagaError> {
    match spec.step {
        0 => saga.run(Checked::<0>(Scripted::new(spec)), input).await,
        1 => saga.run(Checked::<1>(Scripted::new(spec)), input).await,
        2 => saga.run(Checked::<2>(Scripted::new(spec)), input).await,
        3 => saga.run(Checked::<3>(Scripted::new(spec)), input).await,
        other => Err(SagaError::abort(format!("no checked step {other}"))),
    }
}

impl Saga for CheckedSaga {
    type Input = u32;
    type Output = Vec<StepOutput>;
    const NAME: &'static str = "checked";

    async fn run(&self, saga: &mut SagaContext, seed: u32) -> Result<Vec<StepOutput>, SagaError> {
        let mut outputs = Vec::new();
        for (position, spec) in self.plan.steps.iter().enumerate() {
            let input = seed + u32::try_from(position).unwrap();
            outputs.push(run_checked(saga, spec, input).await?);
        }
        Ok(outputs)
    }
}

fn engine(h: &Harness, checks: &UndoChecks, plan: &Plan) -> Engine {
    h.builder(plan.clone())
        .register(CheckedSaga { plan: plan.clone() })
        .resource(checks.clone())
        .build()
        .unwrap()
}

/// Three steps; the last fails for good, so steps 1 and 0 are undone. Step 1's undo has
/// `attempts` fast attempts and a 1 s timeout.
fn plan(attempts: u32) -> Plan {
    Plan::linear(3).with(1, |s| s.compensation_policy = fast_policy(attempts))
}

/// The (attempt, timed out) of every failed undo attempt at `position`.
fn failed_undo_attempts(history: &[SagaEvent], position: u32) -> Vec<(u32, bool)> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::CompensationAttemptFailed {
                position: p,
                attempt,
                error,
                ..
            } if *p == position => Some((*attempt, error.timeout)),
            _ => None,
        })
        .collect()
}

/// The (position, attempt, reconciled) of every `StepCompensated`.
fn undone(history: &[SagaEvent]) -> Vec<(u32, u32, bool)> {
    history
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepCompensated {
                position,
                attempt,
                reconciled,
                ..
            } => Some((*position, *attempt, *reconciled)),
            _ => None,
        })
        .collect()
}

fn undo_key(outcome: &SagaOutcome, position: u32, step: &str) -> String {
    step_idempotency_key(outcome.id, position, step, Compensate)
}

async fn run(h: &Harness, checks: &UndoChecks, plan: &Plan) -> (Engine, SagaOutcome) {
    h.script.forward(2, [Behavior::Permanent]);
    let engine = engine(h, checks, plan);
    let outcome = engine
        .execute::<CheckedSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    (engine, outcome)
}

/// The reporter's scenario: the undo is applied on an attempt that then times out, the next
/// attempts are refused (503), the policy runs out. The check, asked before giving up, finds
/// the undo applied: the saga ends `Compensated`, and the undo was applied once.
#[tokio::test(start_paused = true)]
async fn an_undo_applied_before_a_timeout_ends_compensated_when_retries_run_out() {
    let h = Harness::new();
    let checks = UndoChecks::default();
    h.script.compensate(
        1,
        [
            Behavior::ApplyThenHang(Gate::new()),
            Behavior::Transient,
            Behavior::Transient,
        ],
    );
    // Before the re-run the system cannot tell yet; before giving up it can.
    checks.answer(1, [Answer::Unknown, Answer::Ledger]);
    let (engine, outcome) = run(&h, &checks, &plan(3)).await;

    assert_eq!(
        outcome.status,
        SagaStatus::Compensated,
        "{:?}",
        outcome.failure
    );
    let attempts: Vec<u32> = h
        .ledger
        .calls_of(1, Compensate)
        .iter()
        .map(|c| c.attempt)
        .collect();
    assert_eq!(attempts, [1, 2, 3], "the policy ran out");
    assert_eq!(h.ledger.effects_of(1, Compensate).len(), 1);
    assert_eq!(
        h.ledger.effects_of(0, Compensate).len(),
        1,
        "then step 0 is undone"
    );

    // Asked twice, with the undo's own key: before re-running after the timeout (about
    // attempt 1), and before giving up (after attempt 3).
    let key = undo_key(&outcome, 1, "step_b");
    let asked = checks.asked();
    assert_eq!(
        asked
            .iter()
            .map(|a| (
                a.step,
                a.phase,
                a.key.as_str(),
                a.attempt,
                a.undo_calls_before
            ))
            .collect::<Vec<_>>(),
        [
            (1, Compensate, key.as_str(), 1, 1),
            (1, Compensate, key.as_str(), 3, 3)
        ]
    );
    assert_eq!(h.ledger.calls_of(1, Compensate)[0].key, key);

    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(
        failed_undo_attempts(&history, 1),
        [(1, true), (2, false), (3, false)]
    );
    assert_eq!(undone(&history), [(1, 3, true), (0, 1, false)]);
    assert_eq!(single_terminal(&history), "SagaCompensated");
    let state = assert_fold_matches(&engine, outcome.id).await;
    let record = state.journal[1].compensation.clone().unwrap();
    assert_eq!(record.status, CompensationStatus::Done);
    assert!(record.reconciled);
    assert_eq!(record.attempts, 3);
    assert!(!state.journal[0].compensation.clone().unwrap().reconciled);

    let text = timeline::render(&history);
    assert!(
        text.contains("undo attempt 3 failed") && text.contains("no retry left"),
        "{text}"
    );
    assert!(
        text.contains("reconciliation check found the undo applied (not re-run)"),
        "{text}"
    );
}

/// A timed-out undo whose check already knows it was applied is not run again.
#[tokio::test(start_paused = true)]
async fn a_timed_out_undo_found_applied_is_not_re_run() {
    let h = Harness::new();
    let checks = UndoChecks::default();
    h.script
        .compensate(1, [Behavior::ApplyThenHang(Gate::new())]);
    let (engine, outcome) = run(&h, &checks, &plan(3)).await;

    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert_eq!(h.ledger.calls_of(1, Compensate).len(), 1, "not re-run");
    assert_eq!(h.ledger.effects_of(1, Compensate).len(), 1);
    assert_eq!(checks.asked().len(), 1);
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(failed_undo_attempts(&history, 1), [(1, true)]);
    assert_eq!(undone(&history), [(1, 1, true), (0, 1, false)]);
    assert_fold_matches(&engine, outcome.id).await;
}

/// An undo that really was not applied still ends the saga `Failed` once its policy runs
/// out, with the check's answer in the failure.
#[tokio::test(start_paused = true)]
async fn an_undo_found_not_applied_still_ends_failed() {
    let h = Harness::new();
    let checks = UndoChecks::default();
    // Timed out without effect, then refused: nothing was ever applied.
    h.script.compensate(
        1,
        [Behavior::Timeout, Behavior::Transient, Behavior::Transient],
    );
    let (engine, outcome) = run(&h, &checks, &plan(3)).await;

    assert_eq!(outcome.status, SagaStatus::Failed);
    let (kind, error) = outcome.failure.clone().unwrap();
    assert_eq!(kind, FailureKind::CompensationFailed);
    assert!(
        error.contains("retries exhausted") && error.contains("found the undo not applied"),
        "{error}"
    );
    assert_eq!(h.ledger.calls_of(1, Compensate).len(), 3);
    assert!(h.ledger.effects_of(1, Compensate).is_empty());
    assert!(
        h.ledger.calls_of(0, Compensate).is_empty(),
        "the saga stopped there"
    );
    // Before the re-run after the timeout, and before giving up.
    let asked: Vec<(u32, usize)> = checks
        .asked()
        .iter()
        .map(|a| (a.attempt, a.undo_calls_before))
        .collect();
    assert_eq!(asked, [(1, 1), (3, 3)]);

    let history = engine.history(outcome.id).await.unwrap();
    assert!(undone(&history).is_empty());
    assert_eq!(single_terminal(&history), "SagaFailed");
    let state = assert_fold_matches(&engine, outcome.id).await;
    let record = state.journal[1].compensation.clone().unwrap();
    assert_eq!(record.status, CompensationStatus::Failed);
    assert!(!record.reconciled);
}

/// A permanent error after an attempt whose outcome is unknown asks the check too (the
/// refusal may be "already done"); a permanent error with no doubt before it does not.
#[tokio::test(start_paused = true)]
async fn a_permanent_error_asks_the_check_only_after_an_unknown_outcome() {
    let h = Harness::new();
    let checks = UndoChecks::default();
    h.script.compensate(
        1,
        [Behavior::ApplyThenHang(Gate::new()), Behavior::Permanent],
    );
    checks.answer(1, [Answer::Unknown, Answer::Ledger]);
    let (engine, outcome) = run(&h, &checks, &plan(5)).await;
    assert_eq!(
        outcome.status,
        SagaStatus::Compensated,
        "{:?}",
        outcome.failure
    );
    assert_eq!(h.ledger.calls_of(1, Compensate).len(), 2);
    assert_eq!(checks.asked().len(), 2);
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(undone(&history), [(1, 2, true), (0, 1, false)]);
    assert_fold_matches(&engine, outcome.id).await;

    // No unknown outcome before the permanent error: it is the answer, nothing is asked.
    let h = Harness::new();
    let checks = UndoChecks::default();
    h.script.compensate(1, [Behavior::Permanent]);
    let (_, outcome) = run(&h, &checks, &plan(5)).await;
    assert_eq!(outcome.status, SagaStatus::Failed);
    assert!(checks.asked().is_empty());
}

/// A check that fails is a failed attempt, never "applied": here the undo *was* applied, but
/// the check keeps failing, so the saga ends `Failed` (for an operator) and says why.
#[tokio::test(start_paused = true)]
async fn a_failing_check_is_never_taken_as_applied() {
    let h = Harness::new();
    let checks = UndoChecks::default();
    h.script
        .compensate(1, [Behavior::ApplyThenHang(Gate::new())]);
    checks.answer(1, [Answer::Fail; 10]);
    let (engine, outcome) = run(&h, &checks, &plan(3)).await;

    assert_eq!(outcome.status, SagaStatus::Failed);
    let (kind, error) = outcome.failure.clone().unwrap();
    assert_eq!(kind, FailureKind::CompensationFailed);
    assert!(
        error.contains("reconciliation check of the undo failed"),
        "{error}"
    );
    // Attempt 1 timed out; attempts 2 and 3 were the check failing (the undo is not re-run
    // while its outcome is unknown and the check cannot tell).
    assert_eq!(h.ledger.calls_of(1, Compensate).len(), 1);
    assert_eq!(checks.asked().len(), 2);
    let history = engine.history(outcome.id).await.unwrap();
    assert_eq!(
        failed_undo_attempts(&history, 1),
        [(1, true), (2, false), (3, false)]
    );
    assert!(undone(&history).is_empty());
    assert_eq!(single_terminal(&history), "SagaFailed");
    assert_fold_matches(&engine, outcome.id).await;

    // The check failing only when asked before giving up: the saga fails, as without a check,
    // and the failure says the check failed too.
    let h = Harness::new();
    let checks = UndoChecks::default();
    h.script.compensate(1, vec![Behavior::Transient; 3]);
    checks.answer(1, [Answer::Fail]);
    let (_, outcome) = run(&h, &checks, &plan(3)).await;
    assert_eq!(outcome.status, SagaStatus::Failed);
    let error = outcome.failure.unwrap().1;
    assert!(
        error.contains("service unavailable")
            && error.contains("reconciliation check of the undo failed"),
        "{error}"
    );
    assert_eq!(checks.asked().len(), 1);
}

/// Runs the saga until step 1's undo reaches its gate, then kills the coordinator (aborts its
/// task) and returns the saga id.
async fn crash_mid_undo(
    h: &Harness,
    checks: &UndoChecks,
    plan: &Plan,
    hang: Behavior,
    gate: &Gate,
) -> saga_core::SagaId {
    h.script.forward(2, [Behavior::Permanent]);
    h.script.compensate(1, [hang]);
    let engine = engine(h, checks, plan);
    let id = engine
        .start_with::<CheckedSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    let task = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    gate.entered.notified().await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    id
}

/// A coordinator dies right after the undo's effect, before it is recorded. On resume the
/// check is asked before re-running, finds it applied, and the undo ran once overall.
#[tokio::test(start_paused = true)]
async fn after_a_crash_mid_undo_the_check_is_asked_before_re_running() {
    let h = Harness::new();
    let checks = UndoChecks::default();
    let gate = Gate::new();
    let plan = plan(3).with(1, |s| s.timeout = None);
    let id = crash_mid_undo(
        &h,
        &checks,
        &plan,
        Behavior::ApplyThenHang(gate.clone()),
        &gate,
    )
    .await;
    let state = engine(&h, &checks, &plan).state(id).await.unwrap();
    assert_eq!(state.status, SagaStatus::Compensating);
    assert!(
        state.journal[1].compensation.is_none(),
        "nothing recorded about the undo"
    );
    assert!(checks.asked().is_empty());

    let resumed = engine(&h, &checks, &plan);
    let outcome = resumed.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let calls = h.ledger.calls_of(1, Compensate);
    assert_eq!(calls.len(), 1, "the undo ran once overall");
    assert_eq!(h.ledger.effects_of(1, Compensate).len(), 1);
    let asked = checks.asked();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].key, calls[0].key, "asked with the undo's key");
    assert_eq!(asked[0].attempt, 1);

    let history = resumed.history(id).await.unwrap();
    assert_eq!(count(&history, "SagaResumed"), 1);
    assert_eq!(undone(&history), [(1, 1, true), (0, 1, false)]);
    assert!(failed_undo_attempts(&history, 1).is_empty());
    assert_eq!(single_terminal(&history), "SagaCompensated");
    assert_fold_matches(&resumed, id).await;
}

/// A coordinator dies mid-undo *before* the effect. On resume the check says not applied,
/// and the undo runs again (with the same key) after the check was asked.
#[tokio::test(start_paused = true)]
async fn after_a_crash_before_the_undo_took_effect_it_runs_again() {
    let h = Harness::new();
    let checks = UndoChecks::default();
    let gate = Gate::new();
    let plan = plan(3).with(1, |s| s.timeout = None);
    // Waits at the gate (never released) before applying anything.
    let id = crash_mid_undo(
        &h,
        &checks,
        &plan,
        Behavior::WaitThenOk(gate.clone()),
        &gate,
    )
    .await;

    let resumed = engine(&h, &checks, &plan);
    let outcome = resumed.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    let calls = h.ledger.calls_of(1, Compensate);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].key, calls[1].key);
    assert_eq!(h.ledger.effects_of(1, Compensate).len(), 1);
    let asked = checks.asked();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].undo_calls_before, 1, "asked before the re-run");
    let history = resumed.history(id).await.unwrap();
    assert_eq!(undone(&history), [(1, 1, false), (0, 1, false)]);
    assert_eq!(compensated_positions(&history), [1, 0]);
    assert_fold_matches(&resumed, id).await;
}

/// The same scenario with a step that has no compensation check (the trait's default):
/// exactly as before — the saga ends `Failed`, nothing is reconciled.
#[tokio::test(start_paused = true)]
async fn without_a_check_the_reporters_scenario_still_ends_failed() {
    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    h.script.compensate(
        1,
        [
            Behavior::ApplyThenHang(Gate::new()),
            Behavior::Transient,
            Behavior::Transient,
        ],
    );
    let engine = h.engine(plan(3));
    let outcome = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Failed);
    let error = outcome.failure.unwrap().1;
    assert!(error.ends_with("service unavailable (scripted)"), "{error}");
    assert_eq!(h.ledger.calls_of(1, Compensate).len(), 3);
    let history = engine.history(outcome.id).await.unwrap();
    assert!(undone(&history).is_empty());
    assert_eq!(
        failed_undo_attempts(&history, 1),
        [(1, true), (2, false), (3, false)]
    );
    assert_fold_matches(&engine, outcome.id).await;
}

/// Stored histories and states written before `reconciled` existed still decode, and an
/// undo that ran (not reconciled) is stored exactly as before.
#[test]
fn histories_without_the_reconciled_field_still_decode() {
    let old = r#"{"at":5,"type":"StepCompensated","position":1,"step":"step_b","attempt":2}"#;
    let event: SagaEvent = serde_json::from_str(old).unwrap();
    assert_eq!(
        event.kind,
        EventKind::StepCompensated {
            position: 1,
            step: "step_b".into(),
            attempt: 2,
            reconciled: false,
        }
    );
    assert_eq!(event.at, Timestamp(5));
    let written = serde_json::to_value(&event).unwrap();
    assert_eq!(
        written,
        serde_json::from_str::<serde_json::Value>(old).unwrap()
    );

    let reconciled = SagaEvent {
        seq: 0,
        at: Timestamp(5),
        kind: EventKind::StepCompensated {
            position: 1,
            step: "step_b".into(),
            attempt: 2,
            reconciled: true,
        },
    };
    let text = serde_json::to_string(&reconciled).unwrap();
    assert!(text.contains(r#""reconciled":true"#), "{text}");
    assert_eq!(
        serde_json::from_str::<SagaEvent>(&text).unwrap(),
        reconciled
    );

    let record: CompensationRecord =
        serde_json::from_str(r#"{"status":"done","attempts":2}"#).unwrap();
    assert!(!record.reconciled);
    assert_eq!(record.status, CompensationStatus::Done);
}

/// The reporter's scenario, end to end, is visible in the history as one reconciled undo.
#[tokio::test(start_paused = true)]
async fn the_history_shows_which_undo_was_reconciled() {
    let h = Harness::new();
    let checks = UndoChecks::default();
    h.script
        .compensate(1, [Behavior::ApplyThenHang(Gate::new())]);
    let (engine, outcome) = run(&h, &checks, &plan(3)).await;
    let history = engine.history(outcome.id).await.unwrap();
    let reconciled = events_named(&history, "StepCompensated")
        .into_iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::StepCompensated {
                    reconciled: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!(reconciled, 1);
}
