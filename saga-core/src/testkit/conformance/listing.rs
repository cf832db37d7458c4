//! Listing, counting and purging.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{WAIT_BOUND, create_in_status, create_saga, load, wait_for};
use crate::store::{ListQuery, SagaStore, SagaSummary, StoreError};
use crate::{SagaId, SagaStatus};

/// Pages through `query` from the start until `next` is `None`; checks that every page holds
/// at most `limit` rows, that the cursor advances, and that rows come in strictly increasing
/// id order across pages. Returns every row.
async fn list_all(store: &dyn SagaStore, query: &ListQuery) -> Vec<SagaSummary> {
    let mut rows: Vec<SagaSummary> = Vec::new();
    let mut after = query.after;
    for _ in 0..1_000 {
        let page = store
            .list(&ListQuery {
                after,
                ..query.clone()
            })
            .await
            .unwrap();
        assert!(
            page.sagas.len() <= query.limit,
            "a page must hold at most limit = {} rows, got {}",
            query.limit,
            page.sagas.len()
        );
        for row in page.sagas {
            if let Some(cursor) = after {
                assert!(
                    row.id > cursor,
                    "a page must only hold ids after its cursor {cursor}, got {}",
                    row.id
                );
            }
            if let Some(last) = rows.last() {
                assert!(
                    row.id > last.id,
                    "rows must come in strictly increasing id order: {} then {}",
                    last.id,
                    row.id
                );
            }
            rows.push(row);
        }
        match page.next {
            None => return rows,
            Some(next) => {
                if let Some(cursor) = after {
                    assert!(
                        next > cursor,
                        "the cursor must advance: {cursor} then {next}"
                    );
                }
                after = Some(next);
            }
        }
    }
    panic!("listing {query:?} did not end within 1000 pages");
}

fn ids(rows: &[SagaSummary]) -> Vec<SagaId> {
    rows.iter().map(|row| row.id).collect()
}

/// `list` returns each matching saga exactly once, in id order, through pages of at most
/// `limit` rows chained by `next` (a page may be short, but only `next = None` ends the
/// listing); status and type filters apply alone and together; summaries show type, status,
/// `updated_at` and the quarantine reason; `after` may be any id.
pub async fn list_filters_and_pages(store: Arc<dyn SagaStore>) {
    let empty = store
        .list(&ListQuery {
            limit: 10,
            ..ListQuery::default()
        })
        .await
        .unwrap();
    assert!(
        empty.sagas.is_empty() && empty.next.is_none(),
        "an empty store lists nothing, got {empty:?}"
    );

    let alpha = "alpha {type}:1";
    let beta = "beta type/ü";
    // (id, type, status), 4 sagas per status, both types for every status.
    let mut expected: Vec<(SagaId, &str, SagaStatus)> = Vec::new();
    for i in 0..20 {
        let saga_type = if i % 2 == 0 { alpha } else { beta };
        let status = SagaStatus::ALL[i % SagaStatus::ALL.len()];
        expected.push((
            create_in_status(&*store, saga_type, status).await,
            saga_type,
            status,
        ));
    }
    let parked = create_in_status(&*store, alpha, SagaStatus::Running).await;
    store.quarantine(parked, "bad data").await.unwrap();
    expected.push((parked, alpha, SagaStatus::Running));
    expected.sort_by_key(|(id, _, _)| *id);

    let all = list_all(
        &*store,
        &ListQuery {
            limit: 3,
            ..ListQuery::default()
        },
    )
    .await;
    let want: Vec<SagaId> = expected.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(
        ids(&all),
        want,
        "paging through all sagas must return each exactly once, in id order"
    );
    for (row, (id, saga_type, status)) in all.iter().zip(&expected) {
        assert_eq!(row.saga_type, *saga_type, "summary of {id}: type");
        assert_eq!(row.status, *status, "summary of {id}: status");
        let saga = load(&*store, *id).await;
        assert_eq!(
            row.updated_at, saga.updated_at,
            "summary of {id}: updated_at"
        );
        assert_eq!(
            row.quarantined, saga.quarantined,
            "summary of {id}: quarantine reason"
        );
    }
    assert!(
        all.iter()
            .any(|row| row.quarantined.as_deref() == Some("bad data")),
        "the listing must show the quarantine reason"
    );

    for status in SagaStatus::ALL {
        let query = ListQuery {
            status: Some(status),
            limit: 2,
            ..ListQuery::default()
        };
        let rows = list_all(&*store, &query).await;
        let want: Vec<SagaId> = expected
            .iter()
            .filter(|e| e.2 == status)
            .map(|e| e.0)
            .collect();
        assert_eq!(
            ids(&rows),
            want,
            "listing status {status} must return exactly its sagas"
        );
    }
    for saga_type in [alpha, beta] {
        let query = ListQuery {
            saga_type: Some(saga_type.to_owned()),
            limit: 4,
            ..ListQuery::default()
        };
        let rows = list_all(&*store, &query).await;
        let want: Vec<SagaId> = expected
            .iter()
            .filter(|e| e.1 == saga_type)
            .map(|e| e.0)
            .collect();
        assert_eq!(
            ids(&rows),
            want,
            "listing type {saga_type:?} must return exactly its sagas"
        );
    }
    let query = ListQuery {
        status: Some(SagaStatus::Completed),
        saga_type: Some(beta.to_owned()),
        limit: 1,
        after: None,
    };
    let rows = list_all(&*store, &query).await;
    let want: Vec<SagaId> = expected
        .iter()
        .filter(|e| e.1 == beta && e.2 == SagaStatus::Completed)
        .map(|e| e.0)
        .collect();
    assert!(!want.is_empty(), "the fixture has completed beta sagas");
    assert_eq!(
        ids(&rows),
        want,
        "status and type filters must apply together"
    );

    let query = ListQuery {
        saga_type: Some("no such type".to_owned()),
        limit: 5,
        ..ListQuery::default()
    };
    assert!(
        list_all(&*store, &query).await.is_empty(),
        "an unknown type lists nothing"
    );

    // `after` need not be a listed id.
    let from_nil = list_all(
        &*store,
        &ListQuery {
            limit: 7,
            after: Some(SagaId(uuid::Uuid::nil())),
            ..ListQuery::default()
        },
    )
    .await;
    assert_eq!(
        ids(&from_nil),
        ids(&all),
        "listing after the nil id returns every saga"
    );
    let past_end = ListQuery {
        limit: 7,
        after: Some(SagaId(uuid::Uuid::max())),
        ..ListQuery::default()
    };
    assert!(
        list_all(&*store, &past_end).await.is_empty(),
        "listing after the largest id returns nothing"
    );
}

/// `count_by_status` has an entry for every status, zero included, in an empty store and
/// after sagas in some statuses (quarantined ones count under their status).
pub async fn count_by_status_counts_every_status(store: Arc<dyn SagaStore>) {
    let zeros: BTreeMap<SagaStatus, u64> = SagaStatus::ALL.into_iter().map(|s| (s, 0)).collect();
    assert_eq!(
        store.count_by_status().await.unwrap(),
        zeros,
        "an empty store counts zero for every status"
    );

    let plan = [
        (SagaStatus::Running, 2),
        (SagaStatus::Compensating, 1),
        (SagaStatus::Completed, 3),
        (SagaStatus::Compensated, 0),
        (SagaStatus::Failed, 1),
    ];
    for (status, n) in plan {
        for _ in 0..n {
            create_in_status(&*store, super::SAGA_TYPE, status).await;
        }
    }
    let parked = create_saga(&*store).await;
    store.quarantine(parked, "bad data").await.unwrap();
    let mut want = zeros;
    for (status, n) in plan {
        want.insert(status, n);
    }
    *want.entry(SagaStatus::Running).or_default() += 1;
    assert_eq!(
        store.count_by_status().await.unwrap(),
        want,
        "counts by status (every status present)"
    );
}

/// `count_quarantined` counts the sagas set aside and agrees with `list`.
pub async fn count_quarantined_counts_the_sagas_set_aside(store: Arc<dyn SagaStore>) {
    assert_eq!(
        store.count_quarantined().await.unwrap(),
        0,
        "an empty store"
    );
    let first = create_saga(&*store).await;
    let second = create_saga(&*store).await;
    create_saga(&*store).await;
    store.quarantine(first, "bad data").await.unwrap();
    store.quarantine(second, "bad data too").await.unwrap();
    assert_eq!(store.count_quarantined().await.unwrap(), 2);
    let everything = ListQuery {
        limit: 100,
        ..ListQuery::default()
    };
    let listed = list_all(&*store, &everything)
        .await
        .iter()
        .filter(|s| s.quarantined.is_some())
        .count();
    assert_eq!(listed, 2, "list shows the same sagas as quarantined");
}

/// `purge` deletes only terminal sagas last written more than `older_than` ago, at most
/// `limit` per call, with their histories: afterwards `load` is `None` and `events` is
/// [`StoreError::NotFound`]. Running, compensating and quarantined sagas survive with their
/// events, whatever their age.
pub async fn purge_deletes_only_finished_sagas(store: Arc<dyn SagaStore>) {
    let mut live = Vec::new();
    for status in [SagaStatus::Running, SagaStatus::Compensating] {
        live.push(create_in_status(&*store, super::SAGA_TYPE, status).await);
    }
    let parked = create_saga(&*store).await;
    store.quarantine(parked, "bad data").await.unwrap();
    live.push(parked);
    let mut finished = Vec::new();
    for status in [
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Failed,
    ] {
        finished.push(create_in_status(&*store, super::SAGA_TYPE, status).await);
    }
    let mut live_events = Vec::new();
    for id in &live {
        live_events.push(super::events(&*store, *id).await);
    }

    let purged = store.purge(Duration::from_secs(3600), 100).await.unwrap();
    assert_eq!(
        purged, 0,
        "sagas finished just now are not older than an hour"
    );
    let purged = store.purge(Duration::ZERO, 2).await.unwrap();
    assert_eq!(
        purged, 2,
        "purge must delete up to limit = 2 finished sagas"
    );
    let purged = store.purge(Duration::ZERO, 100).await.unwrap();
    assert_eq!(purged, 1, "the next purge deletes the last finished saga");
    let purged = store.purge(Duration::ZERO, 100).await.unwrap();
    assert_eq!(purged, 0, "nothing is left to purge");

    for id in &finished {
        assert_eq!(
            store.load(*id).await.unwrap(),
            None,
            "a purged saga {id} must not load"
        );
        match store.events(*id).await {
            Err(StoreError::NotFound(missing)) => assert_eq!(missing, *id, "NotFound names the id"),
            other => panic!("events of purged saga {id} must be NotFound, got {other:?}"),
        }
    }
    for (id, before) in live.iter().zip(&live_events) {
        assert!(
            store.load(*id).await.unwrap().is_some(),
            "live saga {id} must survive a purge"
        );
        assert_eq!(
            &super::events(&*store, *id).await,
            before,
            "live saga {id} keeps its events"
        );
    }
    let counts = store.count_by_status().await.unwrap();
    let finished_left: u64 = SagaStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| counts[s])
        .sum();
    assert_eq!(
        finished_left, 0,
        "counts must not include purged sagas: {counts:?}"
    );
    let listed = list_all(
        &*store,
        &ListQuery {
            limit: 10,
            ..ListQuery::default()
        },
    )
    .await;
    let mut want = live.clone();
    want.sort();
    assert_eq!(
        ids(&listed),
        want,
        "the listing must not include purged sagas"
    );
}

/// `purge(older_than, ..)` keeps a finished saga until `older_than` has passed since its last
/// write, then deletes it. Polls a 300 ms retention period.
pub async fn purge_respects_the_retention_period(store: Arc<dyn SagaStore>) {
    let live = create_saga(&*store).await;
    let finished = create_in_status(&*store, super::SAGA_TYPE, SagaStatus::Completed).await;
    let purged = store.purge(Duration::from_secs(10), 100).await.unwrap();
    assert_eq!(purged, 0, "a saga finished just now is not older than 10 s");
    assert!(
        store.load(finished).await.unwrap().is_some(),
        "the saga must survive until its retention period passes"
    );
    wait_for(
        "the finished saga to pass its retention period",
        WAIT_BOUND,
        async || {
            let purged = store.purge(Duration::from_millis(300), 100).await.unwrap();
            assert!(
                purged <= 1,
                "only one saga can be purged, purge deleted {purged}"
            );
            (purged == 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        store.load(finished).await.unwrap(),
        None,
        "the old finished saga is purged"
    );
    assert!(
        store.load(live).await.unwrap().is_some(),
        "a running saga is never purged"
    );
}
