//! The event history of a saga: an append-only audit trail. The saga's status and journal
//! ([`SagaState`](crate::SagaState)) are a fold over these events.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ErrorClass, GiveUpReason, SagaStatus, Timestamp};

/// One entry of a saga's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SagaEvent {
    /// Position in the history (0 for `SagaStarted`); assigned by the store's order of
    /// appends and filled in when the history is read.
    #[serde(default, skip_serializing)]
    pub seq: u64,
    /// When the event happened (coordinator clock).
    pub at: Timestamp,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A failed attempt's error as recorded in the history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepError {
    /// The error's display text.
    pub message: String,
    /// How it was classified.
    #[serde(flatten)]
    pub class: ErrorClass,
    /// `true` when the attempt was cancelled by the step timeout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timeout: bool,
}

impl StepError {
    /// The error of an attempt cancelled by its timeout (transient).
    #[must_use]
    pub fn timed_out(limit: std::time::Duration) -> Self {
        Self {
            message: crate::StepTimeout(limit).to_string(),
            class: ErrorClass::TRANSIENT,
            timeout: true,
        }
    }
}

/// Why a saga started compensating.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "cause")]
#[non_exhaustive]
pub enum CompensationReason {
    /// A step failed for good.
    StepFailed {
        /// The failed step's position.
        position: u32,
        /// Its name.
        step: String,
        /// Why it was not retried further.
        reason: GiveUpReason,
        /// The last error.
        error: String,
    },
    /// The workflow returned an error of its own (a business decision to abort).
    Aborted {
        /// The workflow's error text.
        message: String,
    },
    /// An operator or client asked for the saga to be cancelled.
    Cancelled {
        /// The reason given with the request.
        reason: String,
    },
    /// This saga is a child, and its parent is compensating: what the child did is undone as
    /// part of the parent's undo (a completed child is reopened for it).
    ParentCompensating {
        /// The parent saga.
        parent: crate::SagaId,
    },
}

impl std::fmt::Display for CompensationReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompensationReason::StepFailed {
                position,
                step,
                reason,
                error,
            } => {
                write!(f, "step {position} `{step}` failed ({reason}): {error}")
            }
            CompensationReason::Aborted { message } => write!(f, "workflow aborted: {message}"),
            CompensationReason::Cancelled { reason } => write!(f, "cancelled: {reason}"),
            CompensationReason::ParentCompensating { parent } => {
                write!(f, "its parent saga {parent} is compensating")
            }
        }
    }
}

/// Why a saga ended `Failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// A compensation failed for good; the systems it touches may hold partial effects.
    CompensationFailed,
    /// The workflow code no longer matched the recorded journal. Only in histories written
    /// before diverging workflows were quarantined: such a saga now stays where it was, set
    /// aside with the diverging position, until the code it started under is deployed and it
    /// is retried.
    NonDeterministic,
    /// The stored saga could not be decoded or its type is not registered.
    BadData,
    /// An operator abandoned it: it was stopped without (further) compensation.
    Abandoned,
    /// A step failed for good (or the workflow returned an error) after a pivot step had
    /// succeeded: nothing was compensated, because the saga can only go forward. Fix the cause
    /// and retry it (the failed step runs again with a fresh retry budget).
    AfterPivot,
}

/// What happened to a saga. Field names follow the structured log record of the design brief.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum EventKind {
    /// The saga was accepted and is durable.
    SagaStarted {
        /// Registered saga type name.
        saga_type: String,
        /// Version of the saga type's code.
        version: u32,
        /// The workflow input.
        input: Value,
        /// The idempotency key it was started with, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        /// The saga that started this one as a child, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<crate::ParentLink>,
        /// The journal format the history is written in (absent: format 1, from before
        /// parallel branches, signals and child sagas).
        #[serde(default = "crate::state::legacy_journal_format")]
        journal_format: u32,
    },
    /// A coordinator took the saga's lease.
    LeaseAcquired {
        /// The coordinator's owner id.
        owner: String,
        /// The fencing token that its writes carry.
        fence: u64,
    },
    /// A coordinator picked up a saga that had already made progress (after a crash, an
    /// expired lease or a durable timer).
    SagaResumed {
        /// The coordinator's owner id.
        owner: String,
        /// The status it was resumed in.
        status: SagaStatus,
        /// Journal entries that will be replayed instead of executed.
        completed_steps: u32,
    },
    /// A step attempt is about to run.
    StepStarted {
        /// Journal position.
        position: u32,
        /// Step name.
        step: String,
        /// 1-based attempt number.
        attempt: u32,
        /// The key the step passes to the systems it calls.
        idempotency_key: String,
        /// The step input (on the first attempt only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<Value>,
    },
    /// A step attempt succeeded and its output is recorded.
    StepSucceeded {
        /// Journal position.
        position: u32,
        /// Step name.
        step: String,
        /// The attempt that succeeded.
        attempt: u32,
        /// The step output.
        output: Value,
        /// `true` when the output came from the step's reconciliation check rather than a run.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reconciled: bool,
        /// `true` when this step is the saga's pivot (the first
        /// [`Compensation::Pivot`](crate::Compensation::Pivot) step to succeed): from here on
        /// the saga only goes forward. Absent in histories written before pivots existed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pivot: bool,
    },
    /// A step attempt failed with a transient error and will be retried.
    StepAttemptFailed {
        /// Journal position.
        position: u32,
        /// Step name.
        step: String,
        /// The attempt that failed.
        attempt: u32,
        /// The error.
        error: StepError,
        /// The delay before the next attempt, in seconds.
        backoff_seconds: f64,
        /// When the next attempt may start.
        next_retry_at: Timestamp,
    },
    /// A step failed for good.
    StepFailed {
        /// Journal position.
        position: u32,
        /// Step name.
        step: String,
        /// The last attempt.
        attempt: u32,
        /// The last error.
        error: StepError,
        /// Why it was not retried further.
        reason: GiveUpReason,
    },
    /// A journaled value (`now()`, `uuid()`) was recorded so that replays see the same one.
    ValueRecorded {
        /// Journal position.
        position: u32,
        /// `now` or `uuid`.
        name: String,
        /// The value.
        value: Value,
    },
    /// A client or operator asked for the saga to be cancelled.
    CancelRequested {
        /// The reason given.
        reason: String,
    },
    /// The saga began undoing its completed steps.
    CompensationStarted {
        /// Why.
        reason: CompensationReason,
    },
    /// A compensation attempt failed and will be retried.
    CompensationAttemptFailed {
        /// Journal position of the step being undone.
        position: u32,
        /// Step name.
        step: String,
        /// The attempt that failed.
        attempt: u32,
        /// The error.
        error: StepError,
        /// The delay before the next attempt, in seconds.
        backoff_seconds: f64,
        /// When the next attempt may start.
        next_retry_at: Timestamp,
    },
    /// A step's effect was undone.
    StepCompensated {
        /// Journal position.
        position: u32,
        /// Step name.
        step: String,
        /// The attempt that succeeded (with `reconciled`: the latest attempt that may have
        /// applied the undo).
        attempt: u32,
        /// `true` when the compensation's reconciliation check found the undo already
        /// applied (by an attempt that timed out or was cut off) rather than an attempt
        /// succeeding. Absent in histories written before it existed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        reconciled: bool,
    },
    /// A step was left alone during compensation, and why (it declared no compensation, or
    /// its in-flight attempt was found not to have had an effect).
    CompensationSkipped {
        /// Journal position.
        position: u32,
        /// Step name.
        step: String,
        /// Why it needs no undo.
        why: String,
    },
    /// A cancel request reached the saga after its pivot had succeeded: it is not acted on,
    /// because the saga can only go forward (requests made once the pivot is recorded are
    /// refused up front; this records one that raced with the pivot).
    CancelRefused {
        /// The pivot step.
        step: String,
        /// Its journal position.
        position: u32,
    },
    /// A signal reached the saga's inbox (appended by the sender, outside any lease). The
    /// workflow takes it when it waits for a signal of this name.
    SignalReceived {
        /// The signal's name.
        name: String,
        /// The sender's key (a second delivery with the same key is dropped).
        key: String,
        /// The payload.
        payload: Value,
    },
    /// A waiting workflow could not take a signal: its payload does not decode as the type
    /// the wait asked for. The signal stays in the inbox, set aside; the wait goes on (send
    /// a corrected signal with a new key).
    SignalRejected {
        /// The signal's name.
        name: String,
        /// Its sequence number in the inbox.
        sequence: u64,
        /// The sender's key.
        key: String,
        /// Why it does not decode.
        error: String,
    },
    /// Terminal: every step succeeded.
    SagaCompleted {
        /// The workflow output.
        output: Value,
    },
    /// Terminal: every completed step was undone.
    SagaCompensated,
    /// An operator asked for a `Failed` (or quarantined) saga to be tried again: it resumes
    /// where it stopped (compensation, with fresh attempt budgets for the compensations that
    /// gave up; or forward, after a failure past the pivot or a quarantine whose cause was
    /// fixed).
    SagaRetried {
        /// Who asked, and why.
        reason: String,
        /// The status it resumes in.
        status: SagaStatus,
    },
    /// A completed child saga was reopened to be compensated, because its parent is
    /// compensating: it undoes its steps in reverse order and ends `Compensated`.
    SagaReopened {
        /// Why (the parent's compensation).
        reason: CompensationReason,
    },
    /// Terminal (`Failed`, kind `Abandoned`): an operator stopped the saga without
    /// compensating what remains.
    SagaAbandoned {
        /// Who asked, and why.
        reason: String,
    },
    /// Terminal: stuck, needs an operator.
    SagaFailed {
        /// What went wrong.
        kind: FailureKind,
        /// The error.
        error: String,
    },
}

impl EventKind {
    /// The event's type name, as in the stored JSON.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SagaStarted { .. } => "SagaStarted",
            EventKind::LeaseAcquired { .. } => "LeaseAcquired",
            EventKind::SagaResumed { .. } => "SagaResumed",
            EventKind::StepStarted { .. } => "StepStarted",
            EventKind::StepSucceeded { .. } => "StepSucceeded",
            EventKind::StepAttemptFailed { .. } => "StepAttemptFailed",
            EventKind::StepFailed { .. } => "StepFailed",
            EventKind::ValueRecorded { .. } => "ValueRecorded",
            EventKind::CancelRequested { .. } => "CancelRequested",
            EventKind::CancelRefused { .. } => "CancelRefused",
            EventKind::CompensationStarted { .. } => "CompensationStarted",
            EventKind::CompensationAttemptFailed { .. } => "CompensationAttemptFailed",
            EventKind::StepCompensated { .. } => "StepCompensated",
            EventKind::CompensationSkipped { .. } => "CompensationSkipped",
            EventKind::SignalReceived { .. } => "SignalReceived",
            EventKind::SignalRejected { .. } => "SignalRejected",
            EventKind::SagaCompleted { .. } => "SagaCompleted",
            EventKind::SagaCompensated => "SagaCompensated",
            EventKind::SagaFailed { .. } => "SagaFailed",
            EventKind::SagaRetried { .. } => "SagaRetried",
            EventKind::SagaAbandoned { .. } => "SagaAbandoned",
            EventKind::SagaReopened { .. } => "SagaReopened",
        }
    }
}
