//! Redis restarts and an emptied script cache: acknowledged writes survive, and the caller
//! sees at most transient `Unavailable` errors while the server is away.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// The restart test reports how many commits the crash interrupted (visible with --nocapture).
#![allow(clippy::print_stderr)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use saga_core::store::{ClaimOutcome, Lease};
use saga_core::testkit::conformance::wait_for;
use saga_core::{SagaId, SagaStore, StoreError};
use saga_redis::RedisStore;
use saga_redis_testkit::{
    RedisServer, ServerConfig, can_spawn_servers, shared_cluster, shared_server,
};
use support::{LONG, builder, event, new_saga, owner, raw, state, step};
use tokio::task::JoinSet;

/// Sagas committed to concurrently, one task each.
const SAGAS: usize = 6;
/// Commits per saga.
const STEPS: u32 = 40;
/// How long a task keeps retrying one commit through an outage.
const OUTAGE_BOUND: Duration = Duration::from_secs(30);

/// Commits `step` until it is acknowledged, retrying transient errors (the same commit id,
/// so a commit whose reply was lost is not applied twice).
async fn commit_through_outages(
    store: &RedisStore,
    lease: &Lease,
    n: u32,
    transient: &AtomicUsize,
) {
    let commit_id = format!("{}-{n}", lease.saga_id);
    let deadline = tokio::time::Instant::now() + OUTAGE_BOUND;
    loop {
        match store
            .commit(lease, step(&commit_id, &format!("step-{n}"), n))
            .await
        {
            Ok(_) => return,
            Err(err) if err.is_transient() && tokio::time::Instant::now() < deadline => {
                transient.fetch_add(1, Ordering::Relaxed);
                // Pause between retries of a failed call (not a synchronisation).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("commit {n} of {} failed for good: {err:?}", lease.saga_id),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_a_server_crash_and_restart() {
    if !can_spawn_servers("acknowledged_commits_survive_a_server_crash_and_restart") {
        return;
    }
    let mut server = RedisServer::start(ServerConfig::new().durable());
    let store = Arc::new(builder(&server.url(), "restart").connect().await.unwrap());
    let mut leases = Vec::new();
    for _ in 0..SAGAS {
        let id = SagaId::random();
        store.create(new_saga(id)).await.unwrap();
        match store.claim(id, &owner("worker", LONG)).await.unwrap() {
            ClaimOutcome::Claimed(lease) => leases.push(lease),
            other => panic!("claim must succeed, got {other:?}"),
        }
    }
    let acked = Arc::new(AtomicUsize::new(0));
    let transient = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for lease in leases.clone() {
        let (store, acked, transient) = (
            Arc::clone(&store),
            Arc::clone(&acked),
            Arc::clone(&transient),
        );
        tasks.spawn(async move {
            let mut done = Vec::new();
            for n in 1..=STEPS {
                commit_through_outages(&store, &lease, n, &transient).await;
                done.push(n);
                acked.fetch_add(1, Ordering::Relaxed);
            }
            (lease.saga_id, done)
        });
    }

    // Crash (SIGKILL) the server in the middle of the batch, then start it on its AOF.
    let total = SAGAS * STEPS as usize;
    wait_for(
        "a quarter of the commits to be acknowledged",
        Duration::from_secs(30),
        async || (acked.load(Ordering::Relaxed) >= total / 4).then_some(()),
    )
    .await;
    let acked_before_crash = acked.load(Ordering::Relaxed);
    let server = tokio::task::spawn_blocking(move || {
        server.kill();
        server.restart();
        server
    })
    .await
    .unwrap();
    assert!(
        acked_before_crash < total,
        "the crash must happen in the middle of the batch"
    );

    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.unwrap());
    }
    // Every acknowledged commit is there, exactly once and in order; later ones succeeded.
    for (id, done) in &results {
        assert_eq!(done.len(), STEPS as usize);
        let mut want = vec![event("started")];
        want.extend((1..=STEPS).map(|n| event(&format!("step-{n}"))));
        assert_eq!(
            store.events(*id).await.unwrap(),
            want,
            "saga {id}: every acknowledged commit once, in order"
        );
        let saga = store.load(*id).await.unwrap().unwrap();
        assert_eq!(saga.state, state(STEPS));
    }
    // And the store keeps working on the restarted server.
    for lease in &leases {
        store
            .commit(
                lease,
                step(&format!("{}-after", lease.saga_id), "after", STEPS + 1),
            )
            .await
            .unwrap();
    }
    let log = server.log();
    assert!(
        log.contains("DB loaded from append only file") || log.contains("Reading RDB base file"),
        "the restart replayed the AOF:\n{log}"
    );
    eprintln!(
        "restart: {acked_before_crash} of {total} commits acknowledged before the crash; {} transient errors retried",
        transient.load(Ordering::Relaxed)
    );
}

/// The operations a script cache flush is slipped between.
async fn every_operation_after_a_flush(store: &RedisStore, flush: impl AsyncFn()) {
    let id = SagaId::random();
    flush().await;
    store.create(new_saga(id)).await.unwrap();
    flush().await;
    let lease = match store.claim(id, &owner("w", LONG)).await.unwrap() {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("claim must succeed, got {other:?}"),
    };
    flush().await;
    store.commit(&lease, step("c1", "one", 1)).await.unwrap();
    flush().await;
    store.renew(&lease, LONG).await.unwrap();
    flush().await;
    assert_eq!(store.load(id).await.unwrap().unwrap().state, state(1));
    flush().await;
    assert_eq!(store.events(id).await.unwrap().len(), 2);
    flush().await;
    store.release(&lease).await.unwrap();
    flush().await;
    assert_eq!(
        store.claim_due(&owner("w2", LONG), 10).await.unwrap().len(),
        1
    );
    flush().await;
    store
        .list(&saga_core::store::ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    flush().await;
    store.guard_claim("key", "fp", LONG).await.unwrap();
    flush().await;
    store.purge(Duration::ZERO, 10).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_between_operations_is_invisible() {
    let url = shared_server().url();
    let store = builder(&url, "flush").connect().await.unwrap();
    let conn = raw(&url).await;
    every_operation_after_a_flush(&store, async || {
        let mut conn = conn.clone();
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_on_every_cluster_node_is_invisible() {
    let Some(cluster) = shared_cluster() else {
        return;
    };
    let urls = cluster.urls();
    let store = RedisStore::builder()
        .cluster(urls.clone())
        .key_prefix(saga_redis_testkit::unique_prefix("flush"))
        .connect()
        .await
        .unwrap();
    let mut nodes = Vec::new();
    for url in &urls {
        nodes.push(raw(url).await);
    }
    every_operation_after_a_flush(&store, async || {
        for node in &nodes {
            let mut node = node.clone();
            let () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut node)
                .await
                .unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_while_the_server_is_down_are_unavailable_not_hanging() {
    if !can_spawn_servers("operations_while_the_server_is_down_are_unavailable_not_hanging") {
        return;
    }
    let mut server = RedisServer::start(ServerConfig::new());
    let store = builder(&server.url(), "down")
        .reconnect_retries(1)
        .connect()
        .await
        .unwrap();
    let id = SagaId::random();
    store.create(new_saga(id)).await.unwrap();
    let mut server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .unwrap();
    // Bounded: a hang would be a failure, whatever the machine's speed.
    let result = tokio::time::timeout(Duration::from_secs(30), store.load(id)).await;
    match result {
        Ok(Err(err @ StoreError::Unavailable { .. })) => {
            assert!(err.is_transient());
            assert!(
                std::error::Error::source(&err).is_some(),
                "the Redis error is kept as the source"
            );
        }
        other => panic!("load while the server is down must be Unavailable, got {other:?}"),
    }
    // The data of a non-durable server is gone after a restart; the store reconnects.
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    wait_for(
        "the store to reconnect",
        Duration::from_secs(30),
        async || match store.load(id).await {
            Ok(found) => Some(found),
            Err(err) if err.is_transient() => None,
            Err(err) => panic!("after a restart load must work again, got {err:?}"),
        },
    )
    .await;
    drop(server);
}
