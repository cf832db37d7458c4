//! The folded state of a saga: status and journal, derived from its events.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    CompensationReason, EventKind, FailureKind, SagaEvent, SagaId, SagaStatus, StepError, Timestamp,
};

/// Where one journal entry stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StepStatus {
    /// An attempt began and no result is recorded (in flight, or its coordinator died).
    Started,
    /// The last attempt failed transiently; the next one is due at `next_retry_at`.
    Retrying,
    /// The output is recorded; replays return it.
    Succeeded,
    /// Failed for good.
    Failed,
}

/// Where the undo of one journal entry stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CompensationStatus {
    /// At least one attempt failed transiently; more are due.
    Retrying,
    /// Undone.
    Done,
    /// Nothing to undo.
    Skipped,
    /// Gave up (its policy ran out, or it failed permanently): the saga ended `Failed`. An
    /// operator retry starts its attempts again.
    Failed,
}

/// Progress of one entry's compensation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompensationRecord {
    /// Where it stands.
    pub status: CompensationStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// The last error, if an attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// When the next attempt may start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<Timestamp>,
    /// Why it was skipped, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_because: Option<String>,
    /// When its first attempt failed (the start of its elapsed-time budget, approximately).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// `Done` because the compensation's reconciliation check found the undo applied, not
    /// because an attempt succeeded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconciled: bool,
}

/// One journal entry: a step, or a journaled value (`now`, `uuid`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Position in the journal, from 0.
    pub position: u32,
    /// The step's name (or `now`/`uuid` for a journaled value).
    pub name: String,
    /// `true` for a journaled value rather than a step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_value: bool,
    /// Where it stands.
    pub status: StepStatus,
    /// Attempts started so far.
    pub attempts: u32,
    /// Times the current attempt was started again because its coordinator stopped while
    /// running it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interruptions: u32,
    /// The forward idempotency key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub idempotency_key: String,
    /// The step input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// The output (or journaled value), once recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_started_at: Option<Timestamp>,
    /// When the latest attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it succeeded or failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// When the next attempt may start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<Timestamp>,
    /// Undo progress, once compensation has reached this entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CompensationRecord>,
    /// Its place in the order in which the saga's steps completed (1 for the first; see
    /// [`SagaState::completions`]); `None` until it succeeds, and for sagas written before
    /// the order was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed: Option<u32>,
}

/// The folded state of one saga.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    /// The saga id.
    pub id: SagaId,
    /// Registered type name.
    pub saga_type: String,
    /// Version of the type's code that started it.
    pub version: u32,
    /// Workflow input.
    pub input: Value,
    /// The idempotency key it was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Lifecycle status.
    pub status: SagaStatus,
    /// Step records by position.
    pub journal: Vec<StepRecord>,
    /// When it was started.
    pub created_at: Timestamp,
    /// When its last event happened.
    pub updated_at: Timestamp,
    /// A cancel was requested (see [`SagaState::cancel_pending`]: past the pivot it is not
    /// acted on).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
    /// Why it is compensating (or was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_reason: Option<CompensationReason>,
    /// Workflow output, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed, once `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<(FailureKind, String)>,
    /// Last lease holder seen in the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Last fencing token seen in the history.
    #[serde(default)]
    pub fence: u64,
    /// How many times a coordinator resumed it.
    #[serde(default)]
    pub resumes: u32,
    /// The pivot it passed, once its first [`Compensation::Pivot`](crate::Compensation::Pivot)
    /// step has succeeded: from then on it only goes forward (no compensation, no cancel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub past_pivot: Option<PivotPoint>,
    /// A cancel request that arrived past the pivot was recorded as refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_refused: bool,
    /// Inbox sequence numbers of signals the workflow set aside because their payload did
    /// not decode (see `SignalRejected`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_signals: Vec<u64>,
    /// The saga that started this one as a child, and where in its journal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
    /// How many journal entries have completed so far: each completed step records its
    /// place in this count, so that compensation runs in reverse order of completion even
    /// when parallel branches completed in another order than their positions.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub completions: u32,
    /// The journal format the saga's history is written in (see [`JOURNAL_FORMAT`]).
    #[serde(default = "legacy_journal_format")]
    pub journal_format: u32,
}

/// The journal format this engine writes: 2 added parallel branches, signals and child
/// sagas (and the completion order of steps). A saga written in format 1 (no such entries)
/// replays unchanged; a saga written in a newer format than the engine knows is set aside
/// rather than run by code that would misread it.
pub const JOURNAL_FORMAT: u32 = 2;

/// The format of a history or state that does not say (written before formats existed).
pub(crate) fn legacy_journal_format() -> u32 {
    1
}

/// Where a child saga hangs in its parent: the parent's id, type, and the journal position
/// of the step that started the child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLink {
    /// The parent saga.
    pub id: SagaId,
    /// Its type.
    pub saga_type: String,
    /// The journal position in the parent that started this child.
    pub position: u32,
}

/// The pivot step a saga passed: its point of no return.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PivotPoint {
    /// Journal position of the pivot step.
    pub position: u32,
    /// Its name.
    pub step: String,
    /// When it succeeded.
    pub at: Timestamp,
}

/// An event that does not fit the state it is applied to: the history is corrupt or was
/// written by incompatible code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("event #{seq} ({event}) cannot apply to saga {saga}: {problem}")]
pub struct FoldError {
    /// The saga.
    pub saga: SagaId,
    /// The event's position in the history.
    pub seq: u64,
    /// The event's type.
    pub event: &'static str,
    /// What does not fit.
    pub problem: String,
}

impl SagaState {
    /// The state right after `SagaStarted`.
    #[must_use]
    pub fn new(
        id: SagaId,
        saga_type: String,
        version: u32,
        input: Value,
        idempotency_key: Option<String>,
        at: Timestamp,
    ) -> Self {
        Self {
            id,
            saga_type,
            version,
            input,
            idempotency_key,
            status: SagaStatus::Running,
            journal: Vec::new(),
            created_at: at,
            updated_at: at,
            cancel_requested: false,
            compensation_reason: None,
            output: None,
            failure: None,
            owner: None,
            fence: 0,
            resumes: 0,
            past_pivot: None,
            cancel_refused: false,
            rejected_signals: Vec::new(),
            parent: None,
            completions: 0,
            journal_format: JOURNAL_FORMAT,
        }
    }

    /// Whether this is the compact form in which a saga that completed or compensated is
    /// kept: everything but the journal, which its history holds in full (steps, inputs,
    /// outputs, attempts). [`Engine::state`](crate::Engine::state) rebuilds the journal by
    /// folding the history. Such a saga can never run again (an operator retries only failed
    /// sagas), so nothing needs its journal but a reader.
    #[must_use]
    pub fn is_compact(&self) -> bool {
        matches!(self.status, SagaStatus::Completed | SagaStatus::Compensated)
            && self.journal.is_empty()
    }

    /// The compact form of a finished state (see [`SagaState::is_compact`]): a copy without
    /// the journal.
    #[must_use]
    pub fn compact(&self) -> Self {
        Self {
            journal: Vec::new(),
            ..self.clone()
        }
    }

    /// Rebuilds a state from a whole history.
    ///
    /// # Errors
    /// [`FoldError`] when the history does not start with `SagaStarted` or an event does not
    /// fit the state before it.
    pub fn fold(id: SagaId, events: &[SagaEvent]) -> Result<Self, FoldError> {
        let Some(first) = events.first() else {
            return Err(FoldError {
                saga: id,
                seq: 0,
                event: "none",
                problem: "the history is empty".into(),
            });
        };
        let EventKind::SagaStarted {
            saga_type,
            version,
            input,
            idempotency_key,
            parent,
            journal_format,
        } = &first.kind
        else {
            return Err(FoldError {
                saga: id,
                seq: 0,
                event: first.kind.name(),
                problem: "a history must begin with SagaStarted".into(),
            });
        };
        let mut state = SagaState::new(
            id,
            saga_type.clone(),
            *version,
            input.clone(),
            idempotency_key.clone(),
            first.at,
        );
        state.parent = parent.clone();
        state.journal_format = *journal_format;
        for (seq, event) in events.iter().enumerate().skip(1) {
            state.apply(seq as u64, event)?;
        }
        Ok(state)
    }

    /// Whether a cancel request is to be acted on: one was requested and the saga has not
    /// passed its pivot (past the pivot the saga only goes forward).
    #[must_use]
    pub fn cancel_pending(&self) -> bool {
        self.cancel_requested && self.past_pivot.is_none()
    }

    /// The record at `position`, if the journal reaches it.
    #[must_use]
    pub fn record(&self, position: u32) -> Option<&StepRecord> {
        self.journal.get(position as usize)
    }

    fn record_mut(
        &mut self,
        seq: u64,
        event: &'static str,
        position: u32,
    ) -> Result<&mut StepRecord, FoldError> {
        let saga = self.id;
        self.journal
            .get_mut(position as usize)
            .ok_or_else(|| FoldError {
                saga,
                seq,
                event,
                problem: format!("no journal entry at position {position}"),
            })
    }

    /// The step record at `position` for an attempt outcome: it must be the named step and
    /// have an attempt under way (started, or retrying).
    fn open_record(
        &mut self,
        seq: u64,
        event: &'static str,
        position: u32,
        step: &str,
    ) -> Result<&mut StepRecord, FoldError> {
        let saga = self.id;
        let record = self.record_mut(seq, event, position)?;
        let problem = if record.is_value || record.name != step {
            Some(format!(
                "position {position} holds `{}`, not step `{step}`",
                record.name
            ))
        } else if !matches!(record.status, StepStatus::Started | StepStatus::Retrying) {
            Some(format!(
                "step `{step}` at position {position} is {:?}, with no attempt under way",
                record.status
            ))
        } else {
            None
        };
        match problem {
            Some(problem) => Err(FoldError {
                saga,
                seq,
                event,
                problem,
            }),
            None => Ok(record),
        }
    }

    /// Applies one event on top of this state.
    ///
    /// # Errors
    /// [`FoldError`] when the event refers to a journal entry that does not exist, skips a
    /// position, or arrives after a terminal event.
    pub fn apply(&mut self, seq: u64, event: &SagaEvent) -> Result<(), FoldError> {
        let name = event.kind.name();
        let saga = self.id;
        let fail = |problem: String| FoldError {
            saga,
            seq,
            event: name,
            problem,
        };
        if self.status.is_terminal()
            && !matches!(
                event.kind,
                EventKind::CancelRequested { .. }
                    | EventKind::SagaRetried { .. }
                    | EventKind::SagaAbandoned { .. }
                    | EventKind::SagaReopened { .. }
            )
        {
            return Err(fail(format!("the saga is already {}", self.status)));
        }
        match &event.kind {
            EventKind::SagaStarted { .. } => {
                return Err(fail("SagaStarted may only begin a history".into()));
            }
            EventKind::LeaseAcquired { owner, fence } => {
                self.owner = Some(owner.clone());
                self.fence = *fence;
            }
            EventKind::SagaResumed { owner, .. } => {
                self.owner = Some(owner.clone());
                self.resumes += 1;
            }
            EventKind::StepStarted {
                position,
                step,
                attempt,
                idempotency_key,
                input,
            } => {
                let len = self.journal.len() as u32;
                if *position == len {
                    self.journal.push(StepRecord {
                        position: *position,
                        name: step.clone(),
                        is_value: false,
                        status: StepStatus::Started,
                        attempts: *attempt,
                        interruptions: 0,
                        idempotency_key: idempotency_key.clone(),
                        input: input.clone(),
                        output: None,
                        error: None,
                        first_started_at: Some(event.at),
                        started_at: Some(event.at),
                        finished_at: None,
                        next_retry_at: None,
                        compensation: None,
                        completed: None,
                    });
                } else if *position < len {
                    let record = self.record_mut(seq, name, *position)?;
                    if record.name != *step {
                        return Err(fail(format!(
                            "position {position} holds `{}`, not `{step}`",
                            record.name
                        )));
                    }
                    if matches!(record.status, StepStatus::Succeeded | StepStatus::Failed)
                        || record.is_value
                    {
                        return Err(fail(format!(
                            "position {position} is already {:?}; it cannot start again",
                            record.status
                        )));
                    }
                    if record.status == StepStatus::Started && *attempt == record.attempts {
                        record.interruptions += 1;
                    } else {
                        record.interruptions = 0;
                    }
                    record.status = StepStatus::Started;
                    record.attempts = *attempt;
                    record.started_at = Some(event.at);
                    record.next_retry_at = None;
                    if input.is_some() {
                        record.input.clone_from(input);
                    }
                } else {
                    return Err(fail(format!("position {position} skips past {len}")));
                }
            }
            EventKind::StepSucceeded {
                step,
                position,
                output,
                attempt,
                pivot,
                ..
            } => {
                // Format 1 (written before completion orders were kept) counts nothing, so
                // that the fold of such a history still equals the state its code stored.
                let counting = self.journal_format >= 2;
                let order = self.completions + 1;
                let record = self.open_record(seq, name, *position, step)?;
                if counting && record.completed.is_none() {
                    record.completed = Some(order);
                }
                let counted = counting && record.completed == Some(order);
                record.status = StepStatus::Succeeded;
                record.attempts = (*attempt).max(record.attempts);
                record.output = Some(output.clone());
                record.finished_at = Some(event.at);
                record.next_retry_at = None;
                if counted {
                    self.completions = order;
                }
                if *pivot && self.past_pivot.is_none() {
                    self.past_pivot = Some(PivotPoint {
                        position: *position,
                        step: step.clone(),
                        at: event.at,
                    });
                }
            }
            EventKind::StepAttemptFailed {
                step,
                position,
                error,
                next_retry_at,
                attempt,
                ..
            } => {
                let record = self.open_record(seq, name, *position, step)?;
                record.status = StepStatus::Retrying;
                record.attempts = (*attempt).max(record.attempts);
                record.error = Some(error.clone());
                record.next_retry_at = Some(*next_retry_at);
            }
            EventKind::StepFailed {
                step,
                position,
                error,
                attempt,
                ..
            } => {
                let record = self.open_record(seq, name, *position, step)?;
                record.status = StepStatus::Failed;
                record.attempts = (*attempt).max(record.attempts);
                record.error = Some(error.clone());
                record.finished_at = Some(event.at);
                record.next_retry_at = None;
            }
            EventKind::ValueRecorded {
                position,
                name: value_name,
                value,
            } => {
                if *position != self.journal.len() as u32 {
                    return Err(fail(format!(
                        "value at position {position}, but the journal has {} entries",
                        self.journal.len()
                    )));
                }
                self.journal.push(StepRecord {
                    position: *position,
                    name: value_name.clone(),
                    is_value: true,
                    status: StepStatus::Succeeded,
                    attempts: 1,
                    interruptions: 0,
                    idempotency_key: String::new(),
                    input: None,
                    output: Some(value.clone()),
                    error: None,
                    first_started_at: Some(event.at),
                    started_at: Some(event.at),
                    finished_at: Some(event.at),
                    next_retry_at: None,
                    compensation: None,
                    completed: None,
                });
            }
            EventKind::CancelRequested { .. } => {
                self.cancel_requested = true;
            }
            EventKind::CancelRefused { .. } => {
                self.cancel_refused = true;
            }
            // Delivered outside the lease: the inbox holds it, the journal records its use.
            EventKind::SignalReceived { .. } => {}
            EventKind::SignalRejected { sequence, .. } => {
                if !self.rejected_signals.contains(sequence) {
                    self.rejected_signals.push(*sequence);
                }
            }
            EventKind::CompensationStarted { reason } => {
                if self.status != SagaStatus::Running {
                    return Err(fail(format!(
                        "compensation cannot start while {}",
                        self.status
                    )));
                }
                self.status = SagaStatus::Compensating;
                self.compensation_reason = Some(reason.clone());
            }
            EventKind::CompensationAttemptFailed {
                position,
                error,
                attempt,
                next_retry_at,
                ..
            } => {
                let record = self.record_mut(seq, name, *position)?;
                let started_at = record
                    .compensation
                    .as_ref()
                    .and_then(|c| c.started_at)
                    .or(Some(event.at));
                record.compensation = Some(CompensationRecord {
                    status: CompensationStatus::Retrying,
                    attempts: *attempt,
                    error: Some(error.clone()),
                    next_retry_at: Some(*next_retry_at),
                    skipped_because: None,
                    started_at,
                    reconciled: false,
                });
            }
            EventKind::StepCompensated {
                position,
                attempt,
                reconciled,
                ..
            } => {
                let record = self.record_mut(seq, name, *position)?;
                let error = record.compensation.as_ref().and_then(|c| c.error.clone());
                let started_at = record.compensation.as_ref().and_then(|c| c.started_at);
                record.compensation = Some(CompensationRecord {
                    status: CompensationStatus::Done,
                    attempts: *attempt,
                    error,
                    next_retry_at: None,
                    skipped_because: None,
                    started_at,
                    reconciled: *reconciled,
                });
            }
            EventKind::CompensationSkipped { position, why, .. } => {
                let record = self.record_mut(seq, name, *position)?;
                record.compensation = Some(CompensationRecord {
                    status: CompensationStatus::Skipped,
                    attempts: 0,
                    error: None,
                    next_retry_at: None,
                    skipped_because: Some(why.clone()),
                    started_at: None,
                    reconciled: false,
                });
            }
            EventKind::SagaCompleted { output } => {
                if self.status != SagaStatus::Running {
                    return Err(fail(format!("a {} saga cannot complete", self.status)));
                }
                self.status = SagaStatus::Completed;
                self.output = Some(output.clone());
            }
            EventKind::SagaCompensated => {
                if self.status != SagaStatus::Compensating {
                    return Err(fail(format!(
                        "a {} saga cannot end compensated",
                        self.status
                    )));
                }
                self.status = SagaStatus::Compensated;
            }
            EventKind::SagaFailed { kind, error } => {
                self.status = SagaStatus::Failed;
                self.failure = Some((*kind, error.clone()));
                if *kind == FailureKind::CompensationFailed {
                    // The compensation in progress is the one that gave up.
                    for record in &mut self.journal {
                        if let Some(undo) = &mut record.compensation
                            && undo.status == CompensationStatus::Retrying
                        {
                            undo.status = CompensationStatus::Failed;
                            undo.next_retry_at = None;
                        }
                    }
                }
            }
            EventKind::SagaReopened { reason } => {
                if self.status != SagaStatus::Completed {
                    return Err(fail(format!(
                        "only a completed saga can be reopened for compensation, not a {} one",
                        self.status
                    )));
                }
                self.status = SagaStatus::Compensating;
                self.compensation_reason = Some(reason.clone());
            }
            EventKind::SagaRetried { status, .. } => {
                if !matches!(status, SagaStatus::Running | SagaStatus::Compensating) {
                    return Err(fail(format!("a saga cannot be retried into {status}")));
                }
                let after_pivot = matches!(self.failure, Some((FailureKind::AfterPivot, _)));
                self.status = *status;
                self.failure = None;
                if after_pivot {
                    // The step that gave up past the pivot runs again, with a fresh budget.
                    for record in &mut self.journal {
                        if record.status == StepStatus::Failed {
                            record.status = StepStatus::Retrying;
                            record.attempts = 0;
                            record.next_retry_at = None;
                            record.first_started_at = None;
                            record.finished_at = None;
                        }
                    }
                }
                // Compensations that gave up get a fresh budget.
                for record in &mut self.journal {
                    if let Some(undo) = &mut record.compensation
                        && matches!(
                            undo.status,
                            CompensationStatus::Retrying | CompensationStatus::Failed
                        )
                    {
                        undo.status = CompensationStatus::Retrying;
                        undo.attempts = 0;
                        undo.next_retry_at = None;
                        undo.started_at = None;
                    }
                }
            }
            EventKind::SagaAbandoned { reason } => {
                self.status = SagaStatus::Failed;
                self.failure = Some((FailureKind::Abandoned, reason.clone()));
            }
        }
        self.updated_at = self.updated_at.max(event.at);
        Ok(())
    }
}

// serde's `skip_serializing_if` passes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(value: &u32) -> bool {
    *value == 0
}
