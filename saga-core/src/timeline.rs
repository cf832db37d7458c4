//! A readable timeline of one saga, rendered from its event history: every attempt, retry
//! with its backoff, failure, compensation and lease change, with times relative to the
//! start. Used by the examples and the operator CLI.
//!
//! ```
//! use saga_core::{EventKind, SagaEvent, Timestamp, timeline};
//!
//! let events = vec![
//!     SagaEvent { seq: 0, at: Timestamp(1_000), kind: EventKind::SagaStarted {
//!         saga_type: "deal_flow".into(), version: 1, input: serde_json::json!({}),
//!         idempotency_key: None, parent: None, journal_format: 2 } },
//!     SagaEvent { seq: 1, at: Timestamp(1_250), kind: EventKind::SagaCompensated },
//! ];
//! let text = timeline::render(&events);
//! assert!(text.contains("deal_flow"));
//! assert!(text.contains("+250ms"));
//! ```

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::{EventKind, SagaEvent, StepError};

/// Renders `events` (one saga's history, oldest first) as indented lines.
#[must_use]
pub fn render(events: &[SagaEvent]) -> String {
    let mut out = String::new();
    let Some(first) = events.first() else {
        return "(no events)\n".to_owned();
    };
    // Parallel blocks seen so far: (first branch position, branches).
    let mut blocks: Vec<(u32, u32)> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        let offset = format_offset(event.at.since(first.at));
        if let EventKind::ValueRecorded {
            position,
            name,
            value,
        } = &event.kind
            && name == crate::engine::PARALLEL
        {
            let branches = value.get("branches").and_then(Value::as_u64).unwrap_or(0);
            blocks.push((
                position.saturating_add(1),
                u32::try_from(branches).unwrap_or(u32::MAX),
            ));
        }
        let lane = branch_lane(&blocks, &event.kind);
        let gave_up = matches!(
            (&event.kind, events.get(index + 1).map(|next| &next.kind)),
            (
                EventKind::CompensationAttemptFailed { .. },
                Some(
                    EventKind::SagaFailed { .. }
                        | EventKind::StepCompensated {
                            reconciled: true,
                            ..
                        }
                )
            )
        );
        let line = match &event.kind {
            // The last failed undo attempt is not retried: the saga failed, or the
            // compensation's reconciliation check found the undo applied after all.
            EventKind::CompensationAttemptFailed {
                position,
                step,
                attempt,
                error,
                ..
            } if gave_up => format!(
                "{} undo attempt {attempt} failed: {}; no retry left",
                step_label(*position, step),
                describe_error(error)
            ),
            kind => describe(kind),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  {offset:>9}  {lane}{line}");
    }
    out
}

/// The lane of a step event inside a parallel block: branches are indented by their index
/// so that they read side by side; empty outside blocks.
fn branch_lane(blocks: &[(u32, u32)], kind: &EventKind) -> String {
    let position = match kind {
        EventKind::StepStarted { position, .. }
        | EventKind::StepSucceeded { position, .. }
        | EventKind::StepAttemptFailed { position, .. }
        | EventKind::StepFailed { position, .. }
        | EventKind::CompensationAttemptFailed { position, .. }
        | EventKind::StepCompensated { position, .. }
        | EventKind::CompensationSkipped { position, .. } => *position,
        _ => return String::new(),
    };
    blocks
        .iter()
        .rev()
        .find(|(first, branches)| position >= *first && position - first < *branches)
        .map(|(first, branches)| {
            let branch = position - first;
            let indent = "  ".repeat(usize::try_from(branch.min(8)).unwrap_or(8));
            format!("{indent}[branch {}/{branches}] ", branch + 1)
        })
        .unwrap_or_default()
}

/// One line describing an event, without its time.
#[must_use]
pub fn describe(kind: &EventKind) -> String {
    // No catch-all arm, so that a new kind cannot go undescribed.
    match kind {
        EventKind::SagaStarted {
            saga_type,
            version,
            idempotency_key,
            ..
        } => match idempotency_key {
            Some(key) => format!("started {saga_type} v{version} (idempotency key `{key}`)"),
            None => format!("started {saga_type} v{version}"),
        },
        EventKind::LeaseAcquired { owner, fence } => {
            format!("lease taken by {owner} (fencing token {fence})")
        }
        EventKind::SagaResumed {
            owner,
            status,
            completed_steps,
        } => format!(
            "resumed by {owner} while {status}; {completed_steps} completed step(s) replayed from the journal"
        ),
        EventKind::StepStarted { .. }
        | EventKind::StepSucceeded { .. }
        | EventKind::StepAttemptFailed { .. }
        | EventKind::StepFailed { .. }
        | EventKind::ValueRecorded { .. } => describe_step_event(kind),
        EventKind::CancelRequested { reason } => format!("cancel requested: {reason}"),
        EventKind::CancelRefused { step, position } => format!(
            "cancel refused: past the pivot {}, the saga only goes forward",
            step_label(*position, step)
        ),
        EventKind::CompensationStarted { .. }
        | EventKind::CompensationAttemptFailed { .. }
        | EventKind::StepCompensated { .. }
        | EventKind::CompensationSkipped { .. } => describe_compensation_event(kind),
        EventKind::SignalReceived { name, payload, .. }
            if name == crate::engine::CHILD_FINISHED =>
        {
            format!(
                "child saga {} finished ({})",
                payload.get("child").and_then(Value::as_str).unwrap_or("?"),
                payload.get("status").and_then(Value::as_str).unwrap_or("?")
            )
        }
        EventKind::SignalReceived { name, key, .. } => {
            format!("signal `{name}` received (key `{key}`)")
        }
        EventKind::SignalRejected {
            name,
            sequence,
            key,
            error,
        } => format!(
            "signal `{name}` #{sequence} (key `{key}`) REJECTED: its payload does not decode ({error}); the wait goes on"
        ),
        EventKind::SagaCompleted { .. } => "COMPLETED".to_owned(),
        EventKind::SagaCompensated => "COMPENSATED: every completed step undone".to_owned(),
        EventKind::SagaFailed { kind, error } => format!("FAILED ({kind:?}): {error}"),
        EventKind::SagaRetried { reason, status } => {
            format!("RETRIED by an operator ({reason}); resumes {status}")
        }
        EventKind::SagaReopened { reason } => {
            format!("REOPENED to compensate: {reason}")
        }
        EventKind::SagaAbandoned { reason } => {
            format!("ABANDONED by an operator without compensating: {reason}")
        }
    }
}

/// A forward step's attempt, outcome or journaled value.
fn describe_step_event(kind: &EventKind) -> String {
    match kind {
        EventKind::StepStarted {
            position,
            step,
            attempt,
            ..
        } => format!("{} attempt {attempt} started", step_label(*position, step)),
        EventKind::StepSucceeded {
            position,
            step,
            attempt,
            reconciled,
            pivot,
            output,
        } => {
            if step == crate::engine::START_CHILD
                && let Some(child) = output.get("id").and_then(Value::as_str)
            {
                let child_type = output
                    .get("saga_type")
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                return format!("#{position} started child saga {child_type} {child}");
            }
            let done = if *reconciled {
                format!(
                    "{} found applied by its reconciliation check (not re-run)",
                    step_label(*position, step)
                )
            } else {
                format!(
                    "{} succeeded on attempt {attempt}",
                    step_label(*position, step)
                )
            };
            if *pivot {
                format!("{done}; PAST THE PIVOT: the saga only goes forward now")
            } else {
                done
            }
        }
        EventKind::StepAttemptFailed {
            position,
            step,
            attempt,
            error,
            backoff_seconds,
            ..
        } => format!(
            "{} attempt {attempt} failed: {}; retry in {}",
            step_label(*position, step),
            describe_error(error),
            format_seconds(*backoff_seconds)
        ),
        EventKind::StepFailed {
            position,
            step,
            attempt,
            error,
            reason,
        } => format!(
            "{} FAILED on attempt {attempt} ({reason}): {}",
            step_label(*position, step),
            describe_error(error)
        ),
        EventKind::ValueRecorded {
            position,
            name,
            value,
        } => match (name.as_str(), value.as_u64()) {
            (crate::engine::SLEEP_UNTIL, Some(ms)) => {
                format!(
                    "#{position} sleeping until {}",
                    crate::Timestamp(ms).to_rfc3339()
                )
            }
            (n, Some(ms)) if n.starts_with(crate::engine::SIGNAL_DEADLINE) => {
                let signal = n
                    .strip_prefix(crate::engine::SIGNAL_DEADLINE)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .unwrap_or("?");
                format!(
                    "#{position} waiting for signal `{signal}` until {}",
                    crate::Timestamp(ms).to_rfc3339()
                )
            }
            _ if name == crate::engine::PARALLEL => format!(
                "#{position} parallel block: {} branches at #{}..#{}",
                value.get("branches").and_then(Value::as_u64).unwrap_or(0),
                u64::from(*position) + 1,
                u64::from(*position) + value.get("branches").and_then(Value::as_u64).unwrap_or(0)
            ),
            _ if name == crate::engine::CHILD_OUTCOME => format!(
                "#{position} child saga {} ended {}",
                value.get("id").and_then(Value::as_str).unwrap_or("?"),
                value.get("status").and_then(Value::as_str).unwrap_or("?")
            ),
            _ => match name.strip_prefix(crate::engine::SIGNAL_PREFIX) {
                Some(signal) => match value.get("sequence").and_then(Value::as_u64) {
                    Some(sequence) => format!("#{position} took signal `{signal}` #{sequence}"),
                    None => format!("#{position} TIMED OUT waiting for signal `{signal}`"),
                },
                None => format!("#{position} journaled {name}() = {value}"),
            },
        },
        // `describe` sends only the kinds above here; shown raw rather than panicking in a
        // display path should that ever change.
        other => format!("{other:?}"),
    }
}

/// The undo of a completed step: its attempts and how it ended.
fn describe_compensation_event(kind: &EventKind) -> String {
    match kind {
        EventKind::CompensationStarted { reason } => format!("COMPENSATING: {reason}"),
        EventKind::CompensationAttemptFailed {
            position,
            step,
            attempt,
            error,
            backoff_seconds,
            ..
        } => format!(
            "{} undo attempt {attempt} failed: {}; retry in {}",
            step_label(*position, step),
            describe_error(error),
            format_seconds(*backoff_seconds)
        ),
        EventKind::StepCompensated {
            position,
            step,
            attempt,
            reconciled,
        } => {
            if *reconciled {
                format!(
                    "{} undone: its reconciliation check found the undo applied (not re-run)",
                    step_label(*position, step)
                )
            } else {
                format!(
                    "{} undone (compensation attempt {attempt})",
                    step_label(*position, step)
                )
            }
        }
        EventKind::CompensationSkipped {
            position,
            step,
            why,
        } => format!("{} not undone: {why}", step_label(*position, step)),
        // `describe` sends only the kinds above here; shown raw rather than panicking in a
        // display path should that ever change.
        other => format!("{other:?}"),
    }
}

fn step_label(position: u32, step: &str) -> String {
    format!("#{position} {step:<20}")
}

fn describe_error(error: &StepError) -> String {
    if error.timeout {
        format!("{} [timeout, {}]", error.message, error.class)
    } else {
        format!("{} [{}]", error.message, error.class)
    }
}

fn format_seconds(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.0}ms", seconds * 1000.0)
    } else {
        format!("{seconds:.2}s")
    }
}

fn format_offset(offset: Duration) -> String {
    let ms = offset.as_millis();
    if ms < 10_000 {
        format!("+{ms}ms")
    } else {
        format!("+{:.1}s", offset.as_secs_f64())
    }
}
