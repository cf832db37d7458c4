//! The engine: starts sagas, runs them with their lease, resumes them from their journal,
//! compensates them, and answers questions about them.

mod attempt;
mod client_retry;
mod compensate;
mod context;
mod definition;
mod error;
mod guarded;
mod local;
mod operations;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;

pub use client_retry::{ClientRetry, RetryNotice, RetryingStore};
pub use context::SagaContext;
pub use definition::Saga;
pub use error::{EngineError, Interruption, SagaError};

use context::{AttemptLog, Halt, Mode};
use definition::{ErasedSaga, TypedSaga};
pub(crate) use local::{Dispatch, Handoff, LocalState};

use crate::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, Lease, NewSaga,
    SagaStore, Schedule, StoreError, Transition,
};
use crate::telemetry;
use crate::{
    Clock, CompensationReason, EventKind, FailureKind, Resources, RetryPolicy, SagaEvent, SagaId,
    SagaState, SagaStatus, StepStatus, Timestamp, TokioClock, fingerprint,
};

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This coordinator's owner id, written into every lease it takes. Unique per live
    /// process; a restarted process that keeps its id reclaims its own sagas at once.
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

pub(crate) struct Shared {
    pub(crate) store: Arc<dyn SagaStore>,
    pub(crate) registry: HashMap<&'static str, Arc<dyn ErasedSaga>>,
    pub(crate) resources: Arc<Resources>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: EngineConfig,
    /// The sagas this engine runs itself, their waiters and the local coordinator.
    pub(crate) local: Arc<local::LocalState>,
    /// Set by [`Engine::begin_shutdown`]: running sagas stop at their next step boundary.
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
    /// The ids of sagas cancelled through this engine, so that a run of one waiting here
    /// (a backoff, a durable timer) wakes at once instead of at its retry time.
    pub(crate) cancels: tokio::sync::broadcast::Sender<SagaId>,
}

impl Shared {
    /// Commits with bounded retries while the store is unavailable. Safe to retry: the
    /// transition carries a commit id that the store applies at most once.
    pub(crate) async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        let mut failed = 0;
        let mut rng = fastrand::Rng::new();
        loop {
            match self.store.commit(lease, transition.clone()).await {
                Err(err)
                    if err.is_transient()
                        && failed + 1 < self.config.store_retry.max_attempts() =>
                {
                    failed += 1;
                    let delay = self.config.store_retry.delay(failed, &mut rng);
                    tracing::warn!(saga_id = %lease.saga_id, error = %err, retry_in = ?delay, "store commit failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(err @ StoreError::Fenced { .. }) => {
                    // Another coordinator owns the saga now: this run must stop. Counted so
                    // that rejected late writes (a paused or partitioned coordinator) show.
                    telemetry::fenced_write();
                    tracing::warn!(saga_id = %lease.saga_id, fence = lease.fence, error = %err, "write fenced; stopping this run");
                    return Err(err);
                }
                other => return other,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn observe_attempt(
        &self,
        span: &tracing::Span,
        state: &SagaState,
        position: u32,
        step: &'static str,
        key: &str,
        attempt: u32,
        seconds: f64,
        outcome: &AttemptLog<'_>,
    ) {
        let _entered = span.enter();
        let workflow_id = state.id.to_string();
        telemetry::step_duration(step, seconds);
        match *outcome {
            AttemptLog::Succeeded => {
                telemetry::step_attempt(step, "success");
                tracing::info!(
                    workflow_id,
                    step = position,
                    operation = step,
                    idempotency_key = key,
                    status = "succeeded",
                    attempt,
                    "step attempt succeeded"
                );
            }
            AttemptLog::Compensated => {
                telemetry::step_attempt(step, "compensated");
                tracing::info!(
                    workflow_id,
                    step = position,
                    operation = step,
                    idempotency_key = key,
                    status = "compensated",
                    attempt,
                    "compensation succeeded"
                );
            }
            AttemptLog::Retry {
                error,
                delay,
                next_retry_at,
            } => {
                telemetry::step_attempt(step, "retry");
                tracing::warn!(
                    workflow_id,
                    step = position,
                    operation = step,
                    idempotency_key = key,
                    status = "retry",
                    attempt,
                    error = %error.message,
                    class = %error.class,
                    backoff_seconds = delay.as_secs_f64(),
                    next_retry_at = %next_retry_at,
                    "attempt failed; retrying"
                );
            }
            AttemptLog::Failed { error, reason } => {
                telemetry::step_attempt(step, "failure");
                tracing::error!(
                    workflow_id,
                    step = position,
                    operation = step,
                    idempotency_key = key,
                    status = "failed",
                    attempt,
                    error = %error.message,
                    class = %error.class,
                    reason = %reason,
                    "attempt failed for good"
                );
            }
        }
    }
}

/// Builds an [`Engine`].
pub struct EngineBuilder {
    store: Arc<dyn SagaStore>,
    registry: HashMap<&'static str, Arc<dyn ErasedSaga>>,
    resources: Resources,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("sagas", &self.registry.keys().collect::<Vec<_>>())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EngineBuilder {
    /// Registers a saga type.
    #[must_use]
    pub fn register<S: Saga>(mut self, saga: S) -> Self {
        self.registry.insert(S::NAME, Arc::new(TypedSaga(saga)));
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
    /// a claim to the owner that already holds the lease, so a restarted process with the
    /// same id reclaims its unfinished sagas at once, while with the random default they wait
    /// for their leases to lapse ([`EngineConfig::lease_ttl`], 30 s by default). Never give
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
    /// or in-process waits could outlast a third of the lease.
    pub fn build(self) -> Result<Engine, EngineError> {
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

/// Options for starting a saga.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Starting twice with the same key returns the first saga; the same key with another
    /// input is a conflict.
    pub idempotency_key: Option<String>,
}

impl StartOptions {
    /// Options with an idempotency key.
    #[must_use]
    pub fn key(key: impl Into<String>) -> Self {
        Self {
            idempotency_key: Some(key.into()),
        }
    }
}

/// The result of [`Engine::start`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    /// The saga id.
    pub id: SagaId,
    /// `false` when the idempotency key had already started this saga.
    pub created: bool,
}

/// How a saga ended (or stands, if it is not terminal).
#[derive(Clone, Debug, PartialEq)]
pub struct SagaOutcome {
    /// The saga id.
    pub id: SagaId,
    /// Its status.
    pub status: SagaStatus,
    /// The workflow output, when completed.
    pub output: Option<Value>,
    /// Why it compensated, when it did.
    pub compensation_reason: Option<CompensationReason>,
    /// Why it failed, when `Failed`.
    pub failure: Option<(FailureKind, String)>,
}

impl SagaOutcome {
    fn from_state(state: &SagaState) -> Self {
        Self {
            id: state.id,
            status: state.status,
            output: state.output.clone(),
            compensation_reason: state.compensation_reason.clone(),
            failure: state.failure.clone(),
        }
    }

    /// The workflow output decoded as `T` (`None` unless completed).
    ///
    /// # Errors
    /// [`EngineError::Encoding`] when it does not decode as `T`.
    pub fn output<T: DeserializeOwned>(&self) -> Result<Option<T>, EngineError> {
        self.output
            .clone()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|source| EngineError::Encoding {
                what: format!("output of saga {}", self.id),
                source,
            })
    }
}

/// The result of one run of a saga in this process.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum RunOutcome {
    /// The saga reached a terminal state.
    Finished(SagaOutcome),
    /// A durable timer was set; the saga is due again at this time.
    Suspended(Timestamp),
}

/// The saga engine. Cheap to clone; every clone shares the store, registry and resources.
///
/// ```
/// use saga_core::{Engine, MemoryStore, Saga, SagaContext, SagaError, SagaStatus, StartOptions};
///
/// struct Hello;
///
/// #[async_trait::async_trait]
/// impl Saga for Hello {
///     type Input = String;
///     type Output = String;
///     const NAME: &'static str = "hello";
///
///     async fn run(&self, saga: &mut SagaContext, name: String) -> Result<String, SagaError> {
///         let _when = saga.now()?; // journaled: the same value on every replay
///         Ok(format!("hello, {name}"))
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let engine = Engine::builder(MemoryStore::new()).register(Hello).build()?;
/// let outcome = engine.execute::<Hello>(&"deal team".into(), StartOptions::key("greet-1")).await?;
/// assert_eq!(outcome.status, SagaStatus::Completed);
/// assert_eq!(outcome.output::<String>()?.as_deref(), Some("hello, deal team"));
/// # Ok::<_, saga_core::EngineError>(())
/// # }).unwrap();
/// ```
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("owner", &self.shared.config.owner)
            .field("sagas", &self.shared.registry.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
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
            registry: HashMap::new(),
            resources: Resources::default(),
            clock: Arc::new(TokioClock::new()),
            config: EngineConfig::default(),
        }
    }

    /// The store this engine writes to.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.shared.store
    }

    /// The engine's settings.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Durably records a new saga of type `S` (or finds the one its idempotency key already
    /// started). When this returns, the saga survives any crash; it runs when a coordinator
    /// claims it (see [`Engine::run_to_end`] and [`Engine::run_due`]).
    ///
    /// # Errors
    /// [`EngineError::IdempotencyConflict`] when the key was used with another input, or a
    /// store or encoding error.
    ///
    /// When a [`Coordinator`](crate::Coordinator) runs on this engine and has a free worker,
    /// the saga is created with its lease already taken and starts on that worker at once
    /// (no claim round trip); otherwise any coordinator claims it.
    ///
    /// A transient store error (see [`StoreError::is_transient`]) is retried with jittered
    /// backoff by [`EngineConfig::client_retry`] (for up to 30 s by default), with the same
    /// saga id every time: the id of a start without a key is drawn once, before the first
    /// attempt, and the store creates by id only if absent, so a create whose reply was lost
    /// is found by the retry instead of starting a second saga. Such a start answers
    /// `created: true` without a key (nobody else can know the id) and `created: false` with
    /// one (the retry cannot tell its own lost create from another caller's); the saga is the
    /// same either way. A start that still fails may have stored its saga: repeat it with the
    /// same idempotency key to be sure of one saga. Other errors fail at once.
    pub async fn start<S: Saga>(
        &self,
        input: &S::Input,
        options: StartOptions,
    ) -> Result<Started, EngineError> {
        let input = serde_json::to_value(input).map_err(|source| EngineError::Encoding {
            what: format!("input of saga type `{}`", S::NAME),
            source,
        })?;
        self.start_value(S::NAME, S::VERSION, input, options).await
    }

    /// Creates a saga and, when the local coordinator has a free worker, hands it over with
    /// its lease (see [`Engine::start`]).
    pub(crate) async fn start_value(
        &self,
        name: &'static str,
        version: u32,
        input: serde_json::Value,
        options: StartOptions,
    ) -> Result<Started, EngineError> {
        let slot = if self.is_shutting_down() {
            None
        } else {
            self.shared.local.free_worker()
        };
        let Some(slot) = slot else {
            return self
                .create_value(name, version, input, options, None)
                .await
                .map(|(started, _)| started);
        };
        // In a task of its own: once the saga is created with our lease, the hand-over must
        // happen even if the caller goes away (an HTTP client that disconnects), or the saga
        // would wait for its lease to lapse. The task answers as soon as the saga is stored
        // and marked as running here; a claim that the hand-over still needs (and retries
        // while the store is unavailable) does not hold the caller up.
        let engine = self.clone();
        let claim = Some(self.claim_request());
        let (answer, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            match engine
                .create_value(name, version, input, options, claim)
                .await
            {
                Ok((started, lease)) => engine.hand_over(slot, started, lease, answer).await,
                Err(err) => {
                    // A caller that went away is told nothing, and nothing was created.
                    let _ = answer.send(Err(err));
                }
            }
        });
        answered.await.map_err(|_| EngineError::Interrupted {
            saga: SagaId(uuid::Uuid::nil()),
            cause: Interruption::Panicked {
                what: "the start task (it ended without answering)".into(),
            },
        })?
    }

    /// Gives a saga created for a free local worker to that worker, and answers the start
    /// once the saga is marked as running here (so that a wait right after the start waits
    /// for the local run instead of reading the store).
    async fn hand_over(
        &self,
        slot: local::Slot,
        started: Started,
        created: Option<(Lease, SagaState)>,
        answer: tokio::sync::oneshot::Sender<Result<Started, EngineError>>,
    ) {
        let id = started.id;
        let mut answer = Some(answer);
        let mut reply = || {
            if let Some(answer) = answer.take() {
                // A caller that went away is no error: the saga is stored either way.
                let _ = answer.send(Ok(started.clone()));
            }
        };
        // Already running here (a repeated start of a saga this engine runs): nothing to do.
        let Some(run) = self.shared.try_local_run(id) else {
            reply();
            return;
        };
        let (lease, state) = match created {
            Some((lease, state)) => (lease, Some(state)),
            // Not created by this call: an idempotent repeat, or our own create whose reply
            // was lost (then we hold its lease without knowing it). A claim settles both:
            // same-owner claims succeed, and a saga due anyway may as well run here. Retried
            // while the store is unavailable: otherwise a lost create reply would leave the
            // saga waiting for our own lease to lapse.
            None => {
                reply();
                let request = self.claim_request();
                let retry = client_retry::ClientRetry::new(self.shared.config.client_retry.clone());
                let operation = format!("claim started saga {id}");
                let claimed = retry
                    .run(&operation, StoreError::is_transient, || {
                        self.shared.store.claim(id, &request)
                    })
                    .await;
                match claimed {
                    Ok(ClaimOutcome::Claimed(lease)) => (lease, None),
                    Ok(_) => return,
                    Err(err) => {
                        tracing::warn!(saga_id = %id, error = %err, "could not claim a started saga for a local worker; any coordinator will once its lease lapses");
                        return;
                    }
                }
            }
        };
        let handed = slot.hand_over(lease, state, run);
        reply();
        if let Err(lease) = handed {
            // The coordinator stopped meanwhile: let any coordinator have it at once.
            if let Err(err) = self.shared.store.release(&lease).await {
                tracing::warn!(saga_id = %lease.saga_id, error = %err, "could not release a saga started during shutdown; it runs once its lease lapses");
            }
        }
    }

    async fn create<S: Saga>(
        &self,
        input: &S::Input,
        options: StartOptions,
        claim: Option<ClaimRequest>,
    ) -> Result<(Started, Option<(Lease, SagaState)>), EngineError> {
        let input = serde_json::to_value(input).map_err(|source| EngineError::Encoding {
            what: format!("input of saga type `{}`", S::NAME),
            source,
        })?;
        self.create_value(S::NAME, S::VERSION, input, options, claim)
            .await
    }

    /// Creates a saga from an already encoded input (typed starts and `start_json`).
    pub(crate) async fn create_value(
        &self,
        name: &'static str,
        version: u32,
        input: serde_json::Value,
        options: StartOptions,
        claim: Option<ClaimRequest>,
    ) -> Result<(Started, Option<(Lease, SagaState)>), EngineError> {
        let key = options.idempotency_key;
        let id = match &key {
            Some(key) => SagaId::from_idempotency_key(name, key),
            None => SagaId::random(),
        };
        let print = fingerprint("start", &serde_json::json!([name, version, input]));
        let now = self.shared.clock.now();
        let state = SagaState::new(
            id,
            name.to_owned(),
            version,
            input.clone(),
            key.clone(),
            now,
        );
        let started = SagaEvent {
            seq: 0,
            at: now,
            kind: EventKind::SagaStarted {
                saga_type: name.to_owned(),
                version,
                input,
                idempotency_key: key.clone(),
            },
        };
        let encode = |what: &str, source| EngineError::Encoding {
            what: what.to_owned(),
            source,
        };
        let new = NewSaga {
            id,
            saga_type: name.to_owned(),
            idempotency_key: key.clone(),
            fingerprint: print,
            state: serde_json::to_string(&state).map_err(|e| encode("saga state", e))?,
            events: vec![serde_json::to_string(&started).map_err(|e| encode("event", e))?],
            claim,
        };
        // Retried while the store is briefly unavailable: the id is fixed, so a create whose
        // reply was lost is found as `Existing` instead of starting a second saga.
        let mut attempts = 0_u32;
        let retry = client_retry::ClientRetry::new(self.shared.config.client_retry.clone());
        let operation = format!("start saga {id}");
        let created = retry
            .run(&operation, StoreError::is_transient, || {
                attempts += 1;
                self.shared.store.create(new.clone())
            })
            .await;
        let retried = attempts > 1;
        match created {
            // Without a key the id is ours alone: finding it after a retry means our own
            // earlier attempt stored it.
            Ok(CreateOutcome::Existing { .. }) if key.is_none() && retried => {
                telemetry::saga_started(name);
                Ok((Started { id, created: true }, None))
            }
            Ok(CreateOutcome::Created { lease }) => {
                telemetry::saga_started(name);
                tracing::info!(saga_id = %id, saga_type = name, "saga started");
                Ok((
                    Started { id, created: true },
                    lease.map(|lease| (lease, state)),
                ))
            }
            Ok(CreateOutcome::Existing { .. }) => {
                telemetry::idempotency_hit();
                tracing::info!(saga_id = %id, saga_type = name, "idempotent start: saga exists");
                Ok((Started { id, created: false }, None))
            }
            Err(StoreError::IdempotencyConflict { saga }) => {
                Err(EngineError::IdempotencyConflict {
                    saga,
                    key: key.unwrap_or_default(),
                })
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Starts a saga of type `S` and runs it to its end in this process. An idempotent repeat
    /// runs the existing saga to its end instead (waiting for a run of it in this process);
    /// if another coordinator holds it, the call fails with [`EngineError::Busy`].
    ///
    /// # Errors
    /// As [`Engine::start`] and [`Engine::run_to_end`].
    pub async fn execute<S: Saga>(
        &self,
        input: &S::Input,
        options: StartOptions,
    ) -> Result<SagaOutcome, EngineError> {
        // A repeat of a keyed start that this engine is running now waits for that run (a
        // new saga without a key has a fresh id that nothing else here can be running).
        let mut local = match &options.idempotency_key {
            Some(key) => Some(
                self.shared
                    .local_run(SagaId::from_idempotency_key(S::NAME, key))
                    .await,
            ),
            None => None,
        };
        let claim = self.claim_request();
        let (started, lease) = self.create::<S>(input, options, Some(claim)).await?;
        let first = match lease {
            // The state was just written by this process: no need to read it back.
            Some((lease, state)) => {
                // A keyless start has a fresh id that nothing here runs yet.
                let mut run = match local.take() {
                    Some(run) => run,
                    None => self.shared.local_run(started.id).await,
                };
                let result = self.drive_state(lease, state).await;
                run.record(&result);
                Some(result?)
            }
            None => None,
        };
        drop(local);
        match first {
            Some(RunOutcome::Finished(outcome)) => Ok(outcome),
            Some(RunOutcome::Suspended(until)) => {
                self.sleep_until(started.id, until).await;
                self.run_to_end(started.id).await
            }
            None => self.run_to_end(started.id).await,
        }
    }

    /// What this engine knows about the sagas it runs itself (for the local coordinator).
    pub(crate) fn local(&self) -> &Arc<LocalState> {
        &self.shared.local
    }

    pub(crate) fn claim_request(&self) -> ClaimRequest {
        ClaimRequest {
            owner: self.shared.config.owner.clone(),
            ttl: self.shared.config.lease_ttl,
        }
    }

    /// Sleeps through a durable timer of saga `id`, waking early when it is cancelled (from
    /// this engine, or from another process when the store reports changes).
    async fn sleep_until(&self, id: SagaId, until: Timestamp) {
        let delay = until.since(self.shared.clock.now());
        self.shared.sleep_unless_cancelled(id, delay, true).await;
    }

    /// Claims the saga and runs it once: to its end, or until it sets a durable timer.
    ///
    /// # Errors
    /// [`EngineError::Busy`] when another owner holds its lease, [`EngineError::NotFound`],
    /// [`EngineError::Quarantined`], [`EngineError::Interrupted`] (fenced, store failure),
    /// or a store error.
    ///
    /// When this engine is already running the saga (a duplicate `execute`, say), waits for
    /// that run to end first instead of taking the lease from it.
    pub async fn run_once(&self, id: SagaId) -> Result<RunOutcome, EngineError> {
        let mut local = self.shared.local_run(id).await;
        match self.shared.store.claim(id, &self.claim_request()).await? {
            ClaimOutcome::Claimed(lease) => {
                let result = self.drive(lease).await;
                local.record(&result);
                result
            }
            ClaimOutcome::Busy(holder) => Err(EngineError::Busy {
                saga: id,
                owner: holder.owner,
                until: holder.expires_at,
            }),
            ClaimOutcome::NotRunnable {
                quarantined: Some(reason),
                ..
            } => Err(EngineError::Quarantined { saga: id, reason }),
            ClaimOutcome::NotRunnable { .. } => Ok(RunOutcome::Finished(self.outcome(id).await?)),
        }
    }

    /// Runs (or resumes) the saga in this process until it is terminal, sleeping through its
    /// durable timers.
    ///
    /// # Errors
    /// As [`Engine::run_once`].
    pub async fn run_to_end(&self, id: SagaId) -> Result<SagaOutcome, EngineError> {
        loop {
            match self.run_once(id).await? {
                RunOutcome::Finished(outcome) => return Ok(outcome),
                RunOutcome::Suspended(until) => self.sleep_until(id, until).await,
            }
        }
    }

    /// Claims up to `limit` due sagas (new, woken by their timer, or whose lease expired) and
    /// runs each once, concurrently. Returns each saga's result.
    ///
    /// # Errors
    /// A store error from the claim itself; per-saga errors are in the returned list.
    pub async fn run_due(
        &self,
        limit: usize,
    ) -> Result<Vec<(SagaId, Result<RunOutcome, EngineError>)>, EngineError> {
        let leases = self
            .shared
            .store
            .claim_due(&self.claim_request(), limit)
            .await?;
        let mut tasks = tokio::task::JoinSet::new();
        let mut sagas = HashMap::new();
        for lease in leases {
            let engine = self.clone();
            let id = lease.saga_id;
            let handle = tasks.spawn(async move {
                // Marked as running here so that a `run_once` of it in this process waits.
                let mut local = engine.shared.local_run(id).await;
                let result = engine.drive(lease).await;
                local.record(&result);
                result
            });
            sagas.insert(handle.id(), id);
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next_with_id().await {
            match joined {
                Ok((task, result)) => {
                    if let Some(id) = sagas.remove(&task) {
                        results.push((id, result));
                    }
                }
                Err(err) => {
                    let saga = sagas.remove(&err.id());
                    tracing::error!(error = %err, saga_id = ?saga, "saga task panicked; the saga resumes when its lease lapses");
                    if let Some(id) = saga {
                        results.push((
                            id,
                            Err(EngineError::Interrupted {
                                saga: id,
                                cause: Interruption::Panicked {
                                    what: format!("its task ({err})"),
                                },
                            }),
                        ));
                    }
                }
            }
        }
        Ok(results)
    }

    /// Asks for the saga to be cancelled: it stops before its next step and compensates every
    /// completed step. Works from any process; needs no lease. A run of the saga waiting in
    /// this process (a forward step's retry backoff, or an [`Engine::execute`] /
    /// [`Engine::run_to_end`] sleeping through a durable timer) wakes at once and compensates.
    /// An `execute` sleeping through a durable timer in another process wakes too when the
    /// store has a wake-up signal ([`SagaStore::wakeups`]: both bundled stores do), within
    /// about 250 ms; a backoff in another process (at most `inline_wait_max`) learns of the
    /// cancel when it ends, and a saga waiting for its timer with no process sleeping on it is
    /// made due at once by the store.
    ///
    /// # Errors
    /// [`EngineError::NotFound`] or a store error.
    pub async fn cancel(&self, id: SagaId, reason: &str) -> Result<CancelOutcome, EngineError> {
        let event = SagaEvent {
            seq: 0,
            at: self.shared.clock.now(),
            kind: EventKind::CancelRequested {
                reason: reason.to_owned(),
            },
        };
        let encoded = serde_json::to_string(&event).map_err(|source| EngineError::Encoding {
            what: "cancel event".into(),
            source,
        })?;
        match self.shared.store.request_cancel(id, encoded).await {
            Ok(outcome) => {
                if outcome == CancelOutcome::Requested {
                    // Nobody waiting is no error: a run notices the flag at its next commit.
                    let _ = self.shared.cancels.send(id);
                }
                Ok(outcome)
            }
            Err(StoreError::NotFound(id)) => Err(EngineError::NotFound(id)),
            Err(err) => Err(err.into()),
        }
    }

    /// The saga's current state (status and journal).
    ///
    /// # Errors
    /// [`EngineError::NotFound`], or [`EngineError::Encoding`] when the stored state does not
    /// decode.
    ///
    /// A saga that completed or compensated is stored compact (see
    /// [`SagaState::is_compact`]): its journal is rebuilt from its history (one more read),
    /// and the rest of the fold is checked against what is stored.
    pub async fn state(&self, id: SagaId) -> Result<SagaState, EngineError> {
        let state = self.stored_state(id).await?;
        if !state.is_compact() {
            return Ok(state);
        }
        let history = self.history(id).await?;
        let full = SagaState::fold(id, &history).map_err(|err| StoreError::Corrupt {
            saga: id,
            problem: format!("the history of a finished saga does not fold: {err}"),
        })?;
        // What the running saga recorded itself must agree; `updated_at` and the cancel
        // flag may not (a cancel request appends its event, stamped by the canceller's clock,
        // without the running saga ever folding it).
        let mut check = full.compact();
        check.updated_at = state.updated_at;
        check.cancel_requested = state.cancel_requested;
        if check != state {
            return Err(StoreError::Corrupt {
                saga: id,
                problem: "the stored state of a finished saga differs from its history".into(),
            }
            .into());
        }
        Ok(SagaState {
            journal: full.journal,
            ..state
        })
    }

    /// The state as stored (compact for a saga that completed or compensated).
    async fn stored_state(&self, id: SagaId) -> Result<SagaState, EngineError> {
        self.stored_with_quarantine(id)
            .await
            .map(|(state, _)| state)
    }

    /// The state as stored, and the quarantine reason if the saga is set aside.
    pub(crate) async fn stored_with_quarantine(
        &self,
        id: SagaId,
    ) -> Result<(SagaState, Option<String>), EngineError> {
        let stored = self
            .shared
            .store
            .load(id)
            .await?
            .ok_or(EngineError::NotFound(id))?;
        let mut state: SagaState =
            serde_json::from_str(&stored.state).map_err(|source| EngineError::Encoding {
                what: format!("stored state of saga {id}"),
                source,
            })?;
        state.cancel_requested |= stored.cancel_requested;
        Ok((state, stored.quarantined))
    }

    /// The saga's outcome so far (one read: the journal is not needed).
    ///
    /// # Errors
    /// As [`Engine::state`].
    pub async fn outcome(&self, id: SagaId) -> Result<SagaOutcome, EngineError> {
        Ok(SagaOutcome::from_state(&self.stored_state(id).await?))
    }

    /// The saga's full event history, oldest first.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], or [`EngineError::Encoding`] for an undecodable event.
    pub async fn history(&self, id: SagaId) -> Result<Vec<SagaEvent>, EngineError> {
        let raw = match self.shared.store.events(id).await {
            Ok(raw) => raw,
            Err(StoreError::NotFound(id)) => return Err(EngineError::NotFound(id)),
            Err(err) => return Err(err.into()),
        };
        raw.iter()
            .enumerate()
            .map(|(seq, text)| {
                let mut event: SagaEvent =
                    serde_json::from_str(text).map_err(|source| EngineError::Encoding {
                        what: format!("event #{seq} of saga {id}"),
                        source,
                    })?;
                event.seq = seq as u64;
                Ok(event)
            })
            .collect()
    }

    async fn quarantine(&self, id: SagaId, reason: String) -> EngineError {
        tracing::error!(saga_id = %id, %reason, "saga quarantined");
        telemetry::quarantined();
        match self.shared.store.quarantine(id, &reason).await {
            Ok(()) => EngineError::Quarantined { saga: id, reason },
            Err(err) => err.into(),
        }
    }

    /// Runs a claimed saga: replays its journal, executes what remains, compensates when it
    /// must. The lease stays fenced against every other writer throughout.
    pub(crate) async fn drive(&self, lease: Lease) -> Result<RunOutcome, EngineError> {
        let id = lease.saga_id;
        let stored = match self.shared.store.load(id).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Err(EngineError::NotFound(id)),
            Err(StoreError::Corrupt { problem, .. }) => {
                return Err(self
                    .quarantine(id, format!("stored saga is corrupt: {problem}"))
                    .await);
            }
            Err(err) => return Err(err.into()),
        };
        let mut state: SagaState = match serde_json::from_str(&stored.state) {
            Ok(state) => state,
            Err(err) => {
                return Err(self
                    .quarantine(id, format!("stored state does not decode: {err}"))
                    .await);
            }
        };
        state.cancel_requested |= stored.cancel_requested;
        self.drive_state(lease, state).await
    }

    /// Runs a claimed saga whose current state is known.
    async fn drive_state(&self, lease: Lease, state: SagaState) -> Result<RunOutcome, EngineError> {
        let id = lease.saga_id;
        if state.status.is_terminal() {
            return Ok(RunOutcome::Finished(SagaOutcome::from_state(&state)));
        }
        let Some(saga) = self.shared.registry.get(state.saga_type.as_str()).cloned() else {
            let mut known: Vec<&str> = self.shared.registry.keys().copied().collect();
            known.sort_unstable();
            let reason = format!(
                "unknown saga type `{}` (this coordinator runs {known:?})",
                state.saga_type
            );
            return Err(self.quarantine(id, reason).await);
        };
        let span = tracing::info_span!("saga", saga_id = %id, saga_type = %state.saga_type);
        self.drive_with(saga, lease, state).instrument(span).await
    }

    async fn drive_with(
        &self,
        saga: Arc<dyn ErasedSaga>,
        lease: Lease,
        state: SagaState,
    ) -> Result<RunOutcome, EngineError> {
        let id = lease.saga_id;
        let input = state.input.clone();
        let resumed_from = resumed_from(&state);
        let mut ctx = SagaContext {
            shared: Arc::clone(&self.shared),
            saga_type: Arc::from(saga.name()),
            mode: if state.status == SagaStatus::Compensating {
                Mode::Collect
            } else {
                Mode::Forward
            },
            lease,
            state,
            pending: Vec::new(),
            position: 0,
            halt: None,
            steps: Vec::new(),
            rng: fastrand::Rng::new(),
            unexecuted: None,
            commits: 0,
            resolve_in_flight: false,
        };
        let owner = ctx.lease.owner.clone();
        let fence = ctx.lease.fence;
        ctx.record(EventKind::LeaseAcquired {
            owner: owner.clone(),
            fence,
        })
        .map_err(|h| halt_error(id, h))?;
        if let Some(reason) = resumed_from {
            telemetry::resumed(reason);
            tracing::info!(status = %ctx.state.status, reason, "resuming saga from its journal");
            let completed_steps = ctx
                .state
                .journal
                .iter()
                .filter(|r| !r.is_value && r.status == StepStatus::Succeeded)
                .count() as u32;
            let status = ctx.state.status;
            ctx.record(EventKind::SagaResumed {
                owner,
                status,
                completed_steps,
            })
            .map_err(|h| halt_error(id, h))?;
        }
        let result = saga.run_erased(&mut ctx, input).await;
        let compensating = match (ctx.mode, ctx.halt.take(), result) {
            (Mode::Forward, None, Ok(output)) => {
                let recorded = ctx.state.journal.len() as u32;
                if ctx.position < recorded {
                    let message = format!(
                        "the workflow finished after {} journal entries but {recorded} are recorded",
                        ctx.position
                    );
                    let position = ctx.position;
                    return self
                        .fail_nondeterministic(&mut ctx, position, message)
                        .await;
                }
                ctx.commit(
                    vec![EventKind::SagaCompleted { output }],
                    Schedule::Finished,
                )
                .await
                .map_err(|h| halt_error(id, h))?;
                false
            }
            (Mode::Forward, None, Err(err)) => {
                let reason = CompensationReason::Aborted {
                    message: err.to_string(),
                };
                self.start_compensation(&mut ctx, reason).await?;
                true
            }
            (Mode::Forward, Some(Halt::Cancelled), _) => {
                let reason = self.cancel_reason(id).await;
                self.start_compensation(&mut ctx, CompensationReason::Cancelled { reason })
                    .await?;
                true
            }
            (_, Some(Halt::StepFailed(_)), _) => true,
            (Mode::Collect, None | Some(Halt::Collected | Halt::Cancelled), _) => {
                // Every completed step must have been seen again, or its undo would be
                // skipped without a word: a replay that ends early has diverged.
                let seen: std::collections::HashSet<u32> =
                    ctx.steps.iter().map(|r| r.position).collect();
                let missing = ctx
                    .state
                    .journal
                    .iter()
                    .find(|r| {
                        !r.is_value
                            && r.status == StepStatus::Succeeded
                            && !seen.contains(&r.position)
                    })
                    .map(|r| (r.position, r.name.clone()));
                if let Some((position, name)) = missing {
                    let message = format!(
                        "replaying for compensation, the workflow ended before it reached completed step `{name}`"
                    );
                    return self
                        .fail_nondeterministic(&mut ctx, position, message)
                        .await;
                }
                true
            }
            (_, Some(Halt::Suspended(until)), _) => return Ok(RunOutcome::Suspended(until)),
            (_, Some(Halt::NonDeterministic { position, message }), _) => {
                return self
                    .fail_nondeterministic(&mut ctx, position, message)
                    .await;
            }
            (_, Some(halt @ (Halt::Interrupted(_) | Halt::BadData(_) | Halt::Collected)), _) => {
                return Err(self.halted(id, halt).await);
            }
        };
        if compensating {
            match compensate::compensate(&mut ctx).await {
                Ok(_) => {}
                Err(Halt::Suspended(until)) => return Ok(RunOutcome::Suspended(until)),
                Err(halt) => return Err(self.halted(id, halt).await),
            }
        }
        let outcome = SagaOutcome::from_state(&ctx.state);
        let seconds = ctx
            .state
            .updated_at
            .since(ctx.state.created_at)
            .as_secs_f64();
        telemetry::saga_finished(outcome.status, seconds);
        tracing::info!(status = %outcome.status, "saga finished");
        Ok(RunOutcome::Finished(outcome))
    }

    async fn start_compensation(
        &self,
        ctx: &mut SagaContext,
        reason: CompensationReason,
    ) -> Result<(), EngineError> {
        tracing::warn!(%reason, "compensating");
        let ttl = self.shared.config.lease_ttl;
        match ctx
            .commit(
                vec![EventKind::CompensationStarted { reason }],
                Schedule::Continue { ttl },
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(halt) => Err(self.halted(ctx.lease.saga_id, halt).await),
        }
    }

    async fn cancel_reason(&self, id: SagaId) -> String {
        let history = self.history(id).await.unwrap_or_default();
        history
            .iter()
            .rev()
            .find_map(|event| match &event.kind {
                EventKind::CancelRequested { reason } => Some(reason.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "cancel requested".to_owned())
    }

    async fn fail_nondeterministic(
        &self,
        ctx: &mut SagaContext,
        position: u32,
        message: String,
    ) -> Result<RunOutcome, EngineError> {
        let error = format!("non-deterministic workflow at journal position {position}: {message}");
        tracing::error!(%error, "saga failed");
        ctx.commit(
            vec![EventKind::SagaFailed {
                kind: FailureKind::NonDeterministic,
                error,
            }],
            Schedule::Finished,
        )
        .await
        .map_err(|h| halt_error(ctx.lease.saga_id, h))?;
        let seconds = ctx
            .state
            .updated_at
            .since(ctx.state.created_at)
            .as_secs_f64();
        telemetry::saga_finished(SagaStatus::Failed, seconds);
        Ok(RunOutcome::Finished(SagaOutcome::from_state(&ctx.state)))
    }

    async fn halted(&self, id: SagaId, halt: Halt) -> EngineError {
        match halt {
            Halt::BadData(reason) => self.quarantine(id, reason).await,
            other => halt_error(id, other),
        }
    }
}

fn halt_error(id: SagaId, halt: Halt) -> EngineError {
    let reason = match halt {
        Halt::Interrupted(cause) => return EngineError::Interrupted { saga: id, cause },
        Halt::BadData(reason) => reason,
        Halt::StepFailed(err) => {
            format!("stopped after a step failed ({err}) before compensation was recorded")
        }
        Halt::Cancelled => {
            "stopped by a cancel request before compensation was recorded".to_owned()
        }
        Halt::Suspended(until) => format!("suspended until {until}"),
        Halt::NonDeterministic { position, message } => {
            format!("non-deterministic workflow at journal position {position}: {message}")
        }
        Halt::Collected => "stopped while replaying for compensation".to_owned(),
    };
    EngineError::Interrupted {
        saga: id,
        cause: Interruption::Stopped(reason),
    }
}

/// Why a claimed saga counts as resumed, or `None` for its first run.
fn resumed_from(state: &SagaState) -> Option<&'static str> {
    state.owner.as_ref()?;
    let waiting = state.journal.last().is_some_and(|r| {
        r.status == StepStatus::Retrying
            || r.compensation
                .as_ref()
                .is_some_and(|c| c.next_retry_at.is_some())
    });
    Some(if waiting { "timer" } else { "recovery" })
}
