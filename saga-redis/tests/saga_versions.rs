//! The workflow version in the Redis store: kept in the saga hash, validated by the script,
//! and optional for sagas stored before it was kept (no `version` field): those load, list,
//! count, claim and commit as before.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use redis::AsyncCommands;
use saga_core::store::{ClaimOutcome, ListQuery, NewSaga, Schedule, Transition, VersionCount};
use saga_core::{SagaId, SagaStatus, SagaStore};
use saga_redis_testkit::shared_server;
use support::{LONG, event, new_saga, owner, raw, raw_create, state, store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_is_stored_and_sagas_without_one_keep_working() {
    let url = shared_server().url();
    let store = store(&url, "versions").await;
    let mut conn = raw(&url).await;
    let current = SagaId::random();
    store
        .create(NewSaga {
            version: 4_000_000_000,
            ..new_saga(current)
        })
        .await
        .unwrap();
    let stored: Option<String> = conn
        .hget(store.keys().saga(current), "version")
        .await
        .unwrap();
    assert_eq!(
        stored.as_deref(),
        Some("4000000000"),
        "the hash keeps the version"
    );

    // A saga written before versions were kept: no `version` field.
    let legacy = SagaId::random();
    store.create(new_saga(legacy)).await.unwrap();
    let _: () = conn
        .hdel(store.keys().saga(legacy), "version")
        .await
        .unwrap();

    let page = store
        .list(&ListQuery {
            limit: 10,
            ..ListQuery::default()
        })
        .await
        .unwrap();
    let version_of = |id: SagaId| page.sagas.iter().find(|s| s.id == id).map(|s| s.version);
    assert_eq!(version_of(current), Some(Some(4_000_000_000)));
    assert_eq!(version_of(legacy), Some(None), "listed, without a version");
    let saga_type = new_saga(legacy).saga_type;
    let counts = store.count_active_by_version().await.unwrap();
    assert_eq!(
        counts,
        vec![
            VersionCount {
                saga_type: saga_type.clone(),
                version: None,
                running: 1,
                compensating: 0,
            },
            VersionCount {
                saga_type,
                version: Some(4_000_000_000),
                running: 1,
                compensating: 0,
            },
        ]
    );

    assert!(store.load(legacy).await.unwrap().is_some(), "loads");
    let lease = match store.claim(legacy, &owner("w", LONG)).await.unwrap() {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("a saga without a version must be claimable: {other:?}"),
    };
    let compensating = Transition {
        commit_id: "c1".to_owned(),
        events: vec![event("compensating")],
        state: state(1),
        status: SagaStatus::Compensating,
        schedule: Schedule::Continue { ttl: LONG },
    };
    store.commit(&lease, compensating).await.unwrap();
    let counts = store.count_active_by_version().await.unwrap();
    assert_eq!(
        (counts[0].version, counts[0].running, counts[0].compensating),
        (None, 0, 1)
    );
    let done = Transition {
        commit_id: "c2".to_owned(),
        events: vec![event("compensated")],
        state: state(2),
        status: SagaStatus::Compensated,
        schedule: Schedule::Finished,
    };
    store.commit(&lease, done).await.unwrap();
    assert_eq!(
        store.count_active_by_version().await.unwrap().len(),
        1,
        "a finished saga is not counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_version_is_refused_before_any_write() {
    let url = shared_server().url();
    let store = store(&url, "versions_raw").await;
    let mut conn = raw(&url).await;
    let id = SagaId::random();
    for version in ["4294967296", "-1", "v2", ""] {
        let reply = raw_create(&mut conn, &store, id, "{}", 1024, version).await;
        let text = format!("{reply:?}");
        assert!(
            text.contains("invalid") && text.contains("workflow version"),
            "version {version:?}: {text}"
        );
        assert!(store.load(id).await.unwrap().is_none(), "nothing written");
    }
}
