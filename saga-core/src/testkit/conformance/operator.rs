//! Operator transitions (retry, abandon) and the wake-up signal.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{
    LONG, WAIT_BOUND, claim_due, claimed, close_to, commit_ok, create_in_status, create_saga,
    event, events, keep_running, load, owner, state, step,
};
use crate::store::{
    CancelOutcome, ClaimOutcome, CommitOutcome, ListQuery, SagaStore, Schedule, StoreError,
    Transition,
};
use crate::{SagaId, SagaStatus};

/// An operator transition that must succeed.
async fn operate(
    store: &dyn SagaStore,
    id: SagaId,
    expected: &[SagaStatus],
    transition: Transition,
) -> CommitOutcome {
    let what = format!("{:?}/{:?}", transition.status, transition.schedule);
    match store.operator_transition(id, expected, transition).await {
        Ok(outcome) => outcome,
        Err(err) => panic!(
            "operator_transition ({what}) of saga {id} expecting {expected:?} must succeed, got {err:?}"
        ),
    }
}

/// Reopens a saga as `Compensating`, due at once.
fn reopen(commit_id: &str) -> Transition {
    step(
        commit_id,
        &[event("operator-retry")],
        state(50),
        SagaStatus::Compensating,
        Schedule::WakeAfter(Duration::ZERO),
    )
}

/// Ends a saga as `Failed`.
fn abandon(commit_id: &str) -> Transition {
    step(
        commit_id,
        &[event("operator-abandon")],
        state(60),
        SagaStatus::Failed,
        Schedule::Finished,
    )
}

/// The ids of `status` in the listing.
async fn listed(store: &dyn SagaStore, status: SagaStatus) -> Vec<SagaId> {
    let page = store
        .list(&ListQuery {
            status: Some(status),
            limit: 100,
            ..ListQuery::default()
        })
        .await
        .unwrap();
    page.sagas.into_iter().map(|row| row.id).collect()
}

/// An operator transition takes the saga from its running holder: the fence is incremented
/// and the lease dropped, so the holder's next commit and renewal are [`StoreError::Fenced`]
/// and land nothing; the transition's events, state and status are stored.
pub async fn operator_transition_fences_out_the_holder(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("worker")).await;
    commit_ok(&*store, &lease, keep_running("w1", "step-1", 1)).await;
    operate(&*store, id, &[SagaStatus::Running], reopen("op-1")).await;

    let saga = load(&*store, id).await;
    assert!(
        saga.fence > lease.fence,
        "an operator transition must increment the fence ({} after {})",
        saga.fence,
        lease.fence
    );
    assert_eq!(saga.lease, None, "an operator transition drops the lease");
    assert_eq!(saga.status, SagaStatus::Compensating, "it sets the status");
    assert_eq!(saga.state, state(50), "it replaces the state");
    let late = store.commit(&lease, keep_running("w2", "step-2", 2)).await;
    assert!(
        matches!(&late, Err(StoreError::Fenced { fence, .. }) if *fence == lease.fence),
        "the former holder's commit after an operator transition must be Fenced, got {late:?}"
    );
    let renewed = store.renew(&lease, LONG).await;
    assert!(
        matches!(renewed, Err(StoreError::Fenced { .. })),
        "the former holder's renew after an operator transition must be Fenced, got {renewed:?}"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![event("started"), event("step-1"), event("operator-retry")],
        "the operator's events follow the holder's; the fenced commit appends nothing"
    );
    assert_eq!(
        load(&*store, id).await,
        saga,
        "a fenced commit writes nothing"
    );
}

/// An operator transition whose expected statuses do not include the saga's is
/// [`StoreError::NotWritable`] (reporting the status) and writes nothing: the holder keeps
/// its lease and fence and can still commit.
pub async fn operator_transition_with_unexpected_status_writes_nothing(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("worker")).await;
    let before = load(&*store, id).await;
    for expected in [
        &[SagaStatus::Failed][..],
        &[],
        &[SagaStatus::Compensating, SagaStatus::Completed],
    ] {
        let refused = store
            .operator_transition(id, expected, reopen("op-refused"))
            .await;
        assert!(
            matches!(
                refused,
                Err(StoreError::NotWritable { saga, status: SagaStatus::Running }) if saga == id
            ),
            "operator_transition expecting {expected:?} of a Running saga must be NotWritable(Running), got {refused:?}"
        );
    }
    assert_eq!(
        load(&*store, id).await,
        before,
        "a refused operator transition writes nothing (state, status, fence, lease, due time)"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![event("started")],
        "a refused operator transition appends no events"
    );
    commit_ok(&*store, &lease, keep_running("w1", "step-1", 1)).await;

    let unknown = store
        .operator_transition(SagaId::random(), &[SagaStatus::Running], reopen("op-x"))
        .await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound(_))),
        "operator_transition of an unknown id must be NotFound, got {unknown:?}"
    );
}

/// An operator transition reopens a `Failed` saga (terminal statuses may be expected): it
/// becomes `Compensating`, moves between the status indexes, leaves the terminal set (purge
/// does not take it) and is due at once, so `claim_due` returns it.
pub async fn operator_transition_reopens_a_failed_saga(store: Arc<dyn SagaStore>) {
    let id = create_in_status(&*store, "conformance retry", SagaStatus::Failed).await;
    assert!(
        claim_due(&*store, &owner("worker"), 10).await.is_empty(),
        "a failed saga is not due"
    );
    let outcome = operate(&*store, id, &[SagaStatus::Failed], reopen("op-retry")).await;
    assert!(!outcome.cancel_requested, "no cancel was requested");

    let saga = load(&*store, id).await;
    assert_eq!(
        saga.status,
        SagaStatus::Compensating,
        "the saga is reopened"
    );
    assert_eq!(saga.state, state(50), "its state is the operator's");
    assert_eq!(saga.lease, None, "a reopened saga has no lease");
    let due_at = saga.due_at.expect("a reopened saga has a due time");
    assert!(
        close_to(due_at, saga.updated_at) && due_at <= saga.updated_at,
        "WakeAfter(ZERO) makes it due at once: due {due_at:?}, written {:?}",
        saga.updated_at
    );
    assert_eq!(
        events(&*store, id).await,
        vec![event("started"), event("failed"), event("operator-retry")],
        "the operator's events are appended"
    );
    assert!(
        listed(&*store, SagaStatus::Compensating)
            .await
            .contains(&id),
        "a reopened saga is listed as Compensating"
    );
    assert!(
        !listed(&*store, SagaStatus::Failed).await.contains(&id),
        "a reopened saga is no longer listed as Failed"
    );
    assert_eq!(
        store.purge(Duration::ZERO, 100).await.unwrap(),
        0,
        "purge must not take a reopened saga"
    );
    let due = claim_due(&*store, &owner("worker"), 10).await;
    assert_eq!(
        due.iter().map(|lease| lease.saga_id).collect::<Vec<_>>(),
        vec![id],
        "claim_due returns the reopened saga"
    );
    assert!(
        due[0].fence > saga.fence,
        "claiming the reopened saga increments the fence again"
    );
}

/// An operator transition finishes a `Running` saga that a worker holds: the saga is
/// terminal, has no lease and no due time, is listed under its new status, is not claimable,
/// refuses the former holder (fenced) and is purgeable.
pub async fn operator_transition_finishes_a_running_saga(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("worker")).await;
    operate(
        &*store,
        id,
        &[SagaStatus::Running, SagaStatus::Compensating],
        abandon("op-abandon"),
    )
    .await;

    let saga = load(&*store, id).await;
    assert_eq!(saga.status, SagaStatus::Failed, "the saga is finished");
    assert_eq!(saga.lease, None, "a finished saga has no lease");
    assert_eq!(saga.due_at, None, "a finished saga leaves the due set");
    assert!(
        claim_due(&*store, &owner("other"), 10).await.is_empty(),
        "claim_due never returns a finished saga"
    );
    match store.claim(id, &owner("other")).await {
        Ok(ClaimOutcome::NotRunnable { status, .. }) => {
            assert_eq!(status, SagaStatus::Failed, "NotRunnable reports the status");
        }
        other => {
            panic!("claim of a saga finished by an operator must be NotRunnable, got {other:?}")
        }
    }
    let late = store.commit(&lease, keep_running("w1", "step", 1)).await;
    assert!(
        matches!(late, Err(StoreError::Fenced { .. })),
        "the former holder's commit must be Fenced, got {late:?}"
    );
    assert!(
        matches!(
            store.request_cancel(id, event("cancel")).await,
            Ok(CancelOutcome::AlreadyFinished(SagaStatus::Failed))
        ),
        "a saga finished by an operator is AlreadyFinished for request_cancel"
    );
    assert!(
        listed(&*store, SagaStatus::Failed).await.contains(&id),
        "it is listed as Failed"
    );
    assert!(
        !listed(&*store, SagaStatus::Running).await.contains(&id),
        "it is no longer listed as Running"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![event("started"), event("operator-abandon")],
        "the operator's events are appended"
    );
    assert_eq!(
        store.purge(Duration::ZERO, 100).await.unwrap(),
        1,
        "a saga finished by an operator is purgeable"
    );
    assert_eq!(store.load(id).await.unwrap(), None, "purge deleted it");
}

/// An operator transition that makes a quarantined saga due releases it from quarantine:
/// `load` shows no reason, and `claim_due` returns it.
pub async fn operator_transition_releases_quarantine_when_making_due(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("worker")).await;
    store.quarantine(id, "state does not decode").await.unwrap();
    assert!(
        claim_due(&*store, &owner("other"), 10).await.is_empty(),
        "a quarantined saga is not due"
    );
    let fixed = step(
        "op-fix",
        &[event("operator-fixed")],
        state(70),
        SagaStatus::Running,
        Schedule::WakeAfter(Duration::ZERO),
    );
    operate(&*store, id, &[SagaStatus::Running], fixed).await;

    let saga = load(&*store, id).await;
    assert_eq!(saga.quarantined, None, "the saga is out of quarantine");
    assert_eq!(saga.state, state(70), "its state is the operator's");
    assert!(saga.due_at.is_some(), "it is due");
    let row = store
        .list(&ListQuery {
            limit: 100,
            ..ListQuery::default()
        })
        .await
        .unwrap()
        .sagas
        .into_iter()
        .find(|row| row.id == id)
        .expect("the saga is listed");
    assert_eq!(
        row.quarantined, None,
        "the listing shows no quarantine reason"
    );
    let due = claim_due(&*store, &owner("other"), 10).await;
    assert_eq!(
        due.iter().map(|lease| lease.saga_id).collect::<Vec<_>>(),
        vec![id],
        "claim_due returns the released saga"
    );
    let late = store.commit(&lease, keep_running("w1", "step", 1)).await;
    assert!(
        matches!(late, Err(StoreError::Fenced { .. })),
        "the holder from before the quarantine stays fenced out, got {late:?}"
    );
}

/// An operator transition with `Continue`, or with a status and schedule that do not go
/// together, is [`StoreError::Invalid`] and writes nothing (no fence increment either).
pub async fn operator_transition_rejects_continue_and_mismatched_schedules(
    store: Arc<dyn SagaStore>,
) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("worker")).await;
    let before = load(&*store, id).await;
    let bad = [
        (SagaStatus::Running, Schedule::Continue { ttl: LONG }),
        (SagaStatus::Compensating, Schedule::Finished),
        (SagaStatus::Failed, Schedule::WakeAfter(Duration::ZERO)),
        (SagaStatus::Completed, Schedule::Continue { ttl: LONG }),
    ];
    for (status, schedule) in bad {
        let transition = step("op-bad", &[event("bad")], state(80), status, schedule);
        let outcome = store
            .operator_transition(id, &SagaStatus::ALL, transition)
            .await;
        assert!(
            matches!(outcome, Err(StoreError::Invalid(_))),
            "operator_transition to {status:?} with {schedule:?} must be Invalid, got {outcome:?}"
        );
    }
    assert_eq!(
        load(&*store, id).await,
        before,
        "an invalid operator transition writes nothing"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![event("started")],
        "an invalid operator transition appends no events"
    );
    commit_ok(&*store, &lease, keep_running("w1", "step-1", 1)).await;
}

/// An operator transition retried with the same commit id (its reply was lost) answers
/// success and writes nothing: the events are appended once, the fence is incremented once,
/// and the retry is not refused although the status is no longer an expected one.
pub async fn operator_transition_retried_with_same_id_applies_once(store: Arc<dyn SagaStore>) {
    let id = create_in_status(&*store, "conformance retry", SagaStatus::Failed).await;
    let retry = step(
        "op-once",
        &[event("operator-retry")],
        state(50),
        SagaStatus::Compensating,
        Schedule::WakeAfter(LONG),
    );
    operate(&*store, id, &[SagaStatus::Failed], retry.clone()).await;
    let after = load(&*store, id).await;
    let again = operate(&*store, id, &[SagaStatus::Failed], retry).await;
    assert!(!again.cancel_requested, "no cancel was requested");
    assert_eq!(
        load(&*store, id).await,
        after,
        "a retried operator transition writes nothing (not even a new fence)"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![event("started"), event("failed"), event("operator-retry")],
        "a retried operator transition appends its events once"
    );
    let other = store
        .operator_transition(id, &[SagaStatus::Failed], reopen("op-other"))
        .await;
    assert!(
        matches!(
            other,
            Err(StoreError::NotWritable {
                status: SagaStatus::Compensating,
                ..
            })
        ),
        "another operator transition is checked against the status again, got {other:?}"
    );
}

/// Waits (bounded) for the wake-up value to change after `what`, and marks it seen.
async fn changes(rx: &mut watch::Receiver<u64>, what: &str) {
    match tokio::time::timeout(WAIT_BOUND, rx.changed()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the wake-up signal closed while the store is alive (after {what})"),
        Err(_) => panic!("the wake-up value did not change within {WAIT_BOUND:?} after {what}"),
    }
    rx.borrow_and_update();
}

/// When a store has a wake-up signal (`wakeups()` is `Some`), its value changes after a
/// saga is created, released, cancelled or reopened by an operator, and every caller gets the
/// same signal; a finished saga is reported on `saga_changes` by a store that has it, on the
/// wake-up signal otherwise. A store that answers `None` has no signal (callers poll), and
/// passes this case trivially.
///
/// Spurious changes are allowed, so the case only checks that a change follows each
/// operation. A signal that needs time to start (a pub/sub subscription) may miss what happens
/// before it is ready; the case warms it up first: it creates a saga and waits for the first
/// change, which such a store gives once it listens (or for the creation itself).
pub async fn wakeups_signal_new_work_and_finished_sagas(store: Arc<dyn SagaStore>) {
    let Some(mut rx) = store.wakeups() else {
        return;
    };
    let mut second = store
        .wakeups()
        .expect("a store with a wake-up signal gives it to every caller");
    second.borrow_and_update();
    create_saga(&*store).await;
    changes(&mut rx, "the first create (warm-up)").await;

    rx.borrow_and_update();
    let id = create_saga(&*store).await;
    changes(&mut rx, "create").await;

    let lease = claimed(&*store, id, &owner("worker")).await;
    rx.borrow_and_update();
    store.release(&lease).await.unwrap();
    changes(&mut rx, "release").await;

    rx.borrow_and_update();
    let outcome = store.request_cancel(id, event("cancel")).await;
    assert!(
        matches!(outcome, Ok(CancelOutcome::Requested)),
        "request_cancel must be Requested, got {outcome:?}"
    );
    changes(&mut rx, "request_cancel").await;

    let lease = claimed(&*store, id, &owner("worker")).await;
    rx.borrow_and_update();
    second.borrow_and_update();
    // A store that names finished sagas (`saga_changes`) reports a finish there; one that
    // does not must report it on the wake-up signal.
    let mut feed = store.saga_changes();
    let done = step(
        "finish",
        &[event("compensated")],
        state(9),
        SagaStatus::Compensated,
        Schedule::Finished,
    );
    commit_ok(&*store, &lease, done).await;
    match &mut feed {
        Some(feed) => {
            let named = tokio::time::timeout(WAIT_BOUND, async {
                loop {
                    match feed.recv().await {
                        Ok(changed) if changed == id => return true,
                        Ok(_) => {}
                        Err(_) => return false,
                    }
                }
            })
            .await;
            assert!(
                matches!(named, Ok(true)),
                "saga_changes must name the finished saga"
            );
        }
        None => {
            changes(&mut rx, "a Finished commit").await;
            changes(&mut second, "a Finished commit (second receiver)").await;
        }
    }

    rx.borrow_and_update();
    operate(&*store, id, &[SagaStatus::Compensated], reopen("op-reopen")).await;
    changes(&mut rx, "an operator transition").await;
}
