//! Engine calls beyond running sagas: starting by type name, waiting for an outcome,
//! operator actions (retry, abandon), and shutdown.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;

use super::{Engine, EngineError, RunOutcome, Shared, StartOptions, Started};
use crate::store::{CancelOutcome, Lease, Schedule, StoreError, Transition};
use crate::{EventKind, FailureKind, SagaEvent, SagaId, SagaState, SagaStatus};

/// How many cancel requests made through one engine may be waiting to be seen by its sleeping
/// runs; a run that falls further behind reads its saga to check for itself.
pub(crate) const CANCEL_FEED: usize = 64;

/// The least time between two reads of a sleeping saga prompted by the store's wake-up signal
/// (which changes for every saga, so a busy store would otherwise cost a read per change).
const CANCEL_CHECK_GAP: Duration = Duration::from_millis(250);

impl Shared {
    /// Sleeps for `delay` while a run of saga `id` waits (a retry backoff, a durable timer),
    /// and returns `true` early when the saga is cancelled meanwhile through this engine.
    ///
    /// `watch_store` also watches the store (for a wait that holds no lease, a durable timer):
    /// the saga is read once after subscribing, so that a cancel made since the run last
    /// heard from the store is not missed, and again after the store's wake-up signal
    /// changes (at most every [`CANCEL_CHECK_GAP`]), so that a cancel from another process
    /// wakes it too, and so does anything else that made the saga due before its timer (a
    /// signal). Without it only this engine's cancels wake the wait (an in-process
    /// backoff, short and holding the lease, learns of others at its next commit).
    pub(crate) async fn sleep_unless_cancelled(
        &self,
        id: SagaId,
        delay: Duration,
        watch_store: bool,
    ) -> bool {
        use tokio::sync::broadcast::error::RecvError;
        if delay.is_zero() {
            return false;
        }
        // Subscribed before anything is read, so that a cancel right after is not missed.
        let mut local = self.cancels.subscribe();
        let mut wakeups = if watch_store {
            self.store.wakeups()
        } else {
            None
        };
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        if watch_store && self.due_early(id).await {
            return true;
        }
        let mut next_read = tokio::time::Instant::now() + CANCEL_CHECK_GAP;
        let mut read_due = false;
        let mut local_open = true;
        loop {
            tokio::select! {
                () = &mut sleep => return false,
                heard = local.recv(), if local_open => match heard {
                    Ok(cancelled) if cancelled == id => return true,
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => {
                        if self.cancel_stored(id).await {
                            return true;
                        }
                    }
                    Err(RecvError::Closed) => local_open = false,
                },
                changed = next_wakeup(&mut wakeups), if wakeups.is_some() => {
                    if changed {
                        read_due = true;
                    } else {
                        wakeups = None;
                    }
                }
                () = tokio::time::sleep_until(next_read), if read_due => {
                    read_due = false;
                    if self.due_early(id).await {
                        return true;
                    }
                    next_read = tokio::time::Instant::now() + CANCEL_CHECK_GAP;
                }
            }
        }
    }

    /// `true` when a saga on a durable timer must run before the timer: a cancel is to be
    /// acted on, or something (a signal) made it due already while nobody holds it.
    async fn due_early(&self, id: SagaId) -> bool {
        let now = self.clock.now();
        match self.store.load(id).await {
            Ok(Some(stored)) => {
                cancel_pending(&stored)
                    || (!stored.status.is_terminal()
                        && stored.lease.is_none()
                        && stored.due_at.is_some_and(|due| due <= now))
            }
            Ok(None) | Err(_) => false,
        }
    }

    /// `true` when the store says a cancel of `id` was requested and is to be acted on (not
    /// past the saga's pivot, whose refused cancel stays flagged). A failed read is `false`:
    /// the run then notices the flag when it next runs, as it would have without the wake.
    async fn cancel_stored(&self, id: SagaId) -> bool {
        match self.store.load(id).await {
            Ok(Some(stored)) => cancel_pending(&stored),
            Ok(None) | Err(_) => false,
        }
    }
}

/// Whether `stored` has a cancel to be acted on: requested, not terminal, and not past the
/// pivot (a state that does not decode is left to the run, which quarantines it).
fn cancel_pending(stored: &crate::store::StoredSaga) -> bool {
    stored.cancel_requested
        && !stored.status.is_terminal()
        && serde_json::from_str::<SagaState>(&stored.state)
            .map_or(true, |state| state.past_pivot.is_none())
}

/// Completes with `true` when the store's wake-up signal changes, with `false` when it closed
/// (and never when there is none).
async fn next_wakeup(signal: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match signal {
        Some(signal) => signal.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Completes with `true` when `id` changes (or the feed lagged and anything may have), and
/// with `false` when the feed closed.
pub(super) async fn next_change_of(
    feed: &mut tokio::sync::broadcast::Receiver<SagaId>,
    id: SagaId,
) -> bool {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match feed.recv().await {
            Ok(changed) if changed == id => return true,
            Ok(_) => {}
            Err(RecvError::Lagged(_)) => return true,
            Err(RecvError::Closed) => return false,
        }
    }
}

impl Engine {
    /// The names of the registered saga types, sorted.
    #[must_use]
    pub fn saga_types(&self) -> Vec<&'static str> {
        self.shared.registry.names()
    }

    /// Every registered saga type with its version, sorted by name then version (several
    /// versions of one type may run side by side).
    #[must_use]
    pub fn saga_versions(&self) -> Vec<(&'static str, u32)> {
        self.shared.registry.all()
    }

    /// Starts a saga of a registered type by name, with a JSON input (for the HTTP API and
    /// other callers that are not typed Rust). The input is decoded as the type's input
    /// first: one that does not fit is refused and nothing is stored. (A stored input that
    /// no longer decodes when the saga runs, data written by another version, quarantines
    /// the saga with the decoding error.)
    ///
    /// The saga starts under the newest registered version of the type unless
    /// [`StartOptions::version`] picks one.
    ///
    /// # Errors
    /// [`EngineError::UnknownSagaType`] (also for a version that is not registered),
    /// [`EngineError::InvalidInput`], [`EngineError::IdempotencyConflict`], or a store error.
    pub async fn start_json(
        &self,
        saga_type: &str,
        input: Value,
        options: StartOptions,
    ) -> Result<Started, EngineError> {
        let registry = &self.shared.registry;
        let saga = match options.version {
            Some(version) => registry.get(saga_type, version),
            None => registry.newest(saga_type),
        };
        let Some(saga) = saga else {
            let known = match options.version {
                Some(_) if registry.knows(saga_type) => registry
                    .versions(saga_type)
                    .into_iter()
                    .map(|v| format!("{saga_type} v{v}"))
                    .collect(),
                _ => self.saga_types().into_iter().map(str::to_owned).collect(),
            };
            let name = match options.version {
                Some(version) => format!("{saga_type} v{version}"),
                None => saga_type.to_owned(),
            };
            return Err(EngineError::UnknownSagaType { name, known });
        };
        if let Err((path, message)) = saga.check_input(&input) {
            return Err(EngineError::InvalidInput {
                saga_type: saga_type.to_owned(),
                path,
                message,
            });
        }
        let (name, version) = (saga.name(), saga.version());
        self.start_value(name, version, input, options).await
    }

    /// Runs a saga whose lease the caller claimed (a coordinator's worker): replays its
    /// journal and executes what remains, as [`Engine::run_once`] does after claiming.
    ///
    /// # Errors
    /// As [`Engine::run_once`].
    pub async fn run_claimed(&self, lease: Lease) -> Result<RunOutcome, EngineError> {
        self.run_handoff(lease, None, None).await
    }

    /// Runs a saga handed to the local coordinator: one started here with its lease (its
    /// state known), or one the coordinator claimed.
    pub(crate) async fn run_handoff(
        &self,
        lease: Lease,
        state: Option<SagaState>,
        local: Option<super::local::LocalRun>,
    ) -> Result<RunOutcome, EngineError> {
        let mut local = match local {
            Some(local) => local,
            None => self.shared.local_run(lease.saga_id).await,
        };
        let result = match state {
            Some(state) => self.drive_state(lease, state).await,
            None => self.drive(lease).await,
        };
        local.record(&result);
        result
    }

    /// Stops taking new steps: every saga this engine runs stops at its next step boundary
    /// (the step in flight finishes), records its progress and releases its lease so that
    /// another coordinator resumes it at once. Irreversible for this engine.
    pub fn begin_shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
    }

    /// `true` once [`Engine::begin_shutdown`] was called.
    #[must_use]
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutting_down.load(Ordering::SeqCst)
    }

    /// Operator action: tries a stuck saga again. A `Failed` saga resumes where it stopped —
    /// its compensation (the compensations that gave up get a fresh attempt budget), or its
    /// forward steps (after a failure past the pivot); a quarantined saga (bad data, an
    /// unregistered version, a workflow that diverged from its journal) is released from
    /// quarantine once its cause is fixed. Any worker picks it up at once. Recorded in the
    /// history as `SagaRetried`.
    ///
    /// # Errors
    /// [`EngineError::WrongStatus`] for a saga that is neither failed nor quarantined (or was
    /// abandoned), [`EngineError::NotFound`], [`EngineError::Encoding`] for a state that does
    /// not decode, or a store error.
    pub async fn retry(&self, id: SagaId, reason: &str) -> Result<SagaStatus, EngineError> {
        let stored = self.load_stored(id).await?;
        let state = self.decode(id, &stored.state)?;
        let resume = if state.compensation_reason.is_some() {
            SagaStatus::Compensating
        } else {
            SagaStatus::Running
        };
        match (stored.status, &state.failure, &stored.quarantined) {
            (SagaStatus::Failed, Some((FailureKind::Abandoned, _)), _) => {
                return Err(EngineError::WrongStatus {
                    saga: id,
                    status: stored.status,
                    message: "it was abandoned by an operator; abandoned sagas are not retried"
                        .into(),
                });
            }
            (SagaStatus::Failed, _, _) | (_, _, Some(_)) => {}
            (status, _, None) => {
                return Err(EngineError::WrongStatus {
                    saga: id,
                    status,
                    message: "only failed or quarantined sagas can be retried".into(),
                });
            }
        }
        let event = EventKind::SagaRetried {
            reason: reason.to_owned(),
            status: resume,
        };
        self.operator_commit(
            id,
            stored.status,
            state,
            event,
            Schedule::WakeAfter(Duration::ZERO),
        )
        .await?;
        tracing::warn!(saga_id = %id, %reason, status = %resume, "saga retried by an operator");
        Ok(resume)
    }

    /// Operator action: stops a saga for good without compensating what remains (it ends
    /// `Failed` with kind `Abandoned`, recorded as `SagaAbandoned`). A coordinator running
    /// it is fenced out and writes nothing more.
    ///
    /// # Errors
    /// [`EngineError::WrongStatus`] for a saga that completed or compensated (or was
    /// abandoned already), [`EngineError::NotFound`], or a store error.
    pub async fn abandon(&self, id: SagaId, reason: &str) -> Result<(), EngineError> {
        let stored = self.load_stored(id).await?;
        let state = self.decode(id, &stored.state)?;
        let abandoned = matches!(state.failure, Some((FailureKind::Abandoned, _)));
        if matches!(
            stored.status,
            SagaStatus::Completed | SagaStatus::Compensated
        ) || abandoned
        {
            return Err(EngineError::WrongStatus {
                saga: id,
                status: stored.status,
                message: "it has already ended; there is nothing to abandon".into(),
            });
        }
        let event = EventKind::SagaAbandoned {
            reason: reason.to_owned(),
        };
        let seconds = self
            .shared
            .clock
            .now()
            .since(state.created_at)
            .as_secs_f64();
        self.operator_commit(id, stored.status, state, event, Schedule::Finished)
            .await?;
        crate::telemetry::saga_finished(SagaStatus::Failed, seconds);
        tracing::warn!(saga_id = %id, %reason, "saga abandoned by an operator");
        Ok(())
    }

    pub(super) fn decode(&self, id: SagaId, text: &str) -> Result<SagaState, EngineError> {
        serde_json::from_str(text).map_err(|source| EngineError::Encoding {
            what: format!("stored state of saga {id}"),
            source,
        })
    }

    pub(super) async fn operator_commit(
        &self,
        id: SagaId,
        expected: SagaStatus,
        mut state: SagaState,
        kind: EventKind,
        schedule: Schedule,
    ) -> Result<(), EngineError> {
        let event = SagaEvent {
            seq: 0,
            at: self.shared.clock.now(),
            kind,
        };
        state
            .apply(0, &event)
            .map_err(|err| EngineError::WrongStatus {
                saga: id,
                status: expected,
                message: err.to_string(),
            })?;
        let encode = |what: &str, source| EngineError::Encoding {
            what: what.to_owned(),
            source,
        };
        let transition = Transition {
            commit_id: uuid::Uuid::new_v4().to_string(),
            events: vec![serde_json::to_string(&event).map_err(|e| encode("event", e))?],
            state: serde_json::to_string(&state).map_err(|e| encode("saga state", e))?,
            status: state.status,
            schedule,
        };
        match self
            .shared
            .store
            .operator_transition(id, &[expected], transition)
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::NotWritable { status, .. }) => Err(EngineError::WrongStatus {
                saga: id,
                status,
                message: "it changed status while the operator command ran; look again".into(),
            }),
            Err(StoreError::NotFound(id)) => Err(EngineError::NotFound(id)),
            Err(err) => Err(err.into()),
        }
    }
}

impl Engine {
    /// Asks for the saga to be cancelled: it stops before its next step and compensates every
    /// completed step. Works from any process; needs no lease. A run of the saga waiting in
    /// this process (a forward step's retry backoff, or an [`Engine::execute`] /
    /// [`Engine::run_to_end`] sleeping through a durable timer) wakes at once and compensates.
    /// An `execute` sleeping through a durable timer in another process wakes too when the
    /// store has a wake-up signal ([`SagaStore::wakeups`](crate::SagaStore::wakeups): both
    /// bundled stores do), within about 250 ms; a backoff in another process (at most `inline_wait_max`) learns of the
    /// cancel when it ends, and a saga waiting for its timer with no process sleeping on it is
    /// made due at once by the store.
    ///
    /// A saga past its pivot (a [`Compensation::Pivot`](crate::Compensation::Pivot) step
    /// succeeded) only goes forward: the cancel is refused with [`EngineError::PastPivot`] and
    /// nothing changes. A request that races with the pivot's success is recorded and then
    /// refused by the saga itself (`CancelRefused` in its history).
    ///
    /// # Errors
    /// [`EngineError::PastPivot`], [`EngineError::NotFound`] or a store error.
    pub async fn cancel(&self, id: SagaId, reason: &str) -> Result<CancelOutcome, EngineError> {
        let stored = self.load_stored(id).await?;
        // A state that does not decode (a quarantined saga) cannot be past a pivot anyone
        // can see: the request goes ahead, as it did before pivots existed.
        if !stored.status.is_terminal()
            && let Ok(state) = self.decode(id, &stored.state)
            && let Some(pivot) = state.past_pivot
        {
            return Err(EngineError::PastPivot {
                saga: id,
                step: pivot.step,
                position: pivot.position,
            });
        }
        let event = SagaEvent {
            seq: 0,
            at: self.shared.clock.now(),
            kind: EventKind::CancelRequested {
                reason: reason.to_owned(),
            },
        };
        let encoded = serde_json::to_string(&event).map_err(|source| EngineError::Encoding {
            what: "cancel event".into(),
            source,
        })?;
        match self.shared.store.request_cancel(id, encoded).await {
            Ok(outcome) => {
                if outcome == CancelOutcome::Requested {
                    // Nobody waiting is no error: a run notices the flag at its next commit.
                    let _ = self.shared.cancels.send(id);
                }
                Ok(outcome)
            }
            Err(StoreError::NotFound(id)) => Err(EngineError::NotFound(id)),
            Err(err) => Err(err.into()),
        }
    }
}
