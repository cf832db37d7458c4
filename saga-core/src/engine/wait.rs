//! Waiting for a saga's end: answered by a run in this process when there is one, otherwise
//! by reading the saga once and once more per notification that it changed.

use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use super::client_retry::{Backoff, log_retry};
use super::operations::next_change_of;
use super::{Engine, EngineError, SagaOutcome};
use crate::SagaId;
use crate::store::SagaStore;

/// How often `wait` looks at a saga when the store sends no wake-up signals (and, as a
/// safety net, when it does).
const WAIT_POLL: Duration = Duration::from_millis(100);

/// How often `wait` re-reads a saga anyway when the store names the sagas that change.
const WAIT_SAFETY: Duration = Duration::from_secs(1);

impl Engine {
    /// Waits until the saga is terminal and returns its outcome, for at most `timeout`.
    /// Uses the store's wake-up signal when it has one, so a waiter learns of the end within
    /// milliseconds without polling hard.
    ///
    /// # Errors
    /// [`EngineError::WaitTimedOut`] with the status it still has,
    /// [`EngineError::Quarantined`] for a saga set aside (bad data: it will not run until an
    /// operator acts), [`EngineError::NotFound`], or a store error: a transient one only when
    /// the store was still unavailable at the deadline.
    ///
    /// A saga that this engine runs itself (a coordinator on this engine took it) costs no
    /// read at all: the outcome comes from the run. Otherwise the saga is read once, and once
    /// more after each notification that it changed.
    ///
    /// A read that fails with a transient store error (a restart, a `CLIENT PAUSE`, a lost
    /// connection) is retried until `timeout`, with the pauses of
    /// [`EngineConfig::client_retry`](crate::EngineConfig::client_retry) (its attempt count
    /// applies, its `max_elapsed` does not: the timeout is the bound), and the change
    /// subscriptions are taken again before the next read, since the blip may have lost them.
    pub async fn wait(&self, id: SagaId, timeout: Duration) -> Result<SagaOutcome, EngineError> {
        let now = Instant::now();
        // A timeout too long to represent waits as good as forever.
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
        if let Some(outcome) = self.shared.local.recent_outcome(id) {
            return Ok(outcome);
        }
        if let Some(ended) = self.wait_for_local_run(id, deadline).await {
            return ended;
        }
        self.wait_in_store(id, deadline).await
    }

    /// Waits for the end of a run of `id` going on in this process, if there is one: `None`
    /// when there is none, or it ended without finishing (a durable timer, an interruption)
    /// and the store knows the rest.
    async fn wait_for_local_run(
        &self,
        id: SagaId,
        deadline: Instant,
    ) -> Option<Result<SagaOutcome, EngineError>> {
        // Registered before the check, so that a run ending in between is seen.
        let mut end = self.shared.local.watch_end(id);
        if !self.shared.local.is_running(id) {
            return None;
        }
        match tokio::time::timeout_at(deadline, end.ended()).await {
            Ok(Some(outcome)) => Some(Ok(outcome)),
            Ok(None) => None,
            Err(_) => Some(self.look(id).await.and_then(|outcome| {
                if outcome.status.is_terminal() {
                    Ok(outcome)
                } else {
                    Err(EngineError::WaitTimedOut {
                        saga: id,
                        status: outcome.status,
                    })
                }
            })),
        }
    }

    /// Reads the saga until it is terminal or `deadline` passes, sleeping on the store's
    /// change feeds in between and riding out transient read failures.
    async fn wait_in_store(
        &self,
        id: SagaId,
        deadline: Instant,
    ) -> Result<SagaOutcome, EngineError> {
        let store = &*self.shared.store;
        // Subscribed before the first look, so that an end right after it is not missed.
        let mut feeds = ChangeFeeds::subscribe(store);
        let mut backoff = Backoff::until(&self.shared.config.client_retry, Some(deadline));
        loop {
            feeds.mark_seen();
            let outcome = match self.look(id).await {
                Ok(outcome) => {
                    backoff.reset();
                    outcome
                }
                Err(err) if err.is_transient() => {
                    let Some(delay) = backoff.next_delay() else {
                        return Err(err);
                    };
                    log_retry(
                        &format!("wait for saga {id}"),
                        &err,
                        backoff.retries(),
                        delay,
                    );
                    tokio::time::sleep(delay).await;
                    // A feed that the blip closed or left behind is replaced before the next
                    // look, so that an end after that look is not missed.
                    feeds = ChangeFeeds::subscribe(store);
                    continue;
                }
                Err(err) => return Err(err),
            };
            if outcome.status.is_terminal() {
                return Ok(outcome);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(EngineError::WaitTimedOut {
                    saga: id,
                    status: outcome.status,
                });
            }
            feeds.nap(store, id, deadline - now).await;
        }
    }

    /// One read for `wait`: the outcome so far, or [`EngineError::Quarantined`] for a saga
    /// set aside (it will not run again until an operator acts, so a waiter stops).
    async fn look(&self, id: SagaId) -> Result<SagaOutcome, EngineError> {
        let (state, quarantined) = self.stored_with_quarantine(id).await?;
        if let Some(reason) = quarantined {
            return Err(EngineError::Quarantined { saga: id, reason });
        }
        Ok(SagaOutcome::from_state(&state))
    }
}

/// What a wait sleeps on between reads: the store's feed of changed saga ids when it has one,
/// otherwise its wake-up signal, otherwise nothing (a poll).
struct ChangeFeeds {
    changes: Option<broadcast::Receiver<SagaId>>,
    wakeups: Option<watch::Receiver<u64>>,
}

impl ChangeFeeds {
    fn subscribe(store: &dyn SagaStore) -> Self {
        let changes = store.saga_changes();
        let wakeups = if changes.is_some() {
            None
        } else {
            store.wakeups()
        };
        Self { changes, wakeups }
    }

    /// Marks the wake-up signal seen before a read, so that a change after the read wakes
    /// the next nap.
    fn mark_seen(&mut self) {
        if let Some(signal) = &mut self.wakeups {
            signal.borrow_and_update();
        }
    }

    /// Sleeps until saga `id` may have changed, for at most `left`.
    async fn nap(&mut self, store: &dyn SagaStore, id: SagaId, left: Duration) {
        if let Some(feed) = &mut self.changes {
            // Only this saga's changes wake us; a re-read every WAIT_SAFETY covers ids the
            // feed may have missed (a lag, a reconnect).
            let nap = left.min(WAIT_SAFETY);
            // `Ok(false)`: the feed closed; fall back to the wake-up signal.
            if let Ok(false) = tokio::time::timeout(nap, next_change_of(feed, id)).await {
                self.changes = None;
            }
            if self.changes.is_none() {
                self.wakeups = store.wakeups();
            }
            return;
        }
        let nap = left.min(WAIT_POLL);
        match &mut self.wakeups {
            Some(signal) => {
                // A timeout or a closed signal just means: look again.
                let _ = tokio::time::timeout(nap, signal.changed()).await;
            }
            None => tokio::time::sleep(nap).await,
        }
    }
}
