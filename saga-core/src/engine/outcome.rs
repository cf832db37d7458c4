//! What callers pass to a start and get back from starts and runs.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::EngineError;
use crate::{CompensationReason, FailureKind, SagaId, SagaState, SagaStatus, Timestamp};

/// Options for starting a saga.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartOptions {
    /// Starting twice with the same key returns the first saga; the same key with another
    /// input is a conflict.
    pub idempotency_key: Option<String>,
    /// For a start by name ([`Engine::start_json`](crate::Engine::start_json)): the version
    /// of the saga type to start (`None`: the newest registered). A typed start runs the
    /// version of the type it names.
    pub version: Option<u32>,
    /// Set by the engine for a child saga: its parent and the position that started it.
    pub(crate) parent: Option<crate::ParentLink>,
}

impl StartOptions {
    /// Options with an idempotency key.
    #[must_use]
    pub fn key(key: impl Into<String>) -> Self {
        Self {
            idempotency_key: Some(key.into()),
            ..Self::default()
        }
    }

    /// These options, starting this version of the saga type (starts by name only).
    #[must_use]
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }
}

/// The result of [`Engine::start`](crate::Engine::start).
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
    pub(crate) fn from_state(state: &SagaState) -> Self {
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
