//! Cancel requests and quarantine.

use std::sync::Arc;

use super::{
    LONG, claim_due, claimed, commit_ok, create_finished, create_saga, event, events, keep_running,
    load, owner, state, step,
};
use crate::store::{CancelOutcome, ClaimOutcome, SagaStore, Schedule, StoreError};
use crate::{SagaId, SagaStatus};

/// `request_cancel` on a held saga sets the flag and appends the event, leaves the lease with
/// its holder (the saga does not become due), and the holder's next `renew` and `commit`
/// report `cancel_requested = true`.
pub async fn request_cancel_sets_the_flag_and_reaches_the_holder(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    let cancel = event("cancel-requested");
    let outcome = store.request_cancel(id, cancel.clone()).await;
    assert!(
        matches!(outcome, Ok(CancelOutcome::Requested)),
        "request_cancel of a running saga must be Requested, got {outcome:?}"
    );
    let saga = load(&*store, id).await;
    assert!(saga.cancel_requested, "request_cancel sets the flag");
    assert_eq!(
        saga.lease.map(|l| l.owner).as_deref(),
        Some("owner-a"),
        "request_cancel leaves the lease with its holder"
    );
    assert_eq!(saga.fence, lease.fence, "request_cancel keeps the fence");
    assert_eq!(
        events(&*store, id).await,
        vec![event("started"), cancel],
        "request_cancel appends its event"
    );
    let due = claim_due(&*store, &owner("owner-b"), 10).await;
    assert!(
        due.is_empty(),
        "a held saga must not become due through a cancel request, got {due:?}"
    );

    let renewed = store.renew(&lease, LONG).await.unwrap();
    assert!(
        renewed.cancel_requested,
        "the holder's renew must report the cancel request"
    );
    let committed = commit_ok(&*store, &lease, keep_running("c1", "step", 1)).await;
    assert!(
        committed.cancel_requested,
        "the holder's commit must report the cancel request"
    );
    assert!(
        load(&*store, id).await.cancel_requested,
        "a commit must not clear the cancel flag"
    );
}

/// `request_cancel` on a saga nobody holds (here: sleeping on a one-hour timer) makes it due
/// at once.
pub async fn request_cancel_on_unheld_saga_makes_it_due(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    let t = step(
        "sleep",
        &[event("sleep")],
        state(1),
        SagaStatus::Running,
        Schedule::WakeAfter(LONG),
    );
    commit_ok(&*store, &lease, t).await;
    let due = claim_due(&*store, &owner("worker"), 10).await;
    assert!(
        due.is_empty(),
        "a saga on a one-hour timer is not due yet, got {due:?}"
    );

    let outcome = store.request_cancel(id, event("cancel")).await;
    assert!(
        matches!(outcome, Ok(CancelOutcome::Requested)),
        "request_cancel must be Requested, got {outcome:?}"
    );
    let due = claim_due(&*store, &owner("worker"), 10).await;
    let ids: Vec<SagaId> = due.iter().map(|l| l.saga_id).collect();
    assert_eq!(
        ids,
        vec![id],
        "a cancel request must make an unheld saga due at once"
    );
    assert!(due[0].fence > lease.fence, "the claim raises the fence");
}

/// A second `request_cancel` answers `Requested` again but appends nothing.
pub async fn request_cancel_twice_appends_one_event(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let first = store.request_cancel(id, event("cancel-1")).await;
    assert!(
        matches!(first, Ok(CancelOutcome::Requested)),
        "first request_cancel must be Requested, got {first:?}"
    );
    let second = store.request_cancel(id, event("cancel-2")).await;
    assert!(
        matches!(second, Ok(CancelOutcome::Requested)),
        "second request_cancel must be Requested, got {second:?}"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![event("started"), event("cancel-1")],
        "only the first cancel request appends its event"
    );
    assert!(
        load(&*store, id).await.cancel_requested,
        "the flag stays set"
    );
}

/// `request_cancel` on a finished saga is `AlreadyFinished` with its status; it sets no flag
/// and appends nothing.
pub async fn request_cancel_on_finished_saga_is_already_finished(store: Arc<dyn SagaStore>) {
    let id = create_finished(&*store).await.saga_id;
    let before = load(&*store, id).await;
    let before_events = events(&*store, id).await;
    let outcome = store.request_cancel(id, event("too-late")).await;
    assert!(
        matches!(
            outcome,
            Ok(CancelOutcome::AlreadyFinished(SagaStatus::Completed))
        ),
        "request_cancel of a completed saga must be AlreadyFinished(Completed), got {outcome:?}"
    );
    assert_eq!(
        load(&*store, id).await,
        before,
        "a cancel of a finished saga must change nothing"
    );
    assert_eq!(
        events(&*store, id).await,
        before_events,
        "a cancel of a finished saga must append nothing"
    );
}

/// `quarantine` (no lease needed) sets a saga aside: `load` shows the reason, its lease is
/// gone and it has no due time, `claim_due` never returns it, a claim is `NotRunnable` with
/// the reason, and the former holder's writes are [`StoreError::NotWritable`]. Events are
/// untouched.
pub async fn quarantine_sets_the_saga_aside(store: Arc<dyn SagaStore>) {
    let held = create_saga(&*store).await;
    let lease = claimed(&*store, held, &owner("owner-a")).await;
    let unheld = create_saga(&*store).await;
    let reason = "stored state does not decode: expected value at line 1 column 1";
    for id in [held, unheld] {
        store.quarantine(id, reason).await.unwrap();
        let saga = load(&*store, id).await;
        assert_eq!(
            saga.quarantined.as_deref(),
            Some(reason),
            "load shows the quarantine reason"
        );
        assert_eq!(
            saga.status,
            SagaStatus::Running,
            "quarantine keeps the status"
        );
        assert_eq!(saga.lease, None, "quarantine drops the lease");
        assert_eq!(saga.due_at, None, "a quarantined saga has no due time");
        assert_eq!(
            events(&*store, id).await,
            vec![event("started")],
            "quarantine appends no events"
        );
        match store.claim(id, &owner("owner-b")).await {
            Ok(ClaimOutcome::NotRunnable {
                status,
                quarantined,
            }) => {
                assert_eq!(
                    status,
                    SagaStatus::Running,
                    "NotRunnable reports the status"
                );
                assert_eq!(
                    quarantined.as_deref(),
                    Some(reason),
                    "NotRunnable reports the reason"
                );
            }
            other => panic!("claim of a quarantined saga must be NotRunnable, got {other:?}"),
        }
    }
    let due = claim_due(&*store, &owner("worker"), 10).await;
    assert!(
        due.is_empty(),
        "quarantined sagas must never be due, got {due:?}"
    );

    let before = load(&*store, held).await;
    let commit = store
        .commit(&lease, keep_running("after", "after", 1))
        .await;
    assert!(
        matches!(commit, Err(StoreError::NotWritable { .. })),
        "the former holder's commit to a quarantined saga must be NotWritable, got {commit:?}"
    );
    let renew = store.renew(&lease, LONG).await;
    assert!(
        matches!(renew, Err(StoreError::NotWritable { .. })),
        "the former holder's renew of a quarantined saga must be NotWritable, got {renew:?}"
    );
    assert_eq!(
        load(&*store, held).await,
        before,
        "rejected writes change nothing"
    );
}
