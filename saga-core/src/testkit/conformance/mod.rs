//! The store conformance suite: one test per rule of the [`SagaStore`] contract, which every
//! store (memory, Redis standalone, Redis Cluster) must pass.
//!
//! Run it with [`store_conformance_tests!`](crate::store_conformance_tests) from a test file
//! of a crate that depends on `tokio` (with the `macros` and `rt-multi-thread` features):
//!
//! ```no_run
//! use std::sync::Arc;
//! use saga_core::MemoryStore;
//! use saga_core::store::DEFAULT_MAX_PAYLOAD;
//!
//! saga_core::store_conformance_tests! {
//!     // An expression giving a future of a FRESH, EMPTY store; evaluated anew for every
//!     // case (for Redis: a new key prefix).
//!     store: async { Arc::new(MemoryStore::new()) },
//!     // The largest state, event or idempotency result the store accepts, in bytes.
//!     max_payload: DEFAULT_MAX_PAYLOAD,
//! }
//! ```
//!
//! Each case is also a public `async fn` here, taking the store (and, for the size cases, its
//! payload limit), so a store's own tests can call one directly. A case panics with a message
//! that names the broken rule.
//!
//! # Time
//!
//! The suite runs against the store's own clock (for Redis: the server's), in real time: it
//! never pauses or advances time. Lease, timer and record expiry cases use short durations
//! (about 200 ms) and then poll for the expected outcome with [`wait_for`], for at most
//! [`WAIT_BOUND`]; nothing depends on how fast the machine is, and a negative assertion is
//! only ever made against a long duration (an hour). The whole suite takes about a second
//! with the memory store; do not run it under `tokio::time::pause`.

// Test code: a failed `unwrap`/`expect` is a failed conformance case, with the store's error
// in the panic message, which is what a test should report.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Every case takes the store as `Arc<dyn SagaStore>` by value so that the macro can call them
// all the same way, and the concurrency cases need an owned `Arc` to clone into tasks.
#![allow(clippy::needless_pass_by_value)]

mod cancel;
mod commit;
mod concurrency;
mod create;
mod guard;
mod lease;
mod limits;
mod listing;
mod operator;
mod signals;
mod versions;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use cancel::*;
pub use commit::*;
pub use concurrency::*;
pub use create::*;
pub use guard::*;
pub use lease::*;
pub use limits::*;
pub use listing::*;
pub use operator::*;
pub use signals::*;
pub use versions::*;

use crate::store::{
    ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, Lease, NewSaga, SagaStore, Schedule,
    StoredSaga, Transition,
};
use crate::{SagaId, SagaStatus, Timestamp};

/// How long [`wait_for`] polls before it gives up. Generous: the durations it waits out are
/// about 200 ms.
pub const WAIT_BOUND: Duration = Duration::from_secs(10);

/// How long one case may run before the macro's test fails it (a store call that hangs).
pub const CASE_BOUND: Duration = Duration::from_secs(120);

/// Pause between two polls of [`wait_for`].
const POLL_PAUSE: Duration = Duration::from_millis(10);

/// A lease, timer or record duration that the suite waits out by polling.
const SHORT: Duration = Duration::from_millis(200);

/// A lease, timer or record duration that never runs out during a case.
const LONG: Duration = Duration::from_secs(3600);

/// Slack for comparing two timestamps the store computed in one operation (e.g. a due time
/// and the write time it was computed from). Not a timing assertion: both come from the
/// store's clock, read once per operation.
const SLACK_MS: u64 = 1_000;

/// 2020-01-01T00:00:00Z in milliseconds: every store timestamp must be later (timestamps are
/// milliseconds since the Unix epoch, from a real clock).
const Y2020: Timestamp = Timestamp(1_577_836_800_000);

/// A saga type with characters that must not leak raw into key names.
const SAGA_TYPE: &str = "conformance {type}:ü/1";

/// Polls `poll` until it returns `Some`, pausing briefly between polls, for at most `bound`;
/// returns the value. Panics, naming `what`, when the bound passes: use it to wait for a
/// condition (a lease or timer that runs out), never for a fixed time.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use std::time::Duration;
/// # use saga_core::store::{ClaimOutcome, ClaimRequest};
/// # use saga_core::testkit::conformance::wait_for;
/// # async fn demo(store: Arc<dyn saga_core::SagaStore>, id: saga_core::SagaId, request: ClaimRequest) {
/// let lease = wait_for("the expired lease to be claimable", Duration::from_secs(10), async || {
///     match store.claim(id, &request).await.unwrap() {
///         ClaimOutcome::Claimed(lease) => Some(lease),
///         _ => None,
///     }
/// })
/// .await;
/// # }
/// ```
pub async fn wait_for<T>(
    what: &str,
    bound: Duration,
    mut poll: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(value) = poll().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_PAUSE).await;
    }
}

/// Runs one case under [`CASE_BOUND`]; used by
/// [`store_conformance_tests!`](crate::store_conformance_tests).
pub async fn run_case(name: &str, case: impl Future<Output = ()>) {
    if tokio::time::timeout(CASE_BOUND, case).await.is_err() {
        panic!(
            "conformance case `{name}` did not finish within {CASE_BOUND:?}: a store call hangs"
        );
    }
}

/// Expands to one `#[tokio::test]` (multi-thread runtime, 2 workers) per case of the store
/// conformance suite ([`testkit::conformance`](crate::testkit::conformance)), each named after
/// its case.
///
/// `store` is an expression whose value is a future of a **fresh, empty** store (anything
/// that coerces to `Arc<dyn SagaStore>`); it is evaluated anew in every test, inside that
/// test's runtime. `max_payload` is the largest state, event or idempotency result (in bytes)
/// the store accepts; it defaults to [`DEFAULT_MAX_PAYLOAD`](crate::store::DEFAULT_MAX_PAYLOAD).
///
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
///
/// ```no_run
/// saga_core::store_conformance_tests! {
///     store: async { std::sync::Arc::new(saga_core::MemoryStore::new()) },
///     max_payload: saga_core::store::DEFAULT_MAX_PAYLOAD,
/// }
/// // or, with the default payload limit and a factory function:
/// saga_core::store_conformance_tests!(fresh_store());
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    (store: $store:expr, max_payload: $max:expr $(,)?) => {
        $crate::__store_conformance_cases! {
            store: ($store),
            max_payload: ($max),
            cases: [
                create_and_load_round_trip,
                create_again_with_same_fingerprint_returns_existing,
                create_with_different_fingerprint_conflicts,
                create_with_claim_leases_it,
                create_without_events_is_invalid,
                events_of_unknown_id_is_not_found,
                writes_to_unknown_id_are_not_found,
                claim_unknown_id_is_not_found,
                claim_while_held_is_busy,
                same_owner_reclaim_fences_the_old_token,
                claim_after_lease_expiry_gets_a_higher_fence,
                claim_of_finished_or_quarantined_saga_is_not_runnable,
                claim_due_returns_due_sagas_oldest_first,
                claim_due_picks_up_expired_leases,
                renew_extends_the_lease,
                renew_with_stale_fence_is_fenced,
                release_makes_the_saga_due_at_once,
                commit_appends_events_and_replaces_state,
                commit_with_stale_fence_writes_nothing,
                commit_retried_with_same_id_applies_once,
                commit_to_finished_saga_is_not_writable,
                commit_continue_extends_the_lease,
                commit_wake_after_releases_the_lease_until_due,
                commit_finished_ends_the_saga,
                commit_with_mismatched_status_and_schedule_is_invalid,
                request_cancel_sets_the_flag_and_reaches_the_holder,
                request_cancel_on_unheld_saga_makes_it_due,
                request_cancel_twice_appends_one_event,
                request_cancel_on_finished_saga_is_already_finished,
                quarantine_sets_the_saga_aside,
                guard_claim_in_progress_and_conflict,
                guard_complete_records_the_result,
                guard_complete_with_wrong_token_fails,
                guard_release_makes_the_key_claimable,
                guard_in_progress_claim_expires,
                guard_claim_expired_without_takeover_cannot_complete,
                guard_completed_record_expires,
                list_filters_and_pages,
                count_by_status_counts_every_status,
                count_quarantined_counts_the_sagas_set_aside,
                count_active_by_version_counts_running_and_compensating,
                purge_deletes_only_finished_sagas,
                purge_respects_the_retention_period,
                concurrent_claims_have_one_winner,
                concurrent_commits_land_only_with_the_current_fence,
                commits_racing_a_reclaim_never_land_after_it,
                concurrent_claim_due_claims_each_saga_once,
                concurrent_creates_with_one_key_create_once,
                concurrent_cancels_append_one_event,
                operator_transition_fences_out_the_holder,
                operator_transition_with_unexpected_status_writes_nothing,
                operator_transition_reopens_a_failed_saga,
                operator_transition_finishes_a_running_saga,
                operator_transition_releases_quarantine_when_making_due,
                operator_transition_rejects_continue_and_mismatched_schedules,
                operator_transition_retried_with_same_id_applies_once,
                wakeups_signal_new_work_and_finished_sagas,
                deliver_signal_stores_each_key_once,
                deliver_signal_makes_an_unheld_saga_due,
                deliver_signal_leaves_a_held_saga_with_its_holder,
                await_signal_ends_with_a_signal_or_the_timeout,
                deliver_signal_to_finished_or_unknown_saga,
                signals_of_quarantined_and_purged_sagas,
                signal_inbox_is_bounded,
            ],
            sized_cases: [
                oversized_create_is_rejected,
                oversized_commit_is_rejected,
                oversized_cancel_event_and_guard_result_are_rejected,
                payloads_at_the_limit_are_accepted,
            ],
        }
    };
    ($store:expr $(,)?) => {
        $crate::store_conformance_tests! {
            store: $store,
            max_payload: $crate::store::DEFAULT_MAX_PAYLOAD,
        }
    };
}

/// The expansion of [`store_conformance_tests!`](crate::store_conformance_tests). Not a
/// public API.
#[doc(hidden)]
#[macro_export]
macro_rules! __store_conformance_cases {
    (
        store: ($store:expr),
        max_payload: ($max:expr),
        cases: [$($case:ident),* $(,)?],
        sized_cases: [$($sized:ident),* $(,)?] $(,)?
    ) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let store: ::std::sync::Arc<dyn $crate::store::SagaStore> = $store.await;
                $crate::testkit::conformance::run_case(
                    ::std::stringify!($case),
                    $crate::testkit::conformance::$case(store),
                )
                .await;
            }
        )*
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $sized() {
                let store: ::std::sync::Arc<dyn $crate::store::SagaStore> = $store.await;
                $crate::testkit::conformance::run_case(
                    ::std::stringify!($sized),
                    $crate::testkit::conformance::$sized(store, $max),
                )
                .await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------
// Fixtures shared by the cases.

/// `prefix` plus a random suffix, for keys and owners that must not collide.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

/// A claim for `owner` with a lease that does not run out during a case.
fn owner(name: &str) -> ClaimRequest {
    ClaimRequest {
        owner: name.to_owned(),
        ttl: LONG,
    }
}

/// An opaque encoded state (the store must not interpret it).
fn state(n: u32) -> String {
    format!(r#"{{"n":{n}}}"#)
}

/// An opaque encoded event.
fn event(label: &str) -> String {
    format!(r#"{{"event":"{label}"}}"#)
}

/// A new running saga of [`SAGA_TYPE`] with a random id, one event and no claim.
fn new_saga() -> NewSaga {
    NewSaga {
        id: SagaId::random(),
        saga_type: SAGA_TYPE.to_owned(),
        version: 1,
        idempotency_key: None,
        fingerprint: "fingerprint-1".to_owned(),
        state: state(0),
        events: vec![event("started")],
        claim: None,
    }
}

/// A transition.
fn step(
    commit_id: &str,
    events: &[String],
    state: String,
    status: SagaStatus,
    schedule: Schedule,
) -> Transition {
    Transition {
        commit_id: commit_id.to_owned(),
        events: events.to_vec(),
        state,
        status,
        schedule,
    }
}

/// A running step that keeps the lease.
fn keep_running(commit_id: &str, label: &str, n: u32) -> Transition {
    step(
        commit_id,
        &[event(label)],
        state(n),
        SagaStatus::Running,
        Schedule::Continue { ttl: LONG },
    )
}

/// Creates `new`, which must be new; returns its lease if it asked for one.
async fn create(store: &dyn SagaStore, new: NewSaga) -> Option<Lease> {
    let id = new.id;
    match store.create(new).await {
        Ok(CreateOutcome::Created { lease }) => lease,
        other => panic!("create of new saga {id} must answer Created, got {other:?}"),
    }
}

/// Creates a fresh running saga (due at once, nobody holds it).
async fn create_saga(store: &dyn SagaStore) -> SagaId {
    let new = new_saga();
    let id = new.id;
    create(store, new).await;
    id
}

/// Claims `id`, which must succeed.
async fn claimed(store: &dyn SagaStore, id: SagaId, request: &ClaimRequest) -> Lease {
    match store.claim(id, request).await {
        Ok(ClaimOutcome::Claimed(lease)) => {
            assert_eq!(
                lease.saga_id, id,
                "a claim's lease must name the claimed saga"
            );
            assert_eq!(
                lease.owner, request.owner,
                "a claim's lease must name the claiming owner"
            );
            lease
        }
        other => panic!(
            "claim of saga {id} by {} must succeed, got {other:?}",
            request.owner
        ),
    }
}

/// Commits, which must succeed.
async fn commit_ok(store: &dyn SagaStore, lease: &Lease, transition: Transition) -> CommitOutcome {
    let what = format!("{:?}/{:?}", transition.status, transition.schedule);
    match store.commit(lease, transition).await {
        Ok(outcome) => outcome,
        Err(err) => panic!(
            "commit ({what}) of saga {} with the current fence {} must succeed, got {err:?}",
            lease.saga_id, lease.fence
        ),
    }
}

/// Loads a saga that must exist.
async fn load(store: &dyn SagaStore, id: SagaId) -> StoredSaga {
    match store.load(id).await {
        Ok(Some(saga)) => saga,
        other => panic!("load of existing saga {id} must return it, got {other:?}"),
    }
}

/// The events of a saga that must exist.
async fn events(store: &dyn SagaStore, id: SagaId) -> Vec<String> {
    match store.events(id).await {
        Ok(events) => events,
        Err(err) => panic!("events of existing saga {id} must be readable, got {err:?}"),
    }
}

/// Claims due sagas, which must not fail.
async fn claim_due(store: &dyn SagaStore, request: &ClaimRequest, limit: usize) -> Vec<Lease> {
    let leases = store.claim_due(request, limit).await.unwrap();
    assert!(
        leases.len() <= limit,
        "claim_due({limit}) returned {} leases",
        leases.len()
    );
    for lease in &leases {
        assert_eq!(
            lease.owner, request.owner,
            "claim_due must lease to the asking owner"
        );
        assert!(
            lease.fence >= 1,
            "a claimed lease must have a fence of at least 1: {lease:?}"
        );
    }
    leases
}

/// Creates a saga of `saga_type` and brings it to `status`: a running one is left due and
/// unheld; a compensating one is due at once, unheld; a terminal one is finished.
async fn create_in_status(store: &dyn SagaStore, saga_type: &str, status: SagaStatus) -> SagaId {
    create_versioned(store, saga_type, 1, status).await
}

/// [`create_in_status`] for a saga started under workflow `version`.
async fn create_versioned(
    store: &dyn SagaStore,
    saga_type: &str,
    version: u32,
    status: SagaStatus,
) -> SagaId {
    let new = NewSaga {
        saga_type: saga_type.to_owned(),
        version,
        ..new_saga()
    };
    let id = new.id;
    create(store, new).await;
    if status == SagaStatus::Running {
        return id;
    }
    let lease = claimed(store, id, &owner("setup")).await;
    let schedule = if status.is_terminal() {
        Schedule::Finished
    } else {
        Schedule::WakeAfter(Duration::ZERO)
    };
    commit_ok(
        store,
        &lease,
        step(
            "to-status",
            &[event(status.as_str())],
            state(1),
            status,
            schedule,
        ),
    )
    .await;
    id
}

/// Creates a saga and finishes it as `Completed`; returns the lease that finished it.
async fn create_finished(store: &dyn SagaStore) -> Lease {
    let id = create_saga(store).await;
    let lease = claimed(store, id, &owner("finisher")).await;
    let done = step(
        "finish",
        &[event("completed")],
        state(9),
        SagaStatus::Completed,
        Schedule::Finished,
    );
    commit_ok(store, &lease, done).await;
    lease
}

/// `true` when two store timestamps computed in one operation are within [`SLACK_MS`].
fn close_to(actual: Timestamp, expected: Timestamp) -> bool {
    actual.0.abs_diff(expected.0) <= SLACK_MS
}

/// Reads the store's clock (for Redis: the server's) through a probe saga that it holds:
/// renewing a lease sets its expiry to the store's "now" plus the ttl. The probe is leased
/// for an hour, so it never shows up in `claim_due`.
struct StoreClock {
    store: Arc<dyn SagaStore>,
    lease: Lease,
}

impl StoreClock {
    async fn new(store: &Arc<dyn SagaStore>) -> Self {
        let new = NewSaga {
            saga_type: "conformance clock probe".to_owned(),
            version: 1,
            claim: Some(owner("clock-probe")),
            ..new_saga()
        };
        let lease = create(&**store, new)
            .await
            .expect("a create with claim returns a lease");
        Self {
            store: Arc::clone(store),
            lease,
        }
    }

    async fn now(&self) -> Timestamp {
        self.store.renew(&self.lease, LONG).await.unwrap();
        let saga = load(&*self.store, self.lease.saga_id).await;
        let expires = saga.lease.expect("a renewed lease is held").expires_at;
        Timestamp(
            expires
                .0
                .saturating_sub(u64::try_from(LONG.as_millis()).unwrap()),
        )
    }
}
