//! redis/redis#14541 against a real redis-server: with AOF on and a `default` user that may
//! not run the store's writes, the scripts' writes (logged as MULTI/EXEC) are dropped while
//! the AOF is replayed after a restart. The store refuses that configuration at connect,
//! unless allowed; the workaround keeps every saga across `kill -9` and a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use saga_core::{SagaId, SagaStore};
use saga_redis::{ConnectError, RedisStore, RedisStoreBuilder, ServerIssue, UnsafeServerConfig};
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers, unique_prefix};
use support::new_saga;

const APP_PASSWORD: &str = "app-secret-pw";
const SAGAS: usize = 20;

fn app_url(server: &RedisServer) -> String {
    server.url_with_credentials(Some("app"), APP_PASSWORD)
}

/// A durable server (AOF, `appendfsync always`) with `default_rule` for the default user and
/// an `app` user with every permission.
fn durable_server(default_rule: &str) -> RedisServer {
    RedisServer::start(
        ServerConfig::new()
            .durable()
            .acl_user(&format!("default {default_rule}"))
            .acl_user(&format!("app on >{APP_PASSWORD} ~* &* +@all")),
    )
}

fn builder(url: &str, prefix: &str) -> RedisStoreBuilder {
    RedisStore::builder().url(url).key_prefix(prefix)
}

/// Creates `SAGAS` sagas and checks that each reads back.
async fn write_sagas(store: &RedisStore) -> Vec<SagaId> {
    let mut ids = Vec::with_capacity(SAGAS);
    for _ in 0..SAGAS {
        let id = SagaId::random();
        store.create(new_saga(id)).await.unwrap();
        assert!(store.load(id).await.unwrap().is_some());
        ids.push(id);
    }
    ids
}

async fn surviving(store: &RedisStore, ids: &[SagaId]) -> usize {
    let mut found = 0;
    for id in ids {
        if store.load(*id).await.unwrap().is_some() {
            found += 1;
        }
    }
    found
}

fn replay_losses(store: &RedisStore) -> Vec<ServerIssue> {
    store
        .server_findings()
        .iter()
        .filter(|f| {
            matches!(
                f.issue,
                ServerIssue::AofReplayLoss { .. } | ServerIssue::AofReplayUnverifiable { .. }
            )
        })
        .map(|f| f.issue.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_user_off_is_refused_and_when_allowed_a_restart_loses_every_saga() {
    let test = "default_user_off_is_refused_and_when_allowed_a_restart_loses_every_saga";
    if !can_spawn_servers(test) {
        return;
    }
    // `user default off` in the config resets the user: no commands, no keys.
    let mut server = durable_server("off");
    let url = app_url(&server);
    let prefix = unique_prefix("replay");

    // With the check: refused, with a message that says what, why and what to do.
    match builder(&url, &prefix).connect().await {
        Err(err @ ConnectError::AofReplayLoss { .. }) => {
            let message = err.to_string();
            for needle in [
                "redis/redis#14541",
                "user default on",
                "+@all",
                "own ACL user",
                "AofAclReplayLoss",
                "--allow-unsafe-redis-config",
                "HSET",
                &server.port().to_string(),
            ] {
                assert!(
                    message.contains(needle),
                    "{needle:?} missing from: {message}"
                );
            }
            assert!(!message.contains(APP_PASSWORD), "{message}");
        }
        Err(other) => panic!("expected ConnectError::AofReplayLoss, got {other}"),
        Ok(_) => panic!("a server that loses every saga on restart must be refused"),
    }

    // Allowed explicitly: it starts, and the finding is kept.
    let store = builder(&url, &prefix)
        .allow_unsafe_server_config(UnsafeServerConfig::AofAclReplayLoss)
        .connect()
        .await
        .unwrap_or_else(|err| panic!("the override must let it start: {err}"));
    match replay_losses(&store).as_slice() {
        [
            ServerIssue::AofReplayLoss {
                server: version,
                aof_confirmed: true,
                ..
            },
        ] => assert!(version.starts_with("Redis "), "{version}"),
        other => panic!("expected one AofReplayLoss finding, got {other:?}"),
    }
    assert!(
        store.server_findings()[0]
            .issue
            .loses_everything_on_restart()
    );
    let ids = write_sagas(&store).await;
    drop(store);

    // kill -9 and restart: the AOF is replayed as the default user.
    server.restart();
    let store = builder(&url, &prefix)
        .allow_unsafe_server_config(UnsafeServerConfig::AofAclReplayLoss)
        .connect()
        .await
        .unwrap();
    let kept = surviving(&store, &ids).await;
    let log = server.log();
    assert_eq!(
        kept, 0,
        "this server version drops the scripts' transactions on AOF replay (redis/redis#14541); \
         if it kept them, it is fixed and the version table must say so. Log:\n{log}"
    );
    assert!(
        log.contains("NOPERM"),
        "the server logs the refused EXECs while loading:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workaround_keeps_every_saga_across_kill_and_restart() {
    let test = "the_workaround_keeps_every_saga_across_kill_and_restart";
    if !can_spawn_servers(test) {
        return;
    }
    for default_rule in [
        // The documented workaround.
        "on >a-long-random-default-password ~* &* +@all",
        // A hardened default user: narrower than +@all, so ACL DRYRUN decides.
        "on >a-long-random-default-password ~* &* +@all -@dangerous",
        // Off, but with the permissions the replay needs.
        "off ~* &* +@all",
    ] {
        let mut server = durable_server(default_rule);
        let url = app_url(&server);
        let prefix = unique_prefix("replay");
        let store = builder(&url, &prefix)
            .connect()
            .await
            .unwrap_or_else(|err| panic!("`user default {default_rule}` must be accepted: {err}"));
        assert_eq!(
            replay_losses(&store),
            vec![],
            "`user default {default_rule}`"
        );
        assert_eq!(
            store.server_findings(),
            &[],
            "a durable server with `user default {default_rule}` has nothing to report"
        );
        let ids = write_sagas(&store).await;
        drop(store);
        server.restart();
        let store = builder(&url, &prefix).connect().await.unwrap();
        assert_eq!(
            surviving(&store, &ids).await,
            SAGAS,
            "`user default {default_rule}`: every saga survives kill -9 and a restart; log:\n{}",
            server.log()
        );
        assert!(!server.log().contains("NOPERM"), "{}", server.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_user_without_the_store_keys_is_refused() {
    if !can_spawn_servers("a_default_user_without_the_store_keys_is_refused") {
        return;
    }
    let server = durable_server("on >a-long-random-default-password ~other:* &* +@all");
    let result = builder(&app_url(&server), &unique_prefix("replay"))
        .connect()
        .await;
    match result {
        Err(ConnectError::AofReplayLoss { problem, .. }) => {
            assert!(problem.contains("HSET"), "{problem}");
            assert!(
                problem.contains("~other:*"),
                "the rules are shown: {problem}"
            );
        }
        Err(other) => panic!("expected ConnectError::AofReplayLoss, got {other}"),
        Ok(_) => panic!("a default user without the store's keys must be refused"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_aof_the_default_user_does_not_matter() {
    if !can_spawn_servers("without_aof_the_default_user_does_not_matter") {
        return;
    }
    let server = RedisServer::start(
        ServerConfig::new()
            .acl_user("default off")
            .acl_user(&format!("app on >{APP_PASSWORD} ~* &* +@all")),
    );
    let store = builder(&app_url(&server), &unique_prefix("replay"))
        .connect()
        .await
        .unwrap();
    assert_eq!(replay_losses(&store), vec![]);
    assert!(
        store
            .server_findings()
            .iter()
            .any(|f| f.issue == ServerIssue::AofDisabled),
        "AOF off is still reported: {:?}",
        store.server_findings()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_default_user_is_a_finding_not_a_refusal() {
    if !can_spawn_servers("an_unreadable_default_user_is_a_finding_not_a_refusal") {
        return;
    }
    let server = RedisServer::start(
        ServerConfig::new()
            .durable()
            .acl_user("default off")
            .acl_user(&format!("app on >{APP_PASSWORD} ~* &* +@all -acl")),
    );
    let store = builder(&app_url(&server), &unique_prefix("replay"))
        .connect()
        .await
        .unwrap_or_else(|err| panic!("an unverifiable default user must not refuse: {err}"));
    match replay_losses(&store).as_slice() {
        [ServerIssue::AofReplayUnverifiable { reason, .. }] => {
            assert!(reason.contains("acl|getuser"), "{reason}");
        }
        other => panic!("expected one AofReplayUnverifiable finding, got {other:?}"),
    }
    let message = store.server_findings()[0].to_string();
    assert!(message.contains("redis/redis#14541"), "{message}");
    assert!(
        !store.server_findings()[0]
            .issue
            .loses_everything_on_restart()
    );
    assert_eq!(store.check_server().await, store.server_findings());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_primary_is_checked() {
    if !can_spawn_servers("every_cluster_primary_is_checked") {
        return;
    }
    let cluster = saga_redis_testkit::RedisCluster::start_with(
        3,
        &ServerConfig::new()
            .durable()
            .acl_user(&format!("app on >{APP_PASSWORD} ~* &* +@all")),
    );
    // The default user loses the store's keys on every node once the cluster is formed.
    for node in cluster.nodes() {
        let mut conn = support::raw(&node.url()).await;
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("resetkeys")
            .arg("~other:*")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    let urls: Vec<String> = cluster.nodes().iter().map(app_url).collect();
    let prefix = unique_prefix("replay");
    match RedisStore::builder()
        .cluster(urls.clone())
        .key_prefix(&prefix)
        .connect()
        .await
    {
        Err(ConnectError::AofReplayLoss { node, .. }) => assert!(
            cluster
                .nodes()
                .iter()
                .any(|n| node.ends_with(&format!(":{}", n.port()))),
            "the refusal names a primary: {node}"
        ),
        Err(other) => panic!("expected ConnectError::AofReplayLoss, got {other}"),
        Ok(_) => panic!("a cluster whose primaries lose every saga on restart must be refused"),
    }
    let store = RedisStore::builder()
        .cluster(urls)
        .key_prefix(&prefix)
        .allow_unsafe_server_config(UnsafeServerConfig::AofAclReplayLoss)
        .connect()
        .await
        .unwrap();
    let mut nodes: Vec<String> = store
        .server_findings()
        .iter()
        .filter(|f| f.issue.loses_everything_on_restart())
        .map(|f| f.node.clone())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(
        nodes.len(),
        3,
        "every primary: {:?}",
        store.server_findings()
    );
    write_sagas(&store).await;
}
