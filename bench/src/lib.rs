//! Shared pieces of the benchmark binaries: the 4-step workloads (one that always succeeds,
//! one that fails at step 3 on request), timing helpers, `INFO` parsing and the store's raw
//! commit ceiling.

pub mod redis_info;

use std::time::{Duration, Instant};

use saga_core::{Saga, SagaContext, SagaError, StepContext, saga_step};

/// The error type of the benchmarks' fallible helpers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error of the benchmark steps (only [`step_three_may_fail`] returns it, on request).
#[derive(Debug, thiserror::Error, saga_core::Classify)]
#[error("benchmark step failed")]
#[classify(permanent)]
pub struct BenchError;

/// Step 1: a trivial computation.
#[saga_step(compensate = undo, timeout = "none", retry(max_attempts = 3))]
pub async fn step_one(ctx: &StepContext, value: u64) -> Result<u64, BenchError> {
    let _ = ctx;
    Ok(std::hint::black_box(value) + 1)
}

/// Step 2.
#[saga_step(compensate = undo, timeout = "none", retry(max_attempts = 3))]
pub async fn step_two(ctx: &StepContext, value: u64) -> Result<u64, BenchError> {
    let _ = ctx;
    Ok(std::hint::black_box(value) * 3)
}

/// Step 3.
#[saga_step(compensate = undo, timeout = "none", retry(max_attempts = 3))]
pub async fn step_three(ctx: &StepContext, value: u64) -> Result<u64, BenchError> {
    let _ = ctx;
    Ok(std::hint::black_box(value) ^ 0x5a5a)
}

/// Step 4.
#[saga_step(pivot, timeout = "none", retry(max_attempts = 3))]
pub async fn step_four(ctx: &StepContext, value: u64) -> Result<u64, BenchError> {
    let _ = ctx;
    Ok(std::hint::black_box(value).rotate_left(7))
}

/// The shared compensation (runs only for [`FourStepsMayFail`] sagas told to fail).
pub async fn undo(ctx: &StepContext, input: u64, output: u64) -> Result<(), BenchError> {
    let _ = (ctx, input, output);
    Ok(())
}

/// The 4-step saga.
#[derive(Clone, Copy, Debug, Default)]
pub struct FourSteps;

impl Saga for FourSteps {
    type Input = u64;
    type Output = u64;
    const NAME: &'static str = "four_steps";

    async fn run(&self, saga: &mut SagaContext, input: u64) -> Result<u64, SagaError> {
        let a = saga.run(StepOne, input).await?;
        let b = saga.run(StepTwo, a).await?;
        let c = saga.run(StepThree, b).await?;
        saga.run(StepFour, c).await
    }
}

/// Set in the input of [`FourStepsMayFail`] to make its third step fail permanently (so that
/// steps 2 and 1 compensate). A low bit would change what the steps compute; bit 40 stays
/// clear of the counters the benchmarks use and within the integers JSON clients keep exact.
pub const FAIL_AT_STEP_THREE: u64 = 1 << 40;

/// Step 3 of [`FourStepsMayFail`]: the same computation as [`step_three`], or a permanent
/// failure when the saga's input asked for one.
#[saga_step(compensate = undo_three, timeout = "none", retry(max_attempts = 3))]
pub async fn step_three_may_fail(ctx: &StepContext, input: (u64, bool)) -> Result<u64, BenchError> {
    let _ = ctx;
    let (value, fail) = input;
    if fail {
        return Err(BenchError);
    }
    Ok(std::hint::black_box(value) ^ 0x5a5a)
}

/// The 4-step saga of the service benchmark: like [`FourSteps`], except that an input with
/// [`FAIL_AT_STEP_THREE`] set fails permanently at step 3 and compensates steps 2 and 1. The
/// marker is taken off before step 1, so the steps see the same values as in [`FourSteps`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FourStepsMayFail;

impl Saga for FourStepsMayFail {
    type Input = u64;
    type Output = u64;
    const NAME: &'static str = "four_steps_may_fail";

    async fn run(&self, saga: &mut SagaContext, input: u64) -> Result<u64, SagaError> {
        let fail = input & FAIL_AT_STEP_THREE != 0;
        let a = saga.run(StepOne, input & !FAIL_AT_STEP_THREE).await?;
        let b = saga.run(StepTwo, a).await?;
        let c = saga.run(StepThreeMayFail, (b, fail)).await?;
        saga.run(StepFour, c).await
    }
}

/// The compensation of [`step_three_may_fail`] (runs only when a later step fails, which
/// never happens: step 4 is the pivot).
pub async fn undo_three(
    ctx: &StepContext,
    input: (u64, bool),
    output: u64,
) -> Result<(), BenchError> {
    let _ = (ctx, input, output);
    Ok(())
}

/// Latency percentiles of a sample, in microseconds.
#[must_use]
pub fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let index = ((samples.len() - 1) as f64 * q).round() as usize;
        samples[index].as_secs_f64() * 1e6
    };
    (at(0.50), at(0.99))
}

/// Times `f` and returns the elapsed time.
pub async fn timed<F: std::future::Future<Output = ()>>(f: F) -> Duration {
    let started = Instant::now();
    f.await;
    started.elapsed()
}
