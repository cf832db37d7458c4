//! The one error type of the CLI: a message for one line of stderr.

use std::fmt;

use saga_core::{EngineError, SagaId, StoreError};

/// The exit status of a command that failed.
pub(crate) const EXIT_FAILURE: u8 = 1;
/// The exit status of an action the saga's state refuses (a cancel past the pivot, a signal
/// to a saga that has ended): nothing was changed, and trying again will not help.
pub(crate) const EXIT_REFUSED: u8 = 3;

/// A failed command. Its message is a single line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CliError {
    message: String,
    exit: u8,
}

impl CliError {
    /// An error with this message (newlines are folded into spaces).
    pub(crate) fn new(message: impl Into<String>) -> Self {
        let message: String = message.into();
        let one_line = message
            .split(['\n', '\r'])
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            message: one_line,
            exit: EXIT_FAILURE,
        }
    }

    /// An action the saga's state refuses; exits with [`EXIT_REFUSED`].
    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self {
            exit: EXIT_REFUSED,
            ..Self::new(message)
        }
    }

    /// The process exit status for this error.
    pub(crate) fn exit_code(&self) -> u8 {
        self.exit
    }

    /// The unknown-id error.
    pub(crate) fn not_found(id: SagaId) -> Self {
        Self::new(format!("saga {id} not found"))
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<EngineError> for CliError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::NotFound(id) | EngineError::Store(StoreError::NotFound(id)) => {
                Self::not_found(id)
            }
            refused @ EngineError::PastPivot { .. } => Self::refused(refused.to_string()),
            other => Self::new(other.to_string()),
        }
    }
}

impl From<StoreError> for CliError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(id) => Self::not_found(id),
            other => Self::new(other.to_string()),
        }
    }
}

/// Parses a saga id given on the command line.
pub(crate) fn parse_id(text: &str) -> Result<SagaId, CliError> {
    text.trim().parse().map_err(|err| {
        CliError::new(format!(
            "invalid saga id `{text}`: {err}; a saga id is a UUID such as 67e55044-10b1-426f-9247-bb680e5fe0c8"
        ))
    })
}
