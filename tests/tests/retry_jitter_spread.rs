//! Jitter spreads retries (issue 11, item 14): many sagas whose step fails transiently at the
//! same instant record retry delays that differ, inside the range the policy's jitter rule
//! promises (`saga-core/src/retry.rs`: full jitter draws uniformly from `0..=base`, equal
//! jitter from `base/2..=base`).
//!
//! Time is tokio's paused clock, so every saga fails at the same virtual instant and nothing
//! depends on scheduling. The engine draws its jitter from an unseeded generator; the bounds
//! asserted here fail only if 50 uniform draws over 10 001 values give fewer than 10 distinct
//! ones or all land in a quarter of the range (probability below 1e-25).

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use saga_core::{EventKind, Jitter, RetryPolicy, StartOptions};
use saga_tests::{Behavior, Harness, Plan, PlanSaga};

const SAGAS: usize = 50;
const BASE: Duration = Duration::from_secs(10);

/// Runs `SAGAS` one-step sagas whose first attempt fails transiently under `jitter`, and
/// returns every recorded retry delay in milliseconds, checking that each event's
/// `next_retry_at` is its time plus its delay.
async fn recorded_delays(jitter: Jitter) -> Vec<u64> {
    let h = Harness::new();
    h.script.forward(0, [Behavior::Transient]);
    let policy = RetryPolicy::default()
        .with_max_attempts(3)
        .with_initial_delay(BASE)
        .with_max_delay(BASE)
        .with_jitter(jitter);
    let plan = Plan::linear(1).with(0, |s| {
        s.policy = policy.clone();
        s.timeout = None;
    });
    let engine = h.engine(plan);
    let mut ids = Vec::new();
    for seed in 0..SAGAS {
        let seed = u32::try_from(seed).unwrap();
        ids.push(
            engine
                .start_with::<PlanSaga>(&seed, StartOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let failed_at = h.now();
    // One round: every saga's first attempt fails at the same instant and is put off.
    let ran = engine.run_due(SAGAS).await.unwrap();
    assert_eq!(ran.len(), SAGAS, "every saga ran in the one round");
    let mut delays = Vec::new();
    for id in ids {
        let history = engine.history(id).await.unwrap();
        let failures: Vec<_> = history
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::StepAttemptFailed {
                    attempt,
                    backoff_seconds,
                    next_retry_at,
                    ..
                } => Some((e.at, *attempt, *backoff_seconds, *next_retry_at)),
                _ => None,
            })
            .collect();
        assert_eq!(failures.len(), 1, "saga {id}: one failed attempt so far");
        let (at, attempt, backoff, next) = failures[0];
        assert_eq!(attempt, 1);
        assert_eq!(at, failed_at, "saga {id} failed at the common instant");
        let millis = (backoff * 1000.0).round();
        assert!(millis >= 0.0, "saga {id}: negative delay {backoff}");
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let millis = millis as u64;
        assert_eq!(
            next,
            at.plus(Duration::from_millis(millis)),
            "saga {id}: next_retry_at is the failure time plus the recorded delay"
        );
        delays.push(millis);
    }
    delays
}

fn assert_spread(delays: &[u64], low: u64, high: u64) {
    let distinct: BTreeSet<u64> = delays.iter().copied().collect();
    let (min, max) = (*distinct.first().unwrap(), *distinct.last().unwrap());
    assert!(
        delays.iter().all(|d| (low..=high).contains(d)),
        "every delay within the jitter range {low}..={high} ms: {delays:?}"
    );
    assert!(
        distinct.len() >= 10,
        "at least 10 distinct delays among {}: {distinct:?}",
        delays.len()
    );
    assert!(
        max - min >= (high - low) / 4,
        "the delays cover at least a quarter of the {low}..={high} ms range: {min}..={max}"
    );
}

#[tokio::test(start_paused = true)]
async fn full_jitter_spreads_simultaneous_retries_over_zero_to_the_base_delay() {
    let base = u64::try_from(BASE.as_millis()).unwrap();
    let delays = recorded_delays(Jitter::Full).await;
    assert_eq!(delays.len(), SAGAS);
    assert_spread(&delays, 0, base);
}

#[tokio::test(start_paused = true)]
async fn equal_jitter_spreads_simultaneous_retries_over_the_upper_half() {
    let base = u64::try_from(BASE.as_millis()).unwrap();
    let delays = recorded_delays(Jitter::Equal).await;
    assert_eq!(delays.len(), SAGAS);
    assert_spread(&delays, base / 2, base);
}

#[tokio::test(start_paused = true)]
async fn without_jitter_simultaneous_retries_share_one_delay() {
    // The control: the spread above comes from the jitter, not from the failures' timing.
    let base = u64::try_from(BASE.as_millis()).unwrap();
    let delays = recorded_delays(Jitter::None).await;
    assert!(delays.iter().all(|d| *d == base), "{delays:?}");
}
