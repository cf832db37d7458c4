//! `rediss://`: TLS to a server whose certificate a private CA signed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use saga_core::{SagaId, SagaStore};
use saga_redis::{ConnectError, RedisStore};
use saga_redis_testkit::{
    RedisServer, ServerConfig, can_spawn_servers, openssl_available, unique_prefix,
};
use support::new_saga;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_url_with_the_servers_ca_works_and_an_untrusted_one_is_refused() {
    let test = "rediss_url_with_the_servers_ca_works_and_an_untrusted_one_is_refused";
    if !can_spawn_servers(test) || !openssl_available(test) {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().tls().password("tls-pw"));
    let url = server
        .tls_url()
        .unwrap()
        .replace("rediss://", "rediss://:tls-pw@");
    let store = RedisStore::builder()
        .url(&url)
        .tls_root_certificate(server.tls_ca_pem().unwrap())
        .key_prefix(unique_prefix("tls"))
        .connect()
        .await
        .unwrap_or_else(|err| panic!("connect over TLS failed: {err}"));
    let id = SagaId::random();
    store.create(new_saga(id)).await.unwrap();
    assert!(store.load(id).await.unwrap().is_some());

    // Without the CA, the system's roots do not trust the server: a clear connect error.
    let untrusted = RedisStore::builder()
        .url(&url)
        .key_prefix(unique_prefix("tls"))
        .connect()
        .await;
    match untrusted {
        Err(err @ ConnectError::Unreachable { .. }) => {
            let message = format!("{err} / {:?}", std::error::Error::source(&err));
            assert!(message.to_lowercase().contains("certificate"), "{message}");
            assert!(
                !message.contains("tls-pw"),
                "the password must not show: {message}"
            );
        }
        Err(other) => panic!("an untrusted certificate must fail the connection, got {other}"),
        Ok(_) => panic!("an untrusted certificate must not connect"),
    }
}
