//! `saga list`: sagas ordered by id, filtered by status and type, paged.

use std::fmt::Write as _;

use saga_core::SagaStore;
use saga_core::store::{ListQuery, SagaSummary};
use serde::Serialize;

use crate::cli::ListArgs;
use crate::error::{CliError, parse_id};
use crate::output::{Report, Table, or_dash};

/// One page of sagas.
#[derive(Debug, Serialize)]
pub(crate) struct ListReport {
    /// The rows, ordered by id.
    sagas: Vec<Row>,
    /// Pass as `--after` for the next page; `null` at the end.
    next: Option<String>,
}

/// One saga in a listing.
#[derive(Debug, Serialize)]
struct Row {
    id: String,
    saga_type: String,
    status: String,
    /// Last write, RFC 3339.
    updated_at: String,
    /// Quarantine reason, when set aside.
    quarantined: Option<String>,
}

impl From<SagaSummary> for Row {
    fn from(summary: SagaSummary) -> Self {
        Self {
            id: summary.id.to_string(),
            saga_type: summary.saga_type,
            status: summary.status.to_string(),
            updated_at: summary.updated_at.to_rfc3339(),
            quarantined: summary.quarantined,
        }
    }
}

/// Reads up to `--limit` rows, following the store's pages (a store page may be short).
pub(crate) async fn run(store: &dyn SagaStore, args: &ListArgs) -> Result<ListReport, CliError> {
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    let mut after = args.after.as_deref().map(parse_id).transpose()?;
    let mut rows: Vec<SagaSummary> = Vec::new();
    let next = loop {
        let query = ListQuery {
            status: args.status,
            saga_type: args.saga_type.clone(),
            limit: limit - rows.len(),
            after,
        };
        let page = store.list(&query).await?;
        rows.extend(page.sagas);
        if rows.len() >= limit {
            // Rows are ordered by id, so the last one shown is where the next page starts.
            let more = rows.len() > limit || page.next.is_some();
            rows.truncate(limit);
            break if more {
                rows.last().map(|row| row.id)
            } else {
                None
            };
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break None,
        }
    };
    Ok(ListReport {
        sagas: rows.into_iter().map(Row::from).collect(),
        next: next.map(|id| id.to_string()),
    })
}

impl Report for ListReport {
    fn text(&self) -> String {
        if self.sagas.is_empty() {
            return "no sagas match\n".to_owned();
        }
        let mut table = Table::new(&["ID", "TYPE", "STATUS", "UPDATED", "QUARANTINED"]);
        for row in &self.sagas {
            table.row(vec![
                row.id.clone(),
                row.saga_type.clone(),
                row.status.clone(),
                row.updated_at.clone(),
                or_dash(row.quarantined.as_deref()),
            ]);
        }
        let mut out = table.render(0);
        match &self.next {
            Some(next) => {
                let _ = writeln!(
                    out,
                    "{} saga(s) shown; next page: saga list --after {next}",
                    self.sagas.len()
                );
            }
            None => {
                let _ = writeln!(out, "{} saga(s)", self.sagas.len());
            }
        }
        out
    }
}
