//! The end-of-run summary: timelines, totals and the ledger check.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use saga_core::{
    Engine, EngineError, EventKind, Phase, SagaEvent, SagaState, SagaStatus, StepStatus, timeline,
};

use crate::ledger::{Entry, OfficeState};

/// Which timelines to print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Timelines {
    /// Every saga.
    All,
    /// Sagas that retried, compensated, failed or resumed (at most 8), or all of them when
    /// there are 12 or fewer.
    Interesting,
    /// None.
    None,
}

/// Totals over the run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Sagas in the store.
    pub sagas: usize,
    /// By status.
    pub by_status: BTreeMap<SagaStatus, usize>,
    /// Step attempts started.
    pub attempts: u64,
    /// Failed attempts that were retried (forward and compensation).
    pub retries: u64,
    /// Compensations applied.
    pub compensations: u64,
    /// Duplicate deliveries and repeated calls answered from a recorded result.
    pub idempotency_hits: u64,
    /// Resumes from the journal.
    pub resumes: u64,
}

impl Totals {
    /// The one-line summary both binaries print:
    /// `sagas N | completed N | compensated N | failed N | attempts N | ...`.
    #[must_use]
    pub fn line(&self) -> String {
        let count = |status| self.by_status.get(&status).copied().unwrap_or_default();
        format!(
            "sagas {} | completed {} | compensated {} | failed {} | attempts {} | retries {} | compensations {} | idempotency hits {} | resumes {}",
            self.sagas,
            count(SagaStatus::Completed),
            count(SagaStatus::Compensated),
            count(SagaStatus::Failed),
            self.attempts,
            self.retries,
            self.compensations,
            self.idempotency_hits,
            self.resumes,
        )
    }
}

/// The ledger check's findings.
#[derive(Clone, Debug, Default)]
pub struct LedgerCheck {
    /// Effects recorded.
    pub effects: usize,
    /// Compensations recorded.
    pub compensations: usize,
    /// Everything that is wrong; empty when the check holds.
    pub problems: Vec<String>,
}

impl LedgerCheck {
    /// `true` when nothing is wrong.
    #[must_use]
    pub fn holds(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One saga's data for the report.
pub struct SagaReport {
    /// Folded state.
    pub state: SagaState,
    /// History.
    pub events: Vec<SagaEvent>,
}

/// Every saga in the engine's store with its state and history, oldest first.
///
/// # Errors
/// A store error.
pub async fn collect(engine: &Engine) -> Result<Vec<SagaReport>, EngineError> {
    let mut sagas = Vec::new();
    for (id, _, _) in crate::scenario::all_sagas(engine).await? {
        sagas.push(SagaReport {
            state: engine.state(id).await?,
            events: engine.history(id).await?,
        });
    }
    sagas.sort_by_key(|s| (s.state.created_at, s.state.saga_type.clone()));
    Ok(sagas)
}

/// Latencies read from one saga's history, in milliseconds of the stored timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SagaLatency {
    /// `SagaStarted` to the terminal event (`None` while not terminal).
    pub total_ms: Option<u64>,
    /// `SagaStarted` to the first `StepStarted` (`None` before any step started).
    pub first_step_ms: Option<u64>,
}

/// The latencies of one saga.
#[must_use]
pub fn latency(saga: &SagaReport) -> SagaLatency {
    let started = saga
        .events
        .iter()
        .find(|e| matches!(e.kind, EventKind::SagaStarted { .. }))
        .map(|e| e.at);
    let first_step = saga
        .events
        .iter()
        .find(|e| matches!(e.kind, EventKind::StepStarted { .. }))
        .map(|e| e.at);
    let ended = saga
        .events
        .iter()
        .rev()
        .find(|e| {
            matches!(
                e.kind,
                EventKind::SagaCompleted { .. }
                    | EventKind::SagaCompensated
                    | EventKind::SagaFailed { .. }
                    | EventKind::SagaAbandoned { .. }
            )
        })
        .map(|e| e.at);
    let since = |end: Option<saga_core::Timestamp>| {
        started
            .zip(end)
            .map(|(start, end)| u64::try_from(end.since(start).as_millis()).unwrap_or(u64::MAX))
    };
    SagaLatency {
        total_ms: since(ended),
        first_step_ms: since(first_step),
    }
}

/// The `q` quantile (0.0..=1.0, nearest rank) of `values`; `None` when empty.
#[must_use]
pub fn quantile(values: &[u64], q: f64) -> Option<u64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank: ceil(q * n), 1-based; the float is small and non-negative.
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Counts totals over every saga; `duplicate_starts` are starts answered with an existing
/// saga (counted as idempotency hits with the services' suppressed duplicates).
#[must_use]
pub fn totals(sagas: &[SagaReport], duplicate_starts: u64, office: &OfficeState) -> Totals {
    let mut totals = Totals {
        sagas: sagas.len(),
        ..Totals::default()
    };
    for saga in sagas {
        *totals.by_status.entry(saga.state.status).or_default() += 1;
        for event in &saga.events {
            match &event.kind {
                EventKind::StepStarted { .. } => totals.attempts += 1,
                EventKind::StepAttemptFailed { .. }
                | EventKind::CompensationAttemptFailed { .. } => {
                    totals.retries += 1;
                }
                EventKind::StepCompensated { .. } => totals.compensations += 1,
                EventKind::SagaResumed { .. } => totals.resumes += 1,
                _ => {}
            }
        }
    }
    totals.idempotency_hits = duplicate_starts + office.ledger.duplicates;
    totals
}

/// Checks the ledger against the sagas' journals: no effect applied twice, every completed
/// saga's effects applied once and never undone, every compensated saga fully undone in
/// reverse order, and the books agree with the outcomes.
#[must_use]
pub fn check_ledger(sagas: &[SagaReport], office: &OfficeState) -> LedgerCheck {
    let entries = &office.ledger.entries;
    let mut check = LedgerCheck {
        effects: entries.iter().filter(|e| e.phase == Phase::Forward).count(),
        compensations: entries
            .iter()
            .filter(|e| e.phase == Phase::Compensate)
            .count(),
        problems: repeated_entries(entries),
    };
    let mut by_saga: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for entry in entries {
        by_saga.entry(entry.saga.as_str()).or_default().push(entry);
    }
    for saga in sagas {
        let id = saga.state.id.to_string();
        let mine = by_saga.get(id.as_str()).cloned().unwrap_or_default();
        check_saga(saga, &id, &mine, &mut check.problems);
    }
    check_books(sagas, office, &mut check.problems);
    check
}

/// A problem for every effect or compensation applied more than once.
fn repeated_entries(entries: &[Entry]) -> Vec<String> {
    let mut applied: BTreeMap<(&str, u32, Phase), usize> = BTreeMap::new();
    for entry in entries {
        *applied
            .entry((entry.saga.as_str(), entry.position, entry.phase))
            .or_default() += 1;
    }
    applied
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|((saga, position, phase), count)| {
            format!("saga {saga}: step #{position} {phase:?} applied {count} times")
        })
        .collect()
}

/// Checks one saga's ledger entries (`mine`) against its outcome.
fn check_saga(saga: &SagaReport, id: &str, mine: &[&Entry], problems: &mut Vec<String>) {
    let forward: Vec<&Entry> = mine
        .iter()
        .copied()
        .filter(|e| e.phase == Phase::Forward)
        .collect();
    let undone: Vec<&Entry> = mine
        .iter()
        .copied()
        .filter(|e| e.phase == Phase::Compensate)
        .collect();
    match saga.state.status {
        SagaStatus::Completed => check_completed(saga, id, &forward, &undone, problems),
        SagaStatus::Compensated => check_compensated(saga, id, &forward, &undone, problems),
        SagaStatus::Failed => {}
        SagaStatus::Running | SagaStatus::Compensating => {
            problems.push(format!("saga {id} did not finish ({})", saga.state.status));
        }
        _ => problems.push(format!(
            "saga {id} has an unexpected status {}",
            saga.state.status
        )),
    }
}

/// A completed saga: nothing undone, and every effect backed by a succeeded journal entry.
fn check_completed(
    saga: &SagaReport,
    id: &str,
    forward: &[&Entry],
    undone: &[&Entry],
    problems: &mut Vec<String>,
) {
    if !undone.is_empty() {
        problems.push(format!(
            "saga {id} completed but {} compensation(s) ran",
            undone.len()
        ));
    }
    for entry in forward {
        let ok = saga
            .state
            .record(entry.position)
            .is_some_and(|r| r.status == StepStatus::Succeeded);
        if !ok {
            problems.push(format!(
                "saga {id}: effect of #{} has no succeeded journal entry",
                entry.position
            ));
        }
    }
}

/// A compensated saga: its effects undone once each, newest first.
fn check_compensated(
    saga: &SagaReport,
    id: &str,
    forward: &[&Entry],
    undone: &[&Entry],
    problems: &mut Vec<String>,
) {
    // Every forward effect of a step that has a compensation must be undone once,
    // newest first. Steps without compensation (notifications, reads) stay.
    let skipped = |p: u32| {
        saga.events.iter().any(|ev| {
            matches!(&ev.kind, EventKind::CompensationSkipped { position, .. } if *position == p)
        })
    };
    let compensable: Vec<u32> = forward
        .iter()
        .map(|e| e.position)
        .filter(|p| !skipped(*p))
        .collect();
    let undone_positions: Vec<u32> = undone.iter().map(|e| e.position).collect();
    let mut expected = compensable.clone();
    expected.reverse();
    if undone_positions != expected {
        problems.push(format!(
            "saga {id} compensated: effects at {compensable:?} but compensations ran at {undone_positions:?} (expected {expected:?})"
        ));
    }
}

/// The books against the completed deal sagas: one CRM deal each, and their amounts in the
/// portfolio.
fn check_books(sagas: &[SagaReport], office: &OfficeState, problems: &mut Vec<String>) {
    let mut completed_deals = 0;
    let mut booked_musd = 0.0;
    for saga in sagas {
        if saga.state.status == SagaStatus::Completed && saga.state.saga_type == "deal_flow" {
            completed_deals += 1;
            booked_musd += saga.state.input["amount_musd"].as_f64().unwrap_or_default();
        }
    }
    let crm = &office.books.crm_deals;
    if crm.len() != completed_deals {
        problems.push(format!(
            "CRM holds {} deals but {completed_deals} deal sagas completed",
            crm.len()
        ));
    }
    let total: f64 = office.books.portfolio.values().sum();
    if (total - booked_musd).abs() > 1e-6 {
        problems.push(format!(
            "portfolio holds {total}M but completed deals booked {booked_musd}M"
        ));
    }
}

/// Whether a saga is worth showing in full.
#[must_use]
pub fn interesting(saga: &SagaReport) -> bool {
    saga.state.status != SagaStatus::Completed
        || saga.events.iter().any(|e| {
            matches!(
                e.kind,
                EventKind::StepAttemptFailed { .. } | EventKind::SagaResumed { .. }
            )
        })
}

/// Renders the timelines chosen by `mode`.
#[must_use]
pub fn render_timelines(sagas: &[SagaReport], mode: Timelines) -> String {
    let mut out = String::new();
    let chosen: Vec<&SagaReport> = match mode {
        Timelines::None => Vec::new(),
        Timelines::All => sagas.iter().collect(),
        Timelines::Interesting if sagas.len() <= 12 => sagas.iter().collect(),
        Timelines::Interesting => sagas.iter().filter(|s| interesting(s)).take(8).collect(),
    };
    for saga in &chosen {
        let _ = writeln!(
            out,
            "\n── {} {} — {} ──",
            saga.state.saga_type,
            saga.state.id,
            saga.state.status.as_str().to_uppercase()
        );
        out.push_str(&timeline::render(&saga.events));
    }
    if chosen.len() < sagas.len() && mode != Timelines::None {
        let _ = writeln!(
            out,
            "\n({} more saga timelines not shown; use --timelines all)",
            sagas.len() - chosen.len()
        );
    }
    out
}
