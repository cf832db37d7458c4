//! One malformed saga costs the others almost nothing (issue 11, item 16): it is quarantined
//! with its reason at its first claim and never claimed again, and the good sagas keep at
//! least 95 % of the progress a clean run makes in the same number of rounds.
//!
//! Progress is counted, not timed: a fixed number of `run_due` rounds with a fixed claim limit
//! (so the rounds, not the clock, bound the work), and the good sagas' applied step effects
//! (the ledger) compared with a clean run of the same rounds. The capacity is chosen equal to
//! what the good sagas need, so every claim spent on the bad saga shows as lost progress: one
//! claim costs 1/40 (97.5 % kept); a bad saga claimed in every round would cost 5/40 (87.5 %),
//! below the bound.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use saga_core::{
    Engine, EngineError, Phase, RunOutcome, Saga, SagaContext, SagaError, SagaId, SagaStatus,
    SagaStore, StartOptions,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers, unique_prefix};
use saga_tests::{Harness, Ledger, Plan, PlanSaga, Script};

const GOOD: usize = 40;
const STEPS: usize = 3;
const LIMIT: usize = 8;
/// `ROUNDS * LIMIT == GOOD`: a clean run needs every claim of every round.
const ROUNDS: usize = 5;

fn plan() -> Plan {
    Plan::linear(STEPS).with_all(|s| s.timeout = None)
}

/// What a series of rounds did.
#[derive(Debug, Default)]
struct Rounds {
    /// Claims per saga (each `run_due` result is one claim).
    claims: BTreeMap<SagaId, usize>,
    /// The sagas whose run ended quarantined, with the reason.
    quarantined: Vec<(SagaId, String)>,
}

impl Rounds {
    async fn run(&mut self, engine: &Engine, rounds: usize) {
        for _ in 0..rounds {
            for (id, result) in engine.run_due(LIMIT).await.unwrap() {
                *self.claims.entry(id).or_default() += 1;
                match result {
                    Ok(RunOutcome::Finished(outcome)) => {
                        assert_eq!(outcome.status, SagaStatus::Completed, "{id}");
                    }
                    Ok(other) => panic!("saga {id}: expected it to finish, got {other:?}"),
                    Err(EngineError::Quarantined { saga, reason }) => {
                        assert_eq!(saga, id);
                        self.quarantined.push((id, reason));
                    }
                    Err(err) => panic!("saga {id}: unexpected run error {err:?}"),
                }
            }
        }
    }

    fn claims_of(&self, id: SagaId) -> usize {
        self.claims.get(&id).copied().unwrap_or(0)
    }
}

async fn start_good(engine: &Engine) -> HashSet<SagaId> {
    let mut ids = HashSet::new();
    for seed in 0..GOOD {
        let seed = u32::try_from(seed).unwrap() * 10;
        ids.insert(
            engine
                .start_with::<PlanSaga>(&seed, StartOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    ids
}

/// Forward effects applied for the sagas in `good`.
fn progress(ledger: &Ledger, good: &HashSet<SagaId>) -> usize {
    ledger
        .effects_in(Phase::Forward)
        .iter()
        .filter(|e| good.contains(&e.saga))
        .count()
}

/// Asserts the throughput bound: `faulty` of `clean` is at least 95 %, and `clean` is the
/// whole work (so the rounds really were the limit and the comparison means something).
fn assert_throughput(faulty: usize, clean: usize) {
    assert_eq!(clean, GOOD * STEPS, "the clean run does all the work");
    assert!(
        faulty * 100 >= clean * 95,
        "the good sagas kept {faulty} of {clean} step completions (< 95 %)"
    );
}

/// A clean run on the in-memory store: the good sagas' progress after `ROUNDS` rounds.
async fn clean_progress_in_memory() -> usize {
    let h = Harness::new();
    let engine = h.engine(plan());
    let good = start_good(&engine).await;
    let mut rounds = Rounds::default();
    rounds.run(&engine, ROUNDS).await;
    assert!(rounds.quarantined.is_empty(), "{:?}", rounds.quarantined);
    progress(&h.ledger, &good)
}

#[tokio::test(start_paused = true)]
async fn a_malformed_saga_is_quarantined_once_and_the_others_keep_their_throughput() {
    let clean = clean_progress_in_memory().await;

    let h = Harness::new();
    let engine = h.engine(plan());
    // The bad saga is due first, so it competes for a claim within the measured rounds.
    let bad = engine
        .start_with::<PlanSaga>(&7, StartOptions::default())
        .await
        .unwrap()
        .id;
    assert!(h.store.corrupt_state(bad, "{not json"));
    tokio::time::advance(Duration::from_millis(1)).await;
    let good = start_good(&engine).await;

    let mut rounds = Rounds::default();
    rounds.run(&engine, ROUNDS).await;
    let faulty = progress(&h.ledger, &good);
    assert_throughput(faulty, clean);

    // The bad saga was claimed, found malformed and set aside with its reason.
    assert_eq!(
        rounds.claims_of(bad),
        1,
        "claimed once: {:?}",
        rounds.claims
    );
    assert_eq!(rounds.quarantined.len(), 1, "{:?}", rounds.quarantined);
    let (id, reason) = &rounds.quarantined[0];
    assert_eq!(*id, bad);
    let stored = h.store.load(bad).await.unwrap().unwrap();
    assert_eq!(stored.quarantined.as_deref(), Some(reason.as_str()));
    assert!(
        reason.contains("stored state does not decode"),
        "the reason says what is wrong: {reason}"
    );
    assert_eq!(stored.due_at, None, "no worker is meant to claim it");
    assert_eq!(stored.lease, None, "its lease was given up");
    assert!(
        h.ledger.calls().iter().all(|c| c.saga != bad),
        "no step of the bad saga ran"
    );

    // Far past every lease and retry time, rounds go on finding nothing: the bad saga is
    // never claimed again, and each good saga was claimed once and completed.
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(3600)).await;
        rounds.run(&engine, 2).await;
    }
    assert_eq!(rounds.claims_of(bad), 1, "never claimed again");
    for id in &good {
        assert_eq!(rounds.claims_of(*id), 1, "good saga {id} claimed once");
        assert_eq!(
            engine.outcome(*id).await.unwrap().status,
            SagaStatus::Completed
        );
    }
    assert_eq!(progress(&h.ledger, &good), GOOD * STEPS);
}

/// The workflow under the name `scripted` with an input that `PlanSaga` (a `u32`) cannot
/// decode: data written by another version of the code.
struct OtherVersion;

impl Saga for OtherVersion {
    type Input = String;
    type Output = ();
    const NAME: &'static str = "scripted";

    async fn run(&self, _saga: &mut SagaContext, _input: String) -> Result<(), SagaError> {
        Ok(())
    }
}

fn redis_engine(store: &Arc<dyn SagaStore>, script: &Script, ledger: &Ledger) -> Engine {
    Engine::builder_shared(Arc::clone(store))
        .register(PlanSaga { plan: plan() })
        .resource(script.clone())
        .resource(ledger.clone())
        .owner("coordinator-1")
        .build()
        .unwrap()
}

async fn redis_store(server: &RedisServer, test: &str) -> Arc<dyn SagaStore> {
    Arc::new(
        RedisStore::builder()
            .url(server.url())
            .key_prefix(unique_prefix(test))
            .connect()
            .await
            .expect("connect to the test redis-server"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_saga_whose_input_does_not_decode_is_quarantined_once_and_the_others_keep_their_throughput()
 {
    if !can_spawn_servers("quarantine_throughput_redis") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new());

    let clean = {
        let store = redis_store(&server, "quarantine_clean").await;
        let ledger = Ledger::new();
        let engine = redis_engine(&store, &Script::new(), &ledger);
        let good = start_good(&engine).await;
        let mut rounds = Rounds::default();
        rounds.run(&engine, ROUNDS).await;
        assert!(rounds.quarantined.is_empty(), "{:?}", rounds.quarantined);
        progress(&ledger, &good)
    };

    let store = redis_store(&server, "quarantine_faulty").await;
    let ledger = Ledger::new();
    let engine = redis_engine(&store, &Script::new(), &ledger);
    let writer = Engine::builder_shared(Arc::clone(&store))
        .register(OtherVersion)
        .owner("old-deployment")
        .build()
        .unwrap();
    let bad = writer
        .start_with::<OtherVersion>(&"not a number".to_owned(), StartOptions::default())
        .await
        .unwrap()
        .id;
    // The bad saga is due first (due times have millisecond resolution), so it competes for
    // a claim within the measured rounds.
    let created = std::time::SystemTime::now();
    for _ in 0..1000 {
        if created.elapsed().unwrap_or_default() >= Duration::from_millis(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(created.elapsed().unwrap_or_default() >= Duration::from_millis(2));
    let good = start_good(&engine).await;

    let mut rounds = Rounds::default();
    rounds.run(&engine, ROUNDS).await;
    assert_throughput(progress(&ledger, &good), clean);
    assert_eq!(
        rounds.claims_of(bad),
        1,
        "claimed once: {:?}",
        rounds.claims
    );
    assert_eq!(rounds.quarantined.len(), 1, "{:?}", rounds.quarantined);
    let stored = store.load(bad).await.unwrap().unwrap();
    let reason = stored.quarantined.clone().unwrap_or_default();
    assert!(reason.contains("decode"), "{reason}");
    assert_eq!(stored.due_at, None);

    rounds.run(&engine, 3).await;
    assert_eq!(rounds.claims_of(bad), 1, "never claimed again");
    for id in &good {
        assert_eq!(rounds.claims_of(*id), 1, "good saga {id} claimed once");
    }
    assert_eq!(progress(&ledger, &good), GOOD * STEPS);
}
