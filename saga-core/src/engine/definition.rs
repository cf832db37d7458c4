//! Saga types: a workflow function with a name and a version, and the type-erased forms the
//! engine keeps in its registry.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::context::Halt;
use super::{SagaContext, SagaError};
use crate::{Classify, Compensation, Reconciled, RetryPolicy, Step, StepContext, StepError};

/// A saga type: a workflow that calls steps in order through its [`SagaContext`].
///
/// The workflow is re-executed on every resume, with completed steps replayed from the
/// journal, so it must be deterministic given its step results: take time and randomness from
/// [`SagaContext::now`] and [`SagaContext::uuid`], and make every side effect a step.
pub trait Saga: Send + Sync + 'static {
    /// The workflow input, stored with the saga.
    type Input: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The workflow output, stored when the saga completes.
    type Output: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Registered type name, stored with every saga of this type.
    const NAME: &'static str;
    /// Version of the workflow code, stored with every saga started under it (and part of the
    /// idempotency fingerprint). A saga is only ever run by the registered type of its own
    /// (name, version): when a change would make running sagas diverge from their journals
    /// (steps added, removed, reordered or renamed before the end, a step's input or output
    /// type changed), give the new code a new version and register both until the old
    /// sagas have drained (`saga_active_sagas{version}`, `saga stats`). A saga whose
    /// version no coordinator registers is quarantined, not failed, and resumes after
    /// `saga retry` once its version is deployed again.
    const VERSION: u32 = 1;

    /// The signals the workflow waits for, with their payload types
    /// (`&[SignalSpec::of::<Approval>("committee_approval")]`). When the list is not empty, a
    /// signal of another name, or whose payload does not decode, is refused when it is sent
    /// ([`EngineError::InvalidSignal`](crate::EngineError::InvalidSignal), HTTP 422) instead of
    /// being found out by the waiting workflow. Empty (the default): any signal is accepted,
    /// and one the workflow cannot decode is set aside when it waits.
    const SIGNALS: &'static [super::SignalSpec] = &[];

    /// The workflow. Implement it with a plain `async fn`; the future must be `Send`.
    fn run(
        &self,
        saga: &mut SagaContext,
        input: Self::Input,
    ) -> impl Future<Output = Result<Self::Output, SagaError>> + Send;
}

#[async_trait]
pub(crate) trait ErasedSaga: Send + Sync {
    fn name(&self) -> &'static str;
    fn version(&self) -> u32;
    fn signals(&self) -> &'static [super::SignalSpec];
    async fn run_erased(&self, saga: &mut SagaContext, input: Value) -> Result<Value, SagaError>;
    /// Whether `input` decodes as the saga's input type; on failure, the path of the
    /// offending field (`.` for the top level) and serde's message.
    fn check_input(&self, input: &Value) -> Result<(), (String, String)>;
}

pub(crate) struct TypedSaga<S>(pub(crate) S);

#[async_trait]
impl<S: Saga> ErasedSaga for TypedSaga<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn version(&self) -> u32 {
        S::VERSION
    }

    fn signals(&self) -> &'static [super::SignalSpec] {
        S::SIGNALS
    }

    fn check_input(&self, input: &Value) -> Result<(), (String, String)> {
        serde_path_to_error::deserialize::<_, S::Input>(input)
            .map(drop)
            .map_err(|err| (err.path().to_string(), err.into_inner().to_string()))
    }

    async fn run_erased(&self, saga: &mut SagaContext, input: Value) -> Result<Value, SagaError> {
        let input: S::Input = match serde_json::from_value(input) {
            Ok(input) => input,
            Err(err) => {
                let reason = format!(
                    "stored input does not decode as {}::Input: {err}",
                    std::any::type_name::<S>()
                );
                // Bad data, not a business failure: the saga is quarantined rather than
                // compensated (the engine acts on the halt, not on the returned error).
                return Err(saga.stop(Halt::BadData(reason)));
            }
        };
        let output = self.0.run(saga, input).await?;
        serde_json::to_value(output)
            .map_err(|err| SagaError::BadData(format!("workflow output does not encode: {err}")))
    }
}

/// A step as the compensation phase needs it, with its types erased.
#[async_trait]
pub(crate) trait ErasedStep: Send + Sync {
    fn name(&self) -> &'static str;
    fn compensation(&self) -> Compensation;
    fn compensation_policy(&self) -> RetryPolicy;
    fn retry_policy(&self) -> RetryPolicy;
    fn timeout(&self) -> Option<Duration>;
    /// One forward attempt with the input and output encoded (for parallel branches, whose
    /// attempts run apart from the workflow's context).
    async fn forward(&self, ctx: &StepContext, input: &Value) -> Result<Value, StepError>;
    async fn compensate(
        &self,
        ctx: &StepContext,
        input: &Value,
        output: Option<&Value>,
    ) -> Result<(), StepError>;
    async fn reconcile(
        &self,
        ctx: &StepContext,
        input: &Value,
    ) -> Result<Reconciled<Value>, StepError>;
    async fn reconcile_compensation(
        &self,
        ctx: &StepContext,
        input: &Value,
        output: Option<&Value>,
    ) -> Result<Reconciled<()>, StepError>;
}

pub(crate) struct TypedStep<S>(pub(crate) Arc<S>);

pub(crate) fn step_error<E: Classify + std::fmt::Display>(err: &E) -> StepError {
    StepError {
        message: err.to_string(),
        class: err.classify(),
        timeout: false,
    }
}

fn decode_error(what: &str, step: &str, err: &serde_json::Error) -> StepError {
    StepError {
        message: format!("recorded {what} of step `{step}` does not decode: {err}"),
        class: crate::ErrorClass::Permanent,
        timeout: false,
    }
}

/// A step's recorded input and output, decoded as its types for its compensation.
fn decode_recorded<S: Step>(
    input: &Value,
    output: Option<&Value>,
) -> Result<(S::Input, Option<S::Output>), StepError> {
    let input: S::Input = serde_json::from_value(input.clone())
        .map_err(|err| decode_error("input", S::NAME, &err))?;
    let output: Option<S::Output> = match output {
        Some(value) => Some(
            serde_json::from_value(value.clone())
                .map_err(|err| decode_error("output", S::NAME, &err))?,
        ),
        None => None,
    };
    Ok((input, output))
}

#[async_trait]
impl<S: Step> ErasedStep for TypedStep<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn compensation(&self) -> Compensation {
        S::COMPENSATION
    }

    fn compensation_policy(&self) -> RetryPolicy {
        self.0.compensation_retry_policy()
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.0.retry_policy()
    }

    async fn forward(&self, ctx: &StepContext, input: &Value) -> Result<Value, StepError> {
        let input: S::Input = serde_json::from_value(input.clone())
            .map_err(|err| decode_error("input", S::NAME, &err))?;
        let output = self
            .0
            .forward(ctx, input)
            .await
            .map_err(|err| step_error(&err))?;
        serde_json::to_value(output).map_err(|err| StepError {
            message: format!("output of step `{}` does not encode: {err}", S::NAME),
            class: crate::ErrorClass::Permanent,
            timeout: false,
        })
    }

    fn timeout(&self) -> Option<Duration> {
        self.0.timeout()
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        input: &Value,
        output: Option<&Value>,
    ) -> Result<(), StepError> {
        let (input, output) = decode_recorded::<S>(input, output)?;
        self.0
            .compensate(ctx, input, output)
            .await
            .map_err(|err| step_error(&err))
    }

    async fn reconcile_compensation(
        &self,
        ctx: &StepContext,
        input: &Value,
        output: Option<&Value>,
    ) -> Result<Reconciled<()>, StepError> {
        let (input, output) = decode_recorded::<S>(input, output)?;
        self.0
            .reconcile_compensation(ctx, &input, output.as_ref())
            .await
            .map_err(|err| step_error(&err))
    }

    async fn reconcile(
        &self,
        ctx: &StepContext,
        input: &Value,
    ) -> Result<Reconciled<Value>, StepError> {
        let input: S::Input = serde_json::from_value(input.clone())
            .map_err(|err| decode_error("input", S::NAME, &err))?;
        match self
            .0
            .reconcile(ctx, &input)
            .await
            .map_err(|err| step_error(&err))?
        {
            Reconciled::Applied(output) => serde_json::to_value(output)
                .map(Reconciled::Applied)
                .map_err(|err| decode_error("output", S::NAME, &err)),
            Reconciled::NotApplied => Ok(Reconciled::NotApplied),
            Reconciled::Unknown => Ok(Reconciled::Unknown),
        }
    }
}
