//! A store wrapper that "crashes" at a chosen commit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, DeliveryOutcome,
    GuardClaim, Lease, ListPage, ListQuery, NewSaga, SignalDelivery, StoredSaga, StoredSignal,
    Transition,
};
use saga_core::{SagaId, SagaStatus, SagaStore, StoreError};

/// Wraps a store and lets exactly `commits` commits through; the next commit and every call
/// after it fail with [`StoreError::Unavailable`]. To the engine this is its process (or its
/// link to the store) dying right after the `commits`-th commit: nothing it does afterwards
/// reaches the store.
///
/// The wrapped store itself is untouched, so a fresh engine on it (or on a clone of it) sees
/// exactly what was durable at the crash.
#[derive(Debug)]
pub struct CrashingStore<S> {
    inner: S,
    allowed: AtomicUsize,
    committed: AtomicUsize,
    crashed: AtomicBool,
}

impl<S: SagaStore> CrashingStore<S> {
    /// Lets `commits` commits through, then crashes.
    pub fn after_commits(inner: S, commits: usize) -> Self {
        Self {
            inner,
            allowed: AtomicUsize::new(commits),
            committed: AtomicUsize::new(0),
            crashed: AtomicBool::new(false),
        }
    }

    /// Never crashes on its own; see [`CrashingStore::crash_now`].
    pub fn healthy(inner: S) -> Self {
        Self::after_commits(inner, usize::MAX)
    }

    /// Cuts the store off now: every call fails until [`CrashingStore::revive`].
    pub fn crash_now(&self) {
        self.crashed.store(true, Ordering::SeqCst);
    }

    /// Reconnects: calls reach the wrapped store again (a network partition that heals, a
    /// paused process that wakes up), and no automatic crash happens any more.
    pub fn revive(&self) {
        self.allowed.store(usize::MAX, Ordering::SeqCst);
        self.crashed.store(false, Ordering::SeqCst);
    }

    /// Whether the crash happened.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Commits that went through.
    pub fn commits(&self) -> usize {
        self.committed.load(Ordering::SeqCst)
    }

    fn alive(&self) -> Result<(), StoreError> {
        if self.crashed() {
            return Err(StoreError::Unavailable {
                message: "injected crash: the store is unreachable".into(),
                source: None,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl<S: SagaStore> SagaStore for CrashingStore<S> {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        self.alive()?;
        self.inner.create(new).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        self.alive()?;
        self.inner.load(id).await
    }

    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        self.alive()?;
        self.inner.events(id).await
    }

    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.alive()?;
        self.inner.claim(id, request).await
    }

    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.alive()?;
        self.inner.claim_due(request, limit).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError> {
        self.alive()?;
        self.inner.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.alive()?;
        self.inner.release(lease).await
    }

    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.alive()?;
        if self.commits() >= self.allowed.load(Ordering::SeqCst) {
            // The crash point: this commit and everything after it is lost.
            self.crashed.store(true, Ordering::SeqCst);
            return self.alive().map(|()| CommitOutcome::default());
        }
        let outcome = self.inner.commit(lease, transition).await?;
        self.committed.fetch_add(1, Ordering::SeqCst);
        Ok(outcome)
    }

    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError> {
        self.alive()?;
        self.inner.request_cancel(id, event).await
    }

    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.alive()?;
        self.inner
            .operator_transition(id, expected, transition)
            .await
    }

    async fn count_quarantined(&self) -> Result<u64, StoreError> {
        self.alive()?;
        self.inner.count_quarantined().await
    }

    async fn count_active_by_version(
        &self,
    ) -> Result<Vec<saga_core::store::VersionCount>, StoreError> {
        self.alive()?;
        self.inner.count_active_by_version().await
    }

    async fn due_backlog(&self) -> Result<Option<Vec<u64>>, StoreError> {
        self.alive()?;
        self.inner.due_backlog().await
    }

    async fn deliver_signal(
        &self,
        id: SagaId,
        delivery: SignalDelivery,
    ) -> Result<DeliveryOutcome, StoreError> {
        self.alive()?;
        self.inner.deliver_signal(id, delivery).await
    }

    async fn signals(&self, id: SagaId, after: u64) -> Result<Vec<StoredSignal>, StoreError> {
        self.alive()?;
        self.inner.signals(id, after).await
    }

    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        self.alive()?;
        self.inner.quarantine(id, reason).await
    }

    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError> {
        self.alive()?;
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
        self.alive()?;
        self.inner.guard_complete(key, token, result, ttl).await
    }

    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.alive()?;
        self.inner.guard_release(key, token).await
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        self.alive()?;
        self.inner.list(query).await
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError> {
        self.alive()?;
        self.inner.count_by_status().await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        self.alive()?;
        self.inner.purge(older_than, limit).await
    }
}
