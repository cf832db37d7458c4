//! Errors of the workflow channel ([`SagaError`]) and of the engine API ([`EngineError`]).

use std::sync::Arc;

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
    /// `SagaContext::now`/`uuid`). The saga is quarantined without compensating, until
    /// the code it started under is deployed and it is retried.
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
    /// A cancel was refused: the saga has passed its pivot (its point of no return) and only
    /// goes forward now. Nothing was changed. To stop it anyway, abandon it (no compensation).
    #[error(
        "saga {saga} cannot be cancelled: it is past its pivot step `{step}` (journal position {position}), the point of no return, and only goes forward now; to stop it without compensating, abandon it"
    )]
    PastPivot {
        /// The saga.
        saga: SagaId,
        /// The pivot step it passed.
        step: String,
        /// Its journal position.
        position: u32,
    },
    /// A typed handle was asked for a saga of another type, or of another version of it
    /// (whose output may not decode as the asked type's).
    #[error(
        "saga {saga} is a `{actual}` v{actual_version}, not a `{expected}` v{expected_version}"
    )]
    WrongSagaType {
        /// The saga.
        saga: SagaId,
        /// The type asked for.
        expected: &'static str,
        /// Its version.
        expected_version: u32,
        /// The saga's type.
        actual: String,
        /// The version the saga was started under.
        actual_version: u32,
    },
    /// The saga was set aside because its data is unusable.
    #[error("saga {saga} is quarantined: {reason}")]
    Quarantined {
        /// The saga.
        saga: SagaId,
        /// Why.
        reason: String,
    },
    /// This run of the saga stopped before a terminal state; the saga itself is intact and
    /// resumes from its journal. [`EngineError::interruption`] and the `is_*` predicates tell
    /// the causes apart.
    #[error("saga {saga} interrupted: {cause}")]
    Interrupted {
        /// The saga.
        saga: SagaId,
        /// Why this run stopped.
        #[source]
        cause: Interruption,
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
    /// A signal was refused before delivery: its name or key is malformed, the saga's type
    /// declares no signal of that name, or its payload does not decode as the declared type.
    /// Nothing was delivered.
    #[error("signal `{name}` to saga {saga} refused: {problem}")]
    InvalidSignal {
        /// The saga.
        saga: SagaId,
        /// The signal's name.
        name: String,
        /// Which part of the signal is wrong.
        part: SignalPart,
        /// What is wrong, and how to send it right.
        problem: String,
    },
    /// The signal key was sent before with another payload. Nothing was delivered.
    #[error(
        "signal `{name}` with key `{key}` was sent to saga {saga} before with a different payload; use a new key for a new signal"
    )]
    SignalConflict {
        /// The saga.
        saga: SagaId,
        /// The signal's name.
        name: String,
        /// The reused key.
        key: String,
    },
    /// The engine configuration is invalid.
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which part of a signal [`EngineError::InvalidSignal`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignalPart {
    /// The name is malformed or reserved.
    Name,
    /// The key is malformed.
    Key,
    /// The saga's type declares no signal of this name.
    Undeclared,
    /// The payload does not decode as the type the saga's type declares for it.
    Payload,
}

/// Why a run of a saga stopped before a terminal state ([`EngineError::Interrupted`]). In
/// every case the saga is left as last committed and resumes from its journal; the cause
/// says who resumes it and when.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Interruption {
    /// Another coordinator claimed the saga: the store rejected a write or a lease renewal
    /// made under this run's (stale) lease token. This run wrote nothing more.
    #[error(
        "another coordinator took the saga over ({source}); this run wrote nothing more and the new owner carries on, nothing to do"
    )]
    Fenced {
        /// The store's [`StoreError::Fenced`].
        #[source]
        source: Arc<StoreError>,
    },
    /// A write failed because the store could not be reached or did not answer in time
    /// ([`StoreError::Unavailable`]).
    #[error(
        "the store is unavailable ({source}); the saga resumes from its last commit once the store answers again and its lease lapses"
    )]
    StoreUnavailable {
        /// The store's error.
        #[source]
        source: Arc<StoreError>,
    },
    /// The store refused this run's write for another reason than fencing: the saga was
    /// finished, quarantined or deleted meanwhile, its data is corrupt, or the store refused
    /// the operation (permissions).
    #[error(
        "the store refused this run's write ({source}); look at the saga's history and the store's configuration"
    )]
    StoreRejected {
        /// The store's error.
        #[source]
        source: Arc<StoreError>,
    },
    /// The lease could not be renewed (the store did not answer) before it lapsed, so the
    /// attempt in flight was dropped: running on would let a second coordinator run the
    /// same step at the same time.
    #[error(
        "the lease could not be renewed before it lapsed, so the attempt in flight was stopped; another coordinator resumes the saga once the store answers again"
    )]
    LeaseLapsed,
    /// The coordinator is shutting down: progress was recorded and the lease released.
    #[error(
        "the coordinator is shutting down; progress was recorded and the lease released, so another coordinator resumes the saga at once"
    )]
    ShuttingDown,
    /// The task running the saga (or starting it) ended abnormally.
    #[error(
        "{what} panicked; the saga resumes from its journal once its lease lapses (report the panic, it is a bug)"
    )]
    Panicked {
        /// Which task, and the panic.
        what: String,
    },
    /// The run stopped in a state the engine does not expect to stop in; the text says
    /// where.
    #[error("{0}; the saga resumes from its journal")]
    Stopped(String),
}

impl Interruption {
    /// The cause for a store error met while writing under a lease.
    pub(crate) fn from_store(err: StoreError) -> Self {
        let source = Arc::new(err);
        match &*source {
            StoreError::Fenced { .. } => Interruption::Fenced { source },
            StoreError::Unavailable { .. } => Interruption::StoreUnavailable { source },
            _ => Interruption::StoreRejected { source },
        }
    }

    /// The store error behind this cause, if any.
    #[must_use]
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            Interruption::Fenced { source }
            | Interruption::StoreUnavailable { source }
            | Interruption::StoreRejected { source } => Some(source),
            Interruption::LeaseLapsed
            | Interruption::ShuttingDown
            | Interruption::Panicked { .. }
            | Interruption::Stopped(_) => None,
        }
    }
}

impl EngineError {
    /// Why the run was interrupted, for [`EngineError::Interrupted`].
    #[must_use]
    pub fn interruption(&self) -> Option<&Interruption> {
        match self {
            EngineError::Interrupted { cause, .. } => Some(cause),
            _ => None,
        }
    }

    /// `true` for [`EngineError::Interrupted`], whatever the cause: the saga is intact and
    /// resumes from its journal.
    #[must_use]
    pub fn is_interrupted(&self) -> bool {
        self.interruption().is_some()
    }

    /// `true` when another coordinator owns the saga now: an interrupted run
    /// ([`Interruption::Fenced`]) or a store call that was fenced.
    #[must_use]
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            EngineError::Interrupted {
                cause: Interruption::Fenced { .. },
                ..
            } | EngineError::Store(StoreError::Fenced { .. })
        )
    }

    /// `true` when the run stopped because its coordinator is shutting down.
    #[must_use]
    pub fn is_shutdown(&self) -> bool {
        matches!(self.interruption(), Some(Interruption::ShuttingDown))
    }

    /// `true` when the run's lease lapsed before it could be renewed.
    #[must_use]
    pub fn is_lease_lapsed(&self) -> bool {
        matches!(self.interruption(), Some(Interruption::LeaseLapsed))
    }

    /// `true` when the store could not be reached or did not answer in time: an interrupted
    /// run ([`Interruption::StoreUnavailable`]) or a store call that failed so
    /// ([`StoreError::Unavailable`]). Retrying later may succeed.
    #[must_use]
    pub fn is_store_unavailable(&self) -> bool {
        matches!(
            self,
            EngineError::Interrupted {
                cause: Interruption::StoreUnavailable { .. },
                ..
            } | EngineError::Store(StoreError::Unavailable { .. })
        )
    }
}
