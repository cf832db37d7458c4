//! Clients that ride out store blips (issue 8, item 6): `Engine::start` and `Engine::wait`
//! retry transient store errors within their bound, a retried start never makes a second
//! saga (also when the store applied the create and only its reply was lost, and on the
//! local fast path), errors that a retry cannot fix fail at once, and `RetryingStore` makes
//! operator commands safe to retry.
//!
//! The blips come from `FlakyStore`, a wrapper over a `MemoryStore` that fails chosen calls
//! before they reach the store, or after (the store applied them, the reply is lost). Time
//! is tokio's paused clock, so a 30 s retry bound passes at once and exactly.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use saga_core::store::{
    CancelOutcome, ClaimOutcome, ClaimRequest, CommitOutcome, CreateOutcome, GuardClaim, Lease,
    ListPage, ListQuery, NewSaga, StoredSaga, Transition,
};
use saga_core::{
    ClientRetry, Coordinator, DEFAULT_CLIENT_RETRY_FOR, Engine, EngineError, MemoryStore,
    RetryPolicy, RetryingStore, Saga, SagaContext, SagaError, SagaId, SagaStatus, SagaStore,
    StartOptions, StoreError,
};
use saga_tests::count;
use tokio::time::Instant;

/// A saga without steps: it completes as soon as someone runs it.
struct Echo;

impl Saga for Echo {
    type Input = u32;
    type Output = u32;
    const NAME: &'static str = "echo";

    async fn run(&self, _saga: &mut SagaContext, input: u32) -> Result<u32, SagaError> {
        Ok(input)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    Create,
    Load,
    Claim,
    ClaimDue,
    RequestCancel,
    OperatorTransition,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Fails before the store sees the call.
    Before,
    /// The store applies the call; its reply is lost.
    After,
    /// The store refuses the call (a missing permission).
    Refuse,
}

/// A `MemoryStore` whose chosen calls fail: the next n calls of an operation with given
/// faults, or every call of an operation while it is down. Counts calls and records the ids
/// that `create` was asked for.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    faults: Mutex<HashMap<Op, VecDeque<Fault>>>,
    down: Mutex<HashSet<Op>>,
    calls: Mutex<HashMap<Op, usize>>,
    /// Per create call: the id, and whether it asked for the creator's lease.
    created_ids: Mutex<Vec<(SagaId, bool)>>,
}

fn unavailable(message: &str) -> StoreError {
    StoreError::Unavailable {
        message: message.to_owned(),
        source: None,
    }
}

impl FlakyStore {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn fail(&self, op: Op, faults: impl IntoIterator<Item = Fault>) {
        self.faults
            .lock()
            .unwrap()
            .entry(op)
            .or_default()
            .extend(faults);
    }

    fn set_down(&self, op: Op, down: bool) {
        let mut set = self.down.lock().unwrap();
        if down {
            set.insert(op);
        } else {
            set.remove(&op);
        }
    }

    fn calls(&self, op: Op) -> usize {
        self.calls.lock().unwrap().get(&op).copied().unwrap_or(0)
    }

    fn faults_left(&self, op: Op) -> usize {
        self.faults
            .lock()
            .unwrap()
            .get(&op)
            .map_or(0, VecDeque::len)
    }

    async fn total_sagas(&self) -> u64 {
        self.inner.count_by_status().await.unwrap().values().sum()
    }

    async fn guarded<T>(
        &self,
        op: Op,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        *self.calls.lock().unwrap().entry(op).or_default() += 1;
        if self.down.lock().unwrap().contains(&op) {
            return Err(unavailable("injected: connection refused"));
        }
        let fault = self
            .faults
            .lock()
            .unwrap()
            .get_mut(&op)
            .and_then(VecDeque::pop_front);
        match fault {
            None => call.await,
            Some(Fault::Before) => Err(unavailable("injected: broken pipe")),
            Some(Fault::After) => {
                call.await?;
                Err(unavailable("injected: the reply was lost"))
            }
            Some(Fault::Refuse) => Err(StoreError::Refused {
                message: "injected: NOPERM this user has no permissions".into(),
                source: None,
            }),
        }
    }
}

#[async_trait]
impl SagaStore for FlakyStore {
    async fn create(&self, new: NewSaga) -> Result<CreateOutcome, StoreError> {
        self.created_ids
            .lock()
            .unwrap()
            .push((new.id, new.claim.is_some()));
        self.guarded(Op::Create, self.inner.create(new)).await
    }

    async fn load(&self, id: SagaId) -> Result<Option<StoredSaga>, StoreError> {
        self.guarded(Op::Load, self.inner.load(id)).await
    }

    async fn events(&self, id: SagaId) -> Result<Vec<String>, StoreError> {
        self.inner.events(id).await
    }

    async fn claim(&self, id: SagaId, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.guarded(Op::Claim, self.inner.claim(id, request)).await
    }

    async fn claim_due(
        &self,
        request: &ClaimRequest,
        limit: usize,
    ) -> Result<Vec<Lease>, StoreError> {
        self.guarded(Op::ClaimDue, self.inner.claim_due(request, limit))
            .await
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
        self.guarded(Op::RequestCancel, self.inner.request_cancel(id, event))
            .await
    }

    async fn deliver_signal(
        &self,
        id: SagaId,
        delivery: saga_core::store::SignalDelivery,
    ) -> Result<saga_core::store::DeliveryOutcome, StoreError> {
        self.inner.deliver_signal(id, delivery).await
    }

    async fn signals(
        &self,
        id: SagaId,
        after: u64,
    ) -> Result<Vec<saga_core::store::StoredSignal>, StoreError> {
        self.inner.signals(id, after).await
    }

    async fn quarantine(&self, id: SagaId, reason: &str) -> Result<(), StoreError> {
        self.inner.quarantine(id, reason).await
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
        self.inner.list(query).await
    }

    async fn count_by_status(&self) -> Result<BTreeMap<SagaStatus, u64>, StoreError> {
        self.inner.count_by_status().await
    }

    async fn purge(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        self.inner.purge(older_than, limit).await
    }

    async fn operator_transition(
        &self,
        id: SagaId,
        expected: &[SagaStatus],
        transition: Transition,
    ) -> Result<CommitOutcome, StoreError> {
        self.guarded(
            Op::OperatorTransition,
            self.inner.operator_transition(id, expected, transition),
        )
        .await
    }

    fn wakeups(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.wakeups()
    }

    fn saga_changes(&self) -> Option<tokio::sync::broadcast::Receiver<SagaId>> {
        self.inner.saga_changes()
    }
}

fn engine(store: &Arc<FlakyStore>) -> Engine {
    Engine::builder_shared(Arc::clone(store) as Arc<dyn SagaStore>)
        .register(Echo)
        .owner("client")
        .build()
        .unwrap()
}

/// An engine that runs sagas, on the store behind the faults.
fn runner(store: &Arc<FlakyStore>) -> Engine {
    Engine::builder(store.inner.clone())
        .register(Echo)
        .owner("runner")
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_keyless_start_retries_with_the_id_it_drew_once() {
    let store = FlakyStore::new();
    store.fail(Op::Create, [Fault::Before; 3]);
    let started = engine(&store)
        .start_with::<Echo>(&1, StartOptions::default())
        .await
        .unwrap();
    assert!(started.created);
    assert_eq!(
        store.calls(Op::Create),
        4,
        "three failures, then the create"
    );
    let ids = store.created_ids.lock().unwrap().clone();
    assert!(ids.iter().all(|(id, _)| *id == started.id), "{ids:?}");
    assert_eq!(store.total_sagas().await, 1);
}

#[tokio::test(start_paused = true)]
async fn a_keyless_start_whose_create_reply_was_lost_is_one_saga() {
    let store = FlakyStore::new();
    store.fail(Op::Create, [Fault::After]);
    let client = engine(&store);
    let started = client
        .start_with::<Echo>(&2, StartOptions::default())
        .await
        .unwrap();
    // The retry found the saga its lost attempt stored: nobody else knows a random id.
    assert!(started.created, "documented: created is true without a key");
    assert_eq!(store.calls(Op::Create), 2);
    assert_eq!(store.total_sagas().await, 1, "no second saga");
    let history = client.history(started.id).await.unwrap();
    assert_eq!(count(&history, "SagaStarted"), 1);
    // And it is the saga that runs.
    let outcome = runner(&store).run_to_end(started.id).await.unwrap();
    assert_eq!(outcome.output::<u32>().unwrap(), Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_keyed_start_whose_create_reply_was_lost_is_one_saga() {
    let store = FlakyStore::new();
    store.fail(Op::Create, [Fault::After]);
    let client = engine(&store);
    let started = client
        .start_with::<Echo>(&3, StartOptions::key("order-3"))
        .await
        .unwrap();
    assert_eq!(started.id, SagaId::from_idempotency_key("echo", "order-3"));
    // The retry cannot tell its own lost create from another caller's.
    assert!(!started.created, "documented: created is false with a key");
    assert_eq!(store.total_sagas().await, 1);
    // A repeat of the start is the same saga, and a different input is still a conflict.
    let again = client
        .start_with::<Echo>(&3, StartOptions::key("order-3"))
        .await
        .unwrap();
    assert_eq!((again.id, again.created), (started.id, false));
    let conflict = client
        .start_with::<Echo>(&4, StartOptions::key("order-3"))
        .await
        .unwrap_err();
    assert!(
        matches!(conflict, EngineError::IdempotencyConflict { .. }),
        "{conflict:?}"
    );
    assert_eq!(store.total_sagas().await, 1);
}

#[tokio::test(start_paused = true)]
async fn a_start_gives_up_with_the_last_error_at_its_bound() {
    let store = FlakyStore::new();
    store.set_down(Op::Create, true);
    let began = Instant::now();
    let err = engine(&store)
        .start_with::<Echo>(&5, StartOptions::default())
        .await
        .unwrap_err();
    let waited = began.elapsed();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("connection refused"), "{err}");
    assert!(
        store.calls(Op::Create) > 5,
        "{} calls",
        store.calls(Op::Create)
    );
    // On the paused clock: the last attempt is made at the bound, not before and not later.
    assert!(
        waited >= DEFAULT_CLIENT_RETRY_FOR
            && waited < DEFAULT_CLIENT_RETRY_FOR + Duration::from_secs(1),
        "{waited:?}"
    );
    assert_eq!(store.total_sagas().await, 0);
}

#[tokio::test(start_paused = true)]
async fn errors_a_retry_cannot_fix_fail_at_once() {
    let store = FlakyStore::new();
    store.fail(Op::Create, [Fault::Refuse]);
    let err = engine(&store)
        .start_with::<Echo>(&6, StartOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EngineError::Store(StoreError::Refused { .. })),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert_eq!(store.calls(Op::Create), 1);
}

#[tokio::test(start_paused = true)]
async fn a_no_retry_client_policy_fails_at_the_first_error() {
    let store = FlakyStore::new();
    store.fail(Op::Create, [Fault::Before]);
    let client = Engine::builder_shared(Arc::clone(&store) as Arc<dyn SagaStore>)
        .register(Echo)
        .client_retry(RetryPolicy::no_retry())
        .build()
        .unwrap();
    let err = client
        .start_with::<Echo>(&7, StartOptions::default())
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(store.calls(Op::Create), 1);
}

#[tokio::test(start_paused = true)]
async fn wait_rides_out_a_store_blip() {
    let store = FlakyStore::new();
    let client = engine(&store);
    let id = client
        .start_with::<Echo>(&8, StartOptions::default())
        .await
        .unwrap()
        .id;
    // The store is away for the first eight reads of the wait; another process runs the saga.
    store.fail(Op::Load, [Fault::Before; 8]);
    let run = tokio::spawn({
        let runner = runner(&store);
        async move { runner.run_to_end(id).await }
    });
    let outcome = client.wait(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    assert_eq!(outcome.output::<u32>().unwrap(), Some(8));
    assert_eq!(store.faults_left(Op::Load), 0, "the blip was met");
    assert!(store.calls(Op::Load) > 8);
    run.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn wait_gives_up_with_the_store_error_at_its_deadline() {
    let store = FlakyStore::new();
    let client = engine(&store);
    let id = client
        .start_with::<Echo>(&9, StartOptions::default())
        .await
        .unwrap()
        .id;
    store.set_down(Op::Load, true);
    let began = Instant::now();
    let err = client.wait(id, Duration::from_secs(5)).await.unwrap_err();
    let waited = began.elapsed();
    // Not "timed out with status X": the status is unknown, and the store error says why.
    assert!(
        matches!(err, EngineError::Store(StoreError::Unavailable { .. })),
        "{err:?}"
    );
    assert!(store.calls(Op::Load) > 2);
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    // Back up: the same wait succeeds once the saga ran.
    store.set_down(Op::Load, false);
    runner(&store).run_to_end(id).await.unwrap();
    let outcome = client.wait(id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
}

/// The local fast path: the create (with this engine's lease) is applied but its reply lost,
/// and the claim that settles it fails twice. The saga still runs here at once: with a
/// one-hour lease, waiting for the lease to lapse would outlast the wait.
#[tokio::test(start_paused = true)]
async fn a_local_start_whose_create_reply_was_lost_runs_here() {
    let store = FlakyStore::new();
    let local = Engine::builder_shared(Arc::clone(&store) as Arc<dyn SagaStore>)
        .register(Echo)
        .owner("local")
        .lease_ttl(Duration::from_secs(3600))
        .build()
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(Coordinator::new(local.clone()).workers(2).run(async {
        let _ = stopped.await;
    }));
    // The coordinator registers its workers for local starts before it first claims.
    saga_tests::until("the coordinator claims", 1000, || {
        store.calls(Op::ClaimDue) > 0
    })
    .await;
    store.fail(Op::Create, [Fault::After]);
    store.fail(Op::Claim, [Fault::Before, Fault::Before]);
    let started = local
        .start_with::<Echo>(&10, StartOptions::default())
        .await
        .unwrap();
    assert!(started.created);
    let outcome = local
        .wait(started.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let creates = store.created_ids.lock().unwrap().clone();
    assert_eq!(
        creates,
        vec![(started.id, true); 2],
        "both creates asked for our lease"
    );
    assert_eq!(store.calls(Op::Claim), 3, "two failed claims, then ours");
    assert_eq!(store.total_sagas().await, 1);
    let history = local.history(started.id).await.unwrap();
    assert_eq!(count(&history, "SagaStarted"), 1);
    assert_eq!(count(&history, "SagaCompleted"), 1);
    let _ = stop.send(());
    coordinator.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn operator_commands_through_a_retrying_store_apply_once() {
    let store = FlakyStore::new();
    let plain = engine(&store);
    let id = plain
        .start_with::<Echo>(&11, StartOptions::default())
        .await
        .unwrap()
        .id;
    let retrying = RetryingStore::new(
        Arc::clone(&store) as Arc<dyn SagaStore>,
        ClientRetry::new(RetryPolicy::client_default()),
    );
    let operator = Engine::builder(retrying).owner("operator").build().unwrap();

    // A cancel whose reply is lost: the retry finds the flag set and writes nothing more.
    store.fail(Op::RequestCancel, [Fault::After, Fault::Before]);
    assert_eq!(
        operator.cancel(id, "blip test").await.unwrap(),
        CancelOutcome::Requested
    );
    assert_eq!(store.calls(Op::RequestCancel), 3);
    let history = operator.history(id).await.unwrap();
    assert_eq!(count(&history, "CancelRequested"), 1);

    // An abandon whose reply is lost: the store recognises the retried commit id, so the
    // command succeeds instead of finding the saga already ended.
    store.fail(Op::OperatorTransition, [Fault::After]);
    store.fail(Op::Load, [Fault::Before]);
    operator.abandon(id, "blip test").await.unwrap();
    assert_eq!(store.calls(Op::OperatorTransition), 2);
    let history = operator.history(id).await.unwrap();
    assert_eq!(count(&history, "SagaAbandoned"), 1);
    assert_eq!(
        operator.outcome(id).await.unwrap().status,
        SagaStatus::Failed
    );

    // Without the wrapper the same lost reply is an error for the operator.
    let other = plain
        .start_with::<Echo>(&12, StartOptions::default())
        .await
        .unwrap()
        .id;
    store.fail(Op::OperatorTransition, [Fault::After]);
    let err = plain.abandon(other, "no retry").await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_retrying_store_fails_at_once_on_a_refusal_and_stops_at_its_deadline() {
    let store = FlakyStore::new();
    let id = engine(&store)
        .start_with::<Echo>(&13, StartOptions::default())
        .await
        .unwrap()
        .id;
    let notices = Arc::new(Mutex::new(Vec::new()));
    let retry = ClientRetry::new(RetryPolicy::client_default())
        .until(Instant::now() + Duration::from_secs(3))
        .on_retry({
            let notices = Arc::clone(&notices);
            move |notice| {
                notices
                    .lock()
                    .unwrap()
                    .push((notice.operation.to_owned(), notice.error.to_string()));
            }
        });
    let retrying = RetryingStore::new(Arc::clone(&store) as Arc<dyn SagaStore>, retry);

    store.fail(Op::Load, [Fault::Refuse]);
    let err = retrying.load(id).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused { .. }), "{err:?}");
    assert_eq!(store.calls(Op::Load), 1);
    assert!(notices.lock().unwrap().is_empty());

    store.set_down(Op::Load, true);
    let began = Instant::now();
    let err = retrying.load(id).await.unwrap_err();
    assert!(err.is_transient());
    // The deadline (3 s) is shorter than the policy's 30 s, and wins.
    assert!(
        began.elapsed() <= Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    let notices = notices.lock().unwrap();
    assert!(!notices.is_empty());
    assert!(
        notices
            .iter()
            .all(|(op, error)| op == "load" && error.contains("connection refused")),
        "{notices:?}"
    );
}
