//! A lease that lapses by the clock never leads to double execution (issue 11, item 25).
//!
//! Coordinator A reaches the store through a `SlowStore` whose latency (600 ms) is far above
//! the lease's renewal margin (a tenth of the 1 s lease) and above its renewal interval (a
//! third): A's renewals come back too late, so by A's own reckoning its lease lapses while a
//! step is in flight. Coordinator B, on the same store without the latency, claims the sagas
//! once their leases have lapsed at the store and finishes them.
//!
//! The step calls a participant that honours idempotency keys and records, per key, every
//! request, every applied effect and every request that arrived while another one with the
//! same key was still in flight. The promise: the step may be requested again (at least once,
//! with the same key), but never concurrently with itself and never applied twice; each step's
//! outcome is committed once; the coordinator that gave its attempt up writes nothing more.
//! Time is tokio's paused clock.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::{
    Clock, Compensation, Engine, EventKind, HttpStatus, MemoryStore, RunOutcome, Saga, SagaContext,
    SagaError, SagaId, SagaStatus, SagaStore, StartOptions, Step, StepContext, TokioClock,
};
use saga_tests::{SlowStore, assert_fold_matches, kinds, single_terminal};

const SAGAS: u32 = 6;
const LEASE: Duration = Duration::from_secs(1);
const LATENCY: Duration = Duration::from_millis(600);
/// When the participant applies the effect, after the request reached it.
const APPLY_AFTER: Duration = Duration::from_millis(20);
/// How long the participant takes to answer: longer than the lease.
const ANSWER_AFTER: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
struct Books {
    requests: HashMap<String, usize>,
    effects: HashMap<String, usize>,
    in_flight: HashMap<String, usize>,
    /// Requests that arrived while another with the same key was in flight.
    overlaps: usize,
}

/// A downstream system that honours idempotency keys.
#[derive(Clone, Debug, Default)]
struct Participant(Arc<Mutex<Books>>);

/// Marks a request in flight until it is answered or dropped (the caller gave up).
struct InFlight {
    books: Participant,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut books = self.books.0.lock().unwrap();
        *books.in_flight.get_mut(&self.key).unwrap() -= 1;
    }
}

impl Participant {
    fn enter(&self, key: &str) -> InFlight {
        let mut books = self.0.lock().unwrap();
        *books.requests.entry(key.to_owned()).or_default() += 1;
        let open = {
            let open = books.in_flight.entry(key.to_owned()).or_default();
            *open += 1;
            *open
        };
        if open > 1 {
            books.overlaps += 1;
        }
        InFlight {
            books: self.clone(),
            key: key.to_owned(),
        }
    }

    /// Applies the effect unless this key's effect already was (the key is what lets a
    /// repeated request be recognised).
    fn apply(&self, key: &str) {
        let mut books = self.0.lock().unwrap();
        books.effects.entry(key.to_owned()).or_insert(1);
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.0.lock().unwrap()
    }
}

struct Charge;

impl Step for Charge {
    type Input = u32;
    type Output = u32;
    type Error = HttpStatus;
    const NAME: &'static str = "charge";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, input: u32) -> Result<u32, HttpStatus> {
        let participant = ctx
            .resource::<Participant>()
            .map_err(|_| HttpStatus::new(500))?;
        let _in_flight = participant.enter(ctx.idempotency_key());
        tokio::time::sleep(APPLY_AFTER).await;
        participant.apply(ctx.idempotency_key());
        tokio::time::sleep(ANSWER_AFTER - APPLY_AFTER).await;
        Ok(input)
    }

    fn timeout(&self) -> Option<Duration> {
        None
    }
}

struct Ship;

impl Step for Ship {
    type Input = u32;
    type Output = u32;
    type Error = HttpStatus;
    const NAME: &'static str = "ship";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, input: u32) -> Result<u32, HttpStatus> {
        let participant = ctx
            .resource::<Participant>()
            .map_err(|_| HttpStatus::new(500))?;
        let _in_flight = participant.enter(ctx.idempotency_key());
        participant.apply(ctx.idempotency_key());
        Ok(input + 1)
    }
}

struct Order;

impl Saga for Order {
    type Input = u32;
    type Output = u32;
    const NAME: &'static str = "order";

    async fn run(&self, saga: &mut SagaContext, input: u32) -> Result<u32, SagaError> {
        let charged = saga.run(Charge, input).await?;
        saga.run(Ship, charged).await
    }
}

fn engine(
    store: Arc<dyn SagaStore>,
    clock: &Arc<TokioClock>,
    participant: &Participant,
    owner: &str,
) -> Engine {
    Engine::builder_shared(store)
        .register(Order)
        .resource(participant.clone())
        .clock(Arc::clone(clock) as Arc<dyn Clock>)
        .owner(owner)
        .lease_ttl(LEASE)
        .inline_wait_max(Duration::from_millis(100))
        .build()
        .unwrap()
}

/// Runs `SAGAS` orders: A (behind `latency`) claims them all and requests every charge, then B
/// polls every 10 ms and takes over what lapses. Returns A's run results and B's claims.
async fn race(
    latency: Duration,
) -> (
    Participant,
    Engine,
    Vec<SagaId>,
    Vec<(SagaId, Result<RunOutcome, saga_core::EngineError>)>,
    HashMap<SagaId, usize>,
) {
    let clock = Arc::new(TokioClock::new());
    let store = MemoryStore::with_clock(Arc::clone(&clock) as Arc<dyn Clock>);
    let slow = Arc::new(SlowStore::new(store.clone(), latency));
    let participant = Participant::default();
    let a = engine(slow, &clock, &participant, "coordinator-a");
    let b = engine(Arc::new(store), &clock, &participant, "coordinator-b");

    let mut ids = Vec::new();
    for n in 0..SAGAS {
        ids.push(
            b.start_with::<Order>(&(n * 10), StartOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let run_a = tokio::spawn({
        let a = a.clone();
        async move { a.run_due(100).await }
    });
    // B starts polling only once A holds every saga and has requested every charge.
    saga_tests::until("A has requested every charge", 60_000, || {
        participant.books().requests.len() == ids.len()
    })
    .await;

    let mut claimed_by_b: HashMap<SagaId, usize> = HashMap::new();
    let mut finished = 0;
    for _ in 0..1000 {
        for (id, result) in b.run_due(100).await.unwrap() {
            *claimed_by_b.entry(id).or_default() += 1;
            match result {
                Ok(RunOutcome::Finished(outcome)) => {
                    assert_eq!(outcome.status, SagaStatus::Completed, "{id}");
                }
                other => panic!("B's run of {id}: {other:?}"),
            }
        }
        finished = 0;
        for id in &ids {
            if b.outcome(*id).await.unwrap().status.is_terminal() {
                finished += 1;
            }
        }
        if finished == ids.len() && run_a.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(finished, ids.len(), "every saga finished within the bound");
    let a_results = run_a.await.unwrap().unwrap();
    (participant, b, ids, a_results, claimed_by_b)
}

/// Each saga: completed, its history folds to its state, each step's outcome committed once,
/// and every key's effect applied once, never requested while a request with it was open.
async fn assert_once(participant: &Participant, engine: &Engine, ids: &[SagaId]) {
    for id in ids {
        let state = assert_fold_matches(engine, *id).await;
        assert_eq!(state.status, SagaStatus::Completed);
        let history = engine.history(*id).await.unwrap();
        assert_eq!(single_terminal(&history), "SagaCompleted");
        for position in 0..2 {
            let succeeded = history
                .iter()
                .filter(|e| {
                    matches!(&e.kind, EventKind::StepSucceeded { position: p, .. } if *p == position)
                })
                .count();
            assert_eq!(
                succeeded,
                1,
                "{id}: position {position}: {:?}",
                kinds(&history)
            );
        }
    }
    let books = participant.books();
    assert_eq!(
        books.overlaps, 0,
        "a key was requested while its request was open"
    );
    assert_eq!(
        books.effects.len(),
        2 * ids.len(),
        "one key per step and saga"
    );
    assert!(
        books.effects.values().all(|n| *n == 1),
        "each effect applied once: {:?}",
        books.effects
    );
    assert_eq!(
        books
            .requests
            .keys()
            .collect::<std::collections::BTreeSet<_>>(),
        books.effects.keys().collect(),
        "every request's key is one of the effects' keys"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_lapsed_behind_a_slow_store_is_taken_over_without_double_execution() {
    let (participant, b, ids, a_results, claimed_by_b) = race(LATENCY).await;

    // The lapse really happened: A gave every attempt up as lapsed, and B claimed each saga.
    assert_eq!(a_results.len(), ids.len(), "A claimed every saga");
    let lapsed = a_results
        .iter()
        .filter(|(_, r)| {
            r.as_ref()
                .is_err_and(saga_core::EngineError::is_lease_lapsed)
        })
        .count();
    assert_eq!(lapsed, ids.len(), "A's runs: {a_results:?}");
    assert_eq!(claimed_by_b.len(), ids.len(), "B took every saga over");
    assert!(claimed_by_b.values().all(|n| *n == 1), "{claimed_by_b:?}");
    for id in &ids {
        let history = b.history(*id).await.unwrap();
        let owners: Vec<(String, u64)> = history
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::LeaseAcquired { owner, fence } => Some((owner.clone(), *fence)),
                _ => None,
            })
            .collect();
        assert_eq!(owners.len(), 2, "{id}: {owners:?}");
        assert_eq!(owners[0].0, "coordinator-a");
        assert_eq!(owners[1].0, "coordinator-b");
        assert!(owners[0].1 < owners[1].1, "the fence moved on: {owners:?}");
        // A's history ends at the attempt it gave up; everything after is B's.
        assert_eq!(
            kinds(&history),
            [
                "SagaStarted",
                "LeaseAcquired",
                "StepStarted",
                "LeaseAcquired",
                "SagaResumed",
                "StepStarted",
                "StepSucceeded",
                "StepStarted",
                "StepSucceeded",
                "SagaCompleted",
            ],
            "{id}"
        );
    }

    assert_once(&participant, &b, &ids).await;
    // At least once, not exactly once: A's dropped charge had reached the participant, and B
    // asked again with the same key, which is how the participant knew not to charge twice.
    let books = participant.books();
    let total: usize = books.requests.values().sum();
    assert_eq!(
        total,
        3 * ids.len(),
        "each charge twice, each shipment once: {books:?}"
    );
    assert_eq!(
        books.requests.values().filter(|n| **n == 2).count(),
        ids.len(),
        "{books:?}"
    );
}

/// The control: the same race without the latency. A renews in time, finishes every saga, and
/// B never gets one, so the lapse above comes from the slow store.
#[tokio::test(start_paused = true)]
async fn without_the_latency_the_first_coordinator_keeps_its_leases() {
    let (participant, b, ids, a_results, claimed_by_b) = race(Duration::ZERO).await;
    assert!(
        a_results
            .iter()
            .all(|(_, r)| matches!(r, Ok(RunOutcome::Finished(_)))),
        "{a_results:?}"
    );
    assert!(claimed_by_b.is_empty(), "{claimed_by_b:?}");
    assert_once(&participant, &b, &ids).await;
    let books = participant.books();
    assert!(books.requests.values().all(|n| *n == 1), "{books:?}");
}
