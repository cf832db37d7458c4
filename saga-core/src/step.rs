//! Steps: the unit of work of a saga, with its compensation, retry policy and timeout.
//!
//! Steps are usually written with `#[saga_step]` on an async fn; implementing [`Step`] by
//! hand is the same thing spelled out:
//!
//! ```
//! use async_trait::async_trait;
//! use saga_core::{Compensation, HttpStatus, Step, StepContext};
//!
//! struct ReserveSeat;
//!
//! #[async_trait]
//! impl Step for ReserveSeat {
//!     type Input = String;
//!     type Output = u32;
//!     type Error = HttpStatus;
//!     const NAME: &'static str = "reserve_seat";
//!     const COMPENSATION: Compensation = Compensation::OnSuccess;
//!
//!     async fn forward(&self, _ctx: &StepContext, passenger: String) -> Result<u32, HttpStatus> {
//!         Ok(passenger.len() as u32)
//!     }
//!
//!     async fn compensate(
//!         &self,
//!         _ctx: &StepContext,
//!         _passenger: String,
//!         _seat: Option<u32>,
//!     ) -> Result<(), HttpStatus> {
//!         Ok(())
//!     }
//! }
//! ```

use std::fmt::Display;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Classify, RetryPolicy, StepContext};

/// Whether and when a step's effect is undone during compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compensation {
    /// No compensation: a pivot (the point of no return) or a read-only step.
    None,
    /// Undo the step when it completed.
    OnSuccess,
    /// Undo the step when it completed, and also when its forward action failed for good or
    /// its outcome is unknown (for steps that can fail half-way); the compensation then gets
    /// no output.
    Always,
}

/// What a step's reconciliation check found out about an attempt whose outcome is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reconciled<T> {
    /// The effect happened; here is the output it produced. The step is recorded as succeeded
    /// without running again.
    Applied(T),
    /// The effect did not happen.
    NotApplied,
    /// The check cannot tell (the default). The engine runs the attempt again with the same
    /// idempotency key.
    Unknown,
}

/// One step of a saga.
///
/// `NAME` is stored in the journal and compared on replay: renaming a step makes running
/// sagas diverge from their journal, so keep names stable (or bump the saga's version).
#[async_trait]
pub trait Step: Send + Sync + 'static {
    /// The step's input, recorded in the journal.
    type Input: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The step's output, recorded in the journal and replayed on resume.
    type Output: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The step's error: classified transient or permanent.
    type Error: Classify + Display + Send + Sync + 'static;

    /// Stable name, unique within a saga type.
    const NAME: &'static str;

    /// Whether the step has a compensation. Required, so that forgetting to decide is a
    /// compile error rather than a saga that silently leaves an effect behind.
    const COMPENSATION: Compensation;

    /// The forward action. `ctx.idempotency_key()` is the same on every attempt: pass it to
    /// the systems the step calls.
    async fn forward(
        &self,
        ctx: &StepContext,
        input: Self::Input,
    ) -> Result<Self::Output, Self::Error>;

    /// Undoes the forward action. `output` is `None` only for [`Compensation::Always`] steps
    /// whose forward action did not complete. The default does nothing (for
    /// [`Compensation::None`]).
    async fn compensate(
        &self,
        ctx: &StepContext,
        input: Self::Input,
        output: Option<Self::Output>,
    ) -> Result<(), Self::Error> {
        let _ = (ctx, input, output);
        Ok(())
    }

    /// Asks the systems the step touched whether the effect with `ctx.idempotency_key()`
    /// happened. Consulted before re-running an attempt whose outcome is unknown (its
    /// coordinator died mid-attempt) and before deciding whether a failed step needs undoing.
    async fn reconcile(
        &self,
        ctx: &StepContext,
        input: &Self::Input,
    ) -> Result<Reconciled<Self::Output>, Self::Error> {
        let _ = (ctx, input);
        Ok(Reconciled::Unknown)
    }

    /// The forward retry policy.
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
    }

    /// The compensation retry policy. Compensations must eventually succeed, so the default
    /// ([`RetryPolicy::compensation_default`]) tries harder than the forward default: 10
    /// attempts, up to 30 s apart.
    fn compensation_retry_policy(&self) -> RetryPolicy {
        RetryPolicy::compensation_default()
    }

    /// The per-attempt timeout (`None`: no timeout). An attempt that runs past it is
    /// cancelled and counts as a transient failure.
    fn timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(30))
    }
}
