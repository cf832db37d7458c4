//! Errors of the workflow channel ([`SagaError`]) and of the engine API ([`EngineError`]).

use crate::{GiveUpReason, SagaId, SagaStatus, StoreError, Timestamp};

/// Why a workflow's `run` call (or the workflow itself) stopped. Workflows propagate these
/// with `?`; the engine decides what happens next from its own record, so a workflow that
/// catches one and carries on cannot change the outcome.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SagaError {
    /// A step failed for good; the saga compensates.
    #[error("step {position} `{step}` failed ({reason}): {error}")]
    StepFailed {
        /// Step name.
        step: String,
        /// Journal position.
        position: u32,
        /// Why it was not retried further.
        reason: GiveUpReason,
        /// The last error.
        error: String,
    },
    /// The workflow decided to abort (a business rule); the saga compensates.
    #[error("saga aborted by its workflow: {0}")]
    Aborted(String),
    /// A cancel was requested; the saga compensates.
    #[error("saga cancelled: {0}")]
    Cancelled(String),
    /// The workflow called a different step than its journal records at this position: the
    /// code changed under a running saga, or it depends on something not journaled (use
    /// `SagaContext::now`/`uuid`). The saga ends `Failed` without compensating.
    #[error("non-deterministic workflow at journal position {position}: {message}")]
    NonDeterministic {
        /// Journal position.
        position: u32,
        /// What differs.
        message: String,
    },
    /// A long backoff was turned into a durable timer; the saga resumes at `until`.
    #[error("saga suspended until {until} by a durable timer")]
    Suspended {
        /// When it is due again.
        until: Timestamp,
    },
    /// This coordinator lost the saga (fenced by another owner, or the store failed); the
    /// saga is left as last committed for a later resume.
    #[error("saga interrupted: {0}")]
    Interrupted(String),
    /// Stored data or a value could not be encoded or decoded.
    #[error("saga data error: {0}")]
    BadData(String),
}

impl SagaError {
    /// Aborts the saga from workflow code with a reason; completed steps are compensated.
    pub fn abort(reason: impl std::fmt::Display) -> Self {
        SagaError::Aborted(reason.to_string())
    }
}

/// A failed engine call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// No saga type with this name is registered on this engine.
    #[error("unknown saga type `{name}`; registered types: {known:?}")]
    UnknownSagaType {
        /// The requested name.
        name: String,
        /// The registered names.
        known: Vec<String>,
    },
    /// The input given to [`Engine::start_json`](crate::Engine::start_json) does not decode
    /// as the saga type's input; nothing was stored.
    #[error(
        "the input does not fit saga type `{saga_type}` at `{path}`: {message}; nothing was started"
    )]
    InvalidInput {
        /// The saga type.
        saga_type: String,
        /// Where in the input the problem is (`.` for the whole input).
        path: String,
        /// serde's message.
        message: String,
    },
    /// No saga with this id.
    #[error("saga {0} not found")]
    NotFound(SagaId),
    /// Another coordinator holds the saga's lease.
    #[error(
        "saga {saga} is being run by `{owner}` (lease until {until}); wait for it or let the lease expire"
    )]
    Busy {
        /// The saga.
        saga: SagaId,
        /// The holder.
        owner: String,
        /// Lease expiry.
        until: Timestamp,
    },
    /// The idempotency key was used before with another input.
    #[error(
        "idempotency key `{key}` already started saga {saga} with a different input; use a new key for a new request"
    )]
    IdempotencyConflict {
        /// The existing saga.
        saga: SagaId,
        /// The key.
        key: String,
    },
    /// The saga was set aside because its data is unusable.
    #[error("saga {saga} is quarantined: {reason}")]
    Quarantined {
        /// The saga.
        saga: SagaId,
        /// Why.
        reason: String,
    },
    /// This run of the saga stopped before a terminal state (fenced, store failure); the
    /// saga itself is intact and resumes from its journal.
    #[error("saga {saga} interrupted: {reason}")]
    Interrupted {
        /// The saga.
        saga: SagaId,
        /// Why.
        reason: String,
    },
    /// A value could not be encoded or decoded.
    #[error("cannot encode or decode {what}: {source}")]
    Encoding {
        /// What.
        what: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The saga is not in a state that allows this call.
    #[error("saga {saga} is {status}: {message}")]
    WrongStatus {
        /// The saga.
        saga: SagaId,
        /// Its status.
        status: SagaStatus,
        /// What was attempted.
        message: String,
    },
    /// The saga did not reach a terminal state within the wait.
    #[error("saga {saga} is still {status} after the wait; wait again or look at its history")]
    WaitTimedOut {
        /// The saga.
        saga: SagaId,
        /// Its status when the wait ended.
        status: SagaStatus,
    },
    /// The engine configuration is invalid.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
