//! The typed way in: `engine.start(DealFlow, input).key(k).await?` gives a [`SagaHandle`]
//! whose [`wait`](SagaHandle::wait) returns an [`Outcome`] of the saga's own output type.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;

use super::{Engine, EngineError, Saga, SagaOutcome, StartOptions};
use crate::store::CancelOutcome;
use crate::{CompensationReason, FailureKind, SagaEvent, SagaId, SagaState, SagaStatus};

/// How a saga ended, with its output decoded as the saga type's `Output`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Outcome<T> {
    /// Every step succeeded; the workflow's output.
    Completed(T),
    /// Every completed step was undone.
    Compensated {
        /// Why it compensated.
        reason: CompensationReason,
    },
    /// It stopped for good and needs an operator (a compensation gave up, the workflow
    /// diverged from its journal, a failure past the pivot, or it was abandoned).
    Failed {
        /// What kind of failure.
        kind: FailureKind,
        /// The error.
        error: String,
    },
}

impl<T> Outcome<T> {
    /// The output, when completed.
    pub fn completed(self) -> Option<T> {
        match self {
            Outcome::Completed(output) => Some(output),
            _ => None,
        }
    }

    /// The status this outcome stands for.
    #[must_use]
    pub fn status(&self) -> SagaStatus {
        match self {
            Outcome::Completed(_) => SagaStatus::Completed,
            Outcome::Compensated { .. } => SagaStatus::Compensated,
            Outcome::Failed { .. } => SagaStatus::Failed,
        }
    }
}

impl<T: serde::de::DeserializeOwned> Outcome<T> {
    /// The typed outcome of a terminal [`SagaOutcome`]; `None` while it is not terminal.
    ///
    /// # Errors
    /// [`EngineError::Encoding`] when the stored output does not decode as `T`.
    pub fn from_untyped(outcome: &SagaOutcome) -> Result<Option<Self>, EngineError> {
        Ok(Some(match outcome.status {
            SagaStatus::Completed => {
                let value = outcome.output.clone().unwrap_or(serde_json::Value::Null);
                let output =
                    serde_json::from_value(value).map_err(|source| EngineError::Encoding {
                        what: format!("output of saga {}", outcome.id),
                        source,
                    })?;
                Outcome::Completed(output)
            }
            SagaStatus::Compensated => Outcome::Compensated {
                reason: outcome.compensation_reason.clone().unwrap_or_else(|| {
                    CompensationReason::Aborted {
                        message: "no reason was recorded".into(),
                    }
                }),
            },
            SagaStatus::Failed => {
                let (kind, error) = outcome
                    .failure
                    .clone()
                    .unwrap_or((FailureKind::BadData, "no failure was recorded".into()));
                Outcome::Failed { kind, error }
            }
            SagaStatus::Running | SagaStatus::Compensating => return Ok(None),
        }))
    }
}

/// A saga of type `S`: its id and typed access to its outcome, state, history and cancel.
/// Cheap to clone; holding one keeps nothing running.
pub struct SagaHandle<S: Saga> {
    engine: Engine,
    id: SagaId,
    created: bool,
    saga: PhantomData<fn() -> S>,
}

impl<S: Saga> Clone for SagaHandle<S> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            id: self.id,
            created: self.created,
            saga: PhantomData,
        }
    }
}

impl<S: Saga> std::fmt::Debug for SagaHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaHandle")
            .field("saga_type", &S::NAME)
            .field("id", &self.id)
            .field("created", &self.created)
            .finish()
    }
}

/// How long [`SagaHandle::wait`] waits per round before looking again.
const WAIT_ROUND: Duration = Duration::from_secs(3600);

impl<S: Saga> SagaHandle<S> {
    /// The saga id.
    #[must_use]
    pub fn id(&self) -> SagaId {
        self.id
    }

    /// `false` when the start found the saga its idempotency key had already started.
    #[must_use]
    pub fn created(&self) -> bool {
        self.created
    }

    /// Waits until the saga is terminal, however long that takes (a saga suspended on a
    /// durable timer for a day waits a day), and returns its typed outcome.
    ///
    /// # Errors
    /// As [`Engine::wait`] (a quarantined saga ends the wait with
    /// [`EngineError::Quarantined`]), and [`EngineError::Encoding`] when the output does not
    /// decode as `S::Output`.
    pub async fn wait(&self) -> Result<Outcome<S::Output>, EngineError> {
        loop {
            if let Some(outcome) = self.wait_for(WAIT_ROUND).await? {
                return Ok(outcome);
            }
        }
    }

    /// Waits at most `timeout` for the saga to end: `None` when it is still running then.
    ///
    /// # Errors
    /// As [`SagaHandle::wait`].
    pub async fn wait_for(
        &self,
        timeout: Duration,
    ) -> Result<Option<Outcome<S::Output>>, EngineError> {
        match self.engine.wait(self.id, timeout).await {
            Ok(outcome) => Outcome::from_untyped(&outcome),
            Err(EngineError::WaitTimedOut { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The outcome now: `None` while the saga is running or compensating.
    ///
    /// # Errors
    /// As [`Engine::outcome`], and [`EngineError::Encoding`] for an output that does not
    /// decode as `S::Output`.
    pub async fn outcome(&self) -> Result<Option<Outcome<S::Output>>, EngineError> {
        Outcome::from_untyped(&self.engine.outcome(self.id).await?)
    }

    /// Runs the saga here until it ends (see [`Engine::run_to_end`]) and returns its outcome.
    ///
    /// # Errors
    /// As [`Engine::run_to_end`], and [`EngineError::Encoding`] for an output that does not
    /// decode as `S::Output`.
    pub async fn run_to_end(&self) -> Result<Outcome<S::Output>, EngineError> {
        let outcome = self.engine.run_to_end(self.id).await?;
        Outcome::from_untyped(&outcome)?.ok_or_else(|| EngineError::WaitTimedOut {
            saga: self.id,
            status: outcome.status,
        })
    }

    /// The saga's current status.
    ///
    /// # Errors
    /// As [`Engine::state`].
    pub async fn status(&self) -> Result<SagaStatus, EngineError> {
        Ok(self.engine.state(self.id).await?.status)
    }

    /// The saga's folded state: journal, lease holder, fencing token, pivot, input.
    ///
    /// # Errors
    /// As [`Engine::state`].
    pub async fn state(&self) -> Result<SagaState, EngineError> {
        self.engine.state(self.id).await
    }

    /// The saga's event history, oldest first.
    ///
    /// # Errors
    /// As [`Engine::history`].
    pub async fn history(&self) -> Result<Vec<SagaEvent>, EngineError> {
        self.engine.history(self.id).await
    }

    /// Asks for the saga to be cancelled (see [`Engine::cancel`]).
    ///
    /// # Errors
    /// As [`Engine::cancel`]: [`EngineError::PastPivot`] once the saga has passed its pivot.
    pub async fn cancel(&self, reason: &str) -> Result<CancelOutcome, EngineError> {
        self.engine.cancel(self.id, reason).await
    }
}

/// A start of a saga of type `S` being set up: `.key(..)` and `.options(..)` set it up,
/// `.await` stores it and gives its [`SagaHandle`], [`StartSaga::execute`] runs it here to its
/// end. Made by [`Engine::start`].
#[must_use = "a start does nothing until it is awaited"]
pub struct StartSaga<'e, S: Saga> {
    engine: &'e Engine,
    input: S::Input,
    options: StartOptions,
}

impl<S: Saga> std::fmt::Debug for StartSaga<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartSaga")
            .field("saga_type", &S::NAME)
            .field("version", &S::VERSION)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<'e, S: Saga> StartSaga<'e, S> {
    /// Starts it with this idempotency key: starting again with the same key (and input)
    /// gives the same saga, with another input it is [`EngineError::IdempotencyConflict`].
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.options.idempotency_key = Some(key.into());
        self
    }

    /// Starts it with these options (replacing the key set so far).
    pub fn options(mut self, options: StartOptions) -> Self {
        self.options = options;
        self
    }

    /// Starts the saga and runs it to its end in this process (see [`Engine::execute`]).
    ///
    /// # Errors
    /// As [`Engine::execute`], and [`EngineError::Encoding`] for an output that does not
    /// decode as `S::Output`.
    pub async fn execute(self) -> Result<Outcome<S::Output>, EngineError> {
        let outcome = self.engine.execute::<S>(&self.input, self.options).await?;
        Outcome::from_untyped(&outcome)?.ok_or(EngineError::WaitTimedOut {
            saga: outcome.id,
            status: outcome.status,
        })
    }

    async fn store(self) -> Result<SagaHandle<S>, EngineError> {
        let started = self
            .engine
            .start_with::<S>(&self.input, self.options)
            .await?;
        Ok(SagaHandle {
            engine: self.engine.clone(),
            id: started.id,
            created: started.created,
            saga: PhantomData,
        })
    }
}

impl<'e, S: Saga> IntoFuture for StartSaga<'e, S> {
    type Output = Result<SagaHandle<S>, EngineError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'e>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.store())
    }
}

impl Engine {
    /// Starts a saga of type `S` (the value only names the type: the registered instance
    /// runs it) with `input`. Set it up, then `.await` it for a [`SagaHandle`], or
    /// [`execute`](StartSaga::execute) it to run it here to its end:
    ///
    /// ```
    /// # use saga_core::{Engine, MemoryStore, Outcome, SagaContext, SagaError};
    /// #[saga_core::saga(name = "greeting")]
    /// async fn greeting(_saga: &mut SagaContext, name: String) -> Result<String, SagaError> {
    ///     Ok(format!("hello, {name}"))
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), saga_core::EngineError> {
    /// let engine = Engine::builder(MemoryStore::new()).register(Greeting).build()?;
    /// let handle = engine.start(Greeting, "ada".to_owned()).key("greet-ada").await?;
    /// handle.run_to_end().await?;
    /// assert_eq!(handle.wait().await?, Outcome::Completed("hello, ada".to_owned()));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// The saga is durable once the `.await` returns (see [`Engine::start_with`] for what a
    /// start guarantees and how it is retried); it runs when a coordinator claims it, or here
    /// with [`SagaHandle::run_to_end`].
    pub fn start<S: Saga>(&self, saga: S, input: S::Input) -> StartSaga<'_, S> {
        // The value names the type; the registered instance is the one that runs.
        drop(saga);
        StartSaga {
            engine: self,
            input,
            options: StartOptions::default(),
        }
    }

    /// A handle on an existing saga of type `S`.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], [`EngineError::WrongSagaType`] when the saga is of another
    /// type or was started under another version of it, or a store error.
    pub async fn handle<S: Saga>(&self, id: SagaId) -> Result<SagaHandle<S>, EngineError> {
        let state = self.state(id).await?;
        if state.saga_type != S::NAME || state.version != S::VERSION {
            return Err(EngineError::WrongSagaType {
                saga: id,
                expected: S::NAME,
                expected_version: S::VERSION,
                actual: state.saga_type,
                actual_version: state.version,
            });
        }
        Ok(SagaHandle {
            engine: self.clone(),
            id,
            created: false,
            saga: PhantomData,
        })
    }
}
