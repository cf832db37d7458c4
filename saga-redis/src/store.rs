//! [`RedisStore`]: the [`SagaStore`] implementation.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use redis::{ScriptInvocation, Value};
use saga_core::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, GuardClaim, Lease,
    LeaseInfo, ListPage, ListQuery, NewSaga, SagaSummary, Schedule, StoredSaga, Transition,
};
use saga_core::{SagaId, SagaStatus, SagaStore, StoreError, Timestamp};
use uuid::Uuid;

use crate::builder::{RedisStoreBuilder, ReplicaWait};
use crate::check::{ServerFinding, check_server};
use crate::connection::Connection;
use crate::error::{Reply, redis_error, unexpected};
use crate::hints::{DueHints, client_now_ms};
use crate::keys::KeyLayout;
use crate::scripts::SCRIPTS;
use crate::wake::Wakeups;

/// The longest duration sent to a script, in milliseconds (about 3000 years): longer ones are
/// clamped, so that `now + duration` stays an exact integer in Lua.
const MAX_DURATION_MS: u64 = 99_999_999_999_999;

/// The largest page a listing returns.
const MAX_PAGE: usize = 1000;

/// Ids one `list.lua` call examines at most (bounds the script's run time).
const LIST_BUDGET: usize = 2000;

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

/// The KEYS of the scripts that rewrite a saga (`commit`, `operator_transition`), in the order
/// their headers state: the saga hash, its events, the partition's due set, quarantine hash
/// and terminal index, then one index per status.
fn saga_write_keys(invocation: &mut ScriptInvocation<'_>, keys: &KeyLayout, id: SagaId) {
    let p = keys.partition_of(id);
    invocation
        .key(keys.saga(id))
        .key(keys.events(id))
        .key(keys.due(p))
        .key(keys.quarantine(p))
        .key(keys.terminal(p));
    for status_key in keys.statuses(p) {
        invocation.key(status_key);
    }
}

pub(crate) fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_DURATION_MS)
}

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

    fn check_size(&self, what: &str, value: &str) -> Result<(), StoreError> {
        saga_core::store::check_payload(what, value, self.inner.max_payload)
    }

    pub(crate) async fn invoke(
        &self,
        op: &'static str,
        saga: Option<SagaId>,
        invocation: ScriptInvocation<'_>,
    ) -> Result<(String, Reply), StoreError> {
        let mut conn = self.inner.conn.clone();
        let value: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|err| redis_error(op, saga, err))?;
        Reply::parse(op, value)
    }

    /// Tells the due hints when a saga this store just wrote becomes due without a lease.
    fn note_schedule(&self, id: SagaId, schedule: Schedule) {
        let p = self.inner.keys.partition_of(id);
        match schedule {
            Schedule::WakeAfter(delay) if delay.is_zero() => self.inner.hints.mark_dirty(p),
            Schedule::WakeAfter(delay) => self
                .inner
                .hints
                .note_due(p, client_now_ms().saturating_add(ms(delay))),
            _ => {}
        }
    }

    /// With a replica wait configured: `WAIT` on the node that holds `key`, and fail when
    /// too few replicas acknowledged.
    pub(crate) async fn replicate(&self, op: &str, key: &str) -> Result<(), StoreError> {
        let Some(wait) = self.inner.replica_wait else {
            return Ok(());
        };
        let mut conn = self.inner.conn.clone();
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(wait.replicas).arg(ms(wait.timeout));
        let acked = conn
            .on_node_of(key, cmd)
            .await
            .map_err(|err| redis_error(op, None, err))?;
        let acked: u64 = redis::from_redis_value(acked)
            .map_err(|err| unexpected(op, &format!("WAIT answered {err}")))?;
        if acked < u64::from(wait.replicas) {
            return Err(StoreError::Unavailable {
                message: format!(
                    "{op}: the write was acknowledged by {acked} of {} replicas within {:?}; it is applied on the primary but may be lost on failover (retrying is safe)",
                    wait.replicas, wait.timeout
                ),
                source: None,
            });
        }
        Ok(())
    }

    /// Lists one partition: up to `want` matching rows after `after`, in id order.
    async fn list_partition(
        &self,
        p: u16,
        query: &ListQuery,
        want: usize,
    ) -> Result<Vec<SagaSummary>, StoreError> {
        let keys = &self.inner.keys;
        let index = match (&query.status, &query.saga_type) {
            (Some(status), _) => keys.status(p, *status),
            (None, Some(saga_type)) => keys.type_index(p, saga_type),
            (None, None) => keys.ids(p),
        };
        let status = query.status.map_or("", SagaStatus::as_str);
        let saga_type = query.saga_type.as_deref().unwrap_or("");
        let mut cursor = query.after.map(|id| id.to_string()).unwrap_or_default();
        let mut rows = Vec::new();
        loop {
            let mut invocation = SCRIPTS.list.prepare_invoke();
            invocation
                .key(&index)
                .key(keys.quarantine(p))
                .arg(keys.partition_base(p))
                .arg(&cursor)
                .arg(want - rows.len())
                .arg(LIST_BUDGET)
                .arg(status)
                .arg(saga_type);
            let (code, mut reply) = self.invoke("list", None, invocation).await?;
            if code != "ok" {
                return Err(reply.into_error(&code, nil_id(), 0));
            }
            let exhausted = reply.flag()?;
            let last = reply.string()?;
            let count = reply.count()?;
            let mut page = Vec::with_capacity(count);
            for _ in 0..count {
                let id_text = reply.string()?;
                let id: SagaId = id_text
                    .parse()
                    .map_err(|_| unexpected("list", &format!("saga id {id_text:?} in {index}")))?;
                let saga_type = reply.string()?;
                let status = reply.status(id)?;
                let updated = reply.string()?;
                let updated_at =
                    updated
                        .parse()
                        .map(Timestamp)
                        .map_err(|_| StoreError::Corrupt {
                            saga: id,
                            problem: format!(
                                "field updated_at is {updated:?}, expected milliseconds"
                            ),
                        })?;
                let reason = reply.string()?;
                page.push((
                    SagaSummary {
                        id,
                        saga_type,
                        status,
                        updated_at,
                        quarantined: None,
                    },
                    reason,
                ));
            }
            for (row, reason) in page {
                let quarantined = reply.flag()?;
                rows.push(SagaSummary {
                    quarantined: quarantined.then_some(reason),
                    ..row
                });
            }
            if exhausted || rows.len() >= want || last.is_empty() {
                return Ok(rows);
            }
            cursor = last;
        }
    }
}

#[async_trait]
impl SagaStore for RedisStore {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        new.validate(self.inner.max_payload)?;
        let keys = &self.inner.keys;
        let id = new.id;
        let p = keys.partition_of(id);
        let saga_key = keys.saga(id);
        let mut invocation = SCRIPTS.create.prepare_invoke();
        invocation
            .key(&saga_key)
            .key(keys.events(id))
            .key(keys.due(p))
            .key(keys.ids(p))
            .key(keys.status(p, SagaStatus::Running))
            .key(keys.type_index(p, &new.saga_type))
            .arg(id.to_string())
            .arg(&new.saga_type)
            .arg(KeyLayout::type_key(&new.saga_type).to_string())
            .arg(&new.fingerprint)
            .arg(new.idempotency_key.as_deref().unwrap_or(""))
            .arg(&new.state)
            .arg(self.inner.max_payload)
            .arg(new.claim.as_ref().map_or("", |claim| claim.owner.as_str()))
            .arg(new.claim.as_ref().map_or(0, |claim| ms(claim.ttl)))
            .arg(new.events.len());
        for event in &new.events {
            invocation.arg(event);
        }
        let (code, mut reply) = self.invoke("create", Some(id), invocation).await?;
        match code.as_str() {
            "created" => {
                let fence = reply.uint()?;
                if new.claim.is_none() {
                    self.inner.hints.mark_dirty(p);
                }
                self.replicate("create", &saga_key).await?;
                let lease = new.claim.map(|claim| Lease {
                    saga_id: id,
                    owner: claim.owner,
                    fence,
                });
                Ok(CreateOutcome::Created { lease })
            }
            "existing" => Ok(CreateOutcome::Existing {
                status: reply.status(id)?,
            }),
            "conflict" => Err(StoreError::IdempotencyConflict { saga: id }),
            _ => Err(reply.into_error(&code, id, 0)),
        }
    }

    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        let keys = &self.inner.keys;
        let p = keys.partition_of(id);
        let mut invocation = SCRIPTS.load.prepare_invoke();
        invocation
            .key(keys.saga(id))
            .key(keys.due(p))
            .key(keys.quarantine(p))
            .arg(id.to_string());
        let (code, mut reply) = self.invoke("load", Some(id), invocation).await?;
        match code.as_str() {
            "ok" => {}
            "not_found" => return Ok(None),
            "corrupt" => {
                let problem = reply.string()?;
                let quarantined = reply.flag()?;
                let reason = reply.string()?;
                let problem = if quarantined {
                    format!("{problem} (quarantined: {reason})")
                } else {
                    problem
                };
                return Err(StoreError::Corrupt { saga: id, problem });
            }
            _ => return Err(reply.into_error(&code, id, 0)),
        }
        let now = reply.uint()?;
        let due = reply.string()?;
        let quarantined = reply.flag()?;
        let reason = reply.string()?;
        let mut fields: HashMap<String, String> = HashMap::new();
        let rest = reply.rest()?;
        for pair in rest.chunks_exact(2) {
            fields.insert(pair[0].clone(), pair[1].clone());
        }
        decode_saga(id, now, &due, quarantined.then_some(reason), fields).map(Some)
    }

    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        let keys = &self.inner.keys;
        let mut invocation = SCRIPTS.events.prepare_invoke();
        invocation.key(keys.saga(id)).key(keys.events(id));
        let (code, mut reply) = self.invoke("events", Some(id), invocation).await?;
        match code.as_str() {
            "ok" => reply.rest(),
            _ => Err(reply.into_error(&code, id, 0)),
        }
    }

    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let keys = &self.inner.keys;
        let p = keys.partition_of(id);
        let saga_key = keys.saga(id);
        let mut invocation = SCRIPTS.claim.prepare_invoke();
        invocation
            .key(&saga_key)
            .key(keys.due(p))
            .key(keys.quarantine(p))
            .arg(id.to_string())
            .arg(&request.owner)
            .arg(ms(request.ttl))
            .arg(self.inner.max_payload);
        let (code, mut reply) = self.invoke("claim", Some(id), invocation).await?;
        match code.as_str() {
            "claimed" => {
                let fence = reply.uint()?;
                self.replicate("claim", &saga_key).await?;
                Ok(ClaimOutcome::Claimed(Lease {
                    saga_id: id,
                    owner: request.owner.clone(),
                    fence,
                }))
            }
            "busy" => {
                let owner = reply.string()?;
                let expires_at = Timestamp(reply.uint()?);
                Ok(ClaimOutcome::Busy(LeaseInfo { owner, expires_at }))
            }
            "not_runnable" => {
                let status = reply.status(id)?;
                let quarantined = reply.flag()?;
                let reason = reply.string()?;
                Ok(ClaimOutcome::NotRunnable {
                    status,
                    quarantined: quarantined.then_some(reason),
                })
            }
            _ => Err(reply.into_error(&code, id, 0)),
        }
    }

    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.claim_due_batch(request, limit).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError> {
        let keys = &self.inner.keys;
        let id = lease.saga_id;
        let p = keys.partition_of(id);
        let saga_key = keys.saga(id);
        let mut invocation = SCRIPTS.renew.prepare_invoke();
        invocation
            .key(&saga_key)
            .key(keys.due(p))
            .key(keys.quarantine(p))
            .arg(id.to_string())
            .arg(&lease.owner)
            .arg(lease.fence)
            .arg(ms(ttl))
            .arg(self.inner.max_payload);
        let (code, mut reply) = self.invoke("renew", Some(id), invocation).await?;
        match code.as_str() {
            "ok" => {
                let cancel_requested = reply.flag()?;
                self.replicate("renew", &saga_key).await?;
                Ok(CommitOutcome { cancel_requested })
            }
            _ => Err(reply.into_error(&code, id, lease.fence)),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let keys = &self.inner.keys;
        let id = lease.saga_id;
        let p = keys.partition_of(id);
        let saga_key = keys.saga(id);
        let mut invocation = SCRIPTS.release.prepare_invoke();
        invocation
            .key(&saga_key)
            .key(keys.due(p))
            .key(keys.quarantine(p))
            .arg(id.to_string())
            .arg(lease.fence);
        let (code, reply) = self.invoke("release", Some(id), invocation).await?;
        match code.as_str() {
            "ok" => {
                self.inner.hints.mark_dirty(p);
                self.replicate("release", &saga_key).await
            }
            _ => Err(reply.into_error(&code, id, lease.fence)),
        }
    }

    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        transition.check_sizes(self.inner.max_payload)?;
        let (schedule, span) = match transition.schedule {
            Schedule::Continue { ttl } => ("continue", ms(ttl)),
            Schedule::WakeAfter(delay) => ("wake", ms(delay)),
            Schedule::Finished => ("finished", 0),
            other => {
                return Err(StoreError::Invalid(format!(
                    "schedule {other:?} is not supported by saga-redis"
                )));
            }
        };
        if transition.status.is_terminal() != (schedule == "finished") {
            return Err(StoreError::Invalid(format!(
                "status {} does not go with schedule {:?}",
                transition.status, transition.schedule
            )));
        }
        let keys = &self.inner.keys;
        let id = lease.saga_id;
        let saga_key = keys.saga(id);
        let mut invocation = SCRIPTS.commit.prepare_invoke();
        saga_write_keys(&mut invocation, keys, id);
        invocation
            .arg(id.to_string())
            .arg(&lease.owner)
            .arg(lease.fence)
            .arg(&transition.commit_id)
            .arg(transition.status.as_str())
            .arg(schedule)
            .arg(span)
            .arg(self.inner.max_payload)
            .arg(&transition.state)
            .arg(transition.events.len());
        for event in &transition.events {
            invocation.arg(event);
        }
        let (code, mut reply) = self.invoke("commit", Some(id), invocation).await?;
        match code.as_str() {
            "ok" => {
                self.note_schedule(id, transition.schedule);
                let cancel_requested = reply.flag()?;
                self.replicate("commit", &saga_key).await?;
                Ok(CommitOutcome { cancel_requested })
            }
            _ => Err(reply.into_error(&code, id, lease.fence)),
        }
    }

    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError> {
        self.check_size("event", &event)?;
        let keys = &self.inner.keys;
        let p = keys.partition_of(id);
        let saga_key = keys.saga(id);
        let mut invocation = SCRIPTS.request_cancel.prepare_invoke();
        invocation
            .key(&saga_key)
            .key(keys.events(id))
            .key(keys.due(p))
            .key(keys.quarantine(p))
            .arg(id.to_string())
            .arg(&event)
            .arg(self.inner.max_payload);
        let (code, mut reply) = self.invoke("request_cancel", Some(id), invocation).await?;
        match code.as_str() {
            "requested" => {
                self.inner.hints.mark_dirty(p);
                if reply.flag()? {
                    self.replicate("request_cancel", &saga_key).await?;
                }
                Ok(CancelOutcome::Requested)
            }
            "finished" => Ok(CancelOutcome::AlreadyFinished(reply.status(id)?)),
            _ => Err(reply.into_error(&code, id, 0)),
        }
    }

    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        self.check_size("quarantine reason", reason)?;
        let keys = &self.inner.keys;
        let p = keys.partition_of(id);
        let saga_key = keys.saga(id);
        let mut invocation = SCRIPTS.quarantine.prepare_invoke();
        invocation
            .key(&saga_key)
            .key(keys.due(p))
            .key(keys.quarantine(p))
            .key(keys.terminal(p))
            .arg(id.to_string())
            .arg(reason)
            .arg(self.inner.max_payload);
        let (code, reply) = self.invoke("quarantine", Some(id), invocation).await?;
        match code.as_str() {
            "ok" => self.replicate("quarantine", &saga_key).await,
            _ => Err(reply.into_error(&code, id, 0)),
        }
    }

    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError> {
        self.check_size("idempotency key", key)?;
        self.check_size("fingerprint", fingerprint)?;
        let guard_key = self.inner.keys.guard(key);
        let token = Uuid::new_v4().to_string();
        let mut invocation = SCRIPTS.guard_claim.prepare_invoke();
        invocation
            .key(&guard_key)
            .arg(fingerprint)
            .arg(&token)
            .arg(ms(in_progress_ttl))
            .arg(self.inner.max_payload);
        let (code, mut reply) = self.invoke("guard_claim", None, invocation).await?;
        match code.as_str() {
            "claimed" => {
                self.replicate("guard_claim", &guard_key).await?;
                Ok(GuardClaim::Claimed { token })
            }
            "completed" => Ok(GuardClaim::Completed {
                result: reply.string()?,
            }),
            "in_progress" => Ok(GuardClaim::InProgress),
            "conflict" => Ok(GuardClaim::Conflict),
            _ => Err(reply.into_error(&code, nil_id(), 0)),
        }
    }

    async fn guard_complete(
        &self,
        key: &str,
        token: &str,
        result: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.check_size("idempotency result", result)?;
        let guard_key = self.inner.keys.guard(key);
        let mut invocation = SCRIPTS.guard_complete.prepare_invoke();
        invocation
            .key(&guard_key)
            .arg(token)
            .arg(result)
            .arg(ms(ttl))
            .arg(self.inner.max_payload);
        let (code, reply) = self.invoke("guard_complete", None, invocation).await?;
        match code.as_str() {
            "ok" => self.replicate("guard_complete", &guard_key).await,
            "lost" => Err(StoreError::Invalid(format!(
                "idempotency key {key}: the claim expired and was taken over before the result was recorded"
            ))),
            _ => Err(reply.into_error(&code, nil_id(), 0)),
        }
    }

    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let guard_key = self.inner.keys.guard(key);
        let mut invocation = SCRIPTS.guard_release.prepare_invoke();
        invocation.key(&guard_key).arg(token);
        let (code, mut reply) = self.invoke("guard_release", None, invocation).await?;
        match code.as_str() {
            "ok" => {
                if reply.flag()? {
                    self.replicate("guard_release", &guard_key).await?;
                }
                Ok(())
            }
            _ => Err(reply.into_error(&code, nil_id(), 0)),
        }
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = query.limit.clamp(1, MAX_PAGE);
        let want = limit + 1;
        let partitions =
            (0..self.inner.keys.partitions()).map(|p| self.list_partition(p, query, want));
        let mut rows = Vec::new();
        for result in join_all(partitions).await {
            rows.extend(result?);
        }
        rows.sort_by_key(|row| row.id);
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|row| row.id)
        } else {
            None
        };
        Ok(ListPage { sagas: rows, next })
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

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        let keys = &self.inner.keys;
        let mut deleted: u64 = 0;
        for p in 0..keys.partitions() {
            let remaining = u64::try_from(limit)
                .unwrap_or(u64::MAX)
                .saturating_sub(deleted);
            if remaining == 0 {
                break;
            }
            let terminal = keys.terminal(p);
            let mut invocation = SCRIPTS.purge.prepare_invoke();
            invocation
                .key(&terminal)
                .key(keys.ids(p))
                .key(keys.due(p))
                .key(keys.quarantine(p));
            for status_key in keys.statuses(p) {
                invocation.key(status_key);
            }
            invocation
                .arg(keys.partition_base(p))
                .arg(ms(older_than))
                .arg(remaining);
            let (code, mut reply) = self.invoke("purge", None, invocation).await?;
            if code != "ok" {
                return Err(reply.into_error(&code, nil_id(), 0));
            }
            let n = reply.uint()?;
            if n > 0 {
                self.replicate("purge", &terminal).await?;
            }
            deleted += n;
        }
        Ok(deleted)
    }

    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        transition.check_sizes(self.inner.max_payload)?;
        let terminal = transition.status.is_terminal();
        let (schedule, delay) = match transition.schedule {
            Schedule::WakeAfter(delay) if !terminal => ("wake", ms(delay)),
            Schedule::Finished if terminal => ("finished", 0),
            other => {
                return Err(StoreError::Invalid(format!(
                    "an operator transition to {} cannot use schedule {other:?}",
                    transition.status
                )));
            }
        };
        let expected = expected
            .iter()
            .map(|status| status.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let keys = &self.inner.keys;
        let saga_key = keys.saga(id);
        let mut invocation = SCRIPTS.operator_transition.prepare_invoke();
        saga_write_keys(&mut invocation, keys, id);
        invocation
            .arg(id.to_string())
            .arg(&transition.commit_id)
            .arg(transition.status.as_str())
            .arg(schedule)
            .arg(delay)
            .arg(self.inner.max_payload)
            .arg(&transition.state)
            .arg(expected)
            .arg(transition.events.len());
        for event in &transition.events {
            invocation.arg(event);
        }
        let (code, mut reply) = self
            .invoke("operator_transition", Some(id), invocation)
            .await?;
        match code.as_str() {
            "ok" => {
                self.note_schedule(id, transition.schedule);
                let cancel_requested = reply.flag()?;
                self.replicate("operator_transition", &saga_key).await?;
                Ok(CommitOutcome { cancel_requested })
            }
            _ => Err(reply.into_error(&code, id, 0)),
        }
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

/// Builds a [`StoredSaga`] from the fields of its hash; a missing or malformed field is
/// [`StoreError::Corrupt`] naming it.
fn decode_saga(
    id: SagaId,
    now: u64,
    due: &str,
    quarantined: Option<String>,
    mut fields: HashMap<String, String>,
) -> Result<StoredSaga, StoreError> {
    let corrupt = |problem: String| StoreError::Corrupt { saga: id, problem };
    let mut take = |name: &str| {
        fields
            .remove(name)
            .ok_or_else(|| corrupt(format!("field {name} is missing from the saga hash")))
    };
    let number = |name: &str, text: &str| {
        text.parse::<u64>().map_err(|_| {
            corrupt(format!(
                "field {name} is {text:?}, expected a non-negative integer"
            ))
        })
    };
    let saga_type = take("type")?;
    let status_text = take("status")?;
    let status: SagaStatus = status_text
        .parse()
        .map_err(|err| corrupt(format!("field status: {err}")))?;
    let state = take("state")?;
    let fingerprint = take("fingerprint")?;
    let cancel = take("cancel")?;
    let cancel_requested = match cancel.as_str() {
        "0" => false,
        "1" => true,
        other => {
            return Err(corrupt(format!(
                "field cancel is {other:?}, expected 0 or 1"
            )));
        }
    };
    let fence = number("fence", &take("fence")?)?;
    let updated_at = Timestamp(number("updated_at", &take("updated_at")?)?);
    let lease = match (fields.remove("owner"), fields.remove("lease_until")) {
        (Some(owner), Some(until)) => {
            let expires_at = number("lease_until", &until)?;
            (expires_at > now).then_some(LeaseInfo {
                owner,
                expires_at: Timestamp(expires_at),
            })
        }
        _ => None,
    };
    let due_at = if due.is_empty() {
        None
    } else {
        let score: f64 = due
            .parse()
            .map_err(|_| corrupt(format!("due time {due:?} is not a number")))?;
        // Whole milliseconds by construction.
        Some(Timestamp(score.max(0.0) as u64))
    };
    Ok(StoredSaga {
        id,
        saga_type,
        status,
        state,
        fingerprint,
        cancel_requested,
        fence,
        lease,
        due_at,
        quarantined,
        updated_at,
    })
}
