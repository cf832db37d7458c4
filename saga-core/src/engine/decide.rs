//! The drive decision: from how the workflow's `run` ended, what this run does next. Pure, so
//! that every combination is tested without a store or a workflow.

use std::collections::HashSet;

use serde_json::Value;

use super::SagaError;
use super::context::{Halt, Mode};
use crate::{StepRecord, StepStatus, Timestamp};

/// How the workflow's `run` call ended, with what the decision needs to know about the
/// journal it replayed.
pub(super) struct Ended<'a> {
    /// Whether the run executed steps or only replayed them for compensation.
    pub(super) mode: Mode,
    /// Why the run stopped making progress, if it did.
    pub(super) halt: Option<Halt>,
    /// What `run` returned.
    pub(super) result: Result<Value, SagaError>,
    /// How many journal entries the workflow went through.
    pub(super) position: u32,
    /// The journal as recorded.
    pub(super) journal: &'a [StepRecord],
    /// The journal positions of the steps the workflow reached in this run.
    pub(super) seen: HashSet<u32>,
    /// Whether the saga has passed its pivot (it then only goes forward).
    pub(super) past_pivot: bool,
}

/// What the run does next.
#[derive(Debug)]
pub(super) enum Decision {
    /// Record the output: the saga completed.
    Complete(Value),
    /// Record the start of compensation because the workflow returned this error, then
    /// compensate.
    Abort(String),
    /// Record the start of compensation for the cancel request, then compensate.
    Cancel,
    /// Compensation is already recorded: compensate.
    Compensate,
    /// A durable timer was set: the saga is due again at this time.
    Suspend(Timestamp),
    /// The workflow diverged from its journal: the saga is set aside (quarantined) without
    /// compensating, until the code it started under is deployed again.
    QuarantineNondeterministic { position: u32, message: String },
    /// The workflow returned an error past the pivot: the saga fails without compensating,
    /// for an operator to retry forward.
    FailAfterPivot(String),
    /// The run already recorded the saga's end (a step gave up past the pivot: its
    /// `StepFailed` and the `SagaFailed` went in one commit).
    Ended,
    /// This run must stop without writing more.
    Stop(Halt),
}

/// Decides what a run does once its workflow has returned.
pub(super) fn decide(ended: Ended<'_>) -> Decision {
    let Ended {
        mode,
        halt,
        result,
        position,
        journal,
        seen,
        past_pivot,
    } = ended;
    match (mode, halt, result) {
        (Mode::Forward, None, Ok(output)) => {
            let recorded = journal.len() as u32;
            if position < recorded {
                let message = format!(
                    "the workflow finished after {position} journal entries but {recorded} are recorded"
                );
                return Decision::QuarantineNondeterministic { position, message };
            }
            Decision::Complete(output)
        }
        (Mode::Forward, None, Err(err)) if past_pivot => Decision::FailAfterPivot(err.to_string()),
        // The workflow's own words: `CompensationReason::Aborted` says "workflow aborted".
        (Mode::Forward, None, Err(SagaError::Aborted(message))) => Decision::Abort(message),
        (Mode::Forward, None, Err(err)) => Decision::Abort(err.to_string()),
        (_, Some(Halt::FailedAfterPivot(_)), _) => Decision::Ended,
        (Mode::Forward, Some(Halt::Cancelled), _) => Decision::Cancel,
        (_, Some(Halt::StepFailed(_)), _) => Decision::Compensate,
        (Mode::Collect, None | Some(Halt::Collected | Halt::Cancelled), _) => {
            // Every completed step must have been seen again, or its undo would be
            // skipped without a word: a replay that ends early has diverged.
            let missing = journal.iter().find(|r| {
                !r.is_value && r.status == StepStatus::Succeeded && !seen.contains(&r.position)
            });
            match missing {
                Some(r) => Decision::QuarantineNondeterministic {
                    position: r.position,
                    message: format!(
                        "replaying for compensation, the workflow ended before it reached completed step `{}`",
                        r.name
                    ),
                },
                None => Decision::Compensate,
            }
        }
        (_, Some(Halt::Suspended(until)), _) => Decision::Suspend(until),
        (_, Some(Halt::NonDeterministic { position, message }), _) => {
            Decision::QuarantineNondeterministic { position, message }
        }
        (_, Some(halt @ (Halt::Interrupted(_) | Halt::BadData(_) | Halt::Collected)), _) => {
            Decision::Stop(halt)
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::Interruption;

    fn entry(position: u32, name: &str, status: &str, is_value: bool) -> StepRecord {
        serde_json::from_value(json!({
            "position": position,
            "name": name,
            "is_value": is_value,
            "status": status,
            "attempts": 1,
        }))
        .expect("a valid journal entry")
    }

    /// Mode, halt, what `run` returned, journal position, steps seen, expected decision.
    type Case = (
        Mode,
        Option<Halt>,
        Result<Value, SagaError>,
        u32,
        HashSet<u32>,
        &'static str,
    );

    /// Past the pivot: halt, what `run` returned, journal position, expected decision.
    type PivotCase = (Option<Halt>, Result<Value, SagaError>, u32, &'static str);

    /// A short, comparable name for a decision.
    fn label(decision: &Decision) -> String {
        match decision {
            Decision::Complete(output) => format!("complete {output}"),
            Decision::Abort(message) => format!("abort: {message}"),
            Decision::Cancel => "cancel".into(),
            Decision::Compensate => "compensate".into(),
            Decision::Suspend(until) => format!("suspend {}", until.0),
            Decision::QuarantineNondeterministic { position, message } => {
                format!("quarantine at {position}: {message}")
            }
            Decision::FailAfterPivot(message) => format!("fail after pivot: {message}"),
            Decision::Ended => "ended".into(),
            Decision::Stop(halt) => format!("stop {halt:?}"),
        }
    }

    #[test]
    fn past_the_pivot_a_run_only_goes_forward() {
        let journal = vec![
            entry(0, "reserve", "succeeded", false),
            entry(1, "charge", "succeeded", false),
            entry(2, "ship", "failed", false),
        ];
        let all = || HashSet::from([0, 1, 2]);
        let failed = || SagaError::Aborted("out of stock".into());
        let stopped = || Halt::Interrupted(Interruption::Stopped("test".into()));
        #[rustfmt::skip]
        let table: Vec<PivotCase> = vec![
            (None, Ok(json!("done")), 3, "complete \"done\""),
            (None, Err(failed()), 3,
                "fail after pivot: saga aborted by its workflow: out of stock"),
            (Some(Halt::FailedAfterPivot(failed())), Err(failed()), 3, "ended"),
            (Some(Halt::Suspended(crate::Timestamp(9))), Err(failed()), 3, "suspend 9"),
            (Some(stopped()), Err(failed()), 3, "stop Interrupted(Stopped(\"test\"))"),
        ];
        for (halt, result, position, expected) in table {
            let case = format!("{halt:?} {result:?} at {position}");
            let decision = decide(Ended {
                mode: Mode::Forward,
                halt,
                result,
                position,
                journal: &journal,
                seen: all(),
                past_pivot: true,
            });
            assert_eq!(label(&decision), expected, "{case}");
        }
    }

    #[test]
    fn every_way_a_run_ends_has_one_decision() {
        // A journal of two completed steps with a journaled value between them.
        let journal = vec![
            entry(0, "reserve", "succeeded", false),
            entry(1, "now", "succeeded", true),
            entry(2, "charge", "succeeded", false),
        ];
        let all = || HashSet::from([0, 2]);
        let first_only = || HashSet::from([0]);
        let failed = || SagaError::Aborted("card declined".into());
        let done = || Ok(json!("done"));
        let stopped = || Halt::Interrupted(Interruption::Stopped("test".into()));
        #[rustfmt::skip]
        let table: Vec<Case> = vec![
            // Forward runs.
            (Mode::Forward, None, done(), 3, all(), "complete \"done\""),
            (Mode::Forward, None, done(), 1, all(),
                "quarantine at 1: the workflow finished after 1 journal entries but 3 are recorded"),
            (Mode::Forward, None, Err(failed()), 3, all(),
                "abort: card declined"),
            (Mode::Forward, Some(Halt::Cancelled), Err(failed()), 1, all(), "cancel"),
            (Mode::Forward, Some(Halt::StepFailed(failed())), Err(failed()), 1,
                first_only(), "compensate"),
            (Mode::Forward, Some(Halt::Suspended(crate::Timestamp(42))), Err(failed()), 1,
                all(), "suspend 42"),
            (Mode::Forward, Some(Halt::NonDeterministic { position: 2, message: "moved".into() }),
                Err(failed()), 2, all(), "quarantine at 2: moved"),
            (Mode::Forward, Some(Halt::Collected), done(), 3, all(), "stop Collected"),
            (Mode::Forward, Some(Halt::BadData("too big".into())), done(), 3, all(),
                "stop BadData(\"too big\")"),
            (Mode::Forward, Some(stopped()), done(), 3, all(),
                "stop Interrupted(Stopped(\"test\"))"),
            // Replays for compensation: every completed step must have been seen again.
            (Mode::Collect, None, done(), 3, all(), "compensate"),
            (Mode::Collect, Some(Halt::Collected), Err(failed()), 3, all(), "compensate"),
            (Mode::Collect, Some(Halt::Cancelled), Err(failed()), 3, all(), "compensate"),
            (Mode::Collect, None, done(), 1, first_only(),
                "quarantine at 2: replaying for compensation, the workflow ended before it reached completed step `charge`"),
            (Mode::Collect, Some(Halt::Collected), Err(failed()), 1, first_only(),
                "quarantine at 2: replaying for compensation, the workflow ended before it reached completed step `charge`"),
            (Mode::Collect, Some(Halt::StepFailed(failed())), Err(failed()), 1,
                first_only(), "compensate"),
            (Mode::Collect, Some(Halt::Suspended(crate::Timestamp(7))), Err(failed()), 1,
                first_only(), "suspend 7"),
            (Mode::Collect, Some(stopped()), Err(failed()), 1, first_only(),
                "stop Interrupted(Stopped(\"test\"))"),
        ];
        for (mode, halt, result, position, seen, expected) in table {
            let case = format!("{mode:?} {halt:?} {result:?} at {position}");
            let decision = decide(Ended {
                mode,
                halt,
                result,
                position,
                journal: &journal,
                seen,
                past_pivot: false,
            });
            assert_eq!(label(&decision), expected, "{case}");
        }
    }

    #[test]
    fn a_journaled_value_need_not_be_seen_again_to_compensate() {
        let journal = vec![
            entry(0, "reserve", "succeeded", false),
            entry(1, "uuid", "succeeded", true),
        ];
        let decision = decide(Ended {
            mode: Mode::Collect,
            halt: Some(Halt::Collected),
            result: Err(SagaError::Aborted("x".into())),
            position: 1,
            journal: &journal,
            seen: [0].into(),
            past_pivot: false,
        });
        assert_eq!(label(&decision), "compensate");
    }

    #[test]
    fn a_step_that_did_not_succeed_need_not_be_seen_again_to_compensate() {
        let journal = vec![
            entry(0, "reserve", "succeeded", false),
            entry(1, "charge", "failed", false),
        ];
        let decision = decide(Ended {
            mode: Mode::Collect,
            halt: None,
            result: Ok(Value::Null),
            position: 1,
            journal: &journal,
            seen: [0].into(),
            past_pivot: false,
        });
        assert_eq!(label(&decision), "compensate");
    }
}
