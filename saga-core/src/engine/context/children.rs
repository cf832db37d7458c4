//! Child sagas, as a workflow sees them: start one (a journal step whose output is the
//! child's id), wait for its typed outcome (a journaled value), or both at once.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Halt, Interruption, Mode, SagaContext, Slot};
use crate::engine::child::{CHILD_OUTCOME, CHILD_RECHECK, ChildStart, StartChild};
use crate::engine::queries::decode_state;
use crate::engine::{Engine, Outcome, Saga, SagaError, SagaOutcome};
use crate::store::Schedule;
use crate::{CompensationReason, FailureKind, ParentLink, SagaId, SagaStatus};

/// A child saga a workflow started with [`SagaContext::start_child`]: wait for its outcome
/// with [`SagaContext::child_outcome`].
pub struct ChildSaga<C> {
    id: SagaId,
    saga: PhantomData<fn() -> C>,
}

impl<C> ChildSaga<C> {
    /// The child's saga id (look it up like any saga: `saga show`, `GET /sagas/{id}`).
    #[must_use]
    pub fn id(&self) -> SagaId {
        self.id
    }
}

impl<C> Clone for ChildSaga<C> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            saga: PhantomData,
        }
    }
}

impl<C> std::fmt::Debug for ChildSaga<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSaga")
            .field("id", &self.id)
            .field("saga_type", &std::any::type_name::<C>())
            .finish()
    }
}

/// How a child ended, as the parent's journal records it.
#[derive(Serialize, Deserialize)]
struct RecordedOutcome {
    id: SagaId,
    status: SagaStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<CompensationReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure: Option<(FailureKind, String)>,
}

impl SagaContext {
    /// Starts a child saga of type `C` with `input`, exactly once: its idempotency key is
    /// derived from this saga's id and the journal position, so a crash, a retry or a replay
    /// finds the same child instead of starting another. The child runs on any coordinator
    /// (it may live in another partition of the store); its history names this saga as its
    /// parent. If this saga compensates later, the child is undone as part of its reverse
    /// order (a running child is cancelled, a completed one reopened to compensate), and this
    /// saga's compensation waits until the child has compensated.
    ///
    /// `C` must be registered on the coordinators that run this saga.
    ///
    /// # Errors
    /// As [`SagaContext::run`]: starting the child is a step (it fails for good when `C` is
    /// not registered here).
    pub async fn start_child<C: Saga>(
        &mut self,
        saga: C,
        input: C::Input,
    ) -> Result<ChildSaga<C>, SagaError> {
        // The type is named by `C`; the value only makes call sites read like `run(Step, …)`.
        drop(saga);
        let position = self.position;
        let input = match serde_json::to_value(&input) {
            Ok(input) => input,
            Err(err) => {
                return Err(self.stop(Halt::BadData(format!(
                    "input of child saga `{}` does not encode: {err}",
                    C::NAME
                ))));
            }
        };
        let start = ChildStart {
            saga_type: C::NAME.to_owned(),
            version: C::VERSION,
            key: format!("{}/{position}", self.state.id),
            input,
        };
        let step = StartChild {
            engine: Engine {
                shared: std::sync::Arc::clone(&self.shared),
            },
            parent: ParentLink {
                id: self.state.id,
                saga_type: self.saga_type.to_string(),
                position,
            },
        };
        let child = self.run(step, start).await?;
        Ok(ChildSaga {
            id: child.id,
            saga: PhantomData,
        })
    }

    /// Waits durably for `child` to end, and returns its typed outcome. While the child runs
    /// this saga holds no lease and no worker: it is suspended, and made due when the child
    /// finishes (or, should that wake-up be lost, within a minute). A cancel request ends the
    /// wait and this saga compensates, cancelling the child.
    ///
    /// # Errors
    /// As [`SagaContext::run`] ([`SagaError::Suspended`] ends the run while the child runs).
    pub async fn child_outcome<C: Saga>(
        &mut self,
        child: &ChildSaga<C>,
    ) -> Result<Outcome<C::Output>, SagaError> {
        if let Some(halt) = &self.halt {
            return Err(halt.to_error());
        }
        let position = self.position;
        self.position += 1;
        let recorded = match self.slot(position, CHILD_OUTCOME, true, &Value::Null) {
            Ok(Slot::Replay { output }) => output,
            Ok(Slot::Fresh) if self.mode == Mode::Collect => {
                return Err(self.stop(Halt::Collected));
            }
            Ok(Slot::Fresh) => match self.await_child(position, child.id).await {
                Ok(recorded) => recorded,
                Err(halt) => return Err(self.stop(halt)),
            },
            Ok(Slot::InFlight { .. } | Slot::Failed) => {
                return Err(self.stop(Halt::NonDeterministic {
                    position,
                    message: "the journal holds a step where the workflow waits for a child saga"
                        .into(),
                }));
            }
            Err(halt) => return Err(self.stop(halt)),
        };
        let outcome = serde_json::from_value::<RecordedOutcome>(recorded)
            .map_err(|err| err.to_string())
            .and_then(|r| {
                let untyped = SagaOutcome {
                    id: r.id,
                    status: r.status,
                    output: r.output,
                    compensation_reason: r.reason,
                    failure: r.failure,
                };
                Outcome::from_untyped(&untyped)
                    .map_err(|err| err.to_string())?
                    .ok_or_else(|| format!("a {} child was recorded as ended", r.status))
            });
        outcome.map_err(|message| {
            self.stop(Halt::NonDeterministic {
                position,
                message: format!(
                    "the recorded outcome of child saga {} does not decode as `{}`: {message}",
                    child.id,
                    C::NAME
                ),
            })
        })
    }

    /// Starts a child saga and waits for its outcome: [`SagaContext::start_child`] then
    /// [`SagaContext::child_outcome`].
    ///
    /// # Errors
    /// As those two.
    pub async fn child<C: Saga>(
        &mut self,
        saga: C,
        input: C::Input,
    ) -> Result<Outcome<C::Output>, SagaError> {
        let child = self.start_child(saga, input).await?;
        self.child_outcome(&child).await
    }

    /// Looks at the child; records its outcome once it has ended, else suspends this saga
    /// until the child's wake-up signal (or the recheck timer).
    async fn await_child(&mut self, position: u32, child: SagaId) -> Result<Value, Halt> {
        if self.state.cancel_pending() {
            return Err(Halt::Cancelled);
        }
        // The inbox is read before the child, so that a child finishing in between leaves a
        // wake-up the wait below sees (it is then due at once).
        let seen = self
            .shared
            .store
            .signals(self.state.id, 0)
            .await
            .map_err(|err| Halt::Interrupted(Interruption::from_store(err)))?
            .last()
            .map_or(0, |s| s.sequence);
        let stored = self
            .shared
            .store
            .load(child)
            .await
            .map_err(|err| Halt::Interrupted(Interruption::from_store(err)))?
            .ok_or_else(|| {
                Halt::BadData(format!(
                    "child saga {child} (started at journal position {}) is not in the store",
                    position.saturating_sub(1)
                ))
            })?;
        let state = decode_state(&stored).map_err(|err| {
            Halt::BadData(format!("child saga {child}'s state does not decode: {err}"))
        })?;
        if state.status.is_terminal() {
            let recorded = RecordedOutcome {
                id: child,
                status: state.status,
                output: state.output,
                reason: state.compensation_reason,
                failure: state.failure,
            };
            let value = serde_json::to_value(recorded)
                .map_err(|err| Halt::BadData(format!("child outcome does not encode: {err}")))?;
            self.record_value(position, CHILD_OUTCOME, value.clone())?;
            tracing::info!(%child, status = %state.status, position, "child saga ended");
            return Ok(value);
        }
        let wait = Schedule::AwaitSignal {
            timeout: CHILD_RECHECK,
            seen,
        };
        self.commit(Vec::new(), wait).await?;
        Err(Halt::Suspended(self.shared.clock.now().plus(CHILD_RECHECK)))
    }
}
