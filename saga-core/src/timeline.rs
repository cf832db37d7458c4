//! A readable timeline of one saga, rendered from its event history: every attempt, retry
//! with its backoff, failure, compensation and lease change, with times relative to the
//! start. Used by the examples and the operator CLI.
//!
//! ```
//! use saga_core::{EventKind, SagaEvent, Timestamp, timeline};
//!
//! let events = vec![
//!     SagaEvent { seq: 0, at: Timestamp(1_000), kind: EventKind::SagaStarted {
//!         saga_type: "deal_flow".into(), version: 1, input: serde_json::json!({}), idempotency_key: None } },
//!     SagaEvent { seq: 1, at: Timestamp(1_250), kind: EventKind::SagaCompensated },
//! ];
//! let text = timeline::render(&events);
//! assert!(text.contains("deal_flow"));
//! assert!(text.contains("+250ms"));
//! ```

use std::fmt::Write as _;
use std::time::Duration;

use crate::{EventKind, SagaEvent, StepError};

/// Renders `events` (one saga's history, oldest first) as indented lines.
#[must_use]
pub fn render(events: &[SagaEvent]) -> String {
    let mut out = String::new();
    let Some(first) = events.first() else {
        return "(no events)\n".to_owned();
    };
    for (index, event) in events.iter().enumerate() {
        let offset = format_offset(event.at.since(first.at));
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
        let _ = writeln!(out, "  {offset:>9}  {line}");
    }
    out
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
        EventKind::SagaCompleted { .. } => "COMPLETED".to_owned(),
        EventKind::SagaCompensated => "COMPENSATED: every completed step undone".to_owned(),
        EventKind::SagaFailed { kind, error } => format!("FAILED ({kind:?}): {error}"),
        EventKind::SagaRetried { reason, status } => {
            format!("RETRIED by an operator ({reason}); resumes {status}")
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
            ..
        } => {
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
            _ => format!("#{position} journaled {name}() = {value}"),
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
