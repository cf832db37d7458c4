//! The invariants, checked from the participants' side once the system is quiet: the
//! acknowledged sagas all ended, the ledger of the simulated back office shows every effect
//! once and every compensation once in reverse order, every history folds to its stored
//! state with one terminal event, no step outcome was written across a change of lease,
//! and every pause that let another coordinator take over was answered by fencing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use saga_core::{Engine, EventKind, SagaId, SagaState};
use saga_examples::report::{LedgerCheck, SagaReport};
use serde::Serialize;

use super::faults::{Observation, PauseRecord};

/// One invariant's verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// Its name.
    pub name: &'static str,
    /// Whether it holds.
    pub pass: bool,
    /// What was found (the violations when it fails, the evidence when it holds).
    pub details: Vec<String>,
}

impl Verdict {
    fn new(name: &'static str, problems: Vec<String>, evidence: String) -> Self {
        if problems.is_empty() {
            Self {
                name,
                pass: true,
                details: vec![evidence],
            }
        } else {
            let mut details = problems;
            let extra = details.len().saturating_sub(20);
            details.truncate(20);
            if extra > 0 {
                details.push(format!("... and {extra} more"));
            }
            Self {
                name,
                pass: false,
                details,
            }
        }
    }
}

/// What the store says once quiet.
pub struct Quiet {
    /// How long it took.
    pub waited: Duration,
    /// Sagas not terminal when the bound ran out (empty when quiet).
    pub unfinished: Vec<String>,
}

/// Polls the store until every acknowledged saga is in it and every saga in it is
/// terminal, for at most `bound`.
pub async fn wait_quiet(engine: &Engine, acknowledged: &[SagaId], bound: Duration) -> Quiet {
    let began = Instant::now();
    let wanted: BTreeSet<SagaId> = acknowledged.iter().copied().collect();
    let mut unfinished = vec!["the store was never read".to_owned()];
    loop {
        match saga_examples::scenario::all_sagas(engine).await {
            Ok(all) => {
                let present: BTreeSet<SagaId> = all.iter().map(|(id, _, _)| *id).collect();
                unfinished = all
                    .iter()
                    .filter(|(_, status, _)| !status.is_terminal())
                    .map(|(id, status, kind)| format!("{kind} {id} is {status}"))
                    .chain(
                        wanted
                            .difference(&present)
                            .map(|id| format!("acknowledged saga {id} is not in the store")),
                    )
                    .collect();
                if unfinished.is_empty() {
                    break;
                }
            }
            Err(err) => unfinished = vec![format!("the store could not be listed: {err}")],
        }
        if began.elapsed() >= bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Quiet {
        waited: began.elapsed(),
        unfinished,
    }
}

/// Every acknowledged saga is in the store and terminal.
#[must_use]
pub fn acknowledged_terminal(sagas: &[SagaReport], acknowledged: &[SagaId]) -> Verdict {
    let by_id: BTreeMap<SagaId, &SagaReport> = sagas.iter().map(|s| (s.state.id, s)).collect();
    let problems: Vec<String> = acknowledged
        .iter()
        .filter_map(|id| match by_id.get(id) {
            None => Some(format!("acknowledged saga {id} is not in the store")),
            Some(s) if !s.state.status.is_terminal() => {
                Some(format!("acknowledged saga {id} is {}", s.state.status))
            }
            Some(_) => None,
        })
        .collect();
    Verdict::new(
        "acknowledged sagas terminal",
        problems,
        format!("{} acknowledged, all terminal", acknowledged.len()),
    )
}

/// Every saga in the store (acknowledged or not: a start whose answer was lost may still
/// have created one) is terminal.
#[must_use]
pub fn started_equals_terminal(sagas: &[SagaReport]) -> Verdict {
    let problems: Vec<String> = sagas
        .iter()
        .filter(|s| !s.state.status.is_terminal())
        .map(|s| format!("{} {} is {}", s.state.saga_type, s.state.id, s.state.status))
        .collect();
    let terminal = sagas.len() - problems.len();
    Verdict::new(
        "started = terminal",
        problems,
        format!("{} sagas in the store, {terminal} terminal", sagas.len()),
    )
}

/// `saga_examples::report::check_ledger`'s verdict.
#[must_use]
pub fn ledger(check: &LedgerCheck) -> Verdict {
    Verdict::new(
        "ledger",
        check.problems.clone(),
        format!(
            "{} effects, each once per idempotency key and (saga, step); {} compensations, each once, newest first; {} children undone with their parents; books match the outcomes",
            check.effects, check.compensations, check.children_undone
        ),
    )
}

/// Every history folds to the stored state, with exactly one terminal event.
#[must_use]
pub fn histories_fold(sagas: &[SagaReport]) -> Verdict {
    let mut problems = Vec::new();
    for saga in sagas {
        let id = saga.state.id;
        let terminal = saga
            .events
            .iter()
            .filter(|e| {
                matches!(
                    e.kind,
                    EventKind::SagaCompleted { .. }
                        | EventKind::SagaCompensated
                        | EventKind::SagaFailed { .. }
                        | EventKind::SagaAbandoned { .. }
                )
            })
            .count();
        if terminal != 1 {
            problems.push(format!("saga {id} has {terminal} terminal events"));
        }
        match SagaState::fold(id, &saga.events) {
            Ok(mut folded) => {
                // A cancel request's event may be appended without the running saga folding
                // it, and stamps its own clock (as `Engine::state` allows).
                folded.updated_at = saga.state.updated_at;
                folded.cancel_requested = saga.state.cancel_requested;
                if folded != saga.state {
                    problems.push(format!(
                        "saga {id}: the state folded from its history ({}, {} journal entries) differs from the stored one ({}, {} entries)",
                        folded.status,
                        folded.journal.len(),
                        saga.state.status,
                        saga.state.journal.len()
                    ));
                }
            }
            Err(err) => problems.push(format!("saga {id}: the history does not fold: {err}")),
        }
    }
    Verdict::new(
        "histories fold",
        problems,
        format!(
            "{} histories fold to their stored states, one terminal event each",
            sagas.len()
        ),
    )
}

/// No step outcome crossed a change of lease: every `StepSucceeded` that ran (not
/// reconciled) follows its own `StepStarted` with no `LeaseAcquired` in between. A late
/// write by a coordinator that lost its lease (paused, partitioned) would land after the
/// new holder's `LeaseAcquired`: the fence must have rejected it.
#[must_use]
pub fn no_write_across_leases(sagas: &[SagaReport]) -> Verdict {
    let mut problems = Vec::new();
    let mut checked = 0_usize;
    for saga in sagas {
        // (position, attempt) → whether a LeaseAcquired came after its latest StepStarted.
        let mut started: BTreeMap<(u32, u32), bool> = BTreeMap::new();
        for event in &saga.events {
            match &event.kind {
                EventKind::LeaseAcquired { .. } => {
                    for crossed in started.values_mut() {
                        *crossed = true;
                    }
                }
                EventKind::StepStarted {
                    position, attempt, ..
                } => {
                    started.insert((*position, *attempt), false);
                }
                EventKind::StepSucceeded {
                    position,
                    attempt,
                    reconciled: false,
                    step,
                    ..
                } => {
                    checked += 1;
                    match started.get(&(*position, *attempt)) {
                        Some(false) => {}
                        Some(true) => problems.push(format!(
                            "saga {}: {step} (#{position} attempt {attempt}) succeeded after another lease was taken (seq {})",
                            saga.state.id, event.seq
                        )),
                        None => problems.push(format!(
                            "saga {}: {step} (#{position} attempt {attempt}) succeeded without being started (seq {})",
                            saga.state.id, event.seq
                        )),
                    }
                }
                _ => {}
            }
        }
    }
    Verdict::new(
        "no write across leases",
        problems,
        format!("{checked} step results each written under the lease that started them"),
    )
}

/// The log lines of a coordinator that show a late write refused or withheld.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct FenceLines {
    /// `write fenced`: a commit rejected by the store's fence.
    pub write_fenced: usize,
    /// `lease renewal rejected`: a renewal rejected (fenced or gone).
    pub renewal_rejected: usize,
    /// `lease could not be renewed before it lapsed`: the attempt dropped before writing.
    pub lapsed: usize,
    /// `the store refused this run's write`: a late write refused because the saga changed
    /// meanwhile (finished by its new owner, say).
    pub refused: usize,
}

impl FenceLines {
    /// Counts them in `log`.
    #[must_use]
    pub fn count(log: &str) -> Self {
        let mut lines = Self::default();
        for line in log.lines() {
            if line.contains("write fenced") {
                lines.write_fenced += 1;
            } else if line.contains("lease renewal rejected") {
                lines.renewal_rejected += 1;
            } else if line.contains("lease could not be renewed before it lapsed") {
                lines.lapsed += 1;
            } else if line.contains("the store refused this run's write") {
                lines.refused += 1;
            }
        }
        lines
    }

    /// All of them.
    #[must_use]
    pub fn total(self) -> usize {
        self.write_fenced + self.renewal_rejected + self.lapsed + self.refused
    }

    /// Sums two counts.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self {
            write_fenced: self.write_fenced + other.write_fenced,
            renewal_rejected: self.renewal_rejected + other.renewal_rejected,
            lapsed: self.lapsed + other.lapsed,
            refused: self.refused + other.refused,
        }
    }
}

/// Fencing fires: pauses past the lease during which another coordinator took over a saga
/// of the paused one are answered, after the SIGCONT, by a rejected late write or an attempt
/// the paused coordinator dropped itself; at least one is, and those that are not are
/// listed. No write was pending when the pause held no lease
/// once stopped, or when its runs of the sagas taken over had already been interrupted
/// before the stop (a store error ends a run but leaves its lease to lapse in the store).
/// `log(owner)` gives that owner's whole stderr.
#[must_use]
pub fn pauses_fenced(
    pauses: &[PauseRecord],
    lease: Duration,
    log: impl Fn(&str) -> String,
) -> Verdict {
    let mut evidence = Vec::new();
    let mut silent = Vec::new();
    let mut answered = 0_usize;
    for pause in pauses {
        let past_lease = Duration::from_millis(pause.stopped_ms) > lease;
        let text = log(&pause.owner);
        let (before, after) = text.split_at(pause.log_offset.min(text.len()));
        let lines = FenceLines::count(after);
        // A run that ended just before the stop is logged when the coordinator reaps it,
        // which may be after the SIGCONT: when the first line about each taken-over saga
        // after the stop says its run ended (interrupted or failed, by a store error say),
        // it had no late write to be refused.
        let ended_at_stop = !pause.taken_over_ids.is_empty()
            && pause.taken_over_ids.iter().all(|id| {
                let id = id.to_string();
                after.lines().find(|l| l.contains(&id)).is_some_and(|l| {
                    l.contains("saga run interrupted") || l.contains("saga run failed")
                })
            });
        // Its run of a saga had ended before the stop when the last line about the saga
        // says the run was interrupted.
        let ended_before = !pause.taken_over_ids.is_empty()
            && pause.taken_over_ids.iter().all(|id| {
                let id = id.to_string();
                before
                    .lines()
                    .rev()
                    .find(|l| l.contains(&id))
                    .is_some_and(|l| l.contains("saga run interrupted"))
            });
        let what = format!(
            "pause #{} of {} ({} ms): held {}, taken over {}, then {} write fenced, {} renewal rejected, {} dropped at lapse, {} refused",
            pause.index,
            pause.owner,
            pause.stopped_ms,
            pause.held.map_or_else(|| "?".into(), |h| h.to_string()),
            pause
                .taken_over
                .map_or_else(|| "?".into(), |t| t.to_string()),
            lines.write_fenced,
            lines.renewal_rejected,
            lines.lapsed,
            lines.refused
        );
        match (pause.held, pause.taken_over) {
            (Some(0), _) => evidence.push(format!("{what}: no write was pending")),
            (Some(_), Some(taken)) if taken > 0 && past_lease => {
                if lines.total() == 0 && (ended_before || ended_at_stop) {
                    evidence.push(format!(
                        "{what}: its runs of those sagas had been interrupted before the stop, so no write was pending"
                    ));
                } else if lines.total() == 0 {
                    silent.push(format!(
                        "{what}: no late write seen after the take-over (none may have been pending: a write already on its way when it stopped lands before the take-over; what was written is checked by `no write across leases` and the ledger)"
                    ));
                } else {
                    answered += 1;
                    evidence.push(what);
                }
            }
            _ => evidence.push(format!("{what}: nothing taken over, so nothing to fence")),
        }
    }
    if pauses.is_empty() {
        evidence.push("no pause ran".into());
    }
    // Fencing must be seen to fire: a run whose pauses let other coordinators take sagas
    // over, without one refused late write, fails. One silent pause among answered ones is
    // reported, not failed: the safety of what it wrote is the other invariants' job.
    let problems = if answered == 0 && !silent.is_empty() {
        silent.clone()
    } else {
        Vec::new()
    };
    evidence.extend(silent);
    let mut verdict = Verdict::new("pauses fenced", problems, String::new());
    if verdict.pass {
        verdict.details = evidence;
    }
    verdict
}

/// Every injected fault was seen taking effect, and every planned one was injected.
#[must_use]
pub fn faults_fired(planned: usize, observations: &[Observation]) -> Verdict {
    let mut problems: Vec<String> = observations
        .iter()
        .filter(|o| !o.fired)
        .map(|o| {
            format!(
                "#{} {} on {}: not observed ({})",
                o.index,
                o.kind,
                o.target,
                o.evidence.join("; ")
            )
        })
        .collect();
    if observations.len() != planned {
        problems.push(format!(
            "{planned} faults planned but {} injected",
            observations.len()
        ));
    }
    Verdict::new(
        "faults fired",
        problems,
        format!(
            "{} faults injected, each seen taking effect",
            observations.len()
        ),
    )
}

/// Every second delivery of a start answered with the first one's saga.
#[must_use]
pub fn idempotent_starts(mismatches: &[String], duplicates: u64) -> Verdict {
    Verdict::new(
        "idempotent starts",
        mismatches.to_vec(),
        format!("{duplicates} second deliveries answered with the first delivery's saga"),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use saga_core::{SagaEvent, Timestamp};

    use super::*;

    fn event(seq: u64, kind: EventKind) -> SagaEvent {
        SagaEvent {
            seq,
            at: Timestamp(1_000 + seq),
            kind,
        }
    }

    /// A saga whose step #0 started under `first`'s lease and succeeded after `between`.
    fn saga(between: Vec<EventKind>) -> SagaReport {
        let id = SagaId::from_idempotency_key("t", "k");
        let mut kinds = vec![
            EventKind::SagaStarted {
                saga_type: "t".into(),
                version: 1,
                input: serde_json::json!({}),
                idempotency_key: None,
                parent: None,
                journal_format: 2,
            },
            EventKind::LeaseAcquired {
                owner: "a".into(),
                fence: 1,
            },
            EventKind::StepStarted {
                position: 0,
                step: "s".into(),
                attempt: 1,
                idempotency_key: "k".into(),
                input: None,
            },
        ];
        kinds.extend(between);
        kinds.push(EventKind::StepSucceeded {
            position: 0,
            step: "s".into(),
            attempt: 1,
            output: serde_json::json!(1),
            reconciled: false,
            pivot: false,
        });
        let events: Vec<SagaEvent> = kinds
            .into_iter()
            .enumerate()
            .map(|(seq, kind)| event(seq as u64, kind))
            .collect();
        let state = SagaState::fold(id, &events[..1]).unwrap();
        SagaReport { state, events }
    }

    #[test]
    fn a_result_written_after_another_lease_is_a_violation() {
        assert!(no_write_across_leases(&[saga(Vec::new())]).pass);
        let crossed = saga(vec![EventKind::LeaseAcquired {
            owner: "b".into(),
            fence: 2,
        }]);
        let verdict = no_write_across_leases(&[crossed]);
        assert!(!verdict.pass, "{verdict:?}");
        assert!(verdict.details[0].contains("after another lease"));
    }

    fn pause(held: usize, taken_over: usize) -> PauseRecord {
        PauseRecord {
            index: 3,
            owner: "coord-0-0".into(),
            stopped_ms: 3_000,
            held: Some(held),
            taken_over: Some(taken_over),
            taken_over_ids: Vec::new(),
            log_offset: 0,
        }
    }

    #[test]
    fn a_takeover_without_a_rejected_write_is_a_violation() {
        let lease = Duration::from_secs(2);
        let none = |_: &str| String::new();
        let fenced = |_: &str| "{\"message\":\"write fenced; stopping this run\"}".to_owned();
        assert!(!pauses_fenced(&[pause(1, 1)], lease, none).pass);
        assert!(pauses_fenced(&[pause(1, 1)], lease, fenced).pass);
        assert!(pauses_fenced(&[pause(0, 0)], lease, none).pass);
        assert!(pauses_fenced(&[pause(2, 0)], lease, none).pass);
        // One silent pause among answered ones is listed, not failed.
        let mut other = pause(1, 1);
        other.owner = "coord-1-0".into();
        let fenced_for_0 = |owner: &str| {
            if owner == "coord-0-0" {
                "{\"message\":\"write fenced; stopping this run\"}".to_owned()
            } else {
                String::new()
            }
        };
        let verdict = pauses_fenced(&[pause(1, 1), other.clone()], lease, fenced_for_0);
        assert!(verdict.pass);
        assert!(
            verdict
                .details
                .iter()
                .any(|d| d.contains("no late write seen"))
        );
        assert!(!pauses_fenced(&[other], lease, fenced_for_0).pass);
    }

    #[test]
    fn a_fault_not_seen_is_a_violation() {
        let obs = Observation {
            index: 0,
            kind: super::super::schedule::FaultKind::Kill,
            target: super::super::schedule::Target::Coordinator(0),
            planned_ms: 1_000,
            injected_ms: 1_001,
            healed_ms: None,
            fired: false,
            evidence: vec!["error: coord-0-0 had already exited".into()],
        };
        assert!(!faults_fired(1, std::slice::from_ref(&obs)).pass);
        assert!(
            faults_fired(
                1,
                &[Observation {
                    fired: true,
                    ..obs.clone()
                }]
            )
            .pass
        );
        assert!(!faults_fired(2, &[Observation { fired: true, ..obs }]).pass);
    }
}
