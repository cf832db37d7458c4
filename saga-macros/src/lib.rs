//! Procedural macros for [saga-core]: `#[saga_step]` turns an async fn into a saga step type,
//! `#[saga]` turns the async fn of a workflow into a saga type, and `#[derive(Classify)]`
//! states per error variant whether a failure is worth retrying.
//!
//! Use them through saga-core, which re-exports them behind its default `macros` feature:
//! the generated code names items as `::saga_core::__private::…`, so the `saga-core`
//! dependency must keep its name (do not rename it in `Cargo.toml`).
//!
//! ```no_run
//! use saga_core::{saga, saga_step, Classify, SagaContext, SagaError, StepContext};
//! # #[derive(serde::Serialize, serde::Deserialize)]
//! # pub struct NewDeal;
//! # #[derive(serde::Serialize, serde::Deserialize)]
//! # pub struct Deal { id: u64 }
//! # struct Crm;
//! # impl Crm {
//! #     async fn create(&self, _key: &str, _deal: NewDeal) -> Result<Deal, CrmError> { Ok(Deal { id: 1 }) }
//! #     async fn delete(&self, _id: u64) -> Result<(), CrmError> { Ok(()) }
//! # }
//! # fn crm(_ctx: &StepContext) -> Crm { Crm }
//!
//! #[derive(Debug, thiserror::Error, Classify)]
//! pub enum CrmError {
//!     #[error("crm is busy")]
//!     #[classify(transient)]
//!     Busy,
//!     #[error("deal rejected: {0}")]
//!     #[classify(permanent)]
//!     Rejected(String),
//! }
//!
//! /// Opens the deal in the CRM.
//! #[saga_step(compensate = delete_deal, timeout = "10s", retry(max_attempts = 5, initial = "200ms", max = "5s"))]
//! pub async fn create_deal(ctx: &StepContext, input: NewDeal) -> Result<Deal, CrmError> {
//!     crm(ctx).create(ctx.idempotency_key(), input).await
//! }
//!
//! async fn delete_deal(ctx: &StepContext, input: NewDeal, deal: Deal) -> Result<(), CrmError> {
//!     crm(ctx).delete(deal.id).await
//! }
//!
//! /// Opens the deal: the workflow, registered as the saga type `OpenDeal`.
//! #[saga(name = "open_deal", version = 1)]
//! pub async fn open_deal(saga: &mut SagaContext, input: NewDeal) -> Result<u64, SagaError> {
//!     let deal = saga.run(CreateDeal, input).await?;
//!     Ok(deal.id)
//! }
//!
//! // Run it with `Engine::builder(store).register(OpenDeal).build()?.execute::<OpenDeal>(..)`.
//! ```
//!
//! Mistakes are compile errors that point at the offending tokens: a fn that is not `async`,
//! an unknown option, a bad duration, a compensation with the wrong signature, a step that
//! does not say what undoes it, a workflow that does not take the saga context, an error
//! variant that does not say whether it is transient.
//!
//! [saga-core]: https://docs.rs/saga-core

#![forbid(unsafe_code)]

mod attr;
mod classify;
mod expand;
mod parse;
mod workflow;

use proc_macro::TokenStream;

/// Turns an `async fn(ctx: &StepContext, input: In) -> Result<Out, Err>` into a saga step.
///
/// The fn stays as written (it can still be called directly). Next to it the macro defines a
/// unit struct named in PascalCase after the fn (`create_deal` → `CreateDeal`), with the fn's
/// visibility and docs, deriving `Clone, Copy, Debug, Default`, that implements
/// `saga_core::Step` with `Input = In`, `Output = Out`, `Error = Err`. Workflows run it with
/// `saga.run(CreateDeal, input)`.
///
/// The fn must be a free `async fn` without generics, taking exactly the step context by
/// reference and the input by value, and returning `Result<Out, Err>` spelled out with both
/// types (an alias such as `Result<Out>` hides the error type from the macro). `In` and `Out`
/// are recorded in the journal, so they own their data (`'static`, serde-serializable), and
/// `Err` implements `Classify` and `Display`.
///
/// # Options
///
/// Every option may be given at most once. Exactly one of `compensate`, `pivot` and
/// `no_compensation` is required: a step that does not say what undoes it is a compile error.
/// `pivot` and `no_compensation` both mean the step has nothing to undo; they differ in what a
/// later failure does to the steps before it.
///
/// | option | meaning |
/// |---|---|
/// | `compensate = path` | `async fn(ctx: &StepContext, input: In, output: Out) -> Result<(), Err>` undoes a completed step (`Compensation::OnSuccess`). |
/// | `compensate_on_failure` | with `compensate`: also undo when the forward action failed for good or its outcome is unknown (`Compensation::Always`); the compensation then takes `output: Option<Out>`. |
/// | `pivot` | the point of no return (`Compensation::Pivot`): nothing to undo, and once it has succeeded the saga only goes forward; nothing is compensated after a later failure. If the pivot itself fails for good, the steps before it are compensated as usual. |
/// | `no_compensation` | nothing to undo, such as a read-only step (`Compensation::None`); the other steps are compensated as usual. |
/// | `name = "create_deal"` | the step's stable name in the journal (default: the fn's name). Renaming a step makes running sagas diverge from their journal. |
/// | `timeout = "10s"` / `timeout = "none"` | per-attempt timeout, a [humantime] duration above zero, or no timeout (default: the trait's, 30 s). |
/// | `retry(...)` | the forward retry policy, built on `RetryPolicy::default()`. |
/// | `compensate_retry(...)` | the compensation retry policy, built on the trait's default (10 attempts, up to 30 s apart); only with `compensate`. |
/// | `reconcile = path` | `async fn(ctx: &StepContext, input: &In) -> Result<Reconciled<Out>, Err>`, asked whether an attempt whose outcome is unknown took effect. |
/// | `reconcile_compensation = path` | `async fn(ctx: &StepContext, input: &In, output: &Out) -> Result<Reconciled<()>, Err>` (`output: Option<&Out>` with `compensate_on_failure`), asked whether an undo whose outcome is unknown was applied (`Step::reconcile_compensation`; the context carries the compensation's idempotency key); only with `compensate`. |
///
/// `retry(...)` and `compensate_retry(...)` take any of these keys, checked at compile time:
///
/// | key | value |
/// |---|---|
/// | `max_attempts = 5` | total attempts, first included; an integer ≥ 1 (1 = no retry). |
/// | `initial = "200ms"` | the delay after the first failure. |
/// | `max = "5s"` | the cap on any delay; not below `initial` (nor below the default initial delay, 100 ms, when `initial` is not given). |
/// | `multiplier = 2.0` | growth factor between delays, a finite number ≥ 1.0. |
/// | `jitter = "full"` | `"full"`, `"equal"` or `"none"`. |
/// | `max_elapsed = "1m"` | stop retrying once this much time has passed since the first attempt. |
///
/// # Example
///
/// ```no_run
/// use saga_core::{saga_step, Reconciled, StepContext};
/// # #[derive(Debug, thiserror::Error, saga_core::Classify)]
/// # #[error("rooms")] #[classify(transient)] pub struct RoomError;
/// # #[derive(Debug, thiserror::Error, saga_core::Classify)]
/// # #[error("mail")] #[classify(transient)] pub struct MailError;
/// # #[derive(serde::Serialize, serde::Deserialize)] pub struct Meeting;
/// # #[derive(serde::Serialize, serde::Deserialize)] pub struct Booking { id: u64 }
/// # struct Rooms;
/// # impl Rooms {
/// #     async fn book(&self, _k: &str, _m: &Meeting) -> Result<Booking, RoomError> { Ok(Booking { id: 1 }) }
/// #     async fn release_by_key(&self, _k: &str, _id: Option<u64>) -> Result<(), RoomError> { Ok(()) }
/// #     async fn find(&self, _k: &str) -> Result<Option<Booking>, RoomError> { Ok(None) }
/// #     async fn released(&self, _k: &str) -> Result<bool, RoomError> { Ok(false) }
/// # }
/// # fn rooms(_ctx: &StepContext) -> Rooms { Rooms }
/// # struct Mail;
/// # impl Mail { async fn send(&self, _k: &str, _b: Booking) -> Result<(), MailError> { Ok(()) } }
/// # fn mail(_ctx: &StepContext) -> Mail { Mail }
///
/// /// Books the committee room.
/// #[saga_step(
///     compensate = release_room,
///     compensate_on_failure,
///     reconcile = find_booking,
///     reconcile_compensation = booking_released,
///     name = "book_room",
///     timeout = "10s",
///     retry(max_attempts = 5, initial = "200ms", max = "5s", multiplier = 2.0, jitter = "equal"),
///     compensate_retry(max_attempts = 20, max_elapsed = "10m"),
/// )]
/// pub async fn book_committee_room(ctx: &StepContext, input: Meeting) -> Result<Booking, RoomError> {
///     rooms(ctx).book(ctx.idempotency_key(), &input).await
/// }
///
/// // `compensate_on_failure`: the booking may exist even though the forward action failed.
/// async fn release_room(
///     ctx: &StepContext,
///     input: Meeting,
///     booking: Option<Booking>,
/// ) -> Result<(), RoomError> {
///     rooms(ctx).release_by_key(ctx.idempotency_key(), booking.map(|b| b.id)).await
/// }
///
/// async fn find_booking(ctx: &StepContext, input: &Meeting) -> Result<Reconciled<Booking>, RoomError> {
///     Ok(match rooms(ctx).find(ctx.idempotency_key()).await? {
///         Some(booking) => Reconciled::Applied(booking),
///         None => Reconciled::NotApplied,
///     })
/// }
///
/// // Was the release with this (compensation) key carried out? Asked before the release is
/// // re-run after a timeout or a crash, and before the compensation gives up.
/// async fn booking_released(
///     ctx: &StepContext,
///     input: &Meeting,
///     booking: Option<&Booking>,
/// ) -> Result<Reconciled<()>, RoomError> {
///     Ok(if rooms(ctx).released(ctx.idempotency_key()).await? {
///         Reconciled::Applied(())
///     } else {
///         Reconciled::NotApplied
///     })
/// }
///
/// /// Sends the committee its invitation: the point of no return. Once it is sent, the
/// /// booking stands even if a later step fails.
/// #[saga_step(pivot)]
/// pub async fn notify_committee(ctx: &StepContext, input: Booking) -> Result<(), MailError> {
///     mail(ctx).send(ctx.idempotency_key(), input).await
/// }
/// ```
///
/// # Errors
///
/// Misuse is reported at the offending tokens, and the fn itself is always emitted, so one
/// mistake does not cascade into errors wherever the fn is called. A compensation or
/// reconciliation fn with the wrong signature is reported at its path in the attribute.
#[proc_macro_attribute]
pub fn saga_step(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::saga_step(args.into(), &item.into()).into()
}

/// Turns an `async fn(saga: &mut SagaContext, input: In) -> Result<Out, SagaError>`, a
/// workflow, into a saga type.
///
/// The fn stays as written (it can still be called directly). Next to it the macro defines a
/// unit struct named in PascalCase after the fn (`deal_flow` → `DealFlow`), with the fn's
/// visibility, docs and `cfg` attributes, deriving `Clone, Copy, Debug, Default`, that
/// implements `saga_core::Saga` with `Input = In`, `Output = Out`, and `run` calling the fn.
/// Register it with `Engine::builder(store).register(DealFlow)` and start it with
/// `engine.start(DealFlow, input)` (then `.key(..)`, `.await` or `.execute()`).
///
/// The fn must be a free `async fn` without generics, taking exactly the saga context by
/// mutable reference and the input by value, and returning `Result<Out, SagaError>` spelled
/// out with both types. `In` and `Out` are stored with the saga, so they own their data
/// (`'static`, serde-serializable). The workflow is re-executed on every resume, completed
/// steps replayed from the journal, so it must be deterministic given its step results
/// (see `saga_core::Saga`).
///
/// # Options
///
/// Both are optional; each may be given at most once.
///
/// | option | meaning |
/// |---|---|
/// | `name = "deal_flow"` | the saga type's registered name, `Saga::NAME`, stored with every saga of this type (default: the fn's name). Not empty, no leading or trailing whitespace. Renaming a saga type leaves the sagas stored under the old name without code to run them. |
/// | `version = 2` | the workflow version, `Saga::VERSION` (default 1): an integer from 1 to `u32::MAX`. Part of the idempotency fingerprint and stored with every saga started under it; raise it when a change would make running sagas diverge from their journal. |
///
/// # Example
///
/// ```
/// use saga_core::{saga, saga_step, Engine, MemoryStore, Saga, SagaContext, SagaError};
/// use saga_core::{SagaStatus, StartOptions, StepContext};
/// # #[derive(Debug, thiserror::Error, saga_core::Classify)]
/// # #[error("crm")] #[classify(transient)] pub struct CrmError;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// pub struct DealRequest { client: String }
///
/// /// Opens the deal in the CRM.
/// #[saga_step(compensate = delete_deal)]
/// pub async fn create_deal(ctx: &StepContext, input: String) -> Result<u64, CrmError> {
///     Ok(7)
/// }
///
/// async fn delete_deal(ctx: &StepContext, input: String, deal: u64) -> Result<(), CrmError> {
///     Ok(())
/// }
///
/// /// Opens a deal and returns its id.
/// #[saga(name = "deal_flow", version = 2)]
/// pub async fn deal_flow(saga: &mut SagaContext, input: DealRequest) -> Result<u64, SagaError> {
///     let deal = saga.run(CreateDeal, input.client).await?;
///     Ok(deal)
/// }
///
/// assert_eq!((DealFlow::NAME, DealFlow::VERSION), ("deal_flow", 2));
///
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// let engine = Engine::builder(MemoryStore::new()).register(DealFlow).build()?;
/// let request = DealRequest { client: "acme".into() };
/// let outcome = engine.execute::<DealFlow>(&request, StartOptions::key("deal-acme")).await?;
/// assert_eq!(outcome.status, SagaStatus::Completed);
/// assert_eq!(outcome.output::<u64>()?, Some(7));
/// # Ok::<_, saga_core::EngineError>(())
/// # })?;
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// Misuse is reported at the offending tokens, and the fn itself is always emitted: a fn that
/// is not `async`, is generic or takes `self`; parameters other than `&mut SagaContext` and an
/// owned input; a return type other than `Result<Out, SagaError>`; an unknown or repeated
/// option; an empty name; a version that is not an integer from 1 to `u32::MAX`. A context
/// or error of the wrong type is a type mismatch reported at that type in the signature.
#[proc_macro_attribute]
pub fn saga(args: TokenStream, item: TokenStream) -> TokenStream {
    workflow::saga(args.into(), &item.into()).into()
}

/// Implements `saga_core::Classify` for an error enum or struct from `#[classify(...)]`
/// attributes.
///
/// Every enum variant takes exactly one attribute, so that adding a variant forces a decision
/// (the generated `match` has no wildcard arm); a struct takes it on the struct itself:
///
/// | attribute | class |
/// |---|---|
/// | `#[classify(transient)]` | transient, retried under the step's policy. |
/// | `#[classify(transient(retry_after = field))]` | transient, retried no earlier than the field says. `field` is a field name, or an index for a tuple variant; its type is `Option<std::time::Duration>` (`None`: no hint). |
/// | `#[classify(permanent)]` | permanent: the step fails at once. |
/// | `#[classify(delegate)]` | whatever the variant's only field says; that field's type implements `Classify`. |
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use saga_core::{Classify, HttpStatus};
///
/// #[derive(Debug, thiserror::Error, Classify)]
/// pub enum CrmError {
///     #[error("crm is busy")]
///     #[classify(transient)]
///     Busy,
///     #[error("rate limited")]
///     #[classify(transient(retry_after = wait))]
///     RateLimited { wait: Option<Duration> },
///     #[error("crm answered {0}")]
///     #[classify(delegate)]
///     Http(HttpStatus),
///     #[error("deal rejected: {0}")]
///     #[classify(permanent)]
///     Rejected(String),
/// }
///
/// #[derive(Debug, thiserror::Error, Classify)]
/// #[error("invalid deal: {0}")]
/// #[classify(permanent)]
/// pub struct InvalidDeal(pub String);
/// ```
#[proc_macro_derive(Classify, attributes(classify))]
pub fn derive_classify(item: TokenStream) -> TokenStream {
    classify::derive(item.into()).into()
}
