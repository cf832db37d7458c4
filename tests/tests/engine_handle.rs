//! The typed handle end to end (issue 9, item 8): `engine.start(S, input).key(k).await` gives
//! a `SagaHandle<S>` whose outcome is an `Outcome<S::Output>` — completed with the typed
//! output, compensated with its reason, failed with its kind — for a `#[saga]` workflow and
//! for the scripted plan saga; a repeated key finds the same saga; `wait_for` ends before a
//! durable timer without an outcome and with it after the run; `engine.handle::<S>(id)`
//! checks the type; a cancel through the handle compensates; an output that does not decode
//! as `S::Output` is an encoding error. In-memory store, paused time.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use saga_core::{
    CancelOutcome, CompensationReason, Engine, EngineError, FailureKind, GiveUpReason, Outcome,
    Phase, RunOutcome, Saga, SagaContext, SagaError, SagaId, SagaStatus, StartOptions, saga,
};
use saga_tests::{
    Behavior, Gate, Harness, Plan, PlanSaga, Scripted, StepOutput, assert_fold_matches,
    compensated_positions, count, fast_policy, single_terminal,
};
use serde::{Deserialize, Serialize};

/// A backoff far longer than anything else the tests wait for.
const LONG: Duration = Duration::from_secs(3600);

/// The plan saga as a start names it: the value only names the type (the engine runs the
/// instance registered with the plan).
fn plan_saga() -> PlanSaga {
    PlanSaga {
        plan: Plan::default(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct QuoteRequest {
    client: String,
    seed: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct QuoteOffer {
    client: String,
    steps: Vec<String>,
}

/// Two scripted steps, then an offer; the client `withdrawn` aborts after them.
#[saga(name = "quote", version = 1)]
async fn quote(saga: &mut SagaContext, request: QuoteRequest) -> Result<QuoteOffer, SagaError> {
    let first = saga.run(Scripted::<0>::default(), request.seed).await?;
    let second = saga.run(Scripted::<1>::default(), request.seed + 1).await?;
    if request.client == "withdrawn" {
        return Err(SagaError::abort("the client withdrew the request"));
    }
    Ok(QuoteOffer {
        client: request.client,
        steps: vec![first.step, second.step],
    })
}

/// The `scripted` type again, as a newer version whose output is text: the output of a
/// version 1 saga does not decode as it.
struct ScriptedAsText;

impl Saga for ScriptedAsText {
    type Input = u32;
    type Output = String;
    const NAME: &'static str = "scripted";
    const VERSION: u32 = 2;

    async fn run(&self, _saga: &mut SagaContext, seed: u32) -> Result<String, SagaError> {
        Ok(format!("seed {seed}"))
    }
}

/// An engine running `plan` as the plan saga and `quote`, whose backoffs over 100 ms are
/// durable timers.
fn engine(h: &Harness, plan: Plan) -> Engine {
    h.builder(plan)
        .register(Quote)
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap()
}

fn request(client: &str) -> QuoteRequest {
    QuoteRequest {
        client: client.to_owned(),
        seed: 10,
    }
}

fn offer(client: &str) -> Outcome<QuoteOffer> {
    Outcome::Completed(QuoteOffer {
        client: client.to_owned(),
        steps: vec!["step_a".into(), "step_b".into()],
    })
}

#[tokio::test(start_paused = true)]
async fn a_keyed_start_runs_to_its_typed_output_and_the_key_finds_it_again() {
    let h = Harness::new();
    let engine = engine(&h, Plan::linear(2));

    let handle = engine
        .start(Quote, request("ada"))
        .key("quote-ada")
        .await
        .unwrap();
    assert!(handle.created());
    assert_eq!(handle.status().await.unwrap(), SagaStatus::Running);
    assert_eq!(handle.outcome().await.unwrap(), None, "not run yet");

    let outcome = handle.run_to_end().await.unwrap();
    assert_eq!(outcome, offer("ada"));
    assert_eq!(outcome.status(), SagaStatus::Completed);
    assert_eq!(handle.wait().await.unwrap(), offer("ada"));
    assert_eq!(handle.outcome().await.unwrap(), Some(offer("ada")));
    assert_eq!(
        handle.wait_for(Duration::ZERO).await.unwrap(),
        Some(offer("ada"))
    );
    assert_eq!(handle.status().await.unwrap(), SagaStatus::Completed);
    let state = handle.state().await.unwrap();
    assert_eq!(state.saga_type, "quote");
    assert_eq!(state.version, 1);
    assert_eq!(state.idempotency_key.as_deref(), Some("quote-ada"));
    assert_eq!(state, assert_fold_matches(&engine, handle.id()).await);
    assert_eq!(
        single_terminal(&handle.history().await.unwrap()),
        "SagaCompleted"
    );

    // The same key and input: the same saga, not created, already done; nothing runs again.
    let again = engine
        .start(Quote, request("ada"))
        .key("quote-ada")
        .await
        .unwrap();
    assert!(!again.created());
    assert_eq!(again.id(), handle.id());
    assert_eq!(again.wait().await.unwrap(), offer("ada"));
    assert_eq!(h.ledger.calls_of(0, Phase::Forward).len(), 1);

    // The same key with another input is a conflict naming the saga.
    let err = engine
        .start(Quote, request("grace"))
        .key("quote-ada")
        .await
        .unwrap_err();
    match err {
        EngineError::IdempotencyConflict { saga, key } => {
            assert_eq!((saga, key.as_str()), (handle.id(), "quote-ada"));
        }
        other => panic!("expected an idempotency conflict, got {other:?}"),
    }

    // Without a key, another saga each time.
    let first = engine.start(Quote, request("ada")).await.unwrap();
    let second = engine.start(Quote, request("ada")).await.unwrap();
    assert!(first.created() && second.created());
    assert_ne!(first.id(), second.id());
    assert_ne!(first.id(), handle.id());
}

#[tokio::test(start_paused = true)]
async fn execute_returns_the_typed_outcome() {
    let h = Harness::new();
    let engine = engine(&h, Plan::linear(3));

    let outcome = engine
        .start(Quote, request("hopper"))
        .key("quote-hopper")
        .execute()
        .await
        .unwrap();
    assert_eq!(outcome, offer("hopper"));
    assert_eq!(
        outcome.completed().map(|offer| offer.client),
        Some("hopper".to_owned())
    );

    // Executing the same key again returns the recorded outcome without running a step.
    let calls = h.ledger.calls().len();
    let repeated = engine
        .start(Quote, request("hopper"))
        .key("quote-hopper")
        .execute()
        .await
        .unwrap();
    assert_eq!(repeated, offer("hopper"));
    assert_eq!(h.ledger.calls().len(), calls);

    // The plan saga's output is its own type.
    let outputs = engine
        .start(plan_saga(), 5)
        .execute()
        .await
        .unwrap()
        .completed()
        .expect("the plan completes");
    let steps: Vec<(&str, u32)> = outputs
        .iter()
        .map(|o: &StepOutput| (o.step.as_str(), o.input))
        .collect();
    assert_eq!(steps, [("step_a", 5), ("step_b", 6), ("step_c", 7)]);
}

#[tokio::test(start_paused = true)]
async fn a_compensated_saga_is_compensated_with_its_reason() {
    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    let engine = engine(&h, Plan::linear(3));

    // A step failed for good.
    let handle = engine.start(plan_saga(), 0).key("declined").await.unwrap();
    let outcome = handle.run_to_end().await.unwrap();
    match &outcome {
        Outcome::Compensated {
            reason:
                CompensationReason::StepFailed {
                    position,
                    step,
                    reason,
                    error,
                },
        } => {
            assert_eq!((*position, step.as_str()), (2, "step_c"));
            assert_eq!(*reason, GiveUpReason::Permanent);
            assert!(error.contains("rejected"), "{error}");
        }
        other => panic!("expected a compensation after step_c failed, got {other:?}"),
    }
    assert_eq!(outcome.status(), SagaStatus::Compensated);
    assert_eq!(handle.wait().await.unwrap(), outcome);
    assert_eq!(
        compensated_positions(&handle.history().await.unwrap()),
        [1, 0]
    );

    // The workflow aborted on its own.
    let withdrawn = engine
        .start(Quote, request("withdrawn"))
        .execute()
        .await
        .unwrap();
    match &withdrawn {
        Outcome::Compensated {
            reason: CompensationReason::Aborted { message },
        } => assert!(
            message.contains("the client withdrew the request"),
            "{message}"
        ),
        other => panic!("expected a compensation after the abort, got {other:?}"),
    }
    assert_eq!(withdrawn.completed(), None);
}

#[tokio::test(start_paused = true)]
async fn a_failed_saga_is_failed_with_its_kind() {
    // A compensation that gives up.
    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    h.script.compensate(0, [Behavior::Permanent]);
    let stuck = engine(&h, Plan::linear(3));
    let handle = stuck.start(plan_saga(), 0).key("stuck").await.unwrap();
    let outcome = handle.run_to_end().await.unwrap();
    match &outcome {
        Outcome::Failed { kind, error } => {
            assert_eq!(*kind, FailureKind::CompensationFailed);
            assert!(error.contains("step_a"), "{error}");
        }
        other => panic!("expected a failed compensation, got {other:?}"),
    }
    assert_eq!(outcome.status(), SagaStatus::Failed);
    assert_eq!(handle.wait().await.unwrap(), outcome);

    // A failure after the pivot: nothing is compensated.
    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    let plan = Plan::linear(3).with(1, |s| s.compensation = saga_core::Compensation::Pivot);
    let pivoting = engine(&h, plan);
    let outcome = pivoting
        .start(plan_saga(), 0)
        .key("after-pivot")
        .execute()
        .await
        .unwrap();
    match &outcome {
        Outcome::Failed { kind, error } => {
            assert_eq!(*kind, FailureKind::AfterPivot);
            assert!(error.contains("step_c"), "{error}");
            assert!(error.contains("step_b"), "{error}");
        }
        other => panic!("expected a failure after the pivot, got {other:?}"),
    }
    assert!(h.ledger.effects_in(Phase::Compensate).is_empty());
}

#[tokio::test(start_paused = true)]
async fn wait_for_ends_without_an_outcome_before_a_durable_timer_and_with_it_after() {
    let h = Harness::new();
    h.script
        .forward(1, [Behavior::RetryAfter(LONG), Behavior::Ok]);
    let engine = engine(&h, Plan::linear(3).with(1, |s| s.policy = fast_policy(3)));
    let handle = engine.start(plan_saga(), 0).key("timer").await.unwrap();

    let RunOutcome::Suspended(due) = engine.run_once(handle.id()).await.unwrap() else {
        panic!("step 1 should have set a durable timer")
    };
    assert_eq!(
        handle.wait_for(Duration::from_secs(60)).await.unwrap(),
        None
    );
    assert!(h.now() < due, "the wait ended before the timer");
    assert_eq!(handle.outcome().await.unwrap(), None);
    assert_eq!(handle.status().await.unwrap(), SagaStatus::Running);

    // A waiter through the timer learns the outcome of the run that follows it.
    let waiter = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.wait_for(LONG * 2).await })
    };
    let outcome = handle.run_to_end().await.unwrap();
    assert!(h.now() >= due, "the retry waited for its timer");
    let Outcome::Completed(outputs) = &outcome else {
        panic!("expected completion after the retry, got {outcome:?}")
    };
    assert_eq!(outputs.len(), 3);
    assert_eq!(waiter.await.unwrap().unwrap(), Some(outcome.clone()));
    assert_eq!(
        handle.wait_for(Duration::from_secs(1)).await.unwrap(),
        Some(outcome)
    );
    assert_eq!(h.ledger.calls_of(1, Phase::Forward).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_handle_on_an_existing_saga_checks_its_type() {
    let h = Harness::new();
    let engine = engine(&h, Plan::linear(2));
    let id = engine
        .start_with::<Quote>(&request("lovelace"), StartOptions::key("quote-lovelace"))
        .await
        .unwrap()
        .id;

    let handle = engine.handle::<Quote>(id).await.unwrap();
    assert_eq!(handle.id(), id);
    assert!(
        !handle.created(),
        "a handle on an existing saga created nothing"
    );
    assert_eq!(handle.run_to_end().await.unwrap(), offer("lovelace"));
    assert_eq!(
        engine
            .handle::<Quote>(id)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap(),
        offer("lovelace")
    );

    let err = engine.handle::<PlanSaga>(id).await.unwrap_err();
    let message = err.to_string();
    match err {
        EngineError::WrongSagaType {
            saga,
            expected,
            actual,
            ..
        } => {
            assert_eq!(saga, id);
            assert_eq!(expected, "scripted");
            assert_eq!(actual, "quote");
        }
        other => panic!("expected WrongSagaType, got {other:?}"),
    }
    assert!(
        message.contains("`quote`") && message.contains("`scripted`"),
        "{message}"
    );

    let unknown = SagaId::random();
    assert!(matches!(
        engine.handle::<Quote>(unknown).await,
        Err(EngineError::NotFound(id)) if id == unknown
    ));
}

#[tokio::test(start_paused = true)]
async fn a_cancel_through_the_handle_compensates() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    // No attempt timeout: the step waits for the test however long the clock runs.
    let engine = engine(&h, Plan::linear(3).with(1, |s| s.timeout = None));
    let handle = engine.start(plan_saga(), 0).key("cancel-me").await.unwrap();
    let runner = {
        let handle = handle.clone();
        tokio::spawn(async move { handle.run_to_end().await })
    };
    gate.entered.notified().await;

    assert_eq!(
        handle.cancel("the customer withdrew").await.unwrap(),
        CancelOutcome::Requested
    );
    gate.release.notify_one();
    let expected = Outcome::Compensated {
        reason: CompensationReason::Cancelled {
            reason: "the customer withdrew".into(),
        },
    };
    assert_eq!(runner.await.unwrap().unwrap(), expected);
    assert_eq!(handle.wait().await.unwrap(), expected);
    let history = handle.history().await.unwrap();
    assert_eq!(compensated_positions(&history), [1, 0]);
    assert_eq!(count(&history, "CancelRequested"), 1);
    assert!(
        h.ledger.calls_of(2, Phase::Forward).is_empty(),
        "no step runs after the cancel"
    );

    // Once it has ended there is nothing to cancel.
    assert_eq!(
        handle.cancel("again").await.unwrap(),
        CancelOutcome::AlreadyFinished(SagaStatus::Compensated)
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancel_through_the_handle_past_the_pivot_is_refused() {
    let h = Harness::new();
    h.script
        .forward(1, [Behavior::RetryAfter(LONG), Behavior::Ok]);
    let plan = Plan::linear(3)
        .with(0, |s| s.compensation = saga_core::Compensation::Pivot)
        .with(1, |s| s.policy = fast_policy(3));
    let engine = engine(&h, plan);
    let handle = engine
        .start(plan_saga(), 0)
        .key("past-pivot")
        .await
        .unwrap();
    assert!(matches!(
        engine.run_once(handle.id()).await.unwrap(),
        RunOutcome::Suspended(_)
    ));

    let events = handle.history().await.unwrap().len();
    match handle.cancel("too late").await {
        Err(EngineError::PastPivot {
            saga,
            step,
            position,
        }) => {
            assert_eq!(saga, handle.id());
            assert_eq!((step.as_str(), position), ("step_a", 0));
        }
        other => panic!("expected the cancel to be refused past the pivot, got {other:?}"),
    }
    assert_eq!(
        handle.history().await.unwrap().len(),
        events,
        "nothing recorded"
    );
    assert!(!handle.state().await.unwrap().cancel_requested);
    let Outcome::Completed(outputs) = handle.run_to_end().await.unwrap() else {
        panic!("it goes forward to its end")
    };
    assert_eq!(outputs.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_output_that_does_not_decode_is_an_encoding_error() {
    let h = Harness::new();
    let engine = h
        .builder(Plan::linear(1))
        .register(ScriptedAsText)
        .build()
        .unwrap();

    // A version 1 saga (a typed start runs the version of the type it names).
    let v1 = engine.start(plan_saga(), 0).key("v1").await.unwrap();
    assert_eq!(v1.state().await.unwrap().version, 1);
    let outcome = v1.run_to_end().await.unwrap();
    assert!(matches!(outcome, Outcome::Completed(ref outputs) if outputs.len() == 1));

    // The same name but another version: no typed handle (its output is a list, not text).
    let err = engine.handle::<ScriptedAsText>(v1.id()).await.unwrap_err();
    assert!(
        matches!(
            &err,
            EngineError::WrongSagaType { expected: "scripted", expected_version: 2, actual, actual_version: 1, .. }
                if actual == "scripted"
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("v1"), "{err}");

    // Decoding the untyped outcome as another type is the same error.
    let untyped = engine.outcome(v1.id()).await.unwrap();
    assert!(matches!(
        Outcome::<u64>::from_untyped(&untyped),
        Err(EngineError::Encoding { .. })
    ));
    assert_eq!(
        Outcome::<Vec<StepOutput>>::from_untyped(&untyped).unwrap(),
        Some(outcome)
    );

    // A version 2 saga decodes as text.
    let v2 = engine
        .start(ScriptedAsText, 7)
        .key("v2")
        .execute()
        .await
        .unwrap();
    assert_eq!(v2, Outcome::Completed("seed 7".to_owned()));
    let running = engine.start(ScriptedAsText, 8).await.unwrap();
    assert_eq!(running.state().await.unwrap().version, 2);
    let untyped = engine.outcome(running.id()).await.unwrap();
    assert_eq!(Outcome::<String>::from_untyped(&untyped).unwrap(), None);
}
