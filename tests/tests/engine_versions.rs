//! Versioned workflows: several versions of one saga type registered side by side, each saga
//! run only under the version it was started with, starts by name on the newest version
//! unless one is picked, and a saga whose version is not registered set aside (quarantined,
//! not failed) until a coordinator that has it retries it. On memory and on Redis.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use saga_core::store::VersionCount;
use saga_core::{
    Engine, EngineError, MemoryStore, Outcome, SagaContext, SagaError, SagaStatus, SagaStore,
    StartOptions,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers};
use serde_json::json;

/// Version 1 of the workflow.
#[saga_core::saga(name = "onboarding", version = 1)]
async fn onboarding_v1(_saga: &mut SagaContext, client: String) -> Result<String, SagaError> {
    Ok(format!("v1 onboarded {client}"))
}

/// Version 2: the same saga type, new code.
#[saga_core::saga(name = "onboarding", version = 2)]
async fn onboarding_v2(_saga: &mut SagaContext, client: String) -> Result<String, SagaError> {
    Ok(format!("v2 onboarded {client}"))
}

fn both(store: Arc<dyn SagaStore>) -> Engine {
    Engine::builder_shared(store)
        .register(OnboardingV1)
        .register(OnboardingV2)
        .owner("both")
        .build()
        .unwrap()
}

fn only_v2(store: Arc<dyn SagaStore>) -> Engine {
    Engine::builder_shared(store)
        .register(OnboardingV2)
        .owner("only-v2")
        .build()
        .unwrap()
}

async fn versions_run_side_by_side(store: Arc<dyn SagaStore>) {
    let engine = both(Arc::clone(&store));
    assert_eq!(
        engine.saga_versions(),
        [("onboarding", 1), ("onboarding", 2)]
    );

    // Typed starts run the version of the type they name.
    let old = engine
        .start(OnboardingV1, "acme".into())
        .execute()
        .await
        .unwrap();
    assert_eq!(old, Outcome::Completed("v1 onboarded acme".to_owned()));
    let new = engine
        .start(OnboardingV2, "acme".into())
        .execute()
        .await
        .unwrap();
    assert_eq!(new, Outcome::Completed("v2 onboarded acme".to_owned()));

    // By name: the newest, unless a version is picked.
    let newest = engine
        .start_json("onboarding", json!("initech"), StartOptions::default())
        .await
        .unwrap();
    let outcome = engine.run_to_end(newest.id).await.unwrap();
    assert_eq!(outcome.output, Some(json!("v2 onboarded initech")));
    assert_eq!(engine.state(newest.id).await.unwrap().version, 2);

    let picked = engine
        .start_json(
            "onboarding",
            json!("initech"),
            StartOptions::default().with_version(1),
        )
        .await
        .unwrap();
    let outcome = engine.run_to_end(picked.id).await.unwrap();
    assert_eq!(outcome.output, Some(json!("v1 onboarded initech")));

    let err = engine
        .start_json(
            "onboarding",
            json!("initech"),
            StartOptions::default().with_version(3),
        )
        .await
        .unwrap_err();
    match err {
        EngineError::UnknownSagaType { name, known } => {
            assert_eq!(name, "onboarding v3");
            assert_eq!(known, ["onboarding v1", "onboarding v2"]);
        }
        other => panic!("expected UnknownSagaType, got {other:?}"),
    }
}

async fn an_unregistered_version_is_set_aside_until_it_is_deployed(store: Arc<dyn SagaStore>) {
    // A v1 saga is stored (by a coordinator that still had v1) but not run yet...
    let old_fleet = both(Arc::clone(&store));
    let handle = old_fleet
        .start(OnboardingV1, "globex".into())
        .key("globex")
        .await
        .unwrap();
    let running_v1 = |counts: &[VersionCount]| {
        counts
            .iter()
            .find(|c| c.saga_type == "onboarding" && c.version == Some(1))
            .map_or(0, |c| c.running)
    };
    assert_eq!(
        running_v1(&store.count_active_by_version().await.unwrap()),
        1
    );

    // ...and a coordinator that only registers v2 claims it: set aside, not failed, not run
    // under the wrong code.
    let new_fleet = only_v2(Arc::clone(&store));
    let err = new_fleet.run_to_end(handle.id()).await.unwrap_err();
    let EngineError::Quarantined { reason, .. } = &err else {
        panic!("expected Quarantined, got {err:?}");
    };
    assert!(reason.contains("version 1 is not registered"), "{reason}");
    assert!(reason.contains("onboarding v2"), "{reason}");
    assert!(reason.contains("saga retry"), "{reason}");
    let stored = store.load(handle.id()).await.unwrap().unwrap();
    assert_eq!(
        stored.status,
        SagaStatus::Running,
        "quarantined, not failed"
    );
    assert!(stored.quarantined.is_some());

    // Version 1 is deployed again: a retry releases it and it runs under v1.
    assert_eq!(
        old_fleet
            .retry(handle.id(), "v1 deployed again")
            .await
            .unwrap(),
        SagaStatus::Running
    );
    let outcome = handle.run_to_end().await.unwrap();
    assert_eq!(
        outcome,
        Outcome::Completed("v1 onboarded globex".to_owned())
    );
    assert_eq!(
        running_v1(&store.count_active_by_version().await.unwrap()),
        0,
        "version 1 has drained"
    );
}

#[tokio::test(start_paused = true)]
async fn memory_versions_run_side_by_side() {
    versions_run_side_by_side(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(start_paused = true)]
async fn memory_an_unregistered_version_is_set_aside_until_it_is_deployed() {
    an_unregistered_version_is_set_aside_until_it_is_deployed(Arc::new(MemoryStore::new())).await;
}

#[test]
fn registering_one_version_twice_is_refused() {
    let err = Engine::builder(MemoryStore::new())
        .register(OnboardingV1)
        .register(OnboardingV2)
        .register(OnboardingV1)
        .build()
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("`onboarding` version 1 is registered twice"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_versions() {
    if !can_spawn_servers("redis_versions") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    for (prefix, scenario) in [("versions-a", 0), ("versions-b", 1)] {
        let store: Arc<dyn SagaStore> = Arc::new(
            RedisStore::builder()
                .url(server.url())
                .key_prefix(prefix)
                .connect()
                .await
                .expect("connect to the test redis-server"),
        );
        if scenario == 0 {
            versions_run_side_by_side(store).await;
        } else {
            an_unregistered_version_is_set_aside_until_it_is_deployed(store).await;
        }
    }
}
