//! Retry policies: how many attempts, and how long to wait between them.
//!
//! The schedule is capped exponential backoff (built with the `backon` crate) with a choice of
//! jitter. The delay is computed from the attempt number that the engine stores with the step,
//! so a coordinator that crashes and resumes a saga continues the schedule where it stopped
//! instead of starting it again.
//!
//! ```
//! use std::time::Duration;
//! use saga_core::{Jitter, RetryPolicy};
//!
//! let policy = RetryPolicy::default()
//!     .with_max_attempts(5)
//!     .with_initial_delay(Duration::from_millis(200))
//!     .with_max_delay(Duration::from_secs(5))
//!     .with_jitter(Jitter::None);
//! assert_eq!(policy.base_delay(1), Duration::from_millis(200)); // after the first failure
//! assert_eq!(policy.base_delay(2), Duration::from_millis(400));
//! assert_eq!(policy.base_delay(9), Duration::from_secs(5)); // capped
//! ```

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::{Deserialize, Serialize};

/// How long client calls retry transient store errors by default
/// ([`RetryPolicy::client_default`]).
pub const DEFAULT_CLIENT_RETRY_FOR: Duration = Duration::from_secs(30);

/// How a delay is randomised so that many sagas failing together do not retry together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Jitter {
    /// A uniformly random delay between zero and the computed delay (AWS "full jitter").
    #[default]
    Full,
    /// Half the computed delay plus a random amount up to the other half.
    Equal,
    /// The computed delay exactly.
    None,
}

/// A retry policy with a validated configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    max_attempts: u32,
    #[serde(with = "crate::serde_duration::millis")]
    initial_delay: Duration,
    multiplier: f32,
    #[serde(with = "crate::serde_duration::millis")]
    max_delay: Duration,
    jitter: Jitter,
    #[serde(default, with = "crate::serde_duration::option")]
    max_elapsed: Option<Duration>,
}

/// A retry policy value that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RetryPolicyError {
    /// Zero attempts would never run the step.
    #[error("max_attempts must be at least 1 (1 means no retry)")]
    ZeroAttempts,
    /// A multiplier below 1 would shrink the delays, and NaN or infinity cannot be computed.
    #[error("multiplier must be a finite number >= 1.0, got {0}")]
    BadMultiplier(f32),
    /// The cap is below the first delay.
    #[error("max_delay ({max:?}) must not be below initial_delay ({initial:?})")]
    CapBelowInitial {
        /// The first delay.
        initial: Duration,
        /// The cap.
        max: Duration,
    },
}

impl Default for RetryPolicy {
    /// 3 attempts, 100 ms doubling up to 10 s, full jitter, no elapsed-time limit.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: Jitter::Full,
            max_elapsed: None,
        }
    }
}

impl RetryPolicy {
    /// The default policy of compensations, which must eventually succeed: 10 attempts,
    /// 100 ms doubling up to 30 s, full jitter.
    #[must_use]
    pub fn compensation_default() -> Self {
        Self::default()
            .with_max_attempts(10)
            .with_max_delay(Duration::from_secs(30))
    }

    /// The default policy of client calls that meet a transient store error (a start, a
    /// wait, the operator CLI; see `Engine::start` and `ClientRetry`): retried for up to
    /// [`DEFAULT_CLIENT_RETRY_FOR`] (30 s, long enough for a Redis restart or a
    /// `CLIENT PAUSE` of 10 s), 50 ms doubling up to 2 s, full jitter, no attempt limit.
    #[must_use]
    pub fn client_default() -> Self {
        Self::default()
            .with_max_attempts(u32::MAX)
            .with_initial_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_max_elapsed(DEFAULT_CLIENT_RETRY_FOR)
    }

    /// A policy that tries once and never retries.
    #[must_use]
    pub fn no_retry() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Builds a policy from every setting at once, checking that they make sense.
    ///
    /// # Errors
    /// [`RetryPolicyError`] when a value cannot work.
    pub fn new(
        max_attempts: u32,
        initial_delay: Duration,
        multiplier: f32,
        max_delay: Duration,
        jitter: Jitter,
        max_elapsed: Option<Duration>,
    ) -> Result<Self, RetryPolicyError> {
        if max_attempts == 0 {
            return Err(RetryPolicyError::ZeroAttempts);
        }
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(RetryPolicyError::BadMultiplier(multiplier));
        }
        if max_delay < initial_delay {
            return Err(RetryPolicyError::CapBelowInitial {
                initial: initial_delay,
                max: max_delay,
            });
        }
        Ok(Self {
            max_attempts,
            initial_delay,
            multiplier,
            max_delay,
            jitter,
            max_elapsed,
        })
    }

    /// Total attempts, the first one included (at least 1).
    #[must_use]
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The delay after the first failure.
    #[must_use]
    pub fn with_initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self.max_delay = self.max_delay.max(delay);
        self
    }

    /// The growth factor between delays (values below 1 or not finite are treated as 1).
    #[must_use]
    pub fn with_multiplier(mut self, multiplier: f32) -> Self {
        self.multiplier = if multiplier.is_finite() {
            multiplier.max(1.0)
        } else {
            1.0
        };
        self
    }

    /// The cap on any single delay (never below the initial delay).
    #[must_use]
    pub fn with_max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay.max(self.initial_delay);
        self
    }

    /// The jitter mode.
    #[must_use]
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Stop retrying once this much time has passed since the first attempt started.
    #[must_use]
    pub fn with_max_elapsed(mut self, limit: Duration) -> Self {
        self.max_elapsed = Some(limit);
        self
    }

    /// Total attempts allowed.
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay after the first failure.
    #[must_use]
    pub fn initial_delay(&self) -> Duration {
        self.initial_delay
    }

    /// The growth factor between delays.
    #[must_use]
    pub fn multiplier(&self) -> f32 {
        self.multiplier
    }

    /// The cap on any single delay.
    #[must_use]
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// The jitter mode.
    #[must_use]
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The elapsed-time limit, if any.
    #[must_use]
    pub fn max_elapsed(&self) -> Option<Duration> {
        self.max_elapsed
    }

    /// The delay before retry after `failed_attempt` failed (1-based), without jitter.
    #[must_use]
    pub fn base_delay(&self, failed_attempt: u32) -> Duration {
        let index = usize::try_from(failed_attempt.max(1) - 1).unwrap_or(usize::MAX);
        let delay = ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_factor(self.multiplier)
            .with_max_delay(self.max_delay)
            .without_max_times()
            .build()
            .nth(index)
            // The builder is unbounded (`without_max_times`), so the schedule never ends; the
            // cap is the right answer should that ever change.
            .unwrap_or(self.max_delay);
        // backon multiplies in f32; whole milliseconds (the unit every record stores) hide
        // the rounding noise (400.000006 ms).
        // A float-to-int `as` cast saturates, so no overflow is possible.
        Duration::from_millis((delay.as_secs_f64() * 1000.0).round() as u64).min(self.max_delay)
    }

    /// The delay before retry after `failed_attempt` failed, with this policy's jitter drawn
    /// from `rng`.
    #[must_use]
    pub fn delay(&self, failed_attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        let base = self.base_delay(failed_attempt);
        let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
        match self.jitter {
            Jitter::None => base,
            Jitter::Full => Duration::from_millis(rng.u64(0..=base_ms)),
            Jitter::Equal => {
                let half = base_ms / 2;
                Duration::from_millis(half + rng.u64(0..=base_ms - half))
            }
        }
    }

    /// The longest time this policy keeps one step's attempts going, from the start of the
    /// first attempt to the end of the last, when each attempt is bounded by `timeout`: every
    /// attempt running for its whole timeout, with the longest delay the schedule allows
    /// between them (jitter only shortens delays). With a `max_elapsed` limit it is at most
    /// that limit plus one attempt. `None` when an attempt has no timeout (it could run for
    /// ever). A retry-after hint from a server replaces the computed delay and is not
    /// counted here: a hint longer than the schedule's delay extends the span.
    ///
    /// ```
    /// use std::time::Duration;
    /// use saga_core::{Jitter, RetryPolicy};
    ///
    /// let policy = RetryPolicy::default()
    ///     .with_max_attempts(3)
    ///     .with_initial_delay(Duration::from_secs(1))
    ///     .with_max_delay(Duration::from_secs(10))
    ///     .with_jitter(Jitter::Full);
    /// // 3 attempts of at most 5 s, and at most 1 s then 2 s between them.
    /// assert_eq!(policy.schedule_span(Some(Duration::from_secs(5))), Some(Duration::from_secs(18)));
    /// assert_eq!(policy.schedule_span(None), None);
    /// ```
    #[must_use]
    pub fn schedule_span(&self, timeout: Option<Duration>) -> Option<Duration> {
        let timeout = timeout?;
        // Sum the growing delays until they stop growing (the cap, or a multiplier of 1);
        // every later delay is at most the last one, so the rest is counted at once. Each
        // step is one multiplication (`base_delay` would walk the schedule from the start),
        // and the walk is bounded, so any policy costs at most `MAX_WALK` steps.
        const MAX_WALK: u32 = 100_000;
        let cap_ms = self.max_delay.as_secs_f64() * 1000.0;
        let mut next_ms = self.initial_delay.as_secs_f64() * 1000.0;
        let mut delays = Duration::ZERO;
        let mut failed = 1;
        while failed < self.max_attempts {
            // Rounded up to whole milliseconds, so that the sum never undercounts
            // `base_delay`'s rounding. A float-to-int `as` cast saturates.
            let delay = Duration::from_millis(next_ms.min(cap_ms).ceil() as u64);
            let grown = next_ms * f64::from(self.multiplier);
            if next_ms >= cap_ms || grown <= next_ms || failed >= MAX_WALK {
                // The cap is the most any later delay can be.
                let rest_delay = if failed >= MAX_WALK {
                    self.max_delay
                } else {
                    delay
                };
                let rest = self.max_attempts - failed;
                delays = delays.saturating_add(rest_delay.saturating_mul(rest));
                break;
            }
            delays = delays.saturating_add(delay);
            next_ms = grown;
            failed += 1;
        }
        let attempts = timeout.saturating_mul(self.max_attempts);
        let span = delays.saturating_add(attempts);
        Some(match self.max_elapsed {
            Some(limit) => span.min(limit.saturating_add(timeout)),
            None => span,
        })
    }

    /// What to do after attempt `failed_attempt` failed with `class`, `elapsed` after the
    /// first attempt started.
    #[must_use]
    pub fn decide(
        &self,
        failed_attempt: u32,
        class: crate::ErrorClass,
        elapsed: Duration,
        rng: &mut fastrand::Rng,
    ) -> RetryDecision {
        if !class.is_transient() {
            return RetryDecision::GiveUp(GiveUpReason::Permanent);
        }
        if failed_attempt >= self.max_attempts {
            return RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted);
        }
        let computed = self.delay(failed_attempt, rng);
        // A server's retry-after replaces the computed delay: it knows when it will accept
        // the call again, and retrying earlier would just be refused.
        let delay = match class.retry_after_hint() {
            Some(after) => after,
            None => computed,
        };
        if let Some(limit) = self.max_elapsed
            && elapsed.saturating_add(delay) > limit
        {
            return RetryDecision::GiveUp(GiveUpReason::ElapsedExhausted);
        }
        RetryDecision::RetryAfter(delay)
    }
}

/// The outcome of [`RetryPolicy::decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryDecision {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Stop trying.
    GiveUp(GiveUpReason),
}

/// Why a step stopped being retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GiveUpReason {
    /// The error was permanent.
    Permanent,
    /// Every allowed attempt failed.
    AttemptsExhausted,
    /// The next retry would pass the policy's elapsed-time limit.
    ElapsedExhausted,
    /// An attempt was interrupted (its coordinator stopped mid-attempt) more often than the
    /// engine's `max_interruptions`.
    InterruptedTooOften,
}

impl std::fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GiveUpReason::Permanent => "permanent error",
            GiveUpReason::AttemptsExhausted => "retries exhausted",
            GiveUpReason::ElapsedExhausted => "retry time limit reached",
            GiveUpReason::InterruptedTooOften => "interrupted too often",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;

    #[test]
    fn rejects_impossible_settings() {
        let ms = Duration::from_millis;
        assert_eq!(
            RetryPolicy::new(0, ms(1), 2.0, ms(2), Jitter::None, None),
            Err(RetryPolicyError::ZeroAttempts)
        );
        assert!(matches!(
            RetryPolicy::new(1, ms(1), 0.5, ms(2), Jitter::None, None),
            Err(RetryPolicyError::BadMultiplier(_))
        ));
        assert!(matches!(
            RetryPolicy::new(1, ms(10), 2.0, ms(2), Jitter::None, None),
            Err(RetryPolicyError::CapBelowInitial { .. })
        ));
    }

    #[test]
    fn retry_after_overrides_computed_delay() {
        let policy = RetryPolicy::default()
            .with_max_attempts(3)
            .with_jitter(Jitter::None);
        let mut rng = fastrand::Rng::with_seed(1);
        let decision = policy.decide(
            1,
            ErrorClass::retry_after(Duration::from_secs(7)),
            Duration::ZERO,
            &mut rng,
        );
        assert_eq!(decision, RetryDecision::RetryAfter(Duration::from_secs(7)));
    }

    #[test]
    fn schedule_span_counts_timeouts_and_capped_delays_and_stops_at_the_elapsed_limit() {
        let s = Duration::from_secs;
        let policy = RetryPolicy::default()
            .with_max_attempts(5)
            .with_initial_delay(s(1))
            .with_max_delay(s(3));
        // Delays 1, 2, 3, 3 (capped); 5 attempts of 10 s.
        assert_eq!(policy.schedule_span(Some(s(10))), Some(s(59)));
        assert_eq!(
            policy
                .clone()
                .with_max_elapsed(s(20))
                .schedule_span(Some(s(10))),
            Some(s(30)),
            "at most the limit plus one attempt"
        );
        assert_eq!(
            RetryPolicy::no_retry().schedule_span(Some(s(7))),
            Some(s(7))
        );
        // A multiplier of 1 never reaches the cap: counted at once, not walked.
        let flat = RetryPolicy::default()
            .with_max_attempts(u32::MAX)
            .with_initial_delay(s(1))
            .with_multiplier(1.0)
            .with_max_delay(s(3));
        assert_eq!(
            flat.schedule_span(Some(s(1))),
            Some(s(u64::from(u32::MAX - 1) + u64::from(u32::MAX)))
        );
        // Barely growing: the walk is bounded and still an upper bound of every delay.
        let slow = RetryPolicy::default()
            .with_max_attempts(u32::MAX)
            .with_initial_delay(Duration::from_millis(100))
            .with_multiplier(1.000_001)
            .with_max_delay(s(10));
        let walked: Duration = (1..1000).map(|k| slow.base_delay(k)).sum();
        assert!(
            slow.schedule_span(Some(Duration::ZERO)) >= Some(walked),
            "an upper bound of the first 999 delays ({walked:?})"
        );
        assert_eq!(
            policy.with_max_attempts(u32::MAX).schedule_span(Some(s(1))),
            Some(s(1 + 2 + 3 * u64::from(u32::MAX - 3) + u64::from(u32::MAX))),
            "the capped delays are counted at once, not one by one"
        );
    }

    #[test]
    fn elapsed_limit_stops_retries() {
        let policy = RetryPolicy::default()
            .with_max_attempts(10)
            .with_jitter(Jitter::None)
            .with_max_elapsed(Duration::from_millis(250));
        let mut rng = fastrand::Rng::with_seed(1);
        let transient = ErrorClass::TRANSIENT;
        assert_eq!(
            policy.decide(1, transient, Duration::from_millis(100), &mut rng),
            RetryDecision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(
            policy.decide(2, transient, Duration::from_millis(200), &mut rng),
            RetryDecision::GiveUp(GiveUpReason::ElapsedExhausted)
        );
    }

    proptest::proptest! {
        #[test]
        fn jittered_delay_stays_within_bounds(
            attempt in 1u32..40,
            initial_ms in 1u64..2_000,
            cap_factor in 1u64..100,
            seed: u64,
            mode in 0u8..3,
        ) {
            let jitter = [Jitter::Full, Jitter::Equal, Jitter::None][usize::from(mode)];
            let policy = RetryPolicy::default()
                .with_initial_delay(Duration::from_millis(initial_ms))
                .with_max_delay(Duration::from_millis(initial_ms * cap_factor))
                .with_jitter(jitter);
            let base = policy.base_delay(attempt);
            proptest::prop_assert!(base >= Duration::from_millis(initial_ms));
            proptest::prop_assert!(base <= Duration::from_millis(initial_ms * cap_factor));
            let mut rng = fastrand::Rng::with_seed(seed);
            let delay = policy.delay(attempt, &mut rng);
            proptest::prop_assert!(delay <= base);
            if jitter == Jitter::Equal {
                proptest::prop_assert!(delay >= base / 2 - Duration::from_millis(1));
            }
            if jitter == Jitter::None {
                proptest::prop_assert_eq!(delay, base);
            }
        }
    }
}
