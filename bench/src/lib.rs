//! Shared pieces of the benchmark binaries: the 4-step workload and timing helpers.

use std::time::{Duration, Instant};

use saga_core::{Saga, SagaContext, SagaError, StepContext, saga_step};

/// The error of the benchmark steps (they never fail).
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

/// The shared compensation (never runs in the benchmark).
pub async fn undo(ctx: &StepContext, input: u64, output: u64) -> Result<(), BenchError> {
    let _ = (ctx, input, output);
    Ok(())
}

/// The 4-step saga.
#[derive(Clone, Copy, Debug, Default)]
pub struct FourSteps;

#[saga_core::async_trait]
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
