//! `saga stats`: counts by status, the active sagas per type and workflow version, and what
//! the most recently failed sagas failed of.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use saga_core::store::{ListQuery, SagaSummary, VersionCount};
use saga_core::{FailureKind, SagaState, SagaStatus, SagaStore};
use serde::Serialize;
use serde_json::Value;

use crate::error::CliError;
use crate::output::{Report, Table, or_dash};

/// At most this many failed sagas are listed to find the most recent ones.
const SCAN_CAP: usize = 10_000;

/// Counts and recent failure reasons.
#[derive(Debug, Serialize)]
pub(crate) struct StatsReport {
    /// Sagas per status, every status present.
    counts: BTreeMap<String, u64>,
    total: u64,
    /// Sagas set aside for bad data (also counted under their status, usually `running`):
    /// they will not run again until an operator retries or abandons them.
    quarantined: u64,
    /// Running and compensating sagas per type and workflow version (sorted by type, then
    /// version; `version` is absent for sagas stored before versions were kept): which
    /// versions' code must still be deployed.
    active_by_version: Vec<VersionCount>,
    recent_failures: RecentFailures,
}

#[derive(Debug, Serialize)]
struct RecentFailures {
    /// How many failed sagas were read.
    scanned: usize,
    /// Failure reasons, most frequent first.
    reasons: Vec<ReasonCount>,
    /// Why those sagas compensated (what failed before the compensation did), most frequent
    /// first.
    compensation_reasons: Vec<ReasonCount>,
}

#[derive(Debug, Serialize)]
struct ReasonCount {
    /// The failure kind (`compensation_failed`, `abandoned`, ...); absent for compensation
    /// reasons.
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    reason: String,
    count: u64,
    /// Up to five of the sagas, newest first.
    sagas: Vec<String>,
}

/// The snake_case name of a failure kind.
pub(crate) fn kind_name(kind: FailureKind) -> String {
    match serde_json::to_value(kind) {
        Ok(Value::String(name)) => name,
        _ => format!("{kind:?}"),
    }
}

/// Counts sagas and reads up to `failures` of the most recently failed ones.
pub(crate) async fn run(store: &dyn SagaStore, failures: usize) -> Result<StatsReport, CliError> {
    let counts = store.count_by_status().await?;
    let total = counts.values().sum();
    let quarantined = store.count_quarantined().await?;
    let active_by_version = store.count_active_by_version().await?;
    let recent = most_recent_failed(store, failures).await?;
    let mut reasons: Vec<ReasonCount> = Vec::new();
    let mut compensation: Vec<ReasonCount> = Vec::new();
    let mut scanned = 0;
    for summary in &recent {
        let Some(stored) = store.load(summary.id).await? else {
            continue; // purged meanwhile
        };
        scanned += 1;
        let id = summary.id.to_string();
        let Ok(state) = serde_json::from_str::<SagaState>(&stored.state) else {
            let reason = stored
                .quarantined
                .clone()
                .unwrap_or_else(|| "stored state does not decode".to_owned());
            tally(&mut reasons, Some("bad_data".into()), reason, &id);
            continue;
        };
        match &state.failure {
            Some((kind, message)) => {
                tally(&mut reasons, Some(kind_name(*kind)), message.clone(), &id);
            }
            None => tally(&mut reasons, None, "no failure recorded".into(), &id),
        }
        if let Some(reason) = &state.compensation_reason {
            tally(&mut compensation, None, reason.to_string(), &id);
        }
    }
    reasons.sort_by_key(|entry| std::cmp::Reverse(entry.count));
    compensation.sort_by_key(|entry| std::cmp::Reverse(entry.count));
    Ok(StatsReport {
        counts: counts
            .into_iter()
            .map(|(status, n)| (status.to_string(), n))
            .collect(),
        total,
        quarantined,
        active_by_version,
        recent_failures: RecentFailures {
            scanned,
            reasons,
            compensation_reasons: compensation,
        },
    })
}

/// The `n` failed sagas written last (the store lists by id, so this pages through them).
async fn most_recent_failed(store: &dyn SagaStore, n: usize) -> Result<Vec<SagaSummary>, CliError> {
    let mut all: Vec<SagaSummary> = Vec::new();
    let mut after = None;
    if n == 0 {
        return Ok(all);
    }
    loop {
        let page = store
            .list(&ListQuery {
                status: Some(SagaStatus::Failed),
                saga_type: None,
                limit: 1000,
                after,
            })
            .await?;
        all.extend(page.sagas);
        match page.next {
            Some(next) if all.len() < SCAN_CAP => after = Some(next),
            _ => break,
        }
    }
    all.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(a.id.cmp(&b.id)));
    all.truncate(n);
    Ok(all)
}

fn tally(into: &mut Vec<ReasonCount>, kind: Option<String>, reason: String, id: &str) {
    match into
        .iter_mut()
        .find(|entry| entry.kind == kind && entry.reason == reason)
    {
        Some(entry) => {
            entry.count += 1;
            if entry.sagas.len() < 5 {
                entry.sagas.push(id.to_owned());
            }
        }
        None => into.push(ReasonCount {
            kind,
            reason,
            count: 1,
            sagas: vec![id.to_owned()],
        }),
    }
}

impl Report for StatsReport {
    fn text(&self) -> String {
        let mut counts = Table::new(&["STATUS", "COUNT"]);
        // Lifecycle order rather than alphabetical.
        for status in SagaStatus::ALL {
            let n = self.counts.get(status.as_str()).copied().unwrap_or(0);
            counts.row(vec![status.to_string(), n.to_string()]);
        }
        counts.row(vec!["total".into(), self.total.to_string()]);
        let mut out = counts.render(0);
        if self.quarantined > 0 {
            let _ = writeln!(
                out,
                "\nquarantined: {} (counted above under their status; they will not run until `saga retry` or `saga abandon`; `saga list` shows why)",
                self.quarantined
            );
        }
        out.push_str(&active_text(&self.active_by_version));
        let recent = &self.recent_failures;
        let _ = writeln!(
            out,
            "\nrecent failures ({} most recently failed saga(s) read)",
            recent.scanned
        );
        if recent.reasons.is_empty() {
            let _ = writeln!(out, "  none");
        } else {
            let mut table = Table::new(&["COUNT", "KIND", "REASON"]);
            for entry in &recent.reasons {
                table.row(vec![
                    entry.count.to_string(),
                    entry.kind.clone().unwrap_or_else(|| "-".into()),
                    entry.reason.clone(),
                ]);
            }
            out.push_str(&table.render(2));
        }
        if !recent.compensation_reasons.is_empty() {
            let _ = writeln!(out, "\nwhy they were compensating");
            let mut table = Table::new(&["COUNT", "REASON"]);
            for entry in &recent.compensation_reasons {
                table.row(vec![entry.count.to_string(), entry.reason.clone()]);
            }
            out.push_str(&table.render(2));
        }
        out
    }
}

/// The active sagas per type and version, as a table under a heading.
fn active_text(rows: &[VersionCount]) -> String {
    let mut out = String::from("\nactive sagas by type and version\n");
    if rows.is_empty() {
        out.push_str("  none\n");
        return out;
    }
    let mut table = Table::new(&["TYPE", "VERSION", "RUNNING", "COMPENSATING"]);
    for row in rows {
        table.row(vec![
            row.saga_type.clone(),
            or_dash(row.version),
            row.running.to_string(),
            row.compensating.to_string(),
        ]);
    }
    out.push_str(&table.render(2));
    out
}
