//! The scripted step type and the workflow that runs a plan of them.

use saga_core::{
    Classify, Compensation, ErrorClass, Jitter, MissingResource, Phase, Reconciled, RetryPolicy,
    Saga, SagaContext, SagaError, Step, StepContext,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::{Behavior, Call, Effect, Ledger, Script};

/// Step names by index: `Scripted<I>` is called `NAMES[I]`.
pub const NAMES: [&str; 6] = ["step_a", "step_b", "step_c", "step_d", "step_e", "step_f"];

/// `Scripted<_, NONE>` declares [`Compensation::None`].
pub const NONE: u8 = 0;
/// `Scripted<_, ON_SUCCESS>` declares [`Compensation::OnSuccess`] (the default).
pub const ON_SUCCESS: u8 = 1;
/// `Scripted<_, ALWAYS>` declares [`Compensation::Always`].
pub const ALWAYS: u8 = 2;
/// `Scripted<_, PIVOT>` declares [`Compensation::Pivot`].
pub const PIVOT: u8 = 3;

/// The compensation mode a `Scripted<_, C>` declares.
#[must_use]
pub const fn compensation_mode(c: u8) -> Compensation {
    match c {
        NONE => Compensation::None,
        ALWAYS => Compensation::Always,
        PIVOT => Compensation::Pivot,
        _ => Compensation::OnSuccess,
    }
}

/// A scripted step's output: which step, with what input, under which key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutput {
    /// The step's name.
    pub step: String,
    /// Its input.
    pub input: u32,
    /// The forward idempotency key it ran under.
    pub key: String,
}

/// A scripted step's error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    /// Transient, no hint.
    #[error("service unavailable (scripted)")]
    Unavailable,
    /// Transient, with a retry-after hint.
    #[error("rate limited, retry after {0:?} (scripted)")]
    RateLimited(Duration),
    /// Permanent.
    #[error("rejected (scripted)")]
    Rejected,
    /// The script or ledger resource is not registered (permanent).
    #[error(transparent)]
    Missing(#[from] MissingResource),
}

impl Classify for ScriptError {
    fn classify(&self) -> ErrorClass {
        match self {
            ScriptError::Unavailable => ErrorClass::TRANSIENT,
            ScriptError::RateLimited(after) => ErrorClass::retry_after(*after),
            ScriptError::Rejected | ScriptError::Missing(_) => ErrorClass::Permanent,
        }
    }
}

/// A fast retry policy for tests: `max_attempts` attempts, 10 ms doubling up to 100 ms, no
/// jitter (so delays are predictable).
#[must_use]
pub fn fast_policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .with_max_attempts(max_attempts)
        .with_initial_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_millis(100))
        .with_jitter(Jitter::None)
}

/// How one step of a [`Plan`] is declared.
#[derive(Clone, Debug, PartialEq)]
pub struct StepSpec {
    /// Which `Scripted<I>` runs (index into [`NAMES`]).
    pub step: usize,
    /// Its compensation mode.
    pub compensation: Compensation,
    /// Forward retry policy.
    pub policy: RetryPolicy,
    /// Compensation retry policy.
    pub compensation_policy: RetryPolicy,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
}

impl StepSpec {
    /// Step `step`, compensated on success, 3 fast attempts each way, 1 s timeout.
    #[must_use]
    pub fn new(step: usize) -> Self {
        Self {
            step,
            compensation: Compensation::OnSuccess,
            policy: fast_policy(3),
            compensation_policy: fast_policy(3),
            timeout: Some(Duration::from_secs(1)),
        }
    }
}

/// The steps a [`PlanSaga`] runs, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The steps.
    pub steps: Vec<StepSpec>,
}

impl Plan {
    /// Steps `0..n` with [`StepSpec::new`] defaults.
    #[must_use]
    pub fn linear(n: usize) -> Self {
        Self::of(0..n)
    }

    /// The given step indices, in order, with [`StepSpec::new`] defaults.
    #[must_use]
    pub fn of(steps: impl IntoIterator<Item = usize>) -> Self {
        Self {
            steps: steps.into_iter().map(StepSpec::new).collect(),
        }
    }

    /// Changes the spec at `position`.
    #[must_use]
    pub fn with(mut self, position: usize, change: impl FnOnce(&mut StepSpec)) -> Self {
        change(&mut self.steps[position]);
        self
    }

    /// Changes every spec.
    #[must_use]
    pub fn with_all(mut self, mut change: impl FnMut(&mut StepSpec)) -> Self {
        self.steps.iter_mut().for_each(&mut change);
        self
    }
}

/// The workflow that runs a [`Plan`]: step `p` gets input `seed + p`, and the output is every
/// step's output in order. Registered under the name `scripted`.
#[derive(Clone, Debug)]
pub struct PlanSaga {
    /// What it runs.
    pub plan: Plan,
}

impl Saga for PlanSaga {
    type Input = u32;
    type Output = Vec<StepOutput>;
    const NAME: &'static str = "scripted";

    async fn run(&self, saga: &mut SagaContext, seed: u32) -> Result<Vec<StepOutput>, SagaError> {
        let mut outputs = Vec::with_capacity(self.plan.steps.len());
        for (position, spec) in self.plan.steps.iter().enumerate() {
            let input = seed + u32::try_from(position).unwrap_or(u32::MAX);
            outputs.push(run_spec(saga, spec, input).await?);
        }
        Ok(outputs)
    }
}

/// Runs the step `spec` describes (its `Scripted<I, C>` type is chosen at run time).
///
/// # Errors
/// What [`SagaContext::run`] returns; [`SagaError::Aborted`] for an index past [`NAMES`].
pub async fn run_spec(
    saga: &mut SagaContext,
    spec: &StepSpec,
    input: u32,
) -> Result<StepOutput, SagaError> {
    macro_rules! dispatch {
        ($($i:literal),*) => {
            match (spec.step, spec.compensation) {
                $(
                    ($i, Compensation::None) => saga.run(Scripted::<$i, NONE>::new(spec), input).await,
                    ($i, Compensation::Always) => saga.run(Scripted::<$i, ALWAYS>::new(spec), input).await,
                    ($i, Compensation::Pivot) => saga.run(Scripted::<$i, PIVOT>::new(spec), input).await,
                    ($i, _) => saga.run(Scripted::<$i, ON_SUCCESS>::new(spec), input).await,
                )*
                (other, _) => Err(SagaError::abort(format!("no scripted step with index {other}"))),
            }
        };
    }
    dispatch!(0, 1, 2, 3, 4, 5)
}

/// A step whose every invocation follows the [`Script`] resource and is recorded in the
/// [`Ledger`] resource. `I` picks its name from [`NAMES`]; `C` its compensation mode
/// ([`NONE`], [`ON_SUCCESS`], [`ALWAYS`], [`PIVOT`]).
#[derive(Clone, Debug)]
pub struct Scripted<const I: usize, const C: u8 = ON_SUCCESS> {
    policy: RetryPolicy,
    compensation_policy: RetryPolicy,
    timeout: Option<Duration>,
}

impl<const I: usize, const C: u8> Scripted<I, C> {
    /// The step as `spec` declares it (its `step` and `compensation` fields are the type's).
    #[must_use]
    pub fn new(spec: &StepSpec) -> Self {
        Self {
            policy: spec.policy.clone(),
            compensation_policy: spec.compensation_policy.clone(),
            timeout: spec.timeout,
        }
    }
}

impl<const I: usize, const C: u8> Default for Scripted<I, C> {
    fn default() -> Self {
        Self::new(&StepSpec::new(I))
    }
}

/// Runs one scripted invocation: looks its behaviour up, records the call, and applies the
/// effect when the behaviour says so.
async fn act(
    ctx: &StepContext,
    step: usize,
    phase: Phase,
    input: u32,
    had_output: Option<bool>,
) -> Result<StepOutput, ScriptError> {
    let script = ctx.resource::<Script>()?;
    let ledger = ctx.resource::<Ledger>()?;
    let invocation = ledger.invocations(ctx.saga_id(), step, phase);
    let deduplicated = script.dedupes() && ledger.effect_count(phase, ctx.idempotency_key()) > 0;
    let behavior = script.behavior(step, phase, invocation);
    ledger.record_call(Call {
        saga: ctx.saga_id(),
        step,
        position: ctx.position(),
        phase,
        key: ctx.idempotency_key().to_owned(),
        attempt: ctx.attempt(),
        invocation,
        behavior: if deduplicated {
            "deduplicated"
        } else {
            behavior.name()
        },
        had_output,
        at: tokio::time::Instant::now(),
    });
    let output = StepOutput {
        step: ctx.step_name().to_owned(),
        input,
        key: ctx.idempotency_key().to_owned(),
    };
    let apply = || {
        ledger.apply(Effect {
            saga: ctx.saga_id(),
            step,
            phase,
            key: ctx.idempotency_key().to_owned(),
            attempt: ctx.attempt(),
            output: (phase == Phase::Forward).then(|| output.clone()),
        });
    };
    if deduplicated {
        return Ok(output);
    }
    match behavior {
        Behavior::Ok => {
            apply();
            Ok(output)
        }
        Behavior::Transient => Err(ScriptError::Unavailable),
        Behavior::RetryAfter(after) => Err(ScriptError::RateLimited(after)),
        Behavior::Permanent => Err(ScriptError::Rejected),
        Behavior::Timeout => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            apply();
            Ok(output)
        }
        Behavior::ApplyThenHang(gate) => {
            apply();
            gate.entered.notify_one();
            std::future::pending().await
        }
        Behavior::WaitThenOk(gate) => {
            gate.entered.notify_one();
            gate.release.notified().await;
            apply();
            Ok(output)
        }
    }
}

impl<const I: usize, const C: u8> Step for Scripted<I, C> {
    type Input = u32;
    type Output = StepOutput;
    type Error = ScriptError;
    const NAME: &'static str = NAMES[I];
    const COMPENSATION: Compensation = compensation_mode(C);

    async fn forward(&self, ctx: &StepContext, input: u32) -> Result<StepOutput, ScriptError> {
        act(ctx, I, Phase::Forward, input, None).await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        input: u32,
        output: Option<StepOutput>,
    ) -> Result<(), ScriptError> {
        act(ctx, I, Phase::Compensate, input, Some(output.is_some()))
            .await
            .map(drop)
    }

    async fn reconcile(
        &self,
        ctx: &StepContext,
        _input: &u32,
    ) -> Result<Reconciled<StepOutput>, ScriptError> {
        let script = ctx.resource::<Script>()?;
        let ledger = ctx.resource::<Ledger>()?;
        ledger.record_reconcile(ctx.saga_id(), I, ctx.idempotency_key().to_owned());
        if !script.reconciles(I) {
            return Ok(Reconciled::Unknown);
        }
        Ok(match ledger.forward_output(ctx.idempotency_key()) {
            Some(output) => Reconciled::Applied(output),
            None => Reconciled::NotApplied,
        })
    }

    fn retry_policy(&self) -> RetryPolicy {
        self.policy.clone()
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        self.compensation_policy.clone()
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }
}
