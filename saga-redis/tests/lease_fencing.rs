//! Fencing between coordinators with their own connections: racing claims and commits, and
//! a holder whose lease ran out while it was still working.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use saga_core::store::{ClaimOutcome, CreateOutcome, Lease};
use saga_core::testkit::conformance::{WAIT_BOUND, wait_for};
use saga_core::{SagaId, SagaStore, StoreError};
use saga_redis_testkit::shared_server;
use support::{LONG, event, new_saga, owner, same_data, state, step, store};
use tokio::sync::Barrier;

/// What one racer did in a round.
#[derive(Debug)]
enum Race {
    /// Claimed and committed.
    Won(Lease),
    /// Found the other holding the lease; its write with the token it knew was fenced.
    Lost {
        current_fence: u64,
        current_owner: Option<String>,
    },
}

async fn race(
    store: Arc<dyn SagaStore>,
    barrier: Arc<Barrier>,
    id: SagaId,
    name: &'static str,
) -> Race {
    barrier.wait().await;
    match store.claim(id, &owner(name, LONG)).await.unwrap() {
        ClaimOutcome::Claimed(lease) => {
            store
                .commit(&lease, step(&format!("{name}-commit"), name, 1))
                .await
                .unwrap();
            Race::Won(lease)
        }
        ClaimOutcome::Busy(holder) => {
            assert_ne!(holder.owner, name, "Busy must name the other owner");
            // A coordinator that lost the race but writes anyway, with the token it last
            // knew (the saga had none yet): fenced, and nothing lands.
            let stale = Lease {
                saga_id: id,
                owner: name.to_owned(),
                fence: 0,
            };
            match store
                .commit(&stale, step(&format!("{name}-commit"), name, 2))
                .await
            {
                Err(StoreError::Fenced {
                    fence: 0,
                    current_fence,
                    current_owner,
                    ..
                }) => Race::Lost {
                    current_fence,
                    current_owner,
                },
                other => {
                    panic!("{name}: a commit with a stale fence must be Fenced, got {other:?}")
                }
            }
        }
        other => panic!("{name}: a claim of a running saga must be Claimed or Busy, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_owners_race_to_claim_and_commit_100_times() {
    let url = shared_server().url();
    let first = store(&url, "race").await;
    // Two coordinators: same data, each with its own connection.
    let b: Arc<dyn SagaStore> = Arc::new(same_data(&url, &first).await);
    let a: Arc<dyn SagaStore> = Arc::new(first);
    let mut wins = [0_u32; 2];
    for round in 0..100 {
        let id = SagaId::random();
        assert!(matches!(
            a.create(new_saga(id)).await.unwrap(),
            CreateOutcome::Created { .. }
        ));
        let barrier = Arc::new(Barrier::new(2));
        let (ra, rb) = tokio::join!(
            tokio::spawn(race(Arc::clone(&a), Arc::clone(&barrier), id, "owner-a")),
            tokio::spawn(race(Arc::clone(&b), Arc::clone(&barrier), id, "owner-b")),
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let (winner, loser) = match (&ra, &rb) {
            (
                Race::Won(lease),
                Race::Lost {
                    current_fence,
                    current_owner,
                },
            ) => {
                wins[0] += 1;
                (lease, (current_fence, current_owner))
            }
            (
                Race::Lost {
                    current_fence,
                    current_owner,
                },
                Race::Won(lease),
            ) => {
                wins[1] += 1;
                (lease, (current_fence, current_owner))
            }
            other => panic!("round {round}: exactly one owner must win, got {other:?}"),
        };
        assert_eq!(
            *loser.0, winner.fence,
            "round {round}: Fenced names the winner's token"
        );
        assert_eq!(
            loser.1.as_deref(),
            Some(winner.owner.as_str()),
            "round {round}: Fenced names the winner"
        );
        let events = a.events(id).await.unwrap();
        assert_eq!(
            events,
            vec![event("started"), event(&winner.owner)],
            "round {round}: only the winner's event is stored"
        );
        let saga = a.load(id).await.unwrap().unwrap();
        assert_eq!(
            saga.state,
            state(1),
            "round {round}: the winner's state is stored"
        );
        assert_eq!(
            saga.fence, winner.fence,
            "round {round}: the winner's fence is current"
        );
    }
    assert_eq!(wins[0] + wins[1], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_expired_is_fenced_and_writes_nothing() {
    let url = shared_server().url();
    let slow_store = store(&url, "expiry").await;
    let other_store = same_data(&url, &slow_store).await;
    let id = SagaId::random();
    slow_store.create(new_saga(id)).await.unwrap();
    let slow = match slow_store
        .claim(id, &owner("slow", Duration::from_millis(300)))
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("the first claim must succeed, got {other:?}"),
    };
    slow_store
        .commit(&slow, step("slow-1", "slow-step-1", 1))
        .await
        .unwrap();
    // `slow_store`'s commit gave it a one-hour lease; shorten it again by renewing briefly.
    slow_store
        .renew(&slow, Duration::from_millis(300))
        .await
        .unwrap();

    // The slow holder "pauses"; the other owner takes over once the lease runs out.
    let taken = wait_for(
        "the slow holder's lease to run out",
        WAIT_BOUND,
        async || match other_store.claim(id, &owner("other", LONG)).await.unwrap() {
            ClaimOutcome::Claimed(lease) => Some(lease),
            ClaimOutcome::Busy(holder) => {
                assert_eq!(holder.owner, "slow");
                None
            }
            other => panic!("claim must be Claimed or Busy, got {other:?}"),
        },
    )
    .await;
    assert!(taken.fence > slow.fence, "the takeover raises the fence");
    let before = other_store.load(id).await.unwrap().unwrap();
    let before_events = other_store.events(id).await.unwrap();

    // The slow holder wakes up and tries to go on: every write is fenced.
    let late = slow_store
        .commit(&slow, step("slow-2", "slow-step-2", 2))
        .await;
    match late {
        Err(StoreError::Fenced {
            fence,
            current_fence,
            current_owner,
            ..
        }) => {
            assert_eq!(fence, slow.fence);
            assert_eq!(current_fence, taken.fence);
            assert_eq!(current_owner.as_deref(), Some("other"));
        }
        other => panic!("the late holder's commit must be Fenced, got {other:?}"),
    }
    assert!(matches!(
        slow_store.renew(&slow, LONG).await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(matches!(
        slow_store.release(&slow).await,
        Err(StoreError::Fenced { .. })
    ));
    assert_eq!(
        other_store.load(id).await.unwrap().unwrap(),
        before,
        "nothing the late holder sent is visible"
    );
    assert_eq!(
        other_store.events(id).await.unwrap(),
        before_events,
        "no event of the late holder is stored"
    );
    assert!(!before_events.contains(&event("slow-step-2")));

    other_store
        .commit(&taken, step("other-1", "other-step", 3))
        .await
        .unwrap();
    let after = other_store.load(id).await.unwrap().unwrap();
    assert_eq!(after.state, state(3));
    assert_eq!(after.lease.map(|l| l.owner).as_deref(), Some("other"));
}
