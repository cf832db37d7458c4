//! A coordinator's background chores, beside its workers: retention (purging terminal sagas
//! older than the retention period, in small batches) and the store gauges an operator sizes
//! a deployment by (`saga_stored_sagas{status}`, `saga_due_sagas{partition}`,
//! `saga_active_sagas{saga_type, version, status}`).
//!
//! Several coordinators may do this at once on one store: a purge only deletes terminal
//! sagas, each batch atomically per partition, so racing purges just split the work.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::SagaStatus;
use crate::store::SagaStore;

/// Sagas deleted per purge call: small, so that one call never holds the store for long.
const PURGE_BATCH: usize = 500;

/// Purge calls per round at most; the next round continues where this one stopped.
const PURGE_BATCHES_PER_ROUND: usize = 40;

/// What the chores do and how often.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chores {
    /// Keep terminal sagas this long after their last write; `None` keeps them for ever.
    pub(crate) retention: Option<Duration>,
    /// How often a round runs.
    pub(crate) every: Duration,
}

/// Runs a round at once and then every `chores.every`, until `stop` turns true.
pub(crate) async fn run(
    store: Arc<dyn SagaStore>,
    chores: Chores,
    mut stop: watch::Receiver<bool>,
) {
    let mut active = ActiveGauges::default();
    let mut tick = tokio::time::interval(chores.every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            _ = tick.tick() => {}
        }
        if let Some(keep) = chores.retention {
            purge_round(&*store, keep, &mut stop).await;
        }
        publish_gauges(&*store).await;
        active.publish(&*store).await;
    }
}

/// The per type and version gauges. A version that has drained is published as 0 once (and
/// then no more), so the gauge shows it went to zero instead of keeping its last value.
#[derive(Default)]
struct ActiveGauges {
    last: BTreeSet<(String, String)>,
}

impl ActiveGauges {
    async fn publish(&mut self, store: &dyn SagaStore) {
        let counts = match store.count_active_by_version().await {
            Ok(counts) => counts,
            Err(err) => {
                tracing::debug!(error = %err, "could not count active sagas per version for the gauges");
                return;
            }
        };
        let mut now = BTreeSet::new();
        for count in counts {
            let version = count
                .version
                .map_or_else(|| "unknown".to_owned(), |v| v.to_string());
            crate::telemetry::active_sagas(
                &count.saga_type,
                &version,
                SagaStatus::Running,
                count.running,
            );
            crate::telemetry::active_sagas(
                &count.saga_type,
                &version,
                SagaStatus::Compensating,
                count.compensating,
            );
            now.insert((count.saga_type, version));
        }
        for (saga_type, version) in self.last.difference(&now) {
            for status in [SagaStatus::Running, SagaStatus::Compensating] {
                crate::telemetry::active_sagas(saga_type, version, status, 0);
            }
        }
        self.last = now;
    }
}

async fn purge_round(store: &dyn SagaStore, keep: Duration, stop: &mut watch::Receiver<bool>) {
    let mut purged = 0;
    for _ in 0..PURGE_BATCHES_PER_ROUND {
        if *stop.borrow() {
            break;
        }
        match store.purge(keep, PURGE_BATCH).await {
            Ok(n) => {
                purged += n;
                crate::telemetry::purged(n);
                if n < PURGE_BATCH as u64 {
                    break;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "retention: purging finished sagas failed; will retry next round");
                break;
            }
        }
        // Let other work on this runtime go first between batches.
        tokio::task::yield_now().await;
    }
    if purged > 0 {
        tracing::info!(purged, retention = ?keep, "retention: purged finished sagas");
    }
}

async fn publish_gauges(store: &dyn SagaStore) {
    match store.count_by_status().await {
        Ok(counts) => {
            for (status, n) in counts {
                crate::telemetry::stored_sagas(status, n);
            }
        }
        Err(err) => tracing::debug!(error = %err, "could not count stored sagas for the gauges"),
    }
    match store.due_backlog().await {
        Ok(Some(backlog)) => {
            for (partition, n) in backlog.into_iter().enumerate() {
                crate::telemetry::due_sagas(partition, n);
            }
        }
        Ok(None) => {}
        Err(err) => tracing::debug!(error = %err, "could not count due sagas for the gauges"),
    }
}
