//! Runs one step attempt under its timeout while keeping the saga's lease alive.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use super::Interruption;
use crate::store::{CommitOutcome, Lease, SagaStore, StoreError};

pub(crate) enum Guarded<T> {
    Done(T),
    TimedOut(Duration),
    /// The lease was lost (fenced) or could not be kept alive; the attempt was dropped.
    Lost(Interruption),
}

type Renewal<'a> = Pin<Box<dyn Future<Output = Result<CommitOutcome, StoreError>> + Send + 'a>>;

/// Polls `work` to completion, or until `timeout` passes, renewing `lease` every third of
/// `ttl` so that a long attempt does not lose its saga. Renewals run beside the attempt (a
/// slow store never stalls it). The attempt is dropped at once when a renewal is fenced
/// (another coordinator owns the saga) and also when renewals keep failing until the lease
/// is about to lapse: running on past it would let a second coordinator run the same step
/// concurrently.
pub(crate) async fn run_guarded<T>(
    store: &dyn SagaStore,
    lease: &Lease,
    ttl: Duration,
    timeout: Option<Duration>,
    work: impl Future<Output = T>,
) -> Guarded<T> {
    let renew_every = (ttl / 3).max(Duration::from_millis(10));
    // Stop a little before the lease lapses: the store's clock may run ahead of ours.
    let margin = ttl / 10;
    let started = Instant::now();
    let deadline = timeout.map(|t| started + t);
    // The commit just before the attempt extended the lease by `ttl`.
    let mut valid_until = started + ttl;
    let mut renewals = tokio::time::interval_at(started + renew_every, renew_every);
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight: Option<(Instant, Renewal<'_>)> = None;
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            output = &mut work => return Guarded::Done(output),
            () = sleep_until_option(deadline) => {
                return Guarded::TimedOut(timeout.unwrap_or_default());
            }
            (sent, result) = finished_renewal(&mut in_flight) => match result {
                Ok(_) => valid_until = sent + ttl,
                Err(err @ (StoreError::Fenced { .. } | StoreError::NotWritable { .. } | StoreError::NotFound(_))) => {
                    if matches!(err, StoreError::Fenced { .. }) {
                        crate::telemetry::fenced_write();
                    }
                    tracing::warn!(saga_id = %lease.saga_id, fence = lease.fence, error = %err, "lease renewal rejected; dropping the attempt");
                    return Guarded::Lost(Interruption::from_store(err));
                }
                Err(err) => {
                    tracing::warn!(saga_id = %lease.saga_id, error = %err, "lease renewal failed; will retry");
                }
            },
            _ = renewals.tick(), if in_flight.is_none() => {
                in_flight = Some((Instant::now(), store.renew(lease, ttl)));
            }
            () = tokio::time::sleep_until(valid_until.checked_sub(margin).unwrap_or(valid_until)) => {
                tracing::warn!(saga_id = %lease.saga_id, "lease could not be renewed before it lapsed; dropping the attempt");
                return Guarded::Lost(Interruption::LeaseLapsed);
            }
        }
    }
}

/// Completes when the renewal in flight does (never when there is none), with the time it
/// was sent.
async fn finished_renewal(
    slot: &mut Option<(Instant, Renewal<'_>)>,
) -> (Instant, Result<CommitOutcome, StoreError>) {
    let Some((sent, renewal)) = slot.as_mut() else {
        return std::future::pending().await;
    };
    let result = renewal.await;
    let sent = *sent;
    *slot = None;
    (sent, result)
}

async fn sleep_until_option(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
