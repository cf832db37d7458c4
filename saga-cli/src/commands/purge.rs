//! `saga purge --older-than D`: deletes old terminal sagas.

use std::time::Duration;

use saga_core::SagaStore;
use serde::Serialize;

use crate::error::CliError;
use crate::output::Report;

/// How many sagas a purge deleted.
#[derive(Debug, Serialize)]
pub(crate) struct PurgeReport {
    deleted: u64,
    /// The age threshold, as given (`7d`, ...).
    older_than: String,
    /// The threshold in seconds.
    older_than_seconds: u64,
    limit: u64,
}

impl Report for PurgeReport {
    fn text(&self) -> String {
        let more = if self.deleted >= self.limit {
            "; the limit was reached, run it again to delete more"
        } else {
            ""
        };
        format!(
            "purged {} terminal saga(s) last written at least {} ago{more}\n",
            self.deleted, self.older_than
        )
    }
}

/// Deletes up to `limit` terminal sagas last written at least `older_than` ago.
pub(crate) async fn run(
    store: &dyn SagaStore,
    older_than: Duration,
    limit: u64,
) -> Result<PurgeReport, CliError> {
    let deleted = store
        .purge(older_than, usize::try_from(limit).unwrap_or(usize::MAX))
        .await?;
    Ok(PurgeReport {
        deleted,
        older_than: humantime::format_duration(older_than).to_string(),
        older_than_seconds: older_than.as_secs(),
        limit,
    })
}
