//! Helpers shared by the Redis store's integration tests.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::Duration;

use saga_core::store::{ClaimRequest, NewSaga, Schedule, Transition};
use saga_core::{SagaId, SagaStatus};
use saga_redis::{RedisStore, RedisStoreBuilder};
use saga_redis_testkit::unique_prefix;

/// A lease that does not run out during a test.
pub const LONG: Duration = Duration::from_secs(3600);

/// A builder for `url` with a fresh key prefix.
pub fn builder(url: &str, test: &str) -> RedisStoreBuilder {
    RedisStore::builder()
        .url(url)
        .key_prefix(unique_prefix(test))
}

/// Connects a store to `url` with a fresh key prefix.
pub async fn store(url: &str, test: &str) -> RedisStore {
    builder(url, test)
        .connect()
        .await
        .unwrap_or_else(|err| panic!("cannot connect to {url}: {err}"))
}

/// A second store on the same data (same prefix), with its own connection.
pub async fn same_data(url: &str, of: &RedisStore) -> RedisStore {
    RedisStore::builder()
        .url(url)
        .key_prefix(of.keys().prefix())
        .partitions(of.keys().partitions())
        .connect()
        .await
        .unwrap_or_else(|err| panic!("cannot connect to {url}: {err}"))
}

/// A plain connection for poking at raw data.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap_or_else(|err| panic!("bad url {url}: {err}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|err| panic!("cannot connect to {url}: {err}"))
}

/// A claim for `owner`.
pub fn owner(name: &str, ttl: Duration) -> ClaimRequest {
    ClaimRequest {
        owner: name.to_owned(),
        ttl,
    }
}

/// An opaque encoded event.
pub fn event(label: &str) -> String {
    format!(r#"{{"event":"{label}"}}"#)
}

/// An opaque encoded state.
pub fn state(n: u32) -> String {
    format!(r#"{{"n":{n}}}"#)
}

/// A new running saga with this id.
pub fn new_saga(id: SagaId) -> NewSaga {
    NewSaga {
        id,
        saga_type: "redis test".to_owned(),
        version: 1,
        idempotency_key: None,
        fingerprint: "fp".to_owned(),
        state: state(0),
        events: vec![event("started")],
        claim: None,
    }
}

/// A step that keeps the lease.
pub fn step(commit_id: &str, label: &str, n: u32) -> Transition {
    Transition {
        commit_id: commit_id.to_owned(),
        events: vec![event(label)],
        state: state(n),
        status: SagaStatus::Running,
        schedule: Schedule::Continue { ttl: LONG },
    }
}

/// `count` fresh ids that all fall in partition `p` of `store`.
pub fn ids_in_partition(store: &RedisStore, p: u16, count: usize) -> Vec<SagaId> {
    std::iter::repeat_with(SagaId::random)
        .filter(|id| store.keys().partition_of(*id) == p)
        .take(count)
        .collect()
}

/// Sends `create.lua` (after the prelude, as the store does) straight to the server,
/// bypassing the client-side checks, for a saga of type `t` with one event `{}`, no claim
/// and no idempotency key: what a client without those checks would send.
pub async fn raw_create(
    conn: &mut redis::aio::MultiplexedConnection,
    store: &RedisStore,
    id: SagaId,
    state: &str,
    max_payload: usize,
    version: &str,
) -> redis::Value {
    let script = redis::Script::new(concat!(
        include_str!("../../src/scripts/prelude.lua"),
        "\n",
        include_str!("../../src/scripts/create.lua")
    ));
    let keys = store.keys();
    let p = keys.partition_of(id);
    script
        .key(keys.saga(id))
        .key(keys.events(id))
        .key(keys.due(p))
        .key(keys.ids(p))
        .key(keys.status(p, SagaStatus::Running))
        .key(keys.type_index(p, "t"))
        .arg(id.to_string())
        .arg("t")
        .arg(saga_redis::KeyLayout::type_key("t").to_string())
        .arg("fp")
        .arg("")
        .arg(state)
        .arg(max_payload)
        .arg("")
        .arg(0)
        .arg(version)
        .arg(1)
        .arg("{}")
        .invoke_async(conn)
        .await
        .unwrap_or_else(|err| panic!("create.lua: {err}"))
}

/// Every key under `prefix`: its `DUMP` and whether it has a TTL (a test helper: a failed
/// read fails the test).
#[allow(clippy::unwrap_used)]
pub async fn snapshot(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> BTreeMap<String, (Vec<u8>, bool)> {
    let mut names = Vec::new();
    let mut cursor = 0_u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        names.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut keys = BTreeMap::new();
    for name in names {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&name)
            .query_async(conn)
            .await
            .unwrap();
        let ttl: i64 = redis::AsyncCommands::pttl(conn, &name).await.unwrap();
        keys.insert(name, (dump, ttl >= 0));
    }
    keys
}
