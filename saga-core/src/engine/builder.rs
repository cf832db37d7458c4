//! Engine settings and the builder that checks them.

use std::sync::Arc;
use std::time::Duration;

use super::definition::TypedSaga;
use super::registry::Registry;
use super::shared::Shared;
use super::{Engine, EngineError, Saga, operations};
use crate::store::SagaStore;
use crate::{Clock, Resources, RetryPolicy, TokioClock};

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This coordinator's owner id, written into every lease it takes. Unique per live
    /// process; a restarted process that keeps its id can claim its own sagas by id at
    /// once ([`Engine::run_once`]), without waiting for their leases to lapse.
    /// The default (`saga-<pid>-<random>`) is new on every start, so a restarted process
    /// waits for its old leases to lapse: set a stable one with [`EngineBuilder::owner`].
    pub owner: String,
    /// Lease length; renewed while a step runs and extended by every commit.
    pub lease_ttl: Duration,
    /// Backoffs up to this long are slept in process; longer ones become durable timers that
    /// release the saga and its worker.
    pub inline_wait_max: Duration,
    /// How a running saga's store writes are retried when the store is briefly unavailable.
    pub store_retry: RetryPolicy,
    /// How client calls ride out a store that is briefly unavailable: a start retries its
    /// create (and a local hand-over its claim) by this policy, for at most its
    /// `max_elapsed`; a wait retries its reads with these pauses until its own timeout.
    /// Default [`RetryPolicy::client_default`]: up to 30 s, 50 ms doubling to 2 s, jittered.
    pub client_retry: RetryPolicy,
    /// How many times one attempt may be started again after its coordinator stopped in the
    /// middle of it before the step fails for good (a step that crashes its process every
    /// time would otherwise be re-run forever).
    pub max_interruptions: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            owner: format!("saga-{}-{:08x}", std::process::id(), fastrand::u32(..)),
            lease_ttl: Duration::from_secs(30),
            inline_wait_max: Duration::from_secs(1),
            store_retry: RetryPolicy::default()
                .with_max_attempts(8)
                .with_initial_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2)),
            client_retry: RetryPolicy::client_default(),
            max_interruptions: 5,
        }
    }
}

impl EngineConfig {
    /// How long an engine with these settings may go on running one step phase under its
    /// idempotency key, for a phase retried by `policy` with attempts bounded by `timeout`:
    /// [`RetryPolicy::schedule_span`], plus, for each interruption allowed
    /// ([`max_interruptions`](Self::max_interruptions)), a lapsed lease and the whole attempt
    /// again (an interrupted attempt is re-run under its own number, which the schedule counts
    /// once). `None` when `timeout` is `None`. See
    /// [`StepContext::key_lifetime`](crate::StepContext::key_lifetime).
    #[must_use]
    pub fn key_lifetime(
        &self,
        policy: &RetryPolicy,
        timeout: Option<Duration>,
    ) -> Option<Duration> {
        let attempt = timeout?;
        let span = policy.schedule_span(Some(attempt))?;
        let interruptions = self
            .lease_ttl
            .saturating_add(attempt)
            .saturating_mul(self.max_interruptions);
        Some(span.saturating_add(interruptions))
    }
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    store: Arc<dyn SagaStore>,
    registry: Registry,
    resources: Resources,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("sagas", &self.registry)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// Registers a saga type under its `NAME` and `VERSION`. Register several versions of
    /// one workflow side by side while sagas started under the old ones drain: each saga runs
    /// under the version it was started with, and a start by name
    /// ([`Engine::start_json`](crate::Engine::start_json)) uses the newest unless it picks one.
    /// Registering the same name and version twice is a configuration error at
    /// [`EngineBuilder::build`].
    #[must_use]
    pub fn register<S: Saga>(mut self, saga: S) -> Self {
        self.registry.insert(Arc::new(TypedSaga(saga)));
        self
    }

    /// Registers a shared resource that steps read with `StepContext::resource`.
    #[must_use]
    pub fn resource<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.resources.insert(value);
        self
    }

    /// Sets the owner id written into leases (default: `saga-<pid>-<random>`, new on every
    /// start).
    ///
    /// Give each coordinator process an id of its own that it keeps across restarts (a
    /// StatefulSet pod name, a systemd instance name, a name from its config): a store grants
    /// a claim by id to the owner that already holds the lease, so a restarted process with
    /// the same id can take its unfinished sagas back at once with [`Engine::run_once`] (the
    /// ids it knows), while with the random default they wait for their leases to lapse
    /// ([`EngineConfig::lease_ttl`], 30 s by default). A [`Coordinator`](crate::Coordinator)'s
    /// claim loop takes only due sagas, and a held saga is due when its lease expires, so a
    /// restarted coordinator resumes its sagas then, with any id. Never give
    /// two live processes the same id: each would take the other's leases as its own, and
    /// both would run the same saga. There is no stable default for that reason: nothing a
    /// library can see (host name, process id) is both stable across restarts and unique
    /// among live processes.
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.config.owner = owner.into();
        self
    }

    /// Sets the lease length (default 30 s).
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.config.lease_ttl = ttl;
        self
    }

    /// Sets the longest backoff slept in process (default 1 s); longer ones become durable
    /// timers.
    #[must_use]
    pub fn inline_wait_max(mut self, max: Duration) -> Self {
        self.config.inline_wait_max = max;
        self
    }

    /// Sets how store writes are retried while the store is briefly unavailable.
    #[must_use]
    pub fn store_retry(mut self, policy: RetryPolicy) -> Self {
        self.config.store_retry = policy;
        self
    }

    /// Sets how client calls (start, wait) retry transient store errors (default
    /// [`RetryPolicy::client_default`]: for up to 30 s). [`RetryPolicy::no_retry`] makes
    /// them fail at the first error.
    #[must_use]
    pub fn client_retry(mut self, policy: RetryPolicy) -> Self {
        self.config.client_retry = policy;
        self
    }

    /// Sets how often one attempt may be interrupted by its coordinator stopping before the
    /// step fails for good (default 5).
    #[must_use]
    pub fn max_interruptions(mut self, limit: u32) -> Self {
        self.config.max_interruptions = limit;
        self
    }

    /// Uses `clock` for event timestamps and retry times (tests).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Checks the configuration and builds the engine.
    ///
    /// # Errors
    /// [`EngineError::Config`] when the owner id is empty, the lease is shorter than 30 ms,
    /// in-process waits could outlast a third of the lease, or a saga type's name and
    /// version were registered twice (or its version is 0).
    pub fn build(self) -> Result<Engine, EngineError> {
        self.registry.check().map_err(EngineError::Config)?;
        let config = self.config;
        if config.owner.trim().is_empty() {
            return Err(EngineError::Config("owner id must not be empty".into()));
        }
        if config.lease_ttl < Duration::from_millis(30) {
            return Err(EngineError::Config(format!(
                "lease_ttl {:?} is too short; use at least 30 ms (30 s in production)",
                config.lease_ttl
            )));
        }
        if config.inline_wait_max > config.lease_ttl / 3 {
            return Err(EngineError::Config(format!(
                "inline_wait_max {:?} must be at most a third of lease_ttl {:?}, or the lease could lapse during a wait",
                config.inline_wait_max, config.lease_ttl
            )));
        }
        Ok(Engine {
            shared: Arc::new(Shared {
                store: self.store,
                registry: self.registry,
                resources: Arc::new(self.resources),
                clock: self.clock,
                config,
                local: Arc::default(),
                shutting_down: std::sync::atomic::AtomicBool::new(false),
                cancels: tokio::sync::broadcast::channel(operations::CANCEL_FEED).0,
            }),
        })
    }
}

impl Engine {
    /// Starts building an engine on `store`.
    pub fn builder(store: impl SagaStore) -> EngineBuilder {
        Self::builder_shared(Arc::new(store))
    }

    /// Starts building an engine on a shared store handle.
    pub fn builder_shared(store: Arc<dyn SagaStore>) -> EngineBuilder {
        EngineBuilder {
            store,
            registry: Registry::default(),
            resources: Resources::default(),
            clock: Arc::new(TokioClock::new()),
            config: EngineConfig::default(),
        }
    }
}
