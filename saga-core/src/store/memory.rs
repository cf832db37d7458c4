//! An in-memory store with the same semantics as the Redis store: leases, fencing tokens,
//! due times, cancel flags, quarantine and idempotency records. The embedded default for
//! examples and tests; it keeps nothing across process restarts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, DeliveryOutcome,
    GuardClaim, Lease, LeaseInfo, ListPage, ListQuery, MAX_SIGNALS_PER_SAGA, NewSaga, SagaStore,
    SagaSummary, Schedule, SignalDelivery, StoreError, StoredSaga, StoredSignal, Transition,
    VersionCount,
};
use crate::{Clock, SagaId, SagaStatus, Timestamp, TokioClock};

/// Default cap on any one encoded state or event: 4 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 4 * 1024 * 1024;

/// The in-memory store. Cloning gives another handle to the same data.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    clock: Arc<dyn Clock>,
    max_payload: usize,
    wake: Arc<tokio::sync::watch::Sender<u64>>,
    changes: Arc<tokio::sync::broadcast::Sender<SagaId>>,
}

#[derive(Debug, Default)]
struct Inner {
    sagas: BTreeMap<SagaId, Entry>,
    /// (due time, id) for every saga that is not terminal or quarantined; a leased saga is
    /// due when its lease expires.
    due: BTreeSet<(Timestamp, SagaId)>,
    guards: HashMap<String, GuardRecord>,
}

#[derive(Debug)]
struct Entry {
    saga_type: String,
    version: u32,
    status: SagaStatus,
    state: String,
    events: Vec<String>,
    fingerprint: String,
    cancel_requested: bool,
    fence: u64,
    lease: Option<LeaseInfo>,
    due_at: Option<Timestamp>,
    quarantined: Option<String>,
    updated_at: Timestamp,
    /// The `commit_id` of the latest applied transition (none before the first commit).
    last_commit: Option<String>,
    /// The signal inbox, oldest first (sequence = index + 1).
    signals: Vec<StoredSignal>,
}

#[derive(Debug)]
struct GuardRecord {
    fingerprint: String,
    expires_at: Timestamp,
    progress: GuardProgress,
}

#[derive(Debug)]
enum GuardProgress {
    InProgress { token: String },
    Done { result: String },
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the default clock.
    #[must_use]
    pub fn new() -> Self {
        Self::with_clock(Arc::new(TokioClock::new()))
    }

    /// An empty store that reads time from `clock`.
    #[must_use]
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Arc::default(),
            clock,
            max_payload: DEFAULT_MAX_PAYLOAD,
            wake: Arc::new(tokio::sync::watch::Sender::new(0)),
            changes: Arc::new(tokio::sync::broadcast::Sender::new(1024)),
        }
    }

    /// Tells waiters that work may be due or a saga finished.
    fn wake(&self) {
        self.wake
            .send_modify(|version| *version = version.wrapping_add(1));
    }

    /// Caps the size of any one encoded state or event.
    #[must_use]
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock can only come from a bug in this file; the data is
        // still consistent at every await-free step, so recovering the guard is sound.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_size(&self, what: &str, value: &str) -> Result<(), StoreError> {
        super::check_payload(what, value, self.max_payload)
    }

    /// Replaces a saga's stored state with raw text, bypassing every check: for tests that
    /// need corrupt data. Only with the `testkit` feature of `saga-core` (enable it in
    /// `[dev-dependencies]`: `saga-core = { ..., features = ["testkit"] }`). Returns `false`
    /// when no saga has that id.
    #[cfg(feature = "testkit")]
    pub fn corrupt_state(&self, id: SagaId, raw: &str) -> bool {
        let mut inner = self.lock();
        match inner.sagas.get_mut(&id) {
            Some(entry) => {
                raw.clone_into(&mut entry.state);
                true
            }
            None => false,
        }
    }
}

impl Inner {
    fn set_due(&mut self, id: SagaId, due: Option<Timestamp>) {
        let Some(entry) = self.sagas.get_mut(&id) else {
            return;
        };
        if let Some(old) = entry.due_at.take() {
            self.due.remove(&(old, id));
        }
        entry.due_at = due;
        if let Some(at) = due {
            self.due.insert((at, id));
        }
    }

    fn take_lease(&mut self, id: SagaId, request: &ClaimRequest, now: Timestamp) -> Lease {
        let expires_at = now.plus(request.ttl);
        let fence = match self.sagas.get_mut(&id) {
            Some(entry) => {
                entry.fence += 1;
                entry.lease = Some(LeaseInfo {
                    owner: request.owner.clone(),
                    expires_at,
                });
                entry.fence
            }
            // Every caller looked the saga up under the same lock; a fence of 0 is never
            // current, so even a lease made here could not write.
            None => 0,
        };
        self.set_due(id, Some(expires_at));
        Lease {
            saga_id: id,
            owner: request.owner.clone(),
            fence,
        }
    }

    fn writable_entry(&mut self, lease: &Lease) -> Result<&mut Entry, StoreError> {
        let entry = self
            .sagas
            .get_mut(&lease.saga_id)
            .ok_or(StoreError::NotFound(lease.saga_id))?;
        if entry.fence != lease.fence {
            return Err(StoreError::Fenced {
                saga: lease.saga_id,
                fence: lease.fence,
                current_fence: entry.fence,
                current_owner: entry.lease.as_ref().map(|l| l.owner.clone()),
            });
        }
        if entry.status.is_terminal() || entry.quarantined.is_some() {
            return Err(StoreError::NotWritable {
                saga: lease.saga_id,
                status: entry.status,
            });
        }
        Ok(entry)
    }
}

fn lease_free(entry: &Entry, owner: &str, now: Timestamp) -> Result<(), LeaseInfo> {
    match &entry.lease {
        Some(lease) if lease.expires_at > now && lease.owner != owner => Err(lease.clone()),
        _ => Ok(()),
    }
}

/// The engine's own signals (a child waking its parent) are bounded by the journal that
/// sends them, not by the inbox limit, so that senders in a loop cannot keep them out.
fn is_engine_signal(name: &str) -> bool {
    name.starts_with(super::ENGINE_SIGNAL_PREFIX)
}

fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[async_trait]
impl SagaStore for MemoryStore {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        new.validate(self.max_payload)?;
        let now = self.clock.now();
        let mut inner = self.lock();
        if let Some(existing) = inner.sagas.get(&new.id) {
            if existing.fingerprint != new.fingerprint {
                return Err(StoreError::IdempotencyConflict { saga: new.id });
            }
            return Ok(CreateOutcome::Existing {
                status: existing.status,
            });
        }
        inner.sagas.insert(
            new.id,
            Entry {
                saga_type: new.saga_type,
                version: new.version,
                status: SagaStatus::Running,
                state: new.state,
                events: new.events,
                fingerprint: new.fingerprint,
                cancel_requested: false,
                fence: 0,
                lease: None,
                due_at: None,
                quarantined: None,
                updated_at: now,
                last_commit: None,
                signals: Vec::new(),
            },
        );
        let lease = match &new.claim {
            Some(request) => Some(inner.take_lease(new.id, request, now)),
            None => {
                inner.set_due(new.id, Some(now));
                None
            }
        };
        drop(inner);
        if lease.is_none() {
            // A saga claimed by its creator is run by it: no coordinator needs waking.
            self.wake();
        }
        Ok(CreateOutcome::Created { lease })
    }

    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        let now = self.clock.now();
        let inner = self.lock();
        Ok(inner.sagas.get(&id).map(|entry| StoredSaga {
            id,
            saga_type: entry.saga_type.clone(),
            status: entry.status,
            state: entry.state.clone(),
            fingerprint: entry.fingerprint.clone(),
            cancel_requested: entry.cancel_requested,
            fence: entry.fence,
            lease: entry.lease.clone().filter(|lease| lease.expires_at > now),
            due_at: entry.due_at,
            quarantined: entry.quarantined.clone(),
            updated_at: entry.updated_at,
        }))
    }

    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        let inner = self.lock();
        inner
            .sagas
            .get(&id)
            .map(|entry| entry.events.clone())
            .ok_or(StoreError::NotFound(id))
    }

    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = inner.sagas.get(&id).ok_or(StoreError::NotFound(id))?;
        if entry.status.is_terminal() || entry.quarantined.is_some() {
            return Ok(ClaimOutcome::NotRunnable {
                status: entry.status,
                quarantined: entry.quarantined.clone(),
            });
        }
        if let Err(holder) = lease_free(entry, &request.owner, now) {
            return Ok(ClaimOutcome::Busy(holder));
        }
        Ok(ClaimOutcome::Claimed(inner.take_lease(id, request, now)))
    }

    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let due: Vec<SagaId> = inner
            .due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .take(limit)
            .collect();
        Ok(due
            .into_iter()
            .map(|id| inner.take_lease(id, request, now))
            .collect())
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = inner.writable_entry(lease)?;
        let expires_at = now.plus(ttl);
        entry.lease = Some(LeaseInfo {
            owner: lease.owner.clone(),
            expires_at,
        });
        let outcome = CommitOutcome {
            cancel_requested: entry.cancel_requested,
        };
        inner.set_due(lease.saga_id, Some(expires_at));
        Ok(outcome)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = inner.writable_entry(lease)?;
        entry.lease = None;
        inner.set_due(lease.saga_id, Some(now));
        drop(inner);
        self.wake();
        Ok(())
    }

    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        transition.check_sizes(self.max_payload)?;
        let terminal = transition.status.is_terminal();
        if terminal != matches!(transition.schedule, Schedule::Finished) {
            return Err(StoreError::Invalid(format!(
                "status {} does not go with schedule {:?}",
                transition.status, transition.schedule
            )));
        }
        let now = self.clock.now();
        let mut inner = self.lock();
        if let Some(entry) = inner.sagas.get(&lease.saga_id)
            && entry.fence == lease.fence
            && entry.last_commit.as_ref() == Some(&transition.commit_id)
        {
            return Ok(CommitOutcome {
                cancel_requested: entry.cancel_requested,
            });
        }
        let entry = inner.writable_entry(lease)?;
        entry.last_commit = Some(transition.commit_id);
        entry.events.extend(transition.events);
        entry.state = transition.state;
        entry.status = transition.status;
        entry.updated_at = now;
        let outcome = CommitOutcome {
            cancel_requested: entry.cancel_requested,
        };
        let transition_schedule = transition.schedule;
        let due = match transition.schedule {
            Schedule::Continue { ttl } => {
                let expires_at = now.plus(ttl);
                entry.lease = Some(LeaseInfo {
                    owner: lease.owner.clone(),
                    expires_at,
                });
                Some(expires_at)
            }
            Schedule::WakeAfter(delay) => {
                entry.lease = None;
                Some(now.plus(delay))
            }
            Schedule::AwaitSignal { timeout, seen } => {
                entry.lease = None;
                // A signal that arrived after the waiter read the inbox ends the wait now.
                if entry.signals.len() as u64 > seen {
                    Some(now)
                } else {
                    Some(now.plus(timeout))
                }
            }
            Schedule::Finished => {
                entry.lease = None;
                None
            }
        };
        let due_now = due == Some(now);
        inner.set_due(lease.saga_id, due);
        drop(inner);
        if matches!(transition_schedule, Schedule::Finished) {
            // No receiver is not an error: nobody waits.
            let _ = self.changes.send(lease.saga_id);
        }
        // A finished saga is reported on `saga_changes`; only new work wakes coordinators.
        if due_now && !matches!(transition_schedule, Schedule::Continue { .. }) {
            self.wake();
        }
        Ok(outcome)
    }

    async fn deliver_signal(
        &self,
        id: SagaId,
        delivery: SignalDelivery,
    ) -> Result<DeliveryOutcome, StoreError> {
        self.check_size("signal payload", &delivery.payload)?;
        self.check_size("event", &delivery.event)?;
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = inner.sagas.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        if entry.status.is_terminal() {
            return Ok(DeliveryOutcome::AlreadyFinished(entry.status));
        }
        if let Some(earlier) = entry
            .signals
            .iter()
            .find(|s| s.name == delivery.name && s.key == delivery.key)
        {
            if earlier.payload != delivery.payload {
                return Err(StoreError::SignalConflict {
                    saga: id,
                    name: delivery.name,
                    key: delivery.key,
                });
            }
            return Ok(DeliveryOutcome::Duplicate {
                sequence: earlier.sequence,
            });
        }
        if entry.signals.len() >= MAX_SIGNALS_PER_SAGA && !is_engine_signal(&delivery.name) {
            return Err(StoreError::InboxFull {
                saga: id,
                limit: MAX_SIGNALS_PER_SAGA,
            });
        }
        let sequence = entry.signals.len() as u64 + 1;
        entry.signals.push(StoredSignal {
            sequence,
            name: delivery.name,
            key: delivery.key,
            payload: delivery.payload,
            at: delivery.at,
        });
        entry.events.push(delivery.event);
        entry.updated_at = now;
        let held = entry
            .lease
            .as_ref()
            .is_some_and(|lease| lease.expires_at > now);
        let wake = !held && entry.quarantined.is_none();
        if wake {
            inner.set_due(id, Some(now));
        }
        drop(inner);
        if wake {
            self.wake();
        }
        Ok(DeliveryOutcome::Delivered { sequence })
    }

    async fn signals(&self, id: SagaId, after: u64) -> Result<Vec<StoredSignal>, StoreError> {
        let inner = self.lock();
        let entry = inner.sagas.get(&id).ok_or(StoreError::NotFound(id))?;
        Ok(entry
            .signals
            .iter()
            .filter(|s| s.sequence > after)
            .cloned()
            .collect())
    }

    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError> {
        self.check_size("event", &event)?;
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = inner.sagas.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        if entry.status.is_terminal() {
            return Ok(CancelOutcome::AlreadyFinished(entry.status));
        }
        if entry.cancel_requested {
            return Ok(CancelOutcome::Requested);
        }
        entry.cancel_requested = true;
        entry.events.push(event);
        entry.updated_at = now;
        let held = entry
            .lease
            .as_ref()
            .is_some_and(|lease| lease.expires_at > now);
        if !held && entry.quarantined.is_none() {
            inner.set_due(id, Some(now));
        }
        drop(inner);
        self.wake();
        Ok(CancelOutcome::Requested)
    }

    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = inner.sagas.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        entry.quarantined = Some(reason.to_owned());
        entry.lease = None;
        entry.updated_at = now;
        inner.set_due(id, None);
        Ok(())
    }

    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        if let Some(record) = inner.guards.get(key).filter(|r| r.expires_at > now) {
            if record.fingerprint != fingerprint {
                return Ok(GuardClaim::Conflict);
            }
            return Ok(match &record.progress {
                GuardProgress::InProgress { .. } => GuardClaim::InProgress,
                GuardProgress::Done { result } => GuardClaim::Completed {
                    result: result.clone(),
                },
            });
        }
        let token = new_token();
        inner.guards.insert(
            key.to_owned(),
            GuardRecord {
                fingerprint: fingerprint.to_owned(),
                expires_at: now.plus(in_progress_ttl),
                progress: GuardProgress::InProgress {
                    token: token.clone(),
                },
            },
        );
        Ok(GuardClaim::Claimed { token })
    }

    async fn guard_complete(
        &self,
        key: &str,
        token: &str,
        result: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.check_size("idempotency result", result)?;
        let now = self.clock.now();
        let mut inner = self.lock();
        // A lapsed claim no longer owns the key, whether or not someone claimed it since
        // (in Redis the key has expired), so the expiry is checked as well as the token.
        match inner.guards.get_mut(key) {
            Some(record)
                if record.expires_at > now
                    && matches!(&record.progress, GuardProgress::InProgress { token: t } if t == token) =>
            {
                record.progress = GuardProgress::Done {
                    result: result.to_owned(),
                };
                record.expires_at = now.plus(ttl);
                Ok(())
            }
            _ => Err(StoreError::Invalid(format!(
                "idempotency key {key}: this claim no longer owns the key (it expired, was released, or was completed) so the result was not recorded"
            ))),
        }
    }

    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.guards.get(key).is_some_and(
            |r| matches!(&r.progress, GuardProgress::InProgress { token: t } if t == token),
        ) {
            inner.guards.remove(key);
        }
        Ok(())
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = query.limit.clamp(1, 1000);
        let inner = self.lock();
        let start = match query.after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        let mut sagas = Vec::new();
        let mut next = None;
        for (id, entry) in inner.sagas.range((start, std::ops::Bound::Unbounded)) {
            if query.status.is_some_and(|s| s != entry.status)
                || query
                    .saga_type
                    .as_ref()
                    .is_some_and(|t| *t != entry.saga_type)
            {
                continue;
            }
            if sagas.len() == limit {
                next = sagas.last().map(|s: &SagaSummary| s.id);
                break;
            }
            sagas.push(SagaSummary {
                id: *id,
                saga_type: entry.saga_type.clone(),
                status: entry.status,
                version: Some(entry.version),
                updated_at: entry.updated_at,
                quarantined: entry.quarantined.clone(),
            });
        }
        Ok(ListPage { sagas, next })
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError> {
        let inner = self.lock();
        let mut counts: BTreeMap<SagaStatus, u64> =
            SagaStatus::ALL.into_iter().map(|s| (s, 0)).collect();
        for entry in inner.sagas.values() {
            *counts.entry(entry.status).or_default() += 1;
        }
        Ok(counts)
    }

    async fn count_quarantined(&self) -> Result<u64, StoreError> {
        let inner = self.lock();
        let count = inner
            .sagas
            .values()
            .filter(|e| e.quarantined.is_some())
            .count();
        Ok(u64::try_from(count).unwrap_or(u64::MAX))
    }

    async fn count_active_by_version(&self) -> Result<Vec<VersionCount>, StoreError> {
        let inner = self.lock();
        Ok(VersionCount::tally(inner.sagas.values().map(|entry| {
            (
                entry.saga_type.clone(),
                Some(entry.version),
                entry.status,
                1,
            )
        })))
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        let now = self.clock.now();
        let mut inner = self.lock();
        let doomed: Vec<SagaId> = inner
            .sagas
            .iter()
            .filter(|(_, e)| e.status.is_terminal() && e.updated_at.plus(older_than) <= now)
            .map(|(id, _)| *id)
            .take(limit)
            .collect();
        for id in &doomed {
            inner.set_due(*id, None);
            inner.sagas.remove(id);
        }
        Ok(doomed.len() as u64)
    }

    async fn due_backlog(&self) -> Result<Option<Vec<u64>>, StoreError> {
        let now = self.clock.now();
        let inner = self.lock();
        let due = inner.due.iter().take_while(|(at, _)| *at <= now).count();
        Ok(Some(vec![due as u64]))
    }

    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        transition.check_sizes(self.max_payload)?;
        let due_after = match transition.schedule {
            Schedule::WakeAfter(delay) if !transition.status.is_terminal() => Some(delay),
            Schedule::Finished if transition.status.is_terminal() => None,
            other => {
                return Err(StoreError::Invalid(format!(
                    "an operator transition to {} cannot use schedule {other:?}",
                    transition.status
                )));
            }
        };
        let now = self.clock.now();
        let mut inner = self.lock();
        let entry = inner.sagas.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        if !transition.commit_id.is_empty()
            && entry.last_commit.as_ref() == Some(&transition.commit_id)
        {
            // Applied already (its reply was lost): write nothing, not even a new fence.
            return Ok(CommitOutcome {
                cancel_requested: entry.cancel_requested,
            });
        }
        if !expected.contains(&entry.status) {
            return Err(StoreError::NotWritable {
                saga: id,
                status: entry.status,
            });
        }
        entry.fence += 1;
        entry.lease = None;
        entry.last_commit = Some(transition.commit_id);
        entry.events.extend(transition.events);
        entry.state = transition.state;
        entry.status = transition.status;
        entry.updated_at = now;
        let outcome = CommitOutcome {
            cancel_requested: entry.cancel_requested,
        };
        if due_after.is_some() {
            entry.quarantined = None;
        }
        inner.set_due(id, due_after.map(|delay| now.plus(delay)));
        drop(inner);
        self.wake();
        let _ = self.changes.send(id);
        Ok(outcome)
    }

    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.wake.subscribe())
    }

    fn saga_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SagaId>> {
        Some(self.changes.subscribe())
    }
}
