//! The start-up check of durability settings: what it finds on each kind of server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use saga_redis::{RedisStore, ServerIssue};
use saga_redis_testkit::{
    RedisServer, ServerConfig, can_spawn_servers, shared_cluster, unique_prefix,
};
use support::store;

fn issues(store: &RedisStore) -> Vec<ServerIssue> {
    store
        .server_findings()
        .iter()
        .map(|f| f.issue.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warns_when_aof_is_off() {
    if !can_spawn_servers("warns_when_aof_is_off") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new());
    let store = store(&server.url(), "check").await;
    assert_eq!(
        issues(&store),
        vec![
            ServerIssue::AofDisabled,
            ServerIssue::FsyncNotAlways {
                appendfsync: "everysec".into()
            }
        ],
        "a default server: AOF off, appendfsync everysec; eviction is off by default"
    );
    let message = store.server_findings()[1].to_string();
    assert!(
        message.contains("up to 1 s"),
        "the everysec finding says what it can lose: {message}"
    );
    assert!(
        message.contains(&server.port().to_string()),
        "the finding names the node: {message}"
    );
    assert_eq!(
        store.check_server().await,
        store.server_findings(),
        "check_server can be called again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warns_about_an_eviction_policy_only_when_aof_is_durable() {
    if !can_spawn_servers("warns_about_an_eviction_policy_only_when_aof_is_durable") {
        return;
    }
    let server = RedisServer::start(
        ServerConfig::new()
            .durable()
            .directive("maxmemory-policy allkeys-lru"),
    );
    let store = store(&server.url(), "check").await;
    assert_eq!(
        issues(&store),
        vec![ServerIssue::EvictionPolicy {
            policy: "allkeys-lru".into()
        }]
    );
    assert!(
        store.server_findings()[0]
            .to_string()
            .contains("noeviction")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finds_nothing_on_a_durable_noeviction_server() {
    if !can_spawn_servers("finds_nothing_on_a_durable_noeviction_server") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    let store = store(&server.url(), "check").await;
    assert_eq!(store.server_findings(), &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_working_when_config_is_not_permitted() {
    if !can_spawn_servers("keeps_working_when_config_is_not_permitted") {
        return;
    }
    let server =
        RedisServer::start(ServerConfig::new().acl_user("app on >app-pw ~* &* +@all -config"));
    let url = server.url_with_credentials(Some("app"), "app-pw");
    let store = store(&url, "check").await;
    match issues(&store).as_slice() {
        [ServerIssue::Unverifiable { reason }] => assert!(
            reason.contains("NOPERM") || reason.to_lowercase().contains("permission"),
            "{reason}"
        ),
        other => panic!("a user without CONFIG must get one Unverifiable finding, got {other:?}"),
    }
    assert!(
        store.server_findings()[0]
            .to_string()
            .contains("not verified")
    );
    // The store works all the same.
    let id = saga_core::SagaId::random();
    saga_core::SagaStore::create(&store, support::new_saga(id))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_every_cluster_primary() {
    let Some(cluster) = shared_cluster() else {
        return;
    };
    let urls = cluster.urls();
    let store = RedisStore::builder()
        .cluster(urls.clone())
        .key_prefix(unique_prefix("check"))
        .connect()
        .await
        .unwrap();
    let mut nodes: Vec<String> = store
        .server_findings()
        .iter()
        .filter(|f| f.issue == ServerIssue::AofDisabled)
        .map(|f| f.node.clone())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(
        nodes.len(),
        urls.len(),
        "every primary is checked: {:?}",
        store.server_findings()
    );
}
