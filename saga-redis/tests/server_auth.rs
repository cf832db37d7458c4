//! Credentials from the URL: `requirepass` and ACL users. Right ones work; wrong or missing
//! ones fail `connect` at once with a clear error (not a hang, not a retry loop).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use saga_core::{SagaId, SagaStore};
use saga_redis::{ConnectError, RedisStore};
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers, unique_prefix};
use support::new_saga;

/// A refused connect must come back within this bound (a hang fails the test).
const BOUND: Duration = Duration::from_secs(20);

async fn connect(url: &str) -> Result<RedisStore, ConnectError> {
    let attempt = RedisStore::builder()
        .url(url)
        .key_prefix(unique_prefix("auth"))
        .connect();
    tokio::time::timeout(BOUND, attempt)
        .await
        .unwrap_or_else(|_| panic!("connect to {url} hung for {BOUND:?}"))
}

async fn works(url: &str) {
    let store = connect(url)
        .await
        .unwrap_or_else(|err| panic!("connect with the right credentials failed: {err}"));
    let id = SagaId::random();
    store.create(new_saga(id)).await.unwrap();
    assert!(store.load(id).await.unwrap().is_some());
}

fn assert_refused(result: Result<RedisStore, ConnectError>, password: &str) {
    match result {
        Err(err @ ConnectError::Auth { .. }) => {
            let message = err.to_string();
            assert!(
                message.contains("refused the credentials"),
                "unclear message: {message}"
            );
            assert!(
                !message.contains(password) || password.is_empty(),
                "the message must not show the password: {message}"
            );
            assert!(
                std::error::Error::source(&err).is_some(),
                "the Redis error is kept as the source"
            );
        }
        Err(other) => panic!("wrong credentials must be ConnectError::Auth, got {other}"),
        Ok(_) => panic!("wrong credentials must not connect"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirepass_right_password_works_wrong_or_missing_is_refused() {
    if !can_spawn_servers("requirepass_right_password_works_wrong_or_missing_is_refused") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().password("pa55-word"));
    works(&server.url_with_credentials(None, "pa55-word")).await;
    assert_refused(
        connect(&server.url_with_credentials(None, "wrong-password")).await,
        "wrong-password",
    );
    assert_refused(connect(&server.url()).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_right_password_works_wrong_one_is_refused() {
    if !can_spawn_servers("acl_user_right_password_works_wrong_one_is_refused") {
        return;
    }
    let server = RedisServer::start(
        ServerConfig::new()
            .acl_user("saga on >alice-secret ~* &* +@all")
            .acl_user("default off"),
    );
    works(&server.url_with_credentials(Some("saga"), "alice-secret")).await;
    assert_refused(
        connect(&server.url_with_credentials(Some("saga"), "not-alice")).await,
        "not-alice",
    );
    assert_refused(
        connect(&server.url_with_credentials(Some("nobody"), "alice-secret")).await,
        "alice-secret",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_may_not_publish_on_the_wake_channel_is_refused_at_connect() {
    if !can_spawn_servers("a_user_that_may_not_publish_on_the_wake_channel_is_refused_at_connect") {
        return;
    }
    // Redis 7 gives a new ACL user no channel unless told (`acl-pubsub-default resetchannels`).
    let server = RedisServer::start(
        ServerConfig::new()
            .acl_user("nochannels on >pw ~* +@all resetchannels")
            .acl_user("withchannels on >pw ~* &* +@all"),
    );
    let Err(err) = connect(&server.url_with_credentials(Some("nochannels"), "pw")).await else {
        panic!("a user that may not publish wake-ups must be refused at connect");
    };
    let ConnectError::Store(store_err @ saga_core::StoreError::Refused { .. }) = &err else {
        panic!("expected a refusal, got {err:?}");
    };
    let message = store_err.to_string();
    assert!(
        message.contains("PUBLISH") && message.contains(":wake") && message.contains("ACL SETUSER"),
        "the message says what to allow: {message}"
    );
    assert!(
        !message.contains("pw@"),
        "no password in the message: {message}"
    );
    works(&server.url_with_credentials(Some("withchannels"), "pw")).await;
}
