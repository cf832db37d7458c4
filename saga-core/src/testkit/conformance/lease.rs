//! Claiming, renewing and releasing leases; `claim_due`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::{
    LONG, SHORT, StoreClock, WAIT_BOUND, claim_due, claimed, commit_ok, create_finished,
    create_saga, event, keep_running, load, owner, state, step, wait_for,
};
use crate::store::{ClaimOutcome, ClaimRequest, SagaStore, Schedule, StoreError};
use crate::{SagaId, SagaStatus, Timestamp};

/// Claiming an unknown id is [`StoreError::NotFound`].
pub async fn claim_unknown_id_is_not_found(store: Arc<dyn SagaStore>) {
    let unknown = SagaId::random();
    match store.claim(unknown, &owner("owner-a")).await {
        Err(StoreError::NotFound(id)) => assert_eq!(id, unknown, "NotFound must name the id"),
        other => panic!("claim of an unknown id must be NotFound, got {other:?}"),
    }
}

/// While one owner holds an unexpired lease, another owner's claim is `Busy` with the
/// holder's name and expiry, and does not disturb the lease (the holder can still commit).
pub async fn claim_while_held_is_busy(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let lease = claimed(&*store, id, &owner("owner-a")).await;
    assert!(
        lease.fence >= 1,
        "the first claim's fence must be at least 1, got {}",
        lease.fence
    );
    let saga = load(&*store, id).await;
    let holder = saga.lease.clone().expect("load shows the lease");
    assert_eq!(holder.owner, "owner-a", "load shows the holder");
    assert_eq!(saga.fence, lease.fence, "load shows the current fence");

    match store.claim(id, &owner("owner-b")).await {
        Ok(ClaimOutcome::Busy(info)) => {
            assert_eq!(info, holder, "Busy must report the holder's lease");
        }
        other => {
            panic!("claim by another owner while the lease is held must be Busy, got {other:?}")
        }
    }
    assert_eq!(
        load(&*store, id).await,
        saga,
        "a Busy claim must change nothing (fence included)"
    );
    commit_ok(&*store, &lease, keep_running("c1", "step", 1)).await;
}

/// The same owner claiming again (a restarted process) gets a new, higher fence, and the old
/// fence is then fenced for commit, renew and release.
pub async fn same_owner_reclaim_fences_the_old_token(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let a = owner("owner-a");
    let old = claimed(&*store, id, &a).await;
    let new = claimed(&*store, id, &a).await;
    assert!(
        new.fence > old.fence,
        "a reclaim must raise the fence: {} then {}",
        old.fence,
        new.fence
    );

    match store.commit(&old, keep_running("stale", "stale", 1)).await {
        Err(StoreError::Fenced {
            saga,
            fence,
            current_fence,
            current_owner,
        }) => {
            assert_eq!(saga, id, "Fenced names the saga");
            assert_eq!(fence, old.fence, "Fenced reports the stale fence");
            assert_eq!(current_fence, new.fence, "Fenced reports the current fence");
            assert_eq!(
                current_owner.as_deref(),
                Some("owner-a"),
                "Fenced reports the current holder"
            );
        }
        other => {
            panic!("commit with the fence replaced by a reclaim must be Fenced, got {other:?}")
        }
    }
    let renewed = store.renew(&old, LONG).await;
    assert!(
        matches!(renewed, Err(StoreError::Fenced { .. })),
        "renew with the old fence must be Fenced, got {renewed:?}"
    );
    let released = store.release(&old).await;
    assert!(
        matches!(released, Err(StoreError::Fenced { .. })),
        "release with the old fence must be Fenced, got {released:?}"
    );
    commit_ok(&*store, &new, keep_running("current", "current", 2)).await;
}

/// Once a lease expires, `load` no longer shows it and another owner's claim succeeds with a
/// higher fence; the old holder is then fenced. Waits out a short lease by polling.
pub async fn claim_after_lease_expiry_gets_a_higher_fence(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let a = ClaimRequest {
        owner: "owner-a".to_owned(),
        ttl: SHORT,
    };
    let old = claimed(&*store, id, &a).await;

    wait_for(
        "load to stop showing the expired lease",
        WAIT_BOUND,
        async || {
            store
                .load(id)
                .await
                .unwrap()
                .expect("the saga exists")
                .lease
                .is_none()
                .then_some(())
        },
    )
    .await;
    let b = owner("owner-b");
    let new = wait_for("the expired lease to be claimable by another owner", WAIT_BOUND, async || {
        match store.claim(id, &b).await.unwrap() {
            ClaimOutcome::Claimed(lease) => Some(lease),
            ClaimOutcome::Busy(holder) if holder.owner == "owner-a" => None,
            other => panic!("claim of a saga with an expiring lease must be Claimed or Busy(owner-a), got {other:?}"),
        }
    })
    .await;
    assert!(
        new.fence > old.fence,
        "a claim after expiry must raise the fence: {} then {}",
        old.fence,
        new.fence
    );
    match store.commit(&old, keep_running("late", "late", 1)).await {
        Err(StoreError::Fenced {
            current_fence,
            current_owner,
            ..
        }) => {
            assert_eq!(current_fence, new.fence, "Fenced reports the new fence");
            assert_eq!(
                current_owner.as_deref(),
                Some("owner-b"),
                "Fenced reports the new holder"
            );
        }
        other => panic!(
            "commit by the holder of an expired, re-claimed lease must be Fenced, got {other:?}"
        ),
    }
}

/// Claiming a finished saga is `NotRunnable` with its status; claiming a quarantined one is
/// `NotRunnable` with its status and the reason.
pub async fn claim_of_finished_or_quarantined_saga_is_not_runnable(store: Arc<dyn SagaStore>) {
    let finished = create_finished(&*store).await.saga_id;
    match store.claim(finished, &owner("owner-b")).await {
        Ok(ClaimOutcome::NotRunnable {
            status,
            quarantined,
        }) => {
            assert_eq!(
                status,
                SagaStatus::Completed,
                "NotRunnable reports the terminal status"
            );
            assert_eq!(quarantined, None, "a finished saga is not quarantined");
        }
        other => panic!("claim of a finished saga must be NotRunnable, got {other:?}"),
    }
    let parked = create_saga(&*store).await;
    store
        .quarantine(parked, "state does not decode")
        .await
        .unwrap();
    match store.claim(parked, &owner("owner-b")).await {
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
                Some("state does not decode"),
                "NotRunnable reports the reason"
            );
        }
        other => panic!("claim of a quarantined saga must be NotRunnable, got {other:?}"),
    }
}

/// `claim_due` returns only due sagas, oldest due time first, at most `limit` of them, and
/// never one that is leased, sleeping on a timer, finished or quarantined; a second
/// `claim_due` by another owner does not return the ones just claimed.
///
/// Four sagas get timers that run out in the opposite order of their creation (100–400 ms);
/// the case reads the store's clock and waits until all four are due before claiming.
pub async fn claim_due_returns_due_sagas_oldest_first(store: Arc<dyn SagaStore>) {
    let clock = StoreClock::new(&store).await;
    let setup = owner("setup");
    let mut timed = Vec::new();
    for (i, millis) in [400, 300, 200, 100].into_iter().enumerate() {
        let id = create_saga(&*store).await;
        let lease = claimed(&*store, id, &setup).await;
        let sleep = Schedule::WakeAfter(Duration::from_millis(millis));
        let t = step(
            &format!("sleep-{i}"),
            &[event("sleeping")],
            state(1),
            SagaStatus::Running,
            sleep,
        );
        commit_ok(&*store, &lease, t).await;
        timed.push(id);
    }
    // Never due during this case.
    let held = create_saga(&*store).await;
    claimed(&*store, held, &owner("holder")).await;
    let finished = create_finished(&*store).await.saga_id;
    let parked = create_saga(&*store).await;
    store.quarantine(parked, "bad data").await.unwrap();
    let sleeping = create_saga(&*store).await;
    let lease = claimed(&*store, sleeping, &setup).await;
    let t = step(
        "sleep",
        &[event("sleeping")],
        state(1),
        SagaStatus::Running,
        Schedule::WakeAfter(LONG),
    );
    commit_ok(&*store, &lease, t).await;

    let mut due_at = std::collections::HashMap::new();
    for id in &timed {
        let at = load(&*store, *id)
            .await
            .due_at
            .expect("a saga on a timer has a due time");
        due_at.insert(*id, at);
    }
    let latest = due_at.values().copied().max().unwrap_or_default();
    wait_for(
        "the store clock to pass the latest timer",
        WAIT_BOUND,
        async || (clock.now().await >= latest).then_some(()),
    )
    .await;

    let first = claim_due(&*store, &owner("worker-1"), 3).await;
    assert_eq!(
        first.len(),
        3,
        "claim_due(3) with four due sagas must return three, got {first:?}"
    );
    let claimed_due: Vec<Timestamp> = first
        .iter()
        .map(|l| {
            *due_at
                .get(&l.saga_id)
                .unwrap_or_else(|| panic!("claim_due returned a saga that is not due: {l:?}"))
        })
        .collect();
    assert!(
        claimed_due.is_sorted(),
        "claim_due must return the oldest due first, got due times {claimed_due:?}"
    );
    let first_ids: HashSet<SagaId> = first.iter().map(|l| l.saga_id).collect();
    assert_eq!(
        first_ids.len(),
        3,
        "claim_due must not return a saga twice: {first:?}"
    );
    let newest_claimed = claimed_due.last().copied().unwrap_or_default();
    for (id, at) in &due_at {
        if !first_ids.contains(id) {
            assert!(
                *at >= newest_claimed,
                "claim_due(3) skipped saga {id} due at {at:?} for one due at {newest_claimed:?}"
            );
        }
    }
    for lease in &first {
        let saga = load(&*store, lease.saga_id).await;
        assert_eq!(
            saga.fence, lease.fence,
            "load shows the fence claim_due took"
        );
        assert_eq!(
            saga.lease.map(|l| l.owner).as_deref(),
            Some("worker-1"),
            "load shows the claim_due owner"
        );
    }

    let second = claim_due(&*store, &owner("worker-2"), 10).await;
    let rest: Vec<SagaId> = timed
        .iter()
        .copied()
        .filter(|id| !first_ids.contains(id))
        .collect();
    let second_ids: Vec<SagaId> = second.iter().map(|l| l.saga_id).collect();
    assert_eq!(
        second_ids, rest,
        "a second claim_due must return only the remaining due saga (not the ones just claimed, nor held {held}, finished {finished}, quarantined {parked} or sleeping {sleeping} ones)"
    );
    let third = claim_due(&*store, &owner("worker-3"), 10).await;
    assert!(
        third.is_empty(),
        "nothing is due any more, claim_due returned {third:?}"
    );
}

/// A saga whose lease expired is due again: another owner's `claim_due` picks it up with a
/// higher fence. Waits out a short lease by polling.
pub async fn claim_due_picks_up_expired_leases(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let a = ClaimRequest {
        owner: "owner-a".to_owned(),
        ttl: SHORT,
    };
    let old = claimed(&*store, id, &a).await;
    let b = owner("owner-b");
    let new = wait_for(
        "claim_due to pick up the expired lease",
        WAIT_BOUND,
        async || {
            let leases = claim_due(&*store, &b, 10).await;
            assert!(
                leases.iter().all(|l| l.saga_id == id),
                "only the expired saga can be due: {leases:?}"
            );
            leases.into_iter().next()
        },
    )
    .await;
    assert!(
        new.fence > old.fence,
        "claim_due after expiry must raise the fence: {} then {}",
        old.fence,
        new.fence
    );
    let stale = store.commit(&old, keep_running("late", "late", 1)).await;
    assert!(
        matches!(stale, Err(StoreError::Fenced { .. })),
        "the expired holder must be fenced, got {stale:?}"
    );
}

/// `renew` extends the lease by the ttl from now (another owner stays `Busy`), and reports
/// no cancel request on a saga without one.
pub async fn renew_extends_the_lease(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let a = ClaimRequest {
        owner: "owner-a".to_owned(),
        ttl: Duration::from_secs(60),
    };
    let lease = claimed(&*store, id, &a).await;
    let before = load(&*store, id)
        .await
        .lease
        .expect("load shows the lease")
        .expires_at;

    let outcome = store.renew(&lease, LONG).await.unwrap();
    assert!(
        !outcome.cancel_requested,
        "renew reports no cancel request on a saga without one"
    );
    let saga = load(&*store, id).await;
    let holder = saga.lease.clone().expect("a renewed lease is held");
    assert_eq!(holder.owner, "owner-a", "renew keeps the holder");
    assert!(
        holder.expires_at > before.plus(Duration::from_secs(1800)),
        "renew for an hour must move the expiry about an hour past the 60 s lease: {before:?} then {:?}",
        holder.expires_at
    );
    assert_eq!(
        saga.due_at,
        Some(holder.expires_at),
        "a held saga is due when its lease expires"
    );
    assert_eq!(saga.fence, lease.fence, "renew keeps the fence");
    match store.claim(id, &owner("owner-b")).await {
        Ok(ClaimOutcome::Busy(info)) => assert_eq!(info, holder, "Busy reports the renewed lease"),
        other => panic!("claim by another owner of a renewed lease must be Busy, got {other:?}"),
    }
    commit_ok(&*store, &lease, keep_running("c1", "step", 1)).await;
}

/// `renew` with a stale fence is [`StoreError::Fenced`] and does not touch the current lease;
/// `renew` of a finished saga is [`StoreError::NotWritable`].
pub async fn renew_with_stale_fence_is_fenced(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let old = claimed(&*store, id, &owner("owner-a")).await;
    store.release(&old).await.unwrap();
    let new = claimed(&*store, id, &owner("owner-b")).await;
    let before = load(&*store, id).await;
    match store.renew(&old, LONG).await {
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
        other => panic!("renew with a stale fence must be Fenced, got {other:?}"),
    }
    assert_eq!(
        load(&*store, id).await,
        before,
        "a fenced renew must change nothing"
    );

    let done = create_finished(&*store).await;
    let renewed = store.renew(&done, LONG).await;
    assert!(
        matches!(
            renewed,
            Err(StoreError::NotWritable {
                status: SagaStatus::Completed,
                ..
            })
        ),
        "renew of a finished saga must be NotWritable(Completed), got {renewed:?}"
    );
}

/// `release` gives the lease up: the saga is due at once and another owner claims it with a
/// higher fence; the old fence is then fenced.
pub async fn release_makes_the_saga_due_at_once(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let old = claimed(&*store, id, &owner("owner-a")).await;
    store.release(&old).await.unwrap();
    let saga = load(&*store, id).await;
    assert_eq!(saga.lease, None, "a released saga has no lease");
    assert_eq!(saga.fence, old.fence, "release keeps the fence");
    assert!(saga.due_at.is_some(), "a released saga has a due time");

    let leases = claim_due(&*store, &owner("owner-b"), 10).await;
    let ids: Vec<SagaId> = leases.iter().map(|l| l.saga_id).collect();
    assert_eq!(ids, vec![id], "a released saga must be due at once");
    assert!(
        leases[0].fence > old.fence,
        "the next claim must raise the fence"
    );

    let again = store.release(&old).await;
    assert!(
        matches!(again, Err(StoreError::Fenced { .. })),
        "release with a stale fence must be Fenced, got {again:?}"
    );
    let late = store.commit(&old, keep_running("late", "late", 1)).await;
    assert!(
        matches!(late, Err(StoreError::Fenced { .. })),
        "commit after release and re-claim must be Fenced, got {late:?}"
    );
    let holder = load(&*store, id).await.lease.expect("owner-b holds it");
    assert_eq!(
        holder.owner, "owner-b",
        "a stale release must not drop the new holder's lease"
    );
}
