//! What a running step sees: who it is, which attempt, its idempotency key, shared resources
//! and the idempotency guard.

use std::sync::Arc;
use std::time::Duration;

use crate::{IdempotencyGuard, MissingResource, Phase, Resources, SagaId, SagaStore};

/// The context passed to a step's forward action, compensation and reconciliation check.
#[derive(Clone)]
pub struct StepContext {
    pub(crate) saga_id: SagaId,
    pub(crate) saga_type: Arc<str>,
    pub(crate) step: &'static str,
    pub(crate) position: u32,
    pub(crate) attempt: u32,
    pub(crate) phase: Phase,
    pub(crate) idempotency_key: String,
    pub(crate) resources: Arc<Resources>,
    pub(crate) store: Arc<dyn SagaStore>,
    pub(crate) span: tracing::Span,
    /// How long the engine may still run this step and phase under its key; see
    /// [`StepContext::key_lifetime`].
    pub(crate) key_lifetime: Option<Duration>,
}

impl std::fmt::Debug for StepContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepContext")
            .field("saga_id", &self.saga_id)
            .field("saga_type", &self.saga_type)
            .field("step", &self.step)
            .field("position", &self.position)
            .field("attempt", &self.attempt)
            .field("phase", &self.phase)
            .field("idempotency_key", &self.idempotency_key)
            .field("key_lifetime", &self.key_lifetime)
            .finish_non_exhaustive()
    }
}

impl StepContext {
    /// A context for calling a step function outside an engine (unit tests of a step,
    /// benchmarks): a fresh saga id, position 0, attempt 1, forward phase, the given
    /// resources, and a private in-memory store behind [`StepContext::guard`].
    #[must_use]
    pub fn standalone(step: &'static str, resources: Resources) -> Self {
        let saga_id = SagaId::random();
        Self {
            saga_id,
            saga_type: Arc::from("standalone"),
            step,
            position: 0,
            attempt: 1,
            phase: Phase::Forward,
            idempotency_key: crate::step_idempotency_key(saga_id, 0, step, Phase::Forward),
            resources: Arc::new(resources),
            store: Arc::new(crate::MemoryStore::new()),
            span: tracing::Span::none(),
            key_lifetime: None,
        }
    }

    /// The saga this step belongs to.
    #[must_use]
    pub fn saga_id(&self) -> SagaId {
        self.saga_id
    }

    /// The saga's registered type name.
    #[must_use]
    pub fn saga_type(&self) -> &str {
        &self.saga_type
    }

    /// The step's name.
    #[must_use]
    pub fn step_name(&self) -> &'static str {
        self.step
    }

    /// The step's position in the saga's journal (from 0).
    #[must_use]
    pub fn position(&self) -> u32 {
        self.position
    }

    /// The attempt number, from 1; it keeps counting across resumes.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Forward action or compensation.
    #[must_use]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The deterministic idempotency key of this step and phase: the same on every attempt
    /// and every resume, different for forward and compensate. Pass it to the systems the
    /// step calls (an `Idempotency-Key` header, a unique column).
    #[must_use]
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    /// A shared resource registered on the engine.
    ///
    /// # Errors
    /// [`MissingResource`] (permanent) when no value of type `T` was registered.
    pub fn resource<T: Send + Sync + 'static>(&self) -> Result<&T, MissingResource> {
        self.resources.get::<T>()
    }

    /// The longest the engine may go on running this step and phase under
    /// [`idempotency_key`](Self::idempotency_key) by itself, from its first attempt: the
    /// step's retry schedule with every attempt taking its whole timeout
    /// ([`RetryPolicy::schedule_span`](crate::RetryPolicy::schedule_span)), plus, for each
    /// interruption the engine allows (`max_interruptions`), a lapsed lease before another
    /// coordinator resumes it and the interrupted attempt run again. A record that deduplicates the key (an idempotency guard entry,
    /// a downstream system's key store) must outlive this, or a late attempt could apply the
    /// effect again. `None` when the step has no timeout (then no bound is known) or outside
    /// an engine ([`StepContext::standalone`]). An operator's `saga retry` of a failed saga
    /// reuses the key later still: keep records longer where that matters.
    #[must_use]
    pub fn key_lifetime(&self) -> Option<Duration> {
        self.key_lifetime
    }

    /// The idempotency guard on the saga store, to make any side effect exactly-once. It
    /// refuses a record TTL shorter than this step's [`key_lifetime`](Self::key_lifetime)
    /// ([`GuardError::TtlTooShort`](crate::GuardError::TtlTooShort), before any effect runs).
    #[must_use]
    pub fn guard(&self) -> IdempotencyGuard {
        let guard = IdempotencyGuard::new(Arc::clone(&self.store));
        match self.key_lifetime {
            Some(lifetime) => guard.with_min_ttl(lifetime),
            None => guard,
        }
    }

    /// The `step` tracing span this attempt runs in.
    #[must_use]
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}
