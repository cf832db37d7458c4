//! Engine calls beyond running sagas: `start_json`, and the operator actions `retry` and
//! `abandon`.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use saga_core::{
    CompensationReason, Coordinator, Engine, EngineError, EventKind, FailureKind, Phase, Saga,
    SagaContext, SagaError, SagaStatus, SagaStore, StartOptions,
};
use saga_tests::{
    Behavior, Gate, Harness, Plan, PlanSaga, StepOutput, assert_fold_matches, count, events_named,
    fast_policy, kinds,
};
use serde_json::json;

/// A second saga type, so that engines know more than one name.
struct Noop;

impl Saga for Noop {
    type Input = ();
    type Output = ();
    const NAME: &'static str = "noop";

    async fn run(&self, _saga: &mut SagaContext, _input: ()) -> Result<(), SagaError> {
        Ok(())
    }
}

fn engine_with_noop(h: &Harness, plan: Plan) -> Engine {
    h.builder(plan).register(Noop).build().unwrap()
}

// ---------------------------------------------------------------------------------------
// start_json

#[tokio::test(start_paused = true)]
async fn start_json_starts_a_registered_type_by_name() {
    let h = Harness::new();
    let engine = engine_with_noop(&h, Plan::linear(2));
    assert_eq!(engine.saga_types(), ["noop", "scripted"]);

    let started = engine
        .start_json("scripted", json!(7), StartOptions::key("order-7"))
        .await
        .unwrap();
    assert!(started.created);
    // The same request through the typed API finds the same saga.
    let typed = engine
        .start_with::<PlanSaga>(&7, StartOptions::key("order-7"))
        .await
        .unwrap();
    assert_eq!((typed.id, typed.created), (started.id, false));

    let outcome = engine.run_to_end(started.id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let outputs: Vec<StepOutput> = outcome.output().unwrap().unwrap();
    assert_eq!(outputs.iter().map(|o| o.input).collect::<Vec<_>>(), [7, 8]);
    assert_eq!(h.ledger.effects_in(Phase::Forward).len(), 2);
}

#[tokio::test(start_paused = true)]
async fn start_json_of_an_unknown_type_lists_the_known_ones() {
    let h = Harness::new();
    let engine = engine_with_noop(&h, Plan::linear(1));

    let err = engine
        .start_json("payments", json!(1), StartOptions::default())
        .await
        .unwrap_err();
    match err {
        EngineError::UnknownSagaType { name, known } => {
            assert_eq!(name, "payments");
            assert_eq!(known, ["noop", "scripted"]);
        }
        other => panic!("expected UnknownSagaType, got {other:?}"),
    }
    assert_eq!(
        h.store.list(&Default::default()).await.unwrap().sagas.len(),
        0,
        "nothing was stored"
    );
}

#[tokio::test(start_paused = true)]
async fn start_json_refuses_an_input_the_type_cannot_decode_and_stores_nothing() {
    let h = Harness::new();
    let engine = h.engine(Plan::linear(2));
    for bad in [json!({"not": "a number"}), json!(null), json!("seven")] {
        let err = engine
            .start_json("scripted", bad.clone(), StartOptions::key("bad-input"))
            .await
            .unwrap_err();
        let EngineError::InvalidInput {
            saga_type,
            path,
            message,
        } = err
        else {
            panic!("expected InvalidInput for {bad}, got {err:?}")
        };
        assert_eq!(saga_type, "scripted");
        assert_eq!(path, ".");
        assert!(
            message.contains("u32") || message.contains("integer"),
            "{message}"
        );
    }
    let counts = h.store.count_by_status().await.unwrap();
    assert_eq!(
        counts.values().sum::<u64>(),
        0,
        "nothing was stored: {counts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn start_json_with_an_input_the_type_cannot_decode_is_quarantined_when_run() {
    let h = Harness::new();
    let engine = h.engine(Plan::linear(2));
    let started = engine
        .start_json("scripted", json!(7), StartOptions::default())
        .await
        .unwrap();
    // Data written by another version: the stored input no longer decodes.
    let stored = h.store.load(started.id).await.unwrap().unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&stored.state).unwrap();
    state["input"] = json!({"not": "a number"});
    assert!(h.store.corrupt_state(started.id, &state.to_string()));

    let err = engine.run_to_end(started.id).await.unwrap_err();
    let EngineError::Quarantined { saga, reason } = err else {
        panic!("expected quarantine, got {err:?}")
    };
    assert_eq!(saga, started.id);
    assert!(reason.contains("decode"), "{reason}");
    let stored = h.store.load(started.id).await.unwrap().unwrap();
    assert_eq!(stored.quarantined.as_deref(), Some(reason.as_str()));
    assert_eq!(stored.due_at, None, "no worker claims it");
    assert!(h.ledger.calls().is_empty(), "no step ran");
    let history = engine.history(started.id).await.unwrap();
    assert_eq!(
        count(&history, "CompensationStarted"),
        0,
        "{:?}",
        kinds(&history)
    );

    // A coordinator skips it too.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(Coordinator::new(engine.clone()).run(async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop.send(());
    assert_eq!(task.await.unwrap().runs, 0);
}

// ---------------------------------------------------------------------------------------
// retry

#[tokio::test(start_paused = true)]
async fn retry_gives_a_failed_compensation_a_fresh_budget() {
    let h = Harness::new();
    h.script.forward(1, [Behavior::Permanent]);
    h.script.compensate(0, vec![Behavior::Transient; 10]);
    let plan = Plan::linear(2).with(0, |s| s.compensation_policy = fast_policy(3));
    let engine = h.engine(plan);
    let id = engine
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;

    let outcome = engine.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Failed);
    assert_eq!(
        outcome.failure.as_ref().map(|f| f.0),
        Some(FailureKind::CompensationFailed)
    );
    assert_eq!(h.ledger.calls_of(0, Phase::Compensate).len(), 3);

    // The downstream system is fixed: the next compensation attempt succeeds.
    h.script.compensate(
        0,
        [
            Behavior::Transient,
            Behavior::Transient,
            Behavior::Transient,
            Behavior::Ok,
        ],
    );
    let resumed = engine.retry(id, "payments API fixed").await.unwrap();
    assert_eq!(resumed, SagaStatus::Compensating);
    let history = engine.history(id).await.unwrap();
    let retried = events_named(&history, "SagaRetried");
    assert_eq!(retried.len(), 1);
    assert!(matches!(
        &retried[0].kind,
        EventKind::SagaRetried { reason, status: SagaStatus::Compensating } if reason == "payments API fixed"
    ));
    let state = assert_fold_matches(&engine, id).await;
    assert_eq!(state.status, SagaStatus::Compensating);
    assert_eq!(state.failure, None);
    let stored = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(stored.lease, None);
    assert!(
        stored.due_at.is_some_and(|due| due <= h.now()),
        "due at once"
    );

    let outcome = engine.run_to_end(id).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Compensated);
    assert!(matches!(
        outcome.compensation_reason,
        Some(CompensationReason::StepFailed { position: 1, .. })
    ));
    let attempts: Vec<u32> = h
        .ledger
        .calls_of(0, Phase::Compensate)
        .iter()
        .map(|c| c.attempt)
        .collect();
    assert_eq!(
        attempts,
        [1, 2, 3, 1],
        "attempt numbers restart after a retry"
    );
    assert_eq!(h.ledger.effects_in(Phase::Compensate).len(), 1);
    assert_eq!(
        h.ledger.invocations(id, 0, Phase::Forward),
        1,
        "nothing re-ran forward"
    );

    let history = engine.history(id).await.unwrap();
    let names = kinds(&history);
    let failed_at = names.iter().position(|k| *k == "SagaFailed").unwrap();
    let retried_at = names.iter().position(|k| *k == "SagaRetried").unwrap();
    assert_eq!(retried_at, failed_at + 1, "{names:?}");
    assert_eq!(names.last(), Some(&"SagaCompensated"));
    let compensated: Vec<u32> = history
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::StepCompensated {
                position: 0,
                attempt,
                ..
            } => Some(attempt),
            _ => None,
        })
        .collect();
    assert_eq!(compensated, [1]);
    let state = assert_fold_matches(&engine, id).await;
    assert_eq!(state.status, SagaStatus::Compensated);
}

#[tokio::test(start_paused = true)]
async fn retry_refuses_sagas_that_are_not_failed_or_quarantined() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(0, [Behavior::Ok]);
    let engine = h.engine(Plan::linear(1));
    let done = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    let before = engine.history(done.id).await.unwrap().len();
    let err = engine.retry(done.id, "again").await.unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::WrongStatus {
                status: SagaStatus::Completed,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        engine.history(done.id).await.unwrap().len(),
        before,
        "nothing written"
    );

    // A saga that is running (not stuck) cannot be retried either.
    h.script.forward(0, [Behavior::WaitThenOk(gate.clone())]);
    let id = engine
        .start_with::<PlanSaga>(&1, StartOptions::default())
        .await
        .unwrap()
        .id;
    let run = tokio::spawn({
        let engine = engine.clone();
        async move { engine.run_to_end(id).await }
    });
    gate.entered.notified().await;
    let err = engine.retry(id, "again").await.unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::WrongStatus {
                status: SagaStatus::Running,
                ..
            }
        ),
        "{err:?}"
    );
    gate.release.notify_one();
    assert_eq!(run.await.unwrap().unwrap().status, SagaStatus::Completed);

    assert!(matches!(
        engine.retry(saga_core::SagaId::random(), "x").await,
        Err(EngineError::NotFound(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn retry_releases_a_quarantined_saga() {
    let h = Harness::new();
    let plan = Plan::linear(2);
    let client = h.engine(plan.clone());
    let id = client
        .start_with::<PlanSaga>(&3, StartOptions::default())
        .await
        .unwrap()
        .id;
    // A coordinator that does not know the type (an old deployment) quarantines it.
    let old = Engine::builder_shared(std::sync::Arc::new(h.store.clone()))
        .register(Noop)
        .clock(h.clock.clone())
        .owner("old-deployment")
        .build()
        .unwrap();
    let err = old.run_once(id).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::Quarantined { reason, .. } if reason.contains("unknown saga type")),
        "{err:?}"
    );
    let stored = h.store.load(id).await.unwrap().unwrap();
    assert!(stored.quarantined.is_some());
    assert!(matches!(
        client.run_once(id).await,
        Err(EngineError::Quarantined { .. })
    ));

    let resumed = client.retry(id, "deployed the new version").await.unwrap();
    assert_eq!(resumed, SagaStatus::Running);
    let stored = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(stored.quarantined, None);
    assert!(
        stored.due_at.is_some_and(|due| due <= h.now()),
        "due at once"
    );
    let history = client.history(id).await.unwrap();
    assert!(matches!(
        &events_named(&history, "SagaRetried")[0].kind,
        EventKind::SagaRetried {
            status: SagaStatus::Running,
            ..
        }
    ));
    assert_fold_matches(&client, id).await;

    // Any worker picks it up now.
    let leases = h
        .store
        .claim_due(
            &saga_core::store::ClaimRequest {
                owner: "coordinator-new".into(),
                ttl: Duration::from_secs(30),
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(leases.iter().map(|l| l.saga_id).collect::<Vec<_>>(), [id]);
    let outcome = match client.run_claimed(leases[0].clone()).await.unwrap() {
        saga_core::RunOutcome::Finished(outcome) => outcome,
        other => panic!("{other:?}"),
    };
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_fold_matches(&client, id).await;
}

// ---------------------------------------------------------------------------------------
// abandon

#[tokio::test(start_paused = true)]
async fn abandon_fences_out_the_running_holder_and_compensates_nothing() {
    let h = Harness::new();
    let gate = Gate::new();
    h.script.forward(1, [Behavior::WaitThenOk(gate.clone())]);
    let plan = Plan::linear(3);
    let client = h.engine(plan.clone());
    let worker = h.builder(plan).owner("coordinator-a").build().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(
        Coordinator::new(worker)
            .shutdown_grace(Duration::from_secs(3600))
            .run(async {
                let _ = stopped.await;
            }),
    );
    let id = client
        .start_with::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap()
        .id;
    gate.entered.notified().await;
    assert_eq!(client.state(id).await.unwrap().status, SagaStatus::Running);

    client.abandon(id, "customer withdrew").await.unwrap();
    let after_abandon = client.history(id).await.unwrap();
    assert_eq!(after_abandon.last().unwrap().kind.name(), "SagaAbandoned");
    let state = assert_fold_matches(&client, id).await;
    assert_eq!(state.status, SagaStatus::Failed);
    assert_eq!(
        state.failure,
        Some((FailureKind::Abandoned, "customer withdrew".into()))
    );
    let stored_after_abandon = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(stored_after_abandon.lease, None);
    assert_eq!(stored_after_abandon.due_at, None);

    // The blocked step finishes; its run cannot record anything any more.
    gate.release.notify_one();
    let _ = stop.send(());
    let report = coordinator.await.unwrap();
    assert_eq!(report.runs, 1);
    assert_eq!(report.interrupted, 1, "{report:?}");
    assert_eq!(report.finished, 0);

    let history = client.history(id).await.unwrap();
    assert_eq!(history, after_abandon, "nothing after SagaAbandoned");
    let stored = h.store.load(id).await.unwrap().unwrap();
    assert_eq!(stored.state, stored_after_abandon.state);
    assert_eq!(stored.status, SagaStatus::Failed);
    assert!(
        h.ledger.calls_of(2, Phase::Forward).is_empty(),
        "step 2 never ran"
    );
    assert!(
        h.ledger.effects_in(Phase::Compensate).is_empty()
            && h.ledger.calls().iter().all(|c| c.phase == Phase::Forward),
        "no compensation ran"
    );
    assert_eq!(count(&history, "CompensationStarted"), 0);
    let outcome = client.wait(id, Duration::ZERO).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Failed);
    assert_fold_matches(&client, id).await;

    // Abandoned is final: neither retried nor abandoned again.
    assert!(matches!(
        client.retry(id, "undo").await,
        Err(EngineError::WrongStatus {
            status: SagaStatus::Failed,
            ..
        })
    ));
    assert!(matches!(
        client.abandon(id, "twice").await,
        Err(EngineError::WrongStatus {
            status: SagaStatus::Failed,
            ..
        })
    ));
    assert_eq!(client.history(id).await.unwrap(), after_abandon);
}

#[tokio::test(start_paused = true)]
async fn abandon_refuses_finished_sagas_and_ends_failed_ones_for_good() {
    let h = Harness::new();
    let engine = h.engine(Plan::linear(2));
    let done = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    let err = engine.abandon(done.id, "too late").await.unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::WrongStatus {
                status: SagaStatus::Completed,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(single_kind_last(&engine, done.id).await, "SagaCompleted");

    // A Failed saga (its compensation gave up) may be abandoned: it stays Failed, now for
    // good, and its compensation is not tried again.
    h.script.forward(1, [Behavior::Permanent]);
    h.script.compensate(0, [Behavior::Permanent]);
    let failed = engine
        .execute::<PlanSaga>(&1, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(failed.status, SagaStatus::Failed);
    engine.abandon(failed.id, "fixed by hand").await.unwrap();
    let state = assert_fold_matches(&engine, failed.id).await;
    assert_eq!(state.status, SagaStatus::Failed);
    assert_eq!(
        state.failure,
        Some((FailureKind::Abandoned, "fixed by hand".into()))
    );
    assert_eq!(single_kind_last(&engine, failed.id).await, "SagaAbandoned");
    assert_eq!(h.ledger.calls_of(0, Phase::Compensate).len(), 1);
    assert!(matches!(
        engine.retry(failed.id, "again").await,
        Err(EngineError::WrongStatus { .. })
    ));

    // A saga nobody runs yet can be abandoned too; no step ever runs.
    let fresh = engine
        .start_with::<PlanSaga>(&2, StartOptions::default())
        .await
        .unwrap()
        .id;
    engine.abandon(fresh, "never mind").await.unwrap();
    let outcome = engine.run_to_end(fresh).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Failed);
    assert_eq!(h.ledger.invocations(fresh, 0, Phase::Forward), 0);
    assert_fold_matches(&engine, fresh).await;
}

async fn single_kind_last(engine: &Engine, id: saga_core::SagaId) -> &'static str {
    engine
        .history(id)
        .await
        .unwrap()
        .last()
        .unwrap()
        .kind
        .name()
}
