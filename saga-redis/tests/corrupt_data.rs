//! Bad data at the store level: a saga key of the wrong type, a saga hash with a garbage
//! field, a due-set entry that is not a saga id, an index key of the wrong type. One bad saga
//! never blocks the others, and nothing bad is reported as good.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;

use redis::AsyncCommands;
use saga_core::store::{ClaimOutcome, ListQuery, Schedule, Transition};
use saga_core::{SagaId, SagaStatus, SagaStore, StoreError};
use saga_redis_testkit::shared_server;
use support::{LONG, builder, event, ids_in_partition, new_saga, owner, raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_due_quarantines_corrupt_sagas_and_claims_the_rest() {
    let url = shared_server().url();
    let store = builder(&url, "corrupt")
        .partitions(4)
        .connect()
        .await
        .unwrap();
    let mut conn = raw(&url).await;
    // Everything in partition 2: the bad sagas share the due set with the good ones.
    let ids = ids_in_partition(&store, 2, 7);
    for id in &ids {
        store.create(new_saga(*id)).await.unwrap();
    }
    let (wrong_type, bad_fence, bad_status, good) = (ids[0], ids[1], ids[2], &ids[3..]);
    let saga_key = |id: SagaId| store.keys().saga(id);
    let _: () = conn.del(saga_key(wrong_type)).await.unwrap();
    let _: () = conn.set(saga_key(wrong_type), "not a hash").await.unwrap();
    let _: () = conn
        .hset(saga_key(bad_fence), "fence", "seven")
        .await
        .unwrap();
    let _: () = conn
        .hset(saga_key(bad_status), "status", "exploded")
        .await
        .unwrap();
    let _: () = conn
        .zadd(store.keys().due(2), "not-a-saga-id", 0)
        .await
        .unwrap();

    let leases = store.claim_due(&owner("worker", LONG), 100).await.unwrap();
    let claimed: HashSet<SagaId> = leases.iter().map(|l| l.saga_id).collect();
    let want: HashSet<SagaId> = good.iter().copied().collect();
    assert_eq!(
        claimed, want,
        "every good saga of the partition is claimed, no bad one"
    );

    let reasons: std::collections::HashMap<String, String> =
        conn.hgetall(store.keys().quarantine(2)).await.unwrap();
    let reason = |id: SagaId| reasons.get(&id.to_string()).cloned().unwrap_or_default();
    assert!(
        reason(wrong_type).contains("has type string, expected hash"),
        "reason: {:?}",
        reason(wrong_type)
    );
    assert!(
        reason(bad_fence).contains("field fence"),
        "reason: {:?}",
        reason(bad_fence)
    );
    assert!(
        reason(bad_status).contains("field status"),
        "reason: {:?}",
        reason(bad_status)
    );
    assert!(
        reasons
            .get("not-a-saga-id")
            .is_some_and(|r| r.contains("not a saga id")),
        "{reasons:?}"
    );
    let due: Vec<String> = conn.zrange(store.keys().due(2), 0, -1).await.unwrap();
    for bad in [wrong_type, bad_fence, bad_status] {
        assert!(
            !due.contains(&bad.to_string()),
            "quarantined saga {bad} left the due set"
        );
    }

    // Set aside for good: the next round finds nothing, and says so without an error.
    let again = store
        .claim_due(&owner("worker-2", LONG), 100)
        .await
        .unwrap();
    assert!(again.is_empty(), "nothing is due any more, got {again:?}");

    // Each bad saga reports a clear Corrupt error, naming it and the problem.
    for (bad, words) in [
        (wrong_type, "has type string"),
        (bad_fence, "fence"),
        (bad_status, "status"),
    ] {
        match store.load(bad).await {
            Err(err @ StoreError::Corrupt { saga, .. }) => {
                assert_eq!(saga, bad);
                let message = err.to_string();
                assert!(
                    message.contains("corrupt") && message.contains(words),
                    "unclear error: {message}"
                );
            }
            other => panic!("load of corrupt saga {bad} must be Corrupt, got {other:?}"),
        }
        assert!(matches!(
            store.claim(bad, &owner("x", LONG)).await,
            Err(StoreError::Corrupt { .. })
        ));
    }
    let shown = store.load(wrong_type).await.unwrap_err().to_string();
    assert!(
        shown.contains("quarantined"),
        "load names the quarantine: {shown}"
    );
    // The history of a saga whose hash is gone is still readable (the audit trail).
    assert_eq!(
        store.events(wrong_type).await.unwrap(),
        vec![event("started")]
    );
    // An operator can still quarantine (again) with a new reason, whatever the key's type.
    store
        .quarantine(wrong_type, "inspected by an operator")
        .await
        .unwrap();

    // Listing and counting go on around the bad ones.
    let page = store
        .list(&ListQuery {
            limit: 100,
            ..ListQuery::default()
        })
        .await
        .unwrap();
    let listed: HashSet<SagaId> = page.sagas.iter().map(|s| s.id).collect();
    assert!(want.is_subset(&listed), "good sagas are listed");
    assert!(
        !listed.contains(&wrong_type),
        "a saga key of the wrong type cannot be summarised"
    );
    assert!(
        !listed.contains(&bad_status),
        "a saga with an unknown status cannot be summarised"
    );
    assert!(
        listed.contains(&bad_fence),
        "a corrupt field a summary does not show does not hide the saga"
    );
    let counts = store.count_by_status().await.unwrap();
    assert_eq!(
        counts[&SagaStatus::Running],
        7,
        "the indexes still count every saga: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_key_of_the_wrong_type_fails_clearly_and_writes_nothing() {
    let url = shared_server().url();
    let store = builder(&url, "badindex")
        .partitions(2)
        .connect()
        .await
        .unwrap();
    let mut conn = raw(&url).await;
    let [victim] = ids_in_partition(&store, 0, 1)[..] else {
        unreachable!()
    };
    let [bystander] = ids_in_partition(&store, 1, 1)[..] else {
        unreachable!()
    };
    let _: () = conn.set(store.keys().due(0), "oops").await.unwrap();

    match store.create(new_saga(victim)).await {
        Err(StoreError::Corrupt { problem, .. }) => {
            assert!(
                problem.contains("due") && problem.contains("expected zset"),
                "{problem}"
            );
        }
        other => panic!("create over a due key of the wrong type must be Corrupt, got {other:?}"),
    }
    let exists: bool = conn.exists(store.keys().saga(victim)).await.unwrap();
    assert!(!exists, "a refused create writes nothing");
    assert!(matches!(
        store.claim_due(&owner("w", LONG), 10).await,
        Err(StoreError::Corrupt { .. })
    ));

    // The other partition works.
    store.create(new_saga(bystander)).await.unwrap();
    assert!(matches!(
        store.claim(bystander, &owner("w", LONG)).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
}

/// `operator_transition` validates the saga hash and every key it touches before its first
/// write: a garbage field or an index of the wrong type is `Corrupt`, and nothing is written
/// (no fence increment, no event, no status move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_transition_on_bad_data_is_corrupt_and_writes_nothing() {
    let url = shared_server().url();
    let store = builder(&url, "badoperator")
        .partitions(2)
        .connect()
        .await
        .unwrap();
    let mut conn = raw(&url).await;
    let [garbled, bad_index] = ids_in_partition(&store, 0, 2)[..] else {
        unreachable!()
    };
    let reopen = || Transition {
        commit_id: "op".into(),
        events: vec![event("operator")],
        state: "{}".into(),
        status: SagaStatus::Running,
        schedule: Schedule::WakeAfter(std::time::Duration::ZERO),
    };
    for id in [garbled, bad_index] {
        store.create(new_saga(id)).await.unwrap();
    }

    let _: () = conn
        .hset(store.keys().saga(garbled), "fence", "many")
        .await
        .unwrap();
    match store
        .operator_transition(garbled, &[SagaStatus::Running], reopen())
        .await
    {
        Err(StoreError::Corrupt { problem, .. }) => {
            assert!(problem.contains("fence"), "{problem}");
        }
        other => panic!("operator_transition of a garbled saga must be Corrupt, got {other:?}"),
    }
    let events: Vec<String> = conn
        .lrange(store.keys().events(garbled), 0, -1)
        .await
        .unwrap();
    assert_eq!(
        events.len(),
        1,
        "a refused operator transition appends nothing"
    );

    let _: () = conn.set(store.keys().terminal(0), "oops").await.unwrap();
    match store
        .operator_transition(bad_index, &[SagaStatus::Running], reopen())
        .await
    {
        Err(StoreError::Corrupt { problem, .. }) => {
            assert!(
                problem.contains("terminal") && problem.contains("expected zset"),
                "{problem}"
            );
        }
        other => panic!(
            "operator_transition over a terminal index of the wrong type must be Corrupt, got {other:?}"
        ),
    }
    let saga = store.load(bad_index).await.unwrap().unwrap();
    assert_eq!(
        saga.fence, 0,
        "a refused operator transition keeps the fence"
    );
    assert_eq!(
        store.events(bad_index).await.unwrap().len(),
        1,
        "a refused operator transition appends nothing"
    );
}
