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

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Classify, RetryPolicy, StepContext};

/// Whether and when a step's effect is undone during compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compensation {
    /// Nothing to undo: a read-only step (a lookup, a score) or one whose effect needs no
    /// undoing. It changes nothing about what happens to the other steps.
    None,
    /// Undo the step when it completed.
    OnSuccess,
    /// Undo the step when it completed, and also when its forward action failed for good or
    /// its outcome is unknown (for steps that can fail half-way); the compensation then gets
    /// no output.
    Always,
    /// The point of no return (a *pivot*: charging the card, signing the term sheet). It has
    /// nothing to undo, and once it has succeeded the saga only goes forward: a later step that
    /// fails for good ends the saga `Failed` ([`FailureKind::AfterPivot`](crate::FailureKind::AfterPivot))
    /// without compensating anything, so that an operator fixes the cause and retries it
    /// forward, and a cancel request is refused. Give the steps after a pivot generous retry
    /// policies: they must eventually succeed. If the pivot itself fails for good, the steps
    /// before it are compensated as usual. When a saga has several pivot steps, the first one
    /// that succeeds is the point of no return (the later ones are then forward-only anyway).
    Pivot,
}

/// What a reconciliation check found out about an attempt whose outcome is unknown: the
/// forward action's ([`Step::reconcile`], `T` = the step's output) or the compensation's
/// ([`Step::reconcile_compensation`], `T` = `()`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reconciled<T> {
    /// The effect happened; here is the output it produced. A forward step is recorded as
    /// succeeded, a compensation as done, without running again.
    Applied(T),
    /// The effect did not happen.
    NotApplied,
    /// The check cannot tell (the default). The engine runs the attempt again with the same
    /// idempotency key, or gives up as it would without a check.
    Unknown,
}

/// One step of a saga.
///
/// `NAME` is stored in the journal and compared on replay: renaming a step makes running
/// sagas diverge from their journal, so keep names stable (or bump the saga's version).
///
/// The methods return `impl Future + Send`: implement them with plain `async fn` (no
/// `#[async_trait]` needed); the engine runs them on a multi-threaded runtime, so the futures
/// must be `Send`.
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
    fn forward(
        &self,
        ctx: &StepContext,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, Self::Error>> + Send;

    /// Undoes the forward action. `output` is `None` only for [`Compensation::Always`] steps
    /// whose forward action did not complete. The default does nothing (for
    /// [`Compensation::None`]).
    fn compensate(
        &self,
        ctx: &StepContext,
        input: Self::Input,
        output: Option<Self::Output>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = (ctx, input, output);
        std::future::ready(Ok(()))
    }

    /// Asks the systems the step touched whether the effect with `ctx.idempotency_key()`
    /// happened. Consulted before re-running an attempt whose outcome is unknown (its
    /// coordinator died mid-attempt) and before deciding whether a failed step needs undoing.
    fn reconcile(
        &self,
        ctx: &StepContext,
        input: &Self::Input,
    ) -> impl Future<Output = Result<Reconciled<Self::Output>, Self::Error>> + Send {
        let _ = (ctx, input);
        std::future::ready(Ok(Reconciled::Unknown))
    }

    /// Asks the systems the compensation touched whether the undo with
    /// `ctx.idempotency_key()` (the compensation's key: `ctx.phase()` is
    /// [`Phase::Compensate`](crate::Phase::Compensate), the same key every compensation attempt
    /// gets) was applied. `input` and `output` are what [`Step::compensate`] gets.
    ///
    /// Consulted when an undo's outcome is unknown: before re-running an undo that may have
    /// been cut off (the saga resumes mid-compensation after a crash or a lost lease) or that
    /// timed out, and before the compensation gives up (its retry policy ran out, or a
    /// permanent error followed an attempt whose outcome is unknown). `Applied(())` records
    /// the compensation as done (`StepCompensated` with `reconciled: true`) without running
    /// it again, so the saga can still end `Compensated`; `NotApplied` and `Unknown` (the
    /// default) leave the engine doing what it does without a check. A check that fails
    /// counts as a failed attempt, never as "applied".
    ///
    /// ```
    /// use std::collections::HashSet;
    /// use std::sync::{Mutex, PoisonError};
    ///
    /// use async_trait::async_trait;
    /// use saga_core::{Compensation, HttpStatus, Reconciled, Step, StepContext};
    ///
    /// /// The seat service, which remembers the idempotency key of every release it carried out.
    /// #[derive(Default)]
    /// struct Seats(Mutex<HashSet<String>>);
    ///
    /// fn seats(ctx: &StepContext) -> Result<&Seats, HttpStatus> {
    ///     ctx.resource::<Seats>().map_err(|_| HttpStatus::new(500))
    /// }
    ///
    /// struct ReserveSeat;
    ///
    /// impl Step for ReserveSeat {
    ///     type Input = String;
    ///     type Output = u32;
    ///     type Error = HttpStatus;
    ///     const NAME: &'static str = "reserve_seat";
    ///     const COMPENSATION: Compensation = Compensation::OnSuccess;
    ///
    ///     async fn forward(&self, _ctx: &StepContext, passenger: String) -> Result<u32, HttpStatus> {
    ///         Ok(passenger.len() as u32)
    ///     }
    ///
    ///     async fn compensate(
    ///         &self,
    ///         ctx: &StepContext,
    ///         _passenger: String,
    ///         _seat: Option<u32>,
    ///     ) -> Result<(), HttpStatus> {
    ///         let released = &seats(ctx)?.0;
    ///         let mut released = released.lock().unwrap_or_else(PoisonError::into_inner);
    ///         released.insert(ctx.idempotency_key().to_owned());
    ///         Ok(())
    ///     }
    ///
    ///     async fn reconcile_compensation(
    ///         &self,
    ///         ctx: &StepContext,
    ///         _passenger: &String,
    ///         _seat: Option<&u32>,
    ///     ) -> Result<Reconciled<()>, HttpStatus> {
    ///         let released = &seats(ctx)?.0;
    ///         let released = released.lock().unwrap_or_else(PoisonError::into_inner);
    ///         Ok(if released.contains(ctx.idempotency_key()) {
    ///             Reconciled::Applied(())
    ///         } else {
    ///             Reconciled::NotApplied
    ///         })
    ///     }
    /// }
    /// ```
    fn reconcile_compensation(
        &self,
        ctx: &StepContext,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> impl Future<Output = Result<Reconciled<()>, Self::Error>> + Send {
        let _ = (ctx, input, output);
        std::future::ready(Ok(Reconciled::Unknown))
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
