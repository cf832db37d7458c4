//! Running claimed sagas from the outside: one run, runs to the end through durable timers,
//! and batches of due sagas.

use std::collections::HashMap;

use super::{Engine, EngineError, Interruption, RunOutcome, SagaOutcome};
use crate::store::ClaimOutcome;
use crate::{SagaId, Timestamp};

impl Engine {
    /// Sleeps through a durable timer of saga `id`, waking early when it is cancelled (from
    /// this engine, or from another process when the store reports changes).
    pub(super) async fn sleep_until(&self, id: SagaId, until: Timestamp) {
        let delay = until.since(self.shared.clock.now());
        self.shared.sleep_unless_cancelled(id, delay, true).await;
    }

    /// Claims the saga and runs it once: to its end, or until it sets a durable timer.
    ///
    /// # Errors
    /// [`EngineError::Busy`] when another owner holds its lease, [`EngineError::NotFound`],
    /// [`EngineError::Quarantined`], [`EngineError::Interrupted`] (fenced, store failure),
    /// or a store error.
    ///
    /// When this engine is already running the saga (a duplicate `execute`, say), waits for
    /// that run to end first instead of taking the lease from it.
    pub async fn run_once(&self, id: SagaId) -> Result<RunOutcome, EngineError> {
        let mut local = self.shared.local_run(id).await;
        match self.shared.store.claim(id, &self.claim_request()).await? {
            ClaimOutcome::Claimed(lease) => {
                let result = self.drive(lease).await;
                local.record(&result);
                result
            }
            ClaimOutcome::Busy(holder) => Err(EngineError::Busy {
                saga: id,
                owner: holder.owner,
                until: holder.expires_at,
            }),
            ClaimOutcome::NotRunnable {
                quarantined: Some(reason),
                ..
            } => Err(EngineError::Quarantined { saga: id, reason }),
            ClaimOutcome::NotRunnable { .. } => Ok(RunOutcome::Finished(self.outcome(id).await?)),
        }
    }

    /// Runs (or resumes) the saga in this process until it is terminal, sleeping through its
    /// durable timers.
    ///
    /// # Errors
    /// As [`Engine::run_once`].
    pub async fn run_to_end(&self, id: SagaId) -> Result<SagaOutcome, EngineError> {
        loop {
            match self.run_once(id).await? {
                RunOutcome::Finished(outcome) => return Ok(outcome),
                RunOutcome::Suspended(until) => self.sleep_until(id, until).await,
            }
        }
    }

    /// Claims up to `limit` due sagas (new, woken by their timer, or whose lease expired) and
    /// runs each once, concurrently. Returns each saga's result.
    ///
    /// # Errors
    /// A store error from the claim itself; per-saga errors are in the returned list.
    pub async fn run_due(
        &self,
        limit: usize,
    ) -> Result<Vec<(SagaId, Result<RunOutcome, EngineError>)>, EngineError> {
        let leases = self
            .shared
            .store
            .claim_due(&self.claim_request(), limit)
            .await?;
        let mut tasks = tokio::task::JoinSet::new();
        let mut sagas = HashMap::new();
        for lease in leases {
            let engine = self.clone();
            let id = lease.saga_id;
            let handle = tasks.spawn(async move {
                // Marked as running here so that a `run_once` of it in this process waits.
                let mut local = engine.shared.local_run(id).await;
                let result = engine.drive(lease).await;
                local.record(&result);
                result
            });
            sagas.insert(handle.id(), id);
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next_with_id().await {
            match joined {
                Ok((task, result)) => {
                    if let Some(id) = sagas.remove(&task) {
                        results.push((id, result));
                    }
                }
                Err(err) => {
                    let saga = sagas.remove(&err.id());
                    tracing::error!(error = %err, saga_id = ?saga, "saga task panicked; the saga resumes when its lease lapses");
                    if let Some(id) = saga {
                        results.push((
                            id,
                            Err(EngineError::Interrupted {
                                saga: id,
                                cause: Interruption::Panicked {
                                    what: format!("its task ({err})"),
                                },
                            }),
                        ));
                    }
                }
            }
        }
        Ok(results)
    }
}
