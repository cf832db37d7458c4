//! Client calls that ride out store blips.
//!
//! A start, a wait, an operator command or a read that meets a transient store error (a
//! connection refused, reset or broken, a timeout, a server that restarts, loads or is
//! paused) tries again after a jittered exponential backoff, within a bound, and then gives
//! up with the last error. An error that a retry cannot fix (a conflict, a refused
//! permission, corrupt data, an unknown saga) fails at once.
//!
//! The schedule is a [`RetryPolicy`] (its delays come from the `backon` crate, and `backon`
//! runs the retry loop); the bound is the policy's `max_elapsed` and attempt count, and an
//! optional deadline of the caller (a wait's timeout, a command's whole run).
//!
//! Coordinators do not go through this: their writes are retried by
//! [`EngineConfig::store_retry`](crate::EngineConfig::store_retry), and a run that still
//! fails stops and is resumed from its journal.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::Retryable as _;
use tokio::time::Instant;

use super::EngineError;
use crate::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, GuardClaim, Lease,
    ListPage, ListQuery, NewSaga, SagaStore, StoredSaga, Transition, VersionCount,
};
use crate::{RetryPolicy, SagaId, SagaStatus, StoreError};

impl EngineError {
    /// `true` when retrying the same call may succeed: a
    /// [transient store error](StoreError::is_transient). Every other engine error (not
    /// found, conflict, wrong status, bad input, quarantined, timed out) is an answer.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, EngineError::Store(err) if err.is_transient())
    }
}

/// `now + after`, or `None` when that is too far to represent (no bound).
fn after_now(after: Duration) -> Option<Instant> {
    Instant::now().checked_add(after)
}

/// The pauses between attempts: a policy's jittered delays, ending when its attempts are
/// used up or the deadline has come. The last pause ends at the deadline, so one attempt is
/// made there. An iterator, as `backon` wants it.
pub(crate) struct Backoff {
    policy: RetryPolicy,
    failed: u32,
    rng: fastrand::Rng,
    deadline: Option<Instant>,
}

impl Backoff {
    /// Honours the policy's attempt count, its `max_elapsed` (counted from now) and
    /// `deadline`, whichever ends first.
    pub(crate) fn new(policy: &RetryPolicy, deadline: Option<Instant>) -> Self {
        let limit = policy.max_elapsed().and_then(after_now);
        let deadline = match (limit, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self::until(policy, deadline)
    }

    /// Honours the policy's attempt count and `deadline`, not its `max_elapsed`: for a
    /// caller whose own deadline is the bound (a wait).
    pub(crate) fn until(policy: &RetryPolicy, deadline: Option<Instant>) -> Self {
        Self {
            policy: policy.clone(),
            failed: 0,
            rng: fastrand::Rng::new(),
            deadline,
        }
    }

    /// The pause before the next attempt, or `None` to give up.
    pub(crate) fn next_delay(&mut self) -> Option<Duration> {
        if self.failed.saturating_add(1) >= self.policy.max_attempts() {
            return None;
        }
        let mut delay = self
            .policy
            .delay(self.failed.saturating_add(1), &mut self.rng);
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            delay = delay.min(left);
        }
        self.failed += 1;
        Some(delay)
    }

    /// Failed attempts so far in this streak.
    pub(crate) fn retries(&self) -> u32 {
        self.failed
    }

    /// A call succeeded: the next failure starts the schedule again.
    pub(crate) fn reset(&mut self) {
        self.failed = 0;
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.next_delay()
    }
}

/// Logs a retry: the first of a streak as a warning (a blip is worth knowing about), later
/// ones at debug (a 30 s outage would otherwise print a line every two seconds per call).
pub(crate) fn log_retry(
    operation: &str,
    error: &dyn std::fmt::Display,
    retry: u32,
    delay: Duration,
) {
    let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    if retry <= 1 {
        tracing::warn!(operation, error = %error, retry, retry_in_ms, "store unavailable; retrying");
    } else {
        tracing::debug!(operation, error = %error, retry, retry_in_ms, "store still unavailable; retrying");
    }
}

/// What a retry hook is told before each pause.
#[derive(Debug)]
#[non_exhaustive]
pub struct RetryNotice<'a> {
    /// The operation that failed, e.g. `load` or `connect`.
    pub operation: &'a str,
    /// Why it failed.
    pub error: &'a (dyn std::error::Error + 'a),
    /// 1 for the first retry of this call, 2 for the second, ...
    pub retry: u32,
    /// The pause before the next attempt.
    pub delay: Duration,
    /// How long retrying may go on from now, when bounded by time.
    pub gives_up_in: Option<Duration>,
}

type Hook = Arc<dyn Fn(&RetryNotice<'_>) + Send + Sync>;

/// How a client call retries transient errors: a [`RetryPolicy`] (pauses, attempt count,
/// `max_elapsed` per call), an optional deadline for every call (a command's whole run), and
/// an optional hook that is told of each retry (every retry is also logged: the first of a
/// call at warn, later ones at debug).
///
/// ```
/// use std::time::Duration;
/// use saga_core::{ClientRetry, RetryPolicy, StoreError};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap().block_on(async {
/// let retry = ClientRetry::new(RetryPolicy::client_default());
/// let mut calls = 0;
/// let answer = retry
///     .run("load", StoreError::is_transient, || {
///         calls += 1;
///         let failed = calls < 3;
///         async move {
///             if failed {
///                 Err(StoreError::Unavailable { message: "connection reset".into(), source: None })
///             } else {
///                 Ok(42)
///             }
///         }
///     })
///     .await;
/// assert_eq!(answer.unwrap(), 42);
/// assert_eq!(calls, 3);
/// # });
/// ```
#[derive(Clone)]
pub struct ClientRetry {
    policy: RetryPolicy,
    deadline: Option<Instant>,
    hook: Option<Hook>,
}

impl std::fmt::Debug for ClientRetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRetry")
            .field("policy", &self.policy)
            .field("deadline", &self.deadline)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl ClientRetry {
    /// Retries by `policy` (see [`RetryPolicy::client_default`]).
    #[must_use]
    pub fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            deadline: None,
            hook: None,
        }
    }

    /// Also stops retrying at `deadline` (tokio's clock), whatever the policy allows: a bound
    /// for a whole run of calls.
    #[must_use]
    pub fn until(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Calls `hook` before each pause (the CLI tells the operator what it waits for).
    #[must_use]
    pub fn on_retry(mut self, hook: impl Fn(&RetryNotice<'_>) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// The policy.
    #[must_use]
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Calls `op` until it succeeds, fails with an error `transient` refuses, or the bound
    /// is reached; returns the last result. `operation` names the call in logs and notices.
    ///
    /// # Errors
    /// The last error of `op`.
    pub async fn run<T, E, Fut>(
        &self,
        operation: &str,
        transient: impl Fn(&E) -> bool,
        op: impl FnMut() -> Fut,
    ) -> Result<T, E>
    where
        E: std::error::Error,
        Fut: Future<Output = Result<T, E>>,
    {
        let backoff = Backoff::new(&self.policy, self.deadline);
        let bound = backoff.deadline;
        let mut retry = 0_u32;
        op.retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|err| transient(err))
            .notify(|err, delay| {
                retry += 1;
                log_retry(operation, err, retry, delay);
                if let Some(hook) = &self.hook {
                    hook(&RetryNotice {
                        operation,
                        error: err,
                        retry,
                        delay,
                        gives_up_in: bound.map(|at| at.saturating_duration_since(Instant::now())),
                    });
                }
            })
            .await
    }

    async fn store<T, Fut>(&self, operation: &str, op: impl FnMut() -> Fut) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.run(operation, StoreError::is_transient, op).await
    }
}

/// A store whose client operations ride out blips: every read (`load`, `events`, `list`,
/// `count_by_status`, `due_backlog`) and every operator write (`request_cancel`,
/// `quarantine`, `operator_transition`, `purge`, `claim`) that fails with a transient error
/// is tried again with the same arguments, by a [`ClientRetry`]. For the operator CLI and
/// other tools that call the store, or the engine's operator commands, directly.
///
/// Retrying these is safe because the store makes them so: a repeated cancel request writes
/// nothing more, an operator transition is applied at most once per commit id (so a retried
/// `Engine::retry` whose first reply was lost succeeds instead of finding the saga already
/// resumed), a repeated claim by the same owner just takes a newer fence. A `purge` whose
/// reply was lost deletes up to `limit` more sagas and reports only what the last attempt
/// deleted.
///
/// Passed through unretried: the coordinator's operations (`claim_due`, `renew`, `release`,
/// `commit`, the idempotency guard's `guard_*`), whose retry is the engine's business (a
/// repeated `claim_due` would strand the leases of a lost reply; a repeated
/// `guard_complete` would fail on its own completed claim), and `create`, which
/// `Engine::start` retries itself (it knows when a retried create found its own saga).
/// `Engine::wait` retries its reads until its own timeout, so an engine on this store may
/// wait longer than its timeout by one retry bound.
pub struct RetryingStore {
    inner: Arc<dyn SagaStore>,
    retry: ClientRetry,
}

impl std::fmt::Debug for RetryingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryingStore")
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl RetryingStore {
    /// Wraps `inner`.
    #[must_use]
    pub fn new(inner: Arc<dyn SagaStore>, retry: ClientRetry) -> Self {
        Self { inner, retry }
    }

    /// The wrapped store.
    #[must_use]
    pub fn inner(&self) -> &Arc<dyn SagaStore> {
        &self.inner
    }
}

#[async_trait]
impl SagaStore for RetryingStore {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        self.inner.create(new).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        self.retry.store("load", || self.inner.load(id)).await
    }

    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        self.retry.store("events", || self.inner.events(id)).await
    }

    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.retry
            .store("claim", || self.inner.claim(id, request))
            .await
    }

    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.inner.claim_due(request, limit).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError> {
        self.inner.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release(lease).await
    }

    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.inner.commit(lease, transition).await
    }

    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError> {
        self.retry
            .store("request_cancel", || {
                self.inner.request_cancel(id, event.clone())
            })
            .await
    }

    async fn deliver_signal(
        &self,
        id: SagaId,
        delivery: crate::store::SignalDelivery,
    ) -> Result<crate::store::DeliveryOutcome, StoreError> {
        // A retried delivery whose first reply was lost finds its own signal: a duplicate.
        self.retry
            .store("deliver_signal", || {
                self.inner.deliver_signal(id, delivery.clone())
            })
            .await
    }

    async fn signals(
        &self,
        id: SagaId,
        after: u64,
    ) -> Result<Vec<crate::store::StoredSignal>, StoreError> {
        self.retry
            .store("signals", || self.inner.signals(id, after))
            .await
    }

    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        self.retry
            .store("quarantine", || self.inner.quarantine(id, reason))
            .await
    }

    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError> {
        self.inner
            .guard_claim(key, fingerprint, in_progress_ttl)
            .await
    }

    async fn guard_complete(
        &self,
        key: &str,
        token: &str,
        result: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.guard_complete(key, token, result, ttl).await
    }

    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.inner.guard_release(key, token).await
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        self.retry.store("list", || self.inner.list(query)).await
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError> {
        self.retry
            .store("count_by_status", || self.inner.count_by_status())
            .await
    }

    async fn count_quarantined(&self) -> Result<u64, StoreError> {
        self.retry
            .store("count_quarantined", || self.inner.count_quarantined())
            .await
    }

    async fn count_active_by_version(&self) -> Result<Vec<VersionCount>, StoreError> {
        self.retry
            .store("count_active_by_version", || {
                self.inner.count_active_by_version()
            })
            .await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        self.retry
            .store("purge", || self.inner.purge(older_than, limit))
            .await
    }

    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.retry
            .store("operator_transition", || {
                self.inner
                    .operator_transition(id, expected, transition.clone())
            })
            .await
    }

    async fn due_backlog(&self) -> Result<Option<Vec<u64>>, StoreError> {
        self.retry
            .store("due_backlog", || self.inner.due_backlog())
            .await
    }

    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.wakeups()
    }

    fn saga_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SagaId>> {
        self.inner.saga_changes()
    }
}
