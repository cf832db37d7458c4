//! The engine: starts sagas, runs them with their lease, resumes them from their journal,
//! compensates them, and answers questions about them.
//!
//! One module per concern: `builder` (settings and their checks), `shared` (what every clone
//! and running saga shares), `outcome` (start options and results), `start` (durable create,
//! local hand-over, `execute`), `run` (run entry points), `drive` (the state machine of one
//! run) with `decide` (its pure decision), `queries` (state, outcome, history) and
//! `operations` (start by name, wait, cancel, operator actions, shutdown).

mod attempt;
mod builder;
mod child;
mod client_retry;
mod compensate;
mod context;
mod decide;
mod definition;
mod drive;
mod error;
mod guarded;
mod handle;
mod lease_keeper;
mod local;
mod operations;
mod outcome;
mod queries;
mod registry;
mod run;
mod shared;
mod signal;
mod start;
mod wait;

use std::sync::Arc;
use std::time::Duration;

pub use builder::{EngineBuilder, EngineConfig};
pub(crate) use child::{CHILD_FINISHED, CHILD_OUTCOME, START_CHILD};
pub use client_retry::{ClientRetry, RetryNotice, RetryingStore};
pub(crate) use context::PARALLEL;
pub use context::SagaContext;
pub use context::{Branch, ChildSaga, Join, OnBranchFailure, Parallel};
pub use definition::Saga;
pub use error::{EngineError, Interruption, SagaError, SignalPart};
pub use handle::{Outcome, SagaHandle, StartSaga};
pub use signal::{SignalSent, SignalSpec};

/// The journaled-value name of a durable sleep's wake-up time ([`SagaContext::sleep`]).
pub(crate) const SLEEP_UNTIL: &str = "sleep_until";
/// The journaled-value name of a signal wait's deadline ([`SagaContext::wait_for_signal`]);
/// `:` and the signal's name follow.
pub(crate) const SIGNAL_DEADLINE: &str = "signal_deadline";
/// The prefix of the journaled value that records what a signal wait got: the signal's
/// name follows.
pub(crate) const SIGNAL_PREFIX: &str = "signal:";
pub use outcome::{RunOutcome, SagaOutcome, StartOptions, Started};

pub(crate) use local::{Dispatch, Handoff, LocalState};
pub(crate) use shared::Shared;

use crate::store::{ClaimRequest, SagaStore};

/// The saga engine. Cheap to clone; every clone shares the store, registry and resources.
///
/// ```
/// use saga_core::{Engine, MemoryStore, Saga, SagaContext, SagaError, SagaStatus, StartOptions};
///
/// struct Hello;
///
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
            .field("sagas", &self.shared.registry)
            .finish_non_exhaustive()
    }
}

impl Engine {
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

    /// Checks, at configuration time, that records kept for `ttl` outlive every use the
    /// engine can make of `step`'s idempotency keys: its forward key over its retry policy
    /// and, when it compensates, its compensation key over its compensation policy (see
    /// [`StepContext::key_lifetime`](crate::StepContext::key_lifetime)). Call it at start-up
    /// for each step whose effect is deduplicated for a fixed time (an
    /// [`IdempotencyGuard`](crate::IdempotencyGuard) TTL, a downstream key store's
    /// retention), so that a too-short TTL stops the deploy instead of allowing a duplicate.
    ///
    /// # Errors
    /// [`EngineError::Config`] naming the step, the phase, the TTL and the shortest one that
    /// would do. A step without a timeout has no known bound and is accepted; it is then
    /// up to its TTL to be generous.
    pub fn check_guard_ttl<S: crate::Step>(
        &self,
        step: &S,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        let config = &self.shared.config;
        let mut phases = vec![("forward", step.retry_policy())];
        if matches!(
            S::COMPENSATION,
            crate::Compensation::OnSuccess | crate::Compensation::Always
        ) {
            phases.push(("compensation", step.compensation_retry_policy()));
        }
        for (phase, policy) in phases {
            if let Some(needed) = config.key_lifetime(&policy, step.timeout())
                && ttl < needed
            {
                return Err(EngineError::Config(format!(
                    "step `{}`: an idempotency record TTL of {ttl:?} is shorter than the {needed:?} its {phase} may still run under one key (retry schedule with every attempt timing out, plus {} interruptions, each a lapsed lease of {:?} and the attempt again); use a TTL of at least {needed:?}, or shorten the step's retry policy or timeout",
                    S::NAME,
                    config.max_interruptions,
                    config.lease_ttl
                )));
            }
        }
        Ok(())
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
}
