//! `saga show <id>`: one saga's status, steps, lease and timeline.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use saga_core::store::StoredSaga;
use saga_core::{
    ChildLink, CompensationRecord, Engine, EventKind, ParallelBlock, ParentLink, SagaEvent,
    SagaState, SagaStore, StepError, StepRecord, Waiting, timeline,
};
use serde::Serialize;
use serde_json::Value;

use crate::error::{CliError, parse_id};
use crate::output::{Report, Table, or_dash};

/// Everything known about one saga.
#[derive(Debug, Serialize)]
pub(crate) struct ShowReport {
    id: String,
    saga_type: String,
    /// Version of the type's code that started it (absent when the state does not decode).
    version: Option<u32>,
    status: String,
    /// Quarantine reason, when set aside.
    quarantined: Option<String>,
    idempotency_key: Option<String>,
    cancel_requested: bool,
    /// The pivot step it passed (`#position name`): it only goes forward now.
    past_pivot: Option<String>,
    /// The saga that started this one as its child.
    parent: Option<ParentLink>,
    /// The child sagas it started.
    children: Vec<ChildLink>,
    /// What it is suspended in: a durable sleep, a signal wait, a child's outcome.
    waiting: Option<Waiting>,
    /// Its parallel blocks.
    parallel: Vec<ParallelBlock>,
    created_at: Option<String>,
    updated_at: String,
    /// When it is next due to run (lease expiry while held).
    due_at: Option<String>,
    /// The current fencing token (0 before the first claim).
    fence: u64,
    /// The unexpired lease, if one is held.
    lease: Option<LeaseView>,
    /// Why it compensated, when it did.
    compensation_reason: Option<String>,
    /// Why it failed, when `failed`.
    failure: Option<FailureView>,
    /// The workflow output, when completed.
    output: Option<Value>,
    /// The journal.
    steps: Vec<StepView>,
    /// Why the stored state could not be read, when it could not.
    state_error: Option<String>,
    /// The timeline, one line per event.
    timeline: Vec<String>,
    /// The full event history, oldest first.
    events: Vec<SagaEvent>,
    /// Why the history could not be read, when it could not.
    history_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct LeaseView {
    owner: String,
    fence: u64,
    expires_at: String,
}

#[derive(Debug, Serialize)]
struct FailureView {
    kind: String,
    message: String,
}

#[derive(Debug, Serialize)]
struct StepView {
    position: u32,
    name: String,
    /// `step`, or `value` for a journaled `now()`/`uuid()`.
    kind: &'static str,
    status: String,
    attempts: u32,
    interruptions: u32,
    idempotency_key: Option<String>,
    /// The last error.
    error: Option<StepError>,
    /// The backoff recorded with each failed attempt, in seconds, oldest first.
    backoffs_seconds: Vec<f64>,
    next_retry_at: Option<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
    /// The journaled value or the step output.
    output: Option<Value>,
    compensation: Option<CompensationView>,
}

#[derive(Debug, Serialize)]
struct CompensationView {
    status: String,
    attempts: u32,
    error: Option<StepError>,
    /// The backoff recorded with each failed undo attempt, in seconds, oldest first.
    backoffs_seconds: Vec<f64>,
    next_retry_at: Option<String>,
    skipped_because: Option<String>,
}

/// Backoffs from the history, per journal position: (forward, compensation).
type Backoffs = BTreeMap<u32, (Vec<f64>, Vec<f64>)>;

/// Loads the saga and its history.
pub(crate) async fn run(
    store: &dyn SagaStore,
    engine: &Engine,
    id: &str,
) -> Result<ShowReport, CliError> {
    let id = parse_id(id)?;
    let stored = store
        .load(id)
        .await?
        .ok_or_else(|| CliError::not_found(id))?;
    let (events, history_error) = match engine.history(id).await {
        Ok(events) => (events, None),
        Err(saga_core::EngineError::NotFound(id)) => return Err(CliError::not_found(id)),
        Err(err) => (Vec::new(), Some(err.to_string())),
    };
    let (state, state_error) = match serde_json::from_str::<SagaState>(&stored.state) {
        // A finished saga is stored without its journal: the history has it.
        Ok(state) if state.is_compact() && !events.is_empty() => {
            match SagaState::fold(id, &events) {
                Ok(full) => (Some(full), None),
                Err(err) => (
                    Some(state),
                    Some(format!("the history does not fold: {err}")),
                ),
            }
        }
        Ok(state) => (Some(state), None),
        Err(err) => (None, Some(format!("stored state does not decode: {err}"))),
    };
    Ok(build(
        &stored,
        state.as_ref(),
        state_error,
        events,
        history_error,
    ))
}

fn build(
    stored: &StoredSaga,
    state: Option<&SagaState>,
    state_error: Option<String>,
    events: Vec<SagaEvent>,
    history_error: Option<String>,
) -> ShowReport {
    let backoffs = backoffs(&events);
    let steps = state
        .map(|state| {
            state
                .journal
                .iter()
                .map(|record| step_view(record, backoffs.get(&record.position)))
                .collect()
        })
        .unwrap_or_default();
    let timeline = if events.is_empty() {
        Vec::new()
    } else {
        timeline::render(&events)
            .lines()
            .map(|line| line.trim_end().to_owned())
            .collect()
    };
    ShowReport {
        id: stored.id.to_string(),
        saga_type: stored.saga_type.clone(),
        version: state.map(|s| s.version),
        status: stored.status.to_string(),
        quarantined: stored.quarantined.clone(),
        idempotency_key: state.and_then(|s| s.idempotency_key.clone()),
        cancel_requested: stored.cancel_requested || state.is_some_and(|s| s.cancel_requested),
        past_pivot: state
            .and_then(|s| s.past_pivot.as_ref())
            .map(|p| format!("#{} {}", p.position, p.step)),
        parent: state.and_then(|s| s.parent.clone()),
        children: state.map(SagaState::children).unwrap_or_default(),
        waiting: state.and_then(SagaState::waiting),
        parallel: state.map(SagaState::parallel_blocks).unwrap_or_default(),
        created_at: state.map(|s| s.created_at.to_rfc3339()),
        updated_at: stored.updated_at.to_rfc3339(),
        due_at: stored.due_at.map(|at| at.to_rfc3339()),
        fence: stored.fence,
        lease: stored.lease.as_ref().map(|lease| LeaseView {
            owner: lease.owner.clone(),
            fence: stored.fence,
            expires_at: lease.expires_at.to_rfc3339(),
        }),
        compensation_reason: state
            .and_then(|s| s.compensation_reason.as_ref())
            .map(ToString::to_string),
        failure: state
            .and_then(|s| s.failure.as_ref())
            .map(|(kind, message)| FailureView {
                kind: super::stats::kind_name(*kind),
                message: message.clone(),
            }),
        output: state.and_then(|s| s.output.clone()),
        steps,
        state_error,
        timeline,
        events,
        history_error,
    }
}

fn backoffs(events: &[SagaEvent]) -> Backoffs {
    let mut out = Backoffs::new();
    for event in events {
        match &event.kind {
            EventKind::StepAttemptFailed {
                position,
                backoff_seconds,
                ..
            } => out.entry(*position).or_default().0.push(*backoff_seconds),
            EventKind::CompensationAttemptFailed {
                position,
                backoff_seconds,
                ..
            } => out.entry(*position).or_default().1.push(*backoff_seconds),
            _ => {}
        }
    }
    out
}

fn step_view(record: &StepRecord, backoffs: Option<&(Vec<f64>, Vec<f64>)>) -> StepView {
    let (forward, undo) = backoffs.cloned().unwrap_or_default();
    StepView {
        position: record.position,
        name: record.name.clone(),
        kind: if record.is_value { "value" } else { "step" },
        status: enum_name(&record.status),
        attempts: record.attempts,
        interruptions: record.interruptions,
        idempotency_key: (!record.idempotency_key.is_empty())
            .then(|| record.idempotency_key.clone()),
        error: record.error.clone(),
        backoffs_seconds: forward,
        next_retry_at: record.next_retry_at.map(|at| at.to_rfc3339()),
        started_at: record.started_at.map(|at| at.to_rfc3339()),
        finished_at: record.finished_at.map(|at| at.to_rfc3339()),
        output: record.output.clone(),
        compensation: record
            .compensation
            .as_ref()
            .map(|c| compensation_view(c, undo)),
    }
}

fn compensation_view(record: &CompensationRecord, backoffs: Vec<f64>) -> CompensationView {
    CompensationView {
        status: enum_name(&record.status),
        attempts: record.attempts,
        error: record.error.clone(),
        backoffs_seconds: backoffs,
        next_retry_at: record.next_retry_at.map(|at| at.to_rfc3339()),
        skipped_because: record.skipped_because.clone(),
    }
}

/// The serde name of a unit enum variant (`succeeded`, `retrying`, ...).
fn enum_name<T: Serialize + std::fmt::Debug>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(name)) => name,
        _ => format!("{value:?}").to_lowercase(),
    }
}

fn error_text(error: &StepError) -> String {
    if error.timeout {
        format!("{} [timeout, {}]", error.message, error.class)
    } else {
        format!("{} [{}]", error.message, error.class)
    }
}

fn seconds_list(seconds: &[f64]) -> String {
    if seconds.is_empty() {
        return "-".to_owned();
    }
    seconds
        .iter()
        .map(|s| {
            if *s < 1.0 {
                format!("{:.0}ms", s * 1000.0)
            } else {
                format!("{s:.2}s")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn compensation_text(c: &CompensationView) -> String {
    let mut text = format!("{} ({} attempt(s)", c.status, c.attempts);
    if !c.backoffs_seconds.is_empty() {
        let _ = write!(text, ", backoffs {}", seconds_list(&c.backoffs_seconds));
    }
    text.push(')');
    if let Some(error) = &c.error {
        let _ = write!(text, " last error: {}", error_text(error));
    }
    if let Some(why) = &c.skipped_because {
        let _ = write!(text, ": {why}");
    }
    text
}

impl Report for ShowReport {
    fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "saga {}", self.id);
        let mut fields = Table::new(&["", ""]);
        let version = self.version.map(|v| format!(" v{v}")).unwrap_or_default();
        fields.row(vec!["type".into(), format!("{}{version}", self.saga_type)]);
        fields.row(vec!["status".into(), self.status.clone()]);
        if let Some(reason) = &self.quarantined {
            fields.row(vec!["quarantined".into(), reason.clone()]);
        }
        if let Some(failure) = &self.failure {
            fields.row(vec![
                "failure".into(),
                format!("{}: {}", failure.kind, failure.message),
            ]);
        }
        if let Some(reason) = &self.compensation_reason {
            fields.row(vec!["compensating".into(), reason.clone()]);
        }
        if let Some(pivot) = &self.past_pivot {
            fields.row(vec![
                "pivot".into(),
                format!(
                    "past the pivot {pivot}: it only goes forward (no compensation, no cancel)"
                ),
            ]);
        }
        if self.cancel_requested {
            let refused = if self.past_pivot.is_some() {
                "requested, refused past the pivot"
            } else {
                "requested"
            };
            fields.row(vec!["cancel".into(), refused.into()]);
        }
        if let Some(parent) = &self.parent {
            fields.row(vec![
                "parent".into(),
                format!(
                    "{} ({}, started at its #{})",
                    parent.id, parent.saga_type, parent.position
                ),
            ]);
        }
        for child in &self.children {
            let outcome = child
                .outcome
                .map_or_else(|| "running".to_owned(), |status| status.to_string());
            fields.row(vec![
                "child".into(),
                format!(
                    "{} ({}, started at #{}): {outcome}",
                    child.id, child.saga_type, child.position
                ),
            ]);
        }
        for block in &self.parallel {
            fields.row(vec![
                "parallel".into(),
                format!(
                    "#{}: {} of {} branches completed",
                    block.position, block.completed, block.branches
                ),
            ]);
        }
        if let Some(waiting) = &self.waiting {
            let text = match waiting {
                Waiting::Sleep { until, .. } => format!("sleeping until {}", until.to_rfc3339()),
                Waiting::Signal { name, until, .. } => {
                    format!("signal `{name}` until {}", until.to_rfc3339())
                }
                Waiting::Child { id, .. } => format!("child saga {id}"),
                other => format!("{other:?}"),
            };
            fields.row(vec!["waiting for".into(), text]);
        }
        let lease = match &self.lease {
            Some(lease) => format!(
                "held by {} until {} (fencing token {})",
                lease.owner, lease.expires_at, lease.fence
            ),
            None => format!("not held (fencing token {})", self.fence),
        };
        fields.row(vec!["lease".into(), lease]);
        fields.row(vec!["due".into(), or_dash(self.due_at.as_deref())]);
        fields.row(vec!["created".into(), or_dash(self.created_at.as_deref())]);
        fields.row(vec!["updated".into(), self.updated_at.clone()]);
        if let Some(key) = &self.idempotency_key {
            fields.row(vec!["idempotency key".into(), key.clone()]);
        }
        if let Some(output) = &self.output {
            fields.row(vec!["output".into(), output.to_string()]);
        }
        if let Some(err) = &self.state_error {
            fields.row(vec!["state".into(), err.clone()]);
        }
        // Skip the blank header line of the key/value table.
        for line in fields.render(2).lines().skip(1) {
            let _ = writeln!(out, "{line}");
        }

        let _ = writeln!(out, "\nsteps");
        let mut steps = Table::new(&[
            "#",
            "STEP",
            "STATUS",
            "ATTEMPTS",
            "BACKOFFS",
            "LAST ERROR",
            "COMPENSATION",
        ]);
        for step in &self.steps {
            let (status, error) = if step.kind == "value" {
                ("journaled".to_owned(), or_dash(step.output.as_ref()))
            } else {
                (
                    step.status.clone(),
                    or_dash(step.error.as_ref().map(error_text)),
                )
            };
            steps.row(vec![
                step.position.to_string(),
                step.name.clone(),
                status,
                step.attempts.to_string(),
                seconds_list(&step.backoffs_seconds),
                error,
                or_dash(step.compensation.as_ref().map(compensation_text)),
            ]);
        }
        if steps.is_empty() {
            let _ = writeln!(out, "  (no steps yet)");
        } else {
            out.push_str(&steps.render(2));
        }

        let _ = writeln!(out, "\ntimeline");
        if let Some(err) = &self.history_error {
            let _ = writeln!(out, "  history unreadable: {err}");
        }
        for line in &self.timeline {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}
