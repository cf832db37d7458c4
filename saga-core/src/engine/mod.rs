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
