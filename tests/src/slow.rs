//! A store wrapper that answers slowly and counts the calls it forwards, for tests of how
//! the coordinator behaves whatever the store's latency (under paused time the latency is
//! virtual: the runtime advances the clock instantly).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, GuardClaim, Lease,
    ListPage, ListQuery, NewSaga, StoredSaga, Transition,
};
use saga_core::{SagaId, SagaStatus, SagaStore, StoreError};
use tokio::sync::watch;

/// Wraps a store: every call first waits `latency`, and `claim_due` can be held back
/// entirely ([`SlowStore::hold_claims`]) to see what the coordinator does while a claim is
/// in flight. Counts calls per operation.
#[derive(Debug)]
pub struct SlowStore<S> {
    inner: S,
    latency: Duration,
    calls: Mutex<BTreeMap<&'static str, usize>>,
    claims_in_flight: AtomicUsize,
    most_claims_in_flight: AtomicUsize,
    /// `true`: `claim_due` calls wait until it turns `false`.
    hold: watch::Sender<bool>,
}

impl<S: SagaStore> SlowStore<S> {
    /// `inner`, answering each call after `latency`.
    pub fn new(inner: S, latency: Duration) -> Self {
        Self {
            inner,
            latency,
            calls: Mutex::default(),
            claims_in_flight: AtomicUsize::new(0),
            most_claims_in_flight: AtomicUsize::new(0),
            hold: watch::Sender::new(false),
        }
    }

    /// From now on, `claim_due` calls do not answer until [`SlowStore::release_claims`].
    pub fn hold_claims(&self) {
        self.hold.send_replace(true);
    }

    /// Lets held and later `claim_due` calls answer.
    pub fn release_claims(&self) {
        self.hold.send_replace(false);
    }

    /// How many calls of `op` (the trait method's name) were made.
    pub fn calls(&self, op: &str) -> usize {
        self.calls.lock().unwrap().get(op).copied().unwrap_or(0)
    }

    /// How many `claim_due` calls are waiting for their answer right now.
    pub fn claims_in_flight(&self) -> usize {
        self.claims_in_flight.load(Ordering::SeqCst)
    }

    /// The most `claim_due` calls that were in flight at once.
    pub fn most_claims_in_flight(&self) -> usize {
        self.most_claims_in_flight.load(Ordering::SeqCst)
    }

    async fn enter(&self, op: &'static str) {
        *self.calls.lock().unwrap().entry(op).or_default() += 1;
        // Simulated network and fsync latency (virtual under paused time).
        tokio::time::sleep(self.latency).await;
    }
}

#[async_trait]
impl<S: SagaStore> SagaStore for SlowStore<S> {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        self.enter("create").await;
        self.inner.create(new).await
    }
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        self.enter("load").await;
        self.inner.load(id).await
    }
    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        self.enter("events").await;
        self.inner.events(id).await
    }
    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.enter("claim").await;
        self.inner.claim(id, request).await
    }
    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let now = self.claims_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_claims_in_flight.fetch_max(now, Ordering::SeqCst);
        self.enter("claim_due").await;
        let mut hold = self.hold.subscribe();
        // Ok or closed: either way the hold is over.
        let _ = hold.wait_for(|held| !*held).await;
        let result = self.inner.claim_due(request, limit).await;
        self.claims_in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError> {
        self.enter("renew").await;
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.enter("release").await;
        self.inner.release(lease).await
    }
    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.enter("commit").await;
        self.inner.commit(lease, transition).await
    }
    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError> {
        self.enter("request_cancel").await;
        self.inner.request_cancel(id, event).await
    }
    async fn deliver_signal(
        &self,
        id: SagaId,
        delivery: saga_core::store::SignalDelivery,
    ) -> Result<saga_core::store::DeliveryOutcome, StoreError> {
        self.enter("deliver_signal").await;
        self.inner.deliver_signal(id, delivery).await
    }
    async fn signals(
        &self,
        id: SagaId,
        after: u64,
    ) -> Result<Vec<saga_core::store::StoredSignal>, StoreError> {
        self.enter("signals").await;
        self.inner.signals(id, after).await
    }
    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        self.enter("quarantine").await;
        self.inner.quarantine(id, reason).await
    }
    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError> {
        self.enter("guard_claim").await;
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
        self.enter("guard_complete").await;
        self.inner.guard_complete(key, token, result, ttl).await
    }
    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.enter("guard_release").await;
        self.inner.guard_release(key, token).await
    }
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        self.enter("list").await;
        self.inner.list(query).await
    }
    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError> {
        self.enter("count_by_status").await;
        self.inner.count_by_status().await
    }
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        self.enter("purge").await;
        self.inner.purge(older_than, limit).await
    }
    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.enter("operator_transition").await;
        self.inner
            .operator_transition(id, expected, transition)
            .await
    }
    fn wakeups(&self) -> Option<watch::Receiver<u64>> {
        self.inner.wakeups()
    }
    fn saga_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SagaId>> {
        self.inner.saga_changes()
    }
}
