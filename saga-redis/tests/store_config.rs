//! Builder validation and the deployment-wide settings recorded in the meta key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use saga_core::store::{ClaimOutcome, NewSaga};
use saga_core::{SagaId, SagaStore, StoreError};
use saga_redis::{ConnectError, RedisStore};
use saga_redis_testkit::{
    RedisServer, ServerConfig, can_spawn_servers, shared_server, unique_prefix,
};
use support::{LONG, builder, new_saga, owner, raw, raw_create, step};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_partition_count_is_refused() {
    let url = shared_server().url();
    let prefix = unique_prefix("meta");
    RedisStore::builder()
        .url(&url)
        .key_prefix(&prefix)
        .partitions(16)
        .connect()
        .await
        .unwrap();
    let again = RedisStore::builder()
        .url(&url)
        .key_prefix(&prefix)
        .connect()
        .await;
    assert!(again.is_ok(), "the same count (the default) connects again");
    match RedisStore::builder()
        .url(&url)
        .key_prefix(&prefix)
        .partitions(8)
        .connect()
        .await
    {
        Err(
            err @ ConnectError::PartitionMismatch {
                recorded: 16,
                configured: 8,
                ..
            },
        ) => {
            let message = err.to_string();
            assert!(message.contains("fixed at deployment"), "{message}");
        }
        Err(other) => panic!("another partition count must be PartitionMismatch, got {other}"),
        Ok(_) => panic!("another partition count must be refused"),
    }
    // Another prefix is another deployment.
    RedisStore::builder()
        .url(&url)
        .key_prefix(unique_prefix("meta"))
        .partitions(8)
        .connect()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_settings_are_refused_before_connecting() {
    let cases = [
        (RedisStore::builder(), "no Redis URL"),
        (
            RedisStore::builder()
                .url("redis://127.0.0.1:1")
                .key_prefix("a{b}"),
            "braces",
        ),
        (
            RedisStore::builder()
                .url("redis://127.0.0.1:1")
                .key_prefix(""),
            "non-empty",
        ),
        (
            RedisStore::builder()
                .url("redis://127.0.0.1:1")
                .partitions(0),
            "partition count",
        ),
        (
            RedisStore::builder()
                .url("redis://127.0.0.1:1")
                .max_payload(0),
            "max payload",
        ),
        (
            RedisStore::builder().cluster(Vec::<String>::new()),
            "at least one node",
        ),
    ];
    for (builder, words) in cases {
        match builder.connect().await {
            Err(err @ ConnectError::Config(_)) => assert!(err.to_string().contains(words), "{err}"),
            Err(other) => panic!("expected a Config error about {words}, got {other}"),
            Ok(_) => panic!("expected a Config error about {words}"),
        }
    }
    match RedisStore::builder()
        .url("http://:secret@nowhere")
        .connect()
        .await
    {
        Err(err @ ConnectError::Url { .. }) => {
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        Err(other) => panic!("expected a Url error, got {other}"),
        Ok(_) => panic!("expected a Url error"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_clear_error() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let attempt = RedisStore::builder()
        .url(format!("redis://127.0.0.1:{port}"))
        .connection_timeout(Duration::from_secs(2))
        .connect();
    match tokio::time::timeout(Duration::from_secs(20), attempt).await {
        Ok(Err(err @ ConnectError::Unreachable { .. })) => {
            assert!(
                err.to_string().contains(&format!("127.0.0.1:{port}")),
                "{err}"
            );
        }
        Ok(Err(other)) => panic!("expected Unreachable, got {other}"),
        Ok(Ok(_)) => panic!("nothing listens there"),
        Err(_) => panic!("connect to a closed port hung"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payload_limit_is_checked_in_the_scripts_too() {
    // The client refuses an oversized value before sending it; the script refuses it too,
    // with the limit it is given, and writes nothing.
    let url = shared_server().url();
    let strict = builder(&url, "limit")
        .max_payload(1024)
        .connect()
        .await
        .unwrap();
    let id = SagaId::random();
    let big = "x".repeat(2048);
    let refused = strict
        .create(NewSaga {
            state: big.clone(),
            ..new_saga(id)
        })
        .await;
    assert!(
        matches!(
            refused,
            Err(StoreError::TooLarge {
                size: 2048,
                limit: 1024,
                ..
            })
        ),
        "{refused:?}"
    );
    // Straight to the script, bypassing the client-side check: a raw EVAL of create.lua is
    // what a client without the check would send; the script's own check must hold.
    let mut conn = raw(&url).await;
    let reply = raw_create(&mut conn, &strict, id, &big, 1024, "1").await;
    let text = format!("{reply:?}");
    assert!(
        text.contains("too_large") && text.contains("2048") && text.contains("1024"),
        "{text}"
    );
    assert!(
        strict.load(id).await.unwrap().is_none(),
        "the refused script wrote nothing"
    );

    // A commit over the limit is refused before it is sent, and the lease stays usable.
    strict.create(new_saga(id)).await.unwrap();
    let lease = match strict.claim(id, &owner("w", LONG)).await.unwrap() {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("{other:?}"),
    };
    let mut oversized = step("big", "big", 1);
    oversized.events.push(big);
    assert!(matches!(
        strict.commit(&lease, oversized).await,
        Err(StoreError::TooLarge { .. })
    ));
    strict.commit(&lease, step("ok", "ok", 1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_replicas_fails_when_too_few_acknowledge_and_passes_with_a_replica() {
    if !can_spawn_servers(
        "wait_for_replicas_fails_when_too_few_acknowledge_and_passes_with_a_replica",
    ) {
        return;
    }
    // No diskless-sync delay: the replica's first sync starts at once.
    let primary = RedisServer::start(
        ServerConfig::new()
            .durable()
            .directive("repl-diskless-sync-delay 0"),
    );
    // No replica yet: a write that waits for one is applied, but reported as unreplicated.
    let lonely = builder(&primary.url(), "wait")
        .wait_for_replicas(1, Duration::from_millis(100))
        .connect()
        .await
        .unwrap();
    let id = SagaId::random();
    match lonely.create(new_saga(id)).await {
        Err(err @ StoreError::Unavailable { .. }) => {
            let message = err.to_string();
            assert!(message.contains("0 of 1 replicas"), "{message}");
        }
        other => panic!("a write no replica acknowledged must be Unavailable, got {other:?}"),
    }
    assert!(
        lonely.load(id).await.unwrap().is_some(),
        "the write is on the primary"
    );

    let replica = RedisServer::start(
        ServerConfig::new().directive(&format!("replicaof 127.0.0.1 {}", primary.port())),
    );
    let mut conn = raw(&primary.url()).await;
    saga_core::testkit::conformance::wait_for(
        "the replica to be online",
        Duration::from_secs(30),
        async || {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .unwrap();
            (info.contains("connected_slaves:1") && info.contains("state=online")).then_some(())
        },
    )
    .await;
    let replicated = builder(&primary.url(), "wait")
        .wait_for_replicas(1, Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let id = SagaId::random();
    replicated.create(new_saga(id)).await.unwrap();
    let lease = match replicated.claim(id, &owner("w", LONG)).await.unwrap() {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("{other:?}"),
    };
    replicated
        .commit(&lease, step("c1", "one", 1))
        .await
        .unwrap();
    let mut on_replica = raw(&replica.url()).await;
    let events: Vec<String> = redis::cmd("LRANGE")
        .arg(replicated.keys().events(id))
        .arg(0)
        .arg(-1)
        .query_async(&mut on_replica)
        .await
        .unwrap();
    assert_eq!(
        events.len(),
        2,
        "an acknowledged commit is on the replica when the call returns"
    );
}
