//! The attempt loop shared by forward steps and compensations.
//!
//! One loop decides what happens after an attempt fails: the phase's retry policy is asked
//! (with the time spent since the first attempt), the attempt is logged and counted, the
//! failure is committed, and the next attempt either waits in process (a close retry) or
//! becomes a durable timer (a far one, so the saga holds neither a lease nor a worker while it
//! waits). What differs between the phases (how an attempt runs and settles, which event
//! records a failed attempt, which policy and key apply, what giving up means) is an
//! [`AttemptPhase`]: `context.rs` implements it for forward steps, `compensate.rs` for undos.

use super::context::{AttemptLog, Halt, SagaContext};
use crate::store::Schedule;
use crate::{
    EventKind, GiveUpReason, Phase, RetryDecision, RetryPolicy, StepError, Timestamp,
    step_idempotency_key,
};

/// How one attempt ended, as far as the loop is concerned.
pub(crate) enum Tried<T> {
    /// The step is settled (it succeeded, was skipped, or was found applied): the loop ends.
    Settled(T),
    /// The attempt failed; `seconds` is how long it took, for the duration metric.
    Failed { error: StepError, seconds: f64 },
}

/// The attempt being made.
pub(crate) struct Current {
    /// Its number (1 for the first; a re-run of an interrupted attempt keeps its number).
    pub(crate) number: u32,
    /// The idempotency key of the step in this phase (the same for every attempt).
    pub(crate) key: String,
    /// The span the attempt runs in.
    pub(crate) span: tracing::Span,
}

/// A failed attempt, as its `StepAttemptFailed` / `CompensationAttemptFailed` records it.
pub(crate) struct FailedAttempt {
    pub(crate) attempt: u32,
    pub(crate) error: StepError,
    /// The wait before the next attempt (zero when the policy gave up).
    pub(crate) backoff_seconds: f64,
    /// When the next attempt is due (when the policy gave up: the time it did).
    pub(crate) next_retry_at: Timestamp,
}

/// What a phase (forward or compensation) brings to the shared attempt loop.
pub(crate) trait AttemptPhase {
    /// What the loop returns once the step is settled or given up.
    type Output;
    /// The phase the idempotency key is derived for.
    const PHASE: Phase;

    /// The step's name.
    fn step(&self) -> &'static str;
    /// The step's journal position.
    fn position(&self) -> u32;
    /// The retry policy that judges this phase's failures.
    fn policy(&self) -> RetryPolicy;
    /// The span an attempt runs in (and its log lines are written in).
    fn span(&self, attempt: u32, key: &str) -> tracing::Span;
    /// When the policy's elapsed-time budget started counting.
    fn budget_start(&self, ctx: &SagaContext, now: Timestamp) -> Timestamp;
    /// Runs the `current` attempt; a `Halt` stops the saga's run at once.
    async fn attempt(
        &mut self,
        ctx: &mut SagaContext,
        current: &Current,
    ) -> Result<Tried<Self::Output>, Halt>;
    /// The event that records a failed attempt.
    fn attempt_failed(&self, failed: FailedAttempt) -> EventKind;
    /// Called before the run suspends on a durable timer for the next attempt.
    fn suspending(&mut self, _ctx: &mut SagaContext) {}
    /// The policy gave up, for `reason`, after the `last` attempt failed.
    async fn give_up(
        &mut self,
        ctx: &mut SagaContext,
        last: FailedAttempt,
        reason: GiveUpReason,
    ) -> Result<Self::Output, Halt>;
}

/// Runs `phase`'s attempts from `first_attempt` until the step is settled, given up, or the
/// run halts (a durable timer, a cancel, a lost lease...).
pub(crate) async fn run_attempts<P: AttemptPhase>(
    ctx: &mut SagaContext,
    phase: &mut P,
    first_attempt: u32,
) -> Result<P::Output, Halt> {
    let policy = phase.policy();
    let (step, position) = (phase.step(), phase.position());
    let ttl = ctx.shared().config.lease_ttl;
    let mut attempt = first_attempt;
    loop {
        let key = step_idempotency_key(ctx.state().id, position, step, P::PHASE);
        let span = phase.span(attempt, &key);
        let current = Current {
            number: attempt,
            key,
            span,
        };
        let (error, seconds) = match phase.attempt(ctx, &current).await? {
            Tried::Settled(output) => return Ok(output),
            Tried::Failed { error, seconds } => (error, seconds),
        };
        let Current { key, span, .. } = current;
        // The attempt's log line and metrics, once its fate is decided.
        let observe = |ctx: &SagaContext, log: &AttemptLog<'_>| {
            let state = ctx.state();
            let shared = ctx.shared();
            shared.observe_attempt(&span, state, position, step, &key, attempt, seconds, log);
        };
        let now = ctx.shared().clock.now();
        let elapsed = now.since(phase.budget_start(ctx, now));
        match policy.decide(attempt, error.class, elapsed, ctx.rng()) {
            RetryDecision::RetryAfter(delay) => {
                let next_retry_at = now.plus(delay);
                let log = AttemptLog::Retry {
                    error: &error,
                    delay,
                    next_retry_at,
                };
                observe(ctx, &log);
                let inline = delay <= ctx.shared().config.inline_wait_max;
                let schedule = if inline {
                    Schedule::Continue { ttl }
                } else {
                    Schedule::WakeAfter(delay)
                };
                let failed = phase.attempt_failed(FailedAttempt {
                    attempt,
                    error,
                    backoff_seconds: delay.as_secs_f64(),
                    next_retry_at,
                });
                ctx.commit(vec![failed], schedule).await?;
                if !inline {
                    phase.suspending(ctx);
                    return Err(Halt::Suspended(next_retry_at));
                }
                backoff(ctx, P::PHASE, delay).await;
                attempt += 1;
            }
            RetryDecision::GiveUp(reason) => {
                let log = AttemptLog::Failed {
                    error: &error,
                    reason,
                };
                observe(ctx, &log);
                let last = FailedAttempt {
                    attempt,
                    error,
                    backoff_seconds: 0.0,
                    next_retry_at: now,
                };
                return phase.give_up(ctx, last, reason).await;
            }
        }
    }
}

/// Waits for a recorded retry time before the next attempt: in process when it is close, as a
/// durable timer otherwise (the run then halts `Suspended` and the saga is due again at `at`).
pub(crate) async fn wait_for_retry(ctx: &mut SagaContext, at: Timestamp) -> Result<(), Halt> {
    let remaining = at.since(ctx.shared().clock.now());
    if remaining.is_zero() {
        return Ok(());
    }
    if remaining <= ctx.shared().config.inline_wait_max {
        let phase = if ctx.state().status == crate::SagaStatus::Compensating {
            Phase::Compensate
        } else {
            Phase::Forward
        };
        backoff(ctx, phase, remaining).await;
        return Ok(());
    }
    ctx.commit(Vec::new(), Schedule::WakeAfter(remaining))
        .await?;
    Err(Halt::Suspended(at))
}

/// Sleeps through an in-process backoff. A forward step's wait ends early when the saga is
/// cancelled through this engine: the next attempt's start then sees the flag and the saga
/// compensates at once. A compensation's wait, or one past the pivot, is never cut short (a
/// cancel changes nothing for them).
async fn backoff(ctx: &mut SagaContext, phase: Phase, delay: std::time::Duration) {
    // Past the pivot a cancel changes nothing either: the wait runs its course.
    if phase != Phase::Forward || ctx.state().past_pivot.is_some() {
        tokio::time::sleep(delay).await;
        return;
    }
    let id = ctx.state().id;
    if ctx.shared().sleep_unless_cancelled(id, delay, false).await {
        ctx.state_mut().cancel_requested = true;
    }
}
