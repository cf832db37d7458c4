//! The workflow context: executes steps, or replays them from the journal.

mod children;
mod parallel;
mod signals;

pub use children::ChildSaga;
pub(crate) use parallel::PARALLEL;
pub use parallel::{Branch, Join, OnBranchFailure, Parallel};

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument;

use super::attempt::{AttemptPhase, Current, FailedAttempt, Tried, run_attempts, wait_for_retry};
use super::definition::{ErasedStep, TypedStep, step_error};
use super::guarded::{Guarded, run_guarded};
use super::{Interruption, SagaError, Shared};
use crate::store::{CommitOutcome, Lease, Schedule, StoreError, Transition};
use crate::{
    CompensationReason, ErrorClass, EventKind, Phase, RetryPolicy, SagaEvent, SagaState,
    SagaStatus, Step, StepContext, StepError, StepStatus, Timestamp, step_idempotency_key,
};

/// Why the workflow stopped making progress in this run.
#[derive(Debug, Clone)]
pub(crate) enum Halt {
    /// A step failed for good; `StepFailed` and `CompensationStarted` are committed.
    StepFailed(SagaError),
    /// A step failed for good after the pivot; its `StepFailed` and the saga's `SagaFailed`
    /// (kind `AfterPivot`, nothing compensated) are committed together: the saga has ended.
    FailedAfterPivot(SagaError),
    /// A cancel request was seen; compensation has not been recorded yet.
    Cancelled,
    /// A durable timer was committed; the saga is due again at this time.
    Suspended(Timestamp),
    /// This run lost the saga (fenced) or the store failed; nothing more may be written.
    Interrupted(Interruption),
    /// The workflow diverged from its journal.
    NonDeterministic { position: u32, message: String },
    /// Stored data or a value cannot be decoded or encoded, or is too large.
    BadData(String),
    /// Compensation replay reached the end of the recorded progress.
    Collected,
}

impl Halt {
    fn to_error(&self) -> SagaError {
        match self {
            Halt::StepFailed(err) | Halt::FailedAfterPivot(err) => err.clone(),
            Halt::Cancelled => SagaError::Cancelled("cancel requested".into()),
            Halt::Suspended(until) => SagaError::Suspended { until: *until },
            Halt::Interrupted(cause) => SagaError::Interrupted(cause.to_string()),
            Halt::NonDeterministic { position, message } => SagaError::NonDeterministic {
                position: *position,
                message: message.clone(),
            },
            Halt::BadData(message) => SagaError::BadData(message.clone()),
            Halt::Collected => SagaError::Interrupted("replaying for compensation".into()),
        }
    }
}

/// Whether `run` executes steps or only replays them to learn what to compensate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Forward,
    Collect,
}

/// A step seen by this run, kept for the compensation phase.
pub(crate) struct Registered {
    pub(crate) position: u32,
    pub(crate) step: Arc<dyn ErasedStep>,
}

/// The context a workflow runs in: `run` executes a step (or replays its recorded output),
/// `now` and `uuid` give journaled values.
pub struct SagaContext {
    shared: Arc<Shared>,
    lease: Lease,
    state: SagaState,
    pending: Vec<SagaEvent>,
    position: u32,
    halt: Option<Halt>,
    steps: Vec<Registered>,
    mode: Mode,
    rng: fastrand::Rng,
    saga_type: Arc<str>,
    /// A step whose first attempt's `StepStarted` was committed but never ran because a
    /// cancel arrived with that very commit: it certainly has no effect to undo.
    unexecuted: Option<u32>,
    /// Commits made under this lease; with the fence it makes each commit id unique.
    commits: u64,
    /// Run the next attempt even though a cancel is pending: it resolves an attempt that was
    /// cut off mid-way (see `run`).
    resolve_in_flight: bool,
}

impl SagaContext {
    /// The context for one run of a claimed saga: it replays the journal from its start,
    /// and a saga already compensating is only replayed to learn what to undo.
    pub(crate) fn new(
        shared: Arc<Shared>,
        saga_type: &str,
        lease: Lease,
        state: SagaState,
    ) -> Self {
        Self {
            shared,
            saga_type: Arc::from(saga_type),
            mode: if state.status == SagaStatus::Compensating {
                Mode::Collect
            } else {
                Mode::Forward
            },
            lease,
            state,
            pending: Vec::new(),
            position: 0,
            halt: None,
            steps: Vec::new(),
            rng: fastrand::Rng::new(),
            unexecuted: None,
            commits: 0,
            resolve_in_flight: false,
        }
    }
}

/// What the engine's other parts (the drive, the attempt loop, the compensation phase) read
/// and change of a run, so that nothing reaches into its fields.
impl SagaContext {
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The saga's state as this run has folded it so far.
    pub(crate) fn state(&self) -> &SagaState {
        &self.state
    }

    /// For what a run learns outside a commit (a cancel announced in process).
    pub(crate) fn state_mut(&mut self) -> &mut SagaState {
        &mut self.state
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// How many journal entries the workflow went through.
    pub(crate) fn position(&self) -> u32 {
        self.position
    }

    /// The steps this run saw, in the order it saw them.
    pub(crate) fn steps(&self) -> &[Registered] {
        &self.steps
    }

    /// The steps this run saw, handed to the compensation phase.
    pub(crate) fn take_steps(&mut self) -> Vec<Registered> {
        std::mem::take(&mut self.steps)
    }

    /// Why the workflow stopped making progress, once.
    pub(crate) fn take_halt(&mut self) -> Option<Halt> {
        self.halt.take()
    }

    /// The run's random numbers (retry jitter).
    pub(crate) fn rng(&mut self) -> &mut fastrand::Rng {
        &mut self.rng
    }

    /// The step that was cancelled before its first attempt ran, if any.
    pub(crate) fn unexecuted(&self) -> Option<u32> {
        self.unexecuted
    }
}

impl std::fmt::Debug for SagaContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaContext")
            .field("saga_id", &self.state.id)
            .field("saga_type", &self.saga_type)
            .field("position", &self.position)
            .field("fence", &self.lease.fence)
            .finish_non_exhaustive()
    }
}

/// What the journal holds at a position, as far as `run` is concerned.
enum Slot {
    Fresh,
    Replay {
        output: Value,
    },
    InFlight {
        attempts: u32,
        ambiguous: bool,
        interruptions: u32,
        next_retry_at: Option<Timestamp>,
    },
    Failed,
}

impl SagaContext {
    /// The saga's id.
    #[must_use]
    pub fn saga_id(&self) -> crate::SagaId {
        self.state.id
    }

    /// `true` while the workflow is being replayed for compensation (no step runs; recorded
    /// outputs come back until the recorded progress ends).
    #[must_use]
    pub fn is_compensating(&self) -> bool {
        self.mode == Mode::Collect
    }

    /// The pivot step this saga has passed, if any (see
    /// [`Compensation::Pivot`](crate::Compensation::Pivot)): from then on a failure ends the
    /// saga `Failed` without compensating, and cancel requests are refused.
    #[must_use]
    pub fn past_pivot(&self) -> Option<&crate::PivotPoint> {
        self.state.past_pivot.as_ref()
    }

    /// Runs `step` with `input`, or returns its recorded output if the journal already has
    /// it. Transient failures are retried under the step's policy; a permanent failure (or
    /// exhausted retries) returns [`SagaError::StepFailed`] and the saga compensates (past
    /// its pivot it ends `Failed` instead, compensating nothing).
    ///
    /// # Errors
    /// [`SagaError`]: propagate it with `?`. Once one is returned every later call returns
    /// an error too, so a workflow that catches it cannot run further steps.
    pub async fn run<S: Step>(&mut self, step: S, input: S::Input) -> Result<S::Output, SagaError> {
        if let Some(halt) = &self.halt {
            return Err(halt.to_error());
        }
        let position = self.position;
        self.position += 1;
        let input_value = match serde_json::to_value(&input) {
            Ok(value) => value,
            Err(err) => {
                return Err(self.stop(Halt::BadData(format!(
                    "input of step `{}` does not encode: {err}",
                    S::NAME
                ))));
            }
        };
        let slot = match self.slot(position, S::NAME, false, &input_value) {
            Ok(slot) => slot,
            Err(halt) => return Err(self.stop(halt)),
        };
        let step = Arc::new(step);
        let erased: Arc<dyn ErasedStep> = Arc::new(TypedStep(Arc::clone(&step)));
        match (self.mode, slot) {
            (_, Slot::Replay { output }) => match serde_json::from_value(output) {
                Ok(output) => {
                    self.steps.push(Registered { position, step: erased });
                    Ok(output)
                }
                Err(err) => Err(self.stop(Halt::NonDeterministic {
                    position,
                    message: format!(
                        "the recorded output of step `{}` does not decode as its Output type: {err}",
                        S::NAME
                    ),
                })),
            },
            (Mode::Collect, Slot::Fresh) => Err(self.stop(Halt::Collected)),
            (Mode::Collect, Slot::InFlight { .. } | Slot::Failed) => {
                self.steps.push(Registered { position, step: erased });
                Err(self.stop(Halt::Collected))
            }
            // Past the pivot a failed step ends the saga (a saga stored by a run that wrote the
            // step's failure but not the saga's); before it this cannot be.
            (Mode::Forward, Slot::Failed) if self.state.past_pivot.is_some() => {
                let message = format!("step `{}` failed for good", S::NAME);
                let cause = SagaError::Aborted(message.clone());
                let halt = self.fail_after_pivot(Vec::new(), &message, cause).await;
                Err(self.stop(halt))
            }
            (Mode::Forward, Slot::Failed) => Err(self.stop(Halt::BadData(format!(
                "journal position {position} is failed while the saga is still running"
            )))),
            (Mode::Forward, Slot::Fresh) => {
                self.execute(&step, erased, position, Some(input), input_value, 1, true).await
            }
            (Mode::Forward, Slot::InFlight { attempts, ambiguous, interruptions, next_retry_at }) => {
                let ambiguous = ambiguous || self.pivot_outcome_unknown::<S>(position);
                if self.state.cancel_pending() && !ambiguous {
                    self.steps.push(Registered { position, step: erased });
                    return Err(self.stop(Halt::Cancelled));
                }
                if ambiguous {
                    // Even under a cancel, an attempt cut off mid-way is resolved first (asked
                    // of its reconciliation check, else run again with the same key), so that
                    // the compensation knows whether there is an effect to undo.
                    self.resolve_in_flight = self.state.cancel_pending();
                    if let Some(output) =
                        self.reconcile(&*step, position, attempts, &input).await?
                    {
                        // Resolved without an attempt: the next step must see the cancel.
                        self.resolve_in_flight = false;
                        self.steps.push(Registered { position, step: erased });
                        return Ok(output);
                    }
                    // A step whose attempts keep taking their coordinator down (a crash, an
                    // OOM kill) would otherwise be re-run forever under the same number.
                    let limit = self.shared.config.max_interruptions;
                    if interruptions >= limit {
                        let failure = StepError {
                            message: format!(
                                "attempt {attempts} was interrupted {} times (its coordinator stopped mid-attempt); giving up after max_interruptions = {limit}",
                                interruptions + 1
                            ),
                            class: ErrorClass::Permanent,
                            timeout: false,
                        };
                        let reason = crate::GiveUpReason::InterruptedTooOften;
                        let halt = self.give_up(position, S::NAME, erased, attempts, failure, reason).await;
                        return Err(self.stop(halt));
                    }
                    // Unknown outcome: run the same attempt again with the same key.
                    self.execute(&step, erased, position, Some(input), input_value, attempts.max(1), false)
                        .await
                } else {
                    if let Some(at) = next_retry_at {
                        wait_for_retry(self, at).await.map_err(|halt| self.stop(halt))?;
                    }
                    self.execute(&step, erased, position, Some(input), input_value, attempts + 1, false)
                        .await
                }
            }
        }
    }

    /// The current time, journaled: a replay returns the time recorded on the first run.
    ///
    /// # Errors
    /// As [`SagaContext::run`].
    pub fn now(&mut self) -> Result<Timestamp, SagaError> {
        self.journaled_time("now", |now| now)
    }

    /// Sleeps durably for `duration`, counted from the first time the workflow gets here (the
    /// wake-up time is journaled, so a replay never sleeps again, and a restart does not
    /// restart the clock). A short sleep (at most
    /// [`EngineConfig::inline_wait_max`](crate::EngineConfig::inline_wait_max)) waits in
    /// process; a longer one commits a durable timer and ends this run: the saga holds no
    /// lease and no worker while it sleeps, and any coordinator resumes it when it is due,
    /// even after every coordinator restarted. A cancel request ends the sleep and the saga
    /// compensates (past its pivot, the sleep runs its course).
    ///
    /// # Errors
    /// As [`SagaContext::run`]: propagate it with `?` (a durable sleep returns
    /// [`SagaError::Suspended`] to end the run; the saga continues when it wakes).
    pub async fn sleep(&mut self, duration: Duration) -> Result<(), SagaError> {
        let until = self.journaled_time(super::SLEEP_UNTIL, |now| now.plus(duration))?;
        self.sleep_to(until).await
    }

    /// Sleeps durably until `at` (see [`SagaContext::sleep`]); a time already past returns at
    /// once. `at` is journaled, so compute it from [`SagaContext::now`] to stay deterministic.
    ///
    /// # Errors
    /// As [`SagaContext::sleep`].
    pub async fn sleep_until(&mut self, at: Timestamp) -> Result<(), SagaError> {
        let until = self.journaled_time(super::SLEEP_UNTIL, |_| at)?;
        self.sleep_to(until).await
    }

    /// A time, journaled under `name`: `make` gets the clock's time on the first run.
    fn journaled_time(
        &mut self,
        name: &str,
        make: impl FnOnce(Timestamp) -> Timestamp,
    ) -> Result<Timestamp, SagaError> {
        let value = self.journaled_value(name, |shared| {
            // A timestamp is a plain integer: encoding it cannot fail.
            serde_json::to_value(make(shared.clock.now())).unwrap_or(Value::Null)
        })?;
        serde_json::from_value(value).map_err(|err| {
            self.stop(Halt::NonDeterministic {
                position: self.position - 1,
                message: format!("the recorded `{name}` value does not decode: {err}"),
            })
        })
    }

    /// Waits until `until`: in process when it is close, else as a durable timer that ends
    /// this run (`Halt::Suspended`). A pending cancel ends it (`Halt::Cancelled`).
    async fn sleep_to(&mut self, until: Timestamp) -> Result<(), SagaError> {
        if self.mode == Mode::Collect {
            // Replaying for compensation: nothing waits.
            return Ok(());
        }
        loop {
            if self.state.cancel_pending() {
                return Err(self.stop(Halt::Cancelled));
            }
            let remaining = until.since(self.shared.clock.now());
            if remaining.is_zero() {
                // Counted once: when nothing after the sleep is recorded yet (a replay of a
                // sleep that ended long ago is not a timer firing).
                if self.state.record(self.position).is_none() {
                    crate::telemetry::timer_fired("sleep");
                }
                return Ok(());
            }
            if remaining > self.shared.config.inline_wait_max {
                if let Err(halt) = self
                    .commit(Vec::new(), Schedule::WakeAfter(remaining))
                    .await
                {
                    return Err(self.stop(halt));
                }
                return Err(self.stop(Halt::Suspended(until)));
            }
            let cancellable = self.state.past_pivot.is_none();
            let id = self.state.id;
            if self
                .shared
                .sleep_unless_cancelled(id, remaining, false)
                .await
                && cancellable
            {
                self.state.cancel_requested = true;
            }
        }
    }

    /// A random UUID, journaled: a replay returns the one recorded on the first run.
    ///
    /// # Errors
    /// As [`SagaContext::run`].
    pub fn uuid(&mut self) -> Result<uuid::Uuid, SagaError> {
        let value =
            self.journaled_value("uuid", |_| Value::String(uuid::Uuid::new_v4().to_string()))?;
        serde_json::from_value(value).map_err(|err| {
            self.stop(Halt::NonDeterministic {
                position: self.position - 1,
                message: format!("the recorded `uuid` value does not decode: {err}"),
            })
        })
    }

    fn journaled_value(
        &mut self,
        name: &str,
        make: impl FnOnce(&Shared) -> Value,
    ) -> Result<Value, SagaError> {
        if let Some(halt) = &self.halt {
            return Err(halt.to_error());
        }
        let position = self.position;
        self.position += 1;
        match self.slot(position, name, true, &Value::Null) {
            Ok(Slot::Replay { output }) => Ok(output),
            Ok(Slot::Fresh) if self.mode == Mode::Collect => Err(self.stop(Halt::Collected)),
            Ok(Slot::Fresh) => {
                let value = make(&self.shared);
                // Recorded with the next commit: nothing durable can depend on the value
                // before then, because every effect starts with a commit.
                self.record(EventKind::ValueRecorded {
                    position,
                    name: name.to_owned(),
                    value: value.clone(),
                })
                .map_err(|halt| self.stop(halt))?;
                Ok(value)
            }
            Ok(Slot::InFlight { .. } | Slot::Failed) => Err(self.stop(Halt::NonDeterministic {
                position,
                message: format!("the journal holds a step where the workflow asked for `{name}`"),
            })),
            Err(halt) => Err(self.stop(halt)),
        }
    }

    pub(crate) fn stop(&mut self, halt: Halt) -> SagaError {
        let err = halt.to_error();
        if self.halt.is_none() {
            self.halt = Some(halt);
        }
        err
    }

    fn slot(&self, position: u32, name: &str, is_value: bool, input: &Value) -> Result<Slot, Halt> {
        let Some(record) = self.state.record(position) else {
            return Ok(Slot::Fresh);
        };
        if record.name != name || record.is_value != is_value {
            return Err(Halt::NonDeterministic {
                position,
                message: format!(
                    "the journal records `{}` here but the workflow now calls `{name}`",
                    record.name
                ),
            });
        }
        if !is_value
            && let Some(recorded) = &record.input
            && recorded != input
        {
            return Err(Halt::NonDeterministic {
                position,
                message: format!(
                    "step `{name}` is called with an input that differs from the recorded one"
                ),
            });
        }
        Ok(match record.status {
            StepStatus::Succeeded => Slot::Replay {
                output: record.output.clone().unwrap_or(Value::Null),
            },
            StepStatus::Failed => Slot::Failed,
            StepStatus::Started => Slot::InFlight {
                attempts: record.attempts,
                ambiguous: true,
                interruptions: record.interruptions,
                next_retry_at: None,
            },
            StepStatus::Retrying => Slot::InFlight {
                attempts: record.attempts,
                ambiguous: false,
                interruptions: record.interruptions,
                next_retry_at: record.next_retry_at,
            },
        })
    }

    pub(crate) fn record(&mut self, kind: EventKind) -> Result<(), Halt> {
        let event = SagaEvent {
            seq: 0,
            at: self.shared.clock.now(),
            kind,
        };
        self.state
            .apply(0, &event)
            .map_err(|err| Halt::BadData(err.to_string()))?;
        self.pending.push(event);
        Ok(())
    }

    /// Records `kinds` and writes every pending event and the new state in one atomic commit.
    pub(crate) async fn commit(
        &mut self,
        kinds: Vec<EventKind>,
        schedule: Schedule,
    ) -> Result<CommitOutcome, Halt> {
        for kind in kinds {
            self.record(kind)?;
        }
        let encode = |what: &str, err: serde_json::Error| {
            Halt::BadData(format!("cannot encode the saga {what}: {err}"))
        };
        // A saga that completed or compensated never runs again: keep it compact (its
        // history holds the journal), which roughly halves what a finished saga costs the
        // store until retention removes it.
        // A child is kept whole: its parent may reopen it to compensate.
        let finished = matches!(schedule, Schedule::Finished)
            && self.state.parent.is_none()
            && matches!(
                self.state.status,
                SagaStatus::Completed | SagaStatus::Compensated
            );
        let state = if finished {
            serde_json::to_string(&self.state.compact())
        } else {
            serde_json::to_string(&self.state)
        }
        .map_err(|err| encode("state", err))?;
        let events = self
            .pending
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| encode("events", err))?;
        let transition = Transition {
            // Unique per saga: the fence is unique per claim, the counter per commit under it.
            commit_id: format!("{}.{}", self.lease.fence, self.commits),
            events,
            state,
            status: self.state.status,
            schedule,
        };
        self.commits += 1;
        match self.shared.commit(&self.lease, transition).await {
            Ok(outcome) => {
                self.pending.clear();
                if matches!(schedule, Schedule::Finished)
                    && let Some(parent) = &self.state.parent
                {
                    let engine = super::Engine {
                        shared: Arc::clone(&self.shared),
                    };
                    engine
                        .notify_parent(self.state.id, parent, self.state.status)
                        .await;
                }
                if outcome.cancel_requested {
                    self.state.cancel_requested = true;
                    self.refuse_cancel_past_pivot()?;
                }
                Ok(outcome)
            }
            Err(err @ StoreError::TooLarge { .. }) => Err(Halt::BadData(err.to_string())),
            Err(err) => Err(Halt::Interrupted(Interruption::from_store(err))),
        }
    }

    /// Whether step `S` at `position` is a pivot whose last attempt timed out while a cancel
    /// is pending: it may have happened, and past it the cancel would not apply, so it is
    /// resolved (its check, else the attempt again with the same key) before the cancel is
    /// acted on, instead of undoing the steps before a pivot that went through.
    fn pivot_outcome_unknown<S: Step>(&self, position: u32) -> bool {
        S::COMPENSATION == crate::Compensation::Pivot
            && self.state.cancel_pending()
            && self.state.record(position).is_some_and(|r| {
                r.status == StepStatus::Retrying && r.error.as_ref().is_some_and(|e| e.timeout)
            })
    }

    /// Whether a success of step `S` now is the saga's pivot: the first pivot step to succeed.
    fn passes_pivot<S: Step>(&self) -> bool {
        S::COMPENSATION == crate::Compensation::Pivot && self.state.past_pivot.is_none()
    }

    /// Records (once, with the next commit) that a cancel request reached the saga after its
    /// pivot, so the history says why the saga went on.
    pub(crate) fn refuse_cancel_past_pivot(&mut self) -> Result<(), Halt> {
        let Some(pivot) = &self.state.past_pivot else {
            return Ok(());
        };
        if !self.state.cancel_requested || self.state.cancel_refused {
            return Ok(());
        }
        let (step, position) = (pivot.step.clone(), pivot.position);
        tracing::warn!(pivot = %step, position, "cancel request refused: the saga is past its pivot and only goes forward");
        self.record(EventKind::CancelRefused { step, position })
    }

    /// Records the progress made so far and releases the lease with the saga due at once, so
    /// that another coordinator resumes it without waiting for the lease to lapse.
    pub(crate) async fn release_for_shutdown(&mut self) -> Halt {
        match self
            .commit(Vec::new(), Schedule::WakeAfter(Duration::ZERO))
            .await
        {
            Ok(_) => Halt::Interrupted(Interruption::ShuttingDown),
            Err(halt) => halt,
        }
    }

    pub(crate) fn step_context(
        &self,
        step: &'static str,
        position: u32,
        attempt: u32,
        phase: Phase,
        span: tracing::Span,
    ) -> StepContext {
        let key = step_idempotency_key(self.state.id, position, step, phase);
        self.step_context_with_key(step, position, attempt, phase, span, key)
    }

    pub(crate) fn step_context_with_key(
        &self,
        step: &'static str,
        position: u32,
        attempt: u32,
        phase: Phase,
        span: tracing::Span,
        idempotency_key: String,
    ) -> StepContext {
        StepContext {
            saga_id: self.state.id,
            saga_type: Arc::clone(&self.saga_type),
            step,
            position,
            attempt,
            phase,
            idempotency_key,
            resources: Arc::clone(&self.shared.resources),
            store: Arc::clone(&self.shared.store),
            span,
            key_lifetime: None,
        }
    }

    /// How long this engine may run a phase under one key (see
    /// [`StepContext::key_lifetime`]), for the contexts of attempts, which can apply effects.
    pub(crate) fn key_lifetime(
        &self,
        policy: &crate::RetryPolicy,
        timeout: Option<std::time::Duration>,
    ) -> Option<std::time::Duration> {
        self.shared.config.key_lifetime(policy, timeout)
    }

    async fn reconcile<S: Step>(
        &mut self,
        step: &S,
        position: u32,
        attempt: u32,
        input: &S::Input,
    ) -> Result<Option<S::Output>, SagaError> {
        let span = tracing::info_span!("reconcile", step = S::NAME, position, attempt);
        let ctx = self.step_context(S::NAME, position, attempt, Phase::Forward, span.clone());
        let ttl = self.shared.config.lease_ttl;
        let checked = run_guarded(
            &*self.shared.store,
            &self.lease,
            ttl,
            step.timeout(),
            step.reconcile(&ctx, input).instrument(span),
        )
        .await;
        let checked = match checked {
            Guarded::Done(result) => result.map_err(|err| step_error(&err)),
            Guarded::TimedOut(limit) => Err(StepError::timed_out(limit)),
            Guarded::Lost(cause) => return Err(self.stop(Halt::Interrupted(cause))),
        };
        match checked {
            Ok(crate::Reconciled::Applied(output)) => {
                let value = serde_json::to_value(&output).map_err(|err| {
                    self.stop(Halt::BadData(format!(
                        "reconciled output of `{}` does not encode: {err}",
                        S::NAME
                    )))
                })?;
                let pivot = self.passes_pivot::<S>();
                self.record(EventKind::StepSucceeded {
                    position,
                    step: S::NAME.to_owned(),
                    attempt,
                    output: value,
                    reconciled: true,
                    pivot,
                })
                .map_err(|halt| self.stop(halt))?;
                tracing::info!(
                    step = S::NAME,
                    position,
                    "reconciliation found the effect applied; not re-running"
                );
                Ok(Some(output))
            }
            Ok(crate::Reconciled::NotApplied | crate::Reconciled::Unknown) => Ok(None),
            Err(err) => {
                tracing::warn!(step = S::NAME, position, error = %err.message, "reconciliation check failed; re-running the attempt");
                Ok(None)
            }
        }
    }

    /// Runs the step's attempts from `first_attempt` (`fresh`: nothing is recorded for it yet)
    /// through the shared attempt loop.
    #[allow(clippy::too_many_arguments)]
    async fn execute<S: Step>(
        &mut self,
        step: &Arc<S>,
        erased: Arc<dyn ErasedStep>,
        position: u32,
        input: Option<S::Input>,
        input_value: Value,
        first_attempt: u32,
        fresh: bool,
    ) -> Result<S::Output, SagaError> {
        let mut phase = ForwardStep {
            step: Arc::clone(step),
            erased,
            position,
            input,
            record_input: fresh.then(|| input_value.clone()),
            input_value,
            fresh,
        };
        run_attempts(self, &mut phase, first_attempt)
            .await
            .map_err(|halt| self.stop(halt))
    }

    /// Records that a step failed for good and that compensation starts, in one commit.
    async fn give_up(
        &mut self,
        position: u32,
        step: &'static str,
        erased: Arc<dyn ErasedStep>,
        attempt: u32,
        failure: StepError,
        reason: crate::GiveUpReason,
    ) -> Halt {
        let error = SagaError::StepFailed {
            step: step.to_owned(),
            position,
            reason,
            error: failure.message.clone(),
        };
        let cause = CompensationReason::StepFailed {
            position,
            step: step.to_owned(),
            reason,
            error: failure.message.clone(),
        };
        self.steps.push(Registered {
            position,
            step: erased,
        });
        let ttl = self.shared.config.lease_ttl;
        let failed = EventKind::StepFailed {
            position,
            step: step.to_owned(),
            attempt,
            error: failure,
            reason,
        };
        // Past the pivot the saga only goes forward: nothing is compensated, the saga ends
        // `Failed` for an operator to fix and retry, in the same commit as the failure.
        if self.state.past_pivot.is_some() {
            let message = error.to_string();
            return self.fail_after_pivot(vec![failed], &message, error).await;
        }
        let started = EventKind::CompensationStarted { reason: cause };
        match self
            .commit(vec![failed, started], Schedule::Continue { ttl })
            .await
        {
            Ok(_) => Halt::StepFailed(error),
            Err(halt) => halt,
        }
    }

    /// Ends the saga `Failed` (kind `AfterPivot`) with `events` before it, in one commit; the
    /// workflow gets `cause` back from any later call.
    async fn fail_after_pivot(
        &mut self,
        mut events: Vec<EventKind>,
        message: &str,
        cause: SagaError,
    ) -> Halt {
        let error = after_pivot_error(&self.state, message);
        tracing::error!(%error, "saga failed after its pivot");
        events.push(EventKind::SagaFailed {
            kind: crate::FailureKind::AfterPivot,
            error: error.clone(),
        });
        match self.commit(events, Schedule::Finished).await {
            Ok(_) => Halt::FailedAfterPivot(cause),
            Err(halt) => halt,
        }
    }
}

/// A forward step's attempts, as the shared attempt loop runs them.
struct ForwardStep<S: Step> {
    step: Arc<S>,
    erased: Arc<dyn ErasedStep>,
    position: u32,
    /// The caller's input, moved into the first attempt; later ones decode `input_value`.
    input: Option<S::Input>,
    input_value: Value,
    /// The input to record with the next `StepStarted` (only a fresh step's first one).
    record_input: Option<Value>,
    /// Nothing was recorded for the step before this run.
    fresh: bool,
}

impl<S: Step> ForwardStep<S> {
    /// Keeps the step for the compensation phase: its effect may need undoing.
    fn register(&self, ctx: &mut SagaContext) {
        ctx.steps.push(Registered {
            position: self.position,
            step: Arc::clone(&self.erased),
        });
    }

    /// Commits the attempt's `StepStarted`; `Err(Cancelled)` when a cancel stops it first.
    async fn start(&mut self, ctx: &mut SagaContext, attempt: u32, key: &str) -> Result<(), Halt> {
        let resolving = std::mem::take(&mut ctx.resolve_in_flight);
        if ctx.state.cancel_pending() && !resolving {
            self.register(ctx);
            return Err(Halt::Cancelled);
        }
        if ctx
            .shared
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(ctx.release_for_shutdown().await);
        }
        let ttl = ctx.shared.config.lease_ttl;
        let started = ctx
            .commit(
                vec![EventKind::StepStarted {
                    position: self.position,
                    step: S::NAME.to_owned(),
                    attempt,
                    idempotency_key: key.to_owned(),
                    input: self.record_input.take(),
                }],
                Schedule::Continue { ttl },
            )
            .await?;
        if started.cancel_requested && ctx.state.cancel_pending() && !resolving {
            // Only a step that never ran is known to have no effect: an earlier attempt
            // (failed, timed out, or cut off by a crash) may have left one, which the
            // compensation phase must then judge like any unfinished step.
            if self.fresh && attempt == 1 {
                ctx.unexecuted = Some(self.position);
            }
            self.register(ctx);
            return Err(Halt::Cancelled);
        }
        Ok(())
    }

    /// Records a successful attempt's output.
    fn succeeded(
        &self,
        ctx: &mut SagaContext,
        current: &Current,
        seconds: f64,
        output: &S::Output,
    ) -> Result<(), Halt> {
        let attempt = current.number;
        let value = serde_json::to_value(output).map_err(|err| {
            Halt::BadData(format!(
                "output of step `{}` does not encode: {err}",
                S::NAME
            ))
        })?;
        // Recorded with the next commit (the next step's start, or the saga's end), which
        // always precedes the next effect: one store write per step.
        let pivot = ctx.passes_pivot::<S>();
        ctx.record(EventKind::StepSucceeded {
            position: self.position,
            step: S::NAME.to_owned(),
            attempt,
            output: value,
            reconciled: false,
            pivot,
        })?;
        let log = AttemptLog::Succeeded;
        ctx.shared.observe_attempt(
            &current.span,
            &ctx.state,
            self.position,
            S::NAME,
            &current.key,
            attempt,
            seconds,
            &log,
        );
        self.register(ctx);
        Ok(())
    }
}

impl<S: Step> AttemptPhase for ForwardStep<S> {
    type Output = S::Output;
    const PHASE: Phase = Phase::Forward;

    fn step(&self) -> &'static str {
        S::NAME
    }

    fn position(&self) -> u32 {
        self.position
    }

    fn policy(&self) -> RetryPolicy {
        self.step.retry_policy()
    }

    fn span(&self, attempt: u32, key: &str) -> tracing::Span {
        tracing::info_span!(
            "step",
            step = S::NAME,
            position = self.position,
            attempt,
            idempotency_key = %key
        )
    }

    fn budget_start(&self, ctx: &SagaContext, now: Timestamp) -> Timestamp {
        ctx.state
            .record(self.position)
            .and_then(|r| r.first_started_at)
            .unwrap_or(now)
    }

    async fn attempt(
        &mut self,
        ctx: &mut SagaContext,
        current: &Current,
    ) -> Result<Tried<S::Output>, Halt> {
        let (attempt, key, span) = (current.number, &current.key, &current.span);
        self.start(ctx, attempt, key).await?;
        let mut step_ctx = ctx.step_context_with_key(
            S::NAME,
            self.position,
            attempt,
            Phase::Forward,
            span.clone(),
            key.to_owned(),
        );
        step_ctx.key_lifetime = ctx.key_lifetime(&self.step.retry_policy(), self.step.timeout());
        let input = match self.input.take() {
            Some(value) => value,
            None => serde_json::from_value(self.input_value.clone()).map_err(|err| {
                Halt::BadData(format!(
                    "input of step `{}` does not decode for a retry: {err}",
                    S::NAME
                ))
            })?,
        };
        let clock = tokio::time::Instant::now();
        let outcome = run_guarded(
            &*ctx.shared.store,
            &ctx.lease,
            ctx.shared.config.lease_ttl,
            self.step.timeout(),
            self.step.forward(&step_ctx, input).instrument(span.clone()),
        )
        .await;
        let seconds = clock.elapsed().as_secs_f64();
        let error = match outcome {
            Guarded::Done(Ok(output)) => {
                self.succeeded(ctx, current, seconds, &output)?;
                return Ok(Tried::Settled(output));
            }
            Guarded::Done(Err(err)) => step_error(&err),
            Guarded::TimedOut(limit) => StepError::timed_out(limit),
            Guarded::Lost(cause) => return Err(Halt::Interrupted(cause)),
        };
        Ok(Tried::Failed { error, seconds })
    }

    fn attempt_failed(&self, failed: FailedAttempt) -> EventKind {
        EventKind::StepAttemptFailed {
            position: self.position,
            step: S::NAME.to_owned(),
            attempt: failed.attempt,
            error: failed.error,
            backoff_seconds: failed.backoff_seconds,
            next_retry_at: failed.next_retry_at,
        }
    }

    fn suspending(&mut self, ctx: &mut SagaContext) {
        self.register(ctx);
    }

    async fn give_up(
        &mut self,
        ctx: &mut SagaContext,
        last: FailedAttempt,
        reason: crate::GiveUpReason,
    ) -> Result<S::Output, Halt> {
        let erased = Arc::clone(&self.erased);
        let (position, attempt) = (self.position, last.attempt);
        Err(ctx
            .give_up(position, S::NAME, erased, attempt, last.error, reason)
            .await)
    }
}

/// One attempt outcome, for the structured log line and metrics.
pub(crate) enum AttemptLog<'a> {
    Succeeded,
    Retry {
        error: &'a StepError,
        delay: Duration,
        next_retry_at: Timestamp,
    },
    Failed {
        error: &'a StepError,
        reason: crate::GiveUpReason,
    },
    Compensated,
}

/// The failure message of a saga that failed past its pivot: what failed, which pivot it had
/// passed, and what an operator does about it.
pub(crate) fn after_pivot_error(state: &SagaState, message: &str) -> String {
    let pivot = match &state.past_pivot {
        Some(p) => format!("`{}` (journal position {})", p.step, p.position),
        None => "step".to_owned(),
    };
    format!(
        "{message}; this happened after the pivot {pivot} had succeeded, so nothing was \
         compensated (the saga only goes forward): fix the cause, then retry the saga to run \
         the failed step again"
    )
}
