//! Committing transitions.

use std::sync::Arc;

use super::{
    LONG, SHORT, WAIT_BOUND, claim_due, claimed, close_to, commit_ok, create_finished, create_saga,
    event, events, keep_running, load, owner, state, step, wait_for,
};
use crate::store::{ClaimOutcome, SagaStore, Schedule, StoreError};
use crate::{SagaId, SagaStatus};

/// Commits append their events in order after the existing ones and replace the state and
/// status, visible through `load` and `events`, byte for byte.
pub async fn commit_appends_events_and_replaces_state(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    let created = load(&*store, id).await;
    let first_state = r#"{"n":1,"steps":["créer"]}"#.to_owned();
    let first = step(
        "c1",
        &[event("step-1-started"), event("step-1-succeeded")],
        first_state.clone(),
        SagaStatus::Running,
        Schedule::Continue { ttl: LONG },
    );
    let outcome = commit_ok(&*store, &lease, first).await;
    assert!(
        !outcome.cancel_requested,
        "commit reports no cancel request on a saga without one"
    );
    let saga = load(&*store, id).await;
    assert_eq!(
        saga.state, first_state,
        "commit replaces the state byte for byte"
    );
    assert_eq!(saga.status, SagaStatus::Running, "commit sets the status");
    assert!(
        saga.updated_at >= created.updated_at,
        "commit moves updated_at forward"
    );

    let second_state = r#"{"n":2,"compensating":true}"#.to_owned();
    let second = step(
        "c2",
        &[event("compensation-started")],
        second_state.clone(),
        SagaStatus::Compensating,
        Schedule::Continue { ttl: LONG },
    );
    commit_ok(&*store, &lease, second).await;
    let saga = load(&*store, id).await;
    assert_eq!(saga.state, second_state, "the latest commit's state wins");
    assert_eq!(
        saga.status,
        SagaStatus::Compensating,
        "the latest commit's status wins"
    );
    assert_eq!(saga.fence, lease.fence, "commits keep the fence");
    assert_eq!(
        events(&*store, id).await,
        vec![
            event("started"),
            event("step-1-started"),
            event("step-1-succeeded"),
            event("compensation-started"),
        ],
        "events are the creation's, then each commit's, in order"
    );
}

/// A commit with a stale fence is [`StoreError::Fenced`] (reporting the current fence and
/// holder) and writes nothing: not events, state, status, lease or due time; not even a
/// terminal one.
pub async fn commit_with_stale_fence_writes_nothing(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let old = claimed(&*store, id, &owner("owner-a")).await;
    store.release(&old).await.unwrap();
    let new = claimed(&*store, id, &owner("owner-b")).await;
    commit_ok(&*store, &new, keep_running("b1", "b-step", 1)).await;
    let before = load(&*store, id).await;
    let before_events = events(&*store, id).await;

    let stale = [
        keep_running("a1", "a-step", 7),
        step(
            "a2",
            &[event("a-done")],
            state(8),
            SagaStatus::Completed,
            Schedule::Finished,
        ),
        step(
            "a3",
            &[event("a-sleep")],
            state(9),
            SagaStatus::Running,
            Schedule::WakeAfter(SHORT),
        ),
    ];
    for transition in stale {
        let what = format!("{:?}", transition.schedule);
        match store.commit(&old, transition).await {
            Err(StoreError::Fenced {
                saga,
                fence,
                current_fence,
                current_owner,
            }) => {
                assert_eq!(
                    (saga, fence, current_fence),
                    (id, old.fence, new.fence),
                    "Fenced reports saga, stale and current fence"
                );
                assert_eq!(
                    current_owner.as_deref(),
                    Some("owner-b"),
                    "Fenced reports the current holder"
                );
            }
            other => panic!("commit ({what}) with a stale fence must be Fenced, got {other:?}"),
        }
        assert_eq!(
            load(&*store, id).await,
            before,
            "a fenced commit ({what}) must change nothing"
        );
        assert_eq!(
            events(&*store, id).await,
            before_events,
            "a fenced commit ({what}) must append nothing"
        );
    }
    commit_ok(&*store, &new, keep_running("b2", "b-step-2", 2)).await;
}

/// A commit retried with the same `commit_id` (its reply was lost) answers success and is
/// applied once: no duplicated events. This holds for a `Continue`, a `WakeAfter` (lease
/// already released) and a `Finished` commit (saga already terminal).
pub async fn commit_retried_with_same_id_applies_once(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    let first = step(
        "commit-1",
        &[event("e1"), event("e2")],
        state(1),
        SagaStatus::Running,
        Schedule::Continue { ttl: LONG },
    );
    commit_ok(&*store, &lease, first.clone()).await;
    commit_ok(&*store, &lease, first).await;
    assert_eq!(
        events(&*store, id).await,
        vec![event("started"), event("e1"), event("e2")],
        "a retried commit must not append its events again"
    );

    commit_ok(&*store, &lease, keep_running("commit-2", "e3", 2)).await;
    let done = step(
        "commit-3",
        &[event("done")],
        state(3),
        SagaStatus::Completed,
        Schedule::Finished,
    );
    commit_ok(&*store, &lease, done.clone()).await;
    let outcome = store.commit(&lease, done).await;
    assert!(
        outcome.is_ok(),
        "a retried final commit must answer success, not NotWritable: {outcome:?}"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![
            event("started"),
            event("e1"),
            event("e2"),
            event("e3"),
            event("done")
        ],
        "a retried final commit must not append its events again"
    );
    assert_eq!(
        load(&*store, id).await.status,
        SagaStatus::Completed,
        "the saga is finished"
    );

    let sleeper = create_saga(&*store).await;
    let lease = claimed(&*store, sleeper, &owner("owner-a")).await;
    let sleep = step(
        "sleep-1",
        &[event("sleep")],
        state(1),
        SagaStatus::Running,
        Schedule::WakeAfter(LONG),
    );
    commit_ok(&*store, &lease, sleep.clone()).await;
    let before = load(&*store, sleeper).await;
    commit_ok(&*store, &lease, sleep).await;
    assert_eq!(
        load(&*store, sleeper).await,
        before,
        "a retried WakeAfter commit must change nothing"
    );
    assert_eq!(
        events(&*store, sleeper).await,
        vec![event("started"), event("sleep")],
        "a retried WakeAfter commit must not append again"
    );
}

/// A new commit (new `commit_id`) to a finished saga, even with its last fence, is
/// [`StoreError::NotWritable`] with its status, and writes nothing.
pub async fn commit_to_finished_saga_is_not_writable(store: Arc<dyn SagaStore>) {
    let lease = create_finished(&*store).await;
    let id = lease.saga_id;
    let before = load(&*store, id).await;
    let before_events = events(&*store, id).await;
    for transition in [
        keep_running("after-end-1", "late", 5),
        step(
            "after-end-2",
            &[event("late")],
            state(6),
            SagaStatus::Failed,
            Schedule::Finished,
        ),
    ] {
        match store.commit(&lease, transition).await {
            Err(StoreError::NotWritable { saga, status }) => {
                assert_eq!(
                    (saga, status),
                    (id, SagaStatus::Completed),
                    "NotWritable reports saga and status"
                );
            }
            other => panic!("commit to a finished saga must be NotWritable, got {other:?}"),
        }
    }
    assert_eq!(
        load(&*store, id).await,
        before,
        "a rejected commit must change nothing"
    );
    assert_eq!(
        events(&*store, id).await,
        before_events,
        "a rejected commit must append nothing"
    );
}

/// `Schedule::Continue { ttl }` extends the holder's lease to `ttl` from the commit: another
/// owner is `Busy`, and the saga is not due. The lease was claimed for 200 ms, so without the
/// extension it would have lapsed.
pub async fn commit_continue_extends_the_lease(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let a = crate::store::ClaimRequest {
        owner: "owner-a".to_owned(),
        ttl: SHORT,
    };
    let lease = claimed(&*store, id, &a).await;
    commit_ok(&*store, &lease, keep_running("c1", "step", 1)).await;
    let saga = load(&*store, id).await;
    let holder = saga.lease.clone().expect("Continue keeps the lease");
    assert_eq!(holder.owner, "owner-a", "Continue keeps the holder");
    assert!(
        close_to(holder.expires_at, saga.updated_at.plus(LONG)),
        "Continue {{ ttl }} must set the expiry to ttl after the commit: expires {:?}, committed {:?}",
        holder.expires_at,
        saga.updated_at
    );
    assert_eq!(
        saga.due_at,
        Some(holder.expires_at),
        "a held saga is due when its lease expires"
    );
    match store.claim(id, &owner("owner-b")).await {
        Ok(ClaimOutcome::Busy(info)) => assert_eq!(info, holder, "Busy reports the extended lease"),
        other => panic!("claim by another owner after Continue must be Busy, got {other:?}"),
    }
    let due = claim_due(&*store, &owner("owner-b"), 10).await;
    assert!(
        due.is_empty(),
        "a saga held through Continue must not be due, got {due:?}"
    );
}

/// `Schedule::WakeAfter(delay)` releases the lease and sets a durable timer: right after a
/// one-hour timer the saga is not due (but can still be claimed by id); a 200 ms timer makes
/// it due once the delay passes (polled).
pub async fn commit_wake_after_releases_the_lease_until_due(store: Arc<dyn SagaStore>) {
    let far = create_saga(&*store).await;
    let far_lease = claimed(&*store, far, &owner("owner-a")).await;
    let t = step(
        "far",
        &[event("sleep-long")],
        state(1),
        SagaStatus::Running,
        Schedule::WakeAfter(LONG),
    );
    commit_ok(&*store, &far_lease, t).await;
    let saga = load(&*store, far).await;
    assert_eq!(saga.lease, None, "WakeAfter releases the lease");
    let due = saga.due_at.expect("a saga on a timer has a due time");
    assert!(
        close_to(due, saga.updated_at.plus(LONG)),
        "WakeAfter(delay) must set the due time to delay after the commit: due {due:?}, committed {:?}",
        saga.updated_at
    );
    let leases = claim_due(&*store, &owner("worker"), 10).await;
    assert!(
        leases.is_empty(),
        "a saga whose one-hour timer was just set must not be due, got {leases:?}"
    );

    let near = create_saga(&*store).await;
    let near_lease = claimed(&*store, near, &owner("owner-a")).await;
    let t = step(
        "near",
        &[event("sleep-short")],
        state(1),
        SagaStatus::Running,
        Schedule::WakeAfter(SHORT),
    );
    commit_ok(&*store, &near_lease, t).await;
    let worker = owner("worker");
    let woken = wait_for(
        "claim_due to return the saga whose timer ran out",
        WAIT_BOUND,
        async || {
            let leases = claim_due(&*store, &worker, 10).await;
            assert!(
                leases.iter().all(|l| l.saga_id == near),
                "only the short timer can run out: {leases:?}"
            );
            leases.into_iter().next()
        },
    )
    .await;
    assert!(woken.fence > near_lease.fence, "waking raises the fence");

    // A timer does not lock the saga: an explicit claim by id takes it at once.
    let taken = claimed(&*store, far, &owner("owner-b")).await;
    assert!(
        taken.fence > far_lease.fence,
        "a claim after WakeAfter raises the fence"
    );
    let late = store
        .commit(&far_lease, keep_running("late", "late", 2))
        .await;
    assert!(
        matches!(late, Err(StoreError::Fenced { .. })),
        "the previous holder must be fenced, got {late:?}"
    );
}

/// `Schedule::Finished` with a terminal status ends the saga: the status is set, the lease
/// released, it leaves the due set (`due_at` is `None`, `claim_due` never returns it) and a
/// claim is `NotRunnable`. Checked for each terminal status.
pub async fn commit_finished_ends_the_saga(store: Arc<dyn SagaStore>) {
    let mut finished = Vec::new();
    for status in [
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Failed,
    ] {
        let id = create_saga(&*store).await;
        let lease = claimed(&*store, id, &owner("owner-a")).await;
        let t = step(
            "end",
            &[event(status.as_str())],
            state(5),
            status,
            Schedule::Finished,
        );
        commit_ok(&*store, &lease, t).await;
        let saga = load(&*store, id).await;
        assert_eq!(saga.status, status, "Finished sets the status");
        assert_eq!(saga.lease, None, "Finished releases the lease");
        assert_eq!(saga.due_at, None, "a finished saga has no due time");
        assert_eq!(saga.state, state(5), "Finished writes the state");
        match store.claim(id, &owner("owner-b")).await {
            Ok(ClaimOutcome::NotRunnable {
                status: reported,
                quarantined: None,
            }) => {
                assert_eq!(reported, status, "NotRunnable reports the terminal status");
            }
            other => panic!("claim of a {status} saga must be NotRunnable, got {other:?}"),
        }
        finished.push(id);
    }
    let leases = claim_due(&*store, &owner("worker"), 10).await;
    let ids: Vec<SagaId> = leases.iter().map(|l| l.saga_id).collect();
    assert!(
        ids.is_empty(),
        "finished sagas {finished:?} must never be due, claim_due returned {ids:?}"
    );
}

/// A transition whose status and schedule do not go together — a terminal status with
/// `Continue` or `WakeAfter`, a non-terminal status with `Finished` — is
/// [`StoreError::Invalid`] and writes nothing; the lease stays usable.
pub async fn commit_with_mismatched_status_and_schedule_is_invalid(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    let before = load(&*store, id).await;
    let before_events = events(&*store, id).await;
    let mismatched = [
        (SagaStatus::Completed, Schedule::Continue { ttl: LONG }),
        (SagaStatus::Failed, Schedule::WakeAfter(SHORT)),
        (SagaStatus::Running, Schedule::Finished),
        (SagaStatus::Compensating, Schedule::Finished),
    ];
    for (i, (status, schedule)) in mismatched.into_iter().enumerate() {
        let t = step(
            &format!("bad-{i}"),
            &[event("bad")],
            state(9),
            status,
            schedule,
        );
        let result = store.commit(&lease, t).await;
        assert!(
            matches!(result, Err(StoreError::Invalid(_))),
            "commit with status {status} and schedule {schedule:?} must be Invalid, got {result:?}"
        );
        assert_eq!(
            load(&*store, id).await,
            before,
            "an invalid commit ({status}, {schedule:?}) must change nothing"
        );
        assert_eq!(
            events(&*store, id).await,
            before_events,
            "an invalid commit must append nothing"
        );
    }
    commit_ok(&*store, &lease, keep_running("good", "good", 1)).await;
}
