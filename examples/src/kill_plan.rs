//! A fault-injection hook for tests (`deal-flow-coordinator --kill-plan <seed>`, hidden): the
//! process SIGKILLs itself at a seeded point of every saga's life, so that a test that keeps
//! restarting it kills each of many sagas at a point of its own.
//!
//! [`KillPlanStore`] wraps the coordinator's store and forwards every call. Each saga `s` gets
//! a kill point from a hash of the seed and its id ([`kill_point`]): just before its `c`-th
//! commit (`c` in 1..=5) or just after its `c`-th commit was applied (`c` in 1..=4), counted
//! over its whole life (the count is kept in Redis, so a saga resumed by a new process goes on
//! counting where the last one stopped). Every short deal saga makes at least five commits and
//! its fifth may be its terminal one, which is why "after" stops at the fourth: a saga is
//! still in flight at each of its points.
//!
//! A saga that reaches its point is parked there: the commit call never returns (and, for a
//! point "before", never reaches the store). The process is killed once half of its workers
//! are parked, or every saga it holds a lease on is, or [`PARK_BOUND`] after the first park,
//! whichever comes first, so one kill catches many sagas, each of the parked ones exactly at
//! its own point. Before the kill the hook records, in Redis under the run's key prefix, every
//! saga in flight here (committed here and holding its lease here, not terminal, or parked)
//! in the set [`killed_key`], and each parked saga's point in the hash [`parked_key`]; then it
//! sends SIGKILL to its own process. From the moment it decides to kill, no commit or claim
//! goes through any more, so no saga recorded as in flight can finish before the signal lands.
//!
//! A saga parked once (in [`parked_key`]) never parks again: it runs to its end in a later
//! process. A saga that was only caught in flight by another saga's kill keeps its plan and
//! parks at its own point in a later life, so that in the end every saga has been killed at
//! its own point.
//!
//! These keys are the test's protocol, not product state; the store never reads them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, DeliveryOutcome,
    GuardClaim, Lease, ListPage, ListQuery, NewSaga, Schedule, SignalDelivery, StoredSaga,
    StoredSignal, Transition, VersionCount,
};
use saga_core::{SagaId, SagaStatus, SagaStore, StoreError};

use crate::ops::StoreArgs;

/// The highest commit number a point "before" may name (every short deal saga makes at least
/// this many commits).
pub const BEFORE_MAX: u32 = 5;
/// The highest commit number a point "after" may name (the one before the earliest possible
/// terminal commit).
pub const AFTER_MAX: u32 = 4;
/// How long after the first park the process is killed at the latest, when neither half of
/// its workers nor every saga it holds are parked by then. A test that uses the hook keeps
/// `--lease` above twice this, so that a parked saga's lease does not lapse (and the saga get
/// claimed again here) before the kill.
pub const PARK_BOUND: Duration = Duration::from_millis(600);

/// Where in a saga's life the process is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KillPoint {
    /// Just before the saga's n-th commit reaches the store (1-based).
    Before(u32),
    /// Just after the saga's n-th commit was applied, before the engine hears of it.
    After(u32),
}

impl KillPoint {
    /// How it is written in [`parked_key`]: `before:<n>` or `after:<n>`.
    #[must_use]
    pub fn label(self) -> String {
        match self {
            Self::Before(n) => format!("before:{n}"),
            Self::After(n) => format!("after:{n}"),
        }
    }

    /// Every point a plan can choose, in order.
    #[must_use]
    pub fn all() -> Vec<Self> {
        (1..=BEFORE_MAX)
            .map(Self::Before)
            .chain((1..=AFTER_MAX).map(Self::After))
            .collect()
    }
}

/// The kill point of saga `id` under `seed`: the same in every process and every run.
#[must_use]
pub fn kill_point(seed: u64, id: SagaId) -> KillPoint {
    // FNV-1a over the seed and the id, then a final mix: stable across builds and platforms
    // (std's hasher makes no such promise).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in seed.to_le_bytes().iter().chain(id.0.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    let points = u64::from(BEFORE_MAX + AFTER_MAX);
    // Below 9, so it fits.
    let index = u32::try_from(hash % points).unwrap_or(0);
    if index < BEFORE_MAX {
        KillPoint::Before(index + 1)
    } else {
        KillPoint::After(index - BEFORE_MAX + 1)
    }
}

/// The set of every saga that was in flight at one of the kills (under `prefix`).
#[must_use]
pub fn killed_key(prefix: &str) -> String {
    format!("{{{prefix}:kill-plan}}:killed")
}

/// The hash of each parked saga's point, `before:<n>` or `after:<n>` (under `prefix`).
#[must_use]
pub fn parked_key(prefix: &str) -> String {
    format!("{{{prefix}:kill-plan}}:parked")
}

/// The hash of each saga's commit count over its life (under `prefix`).
#[must_use]
pub fn commits_key(prefix: &str) -> String {
    format!("{{{prefix}:kill-plan}}:commits")
}

/// Why the kill plan could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KillPlanError {
    /// The store's Redis could not be reached for the plan's own keys.
    #[error(
        "the kill plan cannot reach Redis for its keys: {0}; check --redis-url or --cluster-urls"
    )]
    Redis(#[from] redis::RedisError),
    /// The store flags name no Redis the plan can use.
    #[error("the kill plan needs --redis-url or --cluster-urls: {0}")]
    NoRedis(String),
}

/// The plan's own connection to the store's Redis (its keys share one hash tag, so one slot).
#[derive(Clone)]
enum Conn {
    Standalone(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Conn {
    async fn open(store: &StoreArgs) -> Result<Self, KillPlanError> {
        let url = store
            .standalone_url()
            .map_err(|err| KillPlanError::NoRedis(err.to_string()))?;
        match url {
            Some(url) => {
                let client = redis::Client::open(url.as_str())?;
                Ok(Self::Standalone(
                    redis::aio::ConnectionManager::new(client).await?,
                ))
            }
            None if !store.cluster_urls.is_empty() => {
                let client = redis::cluster::ClusterClient::new(store.cluster_urls.clone())?;
                Ok(Self::Cluster(client.get_async_connection().await?))
            }
            None => Err(KillPlanError::NoRedis("no store address given".into())),
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, redis::RedisError> {
        match self.clone() {
            Self::Standalone(mut conn) => cmd.query_async(&mut conn).await,
            Self::Cluster(mut conn) => cmd.query_async(&mut conn).await,
        }
    }
}

/// What the plan knows about this process's sagas.
#[derive(Debug, Default)]
struct Books {
    /// Parked at their point once already (read at start-up, plus this process's own):
    /// never parked again.
    done: HashSet<SagaId>,
    /// Leased to this process (claimed, or committed with `Continue`) and not given up since.
    leased: HashSet<SagaId>,
    /// Commits over each saga's life, as far as this process has read or made them.
    commits: HashMap<SagaId, u32>,
    /// Committed here and still holding its lease here (last schedule `Continue`).
    held: HashSet<SagaId>,
    /// Parked at their point, waiting for the kill.
    parked: BTreeMap<SagaId, KillPoint>,
    /// The kill is decided: nothing goes through any more.
    firing: bool,
    /// Commits between this wrapper and the store right now.
    committing: usize,
}

/// The plan's state, shared by the wrapper and the kill's timer.
struct Plan {
    inner: Arc<dyn SagaStore>,
    conn: Conn,
    prefix: String,
    seed: u64,
    /// Parked sagas that trigger the kill at once.
    park_target: usize,
    books: Mutex<Books>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("prefix", &self.prefix)
            .field("seed", &self.seed)
            .field("park_target", &self.park_target)
            .finish_non_exhaustive()
    }
}

/// The wrapper: forwards every call to the store, parks each saga at its kill point and kills
/// the process (see the module documentation).
#[derive(Clone, Debug)]
pub struct KillPlanStore(Arc<Plan>);

impl KillPlanStore {
    /// Wraps `inner` with the plan of `seed`, for a process running `workers` sagas at once;
    /// reads which sagas were parked so far.
    ///
    /// # Errors
    /// [`KillPlanError`]: the plan's Redis keys cannot be reached.
    pub async fn wrap(
        inner: Arc<dyn SagaStore>,
        store: &StoreArgs,
        seed: u64,
        workers: usize,
    ) -> Result<Self, KillPlanError> {
        let conn = Conn::open(store).await?;
        let prefix = store.key_prefix.clone();
        let members: Vec<String> = conn
            .query(redis::cmd("HKEYS").arg(parked_key(&prefix)))
            .await?;
        let done: HashSet<SagaId> = members.iter().filter_map(|m| m.parse().ok()).collect();
        tracing::warn!(
            seed,
            parked_so_far = done.len(),
            "kill plan armed: this process SIGKILLs itself at its sagas' kill points (a test hook)"
        );
        Ok(Self(Arc::new(Plan {
            inner,
            conn,
            prefix,
            seed,
            park_target: (workers / 2).max(1),
            books: Mutex::new(Books {
                done,
                ..Books::default()
            }),
        })))
    }
}

/// Counts a commit on its way to the store while it lives.
struct Committing<'a>(&'a Plan);

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        self.0.books().committing -= 1;
    }
}

impl Plan {
    fn books(&self) -> MutexGuard<'_, Books> {
        // A panic elsewhere while holding the lock leaves plain sets behind: still usable.
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits forever once the kill is decided, so nothing more goes through.
    async fn halt_if_firing(&self) {
        if self.books().firing {
            std::future::pending::<()>().await;
        }
    }

    /// Lets a commit through to the store unless the kill is decided (then waits forever).
    async fn enter_commit(&self) -> Committing<'_> {
        {
            let mut books = self.books();
            if !books.firing {
                books.committing += 1;
                return Committing(self);
            }
        }
        loop {
            std::future::pending::<()>().await;
        }
    }

    /// The saga's commit count over its life so far; `None` when it is not planned any more
    /// (parked once already).
    async fn life_commits(&self, id: SagaId) -> Option<u32> {
        {
            let books = self.books();
            if books.done.contains(&id) {
                return None;
            }
            if let Some(count) = books.commits.get(&id) {
                return Some(*count);
            }
        }
        // First seen here: it may have committed in earlier processes (caught in flight by
        // a kill, or released for a timer).
        let read: Result<Option<u32>, _> = self
            .conn
            .query(
                redis::cmd("HGET")
                    .arg(commits_key(&self.prefix))
                    .arg(id.to_string()),
            )
            .await;
        let count = match read {
            Ok(count) => count.unwrap_or(0),
            Err(err) => {
                tracing::error!(saga_id = %id, error = %err, "kill plan: cannot read the commit count; counting from 0");
                0
            }
        };
        self.books().commits.insert(id, count);
        Some(count)
    }

    /// Counts an applied commit in the saga's life (in Redis, for the processes after this
    /// one) and notes whether the saga still holds its lease here.
    async fn applied(&self, id: SagaId, planned: bool, schedule: Schedule) {
        let held = matches!(schedule, Schedule::Continue { .. });
        {
            let mut books = self.books();
            if held {
                books.held.insert(id);
                books.leased.insert(id);
            } else {
                books.held.remove(&id);
                books.leased.remove(&id);
            }
            if planned {
                *books.commits.entry(id).or_insert(0) += 1;
            }
        }
        if planned {
            let counted: Result<u32, _> = self
                .conn
                .query(
                    redis::cmd("HINCRBY")
                        .arg(commits_key(&self.prefix))
                        .arg(id.to_string())
                        .arg(1),
                )
                .await;
            if let Err(err) = counted {
                tracing::error!(saga_id = %id, error = %err, "kill plan: cannot count a commit");
            }
        }
    }

    /// Marks saga `id` parked at `point`, unless the kill is decided already (a saga that
    /// reaches a point "before" then is only caught in flight, and parks in a later life).
    /// Returns whether it is the first saga parked here.
    fn mark_parked(&self, id: SagaId, point: KillPoint) -> Option<bool> {
        let mut books = self.books();
        if books.firing && matches!(point, KillPoint::Before(_)) {
            return None;
        }
        // It holds a lease here from its claim even before its first commit.
        books.held.insert(id);
        books.leased.insert(id);
        books.parked.insert(id, point);
        books.done.insert(id);
        Some(books.parked.len() == 1)
    }

    /// Keeps saga `id`, marked parked at `point`, there for good; the kill happens when
    /// enough sagas are parked.
    async fn park(self: &Arc<Self>, id: SagaId, point: KillPoint, first: Option<bool>) {
        if first.is_some() {
            tracing::info!(saga_id = %id, point = %point.label(), "kill plan: saga parked at its kill point");
        }
        if first == Some(true) {
            let plan = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(PARK_BOUND).await;
                plan.fire().await;
            });
        }
        self.fire_if_ready().await;
        std::future::pending::<()>().await;
    }

    /// Kills the process when half the workers, or every saga leased here, are parked.
    async fn fire_if_ready(&self) {
        let ready = {
            let books = self.books();
            !books.parked.is_empty()
                && (books.parked.len() >= self.park_target
                    || books.leased.iter().all(|id| books.parked.contains_key(id)))
        };
        if ready {
            self.fire().await;
        }
    }

    /// Records every saga in flight here and each parked saga's point, then SIGKILLs this
    /// process. Only the first call does anything.
    async fn fire(&self) {
        {
            let mut books = self.books();
            if books.firing {
                return;
            }
            books.firing = true;
        }
        // Commits already on their way land first (bounded), so that what is recorded as in
        // flight is what the kill really interrupts: none of it can finish afterwards.
        for _ in 0..400 {
            if self.books().committing == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (in_flight, parked) = {
            let books = self.books();
            (books.held.clone(), books.parked.clone())
        };
        let mut pipe = redis::cmd("SADD");
        pipe.arg(killed_key(&self.prefix));
        for id in &in_flight {
            pipe.arg(id.to_string());
        }
        let mut points = redis::cmd("HSET");
        points.arg(parked_key(&self.prefix));
        for (id, point) in &parked {
            points.arg(id.to_string()).arg(point.label());
        }
        // Retried a little: a record lost here would only make the test count fewer kills.
        for attempt in 1..=5 {
            let recorded: Result<(), redis::RedisError> = async {
                if !in_flight.is_empty() {
                    self.conn.query::<i64>(&pipe).await?;
                }
                if !parked.is_empty() {
                    self.conn.query::<i64>(&points).await?;
                }
                Ok(())
            }
            .await;
            match recorded {
                Ok(()) => break,
                Err(err) => {
                    tracing::error!(attempt, error = %err, "kill plan: cannot record the sagas in flight");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tracing::warn!(
            in_flight = in_flight.len(),
            parked = parked.len(),
            "kill plan: SIGKILL now"
        );
        let pid = std::process::id().to_string();
        // A real SIGKILL (not abort): nothing of this process runs after it.
        if let Err(err) = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
        {
            tracing::error!(error = %err, "kill plan: cannot run kill -KILL; the process stays parked");
        }
    }
}

#[async_trait]
impl SagaStore for KillPlanStore {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        self.0.inner.create(new).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        self.0.inner.load(id).await
    }

    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        self.0.inner.events(id).await
    }

    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.0.halt_if_firing().await;
        let outcome = self.0.inner.claim(id, request).await?;
        if let ClaimOutcome::Claimed(lease) = &outcome {
            self.0.books().leased.insert(lease.saga_id);
        }
        Ok(outcome)
    }

    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.0.halt_if_firing().await;
        let leases = self.0.inner.claim_due(request, limit).await?;
        self.0
            .books()
            .leased
            .extend(leases.iter().map(|l| l.saga_id));
        Ok(leases)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError> {
        self.0.inner.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.0.halt_if_firing().await;
        self.0.inner.release(lease).await?;
        {
            let mut books = self.0.books();
            books.held.remove(&lease.saga_id);
            books.leased.remove(&lease.saga_id);
        }
        self.0.fire_if_ready().await;
        Ok(())
    }

    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        let plan = &self.0;
        plan.halt_if_firing().await;
        let id = lease.saga_id;
        let life = plan.life_commits(id).await;
        let point = life.map(|_| kill_point(plan.seed, id));
        let number = life.map_or(0, |n| n + 1);
        if point == Some(KillPoint::Before(number)) {
            let first = plan.mark_parked(id, KillPoint::Before(number));
            plan.park(id, KillPoint::Before(number), first).await;
        }
        let committing = plan.enter_commit().await;
        let schedule = transition.schedule;
        let result = plan.inner.commit(lease, transition).await;
        let mut parked_after = None;
        if result.is_ok() {
            plan.applied(id, life.is_some(), schedule).await;
            if point == Some(KillPoint::After(number)) {
                // Marked while the commit still counts as on its way, so that a kill being
                // decided right now records it as parked.
                parked_after = Some(plan.mark_parked(id, KillPoint::After(number)));
            }
        }
        drop(committing);
        let outcome = result?;
        if let Some(first) = parked_after {
            plan.park(id, KillPoint::After(number), first).await;
        }
        plan.fire_if_ready().await;
        plan.halt_if_firing().await;
        Ok(outcome)
    }

    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError> {
        self.0.inner.request_cancel(id, event).await
    }

    async fn deliver_signal(
        &self,
        id: SagaId,
        delivery: SignalDelivery,
    ) -> Result<DeliveryOutcome, StoreError> {
        self.0.inner.deliver_signal(id, delivery).await
    }

    async fn signals(&self, id: SagaId, after: u64) -> Result<Vec<StoredSignal>, StoreError> {
        self.0.inner.signals(id, after).await
    }

    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        self.0.inner.quarantine(id, reason).await
    }

    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError> {
        self.0
            .inner
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
        self.0.inner.guard_complete(key, token, result, ttl).await
    }

    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        self.0.inner.guard_release(key, token).await
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        self.0.inner.list(query).await
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError> {
        self.0.inner.count_by_status().await
    }

    async fn count_quarantined(&self) -> Result<u64, StoreError> {
        self.0.inner.count_quarantined().await
    }

    async fn count_active_by_version(&self) -> Result<Vec<VersionCount>, StoreError> {
        self.0.inner.count_active_by_version().await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        self.0.inner.purge(older_than, limit).await
    }

    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.0
            .inner
            .operator_transition(id, expected, transition)
            .await
    }

    async fn due_backlog(&self) -> Result<Option<Vec<u64>>, StoreError> {
        self.0.inner.due_backlog().await
    }

    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.0.inner.wakeups()
    }

    fn saga_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SagaId>> {
        self.0.inner.saga_changes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Every point is chosen for some sagas, and a saga's point is the same on every call.
    #[test]
    fn points_cover_every_position_and_are_stable() {
        let mut seen = BTreeMap::new();
        for _ in 0..2000 {
            let id = SagaId::random();
            let point = kill_point(11, id);
            assert_eq!(point, kill_point(11, id));
            *seen.entry(point).or_insert(0_u32) += 1;
        }
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), KillPoint::all());
    }
}
