//! The idempotency guard: run a side effect at most once per key, remember its result until
//! the key expires.
//!
//! A step's attempts share one idempotency key; a step whose downstream system has no
//! idempotency support of its own wraps the call in the guard:
//!
//! ```
//! use std::time::Duration;
//! use saga_core::{IdempotencyGuard, MemoryStore};
//! use std::sync::Arc;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let guard = IdempotencyGuard::new(Arc::new(MemoryStore::new()));
//! let ttl = Duration::from_secs(3600);
//! let first: u32 = guard.once("charge-42", &100, ttl, || async { Ok::<_, std::io::Error>(7) }).await?;
//! // The same key again: the effect does not run; the recorded result comes back.
//! let again: u32 = guard.once("charge-42", &100, ttl, || async { Ok::<_, std::io::Error>(8) }).await?;
//! assert_eq!((first, again), (7, 7));
//! // The same key with a different request is a conflict, not a silent reuse.
//! let conflict = guard.once("charge-42", &999, ttl, || async { Ok::<u32, std::io::Error>(9) }).await;
//! assert!(matches!(conflict, Err(saga_core::GuardError::Conflict { .. })));
//! # Ok::<_, saga_core::GuardError<std::io::Error>>(())
//! # }).unwrap();
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::GuardClaim;
use crate::{Classify, ErrorClass, SagaStore, StoreError};

/// Default time a claim blocks duplicates if its holder dies mid-effect.
pub const DEFAULT_IN_PROGRESS_TTL: Duration = Duration::from_secs(60);

/// Runs effects at most once per key, on a saga store.
#[derive(Clone)]
pub struct IdempotencyGuard {
    store: Arc<dyn SagaStore>,
    in_progress_ttl: Duration,
    min_ttl: Option<Duration>,
}

impl std::fmt::Debug for IdempotencyGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyGuard")
            .field("in_progress_ttl", &self.in_progress_ttl)
            .field("min_ttl", &self.min_ttl)
            .finish()
    }
}

/// Why a guarded effect did not produce a result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuardError<E> {
    /// Another caller holds the key and is running the effect now. Transient: retry later.
    #[error("idempotency key `{key}` is in progress elsewhere; retry once it completes")]
    InProgress {
        /// The key.
        key: String,
        /// The longest the claim can still block (its in-progress TTL): retrying sooner
        /// would only find it in progress again.
        retry_after: Duration,
    },
    /// The key was used for a different request. Permanent.
    #[error("idempotency key `{key}` was already used with a different request; use a new key")]
    Conflict {
        /// The key.
        key: String,
    },
    /// The record TTL asked for is shorter than the time the key may still be used: a
    /// late attempt could then find no record and apply the effect again. Permanent, and
    /// raised before anything is claimed or run: configure a longer TTL.
    #[error(
        "idempotency key `{key}`: a record TTL of {ttl:?} is shorter than the {needed:?} this step may still run under its key (its retry schedule, timeouts and lease lapses); give the guard a TTL of at least {needed:?}"
    )]
    TtlTooShort {
        /// The key.
        key: String,
        /// The TTL asked for.
        ttl: Duration,
        /// The shortest TTL that covers the key's life.
        needed: Duration,
    },
    /// The effect itself failed; the key was released so a retry can run it again.
    #[error(transparent)]
    Effect(E),
    /// The store failed.
    #[error("idempotency store: {0}")]
    Store(#[source] StoreError),
    /// The request fingerprint or the result could not be encoded or decoded.
    #[error("idempotency key `{key}`: cannot encode or decode the recorded value: {source}")]
    Encoding {
        /// The key.
        key: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl<E: Classify> Classify for GuardError<E> {
    fn classify(&self) -> ErrorClass {
        match self {
            GuardError::InProgress { retry_after, .. } => ErrorClass::retry_after(*retry_after),
            GuardError::Conflict { .. }
            | GuardError::Encoding { .. }
            | GuardError::TtlTooShort { .. } => ErrorClass::Permanent,
            GuardError::Effect(inner) => inner.classify(),
            GuardError::Store(err) if err.is_transient() => ErrorClass::TRANSIENT,
            GuardError::Store(_) => ErrorClass::Permanent,
        }
    }
}

impl IdempotencyGuard {
    /// A guard on `store` with the default in-progress TTL.
    #[must_use]
    pub fn new(store: Arc<dyn SagaStore>) -> Self {
        Self {
            store,
            in_progress_ttl: DEFAULT_IN_PROGRESS_TTL,
            min_ttl: None,
        }
    }

    /// Refuses record TTLs shorter than `ttl` ([`GuardError::TtlTooShort`]). The guard of a
    /// step ([`StepContext::guard`](crate::StepContext::guard)) sets it to the step's
    /// [`key_lifetime`](crate::StepContext::key_lifetime). That lifetime counts the step's own
    /// schedule, not retry-after hints: a step whose attempts meet
    /// [`GuardError::InProgress`] waits up to the in-progress TTL between them, so give such a
    /// step's records extra life (the in-progress TTL once per attempt).
    #[must_use]
    pub fn with_min_ttl(mut self, ttl: Duration) -> Self {
        self.min_ttl = Some(ttl);
        self
    }

    /// The shortest record TTL this guard accepts, if any.
    #[must_use]
    pub fn min_ttl(&self) -> Option<Duration> {
        self.min_ttl
    }

    /// How long a claim blocks duplicates if its holder dies before completing.
    #[must_use]
    pub fn with_in_progress_ttl(mut self, ttl: Duration) -> Self {
        self.in_progress_ttl = ttl;
        self
    }

    /// Runs `effect` unless `key` already has a result, and records its result for `ttl`.
    ///
    /// - key unused (or expired): runs the effect; records the result on success, releases
    ///   the key on failure;
    /// - key completed with the same `fingerprint`: returns the recorded result, no run;
    /// - key in progress elsewhere: [`GuardError::InProgress`] (transient, to be retried
    ///   after the in-progress TTL at the latest);
    /// - key used with another fingerprint: [`GuardError::Conflict`] (permanent);
    /// - `ttl` below the guard's [`min_ttl`](Self::min_ttl): [`GuardError::TtlTooShort`]
    ///   (permanent), before anything is claimed or run.
    ///
    /// # Errors
    /// As above, plus [`GuardError::Effect`] and store or encoding failures.
    pub async fn once<T, E, F, Fut>(
        &self,
        key: &str,
        fingerprint: &impl Serialize,
        ttl: Duration,
        effect: F,
    ) -> Result<T, GuardError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let encoding = |source| GuardError::Encoding {
            key: key.to_owned(),
            source,
        };
        if let Some(needed) = self.min_ttl
            && ttl < needed
        {
            return Err(GuardError::TtlTooShort {
                key: key.to_owned(),
                ttl,
                needed,
            });
        }
        let print = serde_json::to_value(fingerprint).map_err(encoding)?;
        let print = crate::fingerprint("guard", &print);
        let claim = self
            .store
            .guard_claim(key, &print, self.in_progress_ttl)
            .await
            .map_err(GuardError::Store)?;
        let token = match claim {
            GuardClaim::Claimed { token } => token,
            GuardClaim::Completed { result } => {
                crate::telemetry::idempotency_hit();
                tracing::debug!(
                    idempotency_key = key,
                    "idempotency hit: returning recorded result"
                );
                return serde_json::from_str(&result).map_err(encoding);
            }
            GuardClaim::InProgress => {
                crate::telemetry::idempotency_hit();
                return Err(GuardError::InProgress {
                    key: key.to_owned(),
                    retry_after: self.in_progress_ttl,
                });
            }
            GuardClaim::Conflict => {
                return Err(GuardError::Conflict {
                    key: key.to_owned(),
                });
            }
        };
        match effect().await {
            Ok(value) => {
                // The effect happened: from here on, failing to record it must not become a
                // step failure (the saga would then skip undoing an applied effect). A lost
                // record only means a later duplicate runs the effect again once the claim
                // lapses, the same as a crash right after the effect.
                match serde_json::to_string(&value) {
                    Ok(result) => {
                        if let Err(err) = self.store.guard_complete(key, &token, &result, ttl).await
                        {
                            tracing::warn!(idempotency_key = key, error = %err, "effect applied but its result could not be recorded");
                        }
                    }
                    Err(err) => {
                        tracing::warn!(idempotency_key = key, error = %err, "effect applied but its result does not encode; not recorded");
                    }
                }
                Ok(value)
            }
            Err(err) => {
                // Best effort: if the release is lost, the claim still lapses after the
                // in-progress TTL and a retry sees `InProgress` until then.
                if let Err(release) = self.store.guard_release(key, &token).await {
                    tracing::warn!(idempotency_key = key, error = %release, "could not release idempotency claim");
                }
                Err(GuardError::Effect(err))
            }
        }
    }
}
