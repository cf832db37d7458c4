//! `saga retry`, `saga cancel`, `saga abandon`: operator actions through the engine.

use saga_core::Engine;
use saga_core::store::CancelOutcome;
use serde::Serialize;

use crate::error::{CliError, parse_id};
use crate::output::Report;

/// What an operator action did.
#[derive(Debug, Serialize)]
pub(crate) struct ActionReport {
    id: String,
    /// `retry`, `cancel` or `abandon`.
    action: &'static str,
    /// The saga's status after the action.
    status: String,
    reason: String,
    /// What happens next.
    message: String,
}

impl Report for ActionReport {
    fn text(&self) -> String {
        format!("saga {}: {}\n", self.id, self.message)
    }
}

/// Retries a failed (or quarantined) saga.
pub(crate) async fn retry(
    engine: &Engine,
    id: &str,
    reason: &str,
) -> Result<ActionReport, CliError> {
    let id = parse_id(id)?;
    let status = engine.retry(id, reason).await?;
    Ok(ActionReport {
        id: id.to_string(),
        action: "retry",
        status: status.to_string(),
        reason: reason.to_owned(),
        message: format!("retried; it resumes {status} and any coordinator picks it up at once"),
    })
}

/// Requests a cancel: the saga stops before its next step and compensates.
pub(crate) async fn cancel(
    engine: &Engine,
    id: &str,
    reason: &str,
) -> Result<ActionReport, CliError> {
    let id = parse_id(id)?;
    match engine.cancel(id, reason).await? {
        CancelOutcome::Requested => {
            let status = engine
                .state(id)
                .await
                .map_or_else(|_| "unknown".to_owned(), |state| state.status.to_string());
            Ok(ActionReport {
                id: id.to_string(),
                action: "cancel",
                status,
                reason: reason.to_owned(),
                message: "cancel requested; it stops before its next step and compensates its completed steps".into(),
            })
        }
        CancelOutcome::AlreadyFinished(status) => Err(CliError::new(format!(
            "saga {id} is {status}: it has already ended; there is nothing to cancel"
        ))),
        other => Err(CliError::new(format!(
            "saga {id}: unexpected cancel outcome {other:?}"
        ))),
    }
}

/// Abandons a saga without compensating what remains.
pub(crate) async fn abandon(
    engine: &Engine,
    id: &str,
    reason: &str,
) -> Result<ActionReport, CliError> {
    let id = parse_id(id)?;
    if reason.trim().is_empty() {
        return Err(CliError::new(
            "abandon needs a reason: --reason \"why it is stopped without compensation\"",
        ));
    }
    engine.abandon(id, reason).await?;
    Ok(ActionReport {
        id: id.to_string(),
        action: "abandon",
        status: saga_core::SagaStatus::Failed.to_string(),
        reason: reason.to_owned(),
        message: "abandoned; it ends failed without compensating what remains".into(),
    })
}
