//! The run's report: the schedule, what each fault did, the counts and the invariants'
//! verdicts, as JSON or text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::faults::Observation;
use super::invariants::{FenceLines, Verdict};
use super::load::LoadOutcome;
use super::rig::UnexpectedExit;
use super::schedule::Planned;

/// Counts over the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    /// Starts submitted (first deliveries).
    pub submitted: usize,
    /// Starts acknowledged.
    pub acknowledged: usize,
    /// Starts that failed after the client retries.
    pub start_errors: usize,
    /// Second deliveries answered with the existing saga.
    pub duplicate_starts: u64,
    /// Sagas in the store.
    pub store_sagas: usize,
    /// Completed.
    pub completed: usize,
    /// Compensated.
    pub compensated: usize,
    /// Failed.
    pub failed: usize,
    /// Effects in the ledger.
    pub effects: usize,
    /// Compensations in the ledger.
    pub compensations: usize,
    /// Step attempts that failed and were retried.
    pub retries: u64,
    /// Resumes from the journal (another coordinator, or after a restart).
    pub resumes: u64,
    /// Late writes refused (`write fenced`, `lease renewal rejected` and `the store
    /// refused this run's write` log lines over every coordinator).
    pub fenced_writes: usize,
    /// Attempts a coordinator dropped itself when its lease lapsed unrenewed.
    pub dropped_at_lapse: usize,
    /// Coordinators started again (after a kill or an exit).
    pub coordinator_restarts: usize,
    /// Coordinators that exited without a fault.
    pub unexpected_exits: usize,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The command that runs this schedule again.
    pub reproduce: String,
    /// `standalone` or `cluster`.
    pub mode: &'static str,
    /// Length of the fault phase, in seconds.
    pub seconds: u64,
    /// Coordinators.
    pub coordinators: usize,
    /// The schedule, as planned.
    pub schedule: Vec<Planned>,
    /// What each fault did.
    pub faults: Vec<Observation>,
    /// Faults seen taking effect, by kind.
    pub fired_by_kind: BTreeMap<String, usize>,
    /// The counts.
    pub counts: Counts,
    /// The fencing log lines over every coordinator.
    pub fence_lines: FenceLines,
    /// The load's own figures.
    pub load: LoadOutcome,
    /// Coordinators that exited without a fault.
    pub unexpected_exits: Vec<UnexpectedExit>,
    /// How long the wait for every saga to end took, in ms.
    pub quiet_ms: u64,
    /// The verdicts.
    pub invariants: Vec<Verdict>,
    /// Whether every invariant holds.
    pub pass: bool,
    /// Where the logs were kept (`--keep-dir`).
    pub log_dir: Option<String>,
}

impl Report {
    /// The report for people.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "saga-chaos: seed {} | {} | {} coordinators | {} s of faults",
            self.seed, self.mode, self.coordinators, self.seconds
        );
        let _ = writeln!(out, "Faults ({}):", self.faults.len());
        for obs in &self.faults {
            let _ = writeln!(
                out,
                "  #{:<2} {:>7.2}s..{:<8} {:<18} {:<8} {} {}",
                obs.index,
                obs.injected_ms as f64 / 1000.0,
                obs.healed_ms
                    .map_or_else(|| "-".to_owned(), |h| format!("{:.2}s", h as f64 / 1000.0)),
                obs.kind.name(),
                obs.target.to_string(),
                if obs.fired { "FIRED" } else { "NOT SEEN" },
                obs.evidence.join("; ")
            );
        }
        let fired: Vec<String> = self
            .fired_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(out, "Fired by kind: {}", fired.join(", "));
        let c = &self.counts;
        let _ = writeln!(
            out,
            "Counts: submitted {} | acknowledged {} | start errors {} | duplicate starts {} | store sagas {} | completed {} | compensated {} | failed {}",
            c.submitted,
            c.acknowledged,
            c.start_errors,
            c.duplicate_starts,
            c.store_sagas,
            c.completed,
            c.compensated,
            c.failed
        );
        let _ = writeln!(
            out,
            "        effects {} | compensations {} | retries {} | resumes {} | fenced writes {} | dropped at lapse {} | coordinator restarts {} | unexpected exits {} | quiet after {:.1}s",
            c.effects,
            c.compensations,
            c.retries,
            c.resumes,
            c.fenced_writes,
            c.dropped_at_lapse,
            c.coordinator_restarts,
            c.unexpected_exits,
            self.quiet_ms as f64 / 1000.0
        );
        for exit in &self.unexpected_exits {
            let _ = writeln!(
                out,
                "  {} exited at {:.2}s ({}): {}",
                exit.owner,
                exit.at_ms as f64 / 1000.0,
                exit.status,
                exit.stderr_tail.lines().last().unwrap_or_default()
            );
        }
        let _ = writeln!(out, "Invariants:");
        for verdict in &self.invariants {
            let _ = writeln!(
                out,
                "  {} {}",
                if verdict.pass { "PASS" } else { "FAIL" },
                verdict.name
            );
            for detail in &verdict.details {
                let _ = writeln!(out, "       {detail}");
            }
        }
        if let Some(dir) = &self.log_dir {
            let _ = writeln!(out, "Logs kept in {dir}");
        }
        if self.pass {
            let _ = writeln!(out, "Result: PASS");
        } else {
            let _ = writeln!(out, "Result: FAIL — reproduce with: {}", self.reproduce);
        }
        out
    }
}
