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
    /// Resumes from the journal after a run was cut off (a crash, a lost lease) or woke from
    /// a retry timer; a saga waking from a signal, child or sleep wait is counted in
    /// [`Primitives::wake_ups`] instead.
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
    /// Child sagas of compensated parents, found compensated too.
    pub children_undone: usize,
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

/// What the workflows did with the engine's primitives, read from their journals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Primitives {
    /// Parallel blocks run.
    pub parallel_blocks: u64,
    /// Branches in them.
    pub branches: u64,
    /// Child sagas started.
    pub children: u64,
    /// Committee signals taken that approved.
    pub approved: u64,
    /// Committee signals taken that rejected.
    pub rejected: u64,
    /// Signal waits that timed out.
    pub timed_out: u64,
    /// Durable sleeps.
    pub sleeps: u64,
    /// Resumes that followed a wait (a signal, a child, a timer) rather than a crash (not
    /// counted in [`Totals::resumes`]).
    pub wake_ups: u64,
}

impl Primitives {
    /// `parallel blocks N (branches N) | child sagas N | signals: approved N, rejected N,
    /// timed out N | durable sleeps N`.
    #[must_use]
    pub fn line(&self) -> String {
        format!(
            "parallel blocks {} (branches {}) | child sagas {} | signals: approved {}, rejected {}, timed out {} | durable sleeps {} | wake-ups after a wait {}",
            self.parallel_blocks,
            self.branches,
            self.children,
            self.approved,
            self.rejected,
            self.timed_out,
            self.sleeps,
            self.wake_ups,
        )
    }
}

/// Counts the parallel blocks, children, signal waits and sleeps in every saga's journal.
#[must_use]
pub fn primitives(sagas: &[SagaReport]) -> Primitives {
    let mut counts = Primitives::default();
    for saga in sagas {
        // The event before the new lease says why the run had ended: a crash leaves a step
        // started (or anything), a wait leaves its wake-up or its deadline.
        let mut last = None;
        for event in &saga.events {
            match &event.kind {
                EventKind::LeaseAcquired { .. } => {}
                EventKind::SagaResumed { .. } => {
                    if matches!(
                        last,
                        Some(&EventKind::SignalReceived { .. } | &EventKind::ValueRecorded { .. })
                    ) {
                        counts.wake_ups += 1;
                    }
                }
                kind => last = Some(kind),
            }
        }
    }
    for record in sagas.iter().flat_map(|s| &s.state.journal) {
        let output = record.output.as_ref();
        match (record.is_value, record.name.as_str()) {
            (true, "parallel") => {
                counts.parallel_blocks += 1;
                counts.branches += output
                    .and_then(|o| o.get("branches"))
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
            }
            (true, "sleep_until") => counts.sleeps += 1,
            (true, name) if name.starts_with("signal:") => {
                match output.and_then(|o| o.get("payload")) {
                    Some(payload) if payload["approved"].as_bool() == Some(true) => {
                        counts.approved += 1;
                    }
                    Some(_) => counts.rejected += 1,
                    None if output.is_some() => counts.timed_out += 1,
                    None => {}
                }
            }
            (false, "start_child") if record.status == StepStatus::Succeeded => {
                counts.children += 1;
            }
            _ => {}
        }
    }
    counts
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
    // A wait's wake-up is the flow working as designed, not a recovery.
    totals.resumes = totals.resumes.saturating_sub(primitives(sagas).wake_ups);
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
        ..LedgerCheck::default()
    };
    check.problems.extend(repeated_keys(entries));
    let mut by_saga: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for entry in entries {
        by_saga.entry(entry.saga.as_str()).or_default().push(entry);
    }
    for saga in sagas {
        let id = saga.state.id.to_string();
        let mine = by_saga.get(id.as_str()).cloned().unwrap_or_default();
        check_saga(saga, &id, &mine, &mut check.problems);
    }
    check.children_undone = check_children(sagas, &mut check.problems);
    check_books(sagas, office, &mut check.problems);
    check
}

/// A problem for every idempotency key under which more than one effect was applied.
fn repeated_keys(entries: &[Entry]) -> Vec<String> {
    let mut applied: BTreeMap<&str, usize> = BTreeMap::new();
    for entry in entries {
        *applied.entry(entry.key.as_str()).or_default() += 1;
    }
    applied
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(key, count)| format!("idempotency key {key} applied {count} times"))
        .collect()
}

/// Every child saga names an existing parent, and every child of a compensated parent was
/// compensated too (its own ledger entries are checked as any saga's). Returns how many
/// children were undone with their parents.
fn check_children(sagas: &[SagaReport], problems: &mut Vec<String>) -> usize {
    let by_id: BTreeMap<String, &SagaReport> =
        sagas.iter().map(|s| (s.state.id.to_string(), s)).collect();
    let mut undone = 0;
    for child in sagas {
        let Some(link) = &child.state.parent else {
            continue;
        };
        let Some(parent) = by_id.get(&link.id.to_string()) else {
            problems.push(format!(
                "child saga {} names parent {} which is not in the store",
                child.state.id, link.id
            ));
            continue;
        };
        if parent.state.status == SagaStatus::Compensated {
            if child.state.status == SagaStatus::Compensated {
                undone += 1;
            } else {
                problems.push(format!(
                    "saga {} compensated but its child {} is {}",
                    parent.state.id, child.state.id, child.state.status
                ));
            }
        }
    }
    undone
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
    // Every forward effect of a step that has a compensation must be undone once, in
    // reverse order of completion (which, for parallel branches, is not the order of their
    // positions). Steps without compensation (notifications, reads) stay.
    let skipped = |p: u32| {
        saga.events.iter().any(|ev| {
            matches!(&ev.kind, EventKind::CompensationSkipped { position, .. } if *position == p)
        })
    };
    let mut compensable: Vec<u32> = forward
        .iter()
        .map(|e| e.position)
        .filter(|p| !skipped(*p))
        .collect();
    let completed = |p: u32| saga.state.record(p).and_then(|r| r.completed);
    let undone_positions: Vec<u32> = undone.iter().map(|e| e.position).collect();
    let mut have = undone_positions.clone();
    have.sort_unstable();
    let mut want = compensable.clone();
    want.sort_unstable();
    // Steps that completed are undone newest completion first; a step whose effect landed
    // on an attempt it never heard back from (reconciled at compensation) has no place in
    // that order, only its one undo.
    let ordered: Vec<u32> = undone_positions
        .iter()
        .filter_map(|p| completed(*p))
        .collect();
    let in_reverse = ordered.windows(2).all(|w| w[0] > w[1]);
    if have != want || !in_reverse {
        compensable.sort_by_key(|p| completed(*p).unwrap_or(0));
        let mut expected = compensable.clone();
        expected.reverse();
        problems.push(format!(
            "saga {id} compensated: effects at {compensable:?} but compensations ran at {undone_positions:?} (expected {expected:?}, newest completion first)"
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
