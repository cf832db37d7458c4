//! `saga api start|status|wait|cancel|signal`: the coordinators' HTTP API with a bearer token, for
//! operators and scripts that may not reach Redis. Needs no store.

use std::time::Duration;

use saga_http::client::{ApiClient, WaitOutcome};
use serde::Serialize;
use serde_json::Value;

use crate::cli::{ApiArgs, ApiCommand};
use crate::error::{CliError, parse_id};
use crate::output::{self, Report, Table, or_dash};

/// The environment variable that may hold the token.
const TOKEN_ENV: &str = "SAGA_API_TOKEN";

/// Runs one `saga api` command to its printed output.
pub(crate) async fn run(
    args: &ApiArgs,
    retry_for: Duration,
    json: bool,
) -> Result<String, CliError> {
    let client = client(args, retry_for)?;
    match &args.command {
        ApiCommand::Start {
            saga_type,
            input,
            key,
        } => {
            let input: Value = serde_json::from_str(input).map_err(|err| {
                CliError::new(format!(
                    "--input is not valid JSON: {err}; quote it for the shell, e.g. --input '{{\"name\": \"x\"}}'"
                ))
            })?;
            let started = client
                .start(saga_type, &input, key.as_deref())
                .await
                .map_err(|err| api_error(&err))?;
            output::render(
                &StartReport {
                    id: started.id.to_string(),
                    saga_type: saga_type.clone(),
                    created: started.created,
                    status: started.status,
                    idempotency_key: key.clone(),
                },
                json,
            )
        }
        ApiCommand::Status { id } => {
            let id = parse_id(id)?;
            let status = client.status(id).await.map_err(|err| api_error(&err))?;
            output::render(&StatusReport(status), json)
        }
        ApiCommand::Wait { id, timeout } => {
            let id = parse_id(id)?;
            let outcome = client
                .wait(id, *timeout)
                .await
                .map_err(|err| api_error(&err))?;
            let report = match outcome {
                WaitOutcome::Terminal(outcome) => WaitReport {
                    id: id.to_string(),
                    terminal: true,
                    status: outcome["status"].as_str().unwrap_or_default().to_owned(),
                    reason: None,
                    outcome: Some(outcome),
                    waited: humantime::format_duration(*timeout).to_string(),
                },
                WaitOutcome::Quarantined { reason } => WaitReport {
                    id: id.to_string(),
                    terminal: true,
                    status: "quarantined".to_owned(),
                    reason: Some(reason),
                    outcome: None,
                    waited: humantime::format_duration(*timeout).to_string(),
                },
                WaitOutcome::StillRunning { status } => WaitReport {
                    id: id.to_string(),
                    terminal: false,
                    status,
                    reason: None,
                    outcome: None,
                    waited: humantime::format_duration(*timeout).to_string(),
                },
                other => {
                    return Err(CliError::new(format!(
                        "the wait for saga {id} ended in a way this CLI does not know: {other:?}"
                    )));
                }
            };
            output::render(&report, json)
        }
        ApiCommand::Cancel { id, reason } => {
            let id = parse_id(id)?;
            client
                .cancel(id, reason.as_deref())
                .await
                .map_err(|err| api_error(&err))?;
            output::render(
                &CancelReport {
                    id: id.to_string(),
                    cancel: "requested",
                    reason: reason.clone(),
                },
                json,
            )
        }
        ApiCommand::Signal(args) => {
            let id = parse_id(&args.id)?;
            let payload = super::signal::payload(args)?;
            let receipt = client
                .signal(id, &args.name, &payload, &args.key)
                .await
                .map_err(|err| api_error(&err))?;
            output::render(
                &super::signal::SignalReport::new(args, id, receipt.sequence, receipt.duplicate),
                json,
            )
        }
    }
}

fn api_error(err: &saga_http::ClientError) -> CliError {
    match err {
        saga_http::ClientError::Api { code, .. }
            if code == "past_pivot" || code == "saga_finished" =>
        {
            CliError::refused(err.to_string())
        }
        _ => CliError::new(err.to_string()),
    }
}

/// The client from the flags: URL, CA, and the token from its file or the environment.
fn client(args: &ApiArgs, retry_for: Duration) -> Result<ApiClient, CliError> {
    let Some(url) = &args.api_url else {
        return Err(CliError::new(
            "give the coordinators' HTTP API with --api-url or SAGA_API_URL, e.g. http://127.0.0.1:8080",
        ));
    };
    let mut client = ApiClient::new(url)
        .map_err(|err| api_error(&err))?
        .retry_for(retry_for);
    if let Some(path) = &args.api_ca_file {
        client = client.ca_file(path).map_err(|err| api_error(&err))?;
    }
    let token = match &args.api_token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                CliError::new(format!(
                    "cannot read the API token file {}: {err}",
                    path.display()
                ))
            })?;
            let token = text.lines().next().unwrap_or_default().trim().to_owned();
            if token.is_empty() {
                return Err(CliError::new(format!(
                    "the API token file {} is empty; put the token (from `saga token new`) on its first line",
                    path.display()
                )));
            }
            Some(token)
        }
        None => std::env::var(TOKEN_ENV).ok(),
    };
    if let Some(token) = token {
        client = client.token(&token);
    }
    Ok(client)
}

/// What `saga api start` did.
#[derive(Debug, Serialize)]
struct StartReport {
    id: String,
    saga_type: String,
    /// `false` when the key had already started this saga.
    created: bool,
    status: String,
    idempotency_key: Option<String>,
}

impl Report for StartReport {
    fn text(&self) -> String {
        if self.created {
            format!(
                "saga {}: started ({}, {})\n",
                self.id, self.saga_type, self.status
            )
        } else {
            format!(
                "saga {}: already started with this key ({}, {})\n",
                self.id, self.saga_type, self.status
            )
        }
    }
}

/// `saga api status`: the server's JSON as is (`--json`), or its main fields.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct StatusReport(Value);

impl Report for StatusReport {
    fn text(&self) -> String {
        let v = &self.0;
        let text = |key: &str| match &v[key] {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut table = Table::new(&["FIELD", "VALUE"]);
        for key in ["id", "saga_type", "status", "created_at", "updated_at"] {
            table.row(vec![key.to_owned(), text(key)]);
        }
        table.row(vec![
            "steps".to_owned(),
            format!(
                "{} of {} succeeded",
                or_dash(v["steps"]["succeeded"].as_u64()),
                or_dash(v["steps"]["total"].as_u64())
            ),
        ]);
        for key in [
            "idempotency_key",
            "cancel_requested",
            "past_pivot",
            "quarantined",
            "output",
            "compensation_reason",
            "failure",
        ] {
            table.row(vec![key.to_owned(), text(key)]);
        }
        table.render(0)
    }
}

/// How `saga api wait` ended.
#[derive(Debug, Serialize)]
struct WaitReport {
    id: String,
    /// `false` when the wait ended first.
    terminal: bool,
    status: String,
    /// Why it was quarantined.
    reason: Option<String>,
    /// The outcome of an ended saga (status, output, compensation reason, failure).
    outcome: Option<Value>,
    waited: String,
}

impl Report for WaitReport {
    fn text(&self) -> String {
        if let Some(reason) = &self.reason {
            return format!("saga {}: quarantined: {reason}\n", self.id);
        }
        let Some(outcome) = &self.outcome else {
            return format!(
                "saga {}: still {} after {}\n",
                self.id, self.status, self.waited
            );
        };
        let mut line = format!("saga {}: {}", self.id, self.status);
        if !outcome["output"].is_null() {
            line.push_str(&format!(", output {}", outcome["output"]));
        }
        if let Some(reason) = outcome["compensation_reason"].as_str() {
            line.push_str(&format!(", compensated because {reason}"));
        }
        if !outcome["failure"].is_null() {
            line.push_str(&format!(", failure {}", outcome["failure"]));
        }
        line.push('\n');
        line
    }
}

/// What `saga api cancel` did.
#[derive(Debug, Serialize)]
struct CancelReport {
    id: String,
    cancel: &'static str,
    reason: Option<String>,
}

impl Report for CancelReport {
    fn text(&self) -> String {
        format!(
            "saga {}: cancel requested; it stops before its next step and compensates what it did\n",
            self.id
        )
    }
}
