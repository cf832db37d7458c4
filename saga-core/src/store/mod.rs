//! The storage contract that every store implements, and the in-memory store.
//!
//! A store keeps, per saga: the encoded state (opaque to the store), the append-only event
//! history (opaque entries), the status (for indexes), a due time, the lease (owner, fencing
//! token, expiry) and a cancel flag. It also keeps idempotency records for the step guard.
//! Every write that changes a saga goes through one atomic operation that checks the writer's
//! fencing token first.
//!
//! The store does not decode states or events: the engine owns their encoding, so a store can
//! be written (and tested with the conformance suite of the `testkit` feature) without knowing
//! the engine.

mod memory;
mod signal;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use memory::{DEFAULT_MAX_PAYLOAD, MemoryStore};
pub use signal::{
    DeliveryOutcome, ENGINE_SIGNAL_PREFIX, MAX_SIGNALS_PER_SAGA, SignalDelivery, StoredSignal,
};

use crate::{SagaId, SagaStatus, Timestamp};

/// A saga to create.
#[derive(Clone, Debug)]
pub struct NewSaga {
    /// Its id (derived from the idempotency key when there is one).
    pub id: SagaId,
    /// Registered type name.
    pub saga_type: String,
    /// Version of the workflow code it was started under (the engine runs it only under
    /// that version).
    pub version: u32,
    /// The idempotency key, when the caller gave one.
    pub idempotency_key: Option<String>,
    /// Fingerprint of (type, version, input): the same key with another fingerprint is a
    /// conflict.
    pub fingerprint: String,
    /// Encoded initial state.
    pub state: String,
    /// Encoded initial events (at least `SagaStarted`; an empty list is
    /// [`StoreError::Invalid`]).
    pub events: Vec<String>,
    /// Take the lease at once for this owner (the creating process runs the saga itself).
    pub claim: Option<ClaimRequest>,
}

impl NewSaga {
    /// The checks every store makes before creating: at least one event, and the state and
    /// each event within `max_payload` bytes.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] or [`StoreError::TooLarge`].
    pub fn validate(&self, max_payload: usize) -> Result<(), StoreError> {
        check_payload("saga state", &self.state, max_payload)?;
        for event in &self.events {
            check_payload("event", event, max_payload)?;
        }
        if self.events.is_empty() {
            return Err(StoreError::Invalid(
                "a new saga needs at least its SagaStarted event".into(),
            ));
        }
        Ok(())
    }
}

/// Checks that `value` (named `what` in the error) fits in `limit` bytes.
///
/// # Errors
/// [`StoreError::TooLarge`].
pub fn check_payload(what: &str, value: &str, limit: usize) -> Result<(), StoreError> {
    if value.len() > limit {
        return Err(StoreError::TooLarge {
            what: what.to_owned(),
            size: value.len(),
            limit,
        });
    }
    Ok(())
}

/// Who asks for a lease, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The coordinator's owner id.
    pub owner: String,
    /// Lease length.
    pub ttl: Duration,
}

/// A held lease. Every write carries it; the store rejects writes whose fence is not the
/// saga's current one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The saga.
    pub saga_id: SagaId,
    /// The holder.
    pub owner: String,
    /// The fencing token: strictly greater than every earlier token of this saga.
    pub fence: u64,
}

/// The result of [`SagaStore::create`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CreateOutcome {
    /// A new saga was stored; with a lease when one was asked for.
    Created {
        /// The lease, if the request asked to claim.
        lease: Option<Lease>,
    },
    /// A saga with this id (idempotency key) and the same fingerprint exists already.
    Existing {
        /// Its status.
        status: SagaStatus,
    },
}

/// A stored saga, as the store sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSaga {
    /// The saga id.
    pub id: SagaId,
    /// Registered type name.
    pub saga_type: String,
    /// Status (as of the last commit).
    pub status: SagaStatus,
    /// Encoded state.
    pub state: String,
    /// Request fingerprint.
    pub fingerprint: String,
    /// A cancel was requested.
    pub cancel_requested: bool,
    /// The current fencing token (0 before the first claim).
    pub fence: u64,
    /// The lease holder and expiry, while one holds an unexpired lease (`None` once it
    /// lapses, even before anyone else claims the saga).
    pub lease: Option<LeaseInfo>,
    /// When it is next due to run: for a held saga, when its lease expires; for an unheld one,
    /// when its timer runs out (now or earlier when it is due at once). Absent for terminal or
    /// quarantined sagas.
    pub due_at: Option<Timestamp>,
    /// Set aside with this reason (bad data); no worker claims it.
    pub quarantined: Option<String>,
    /// Last write (create, commit, cancel request or quarantine), in milliseconds since the
    /// Unix epoch by the store's clock.
    pub updated_at: Timestamp,
}

/// Who holds a lease, until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The holder.
    pub owner: String,
    /// When it lapses.
    pub expires_at: Timestamp,
}

/// The result of [`SagaStore::claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// The lease is ours.
    Claimed(Lease),
    /// Another owner holds an unexpired lease.
    Busy(LeaseInfo),
    /// The saga is terminal or quarantined: there is nothing to run.
    NotRunnable {
        /// Its status.
        status: SagaStatus,
        /// The quarantine reason, if quarantined.
        quarantined: Option<String>,
    },
}

/// When a saga is next due, as part of a commit. A terminal status goes with
/// [`Schedule::Finished`] and only with it; any other pairing is [`StoreError::Invalid`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Schedule {
    /// The holder keeps running it: the lease is extended by `ttl` from now.
    Continue {
        /// Lease length from now.
        ttl: Duration,
    },
    /// Release the lease; due again after this delay (a durable timer).
    WakeAfter(Duration),
    /// Release the lease to wait for a signal: due again after `timeout` (the wait's durable
    /// timer), or at once when the saga's inbox already holds more than `seen` signals (one
    /// arrived after the writer last read the inbox, so the wait must look again).
    AwaitSignal {
        /// How long until the wait times out.
        timeout: Duration,
        /// The highest signal sequence number the writer has read (0 for none).
        seen: u64,
    },
    /// Terminal: remove it from the due set and release the lease.
    Finished,
}

/// One atomic transition of a saga.
#[derive(Clone, Debug)]
pub struct Transition {
    /// Unique id of this transition. A store that already applied a transition with this id
    /// as the saga's latest one answers success without applying it again, so a commit whose
    /// reply was lost can be retried without duplicating events. This holds as long as the
    /// lease's fence is still current, also when the applied transition released the lease
    /// (`WakeAfter`) or finished the saga (`Finished`).
    pub commit_id: String,
    /// Encoded events to append, in order.
    pub events: Vec<String>,
    /// Encoded new state.
    pub state: String,
    /// The status in `state` (for indexes). Terminal if and only if `schedule` is
    /// [`Schedule::Finished`].
    pub status: SagaStatus,
    /// What happens to the lease and the due time.
    pub schedule: Schedule,
}

impl Transition {
    /// The size checks every store makes before writing: the state and each event within
    /// `max_payload` bytes.
    ///
    /// # Errors
    /// [`StoreError::TooLarge`].
    pub fn check_sizes(&self, max_payload: usize) -> Result<(), StoreError> {
        check_payload("saga state", &self.state, max_payload)?;
        for event in &self.events {
            check_payload("event", event, max_payload)?;
        }
        Ok(())
    }
}

/// What a commit tells the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CommitOutcome {
    /// A cancel is pending: stop running forward steps and compensate.
    pub cancel_requested: bool,
}

/// The result of [`SagaStore::request_cancel`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelOutcome {
    /// The flag is set (now or earlier) and the saga will compensate.
    Requested,
    /// The saga is already terminal.
    AlreadyFinished(SagaStatus),
}

/// The state of an idempotency record, as [`SagaStore::guard_claim`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuardClaim {
    /// The caller owns the key and must run the effect, then complete or release it.
    Claimed {
        /// Proof of ownership for complete/release.
        token: String,
    },
    /// The effect already ran; here is its encoded result.
    Completed {
        /// Encoded result.
        result: String,
    },
    /// Another caller is running the effect right now.
    InProgress,
    /// The key was used with a different request fingerprint.
    Conflict,
}

/// Filters for [`SagaStore::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this status.
    pub status: Option<SagaStatus>,
    /// Only this type.
    pub saga_type: Option<String>,
    /// At most this many rows per page (the store may cap it lower).
    pub limit: usize,
    /// Continue after this id (from the previous page's `next`).
    pub after: Option<SagaId>,
}

/// One row of a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaSummary {
    /// The saga id.
    pub id: SagaId,
    /// Registered type name.
    pub saga_type: String,
    /// Status.
    pub status: SagaStatus,
    /// Version of the workflow code it was started under; `None` only for a saga stored
    /// before stores kept the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Last write.
    pub updated_at: Timestamp,
    /// Quarantine reason, if set aside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
}

/// How many active (non-terminal) sagas of one type run under one workflow version, from
/// [`SagaStore::count_active_by_version`]. Quarantined sagas count under their status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionCount {
    /// Registered type name.
    pub saga_type: String,
    /// The workflow version; `None` for sagas stored before stores kept the version.
    pub version: Option<u32>,
    /// Sagas `Running`.
    pub running: u64,
    /// Sagas `Compensating`.
    pub compensating: u64,
}

impl VersionCount {
    /// Adds up tallies of `(type, version, status, sagas)` into one row per type and
    /// version, sorted by type then version (`None` first). Tallies of terminal statuses
    /// are ignored; a (type, version) seen only with them gets no row.
    pub fn tally(
        tallies: impl IntoIterator<Item = (String, Option<u32>, SagaStatus, u64)>,
    ) -> Vec<VersionCount> {
        let mut rows: BTreeMap<(String, Option<u32>), (u64, u64)> = BTreeMap::new();
        for (saga_type, version, status, sagas) in tallies {
            let counter = match status {
                SagaStatus::Running => 0,
                SagaStatus::Compensating => 1,
                _ => continue,
            };
            let row = rows.entry((saga_type, version)).or_default();
            let slot = if counter == 0 { &mut row.0 } else { &mut row.1 };
            *slot = slot.saturating_add(sagas);
        }
        rows.into_iter()
            .map(
                |((saga_type, version), (running, compensating))| VersionCount {
                    saga_type,
                    version,
                    running,
                    compensating,
                },
            )
            .collect()
    }
}

/// A page of a listing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    /// The rows, ordered by id.
    pub sagas: Vec<SagaSummary>,
    /// Pass as `after` for the next page; `None` at the end. A page may hold fewer than
    /// `limit` rows (even none) while `next` is `Some`: only `None` marks the end.
    pub next: Option<SagaId>,
}

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The writer's fencing token is stale: another coordinator owns the saga now. The writer
    /// must stop working on it and write nothing more.
    #[error(
        "saga {saga}: write fenced (lease token {fence} is no longer current, the saga is owned by {current_owner:?} with token {current_fence}); stop working on it"
    )]
    Fenced {
        /// The saga.
        saga: SagaId,
        /// The stale token.
        fence: u64,
        /// The current token.
        current_fence: u64,
        /// The current holder, if any.
        current_owner: Option<String>,
    },
    /// No saga with this id.
    #[error("saga {0} not found")]
    NotFound(SagaId),
    /// The idempotency key was already used with different content.
    #[error(
        "saga {saga}: idempotency key reused with a different request (type, version or input differ); use a new key for a new request"
    )]
    IdempotencyConflict {
        /// The saga the key belongs to.
        saga: SagaId,
    },
    /// The saga is terminal (or quarantined) and cannot take this write.
    #[error("saga {saga} is {status}; it accepts no further transitions")]
    NotWritable {
        /// The saga.
        saga: SagaId,
        /// Its status.
        status: SagaStatus,
    },
    /// A signal key was delivered before with a different payload.
    #[error(
        "saga {saga}: signal `{name}` with key `{key}` was delivered before with a different payload; use a new key for a new signal"
    )]
    SignalConflict {
        /// The saga.
        saga: SagaId,
        /// The signal's name.
        name: String,
        /// The reused key.
        key: String,
    },
    /// The saga's signal inbox holds [`MAX_SIGNALS_PER_SAGA`] signals already. Nothing was
    /// delivered.
    #[error(
        "saga {saga}: its signal inbox is full ({limit} signals); a saga takes at most that many signals in its life, so look for a sender in a loop"
    )]
    InboxFull {
        /// The saga.
        saga: SagaId,
        /// The limit.
        limit: usize,
    },
    /// A value is larger than the store accepts.
    #[error(
        "{what} is {size} bytes, over the store's limit of {limit} bytes; make step inputs and outputs smaller (store references, not documents)"
    )]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size.
        size: usize,
        /// The limit: the largest size the store accepts.
        limit: usize,
    },
    /// The stored data is not what the store expects (wrong type, bad field).
    #[error("saga {saga}: stored data is corrupt: {problem}")]
    Corrupt {
        /// The saga (or nil for store-wide data).
        saga: SagaId,
        /// What is wrong.
        problem: String,
    },
    /// The store could not be reached, did not answer in time, or answered with an error
    /// that goes away by itself (loading, busy, failing over, out of memory); the operation
    /// may or may not have been applied. [Transient](StoreError::is_transient). Retrying with the same arguments is safe for every saga
    /// operation: creates are keyed by id, commits by commit id, claims and renewals are
    /// fenced. (A retried `guard_claim` whose first reply was lost finds its own claim in
    /// progress until the in-progress TTL lapses.)
    #[error("store unavailable: {message}")]
    Unavailable {
        /// What happened.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The request itself is invalid.
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The store answered and refused the operation for a reason that retrying does not fix
    /// until someone changes its configuration: the credentials are wrong, or the user lacks
    /// a permission the store needs (Redis `NOPERM`, `WRONGPASS`, `NOAUTH`). Not
    /// [transient](StoreError::is_transient): callers fail at once instead of retrying.
    #[error("store refused the operation: {message}")]
    Refused {
        /// What was refused, and what to change.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl StoreError {
    /// `true` when retrying the same operation may succeed: only
    /// [`StoreError::Unavailable`] (a connection refused, reset or broken, a timeout, a server
    /// that is loading, busy, paused, failing over or out of memory). Every other error says
    /// something that a retry would only say again: a conflict, a fenced writer, an unknown
    /// saga, bad or oversized data, a refused permission.
    ///
    /// Out of memory counts as transient on purpose: memory comes back without anyone
    /// touching the configuration (retention purges terminal sagas), and a step whose
    /// idempotency guard meets a permanent store error fails for good and compensates,
    /// which a memory blip must not cause. Callers bound their retries (a deadline, an
    /// attempt count), so a lasting shortage still surfaces, with the server's message.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unavailable { .. } => true,
            StoreError::Fenced { .. }
            | StoreError::NotFound(_)
            | StoreError::IdempotencyConflict { .. }
            | StoreError::SignalConflict { .. }
            | StoreError::InboxFull { .. }
            | StoreError::NotWritable { .. }
            | StoreError::TooLarge { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Invalid(_)
            | StoreError::Refused { .. } => false,
        }
    }
}

/// The storage contract. Every operation is atomic; every saga write checks the fencing token
/// inside the same atomic operation.
///
/// Implementations: [`MemoryStore`] here, `saga_redis::RedisStore` for Redis. Check a new
/// implementation with the conformance suite: `saga_core::store_conformance_tests!` (feature
/// `testkit`; the cases are in `saga_core::testkit::conformance`).
#[async_trait]
pub trait SagaStore: Send + Sync + 'static {
    /// Creates a saga unless one with the same id exists. An existing saga with the same
    /// fingerprint is returned as [`CreateOutcome::Existing`] and left untouched (no state or
    /// events written, no lease taken even if `new.claim` asks); a different fingerprint is
    /// [`StoreError::IdempotencyConflict`]. A new saga is `Running` with fence 0 and due at
    /// once, or leased to `new.claim`'s owner (fence ≥ 1). No events is
    /// [`StoreError::Invalid`]; an oversized state or event is [`StoreError::TooLarge`];
    /// either way nothing is stored.
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError>;

    /// Loads a saga; `None` for an unknown (or purged) id.
    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError>;

    /// The whole encoded event history of a saga, oldest first, byte for byte as written.
    /// [`StoreError::NotFound`] for an unknown (or purged) id.
    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError>;

    /// Claims one saga for `request.owner`: succeeds when nobody holds an unexpired lease or
    /// when the holder is the same owner (a restarted process reclaiming its own sagas),
    /// whether or not the saga is due (a timer does not lock it). The fencing token is
    /// incremented either way. Another owner's unexpired lease is [`ClaimOutcome::Busy`] (and
    /// changes nothing); a terminal or quarantined saga is [`ClaimOutcome::NotRunnable`]; an
    /// unknown id is [`StoreError::NotFound`].
    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError>;

    /// Claims up to `limit` sagas that are due (durable timer passed, never started, released,
    /// cancel requested, or lease expired), oldest due time first, each with a new fence.
    /// Never returns a saga with an unexpired lease, a terminal or a quarantined one, nor one
    /// saga to two concurrent callers.
    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError>;

    /// Extends a held lease by `ttl` from now, and reports whether a cancel is pending.
    /// Checked like [`commit`](SagaStore::commit): a stale fence is [`StoreError::Fenced`], a
    /// terminal or quarantined saga [`StoreError::NotWritable`].
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<CommitOutcome, StoreError>;

    /// Gives a lease up; the saga is due again at once. Checked like
    /// [`commit`](SagaStore::commit): [`StoreError::Fenced`], [`StoreError::NotWritable`].
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Appends events, replaces the state and applies the schedule, all or nothing, if and
    /// only if `lease.fence` is the saga's current token and the saga is not terminal. The
    /// token is checked even if the lease has expired: an expired lease that nobody has
    /// claimed since still writes.
    ///
    /// Errors, each of which writes nothing: [`StoreError::Fenced`] (stale token),
    /// [`StoreError::NotWritable`] (terminal or quarantined saga, unless this is a
    /// retry of the latest applied `commit_id`), [`StoreError::Invalid`] (status and schedule
    /// do not go together), [`StoreError::TooLarge`], [`StoreError::NotFound`].
    async fn commit(
        &self,
        lease: &Lease,
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError>;

    /// Sets the saga's cancel flag and appends `event`; a saga that nobody holds becomes due
    /// at once (a held one keeps its lease). Needs no lease: the holder sees the flag in its
    /// next commit or renewal. Only the first request appends its event; later ones answer
    /// [`CancelOutcome::Requested`] and write nothing. A terminal saga answers
    /// [`CancelOutcome::AlreadyFinished`] and is not touched.
    async fn request_cancel(&self, id: SagaId, event: String) -> Result<CancelOutcome, StoreError>;

    /// Stores a signal in the saga's inbox and appends `delivery.event` to its history, in
    /// one atomic operation, unless the same name and key were delivered before (same
    /// payload: [`DeliveryOutcome::Duplicate`], nothing written; another payload:
    /// [`StoreError::SignalConflict`]). A saga that nobody holds becomes due at once (a held
    /// one keeps its lease: the holder reads the inbox, and a wait it commits with
    /// [`Schedule::AwaitSignal`] is made due at once by the store). Needs no lease, and
    /// works on a quarantined saga (kept for when it is released). A terminal saga answers
    /// [`DeliveryOutcome::AlreadyFinished`] and is not touched; an unknown one is
    /// [`StoreError::NotFound`]; an inbox already holding [`MAX_SIGNALS_PER_SAGA`] signals is
    /// [`StoreError::InboxFull`]; an oversized payload or event is [`StoreError::TooLarge`].
    ///
    /// The default answers [`StoreError::Invalid`]: a store that supports signals overrides
    /// it and [`signals`](Self::signals), and handles [`Schedule::AwaitSignal`].
    async fn deliver_signal(
        &self,
        id: SagaId,
        delivery: SignalDelivery,
    ) -> Result<DeliveryOutcome, StoreError> {
        let _ = (id, delivery);
        Err(StoreError::Invalid(
            "this store does not support signals".into(),
        ))
    }

    /// The saga's inbox, oldest first, with sequence numbers above `after` (0 for all).
    /// [`StoreError::NotFound`] for an unknown (or purged) id. Purging a saga removes its
    /// inbox.
    async fn signals(&self, id: SagaId, after: u64) -> Result<Vec<StoredSignal>, StoreError> {
        let _ = (id, after);
        Err(StoreError::Invalid(
            "this store does not support signals".into(),
        ))
    }

    /// Sets a saga aside with a reason: it leaves the due set, its lease is dropped (the
    /// former holder's writes are [`StoreError::NotWritable`]) and no worker claims it again
    /// until an operator acts. Its status and events are kept. Needs no lease, so that a saga
    /// whose state cannot be decoded can still be quarantined.
    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError>;

    /// Claims an idempotency key for running an effect. `in_progress_ttl` bounds how long a
    /// claim blocks others if its holder dies. A key whose record has expired is free again
    /// (for any fingerprint).
    async fn guard_claim(
        &self,
        key: &str,
        fingerprint: &str,
        in_progress_ttl: Duration,
    ) -> Result<GuardClaim, StoreError>;

    /// Records the effect's encoded result under a claimed key, kept for `ttl`. Fails with
    /// [`StoreError::Invalid`], recording nothing, when `token` does not own the key: a wrong
    /// token, or a claim that was released, already completed, or has lapsed
    /// (`in_progress_ttl` passed), whether or not someone else claimed the key since.
    async fn guard_complete(
        &self,
        key: &str,
        token: &str,
        result: &str,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Gives up a claimed key (the effect failed) so that a retry can claim it. Does nothing
    /// (and is no error) when `token` does not own an in-progress claim of the key; a
    /// completed result is never released.
    async fn guard_release(&self, key: &str, token: &str) -> Result<(), StoreError>;

    /// Lists sagas, ordered by id, filtered and paged: following `next` from `after = None`
    /// returns every matching saga exactly once. `after` need not be an existing id.
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError>;

    /// Counts sagas by status (every status present, zero included).
    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError>;

    /// Counts quarantined sagas (set aside for bad data; they also count under their status
    /// in [`count_by_status`](Self::count_by_status)). The default pages through
    /// [`list`](Self::list); stores override it with a cheap count.
    async fn count_quarantined(&self) -> Result<u64, StoreError> {
        let mut query = ListQuery {
            limit: 1000,
            ..ListQuery::default()
        };
        let mut count = 0;
        loop {
            let page = self.list(&query).await?;
            let quarantined = page
                .sagas
                .iter()
                .filter(|s| s.quarantined.is_some())
                .count();
            count += u64::try_from(quarantined).unwrap_or(u64::MAX);
            match page.next {
                Some(next) => query.after = Some(next),
                None => return Ok(count),
            }
        }
    }

    /// Counts the active sagas (`Running` and `Compensating`, quarantined ones included under
    /// their status) per type and workflow version, sorted by type then version; terminal
    /// sagas are not counted, and a type and version with no active saga has no row. The
    /// default pages through [`list`](Self::list) with a status filter; stores override it
    /// with a cheaper count.
    async fn count_active_by_version(&self) -> Result<Vec<VersionCount>, StoreError> {
        let mut tallies = Vec::new();
        for status in [SagaStatus::Running, SagaStatus::Compensating] {
            let mut query = ListQuery {
                status: Some(status),
                limit: 1000,
                ..ListQuery::default()
            };
            loop {
                let page = self.list(&query).await?;
                tallies.extend(
                    page.sagas
                        .into_iter()
                        .map(|s| (s.saga_type, s.version, s.status, 1)),
                );
                match page.next {
                    Some(next) => query.after = Some(next),
                    None => break,
                }
            }
        }
        Ok(VersionCount::tally(tallies))
    }

    /// Deletes up to `limit` terminal sagas last written at least `older_than` ago (so
    /// `Duration::ZERO` takes every terminal saga), with their histories: afterwards `load`
    /// answers `None` and `events` [`StoreError::NotFound`]. Never touches a non-terminal
    /// saga. Returns how many it deleted.
    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError>;

    /// An operator's transition, outside any lease: takes the saga from whoever holds it
    /// (the fencing token is incremented, so a running holder is fenced out and writes
    /// nothing more), checks that its status is one of `expected` (terminal statuses
    /// included, for retrying a `Failed` saga), then appends the events, replaces the state
    /// and applies the schedule (`WakeAfter(ZERO)` makes it due at once with no lease;
    /// `Finished` for a terminal status; `Continue` is invalid). A quarantined saga is
    /// released from quarantine when the transition makes it due again.
    ///
    /// Idempotent by `commit_id`: when it is the saga's latest applied commit id, the store
    /// answers success and writes nothing (no new fence either), so an operator command whose
    /// reply was lost can be retried. Errors, each of which writes nothing:
    /// [`StoreError::NotWritable`] (status not in `expected`), [`StoreError::Invalid`]
    /// (`Continue`, or a status and schedule that do not go together),
    /// [`StoreError::TooLarge`], [`StoreError::NotFound`].
    ///
    /// The default answers [`StoreError::Invalid`]: a store that supports operator commands
    /// (retry, abandon) overrides it.
    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        let _ = (id, expected, transition);
        Err(StoreError::Invalid(
            "this store does not support operator transitions".into(),
        ))
    }

    /// The backlog: how many sagas are due now and held by nobody (new, woken by their timer,
    /// released, lease lapsed), per partition of the store (one entry for a store without
    /// partitions), for the `saga_due_sagas` gauge that tells an operator whether workers
    /// keep up. `None` when the store cannot tell cheaply (the default).
    async fn due_backlog(&self) -> Result<Option<Vec<u64>>, StoreError> {
        Ok(None)
    }

    /// A signal that work may be waiting, for coordinators and waiters that would otherwise
    /// poll: the value changes (to any new value) whenever a saga becomes due without a timer
    /// (created without a lease, released, cancelled, reopened by an operator; a saga created
    /// with its creator's lease needs no coordinator), and whenever a saga reaches a
    /// terminal state unless the store reports those on [`SagaStore::saga_changes`] instead
    /// (coordinators do not need them: their own runs end locally). Spurious changes are
    /// allowed; `None` means the store has no signal and callers poll.
    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// The ids of sagas as they reach a terminal state or are changed by an operator, for
    /// callers that wait for one saga (`Engine::wait`) and should not re-read it whenever
    /// any other saga changes. Best effort: a receiver that lags (`RecvError::Lagged`) or
    /// whose store reconnected may have missed ids, so waiters also re-read now and then.
    /// `None` means the store has no such feed and callers use [`SagaStore::wakeups`] or poll.
    fn saga_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SagaId>> {
        None
    }
}
