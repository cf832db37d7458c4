//! The signal inbox at the Redis level: its keys, what a bad stored entry does, and purge
//! deleting it with the saga.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use saga_core::store::{DeliveryOutcome, Schedule, SignalDelivery, Transition};
use saga_core::{SagaId, SagaStatus, SagaStore, StoreError, Timestamp};
use saga_redis::RedisStore;
use saga_redis_testkit::shared_server;
use support::{LONG, event, new_saga, owner, raw, state, store};

fn signal(name: &str, key: &str, payload: &str) -> SignalDelivery {
    SignalDelivery {
        name: name.to_owned(),
        key: key.to_owned(),
        payload: payload.to_owned(),
        at: Timestamp(42),
        event: event(&format!("signal {name} {key}")),
    }
}

async fn delivered(store: &RedisStore, id: SagaId, delivery: SignalDelivery) -> u64 {
    match store.deliver_signal(id, delivery).await.unwrap() {
        DeliveryOutcome::Delivered { sequence } => sequence,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// The inbox is a list of JSON entries in the saga's partition; the keys hash separates
/// name from key by the name's length, so no two (name, key) pairs share a field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbox_keys_hold_one_entry_and_one_field_per_signal() {
    let url = shared_server().url();
    let store = store(&url, "signal-keys").await;
    let mut conn = raw(&url).await;
    let id = SagaId::random();
    store.create(new_saga(id)).await.unwrap();
    assert_eq!(delivered(&store, id, signal("ab", "c", "1")).await, 1);
    assert_eq!(
        delivered(&store, id, signal("a", "bc", "2")).await,
        2,
        "name `a` + key `bc` is not name `ab` + key `c`"
    );
    let entries: Vec<String> = conn.lrange(store.keys().signals(id), 0, -1).await.unwrap();
    let first: serde_json::Value = serde_json::from_str(&entries[0]).unwrap();
    assert_eq!(
        first,
        serde_json::json!({"name": "ab", "key": "c", "payload": "1", "at": 42})
    );
    assert_eq!(entries.len(), 2);
    let fields: HashMap<String, String> = conn.hgetall(store.keys().signal_keys(id)).await.unwrap();
    assert_eq!(
        fields,
        HashMap::from([
            ("2:abc".to_owned(), "1".to_owned()),
            ("1:abc".to_owned(), "2".to_owned())
        ])
    );
}

/// A stored entry that is not what the store wrote is `Corrupt` naming the saga, on read and
/// on a repeated delivery (which writes nothing); an inbox key of the wrong type refuses a
/// delivery and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_inbox_is_corrupt_and_writes_nothing() {
    let url = shared_server().url();
    let store = store(&url, "signal-corrupt").await;
    let mut conn = raw(&url).await;
    let id = SagaId::random();
    store.create(new_saga(id)).await.unwrap();
    delivered(&store, id, signal("approval", "k1", "1")).await;
    let _: () = conn
        .lset(store.keys().signals(id), 0, "garbage")
        .await
        .unwrap();

    let read = store.signals(id, 0).await;
    assert!(
        matches!(&read, Err(StoreError::Corrupt { saga, problem }) if *saga == id && problem.contains("signal 1")),
        "{read:?}"
    );
    let events_before = store.events(id).await.unwrap();
    let again = store
        .deliver_signal(id, signal("approval", "k1", "1"))
        .await;
    assert!(
        matches!(&again, Err(StoreError::Corrupt { saga, .. }) if *saga == id),
        "{again:?}"
    );

    let other = SagaId::random();
    store.create(new_saga(other)).await.unwrap();
    let _: () = conn
        .set(store.keys().signal_keys(other), "not a hash")
        .await
        .unwrap();
    let refused = store
        .deliver_signal(other, signal("approval", "k1", "1"))
        .await;
    assert!(
        matches!(&refused, Err(StoreError::Corrupt { problem, .. }) if problem.contains("expected hash")),
        "{refused:?}"
    );
    let inbox: usize = conn.llen(store.keys().signals(other)).await.unwrap();
    assert_eq!(inbox, 0, "a refused delivery stores nothing");
    assert_eq!(store.events(id).await.unwrap(), events_before);
    assert_eq!(store.events(other).await.unwrap(), vec![event("started")]);
}

/// Purging a finished saga deletes its inbox and its keys hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_the_inbox_keys() {
    let url = shared_server().url();
    let store = store(&url, "signal-purge").await;
    let mut conn = raw(&url).await;
    let id = SagaId::random();
    store.create(new_saga(id)).await.unwrap();
    delivered(&store, id, signal("approval", "k1", "1")).await;
    let lease = match store.claim(id, &owner("finisher", LONG)).await.unwrap() {
        saga_core::store::ClaimOutcome::Claimed(lease) => lease,
        other => panic!("expected a claim, got {other:?}"),
    };
    let finish = Transition {
        commit_id: "finish".to_owned(),
        events: vec![event("completed")],
        state: state(1),
        status: SagaStatus::Completed,
        schedule: Schedule::Finished,
    };
    store.commit(&lease, finish).await.unwrap();
    let keys = [store.keys().signals(id), store.keys().signal_keys(id)];
    let before: usize = conn.exists(&keys).await.unwrap();
    assert_eq!(before, 2, "both inbox keys exist before the purge");
    assert_eq!(store.purge(Duration::ZERO, 10).await.unwrap(), 1);
    let after: usize = conn.exists(&keys).await.unwrap();
    assert_eq!(after, 0, "purge deletes both inbox keys");
}
