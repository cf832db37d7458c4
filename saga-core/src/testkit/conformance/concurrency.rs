//! Races: many tasks on a multi-thread runtime hit the same saga or key at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::Barrier;
use tokio::task::JoinSet;

use super::{claimed, create_saga, event, events, load, new_saga, owner, state, step};
use crate::store::{
    CancelOutcome, ClaimOutcome, CreateOutcome, NewSaga, SagaStore, Schedule, StoreError,
};
use crate::{SagaId, SagaStatus};

/// Racing tasks per round.
const RACERS: usize = 16;

/// Waits for every task; a panicking task fails the case with its panic.
async fn join_all<T: 'static>(mut tasks: JoinSet<T>) -> Vec<T> {
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(value) => results.push(value),
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
    results
}

/// 16 owners race to claim the same fresh saga, 50 times: each round exactly one gets the
/// lease (with fence ≥ 1) and every other one is `Busy` with the winner's name.
pub async fn concurrent_claims_have_one_winner(store: Arc<dyn SagaStore>) {
    for round in 0..50 {
        let id = create_saga(&*store).await;
        let barrier = Arc::new(Barrier::new(RACERS));
        let mut tasks = JoinSet::new();
        for racer in 0..RACERS {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            tasks.spawn(async move {
                barrier.wait().await;
                store.claim(id, &owner(&format!("racer-{racer}"))).await
            });
        }
        let outcomes = join_all(tasks).await;
        let winners: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match o {
                Ok(ClaimOutcome::Claimed(lease)) => Some(lease.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one of {RACERS} racing claims must win, got {outcomes:?}"
        );
        let winner = &winners[0];
        assert!(
            winner.fence >= 1,
            "round {round}: the winner's fence must be at least 1"
        );
        for outcome in &outcomes {
            match outcome {
                Ok(ClaimOutcome::Claimed(_)) => {}
                Ok(ClaimOutcome::Busy(holder)) => {
                    assert_eq!(
                        holder.owner, winner.owner,
                        "round {round}: Busy must name the winner"
                    );
                }
                other => panic!("round {round}: a losing claim must be Busy, got {other:?}"),
            }
        }
        assert_eq!(
            load(&*store, id).await.fence,
            winner.fence,
            "round {round}: the winner's fence is current"
        );
    }
}

/// 16 commits race on one saga, half with a stale fence and half with the current one, 10
/// times: every stale commit is [`StoreError::Fenced`], every current one lands, the events
/// are exactly the current commits' (each once), and the state is the one of the commit
/// whose event is last (events and state are written together).
pub async fn concurrent_commits_land_only_with_the_current_fence(store: Arc<dyn SagaStore>) {
    for round in 0..10 {
        let id = create_saga(&*store).await;
        let stale = claimed(&*store, id, &owner("owner-a")).await;
        store.release(&stale).await.unwrap();
        let current = claimed(&*store, id, &owner("owner-b")).await;
        let barrier = Arc::new(Barrier::new(RACERS));
        let mut tasks = JoinSet::new();
        for racer in 0..RACERS {
            let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
            let lease = if racer % 2 == 0 {
                stale.clone()
            } else {
                current.clone()
            };
            tasks.spawn(async move {
                let label = format!("racer-{racer}");
                let n = u32::try_from(racer).unwrap_or(u32::MAX);
                let t = step(
                    &label,
                    &[event(&label)],
                    state(n),
                    SagaStatus::Running,
                    Schedule::Continue { ttl: super::LONG },
                );
                barrier.wait().await;
                (racer, store.commit(&lease, t).await)
            });
        }
        let mut landed = HashSet::new();
        for (racer, result) in join_all(tasks).await {
            match (racer % 2 == 0, result) {
                (true, Err(StoreError::Fenced { current_fence, .. })) => {
                    assert_eq!(
                        current_fence, current.fence,
                        "round {round}: Fenced reports the current fence"
                    );
                }
                (false, Ok(_)) => {
                    landed.insert(event(&format!("racer-{racer}")));
                }
                (stale, other) => panic!(
                    "round {round}: racer {racer} ({} fence) got {other:?}",
                    if stale { "stale" } else { "current" }
                ),
            }
        }
        let stored = events(&*store, id).await;
        assert_eq!(
            stored[0],
            event("started"),
            "round {round}: the first event stays first"
        );
        let appended: Vec<&String> = stored[1..].iter().collect();
        assert_eq!(
            appended.len(),
            RACERS / 2,
            "round {round}: exactly the current fence's commits append, got {stored:?}"
        );
        let appended_set: HashSet<String> = appended.iter().map(|e| (*e).clone()).collect();
        assert_eq!(
            appended_set, landed,
            "round {round}: each current commit appends its event once"
        );
        let last = stored.last().cloned().unwrap_or_default();
        let saga = load(&*store, id).await;
        let racer: u32 = last
            .trim_start_matches(r#"{"event":"racer-"#)
            .trim_end_matches(r#""}"#)
            .parse()
            .unwrap_or_else(|_| panic!("round {round}: unexpected last event {last}"));
        assert_eq!(
            saga.state,
            state(racer),
            "round {round}: the state must be the one written with the last event"
        );
    }
}

/// 8 owners call `claim_due` concurrently, repeatedly, on 40 due sagas: every saga is
/// claimed exactly once in all.
pub async fn concurrent_claim_due_claims_each_saga_once(store: Arc<dyn SagaStore>) {
    let mut all = HashSet::new();
    for _ in 0..40 {
        all.insert(create_saga(&*store).await);
    }
    let workers = 8;
    let barrier = Arc::new(Barrier::new(workers));
    let mut tasks = JoinSet::new();
    for worker in 0..workers {
        let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
        tasks.spawn(async move {
            let request = owner(&format!("worker-{worker}"));
            barrier.wait().await;
            let mut claimed = Vec::new();
            loop {
                let leases = store.claim_due(&request, 3).await.unwrap();
                if leases.is_empty() {
                    return claimed;
                }
                claimed.extend(leases);
            }
        });
    }
    let mut seen: HashMap<SagaId, String> = HashMap::new();
    for lease in join_all(tasks).await.into_iter().flatten() {
        assert!(
            all.contains(&lease.saga_id),
            "claim_due returned an unknown saga {lease:?}"
        );
        if let Some(first) = seen.insert(lease.saga_id, lease.owner.clone()) {
            panic!(
                "saga {} was claimed by both {first} and {}",
                lease.saga_id, lease.owner
            );
        }
    }
    assert_eq!(
        seen.len(),
        all.len(),
        "every due saga must be claimed once, {} of {} were",
        seen.len(),
        all.len()
    );
}

/// 16 tasks create the same saga (same id and fingerprint) at once: exactly one is
/// `Created`, the others `Existing`, and the history holds one creation.
pub async fn concurrent_creates_with_one_key_create_once(store: Arc<dyn SagaStore>) {
    let key = super::unique("order:{race}");
    let id = SagaId::from_idempotency_key(super::SAGA_TYPE, &key);
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = JoinSet::new();
    for racer in 0..RACERS {
        let (store, barrier, key) = (Arc::clone(&store), Arc::clone(&barrier), key.clone());
        tasks.spawn(async move {
            let new = NewSaga {
                id,
                idempotency_key: Some(key),
                claim: Some(owner(&format!("starter-{racer}"))),
                ..new_saga()
            };
            barrier.wait().await;
            store.create(new).await
        });
    }
    let outcomes = join_all(tasks).await;
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(CreateOutcome::Created { lease: Some(_) })))
        .count();
    let existing = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o,
                Ok(CreateOutcome::Existing {
                    status: SagaStatus::Running
                })
            )
        })
        .count();
    assert_eq!(
        (created, existing),
        (1, RACERS - 1),
        "one create must win, the others see it: {outcomes:?}"
    );
    assert_eq!(
        events(&*store, id).await,
        vec![event("started")],
        "the saga is created once"
    );
}

/// 16 cancel requests race on one saga: all answer `Requested`, and exactly one event is
/// appended.
pub async fn concurrent_cancels_append_one_event(store: Arc<dyn SagaStore>) {
    let id = create_saga(&*store).await;
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut tasks = JoinSet::new();
    for racer in 0..RACERS {
        let (store, barrier) = (Arc::clone(&store), Arc::clone(&barrier));
        tasks.spawn(async move {
            barrier.wait().await;
            store
                .request_cancel(id, event(&format!("cancel-{racer}")))
                .await
        });
    }
    for outcome in join_all(tasks).await {
        assert!(
            matches!(outcome, Ok(CancelOutcome::Requested)),
            "every racing cancel must be Requested, got {outcome:?}"
        );
    }
    let stored = events(&*store, id).await;
    assert_eq!(
        stored.len(),
        2,
        "racing cancels must append exactly one event, got {stored:?}"
    );
    assert!(
        stored[1].starts_with(r#"{"event":"cancel-"#),
        "the appended event is a cancel: {stored:?}"
    );
}

/// The holder's commits race a reclaim that replaces its fence, 20 times: 8 tasks commit with
/// the old lease until they are fenced, while another task reclaims the saga and commits a
/// marker with the new lease. The fence check and the write are one atomic step, so no old
/// commit lands after the marker; every old commit that answered success is in the history
/// once, and every fenced one is not.
pub async fn commits_racing_a_reclaim_never_land_after_it(store: Arc<dyn SagaStore>) {
    const COMMITTERS: usize = 8;
    for round in 0..20 {
        let id = create_saga(&*store).await;
        let old = claimed(&*store, id, &owner("owner-a")).await;
        let barrier = Arc::new(Barrier::new(COMMITTERS + 1));
        let mut committers = JoinSet::new();
        for task in 0..COMMITTERS {
            let (store, barrier, old) = (Arc::clone(&store), Arc::clone(&barrier), old.clone());
            committers.spawn(async move {
                barrier.wait().await;
                let mut landed = Vec::new();
                for i in 0..100_000 {
                    let label = format!("old-{task}-{i}");
                    let t = step(&label, &[event(&label)], state(1), SagaStatus::Running, Schedule::Continue { ttl: super::LONG });
                    match store.commit(&old, t).await {
                        Ok(_) => landed.push(event(&label)),
                        Err(StoreError::Fenced { .. }) => return landed,
                        Err(err) => panic!("round {round}: a commit racing a reclaim must succeed or be Fenced, got {err:?}"),
                    }
                }
                panic!("round {round}: the old lease was never fenced");
            });
        }
        barrier.wait().await;
        tokio::task::yield_now().await;
        let new = claimed(&*store, id, &owner("owner-a")).await;
        assert!(
            new.fence > old.fence,
            "round {round}: the reclaim raises the fence"
        );
        let marker = event("new-holder-marker");
        let t = step(
            "marker",
            std::slice::from_ref(&marker),
            state(2),
            SagaStatus::Running,
            Schedule::Continue { ttl: super::LONG },
        );
        super::commit_ok(&*store, &new, t).await;
        let landed: HashSet<String> = join_all(committers).await.into_iter().flatten().collect();

        let stored = events(&*store, id).await;
        let at = stored
            .iter()
            .position(|e| *e == marker)
            .expect("the marker is in the history");
        let late: Vec<&String> = stored[at + 1..].iter().collect();
        assert!(
            late.is_empty(),
            "round {round}: commits with the replaced fence landed after the new holder's commit: {late:?}"
        );
        let old_events: Vec<&String> = stored[1..at].iter().collect();
        let old_set: HashSet<String> = old_events.iter().map(|e| (*e).clone()).collect();
        assert_eq!(
            old_set.len(),
            old_events.len(),
            "round {round}: an old commit appended twice"
        );
        assert_eq!(
            old_set, landed,
            "round {round}: exactly the old commits that answered success are in the history"
        );
        assert_eq!(
            load(&*store, id).await.state,
            state(2),
            "round {round}: the new holder's state is current"
        );
    }
}
