//! Sending a signal to a saga: checked against what its type declares, stored in its inbox
//! (deduplicated by key) with a `SignalReceived` event, and the saga made due.

use serde::Serialize;
use serde_json::Value;

use super::{Engine, EngineError, SignalPart};
use crate::store::{DeliveryOutcome, SignalDelivery, StoreError};
use crate::{EventKind, SagaEvent, SagaId, SagaStatus};

/// The longest signal name or key accepted.
const MAX_NAME_LEN: usize = 128;

/// Signal names starting with this are the engine's own.
const RESERVED_PREFIX: &str = crate::store::ENGINE_SIGNAL_PREFIX;

/// What [`Engine::signal`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignalSent {
    /// The signal is in the saga's inbox under this sequence number.
    Delivered {
        /// Its place in the inbox (1 for the first signal the saga received).
        sequence: u64,
    },
    /// The same name and key were sent before (with the same payload): nothing changed.
    Duplicate {
        /// The sequence number of the first delivery.
        sequence: u64,
    },
}

impl SignalSent {
    /// The signal's sequence number in the inbox.
    #[must_use]
    pub fn sequence(self) -> u64 {
        match self {
            SignalSent::Delivered { sequence } | SignalSent::Duplicate { sequence } => sequence,
        }
    }
}

/// A signal a saga type waits for, with the payload type it decodes: declare them in
/// [`Saga::SIGNALS`](crate::Saga::SIGNALS) so that a signal with an unknown name or a
/// payload that does not decode is refused when it is sent, not found out by the waiting
/// workflow.
#[derive(Clone, Copy)]
pub struct SignalSpec {
    name: &'static str,
    check: fn(&Value) -> Result<(), String>,
}

impl SignalSpec {
    /// The signal `name`, whose payload decodes as `T`.
    #[must_use]
    pub const fn of<T: serde::de::DeserializeOwned>(name: &'static str) -> Self {
        Self {
            name,
            check: decodes_as::<T>,
        }
    }

    /// The signal's name.
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl std::fmt::Debug for SignalSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalSpec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn decodes_as<T: serde::de::DeserializeOwned>(payload: &Value) -> Result<(), String> {
    serde_path_to_error::deserialize::<_, T>(payload)
        .map(drop)
        .map_err(|err| {
            let path = err.path().to_string();
            format!("at `{path}`: {}", err.into_inner())
        })
}

/// Whether `name` may name a signal: 1 to 128 characters of letters, digits, `_`, `-`, `.`
/// and `:`, not starting with the engine's reserved `saga.`.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    check_token("signal name", name)?;
    if name.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "signal names starting with `{RESERVED_PREFIX}` are reserved for the engine"
        ));
    }
    Ok(())
}

fn check_token(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(format!(
            "a {what} must be 1 to {MAX_NAME_LEN} characters long, got {}",
            value.len()
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
    {
        return Err(format!(
            "a {what} may hold letters, digits, `_`, `-`, `.` and `:` only, not {bad:?}"
        ));
    }
    Ok(())
}

impl Engine {
    /// Sends the signal `name` with `payload` to saga `id`, for a
    /// [`wait_for_signal`](crate::SagaContext::wait_for_signal) of that name (now, or later:
    /// a signal sent before the saga waits is kept). `key` identifies the signal: sending
    /// the same name and key again is a [`SignalSent::Duplicate`] and changes nothing, so a
    /// sender that is unsure whether its signal arrived sends it again with the same key.
    ///
    /// # Errors
    /// [`EngineError::InvalidSignal`] for a bad name or key, a name the saga's type does
    /// not declare, or a payload that does not decode as the declared type (see
    /// [`Saga::SIGNALS`](crate::Saga::SIGNALS)); [`EngineError::WrongStatus`] when the saga
    /// has ended; [`EngineError::NotFound`]; [`EngineError::SignalConflict`] for a key sent
    /// before with another payload; [`EngineError::Store`] (an inbox already full is
    /// [`StoreError::InboxFull`]). Nothing is delivered in any of these cases.
    pub async fn signal<T: Serialize + ?Sized>(
        &self,
        id: SagaId,
        name: &str,
        payload: &T,
        key: &str,
    ) -> Result<SignalSent, EngineError> {
        let invalid = |part: SignalPart| {
            move |problem: String| EngineError::InvalidSignal {
                saga: id,
                name: name.to_owned(),
                part,
                problem,
            }
        };
        check_name(name).map_err(invalid(SignalPart::Name))?;
        check_token("signal key", key).map_err(invalid(SignalPart::Key))?;
        let payload = serde_json::to_value(payload).map_err(|source| EngineError::Encoding {
            what: format!("the payload of signal `{name}`"),
            source,
        })?;
        let stored = self.load_stored(id).await?;
        if stored.status.is_terminal() {
            return Err(finished(id, stored.status, name));
        }
        if let Ok(state) = self.decode(id, &stored.state) {
            self.check_declared(&state.saga_type, state.version, name, &payload)
                .map_err(|(part, problem)| invalid(part)(problem))?;
        }
        let at = self.shared.clock.now();
        let event = SagaEvent {
            seq: 0,
            at,
            kind: EventKind::SignalReceived {
                name: name.to_owned(),
                key: key.to_owned(),
                payload: payload.clone(),
            },
        };
        let encode = |what: &str, source| EngineError::Encoding {
            what: what.to_owned(),
            source,
        };
        let delivery = SignalDelivery {
            name: name.to_owned(),
            key: key.to_owned(),
            payload: serde_json::to_string(&payload).map_err(|e| encode("signal payload", e))?,
            at,
            event: serde_json::to_string(&event).map_err(|e| encode("signal event", e))?,
        };
        match self.shared.store.deliver_signal(id, delivery).await {
            Ok(DeliveryOutcome::Delivered { sequence }) => {
                tracing::info!(saga_id = %id, signal = name, key, sequence, "signal delivered");
                crate::telemetry::signal("delivered");
                Ok(SignalSent::Delivered { sequence })
            }
            Ok(DeliveryOutcome::Duplicate { sequence }) => {
                crate::telemetry::signal("duplicate");
                Ok(SignalSent::Duplicate { sequence })
            }
            Ok(DeliveryOutcome::AlreadyFinished(status)) => Err(finished(id, status, name)),
            Err(StoreError::NotFound(id)) => Err(EngineError::NotFound(id)),
            Err(StoreError::SignalConflict { saga, name, key }) => {
                Err(EngineError::SignalConflict { saga, name, key })
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Checks `name` and `payload` against the signals the saga's registered type declares
    /// (a type that declares none accepts any; an unregistered type is not checked here).
    fn check_declared(
        &self,
        saga_type: &str,
        version: u32,
        name: &str,
        payload: &Value,
    ) -> Result<(), (SignalPart, String)> {
        let Some(saga) = self.shared.registry.get(saga_type, version) else {
            return Ok(());
        };
        let declared = saga.signals();
        if declared.is_empty() {
            return Ok(());
        }
        let Some(spec) = declared.iter().find(|s| s.name == name) else {
            let known: Vec<&str> = declared.iter().map(|s| s.name).collect();
            return Err((
                SignalPart::Undeclared,
                format!(
                    "saga type `{saga_type}` v{version} waits for no signal of this name (it declares {known:?})"
                ),
            ));
        };
        (spec.check)(payload).map_err(|err| {
            (
                SignalPart::Payload,
                format!(
                    "the payload does not decode as the type `{saga_type}` declares for it: {err}"
                ),
            )
        })
    }
}

fn finished(id: SagaId, status: SagaStatus, name: &str) -> EngineError {
    EngineError::WrongStatus {
        saga: id,
        status,
        message: format!("signal `{name}` not delivered: a finished saga takes no more signals"),
    }
}
