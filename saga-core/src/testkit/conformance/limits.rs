//! Payload size limits. Each case takes the store's limit: the largest state, event or
//! idempotency result, in bytes, that it accepts.

use std::sync::Arc;

use super::{
    LONG, claimed, commit_ok, create, create_saga, event, events, load, new_saga, owner, step,
};
use crate::SagaStatus;
use crate::store::{GuardClaim, NewSaga, SagaStore, Schedule, StoreError};

/// A payload of exactly `len` bytes (opaque, not JSON).
fn payload(len: usize) -> String {
    "x".repeat(len)
}

/// Asserts `result` is [`StoreError::TooLarge`] reporting `size` and `limit`.
fn assert_too_large<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, StoreError>,
    size: usize,
    limit: usize,
) {
    match result {
        Err(StoreError::TooLarge {
            size: reported,
            limit: reported_limit,
            ..
        }) => {
            assert_eq!(reported, size, "{what}: TooLarge reports the value's size");
            assert_eq!(
                reported_limit, limit,
                "{what}: TooLarge reports the store's limit"
            );
        }
        other => panic!("{what} of {size} bytes (limit {limit}) must be TooLarge, got {other:?}"),
    }
}

/// A create whose state or one of whose events is larger than the limit is
/// [`StoreError::TooLarge`] and creates nothing.
pub async fn oversized_create_is_rejected(store: Arc<dyn SagaStore>, max_payload: usize) {
    let big = max_payload + 1;
    let new = NewSaga {
        state: payload(big),
        ..new_saga()
    };
    let id = new.id;
    assert_too_large(
        "create with an oversized state",
        store.create(new).await,
        big,
        max_payload,
    );
    assert_eq!(
        store.load(id).await.unwrap(),
        None,
        "a rejected create must store nothing"
    );

    let new = NewSaga {
        events: vec![event("started"), payload(big)],
        ..new_saga()
    };
    let id = new.id;
    assert_too_large(
        "create with an oversized event",
        store.create(new).await,
        big,
        max_payload,
    );
    assert_eq!(
        store.load(id).await.unwrap(),
        None,
        "a rejected create must store nothing"
    );
}

/// A commit whose state or one of whose events is larger than the limit is
/// [`StoreError::TooLarge`] and writes nothing; the lease stays usable.
pub async fn oversized_commit_is_rejected(store: Arc<dyn SagaStore>, max_payload: usize) {
    let big = max_payload + 1;
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    let before = load(&*store, id).await;
    let before_events = events(&*store, id).await;
    let running = Schedule::Continue { ttl: LONG };
    let oversized = [
        (
            "state",
            step(
                "big-state",
                &[event("ok")],
                payload(big),
                SagaStatus::Running,
                running,
            ),
        ),
        (
            "event",
            step(
                "big-event",
                &[event("ok"), payload(big)],
                super::state(1),
                SagaStatus::Running,
                running,
            ),
        ),
        (
            "final state",
            step(
                "big-end",
                &[event("done")],
                payload(big),
                SagaStatus::Completed,
                Schedule::Finished,
            ),
        ),
    ];
    for (what, transition) in oversized {
        assert_too_large(
            &format!("commit with an oversized {what}"),
            store.commit(&lease, transition).await,
            big,
            max_payload,
        );
        assert_eq!(
            load(&*store, id).await,
            before,
            "a rejected commit ({what}) must change nothing"
        );
        assert_eq!(
            events(&*store, id).await,
            before_events,
            "a rejected commit ({what}) must append nothing"
        );
    }
    commit_ok(&*store, &lease, super::keep_running("ok", "ok", 1)).await;
}

/// A cancel event or an idempotency result larger than the limit is
/// [`StoreError::TooLarge`] and records nothing.
pub async fn oversized_cancel_event_and_guard_result_are_rejected(
    store: Arc<dyn SagaStore>,
    max_payload: usize,
) {
    let big = max_payload + 1;
    let id = create_saga(&*store).await;
    let before = load(&*store, id).await;
    assert_too_large(
        "request_cancel with an oversized event",
        store.request_cancel(id, payload(big)).await,
        big,
        max_payload,
    );
    assert_eq!(
        load(&*store, id).await,
        before,
        "a rejected cancel must not set the flag"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![event("started")],
        "a rejected cancel must append nothing"
    );

    let key = super::unique("big-result");
    let token = match store.guard_claim(&key, "fp-1", LONG).await.unwrap() {
        GuardClaim::Claimed { token } => token,
        other => panic!("guard_claim of a free key must be Claimed, got {other:?}"),
    };
    let result = store
        .guard_complete(&key, &token, &payload(big), LONG)
        .await;
    assert_too_large(
        "guard_complete with an oversized result",
        result,
        big,
        max_payload,
    );
    let state = store.guard_claim(&key, "fp-1", LONG).await.unwrap();
    assert_eq!(
        state,
        GuardClaim::InProgress,
        "a rejected complete must leave the claim in progress"
    );
}

/// Values of exactly the limit are accepted and round-trip: a created state and event, a
/// committed state and event, an idempotency result.
pub async fn payloads_at_the_limit_are_accepted(store: Arc<dyn SagaStore>, max_payload: usize) {
    let full = payload(max_payload);
    let new = NewSaga {
        state: full.clone(),
        events: vec![full.clone()],
        ..new_saga()
    };
    let id = new.id;
    create(&*store, new).await;
    assert_eq!(
        load(&*store, id).await.state.len(),
        max_payload,
        "a state at the limit is stored whole"
    );
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    let t = step(
        "full",
        std::slice::from_ref(&full),
        full.clone(),
        SagaStatus::Running,
        Schedule::Continue { ttl: LONG },
    );
    commit_ok(&*store, &lease, t).await;
    let stored = events(&*store, id).await;
    assert_eq!(stored.len(), 2, "both events at the limit are stored");
    assert!(
        stored.iter().all(|e| *e == full),
        "events at the limit round-trip"
    );

    let key = super::unique("full-result");
    let token = match store.guard_claim(&key, "fp-1", LONG).await.unwrap() {
        GuardClaim::Claimed { token } => token,
        other => panic!("guard_claim of a free key must be Claimed, got {other:?}"),
    };
    store
        .guard_complete(&key, &token, &full, LONG)
        .await
        .unwrap();
    match store.guard_claim(&key, "fp-1", LONG).await.unwrap() {
        GuardClaim::Completed { result } => {
            assert!(result == full, "a result at the limit round-trips");
        }
        other => panic!("a completed key must be Completed, got {other:?}"),
    }
}
