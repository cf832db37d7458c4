//! The store conformance suite against a local 3-master Redis Cluster (one cluster per test
//! process, a fresh key prefix per case).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use saga_redis::RedisStore;
use saga_redis_testkit::{shared_cluster, shared_server, unique_prefix};

/// Smaller than the default, to keep the payload cases quick on three nodes.
const MAX_PAYLOAD: usize = 256 * 1024;

async fn fresh_store() -> Arc<RedisStore> {
    let builder = RedisStore::builder()
        .key_prefix(unique_prefix("cluster"))
        .max_payload(MAX_PAYLOAD);
    let builder = match shared_cluster() {
        Some(cluster) => builder.cluster(cluster.urls()),
        // Only when no cluster can be had (printed by `shared_cluster`): the suite still
        // runs, against the standalone server, so the test names stay the same.
        None => builder.url(shared_server().url()),
    };
    let store = builder
        .connect()
        .await
        .unwrap_or_else(|err| panic!("cannot connect to the test cluster: {err}"));
    Arc::new(store)
}

saga_core::store_conformance_tests! {
    store: fresh_store(),
    max_payload: MAX_PAYLOAD,
}
