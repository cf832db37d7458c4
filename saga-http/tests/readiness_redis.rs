//! `/readyz` against a real redis-server: ready while writes are accepted, 503 with the
//! server's reason once it refuses writes (over `maxmemory`, `noeviction`), ready again
//! when it accepts them. No timing is asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use saga_core::Engine;
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers, unique_prefix};
use tower::ServiceExt as _;

async fn readyz(app: &axum::Router) -> (StatusCode, String) {
    let request = Request::builder()
        .uri("/readyz")
        .body(Body::empty())
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn config_set(url: &str, name: &str, value: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().unwrap();
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query::<()>(&mut conn)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_the_server_refuses_writes() {
    if !can_spawn_servers("readiness_fails_while_the_server_refuses_writes") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new());
    let store = RedisStore::builder()
        .url(server.url())
        .key_prefix(unique_prefix("readyz"))
        .connect()
        .await
        .unwrap();
    let engine = Engine::builder(store).build().unwrap();
    let app = saga_http::router(engine, saga_http::Auth::Disabled, None);
    let (status, body) = readyz(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Reads still work, writes are refused: not ready, with the server's reason.
    config_set(&server.url(), "maxmemory-policy", "noeviction");
    config_set(&server.url(), "maxmemory", "1");
    let (status, body) = readyz(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("OOM"), "{body}");

    config_set(&server.url(), "maxmemory", "0");
    let (status, body) = readyz(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
