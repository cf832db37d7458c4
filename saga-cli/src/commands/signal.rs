//! `saga signal` (and the report of `saga api signal`): sends a signal to a saga.

use saga_core::{Engine, EngineError, SignalSent};
use serde::Serialize;
use serde_json::Value;

use crate::cli::SignalArgs;
use crate::error::{CliError, parse_id};
use crate::output::Report;

/// What a signal did.
#[derive(Debug, Serialize)]
pub(crate) struct SignalReport {
    id: String,
    signal: String,
    key: String,
    /// Its place in the saga's inbox (the first delivery's, for a duplicate).
    sequence: u64,
    /// `true` for a new delivery.
    delivered: bool,
    /// `true` when the key was sent before with the same payload: nothing changed.
    duplicate: bool,
}

impl SignalReport {
    /// The report of `args`' signal, stored under `sequence`.
    pub(crate) fn new(
        args: &SignalArgs,
        id: saga_core::SagaId,
        sequence: u64,
        duplicate: bool,
    ) -> Self {
        Self {
            id: id.to_string(),
            signal: args.name.clone(),
            key: args.key.clone(),
            sequence,
            delivered: !duplicate,
            duplicate,
        }
    }
}

impl Report for SignalReport {
    fn text(&self) -> String {
        if self.duplicate {
            format!(
                "signal `{}` to saga {}: duplicate of #{} (key `{}` was sent before; nothing changed)\n",
                self.signal, self.id, self.sequence, self.key
            )
        } else {
            format!(
                "signal `{}` delivered to saga {} as #{}\n",
                self.signal, self.id, self.sequence
            )
        }
    }
}

/// The payload from `--payload` or `--payload-file`; `null` without either.
pub(crate) fn payload(args: &SignalArgs) -> Result<Value, CliError> {
    let (text, source) = match (&args.payload, &args.payload_file) {
        (Some(text), _) => (text.clone(), "--payload".to_owned()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                CliError::new(format!(
                    "cannot read the signal payload from {}: {err}",
                    path.display()
                ))
            })?;
            (text, format!("the payload file {}", path.display()))
        }
        (None, None) => return Ok(Value::Null),
    };
    serde_json::from_str(&text).map_err(|err| {
        CliError::new(format!(
            "{source} is not valid JSON: {err}; give the payload as JSON, e.g. --payload '{{\"approved\": true}}' (a string needs its quotes: '\"yes\"')"
        ))
    })
}

/// Sends the signal through the engine, on the store directly.
pub(crate) async fn run(engine: &Engine, args: &SignalArgs) -> Result<SignalReport, CliError> {
    let id = parse_id(&args.id)?;
    let payload = payload(args)?;
    match engine.signal(id, &args.name, &payload, &args.key).await {
        Ok(SignalSent::Delivered { sequence }) => Ok(SignalReport::new(args, id, sequence, false)),
        Ok(SignalSent::Duplicate { sequence }) => Ok(SignalReport::new(args, id, sequence, true)),
        Ok(other) => Err(CliError::new(format!(
            "signal `{}` to saga {id}: an outcome this CLI does not know: {other:?}",
            args.name
        ))),
        // The saga's state refuses it: nothing was delivered and trying again will not help.
        Err(EngineError::WrongStatus { status, .. }) => Err(CliError::refused(format!(
            "saga {id} is {status}: it has already ended; signal `{}` was not delivered",
            args.name
        ))),
        Err(err) => Err(err.into()),
    }
}
