//! [`RedisStore`]: the [`SagaStore`] implementation, delegating each operation to its
//! script's module in [`crate::scripts`] (and the counts to plain commands).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use saga_core::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, DeliveryOutcome,
    GuardClaim, Lease, ListPage, ListQuery, NewSaga, Schedule, SignalDelivery, StoredSaga,
    StoredSignal, Transition, VersionCount,
};
use saga_core::{SagaId, SagaStatus, SagaStore, StoreError};
use uuid::Uuid;

use crate::builder::{RedisStoreBuilder, ReplicaWait};
use crate::check::{ServerFinding, check_server};
use crate::connection::Connection;
use crate::error::redis_error;
use crate::hints::{DueHints, client_now_ms};
use crate::keys::KeyLayout;
use crate::scripts::call::{Answer, Call, ReplyCode};
use crate::scripts::reply::Reply;
use crate::scripts::{
    claim, commit, count_versions, create, deliver_signal, events, guard_claim, guard_complete,
    guard_release, list, load, operator_transition, purge, quarantine, release, renew,
    request_cancel, signals,
};
use crate::wake::Wakeups;

/// The longest duration sent to a script, in milliseconds (about 3000 years): longer ones are
/// clamped, so that `now + duration` stays an exact integer in Lua.
const MAX_DURATION_MS: u64 = 99_999_999_999_999;

/// The Redis store. Cheap to clone: clones share one connection.
///
/// Build it with [`RedisStore::builder`]; see the [crate docs](crate) for the guarantees,
/// the key layout and the scripts.
#[derive(Clone, Debug)]
pub struct RedisStore {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) conn: Connection,
    pub(crate) keys: KeyLayout,
    pub(crate) max_payload: usize,
    pub(crate) replica_wait: Option<ReplicaWait>,
    /// The standalone server's address (for findings).
    pub(crate) node_name: String,
    pub(crate) findings: Vec<ServerFinding>,
    /// The wake-up subscription (started by the first `wakeups()` call).
    pub(crate) wake: Wakeups,
    /// Which partitions may have due work (fed by the wake-ups and this store's own writes).
    pub(crate) hints: Arc<DueHints>,
}

/// `duration` in whole milliseconds, clamped to what the scripts accept.
pub(crate) fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_DURATION_MS)
}

/// The nil id, for errors about data that belongs to no one saga.
pub(crate) fn nil_id() -> SagaId {
    SagaId(Uuid::nil())
}

impl RedisStore {
    /// A builder with the defaults: key prefix `saga`, 16 partitions, 4 MiB payloads, no
    /// replica wait.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// The key layout (for operators and tests that inspect raw data).
    #[must_use]
    pub fn keys(&self) -> &KeyLayout {
        &self.inner.keys
    }

    /// The largest state, event or idempotency result this store accepts, in bytes.
    #[must_use]
    pub fn max_payload(&self) -> usize {
        self.inner.max_payload
    }

    /// What [`check_server`](Self::check_server) found when the store connected.
    #[must_use]
    pub fn server_findings(&self) -> &[ServerFinding] {
        &self.inner.findings
    }

    /// Reads `appendonly`, `appendfsync` and `maxmemory-policy` with `CONFIG GET` on the
    /// server (in a cluster: on every primary) and returns what weakens the guarantees: AOF
    /// off, `appendfsync` other than `always` (`everysec` can lose up to 1 s of acknowledged
    /// writes on a crash), an eviction policy other than `noeviction`, or settings that could
    /// not be read (`CONFIG` not permitted). Where AOF is on (or unreadable) it also reads
    /// the server's version (`INFO server`) and the `default` user's rules (`ACL GETUSER
    /// default`, then `ACL DRYRUN default ...` for rules narrower than `+@all ~* &*`), and
    /// reports [`AofReplayLoss`](crate::ServerIssue::AofReplayLoss) when a restart would drop
    /// every saga (redis/redis#14541), or
    /// [`AofReplayUnverifiable`](crate::ServerIssue::AofReplayUnverifiable) when the rules
    /// cannot be read. Each finding is also logged with `tracing::warn!`. Never fails: the
    /// store works without these settings, with weaker guarantees (the refusal of
    /// [`connect`](crate::RedisStoreBuilder::connect) is not repeated here).
    pub async fn check_server(&self) -> Vec<ServerFinding> {
        check_server(&self.inner.conn, &self.inner.node_name, &self.inner.keys).await
    }

    pub(crate) fn check_size(&self, what: &str, value: &str) -> Result<(), StoreError> {
        saga_core::store::check_payload(what, value, self.inner.max_payload)
    }

    /// Runs a script call on this store's connection, with its replica wait (see
    /// [`Call::run`]).
    pub(crate) async fn call<T>(
        &self,
        call: Call,
        decode: impl FnOnce(ReplyCode, &mut Reply) -> Result<Answer<T>, StoreError>,
    ) -> Result<T, StoreError> {
        call.run(&self.inner.conn, self.inner.replica_wait, decode)
            .await
    }

    /// Which partitions may have due work.
    pub(crate) fn hints(&self) -> &DueHints {
        &self.inner.hints
    }

    /// Tells the due hints when a saga this store just wrote becomes due without a lease.
    pub(crate) fn note_schedule(&self, id: SagaId, schedule: Schedule) {
        let p = self.inner.keys.partition_of(id);
        let hints = &self.inner.hints;
        match schedule {
            Schedule::WakeAfter(delay) if delay.is_zero() => hints.mark_dirty(p),
            Schedule::WakeAfter(delay) => {
                hints.note_due(p, client_now_ms().saturating_add(ms(delay)));
            }
            Schedule::AwaitSignal { timeout, .. } => {
                // Due at once if a signal beyond `seen` was already in the inbox, which only
                // the script knew: a dirty mark costs at most one visit of the partition.
                hints.mark_dirty(p);
                hints.note_due(p, client_now_ms().saturating_add(ms(timeout)));
            }
            _ => {}
        }
    }
}

#[async_trait]
impl SagaStore for RedisStore {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        create::create(self, new).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        load::load(self, id).await
    }

    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        events::events(self, id).await
    }

    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        claim::claim(self, id, request).await
    }

    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.claim_due_batch(request, limit).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError> {
        renew::renew(self, lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        release::release(self, lease).await
    }

    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        commit::commit(self, lease, transition).await
    }

    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError> {
        request_cancel::request_cancel(self, id, &event).await
    }

    async fn deliver_signal(
        &self,
        id: SagaId,
        delivery: SignalDelivery,
    ) -> Result<DeliveryOutcome, StoreError> {
        deliver_signal::deliver_signal(self, id, delivery).await
    }

    async fn signals(&self, id: SagaId, after: u64) -> Result<Vec<StoredSignal>, StoreError> {
        signals::signals(self, id, after).await
    }

    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        quarantine::quarantine(self, id, reason).await
    }

    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError> {
        guard_claim::guard_claim(self, key, fingerprint, in_progress_ttl).await
    }

    async fn guard_complete(
        &self,
        key: &str,
        token: &str,
        result: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        guard_complete::guard_complete(self, key, token, result, ttl).await
    }

    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        guard_release::guard_release(self, key, token).await
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        list::list(self, query).await
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError> {
        let keys = &self.inner.keys;
        let counts = (0..keys.partitions()).map(|p| {
            let mut conn = self.inner.conn.clone();
            async move {
                let mut pipe = redis::pipe();
                for key in keys.statuses(p) {
                    pipe.cmd("ZCARD").arg(key);
                }
                pipe.query_async::<Vec<u64>>(&mut conn)
                    .await
                    .map_err(|err| redis_error("count_by_status", None, err))
            }
        });
        let mut totals: BTreeMap<SagaStatus, u64> =
            SagaStatus::ALL.into_iter().map(|s| (s, 0)).collect();
        for result in join_all(counts).await {
            for (status, n) in SagaStatus::ALL.into_iter().zip(result?) {
                *totals.entry(status).or_default() += n;
            }
        }
        Ok(totals)
    }

    async fn count_quarantined(&self) -> Result<u64, StoreError> {
        let keys = &self.inner.keys;
        // One HLEN per partition, concurrently (partitions may live on different nodes).
        let counts = (0..keys.partitions()).map(|p| {
            let mut conn = self.inner.conn.clone();
            async move {
                redis::cmd("HLEN")
                    .arg(keys.quarantine(p))
                    .query_async::<u64>(&mut conn)
                    .await
                    .map_err(|err| redis_error("count_quarantined", None, err))
            }
        });
        let mut total = 0;
        for count in join_all(counts).await {
            total += count?;
        }
        Ok(total)
    }

    /// One read-only `count_versions.lua` pass per partition, concurrently, over the
    /// `running` and `compensating` indexes only, in bounded slices.
    async fn count_active_by_version(&self) -> Result<Vec<VersionCount>, StoreError> {
        count_versions::count_active_by_version(self).await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        purge::purge(self, older_than, limit).await
    }

    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        operator_transition::operator_transition(self, id, expected, transition).await
    }

    /// `ZCOUNT` of each partition's due set up to now (a leased saga's entry is due at its
    /// lease expiry, so it counts only once the lease lapsed), concurrently.
    async fn due_backlog(&self) -> Result<Option<Vec<u64>>, StoreError> {
        let keys = &self.inner.keys;
        let now = client_now_ms();
        let counts = (0..keys.partitions()).map(|p| {
            let mut conn = self.inner.conn.clone();
            let key = keys.due(p);
            async move {
                redis::cmd("ZCOUNT")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .query_async::<u64>(&mut conn)
                    .await
                    .map_err(|err| redis_error("due_backlog", None, err))
            }
        });
        join_all(counts)
            .await
            .into_iter()
            .collect::<Result<Vec<u64>, _>>()
            .map(Some)
    }

    /// Redis pub/sub on the prefix's wake channel (`<prefix>:wake`): the first call starts
    /// one background task per store, on the current tokio runtime, with a dedicated pub/sub
    /// connection that reconnects with backoff (the value changes once after every
    /// reconnection, as messages may have been missed). `None` outside a tokio runtime. The
    /// task ends once the store and every receiver are dropped.
    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.wake.subscribe()
    }

    /// The ids carried by the wake channel's `finished` and `operator` messages.
    fn saga_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SagaId>> {
        self.inner.wake.subscribe_changes()
    }
}
