//! `RedisStore::wakeups`: Redis pub/sub on `<prefix>:wake`. Messages published by the scripts
//! of any node reach the store's one subscription; a lost subscription is re-established (and
//! the value bumped); the background task ends with the store and its receivers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use saga_core::store::{CreateOutcome, Schedule, Transition};
use saga_core::testkit::conformance::{WAIT_BOUND, wait_for};
use saga_core::{SagaStatus, SagaStore};
use saga_redis::RedisStore;
use saga_redis_testkit::{
    RedisServer, ServerConfig, can_spawn_servers, shared_cluster, shared_server, unique_prefix,
};
use support::{LONG, event, ids_in_partition, new_saga, owner, raw, same_data, state, store};
use tokio::sync::watch;

/// Waits (bounded) for the value to change after `what`, and marks it seen.
async fn changes(rx: &mut watch::Receiver<u64>, what: &str) {
    match tokio::time::timeout(WAIT_BOUND, rx.changed()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the wake-up signal closed (after {what})"),
        Err(_) => panic!("the wake-up value did not change within {WAIT_BOUND:?} after {what}"),
    }
    rx.borrow_and_update();
}

/// Subscribers of `channel` on the server at `url` (`PUBSUB NUMSUB`).
async fn subscribers(url: &str, channel: &str) -> u64 {
    let mut conn = raw(url).await;
    let (_, count): (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    count
}

/// Creates a saga, retrying transient errors (the server may be coming back).
async fn create_retrying(store: &RedisStore, id: saga_core::SagaId) {
    wait_for("a create to go through", WAIT_BOUND, async || {
        match store.create(new_saga(id)).await {
            Ok(CreateOutcome::Created { .. } | CreateOutcome::Existing { .. }) => Some(()),
            Ok(other) => panic!("create answered {other:?}"),
            Err(err) if err.is_transient() => None,
            Err(err) => panic!("create failed: {err:?}"),
        }
    })
    .await;
}

/// On a cluster the subscription is on one node, and the scripts of every partition (so of
/// every node) reach it: the value changes after a create in each partition and after an
/// operator transition, and a commit that finishes a saga is named on `saga_changes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_reach_the_subscriber_from_every_cluster_node() {
    let builder = RedisStore::builder().key_prefix(unique_prefix("wake-cluster"));
    let builder = match shared_cluster() {
        Some(cluster) => builder.cluster(cluster.urls()),
        None => builder.url(shared_server().url()),
    };
    let store = builder.connect().await.unwrap();
    let mut rx = store
        .wakeups()
        .expect("the Redis store has a wake-up signal");
    // Warm-up: the first change comes once the subscription is up.
    store
        .create(new_saga(saga_core::SagaId::random()))
        .await
        .unwrap();
    changes(&mut rx, "the warm-up create").await;

    for p in 0..store.keys().partitions() {
        let id = ids_in_partition(&store, p, 1)[0];
        rx.borrow_and_update();
        store.create(new_saga(id)).await.unwrap();
        changes(&mut rx, &format!("a create in partition {p}")).await;

        if p % 5 == 0 {
            let lease = match store.claim(id, &owner("worker", LONG)).await.unwrap() {
                saga_core::store::ClaimOutcome::Claimed(lease) => lease,
                other => panic!("claim answered {other:?}"),
            };
            rx.borrow_and_update();
            let done = Transition {
                commit_id: "finish".into(),
                events: vec![event("failed")],
                state: state(1),
                status: SagaStatus::Failed,
                schedule: Schedule::Finished,
            };
            let mut feed = store
                .saga_changes()
                .expect("the Redis store names changed sagas");
            store.commit(&lease, done).await.unwrap();
            // A finish is news for waiters, on the saga-changes feed (not a wake-up: there is
            // no new work in it).
            let named = tokio::time::timeout(WAIT_BOUND, feed.recv())
                .await
                .unwrap_or_else(|_| panic!("no saga change within the bound (partition {p})"))
                .expect("the feed is open");
            assert_eq!(named, id, "a finished commit in partition {p}");

            rx.borrow_and_update();
            let retry = Transition {
                commit_id: "retry".into(),
                events: vec![event("retry")],
                state: state(2),
                status: SagaStatus::Compensating,
                schedule: Schedule::WakeAfter(Duration::ZERO),
            };
            store
                .operator_transition(id, &[SagaStatus::Failed], retry)
                .await
                .unwrap();
            changes(&mut rx, &format!("an operator transition in partition {p}")).await;
        }
    }
}

/// A killed subscription and a restarted server: the task re-subscribes, bumps the value
/// once (messages may have been missed), and later messages arrive again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_resubscribe_after_the_connection_or_server_is_lost() {
    if !can_spawn_servers("wakeups_resubscribe_after_the_connection_or_server_is_lost") {
        return;
    }
    let mut server = RedisServer::start(ServerConfig::new());
    let url = server.url();
    let store = store(&url, "wake-reconnect").await;
    let mut rx = store
        .wakeups()
        .expect("the Redis store has a wake-up signal");
    create_retrying(&store, saga_core::SagaId::random()).await;
    changes(&mut rx, "the warm-up create").await;

    // The server drops the subscription.
    rx.borrow_and_update();
    let mut conn = raw(&url).await;
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(killed, 1, "the store holds one pub/sub connection");
    changes(&mut rx, "the subscription was killed (re-subscribed)").await;
    rx.borrow_and_update();
    create_retrying(&store, saga_core::SagaId::random()).await;
    changes(&mut rx, "a create after re-subscribing").await;

    // The server goes away and comes back.
    server.restart();
    changes(&mut rx, "the server restarted (re-subscribed)").await;
    wait_for(
        "the store to subscribe again after the restart",
        WAIT_BOUND,
        async || (subscribers(&url, &store.keys().wake_channel()).await == 1).then_some(()),
    )
    .await;
    rx.borrow_and_update();
    create_retrying(&store, saga_core::SagaId::random()).await;
    changes(&mut rx, "a create after the restart").await;
}

/// The background task (and its subscription) outlives the store while a receiver is left,
/// and ends once the store and every receiver are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wakeup_task_ends_with_the_store_and_its_receivers() {
    let url = shared_server().url();
    let first = store(&url, "wake-lifetime").await;
    let other = same_data(&url, &first).await;
    let channel = first.keys().wake_channel();
    let mut rx = first
        .wakeups()
        .expect("the Redis store has a wake-up signal");
    let clone = first.clone();
    let again = clone.wakeups().expect("every call gets the signal");
    // The first change: the subscription is up.
    changes(&mut rx, "subscribing").await;
    wait_for("the store to subscribe", WAIT_BOUND, async || {
        (subscribers(&url, &channel).await == 1).then_some(())
    })
    .await;
    assert_eq!(
        subscribers(&url, &channel).await,
        1,
        "one subscription per store, however many calls and clones"
    );

    drop(first);
    drop(clone);
    drop(again);
    // The store is gone, a receiver is left: it still hears other processes' writes.
    other
        .create(new_saga(saga_core::SagaId::random()))
        .await
        .unwrap();
    changes(
        &mut rx,
        "a create by another store, after this one was dropped",
    )
    .await;

    drop(rx);
    wait_for(
        "the task to end once the store and its receivers are gone",
        WAIT_BOUND,
        async || (subscribers(&url, &channel).await == 0).then_some(()),
    )
    .await;
}

/// Outside a tokio runtime there is nowhere to run the task: `wakeups()` answers `None`
/// (callers poll) and does not panic; inside one it works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_outside_a_runtime_is_none() {
    let store = store(&shared_server().url(), "wake-no-runtime").await;
    let outside = store.clone();
    let answer = std::thread::spawn(move || outside.wakeups().is_none())
        .join()
        .unwrap();
    assert!(answer, "wakeups() outside a runtime answers None");
    assert!(
        store.wakeups().is_some(),
        "wakeups() inside a runtime answers Some"
    );
}

/// `saga_changes` names the saga that finished, so a waiter can ignore every other change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_changes_name_the_saga_that_finished() {
    let url = shared_server().url();
    let store = store(&url, "saga_changes").await;
    let mut signal = store.wakeups().expect("the store has a wake-up signal");
    // The task bumps the value once it is subscribed: from then on no message is lost.
    changes(&mut signal, "subscribing").await;
    let mut feed = store.saga_changes().expect("the store names changed sagas");
    let (finished, running) = (saga_core::SagaId::random(), saga_core::SagaId::random());
    for id in [finished, running] {
        store.create(new_saga(id)).await.unwrap();
    }
    let lease = match store.claim(finished, &owner("a", LONG)).await.unwrap() {
        saga_core::store::ClaimOutcome::Claimed(lease) => lease,
        other => panic!("claim answered {other:?}"),
    };
    store
        .commit(
            &lease,
            Transition {
                commit_id: "end".into(),
                events: vec![event("done")],
                state: state(1),
                status: SagaStatus::Completed,
                schedule: Schedule::Finished,
            },
        )
        .await
        .unwrap();
    let named = tokio::time::timeout(WAIT_BOUND, feed.recv())
        .await
        .expect("a change within the bound")
        .expect("the feed is open");
    assert_eq!(
        named, finished,
        "only the finished saga is named (creates are not)"
    );
}
