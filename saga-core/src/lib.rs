#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![cfg_attr(not(test), warn(clippy::print_stdout, clippy::print_stderr))]

mod classify;
mod clock;
mod context;
mod coordinator;
mod engine;
mod event;
mod guard;
mod housekeeping;
mod ids;
mod journal_view;
mod resources;
mod retry;
mod serde_duration;
mod state;
mod status;
mod step;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod timeline;

pub use classify::{Classify, ErrorClass, HttpStatus, StepTimeout};
pub use clock::{Clock, Timestamp, TokioClock};
pub use context::StepContext;
pub use coordinator::{Coordinator, CoordinatorReport, DEFAULT_RETENTION};
pub use engine::{
    Branch, ChildSaga, ClientRetry, Engine, EngineBuilder, EngineConfig, EngineError, Interruption,
    Join, OnBranchFailure, Outcome, Parallel, RetryNotice, RetryingStore, RunOutcome, Saga,
    SagaContext, SagaError, SagaHandle, SagaOutcome, SignalPart, SignalSent, SignalSpec,
    StartOptions, StartSaga, Started,
};
pub use event::{CompensationReason, EventKind, FailureKind, SagaEvent, StepError};
pub use guard::{DEFAULT_IN_PROGRESS_TTL, GuardError, IdempotencyGuard};
pub use ids::{Phase, SagaId, content_key, fingerprint, step_idempotency_key};
pub use journal_view::{ChildLink, ParallelBlock, Waiting};
pub use resources::{MissingResource, Resources};
pub use retry::{
    DEFAULT_CLIENT_RETRY_FOR, GiveUpReason, Jitter, RetryDecision, RetryPolicy, RetryPolicyError,
};
pub use state::{
    CompensationRecord, CompensationStatus, FoldError, JOURNAL_FORMAT, ParentLink, PivotPoint,
    SagaState, StepRecord, StepStatus,
};
pub use status::{SagaStatus, UnknownStatus};
pub use step::{Compensation, Reconciled, Step};
pub use store::{CancelOutcome, Lease, ListQuery, MemoryStore, SagaStore, StoreError};

#[cfg(feature = "macros")]
pub use saga_macros::{Classify, saga, saga_step};

/// Re-exports of `async_trait` and `serde` for code that implements the traits by hand.
pub use async_trait::async_trait;

/// Items used by code that `saga-macros` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::{
        Classify, Compensation, ErrorClass, Jitter, Reconciled, RetryPolicy, Step, StepContext,
    };
    pub use async_trait::async_trait;
    pub use std::clone::Clone;
    pub use std::default::Default;
    pub use std::fmt::Debug;
    pub use std::marker::Copy;
    pub use std::option::Option;
    pub use std::result::Result;
    pub use std::time::Duration;
}
