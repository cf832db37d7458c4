//! The workflow version: kept per saga, shown in listings, counted per type and version.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::create_versioned;
use crate::store::{ListQuery, SagaStore, VersionCount};
use crate::{SagaId, SagaStatus};

/// `count_active_by_version` counts the `Running` and `Compensating` sagas (quarantined ones
/// under their status) per type and version, sorted by type then version, with no row for a
/// type and version that has only terminal sagas; a listing's summary carries the version a
/// saga was started under.
pub async fn count_active_by_version_counts_running_and_compensating(store: Arc<dyn SagaStore>) {
    assert_eq!(
        store.count_active_by_version().await.unwrap(),
        Vec::new(),
        "an empty store has no active sagas"
    );
    let alpha = "alpha {type}:1";
    let beta = "beta type/ü";
    let done = "gamma only finished";
    // (type, version, status, how many)
    let plan: [(&str, u32, SagaStatus, usize); 12] = [
        (alpha, 1, SagaStatus::Running, 2),
        (alpha, 1, SagaStatus::Compensating, 1),
        (alpha, 1, SagaStatus::Completed, 1),
        (alpha, 2, SagaStatus::Running, 1),
        (alpha, 2, SagaStatus::Failed, 1),
        (beta, 1, SagaStatus::Compensating, 2),
        (beta, 1, SagaStatus::Compensated, 1),
        (beta, u32::MAX, SagaStatus::Running, 1),
        (beta, u32::MAX, SagaStatus::Compensating, 1),
        (beta, u32::MAX, SagaStatus::Completed, 2),
        (done, 1, SagaStatus::Completed, 1),
        (done, 3, SagaStatus::Failed, 1),
    ];
    let mut versions: BTreeMap<SagaId, u32> = BTreeMap::new();
    for (saga_type, version, status, n) in plan {
        for _ in 0..n {
            let id = create_versioned(&*store, saga_type, version, status).await;
            versions.insert(id, version);
        }
    }
    // Set aside, still running by status: counted.
    let parked = create_versioned(&*store, alpha, 2, SagaStatus::Running).await;
    store.quarantine(parked, "bad data").await.unwrap();
    versions.insert(parked, 2);

    let row = |saga_type: &str, version: u32, running: u64, compensating: u64| VersionCount {
        saga_type: saga_type.to_owned(),
        version: Some(version),
        running,
        compensating,
    };
    let want = vec![
        row(alpha, 1, 2, 1),
        row(alpha, 2, 2, 0),
        row(beta, 1, 0, 2),
        row(beta, u32::MAX, 1, 1),
    ];
    assert_eq!(
        store.count_active_by_version().await.unwrap(),
        want,
        "active sagas per type and version (terminal ones not counted, quarantined ones under their status)"
    );

    let mut query = ListQuery {
        limit: 1000,
        ..ListQuery::default()
    };
    let mut seen = 0;
    loop {
        let page = store.list(&query).await.unwrap();
        for summary in &page.sagas {
            let expected = versions.get(&summary.id).copied();
            assert_eq!(
                summary.version, expected,
                "the summary of {} carries the version it was started under",
                summary.id
            );
            seen += 1;
        }
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, versions.len(), "the listing shows every saga");
}
