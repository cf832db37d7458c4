//! Identifiers and deterministic keys.
//!
//! Keys that must be identical across retries, resumes and processes are UUID v5 values
//! derived from their parts (content addressing), so no coordination is needed to agree on
//! them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The namespace under which saga ids, step keys and request fingerprints are derived.
const SAGA_NAMESPACE: Uuid = Uuid::from_u128(0x6d1c_5a0e_2b7f_4c1e_9a43_52c8_0f6b_d7e1);

/// A saga instance's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SagaId(pub Uuid);

impl SagaId {
    /// A fresh random id, for sagas started without an idempotency key.
    #[must_use]
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }

    /// The id of the saga of type `saga_type` started with `idempotency_key`. Deriving the id
    /// from the key is what lets a store create the saga and claim the key in one atomic step.
    #[must_use]
    pub fn from_idempotency_key(saga_type: &str, idempotency_key: &str) -> Self {
        Self(content_uuid(&["start", saga_type, idempotency_key]))
    }
}

impl fmt::Display for SagaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for SagaId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Whether a key is for a step's forward action or for its compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step's action.
    Forward,
    /// The step's compensating action.
    Compensate,
}

impl Phase {
    /// `"forward"` or `"compensate"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Compensate => "compensate",
        }
    }
}

/// The idempotency key of one step's forward action or compensation in one saga: the same on
/// every attempt, every resume and every process, and different for forward and compensate.
#[must_use]
pub fn step_idempotency_key(saga: SagaId, position: u32, step: &str, phase: Phase) -> String {
    let namespace = saga.0;
    let name = format!("{position}/{step}/{}", phase.as_str());
    Uuid::new_v5(&namespace, name.as_bytes()).to_string()
}

/// A content-addressed key built from `parts`: the same parts always give the same key, and
/// a different sequence of parts (including a different split of the same text) gives a
/// different one.
///
/// ```
/// use saga_core::content_key;
///
/// let a = content_key(&["deal", "company-123", "2025-01-15"]);
/// assert_eq!(a, content_key(&["deal", "company-123", "2025-01-15"]));
/// assert_ne!(a, content_key(&["deal", "company-1232025-01-15"]));
/// ```
#[must_use]
pub fn content_key(parts: &[&str]) -> String {
    content_uuid(parts).to_string()
}

pub(crate) fn content_uuid(parts: &[&str]) -> Uuid {
    // Length-prefixing each part keeps ["ab", "c"] and ["a", "bc"] apart.
    let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for part in parts {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part.as_bytes());
    }
    Uuid::new_v5(&SAGA_NAMESPACE, &bytes)
}

/// A fingerprint of a request's content, for telling "the same request again" from "the same
/// key with different content". Computed over canonical JSON (object keys sorted).
#[must_use]
pub fn fingerprint(kind: &str, value: &serde_json::Value) -> String {
    // serde_json's map is ordered by key unless `preserve_order` is enabled, which this
    // workspace does not enable; `Value`'s Display is therefore canonical.
    content_key(&[kind, &value.to_string()])
}
