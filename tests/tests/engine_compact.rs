//! Finished sagas are stored compact: a saga that completed or compensated keeps everything
//! but its journal (its history holds the journal), `Engine::state` rebuilds the journal by
//! folding the history and checks the rest against what is stored, and a failed saga (which
//! an operator may retry) keeps its whole state.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use saga_core::{EngineError, SagaState, SagaStatus, SagaStore, StartOptions, StoreError};
use saga_tests::{Behavior, Harness, Plan, PlanSaga, assert_fold_matches, fast_policy};

async fn stored(store: &dyn SagaStore, id: saga_core::SagaId) -> SagaState {
    let saga = store.load(id).await.unwrap().unwrap();
    serde_json::from_str(&saga.state).unwrap()
}

#[tokio::test(start_paused = true)]
async fn completed_and_compensated_sagas_are_stored_without_their_journal() {
    let h = Harness::new();
    let engine = h.engine(Plan::linear(3));
    let done = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    let compact = stored(&h.store, done.id).await;
    assert!(compact.is_compact(), "stored: {compact:?}");
    assert!(compact.journal.is_empty());
    assert_eq!(compact.output, done.output);
    // Read through the engine: the whole journal, equal to the fold of the history.
    let full = assert_fold_matches(&engine, done.id).await;
    assert_eq!(full.journal.len(), 3);
    assert_eq!(full.compact(), compact);
    // The outcome needs no journal.
    assert_eq!(engine.outcome(done.id).await.unwrap(), done);

    let h = Harness::new();
    h.script.forward(2, [Behavior::Permanent]);
    let engine = h.engine(Plan::linear(3));
    let undone = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(undone.status, SagaStatus::Compensated);
    assert!(stored(&h.store, undone.id).await.is_compact());
    let full = assert_fold_matches(&engine, undone.id).await;
    assert_eq!(full.journal.len(), 3, "two done and undone, one failed");
}

#[tokio::test(start_paused = true)]
async fn a_failed_saga_keeps_its_journal_for_an_operator_retry() {
    let h = Harness::new();
    // The compensation of step 0 gives up: the saga ends Failed, to be retried.
    h.script.forward(1, [Behavior::Permanent]);
    h.script.compensate(0, [Behavior::Permanent]);
    let engine = h
        .builder(Plan::linear(2).with(0, |s| s.compensation_policy = fast_policy(1)))
        .build()
        .unwrap();
    let failed = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    assert_eq!(failed.status, SagaStatus::Failed);
    let kept = stored(&h.store, failed.id).await;
    assert!(!kept.is_compact());
    assert!(!kept.journal.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_compact_state_that_disagrees_with_the_history_is_an_error() {
    let h = Harness::new();
    let memory = &h.store;
    let engine = h.engine(Plan::linear(2));
    let done = engine
        .execute::<PlanSaga>(&0, StartOptions::default())
        .await
        .unwrap();
    let mut tampered = stored(memory, done.id).await;
    tampered.output = Some(serde_json::json!("not what the history says"));
    assert!(memory.corrupt_state(done.id, &serde_json::to_string(&tampered).unwrap()));
    match engine.state(done.id).await {
        Err(EngineError::Store(StoreError::Corrupt { saga, problem })) => {
            assert_eq!(saga, done.id);
            assert!(problem.contains("differs from its history"), "{problem}");
        }
        other => panic!("expected a corrupt-state error, got {other:?}"),
    }
}
