//! Error classification: which failures are worth retrying.
//!
//! Only transient failures (timeouts, rate limits, unavailable services, dropped connections,
//! deadlocks) are retried; permanent ones (invalid input, auth, not found, business rules)
//! fail the step at once. A step's error type states its class by implementing [`Classify`],
//! usually through `#[derive(Classify)]`:
//!
//! ```
//! use saga_core::{Classify, ErrorClass, HttpStatus};
//!
//! #[derive(Debug, thiserror::Error, Classify)]
//! enum CrmError {
//!     #[error("crm rejected the deal: {0}")]
//!     #[classify(permanent)]
//!     Rejected(String),
//!     #[error("crm answered {0}")]
//!     #[classify(delegate)]
//!     Http(HttpStatus),
//!     #[error("crm is busy")]
//!     #[classify(transient)]
//!     Busy,
//! }
//!
//! assert!(CrmError::Busy.classify().is_transient());
//! assert!(CrmError::Http(HttpStatus::new(429)).classify().is_transient());
//! assert!(!CrmError::Rejected("no".into()).classify().is_transient());
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether a failure may succeed if tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "class")]
#[non_exhaustive]
pub enum ErrorClass {
    /// Worth retrying; `retry_after` (from a `Retry-After` header, say) overrides the backoff.
    Transient {
        /// The earliest the caller was told to try again, if it was told.
        #[serde(default, with = "crate::serde_duration::option")]
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help: fail the step now.
    Permanent,
}

impl ErrorClass {
    /// Transient with no retry-after hint.
    pub const TRANSIENT: ErrorClass = ErrorClass::Transient { retry_after: None };

    /// Transient, to be retried no earlier than `after`.
    #[must_use]
    pub fn retry_after(after: Duration) -> Self {
        ErrorClass::Transient {
            retry_after: Some(after),
        }
    }

    /// `true` for [`ErrorClass::Transient`].
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            ErrorClass::Transient { .. } => true,
            ErrorClass::Permanent => false,
        }
    }

    /// The retry-after hint, if any.
    #[must_use]
    pub fn retry_after_hint(&self) -> Option<Duration> {
        match self {
            ErrorClass::Transient { retry_after } => *retry_after,
            ErrorClass::Permanent => None,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorClass::Transient { retry_after: None } => f.write_str("transient"),
            ErrorClass::Transient {
                retry_after: Some(after),
            } => {
                write!(
                    f,
                    "transient (retry after {})",
                    humantime::format_duration(*after)
                )
            }
            ErrorClass::Permanent => f.write_str("permanent"),
        }
    }
}

/// Tells the engine whether an error is transient or permanent.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not say whether it is transient or permanent",
    label = "needs `saga_core::Classify`",
    note = "derive it with `#[derive(saga_core::Classify)]` and mark each variant `#[classify(transient)]`, `#[classify(permanent)]` or `#[classify(delegate)]`, or implement `Classify` by hand"
)]
pub trait Classify {
    /// The class of this error.
    fn classify(&self) -> ErrorClass;
}

impl<T: Classify + ?Sized> Classify for Box<T> {
    fn classify(&self) -> ErrorClass {
        (**self).classify()
    }
}

impl<T: Classify + ?Sized> Classify for &T {
    fn classify(&self) -> ErrorClass {
        (**self).classify()
    }
}

/// An HTTP status code as an error, classified the way well-behaved clients retry:
/// 408, 425, 429 and every 5xx are transient; every other 4xx is permanent.
///
/// ```
/// use std::time::Duration;
/// use saga_core::{Classify, HttpStatus};
///
/// assert!(HttpStatus::new(503).classify().is_transient());
/// assert!(!HttpStatus::new(404).classify().is_transient());
/// let limited = HttpStatus::new(429).with_retry_after(Duration::from_secs(2));
/// assert_eq!(limited.classify().retry_after_hint(), Some(Duration::from_secs(2)));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpStatus {
    /// The status code.
    pub code: u16,
    /// The server's `Retry-After`, if it sent one.
    #[serde(default, with = "crate::serde_duration::option")]
    pub retry_after: Option<Duration>,
}

impl HttpStatus {
    /// A status code with no retry-after.
    #[must_use]
    pub fn new(code: u16) -> Self {
        Self {
            code,
            retry_after: None,
        }
    }

    /// The same status with the server's `Retry-After`.
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl fmt::Display for HttpStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http status {}", self.code)?;
        if let Some(after) = self.retry_after {
            write!(f, " (retry after {})", humantime::format_duration(after))?;
        }
        Ok(())
    }
}

impl std::error::Error for HttpStatus {}

impl Classify for HttpStatus {
    fn classify(&self) -> ErrorClass {
        match self.code {
            408 | 425 | 429 | 500..=599 => ErrorClass::Transient {
                retry_after: self.retry_after,
            },
            // Informational, success and redirect codes are not errors a client can fix by
            // waiting; treating them as permanent surfaces the caller's mistake at once.
            0..=407 | 409..=424 | 426..=428 | 430..=499 | 600..=u16::MAX => ErrorClass::Permanent,
        }
    }
}

impl Classify for std::io::Error {
    fn classify(&self) -> ErrorClass {
        use std::io::ErrorKind as K;
        match self.kind() {
            K::TimedOut
            | K::Interrupted
            | K::WouldBlock
            | K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::BrokenPipe
            | K::AddrInUse
            | K::AddrNotAvailable
            | K::NetworkDown
            | K::NetworkUnreachable
            | K::HostUnreachable
            | K::ResourceBusy
            | K::UnexpectedEof
            | K::OutOfMemory
            | K::StorageFull
            | K::QuotaExceeded
            | K::Deadlock => ErrorClass::TRANSIENT,
            K::NotFound
            | K::PermissionDenied
            | K::AlreadyExists
            | K::InvalidInput
            | K::InvalidData
            | K::WriteZero
            | K::Unsupported
            | K::IsADirectory
            | K::NotADirectory
            | K::DirectoryNotEmpty
            | K::ReadOnlyFilesystem
            | K::StaleNetworkFileHandle
            | K::NotSeekable
            | K::FileTooLarge
            | K::ExecutableFileBusy
            | K::CrossesDevices
            | K::TooManyLinks
            | K::InvalidFilename
            | K::ArgumentListTooLong
            | K::Other => ErrorClass::Permanent,
            // `ErrorKind` is non-exhaustive: a kind added by a future std is unknown to us,
            // and retrying an unknown failure a bounded number of times is the safer default.
            _ => ErrorClass::TRANSIENT,
        }
    }
}

/// A step attempt that ran past its timeout. Always transient: the attempt is cancelled and
/// retried under the step's policy with the same idempotency key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("step attempt timed out after {}", humantime::format_duration(*.0))]
pub struct StepTimeout(pub Duration);

impl Classify for StepTimeout {
    fn classify(&self) -> ErrorClass {
        ErrorClass::TRANSIENT
    }
}

impl Classify for std::convert::Infallible {
    fn classify(&self) -> ErrorClass {
        match *self {}
    }
}
