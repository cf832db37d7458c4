//! The effect ledger: what every step invocation did, keyed by idempotency key and phase.

use std::sync::{Arc, Mutex};

use saga_core::{Phase, SagaId};

use crate::StepOutput;

/// One invocation of a step's forward action or compensation.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The saga.
    pub saga: SagaId,
    /// The step's index in [`NAMES`](crate::NAMES).
    pub step: usize,
    /// The step's journal position.
    pub position: u32,
    /// Forward or compensate.
    pub phase: Phase,
    /// The idempotency key the engine gave this invocation.
    pub key: String,
    /// The attempt number the engine gave this invocation.
    pub attempt: u32,
    /// 0-based count of earlier invocations of this saga's step and phase.
    pub invocation: usize,
    /// What the script made it do ([`Behavior::name`](crate::Behavior::name)), or
    /// `deduplicated` (see [`Script::dedupe_by_key`](crate::Script::dedupe_by_key)).
    pub behavior: &'static str,
    /// For a compensation: whether it was given the forward output.
    pub had_output: Option<bool>,
    /// When it began, on tokio's (paused) clock.
    pub at: tokio::time::Instant,
}

/// An effect that a step applied to the outside world.
#[derive(Clone, Debug, PartialEq)]
pub struct Effect {
    /// The saga.
    pub saga: SagaId,
    /// The step's index in [`NAMES`](crate::NAMES).
    pub step: usize,
    /// Forward or compensate.
    pub phase: Phase,
    /// The idempotency key it was applied under.
    pub key: String,
    /// The attempt that applied it.
    pub attempt: u32,
    /// The forward output it produced (`None` for compensations).
    pub output: Option<StepOutput>,
}

#[derive(Debug, Default)]
struct Inner {
    calls: Vec<Call>,
    effects: Vec<Effect>,
    reconciles: Vec<(SagaId, usize, String)>,
}

/// Records invocations and effects in order. Cheap to clone; clones share one ledger.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    inner: Arc<Mutex<Inner>>,
}

impl Ledger {
    /// An empty ledger.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times `saga`'s step `step` has been invoked in `phase` so far.
    #[must_use]
    pub fn invocations(&self, saga: SagaId, step: usize, phase: Phase) -> usize {
        self.inner
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.saga == saga && c.step == step && c.phase == phase)
            .count()
    }

    /// Records an invocation.
    pub fn record_call(&self, call: Call) {
        self.inner.lock().unwrap().calls.push(call);
    }

    /// Records an applied effect.
    pub fn apply(&self, effect: Effect) {
        self.inner.lock().unwrap().effects.push(effect);
    }

    /// Records that a reconciliation check ran.
    pub fn record_reconcile(&self, saga: SagaId, step: usize, key: String) {
        self.inner
            .lock()
            .unwrap()
            .reconciles
            .push((saga, step, key));
    }

    /// Every invocation, in order.
    #[must_use]
    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// The invocations of one step and phase, in order.
    #[must_use]
    pub fn calls_of(&self, step: usize, phase: Phase) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.step == step && c.phase == phase)
            .collect()
    }

    /// Every applied effect, in order.
    #[must_use]
    pub fn effects(&self) -> Vec<Effect> {
        self.inner.lock().unwrap().effects.clone()
    }

    /// The effects of one phase, in order.
    #[must_use]
    pub fn effects_in(&self, phase: Phase) -> Vec<Effect> {
        self.effects()
            .into_iter()
            .filter(|e| e.phase == phase)
            .collect()
    }

    /// The effects of one step and phase, in order.
    #[must_use]
    pub fn effects_of(&self, step: usize, phase: Phase) -> Vec<Effect> {
        self.effects()
            .into_iter()
            .filter(|e| e.step == step && e.phase == phase)
            .collect()
    }

    /// How many times an effect was applied under `key` in `phase`.
    #[must_use]
    pub fn effect_count(&self, phase: Phase, key: &str) -> usize {
        self.effects()
            .iter()
            .filter(|e| e.phase == phase && e.key == key)
            .count()
    }

    /// The output of the first forward effect applied under `key`, if any (what a downstream
    /// system that honours idempotency keys would answer).
    #[must_use]
    pub fn forward_output(&self, key: &str) -> Option<StepOutput> {
        self.effects()
            .into_iter()
            .find(|e| e.phase == Phase::Forward && e.key == key)
            .and_then(|e| e.output)
    }

    /// The reconciliation checks that ran: (saga, step index, key).
    #[must_use]
    pub fn reconciles(&self) -> Vec<(SagaId, usize, String)> {
        self.inner.lock().unwrap().reconciles.clone()
    }
}
