//! Runs one step attempt under its timeout while keeping the saga's lease alive.

use std::future::Future;
use std::time::Duration;

use crate::store::{Lease, SagaStore, StoreError};

pub(crate) enum Guarded<T> {
    Done(T),
    TimedOut(Duration),
    /// The lease was lost (fenced) while the attempt ran; the attempt was dropped.
    Lost(StoreError),
}

/// Polls `work` to completion, or until `timeout` passes, renewing `lease` every third of
/// `ttl` so that a long attempt does not lose its saga. A renewal that is fenced drops the
/// attempt at once: another coordinator owns the saga now.
pub(crate) async fn run_guarded<T>(
    store: &dyn SagaStore,
    lease: &Lease,
    ttl: Duration,
    timeout: Option<Duration>,
    work: impl Future<Output = T>,
) -> Guarded<T> {
    let renew_every = (ttl / 3).max(Duration::from_millis(10));
    let started = tokio::time::Instant::now();
    let deadline = timeout.map(|t| started + t);
    let mut renewals = tokio::time::interval_at(started + renew_every, renew_every);
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            output = &mut work => return Guarded::Done(output),
            () = sleep_until_option(deadline) => {
                return Guarded::TimedOut(timeout.unwrap_or_default());
            }
            _ = renewals.tick() => match store.renew(lease, ttl).await {
                Ok(_) => {}
                Err(err @ (StoreError::Fenced { .. } | StoreError::NotWritable { .. } | StoreError::NotFound(_))) => {
                    if matches!(err, StoreError::Fenced { .. }) {
                        metrics::counter!("saga_fenced_writes_total").increment(1);
                    }
                    tracing::warn!(saga_id = %lease.saga_id, fence = lease.fence, error = %err, "lease renewal rejected; dropping the attempt");
                    return Guarded::Lost(err);
                }
                Err(err) => {
                    tracing::warn!(saga_id = %lease.saga_id, error = %err, "lease renewal failed; will retry");
                }
            },
        }
    }
}

async fn sleep_until_option(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
