//! The store conformance suite against a standalone `redis-server` (one server per test
//! process, a fresh key prefix per case).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use saga_core::store::DEFAULT_MAX_PAYLOAD;
use saga_redis::RedisStore;
use saga_redis_testkit::{shared_server, unique_prefix};

async fn fresh_store() -> Arc<RedisStore> {
    let store = RedisStore::builder()
        .url(shared_server().url())
        .key_prefix(unique_prefix("conformance"))
        .connect()
        .await
        .unwrap_or_else(|err| panic!("cannot connect to the test server: {err}"));
    Arc::new(store)
}

saga_core::store_conformance_tests! {
    store: fresh_store(),
    max_payload: DEFAULT_MAX_PAYLOAD,
}
