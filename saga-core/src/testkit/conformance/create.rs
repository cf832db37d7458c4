//! Creating and loading sagas; unknown ids.

use std::sync::Arc;

use super::{
    SAGA_TYPE, Y2020, claim_due, claimed, close_to, commit_ok, create, create_saga, event, events,
    load, new_saga, owner, state, step, unique,
};
use crate::store::{CreateOutcome, Lease, NewSaga, SagaStore, Schedule, StoreError};
use crate::{SagaId, SagaStatus};

/// A created saga loads back with every field as created (state and events byte for byte),
/// status `Running`, fence 0, no lease, not cancelled or quarantined, and is due at once.
pub async fn create_and_load_round_trip(store: Arc<dyn SagaStore>) {
    let id = SagaId::random();
    // Opaque to the store: JSON with escapes and non-ASCII text, and text that is no JSON.
    let saved_state = r#"{"n":1,"text":"ünïcødé \"quoted\"\n\ttabbed ☃","list":[1,2.5,null]}"#;
    let saved_events = vec![
        event("started"),
        "not json at all: {[ \"unbalanced".to_owned(),
        r#"{"event":"second","detail":"{saga:p07}:state"}"#.to_owned(),
    ];
    let new = NewSaga {
        id,
        saga_type: SAGA_TYPE.to_owned(),
        version: 1,
        idempotency_key: None,
        fingerprint: "fingerprint:{x}/1".to_owned(),
        state: saved_state.to_owned(),
        events: saved_events.clone(),
        claim: None,
    };
    let outcome = store.create(new).await;
    assert!(
        matches!(outcome, Ok(CreateOutcome::Created { lease: None })),
        "create without claim must answer Created without a lease, got {outcome:?}"
    );

    let saga = load(&*store, id).await;
    assert_eq!(saga.id, id, "loaded id");
    assert_eq!(saga.saga_type, SAGA_TYPE, "loaded saga type");
    assert_eq!(saga.status, SagaStatus::Running, "a new saga is Running");
    assert_eq!(
        saga.state, saved_state,
        "the state must round-trip byte for byte"
    );
    assert_eq!(saga.fingerprint, "fingerprint:{x}/1", "loaded fingerprint");
    assert!(!saga.cancel_requested, "a new saga has no cancel request");
    assert_eq!(saga.fence, 0, "the fence is 0 before the first claim");
    assert_eq!(
        saga.lease, None,
        "nobody holds a saga created without claim"
    );
    assert_eq!(saga.quarantined, None, "a new saga is not quarantined");
    assert!(
        saga.updated_at > Y2020,
        "updated_at must be milliseconds since the Unix epoch, got {:?}",
        saga.updated_at
    );
    let due = saga
        .due_at
        .expect("a new saga created without claim must have a due time");
    assert!(
        due <= saga.updated_at,
        "a new saga is due at once: due {due:?}, created {:?}",
        saga.updated_at
    );
    assert_eq!(
        events(&*store, id).await,
        saved_events,
        "events must round-trip byte for byte, in order"
    );

    // Due at once: a worker's claim_due picks it up.
    let worker = owner("worker");
    let leases = claim_due(&*store, &worker, 10).await;
    let ids: Vec<SagaId> = leases.iter().map(|l| l.saga_id).collect();
    assert_eq!(ids, vec![id], "a new saga must be due at once");
    let saga = load(&*store, id).await;
    assert_eq!(
        saga.fence, leases[0].fence,
        "load shows the fence of the latest claim"
    );
    let holder = saga.lease.expect("load shows the lease claim_due took");
    assert_eq!(holder.owner, "worker", "load shows the lease holder");
    assert_eq!(saga.state, saved_state, "claiming must not touch the state");
}

/// Creating again with the same id and fingerprint answers `Existing` with the saga's current
/// status and changes nothing: not the state, not the events, and it takes no lease even when
/// the repeat asks to claim.
pub async fn create_again_with_same_fingerprint_returns_existing(store: Arc<dyn SagaStore>) {
    let key = unique("order:{42} ü");
    let id = SagaId::from_idempotency_key(SAGA_TYPE, &key);
    let first = NewSaga {
        id,
        idempotency_key: Some(key.clone()),
        ..new_saga()
    };
    create(&*store, first.clone()).await;
    let before = load(&*store, id).await;
    let before_events = events(&*store, id).await;

    let again = NewSaga {
        state: state(99),
        events: vec![event("started-again")],
        claim: Some(owner("second-starter")),
        ..first.clone()
    };
    let outcome = store.create(again).await;
    assert!(
        matches!(
            outcome,
            Ok(CreateOutcome::Existing {
                status: SagaStatus::Running
            })
        ),
        "create with an existing id and the same fingerprint must answer Existing(Running), got {outcome:?}"
    );
    assert_eq!(
        load(&*store, id).await,
        before,
        "an idempotent create must change nothing (and take no lease)"
    );
    assert_eq!(
        events(&*store, id).await,
        before_events,
        "an idempotent create must append no events"
    );

    // Once the saga is finished, a repeat reports the terminal status.
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    let done = step(
        "done",
        &[event("completed")],
        state(2),
        SagaStatus::Completed,
        Schedule::Finished,
    );
    commit_ok(&*store, &lease, done).await;
    let outcome = store.create(first).await;
    assert!(
        matches!(
            outcome,
            Ok(CreateOutcome::Existing {
                status: SagaStatus::Completed
            })
        ),
        "create of a finished saga with the same fingerprint must answer Existing(Completed), got {outcome:?}"
    );
}

/// Creating again with the same id and a different fingerprint is
/// [`StoreError::IdempotencyConflict`] naming the saga, and changes nothing.
pub async fn create_with_different_fingerprint_conflicts(store: Arc<dyn SagaStore>) {
    let key = unique("order:{43}");
    let id = SagaId::from_idempotency_key(SAGA_TYPE, &key);
    let first = NewSaga {
        id,
        idempotency_key: Some(key),
        ..new_saga()
    };
    create(&*store, first.clone()).await;
    let before = load(&*store, id).await;
    let before_events = events(&*store, id).await;

    let conflicting = NewSaga {
        fingerprint: "fingerprint-2".to_owned(),
        state: state(7),
        events: vec![event("other-start")],
        claim: Some(owner("other")),
        ..first
    };
    match store.create(conflicting).await {
        Err(StoreError::IdempotencyConflict { saga }) => {
            assert_eq!(saga, id, "the conflict must name the existing saga");
        }
        other => panic!(
            "create with the same id and another fingerprint must be IdempotencyConflict, got {other:?}"
        ),
    }
    assert_eq!(
        load(&*store, id).await,
        before,
        "a conflicting create must change nothing"
    );
    assert_eq!(
        events(&*store, id).await,
        before_events,
        "a conflicting create must append no events"
    );
}

/// Creating with a claim answers `Created` with a lease (fence ≥ 1) for the owner: the saga is
/// held, not due, and another owner's claim is `Busy` with the holder's lease.
pub async fn create_with_claim_leases_it(store: Arc<dyn SagaStore>) {
    let new = NewSaga {
        claim: Some(owner("creator")),
        ..new_saga()
    };
    let id = new.id;
    let lease = create(&*store, new)
        .await
        .expect("a create with claim must return a lease");
    assert_eq!(
        lease,
        Lease {
            saga_id: id,
            owner: "creator".to_owned(),
            fence: lease.fence
        },
        "the lease must name the saga and the creating owner"
    );
    assert!(
        lease.fence >= 1,
        "the first lease's fence must be at least 1, got {}",
        lease.fence
    );

    let saga = load(&*store, id).await;
    assert_eq!(saga.fence, lease.fence, "load shows the lease's fence");
    let holder = saga.lease.clone().expect("load shows the creator's lease");
    assert_eq!(holder.owner, "creator", "load shows the creator as holder");
    assert!(
        holder.expires_at > saga.updated_at,
        "the lease expires after the create"
    );
    assert!(
        close_to(holder.expires_at, saga.updated_at.plus(super::LONG)),
        "the lease runs for the requested ttl from the create: expires {:?}, created {:?}",
        holder.expires_at,
        saga.updated_at
    );
    assert_eq!(
        saga.due_at,
        Some(holder.expires_at),
        "a held saga is due when its lease expires"
    );

    match store.claim(id, &owner("other")).await {
        Ok(crate::store::ClaimOutcome::Busy(info)) => {
            assert_eq!(info, holder, "Busy must report the holder and its expiry");
        }
        other => panic!(
            "claim by another owner of a saga created with claim must be Busy, got {other:?}"
        ),
    }
    let due = claim_due(&*store, &owner("worker"), 10).await;
    assert!(
        due.is_empty(),
        "a saga created with claim must not be due, claim_due returned {due:?}"
    );
    commit_ok(&*store, &lease, super::keep_running("c1", "step", 1)).await;
}

/// Creating with no events is [`StoreError::Invalid`] and creates nothing.
pub async fn create_without_events_is_invalid(store: Arc<dyn SagaStore>) {
    let new = NewSaga {
        events: Vec::new(),
        ..new_saga()
    };
    let id = new.id;
    let outcome = store.create(new).await;
    assert!(
        matches!(outcome, Err(StoreError::Invalid(_))),
        "create with no events must be Invalid, got {outcome:?}"
    );
    let loaded = store.load(id).await.unwrap();
    assert_eq!(loaded, None, "a rejected create must store nothing");
}

/// `load` of an unknown id is `None`; `events` of an unknown id is
/// [`StoreError::NotFound`].
pub async fn events_of_unknown_id_is_not_found(store: Arc<dyn SagaStore>) {
    create_saga(&*store).await;
    let unknown = SagaId::random();
    assert_eq!(
        store.load(unknown).await.unwrap(),
        None,
        "load of an unknown id must be None"
    );
    match store.events(unknown).await {
        Err(StoreError::NotFound(id)) => assert_eq!(id, unknown, "NotFound must name the id"),
        other => panic!("events of an unknown id must be NotFound, got {other:?}"),
    }
}

/// Every write to an unknown id is [`StoreError::NotFound`] and creates nothing:
/// `request_cancel`, `quarantine`, and `commit`, `renew` and `release` with a made-up lease.
pub async fn writes_to_unknown_id_are_not_found(store: Arc<dyn SagaStore>) {
    let unknown = SagaId::random();
    let not_found = |what: &str, result: Result<(), StoreError>| match result {
        Err(StoreError::NotFound(id)) => {
            assert_eq!(id, unknown, "{what}: NotFound must name the id");
        }
        other => panic!("{what} of an unknown id must be NotFound, got {other:?}"),
    };
    not_found(
        "request_cancel",
        store
            .request_cancel(unknown, event("cancel"))
            .await
            .map(drop),
    );
    not_found("quarantine", store.quarantine(unknown, "bad data").await);
    let lease = Lease {
        saga_id: unknown,
        owner: "ghost".to_owned(),
        fence: 1,
    };
    not_found(
        "commit",
        store
            .commit(&lease, super::keep_running("c1", "step", 1))
            .await
            .map(drop),
    );
    not_found("renew", store.renew(&lease, super::LONG).await.map(drop));
    not_found("release", store.release(&lease).await);
    assert_eq!(
        store.load(unknown).await.unwrap(),
        None,
        "writes to an unknown id must create nothing"
    );
}
