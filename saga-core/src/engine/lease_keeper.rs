//! Keeps a saga's lease alive beside work that is not one guarded attempt: a parallel block,
//! whose branches run in tasks of their own while the run commits their outcomes.
//!
//! A task renews the lease every third of its time to live, and reports two things: a cancel
//! request the store answered a renewal with, and the loss of the lease (fenced, the saga
//! ended or vanished, or renewals failing until the lease was about to lapse). It stops when
//! dropped. Commits made meanwhile extend the lease too; renewing an extended lease is
//! harmless.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Interruption;
use crate::store::{Lease, SagaStore, StoreError};

/// What the keeper has heard.
#[derive(Clone, Debug, Default)]
pub(crate) struct LeaseNews {
    /// A renewal reported a cancel request.
    pub(crate) cancel_requested: bool,
    /// The lease is lost; nothing more may be written.
    pub(crate) lost: Option<Interruption>,
}

/// The renewal task and what it heard; the task stops when this is dropped.
pub(crate) struct LeaseKeeper {
    task: JoinHandle<()>,
    news: watch::Receiver<LeaseNews>,
}

impl LeaseKeeper {
    /// Starts renewing `lease` (just extended by `ttl`, by the commit before this).
    pub(crate) fn spawn(store: Arc<dyn SagaStore>, lease: Lease, ttl: Duration) -> Self {
        let (tell, news) = watch::channel(LeaseNews::default());
        let task = tokio::spawn(keep(store, lease, ttl, tell));
        Self { task, news }
    }

    /// Completes when there is news (a cancel request, or the lease lost).
    pub(crate) async fn changed(&mut self) -> LeaseNews {
        if self.news.changed().await.is_err() {
            // The task ended without a word: it only does so after telling of a loss.
            return self.news.borrow().clone();
        }
        self.news.borrow_and_update().clone()
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep(
    store: Arc<dyn SagaStore>,
    lease: Lease,
    ttl: Duration,
    tell: watch::Sender<LeaseNews>,
) {
    let every = (ttl / 3).max(Duration::from_millis(10));
    // Give up a little before the lease lapses: the store's clock may run ahead of ours.
    let margin = ttl / 10;
    let mut valid_until = Instant::now() + ttl;
    let mut cancel_told = false;
    loop {
        let next =
            (Instant::now() + every).min(valid_until.checked_sub(margin).unwrap_or(valid_until));
        tokio::time::sleep_until(next).await;
        if Instant::now() + margin >= valid_until {
            tracing::warn!(saga_id = %lease.saga_id, "lease could not be renewed before it lapsed; stopping the parallel block");
            tell.send_modify(|news| news.lost = Some(Interruption::LeaseLapsed));
            return;
        }
        let sent = Instant::now();
        match store.renew(&lease, ttl).await {
            Ok(outcome) => {
                valid_until = sent + ttl;
                if outcome.cancel_requested && !cancel_told {
                    cancel_told = true;
                    tell.send_modify(|news| news.cancel_requested = true);
                }
            }
            Err(
                err @ (StoreError::Fenced { .. }
                | StoreError::NotWritable { .. }
                | StoreError::NotFound(_)),
            ) => {
                if matches!(err, StoreError::Fenced { .. }) {
                    crate::telemetry::fenced_write();
                }
                tracing::warn!(saga_id = %lease.saga_id, fence = lease.fence, error = %err, "lease renewal rejected; stopping the parallel block");
                tell.send_modify(|news| news.lost = Some(Interruption::from_store(err)));
                return;
            }
            Err(err) => {
                tracing::warn!(saga_id = %lease.saga_id, error = %err, "lease renewal failed; will retry");
            }
        }
    }
}
