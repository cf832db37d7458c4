//! What every simulated service shares: seeded fault injection and the crash switch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use saga_core::{HttpStatus, Phase, StepContext};
use tokio::sync::Notify;

use crate::services::ServiceError;

/// A fault to inject into one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The call goes through.
    None,
    /// 503 Service Unavailable.
    Unavailable,
    /// The call hangs past the step timeout.
    Timeout,
    /// 429 Too Many Requests with a retry-after.
    RateLimited(Duration),
}

/// Seeded, deterministic fault decisions: the same seed, key and attempt give the same fault.
#[derive(Clone, Debug)]
pub struct Faults {
    /// The seed.
    pub seed: u64,
    /// Probability of a transient fault per call, 0.0..=1.0.
    pub rate: f64,
    /// A step name that fails permanently for every saga that reaches it.
    pub fail_at: Option<String>,
    /// A step name whose first attempt is refused with 429 and this retry-after, for every
    /// saga that reaches it (a long backoff that becomes a durable timer).
    pub throttle: Option<(String, Duration)>,
}

impl Faults {
    /// The fault for one call of `operation` under `key` on `attempt`.
    #[must_use]
    pub fn decide(&self, operation: &str, key: &str, attempt: u32) -> Fault {
        let mut hash = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for byte in operation
            .bytes()
            .chain(key.bytes())
            .chain(attempt.to_le_bytes())
        {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut rng = fastrand::Rng::with_seed(hash);
        if rng.f64() >= self.rate {
            return Fault::None;
        }
        match rng.u8(0..3) {
            0 => Fault::Unavailable,
            1 => Fault::Timeout,
            _ => Fault::RateLimited(Duration::from_millis(rng.u64(80..=250))),
        }
    }
}

/// Simulates an abrupt stop of the coordinator after a number of applied effects: the next
/// effect is applied, then every call hangs forever, and `tripped` wakes whoever will abort
/// the running sagas (the in-process stand-in for `kill -9`).
#[derive(Debug, Default)]
pub struct CrashSwitch {
    remaining: AtomicI64,
    armed: AtomicBool,
    frozen: AtomicBool,
    tripped: Notify,
}

impl CrashSwitch {
    /// Arms the switch to trip after `effects` applied effects.
    pub fn arm(&self, effects: u64) {
        self.remaining
            .store(i64::try_from(effects).unwrap_or(i64::MAX), Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Disarms and unfreezes (the "restarted process").
    pub fn reset(&self) {
        self.armed.store(false, Ordering::SeqCst);
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// `true` once the switch has tripped.
    #[must_use]
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Waits until the switch trips.
    pub async fn wait_tripped(&self) {
        loop {
            let notified = self.tripped.notified();
            if self.is_frozen() {
                return;
            }
            notified.await;
        }
    }

    /// Called before a service does anything: a frozen process does nothing more.
    pub async fn gate(&self) {
        if self.is_frozen() {
            std::future::pending::<()>().await;
        }
    }

    /// Called after an effect was applied: trips the switch when the count runs out, in which
    /// case the call never returns (the effect happened; its step never hears of it).
    pub async fn after_effect(&self) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        if self.remaining.fetch_sub(1, Ordering::SeqCst) <= 1 {
            self.frozen.store(true, Ordering::SeqCst);
            self.tripped.notify_waiters();
            std::future::pending::<()>().await;
        }
    }
}

/// The shared world of the simulated services, registered on the engine as a resource.
#[derive(Debug, Clone)]
pub struct World {
    /// Fault injection.
    pub faults: Arc<Faults>,
    /// The crash switch.
    pub crash: Arc<CrashSwitch>,
    /// Simulated latency range of a call, in milliseconds.
    pub latency_ms: (u64, u64),
}

/// Who is calling: the step context's identity, as the services record it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Saga id.
    pub saga: String,
    /// Journal position.
    pub position: u32,
    /// Step name.
    pub step: String,
    /// Forward or compensate.
    pub phase: Phase,
    /// The idempotency key.
    pub key: String,
    /// Attempt number.
    pub attempt: u32,
}

impl Caller {
    /// The caller identity of a step context.
    #[must_use]
    pub fn of(ctx: &StepContext) -> Self {
        Self {
            saga: ctx.saga_id().to_string(),
            position: ctx.position(),
            step: ctx.step_name().to_owned(),
            phase: ctx.phase(),
            key: ctx.idempotency_key().to_owned(),
            attempt: ctx.attempt(),
        }
    }
}

impl World {
    /// A world with the given faults.
    #[must_use]
    pub fn new(faults: Faults) -> Self {
        Self {
            faults: Arc::new(faults),
            crash: Arc::new(CrashSwitch::default()),
            latency_ms: (1, 4),
        }
    }

    /// Simulates the network part of a call: latency and injected faults. `Ok(true)` means
    /// "the request goes through but the response will be lost": the caller applies its
    /// effect and then hangs past the step timeout, as a real timeout after the server acted.
    ///
    /// # Errors
    /// The injected fault, or a permanent rejection when `fail_at` names this step.
    pub async fn call(&self, caller: &Caller) -> Result<bool, ServiceError> {
        self.crash.gate().await;
        let (low, high) = self.latency_ms;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(low..=high))).await;
        if caller.phase == Phase::Forward
            && self.faults.fail_at.as_deref() == Some(caller.step.as_str())
        {
            return Err(ServiceError::Rejected(format!(
                "forced permanent failure at `{}` (--fail-at)",
                caller.step
            )));
        }
        if let Some((step, after)) = &self.faults.throttle
            && caller.phase == Phase::Forward
            && caller.attempt == 1
            && *step == caller.step
        {
            return Err(ServiceError::Http(
                HttpStatus::new(429).with_retry_after(*after),
            ));
        }
        match self
            .faults
            .decide(&caller.step, &caller.key, caller.attempt)
        {
            Fault::None => Ok(false),
            Fault::Unavailable => Err(ServiceError::Http(HttpStatus::new(503))),
            Fault::RateLimited(after) => Err(ServiceError::Http(
                HttpStatus::new(429).with_retry_after(after),
            )),
            Fault::Timeout => Ok(true),
        }
    }

    /// Hangs long enough for any step timeout of the example to fire.
    pub async fn lose_response(&self) {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
