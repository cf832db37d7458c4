//! The lifecycle of a saga.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a saga is in its life. `Running` → `Completed`, or `Running` → `Compensating` →
/// `Compensated` | `Failed`. The last three and `Completed` are terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SagaStatus {
    /// Executing forward steps.
    Running,
    /// Undoing completed steps in reverse order.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed (or the saga was cancelled) and every completed step was undone.
    Compensated,
    /// Stuck: a compensation exhausted its policy, or the workflow code diverged from its
    /// journal. Needs an operator.
    Failed,
}

impl SagaStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [SagaStatus; 5] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Failed,
    ];

    /// `true` for the statuses a saga never leaves on its own.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        match self {
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Failed => true,
            SagaStatus::Running | SagaStatus::Compensating => false,
        }
    }

    /// The lowercase name used in storage keys, metrics and the CLI.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Failed => "failed",
        }
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of [`SagaStatus::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown saga status `{0}`; expected one of running, compensating, completed, compensated, failed"
)]
pub struct UnknownStatus(pub String);

impl FromStr for SagaStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SagaStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}
