//! Signals: the per-saga inbox, deduplication by key, and waits that a signal ends.

use std::sync::Arc;

use super::{
    LONG, SHORT, WAIT_BOUND, claim_due, claimed, commit_ok, create_finished, create_saga, event,
    events, load, owner, state, step, wait_for,
};
use crate::store::{
    DeliveryOutcome, MAX_SIGNALS_PER_SAGA, SagaStore, Schedule, SignalDelivery, StoreError,
};
use crate::{SagaId, SagaStatus, Timestamp};

/// A delivery of signal `name` with `key` and a payload built from `payload`.
fn signal(name: &str, key: &str, payload: u32) -> SignalDelivery {
    SignalDelivery {
        name: name.to_owned(),
        key: key.to_owned(),
        payload: format!(r#"{{"value":{payload}}}"#),
        at: Timestamp(1_000 + u64::from(payload)),
        event: event(&format!("signal-{name}-{key}")),
    }
}

async fn deliver(store: &dyn SagaStore, id: SagaId, delivery: SignalDelivery) -> DeliveryOutcome {
    let what = format!("{}/{}", delivery.name, delivery.key);
    match store.deliver_signal(id, delivery).await {
        Ok(outcome) => outcome,
        Err(err) => panic!("deliver_signal({what}) to saga {id} must succeed, got {err:?}"),
    }
}

/// A saga held by `owner-a` and then left on a one-hour timer: nobody holds it, not due.
async fn sleeping_saga(store: &dyn SagaStore) -> SagaId {
    let id = create_saga(store).await;
    let lease = claimed(store, id, &owner("owner-a")).await;
    let t = step(
        "sleep",
        &[event("sleep")],
        state(1),
        SagaStatus::Running,
        Schedule::WakeAfter(LONG),
    );
    commit_ok(store, &lease, t).await;
    id
}

/// `deliver_signal` stores each (name, key) once, in delivery order with sequence numbers
/// from 1, appends its event once, answers a repeat with the first sequence number, refuses
/// the same key with another payload (writing nothing), and `signals(after)` reads from a
/// sequence number on.
pub async fn deliver_signal_stores_each_key_once(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let first = deliver(&*store, id, signal("approval", "k1", 1)).await;
    assert_eq!(first, DeliveryOutcome::Delivered { sequence: 1 });
    let again = deliver(&*store, id, signal("approval", "k1", 1)).await;
    assert_eq!(
        again,
        DeliveryOutcome::Duplicate { sequence: 1 },
        "the same name, key and payload again must be a duplicate of the first delivery"
    );
    let conflict = store.deliver_signal(id, signal("approval", "k1", 2)).await;
    assert!(
        matches!(conflict, Err(StoreError::SignalConflict { saga, .. }) if saga == id),
        "the same name and key with another payload must be SignalConflict, got {conflict:?}"
    );
    let other_name = deliver(&*store, id, signal("veto", "k1", 3)).await;
    assert_eq!(
        other_name,
        DeliveryOutcome::Delivered { sequence: 2 },
        "a key is scoped to its signal name"
    );
    let inbox = store.signals(id, 0).await.unwrap();
    let seen: Vec<_> = inbox
        .iter()
        .map(|s| {
            (
                s.sequence,
                s.name.as_str(),
                s.key.as_str(),
                s.payload.as_str(),
                s.at,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, "approval", "k1", r#"{"value":1}"#, Timestamp(1_001)),
            (2, "veto", "k1", r#"{"value":3}"#, Timestamp(1_003)),
        ],
        "signals(0) must return the inbox in delivery order, payloads byte for byte"
    );
    let later = store.signals(id, 1).await.unwrap();
    assert_eq!(
        later.iter().map(|s| s.sequence).collect::<Vec<_>>(),
        vec![2],
        "signals(after) returns only later sequence numbers"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![
            event("started"),
            event("signal-approval-k1"),
            event("signal-veto-k1")
        ],
        "each delivered signal appends its event once; duplicates and conflicts append nothing"
    );
}

/// A signal to a saga nobody holds (here: on a one-hour timer) makes it due at once.
pub async fn deliver_signal_makes_an_unheld_saga_due(store: Arc<dyn SagaStore>) {
    let id = sleeping_saga(&*store).await;
    assert!(
        claim_due(&*store, &owner("worker"), 10).await.is_empty(),
        "a saga on a one-hour timer is not due yet"
    );
    deliver(&*store, id, signal("approval", "k1", 1)).await;
    let due = claim_due(&*store, &owner("worker"), 10).await;
    assert_eq!(
        due.iter().map(|l| l.saga_id).collect::<Vec<_>>(),
        vec![id],
        "a signal must make a saga that nobody holds due at once"
    );
}

/// A signal to a held saga leaves the lease with its holder and does not make it due.
pub async fn deliver_signal_leaves_a_held_saga_with_its_holder(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    deliver(&*store, id, signal("approval", "k1", 1)).await;
    let saga = load(&*store, id).await;
    assert_eq!(
        saga.lease.map(|l| l.owner).as_deref(),
        Some("owner-a"),
        "a signal leaves the lease with its holder"
    );
    assert_eq!(
        saga.fence, lease.fence,
        "a signal does not change the fence"
    );
    assert!(
        claim_due(&*store, &owner("owner-b"), 10).await.is_empty(),
        "a held saga must not become due through a signal"
    );
}

/// `Schedule::AwaitSignal` releases the lease; the saga is due when a signal arrives, at once
/// when the inbox already holds a signal beyond `seen`, and when the timeout runs out.
pub async fn await_signal_ends_with_a_signal_or_the_timeout(store: Arc<dyn SagaStore>) {
    // Waiting with nothing in the inbox: released, not due, until a signal comes.
    let waiting = create_saga(&*store).await;
    let lease = claimed(&*store, waiting, &owner("owner-a")).await;
    let wait = Schedule::AwaitSignal {
        timeout: LONG,
        seen: 0,
    };
    let t = step(
        "wait",
        &[event("wait")],
        state(1),
        SagaStatus::Running,
        wait,
    );
    commit_ok(&*store, &lease, t).await;
    assert_eq!(
        load(&*store, waiting).await.lease,
        None,
        "AwaitSignal releases the lease"
    );
    assert!(
        claim_due(&*store, &owner("worker"), 10).await.is_empty(),
        "a saga waiting an hour for a signal is not due"
    );
    deliver(&*store, waiting, signal("approval", "k1", 1)).await;
    let due = claim_due(&*store, &owner("worker"), 10).await;
    assert_eq!(
        due.iter().map(|l| l.saga_id).collect::<Vec<_>>(),
        vec![waiting],
        "a signal ends a wait at once"
    );

    // A signal that arrived while the holder was still running (after it read the inbox):
    // the wait it commits is due at once.
    let raced = create_saga(&*store).await;
    let lease = claimed(&*store, raced, &owner("owner-a")).await;
    deliver(&*store, raced, signal("approval", "k1", 1)).await;
    let t = step(
        "wait",
        &[event("wait")],
        state(1),
        SagaStatus::Running,
        wait,
    );
    commit_ok(&*store, &lease, t).await;
    let due = claim_due(&*store, &owner("worker"), 10).await;
    assert_eq!(
        due.iter().map(|l| l.saga_id).collect::<Vec<_>>(),
        vec![raced],
        "AwaitSignal with seen = 0 on an inbox holding a signal must be due at once"
    );

    // The holder had read that signal already: the wait holds.
    let read = create_saga(&*store).await;
    let lease = claimed(&*store, read, &owner("owner-a")).await;
    deliver(&*store, read, signal("approval", "k1", 1)).await;
    let seen_one = Schedule::AwaitSignal {
        timeout: LONG,
        seen: 1,
    };
    let t = step(
        "wait",
        &[event("wait")],
        state(1),
        SagaStatus::Running,
        seen_one,
    );
    commit_ok(&*store, &lease, t).await;
    assert!(
        claim_due(&*store, &owner("worker"), 10).await.is_empty(),
        "AwaitSignal with seen = 1 on an inbox of one signal waits for the timeout"
    );

    // No signal at all: due when the timeout runs out.
    let timed = create_saga(&*store).await;
    let lease = claimed(&*store, timed, &owner("owner-a")).await;
    let short = Schedule::AwaitSignal {
        timeout: SHORT,
        seen: 0,
    };
    let t = step(
        "wait",
        &[event("wait")],
        state(1),
        SagaStatus::Running,
        short,
    );
    commit_ok(&*store, &lease, t).await;
    let worker = owner("worker");
    wait_for(
        "claim_due to return the saga whose signal wait timed out",
        WAIT_BOUND,
        async || {
            let leases = claim_due(&*store, &worker, 10).await;
            leases.iter().any(|l| l.saga_id == timed).then_some(())
        },
    )
    .await;
}

/// A signal to a finished saga is `AlreadyFinished` and writes nothing; to an unknown saga
/// it is `NotFound`, as is reading an unknown saga's inbox.
pub async fn deliver_signal_to_finished_or_unknown_saga(store: Arc<dyn SagaStore>) {
    let lease = create_finished(&*store).await;
    let id = lease.saga_id;
    let before = events(&*store, id).await;
    let outcome = store.deliver_signal(id, signal("approval", "k1", 1)).await;
    assert!(
        matches!(
            outcome,
            Ok(DeliveryOutcome::AlreadyFinished(SagaStatus::Completed))
        ),
        "a signal to a completed saga must be AlreadyFinished(Completed), got {outcome:?}"
    );
    assert_eq!(
        events(&*store, id).await,
        before,
        "a signal to a finished saga appends nothing"
    );
    assert!(
        store.signals(id, 0).await.unwrap().is_empty(),
        "a signal to a finished saga is not stored"
    );
    let unknown = SagaId::random();
    let outcome = store
        .deliver_signal(unknown, signal("approval", "k1", 1))
        .await;
    assert!(
        matches!(outcome, Err(StoreError::NotFound(got)) if got == unknown),
        "a signal to an unknown saga must be NotFound, got {outcome:?}"
    );
    let inbox = store.signals(unknown, 0).await;
    assert!(
        matches!(inbox, Err(StoreError::NotFound(got)) if got == unknown),
        "the inbox of an unknown saga must be NotFound, got {inbox:?}"
    );
}

/// A quarantined saga keeps its signals without becoming due; purging a finished saga
/// removes its inbox.
pub async fn signals_of_quarantined_and_purged_sagas(store: Arc<dyn SagaStore>) {
    let id = sleeping_saga(&*store).await;
    store.quarantine(id, "bad data").await.unwrap();
    let outcome = deliver(&*store, id, signal("approval", "k1", 1)).await;
    assert_eq!(outcome, DeliveryOutcome::Delivered { sequence: 1 });
    assert!(
        claim_due(&*store, &owner("worker"), 10).await.is_empty(),
        "a signal must not make a quarantined saga due"
    );
    assert_eq!(store.signals(id, 0).await.unwrap().len(), 1);

    let done = create_saga(&*store).await;
    deliver(&*store, done, signal("approval", "k1", 1)).await;
    let lease = claimed(&*store, done, &owner("finisher")).await;
    let t = step(
        "finish",
        &[event("completed")],
        state(9),
        SagaStatus::Completed,
        Schedule::Finished,
    );
    commit_ok(&*store, &lease, t).await;
    let purged = store.purge(std::time::Duration::ZERO, 1000).await.unwrap();
    assert!(purged >= 1, "purge must delete the finished saga");
    let inbox = store.signals(done, 0).await;
    assert!(
        matches!(inbox, Err(StoreError::NotFound(_))),
        "a purged saga's inbox must be gone (NotFound), got {inbox:?}"
    );
}

/// The inbox holds at most [`MAX_SIGNALS_PER_SAGA`] signals: one more is `InboxFull` and
/// writes nothing.
pub async fn signal_inbox_is_bounded(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    for n in 0..MAX_SIGNALS_PER_SAGA {
        deliver(&*store, id, signal("tick", &format!("k{n}"), 1)).await;
    }
    let over = store
        .deliver_signal(id, signal("tick", "one-more", 1))
        .await;
    assert!(
        matches!(over, Err(StoreError::InboxFull { saga, limit }) if saga == id && limit == MAX_SIGNALS_PER_SAGA),
        "a delivery past MAX_SIGNALS_PER_SAGA must be InboxFull, got {over:?}"
    );
    assert_eq!(
        store.signals(id, 0).await.unwrap().len(),
        MAX_SIGNALS_PER_SAGA,
        "a refused delivery stores nothing"
    );
    assert_eq!(
        events(&*store, id).await.len(),
        MAX_SIGNALS_PER_SAGA + 1,
        "a refused delivery appends no event"
    );
    // The engine's own signals (a child waking its parent) still get through.
    let engine = deliver(&*store, id, signal("saga.child_finished", "child-1", 1)).await;
    assert_eq!(
        engine,
        DeliveryOutcome::Delivered {
            sequence: MAX_SIGNALS_PER_SAGA as u64 + 1
        },
        "an engine signal (name starting with `saga.`) is delivered past the limit"
    );
}
