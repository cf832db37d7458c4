//! A Redis store connected through the fault proxy, under each fault, with a real
//! redis-server (AOF, `appendfsync always`): latency, resets, replies lost after the command
//! was applied, and blackholes. After each fault heals, every saga is terminal, each effect
//! applied once per idempotency key, no history holds a duplicate event, and no step ran
//! more attempts than its retry policy allows.
//!
//! Each saga's middle step waits at a gate, so that the fault is set while every saga is in
//! flight and the gate's opening sends all their commits into it at once.

// Progress and retried errors on stderr are this test's diagnostics when an invariant fails.
#![allow(clippy::print_stderr)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_chaos::{Fault, FaultProxy, ProxyStats};
use saga_core::{
    Compensation, Engine, EngineError, EventKind, HttpStatus, RetryPolicy, Saga, SagaContext,
    SagaError, SagaId, SagaOutcome, SagaStatus, StartOptions, Step, StepContext,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers, unique_prefix};

/// Sagas per scenario.
const SAGAS: usize = 8;
/// Steps per saga.
const STEPS: u32 = 3;
/// The forward retry policy's attempts of every step.
const STEP_ATTEMPTS: u32 = 4;
/// A generous bound on every wait: reaching it is a failure (a hang), not a synchronisation.
const BOUND: Duration = Duration::from_secs(30);
/// How often a bounded wait looks at its condition again.
const POLL: Duration = Duration::from_millis(10);

/// The participant: applies each effect once per idempotency key and counts the calls.
#[derive(Default)]
struct Ledger {
    calls: Mutex<HashMap<String, u32>>,
    applied: Mutex<HashMap<String, u32>>,
}

impl Ledger {
    fn apply(&self, key: &str) {
        let mut calls = self.calls.lock().unwrap_or_else(|err| panic!("{err}"));
        *calls.entry(key.to_owned()).or_default() += 1;
        // The idempotency key is the participant's unique column: a repeat is a no-op.
        self.applied
            .lock()
            .unwrap_or_else(|err| panic!("{err}"))
            .entry(key.to_owned())
            .or_insert(1);
    }

    fn calls(&self) -> HashMap<String, u32> {
        self.calls
            .lock()
            .unwrap_or_else(|err| panic!("{err}"))
            .clone()
    }

    fn applied(&self) -> HashMap<String, u32> {
        self.applied
            .lock()
            .unwrap_or_else(|err| panic!("{err}"))
            .clone()
    }
}

/// Holds every saga's middle step until opened.
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    waiting: AtomicUsize,
}

struct Effect;

impl Step for Effect {
    type Input = u64;
    type Output = u64;
    type Error = HttpStatus;
    const NAME: &'static str = "effect";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, ctx: &StepContext, input: u64) -> Result<u64, HttpStatus> {
        let ledger = ctx
            .resource::<Arc<Ledger>>()
            .unwrap_or_else(|err| panic!("{err}"));
        if ctx.position() == 1 {
            let gate = ctx
                .resource::<Arc<Gate>>()
                .unwrap_or_else(|err| panic!("{err}"));
            if !gate.open.load(Ordering::SeqCst) {
                gate.waiting.fetch_add(1, Ordering::SeqCst);
                let deadline = tokio::time::Instant::now() + BOUND;
                while !gate.open.load(Ordering::SeqCst) {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the gate never opened"
                    );
                    tokio::time::sleep(POLL).await;
                }
            }
        }
        ledger.apply(ctx.idempotency_key());
        Ok(input + 1)
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
            .with_max_attempts(STEP_ATTEMPTS)
            .with_initial_delay(Duration::from_millis(10))
            .with_max_delay(Duration::from_millis(50))
    }
}

struct Chain;

impl Saga for Chain {
    type Input = u64;
    type Output = u64;
    const NAME: &'static str = "chaos-chain";

    async fn run(&self, saga: &mut SagaContext, mut value: u64) -> Result<u64, SagaError> {
        for _ in 0..STEPS {
            value = saga.run(Effect, value).await?;
        }
        Ok(value)
    }
}

/// One scenario's server, proxy, engine and participant.
struct Rig {
    proxy: FaultProxy,
    engine: Engine,
    ledger: Arc<Ledger>,
    gate: Arc<Gate>,
    _server: RedisServer,
}

async fn rig(test: &str, fault: Fault) -> Rig {
    let server = RedisServer::start(ServerConfig::new().durable());
    let upstream: SocketAddr = ([127, 0, 0, 1], server.port()).into();
    let proxy = FaultProxy::start(upstream)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    proxy.set(fault);
    let store = RedisStore::builder()
        .url(format!("redis://{}", proxy.addr()))
        .key_prefix(unique_prefix(test))
        // Short bounds so that a blackhole surfaces as a timeout quickly.
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(500))
        .reconnect_retries(2)
        .connect()
        .await
        .unwrap_or_else(|err| panic!("cannot connect through the proxy: {err}"));
    let ledger = Arc::new(Ledger::default());
    let gate = Arc::new(Gate::default());
    let engine = Engine::builder(store)
        .register(Chain)
        .resource(Arc::clone(&ledger))
        .resource(Arc::clone(&gate))
        .lease_ttl(Duration::from_secs(3))
        .store_retry(
            RetryPolicy::default()
                .with_max_attempts(4)
                .with_initial_delay(Duration::from_millis(20))
                .with_max_delay(Duration::from_millis(200)),
        )
        .build()
        .unwrap_or_else(|err| panic!("{err}"));
    Rig {
        proxy,
        engine,
        ledger,
        gate,
        _server: server,
    }
}

impl Rig {
    /// Starts `SAGAS` sagas, each in its own task; they stop at the gate (or finish when it
    /// is open).
    fn launch(
        &self,
        scenario: &str,
    ) -> (
        Vec<SagaId>,
        tokio::task::JoinSet<Result<SagaOutcome, EngineError>>,
    ) {
        let mut ids = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..SAGAS {
            let key = format!("{scenario}-{n}");
            ids.push(SagaId::from_idempotency_key(Chain::NAME, &key));
            let engine = self.engine.clone();
            tasks.spawn(async move {
                engine
                    .execute::<Chain>(&(n as u64 * 10), StartOptions::key(key))
                    .await
            });
        }
        (ids, tasks)
    }

    /// Waits (bounded) until every saga is held at the gate: all are started and in flight.
    async fn all_at_gate(&self) {
        wait_for("every saga to reach the gate", || {
            self.gate.waiting.load(Ordering::SeqCst) >= SAGAS
        })
        .await;
    }

    fn open_gate(&self) {
        self.gate.open.store(true, Ordering::SeqCst);
    }

    /// Waits (bounded) until the proxy's counters satisfy `done`.
    async fn proxy_until(&self, what: &str, done: impl Fn(&ProxyStats) -> bool) {
        wait_for(what, || done(&self.proxy.stats())).await;
        eprintln!("{what}: {:?}", self.proxy.stats());
    }

    /// Runs every saga to its end after the fault healed: an interrupted run left its lease
    /// with this owner, which may claim it again; a `Busy` or store error is retried within
    /// the bound.
    async fn recover(&self, ids: &[SagaId]) -> Vec<SagaOutcome> {
        let mut outcomes = Vec::new();
        for id in ids {
            let deadline = tokio::time::Instant::now() + BOUND;
            let outcome = loop {
                match self.engine.run_to_end(*id).await {
                    Ok(outcome) if outcome.status.is_terminal() => break outcome,
                    Ok(outcome) => eprintln!("saga {id} not terminal yet: {:?}", outcome.status),
                    Err(err) => eprintln!("saga {id}: recovery retried after {err}"),
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "saga {id} did not reach a terminal state within {BOUND:?} after healing"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            outcomes.push(outcome);
        }
        outcomes
    }

    /// The invariants after healing: every saga terminal, each effect applied once per key,
    /// no step ran without its start being recorded, no duplicate event, attempts within the
    /// policy.
    async fn check(&self, ids: &[SagaId], outcomes: &[SagaOutcome]) {
        for outcome in outcomes {
            assert!(outcome.status.is_terminal(), "{outcome:?}");
        }
        let applied = self.ledger.applied();
        assert!(
            applied.values().all(|n| *n == 1),
            "an effect applied twice: {applied:?}"
        );
        let calls = self.ledger.calls();
        let mut keys_seen = 0;
        for id in ids {
            let history = self
                .engine
                .history(*id)
                .await
                .unwrap_or_else(|err| panic!("history of {id}: {err}"));
            // Keyed by lease segment too: a resume re-runs an interrupted attempt with its
            // number (by design, docs/ARCHITECTURE.md), so a duplicate commit is the same
            // StepStarted twice within one lease.
            let mut segment = 0_u32;
            let mut started: HashMap<(u32, u32, u32), usize> = HashMap::new();
            let mut started_per_key: HashMap<String, u32> = HashMap::new();
            let mut succeeded: HashMap<u32, usize> = HashMap::new();
            for event in &history {
                match &event.kind {
                    EventKind::StepStarted {
                        position,
                        attempt,
                        idempotency_key,
                        ..
                    } => {
                        *started.entry((segment, *position, *attempt)).or_default() += 1;
                        *started_per_key.entry(idempotency_key.clone()).or_default() += 1;
                        assert!(
                            *attempt <= STEP_ATTEMPTS,
                            "saga {id}: step {position} attempt {attempt} is above the policy's {STEP_ATTEMPTS}"
                        );
                    }
                    EventKind::LeaseAcquired { .. } => segment += 1,
                    EventKind::StepSucceeded { position, .. } => {
                        *succeeded.entry(*position).or_default() += 1;
                    }
                    _ => {}
                }
            }
            for ((segment, position, attempt), count) in &started {
                assert_eq!(
                    *count, 1,
                    "saga {id}: StepStarted of position {position} attempt {attempt} recorded {count} times under lease {segment}: {history:#?}"
                );
            }
            for (position, count) in &succeeded {
                assert_eq!(
                    *count, 1,
                    "saga {id}: step {position} succeeded {count} times"
                );
            }
            for (key, runs) in &started_per_key {
                let made = calls.get(key).copied().unwrap_or(0);
                assert!(
                    made <= *runs,
                    "saga {id}: the participant saw {made} calls with key {key} but only {runs} starts are recorded"
                );
                if made > 0 {
                    keys_seen += 1;
                }
            }
            let state = self
                .engine
                .state(*id)
                .await
                .unwrap_or_else(|err| panic!("state of {id}: {err}"));
            let folded = saga_core::SagaState::fold(*id, &history)
                .unwrap_or_else(|err| panic!("fold of {id}: {err}"));
            assert_eq!(
                folded, state,
                "saga {id}: the history folds to the stored state"
            );
        }
        assert_eq!(
            keys_seen,
            applied.len(),
            "every applied key belongs to a recorded start"
        );
    }
}

/// Waits until `done` holds, failing after [`BOUND`].
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let waited = tokio::time::timeout(BOUND, async {
        while !done() {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "gave up waiting for {what} after {BOUND:?}");
}

/// Waits (bounded) for every launched execution to return, whatever it returned: a hang
/// under a fault is a failure. Returns how many failed.
async fn join_all(tasks: &mut tokio::task::JoinSet<Result<SagaOutcome, EngineError>>) -> usize {
    let joined = tokio::time::timeout(BOUND, async {
        let mut failed = 0;
        while let Some(joined) = tasks.join_next().await {
            match joined.unwrap_or_else(|err| panic!("saga task: {err}")) {
                Ok(_) => {}
                Err(err) => {
                    eprintln!("execution ended with {err}");
                    failed += 1;
                }
            }
        }
        failed
    })
    .await;
    joined.unwrap_or_else(|_| panic!("executions still running {BOUND:?} into the fault: a hang"))
}

fn skip(test: &str) -> bool {
    !can_spawn_servers(test)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_sagas_complete_with_effects_once() {
    if skip("latency_sagas_complete_with_effects_once") {
        return;
    }
    let rig = rig("proxy_latency", Fault::Latency(Duration::from_millis(50))).await;
    rig.open_gate();
    let (ids, mut tasks) = rig.launch("latency");
    assert_eq!(
        join_all(&mut tasks).await,
        0,
        "no saga fails under latency alone"
    );
    let outcomes = rig.recover(&ids).await;
    for outcome in &outcomes {
        assert_eq!(outcome.status, SagaStatus::Completed);
    }
    rig.check(&ids, &outcomes).await;
    assert_eq!(rig.ledger.applied().len(), SAGAS * STEPS as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_mid_run_then_heal_every_saga_terminal() {
    if skip("resets_mid_run_then_heal_every_saga_terminal") {
        return;
    }
    let rig = rig("proxy_reset", Fault::None).await;
    let (ids, mut tasks) = rig.launch("reset");
    rig.all_at_gate().await;
    rig.proxy.set(Fault::Reset);
    rig.open_gate();
    rig.proxy_until("open connections reset", |s| s.closed_by_fault > 0)
        .await;
    join_all(&mut tasks).await;
    rig.proxy.set(Fault::None);
    let outcomes = rig.recover(&ids).await;
    rig.check(&ids, &outcomes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_replies_during_commits_apply_once() {
    if skip("dropped_replies_during_commits_apply_once") {
        return;
    }
    let rig = rig("proxy_drop_replies", Fault::None).await;
    let (ids, mut tasks) = rig.launch("drop");
    rig.all_at_gate().await;
    rig.proxy.set(Fault::DropReplies);
    rig.open_gate();
    rig.proxy_until("replies dropped", |s| s.replies_dropped > 0)
        .await;
    let failed = join_all(&mut tasks).await;
    eprintln!("{failed} executions failed under lost replies");
    rig.proxy.set(Fault::None);
    let outcomes = rig.recover(&ids).await;
    rig.check(&ids, &outcomes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_bounded_retries_then_heal() {
    if skip("blackhole_bounded_retries_then_heal") {
        return;
    }
    let rig = rig("proxy_blackhole", Fault::None).await;
    let (ids, mut tasks) = rig.launch("blackhole");
    rig.all_at_gate().await;
    rig.proxy.set(Fault::Blackhole);
    rig.open_gate();
    rig.proxy_until("bytes swallowed", |s| s.chunks_dropped > 0)
        .await;
    // Every execution returns (interrupted) while the blackhole lasts: none hangs.
    let failed = join_all(&mut tasks).await;
    assert_eq!(failed, SAGAS, "no commit can succeed through a blackhole");
    rig.proxy.set(Fault::None);
    let outcomes = rig.recover(&ids).await;
    rig.check(&ids, &outcomes).await;
}
