//! What one engine knows about the sagas it runs itself: which ones run here now, how the
//! ones that just ended came out, who waits for them, and the coordinator (if any) that
//! takes sagas started in this process straight into a free worker.
//!
//! This is what lets a process that starts a saga and runs it too skip the store: the start
//! claims the lease in its create (no claim round trip), and a waiter learns the outcome from
//! the run itself (no read).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::{EngineError, RunOutcome, SagaOutcome, Shared};
use crate::store::Lease;
use crate::{SagaId, SagaState, SagaStatus};

/// How many recent outcomes an engine keeps for waiters that arrive after the end.
const RECENT_OUTCOMES: usize = 4096;

/// How long a recent outcome answers waiters: long enough for a client's start-then-wait,
/// short enough that a saga purged and started again elsewhere under the same idempotency
/// key is not answered from here for long.
const RECENT_FOR: std::time::Duration = std::time::Duration::from_secs(10);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every value guarded here is left whole by each critical section (plain inserts and
    // removals), so a panic elsewhere cannot leave it half-written.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The per-engine bookkeeping (one per [`Shared`]).
#[derive(Default)]
pub(crate) struct LocalState {
    /// Sagas this engine is running right now.
    running: Mutex<HashSet<SagaId>>,
    /// Notified whenever a local run ends.
    ended: tokio::sync::Notify,
    /// Waiters for the end of a local run, by saga.
    waiters: Mutex<HashMap<SagaId, Vec<oneshot::Sender<Option<SagaOutcome>>>>>,
    /// Outcomes of runs that ended here lately that can never change again (completed or
    /// compensated: an operator can only retry a failed saga), oldest first.
    recent: Mutex<Recent>,
    /// The coordinator that takes sagas started here, while one runs on this engine.
    dispatch: Mutex<Option<Dispatch>>,
}

#[derive(Default)]
struct Recent {
    order: VecDeque<SagaId>,
    outcomes: HashMap<SagaId, (tokio::time::Instant, SagaOutcome)>,
}

impl LocalState {
    /// Whether this engine runs `id` right now.
    pub(crate) fn is_running(&self, id: SagaId) -> bool {
        lock(&self.running).contains(&id)
    }

    /// The outcome of a run of `id` that ended here lately, if it can never change again.
    pub(crate) fn recent_outcome(&self, id: SagaId) -> Option<SagaOutcome> {
        lock(&self.recent)
            .outcomes
            .get(&id)
            .filter(|(at, _)| at.elapsed() < RECENT_FOR)
            .map(|(_, outcome)| outcome.clone())
    }

    /// Forgets what ended here for `id`: it runs again (an idempotency key reused after its
    /// saga was purged gives the same id).
    fn forget(&self, id: SagaId) {
        // The order queue keeps the id; it is skipped when it comes up for eviction.
        lock(&self.recent).outcomes.remove(&id);
    }

    /// Tells the caller when this engine's current run of `id` ends, with its outcome if it
    /// ended terminal. Register before checking [`is_running`](Self::is_running), so that an
    /// end in between is not missed.
    pub(crate) fn watch_end(self: &Arc<Self>, id: SagaId) -> EndWatch {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).entry(id).or_default().push(tx);
        EndWatch {
            local: Arc::clone(self),
            id,
            rx: Some(rx),
        }
    }

    fn remember(&self, outcome: &SagaOutcome) {
        if !matches!(
            outcome.status,
            SagaStatus::Completed | SagaStatus::Compensated
        ) {
            return;
        }
        let mut recent = lock(&self.recent);
        let entry = (tokio::time::Instant::now(), outcome.clone());
        if recent.outcomes.insert(outcome.id, entry).is_none() {
            recent.order.push_back(outcome.id);
        }
        while recent.order.len() > RECENT_OUTCOMES {
            if let Some(old) = recent.order.pop_front() {
                recent.outcomes.remove(&old);
            }
        }
    }

    fn notify_end(&self, id: SagaId, outcome: Option<&SagaOutcome>) {
        let waiting = lock(&self.waiters).remove(&id);
        for tx in waiting.into_iter().flatten() {
            // A waiter that gave up is no error.
            let _ = tx.send(outcome.cloned());
        }
    }

    /// Registers the coordinator that takes locally started sagas.
    pub(crate) fn set_dispatch(&self, dispatch: Dispatch) {
        *lock(&self.dispatch) = Some(dispatch);
    }

    /// Unregisters `slots`' coordinator (and only it).
    pub(crate) fn clear_dispatch(&self, slots: &Arc<Semaphore>) {
        let mut current = lock(&self.dispatch);
        if current
            .as_ref()
            .is_some_and(|d| Arc::ptr_eq(&d.slots, slots))
        {
            *current = None;
        }
    }

    /// A free worker of the local coordinator, if one runs here and has one free.
    pub(crate) fn free_worker(&self) -> Option<Slot> {
        let current = lock(&self.dispatch);
        let dispatch = current.as_ref()?;
        if dispatch.handoff.is_closed() {
            return None;
        }
        let permit = Arc::clone(&dispatch.slots).try_acquire_owned().ok()?;
        Some(Slot {
            permit,
            handoff: dispatch.handoff.clone(),
        })
    }
}

/// A waiter's ticket for the end of a local run; unregisters itself when dropped.
pub(crate) struct EndWatch {
    local: Arc<LocalState>,
    id: SagaId,
    rx: Option<oneshot::Receiver<Option<SagaOutcome>>>,
}

impl EndWatch {
    /// The run's outcome when it ended terminal, `None` when it ended otherwise (a durable
    /// timer, an interruption).
    pub(crate) async fn ended(&mut self) -> Option<SagaOutcome> {
        let rx = self.rx.as_mut()?;
        let outcome = rx.await.ok().flatten();
        self.rx = None;
        outcome
    }
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        if self.rx.take().is_none() {
            return;
        }
        // Drop this waiter's sender (and any other closed one) so that a saga that never
        // ends here leaves nothing behind.
        let mut waiters = lock(&self.local.waiters);
        if let Some(list) = waiters.get_mut(&self.id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(&self.id);
            }
        }
    }
}

/// A saga started here with its lease, handed to the local coordinator's worker pool.
pub(crate) struct Handoff {
    pub(crate) lease: Lease,
    /// The state as just created (`None`: read it from the store).
    pub(crate) state: Option<SagaState>,
    /// Marks the saga as running here from the moment it was created.
    pub(crate) local: Option<LocalRun>,
    /// The worker it occupies; freed when the run ends.
    pub(crate) permit: OwnedSemaphorePermit,
}

/// The local coordinator's intake.
pub(crate) struct Dispatch {
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) handoff: mpsc::UnboundedSender<Handoff>,
}

/// A free worker taken for a saga about to be started here.
pub(crate) struct Slot {
    permit: OwnedSemaphorePermit,
    handoff: mpsc::UnboundedSender<Handoff>,
}

impl Slot {
    /// Hands the created saga to the worker; gives it back when the coordinator stopped.
    pub(crate) fn hand_over(
        self,
        lease: Lease,
        state: Option<SagaState>,
        local: LocalRun,
    ) -> Result<(), Lease> {
        let handoff = Handoff {
            lease,
            state,
            local: Some(local),
            permit: self.permit,
        };
        self.handoff.send(handoff).map_err(|err| err.0.lease)
    }
}

/// This engine's run of one saga; the saga leaves the running set when it is dropped (also
/// when the run's task is cancelled), and its waiters learn how it ended.
pub(crate) struct LocalRun {
    shared: Arc<Shared>,
    id: SagaId,
    outcome: Option<SagaOutcome>,
}

impl LocalRun {
    /// Records how the run ended: a terminal outcome is told to waiters on drop.
    pub(crate) fn record(&mut self, result: &Result<RunOutcome, EngineError>) {
        if let Ok(RunOutcome::Finished(outcome)) = result
            && outcome.status.is_terminal()
        {
            self.outcome = Some(outcome.clone());
        }
    }
}

impl Drop for LocalRun {
    fn drop(&mut self) {
        let local = &self.shared.local;
        if let Some(outcome) = &self.outcome {
            local.remember(outcome);
        }
        lock(&local.running).remove(&self.id);
        local.notify_end(self.id, self.outcome.as_ref());
        local.ended.notify_waiters();
    }
}

impl Shared {
    /// Waits until this engine is not running saga `id`, then marks it running until the
    /// returned guard is dropped. Same-owner reclaim exists for a restarted process; without
    /// this, a second run of a saga in the process that is running it (a duplicate `execute`
    /// with the same idempotency key, a `run_to_end` racing a worker) would take the lease
    /// from the live run and execute its in-flight step a second time, concurrently.
    pub(crate) async fn local_run(self: &Arc<Self>, id: SagaId) -> LocalRun {
        loop {
            let ended = self.local.ended.notified();
            tokio::pin!(ended);
            // Registered before the check, so an end between the check and the wait is seen.
            ended.as_mut().enable();
            if let Some(run) = self.try_local_run(id) {
                return run;
            }
            ended.await;
        }
    }

    /// Marks `id` running here unless it already is.
    pub(crate) fn try_local_run(self: &Arc<Self>, id: SagaId) -> Option<LocalRun> {
        let inserted = lock(&self.local.running).insert(id);
        if inserted {
            self.local.forget(id);
        }
        inserted.then(|| LocalRun {
            shared: Arc::clone(self),
            id,
            outcome: None,
        })
    }
}
