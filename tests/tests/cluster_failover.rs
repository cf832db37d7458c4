//! Sagas on a Redis Cluster with replicas (3 masters, 3 replicas, `cluster-node-timeout
//! 1000`, spawned per test by `saga-redis-testkit`) while the cluster fails over:
//!
//! - a master holding the most saga partitions is killed (`SIGKILL`) mid-run and its replica
//!   takes over; with the store's `WAIT 1` nothing the engine was told is stored is lost;
//! - a coordinated `CLUSTER FAILOVER` and a reshard of slots holding saga partitions happen
//!   mid-run: redirects are followed, no `CROSSSLOT` error is ever answered, nothing is lost;
//! - a lagging replica (paused with `SIGSTOP`, its replication link cut) is promoted with
//!   `CLUSTER FAILOVER TAKEOVER` after its master died: without `WAIT` exactly the writes made
//!   while it was paused are lost (counted), with `WAIT 1` those writes fail instead of being
//!   acknowledged; either way nothing runs twice under two keys and every saga that still
//!   exists ends.
//!
//! The participant the steps call lives in the test process (not in Redis, so a lost write
//! cannot hide a duplicate): it applies each effect once per idempotency key, counts the
//! calls that came again with a key it already had (re-runs after a lost write), and records
//! the order in which each job's steps called it, so that a step run again after a later one
//! (a committed step that the store lost) shows. Jobs are started with an idempotency key,
//! which fixes the saga id, hence its partition, hence the master it lives on.

// Tests: a failed unwrap is a failed test, with the error in the message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::store::NewSaga;
use saga_core::{
    Engine, EngineError, HttpStatus, RetryPolicy, Saga, SagaContext, SagaError, SagaId, SagaStatus,
    SagaStore, StartOptions, StepContext, StoreError, saga_step,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{
    RedisCluster, RedisServer, ServerConfig, can_spawn_servers, unique_prefix,
};
use saga_tests::RunningCoordinator;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::block_in_place;
use tokio::time::Instant;

/// How long any one wait here may take before the test fails (never reached when it works).
const BOUND: Duration = Duration::from_secs(60);

/// Steps per job.
const STEPS: u32 = 3;

/// The saga type's name (saga ids derive from it and the job's key).
const CHAIN: &str = "failover_chain";

/// What the steps call: an outside system that deduplicates by idempotency key.
#[derive(Clone, Debug, Default)]
struct Participant(Arc<Mutex<Book>>);

#[derive(Debug, Default)]
struct Book {
    /// Idempotency key → the (job, position) it applied.
    applied: HashMap<String, (String, u32)>,
    /// (job, position) → every key it was applied under (more than one: a duplicate).
    keys: BTreeMap<(String, u32), BTreeSet<String>>,
    /// Calls with a key already applied (answered from the first application).
    reruns: Vec<(String, u32)>,
    /// Per job, the positions in the order they called.
    order: HashMap<String, Vec<u32>>,
}

impl Participant {
    fn apply(&self, job: &str, position: u32, key: &str) -> u32 {
        let mut book = self.0.lock().unwrap();
        book.order.entry(job.to_owned()).or_default().push(position);
        if book.applied.contains_key(key) {
            book.reruns.push((job.to_owned(), position));
        } else {
            book.applied
                .insert(key.to_owned(), (job.to_owned(), position));
            book.keys
                .entry((job.to_owned(), position))
                .or_default()
                .insert(key.to_owned());
        }
        position + 1
    }

    /// Asserts that no (job, position) was applied under two keys.
    fn assert_once(&self) {
        let book = self.0.lock().unwrap();
        let twice: Vec<_> = book
            .keys
            .iter()
            .filter(|(_, keys)| keys.len() > 1)
            .collect();
        assert!(
            twice.is_empty(),
            "effects applied under two keys: {twice:?}"
        );
    }

    /// Jobs that called for a position after calling for a later one: their store lost a
    /// step that had been committed (the engine only runs a step after the previous one's
    /// commit was acknowledged).
    fn regressions(&self) -> BTreeSet<String> {
        let book = self.0.lock().unwrap();
        book.order
            .iter()
            .filter(|(_, order)| order.windows(2).any(|w| w[1] < w[0]))
            .map(|(job, _)| job.clone())
            .collect()
    }

    fn reruns(&self) -> Vec<(String, u32)> {
        self.0.lock().unwrap().reruns.clone()
    }

    /// Positions applied for `job`.
    fn applied_positions(&self, job: &str) -> BTreeSet<u32> {
        let book = self.0.lock().unwrap();
        book.keys
            .keys()
            .filter(|(j, _)| j == job)
            .map(|(_, p)| *p)
            .collect()
    }

    fn calls(&self, job: &str) -> usize {
        self.0.lock().unwrap().order.get(job).map_or(0, Vec::len)
    }
}

/// Holds gated jobs at their second step until opened.
#[derive(Clone, Debug)]
struct Gate {
    open: Arc<watch::Sender<bool>>,
    waiting: Arc<AtomicUsize>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            open: Arc::new(watch::channel(false).0),
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// One job: its name (also its start key) and whether it waits at the gate.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Job {
    name: String,
    gated: bool,
}

#[saga_step(no_compensation, timeout = "none")]
async fn apply(ctx: &StepContext, call: (String, u32, bool)) -> Result<u32, HttpStatus> {
    let (job, position, gated) = call;
    if gated && position == 1 {
        let gate = ctx
            .resource::<Gate>()
            .map_err(|_| HttpStatus::new(500))?
            .clone();
        let mut open = gate.open.subscribe();
        gate.waiting.fetch_add(1, Ordering::SeqCst);
        let _ = open.wait_for(|open| *open).await;
    }
    // A step takes a little while, so that sagas are in flight when a fault strikes.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let participant = ctx
        .resource::<Participant>()
        .map_err(|_| HttpStatus::new(500))?;
    Ok(participant.apply(&job, position, ctx.idempotency_key()))
}

struct Chain;

impl Saga for Chain {
    type Input = Job;
    type Output = u32;
    const NAME: &'static str = CHAIN;

    async fn run(&self, saga: &mut SagaContext, job: Job) -> Result<u32, SagaError> {
        let mut total = 0;
        for position in 0..STEPS {
            total += saga
                .run(Apply, (job.name.clone(), position, job.gated))
                .await?;
        }
        Ok(total)
    }
}

fn saga_of(job: &str) -> SagaId {
    SagaId::from_idempotency_key(CHAIN, job)
}

/// One cluster at a time: six servers per test, with failure detection after 2 s, would
/// otherwise compete for a small machine's cores until a node misses its heartbeats and is
/// failed over by the cluster itself, in the middle of a test that counts failovers.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cluster() -> Option<RedisCluster> {
    if !can_spawn_servers("cluster_failover") {
        return None;
    }
    Some(block_in_place(|| {
        RedisCluster::start_with_replicas(
            3,
            1,
            &ServerConfig::new().directive("cluster-node-timeout 2000"),
        )
    }))
}

/// The replicas of `master`, once the cluster lists at least one (a topology change is
/// seen by the nodes one gossip round apart).
fn replicas_of(cluster: &RedisCluster, master: usize) -> Vec<usize> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let replicas = cluster.replicas_of(master);
        if !replicas.is_empty() {
            return replicas;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {master} has no replica listed after 15 s: {:?}",
            cluster.topology()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn connect(cluster: &RedisCluster, test: &str, wait: bool) -> Arc<RedisStore> {
    let mut builder = RedisStore::builder()
        .key_prefix(unique_prefix(test))
        .cluster(cluster.urls())
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(2));
    if wait {
        builder = builder.wait_for_replicas(1, Duration::from_millis(500));
    }
    Arc::new(
        builder
            .connect()
            .await
            .unwrap_or_else(|err| panic!("cannot connect to the test cluster: {err}")),
    )
}

/// An engine whose coordinators ride out a failover: store writes retried for several
/// seconds, short leases (a run that still fails is resumed soon), starts retried for
/// `start_for`.
fn engine(
    store: Arc<dyn SagaStore>,
    participant: &Participant,
    gate: &Gate,
    owner: &str,
    start_for: Duration,
) -> Engine {
    Engine::builder_shared(store)
        .register(Chain)
        .resource(participant.clone())
        .resource(gate.clone())
        .owner(owner)
        .lease_ttl(Duration::from_secs(2))
        .inline_wait_max(Duration::from_millis(50))
        .store_retry(
            RetryPolicy::default()
                .with_max_attempts(30)
                .with_initial_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_millis(500)),
        )
        .client_retry(RetryPolicy::client_default().with_max_elapsed(start_for))
        .build()
        .unwrap()
}

/// The master serving each partition of `store`, by index.
fn partition_owners(cluster: &RedisCluster, store: &RedisStore) -> Vec<usize> {
    let layout = store.keys();
    let topology = cluster.topology();
    (0..layout.partitions())
        .map(|p| {
            let slot = cluster.slot_of(&layout.partition_base(p));
            topology
                .iter()
                .find(|n| n.master && n.serves(slot))
                .and_then(|n| n.index)
                .unwrap()
        })
        .collect()
}

/// The next job name `<tag>-<n>` (from `*next`) whose saga lives on `master`.
fn job_on(
    store: &RedisStore,
    owners: &[usize],
    master: usize,
    tag: &str,
    next: &mut usize,
) -> String {
    loop {
        let name = format!("{tag}-{next}");
        *next += 1;
        let partition = store.keys().partition_of(saga_of(&name));
        if owners[usize::from(partition)] == master {
            return name;
        }
    }
}

async fn start(engine: &Engine, job: &str, gated: bool) -> Result<SagaId, EngineError> {
    let job = Job {
        name: job.to_owned(),
        gated,
    };
    let started = engine
        .start_with::<Chain>(&job, StartOptions::key(job.name.clone()))
        .await?;
    assert_eq!(started.id, saga_of(&job.name));
    Ok(started.id)
}

/// Starts jobs `<tag>-<worker>-<n>` in a loop until stopped, remembering which starts were
/// acknowledged and which failed.
#[derive(Clone, Default)]
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<Vec<(String, String)>>>,
}

impl Load {
    fn spawn(
        &self,
        engine: &Engine,
        tag: &str,
        workers: usize,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..workers)
            .map(|worker| {
                let (load, engine, tag) = (self.clone(), engine.clone(), tag.to_owned());
                tokio::spawn(async move {
                    let mut n = 0;
                    while !load.stop.load(Ordering::SeqCst) {
                        let job = format!("{tag}-{worker}-{n}");
                        n += 1;
                        match start(&engine, &job, false).await {
                            Ok(_) => load.acked.lock().unwrap().push(job),
                            Err(err) => load.failed.lock().unwrap().push((job, err.to_string())),
                        }
                        tokio::time::sleep(Duration::from_millis(15)).await;
                    }
                })
            })
            .collect()
    }

    fn acked(&self) -> Vec<String> {
        self.acked.lock().unwrap().clone()
    }

    /// Waits (bounded) until `more` starts beyond `than` were acknowledged.
    async fn until_acked(&self, than: usize, more: usize) {
        let deadline = Instant::now() + BOUND;
        while self.acked.lock().unwrap().len() < than + more {
            assert!(
                Instant::now() < deadline,
                "only {} starts acknowledged; failures: {:?}",
                self.acked.lock().unwrap().len(),
                self.failed.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        self.stop.store(true, Ordering::SeqCst);
        for task in tasks {
            task.await.unwrap();
        }
    }
}

/// Waits (bounded, polling the store: not `Engine::wait`, which may answer from what this
/// process saw, and a lost write is exactly what it did not see) until each job's saga is
/// terminal in the store, and asserts it completed with every step applied.
async fn assert_completed(store: &RedisStore, participant: &Participant, jobs: &[String]) {
    let deadline = Instant::now() + BOUND;
    for job in jobs {
        loop {
            let stored = store.load(saga_of(job)).await;
            let status = match &stored {
                Ok(Some(saga)) => Some(saga.status),
                Ok(None) => panic!("{job}: its saga is not in the store"),
                // A read during a failover: tried again.
                Err(err) if err.is_transient() => None,
                Err(err) => panic!("{job}: {err}"),
            };
            if status.is_some_and(|s| s.is_terminal()) {
                assert_eq!(status, Some(SagaStatus::Completed), "{job}: {stored:?}");
                break;
            }
            assert!(Instant::now() < deadline, "{job} did not end: {stored:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            participant.applied_positions(job),
            (0..STEPS).collect::<BTreeSet<_>>(),
            "{job}"
        );
    }
}

/// `errorstat_<name>:count=<n>` of `INFO errorstats` on every node that is up.
fn error_counts(cluster: &RedisCluster) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for index in (0..cluster.nodes().len()).filter(|i| cluster.is_up(*i)) {
        let info = cluster.info(index, "errorstats").unwrap();
        for line in info.lines() {
            if let Some((name, rest)) = line.trim().split_once(":count=") {
                let name = name.trim_start_matches("errorstat_").to_owned();
                *counts.entry(name).or_insert(0) += rest.parse::<u64>().unwrap_or(0);
            }
        }
    }
    counts
}

/// Item 10: the master holding the most partitions is killed mid-run; its replica takes
/// over; with `WAIT 1` nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_nothing_acknowledged_is_lost() {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = cluster() else {
        return;
    };
    let store = connect(&cluster, "failover_kill", true).await;
    let owners = block_in_place(|| partition_owners(&cluster, &store));
    let mut per_master: BTreeMap<usize, usize> = BTreeMap::new();
    for owner in &owners {
        *per_master.entry(*owner).or_default() += 1;
    }
    let (&victim, &held) = per_master.iter().max_by_key(|(_, n)| **n).unwrap();
    let replica = block_in_place(|| replicas_of(&cluster, victim));
    assert_eq!(replica.len(), 1, "master {victim} has replicas {replica:?}");
    let replica = replica[0];

    let (participant, gate) = (Participant::default(), Gate::default());
    let engine = engine(
        store.clone(),
        &participant,
        &gate,
        "kill-a",
        Duration::from_secs(20),
    );
    let running = RunningCoordinator::spawn(&engine);
    let load = Load::default();
    let tasks = load.spawn(&engine, "kill", 3);
    // Two jobs on the victim wait at their second step, so that sagas are certainly in
    // flight there when it dies.
    let mut next = 0;
    let gated: Vec<String> = (0..2)
        .map(|_| job_on(&store, &owners, victim, "kill-gated", &mut next))
        .collect();
    for job in &gated {
        start(&engine, job, true).await.unwrap();
    }
    load.until_acked(0, 30).await;
    let deadline = Instant::now() + BOUND;
    while gate.waiting.load(Ordering::SeqCst) < gated.len() {
        assert!(
            Instant::now() < deadline,
            "the gated jobs never reached the gate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let on_victim =
        |job: &String| owners[usize::from(store.keys().partition_of(saga_of(job)))] == victim;
    let before: Vec<String> = load.acked();
    let calls_before: HashMap<String, usize> = before
        .iter()
        .chain(&gated)
        .map(|job| (job.clone(), participant.calls(job)))
        .collect();
    block_in_place(|| cluster.kill(victim));
    eprintln!(
        "killed master {victim} ({held} of {} partitions)",
        owners.len()
    );
    block_in_place(|| cluster.wait_until_healthy(BOUND));
    gate.open.send_replace(true);
    let topology = block_in_place(|| cluster.topology());
    assert!(
        topology
            .iter()
            .any(|n| n.index == Some(replica) && n.master && !n.slots.is_empty()),
        "replica {replica} did not take over: {topology:?}"
    );
    // The old master comes back as the new one's replica, so `WAIT 1` can succeed again.
    block_in_place(|| {
        cluster.restart(victim);
        cluster.wait_until_healthy(BOUND);
        cluster.wait_replicated(replica, BOUND);
    });
    let acked_at_restart = load.acked().len();
    load.until_acked(acked_at_restart, 30).await;
    load.stop(tasks).await;

    let mut acked = load.acked();
    acked.extend(gated.iter().cloned());
    assert_completed(&store, &participant, &acked).await;
    running.stop().await;
    // The kill struck sagas in flight on the killed master: acknowledged before it, not
    // finished calling the participant then.
    let in_flight: Vec<&String> = before
        .iter()
        .chain(&gated)
        .filter(|job| on_victim(job) && calls_before[*job] < STEPS as usize)
        .collect();
    assert!(
        gated.iter().all(|job| in_flight.contains(&job)),
        "the gated jobs on master {victim} were not in flight when it was killed"
    );
    participant.assert_once();
    let regressions = participant.regressions();
    assert!(
        regressions.is_empty(),
        "committed steps lost despite WAIT 1 (steps run again after later ones): {regressions:?}"
    );
    eprintln!(
        "item 10: {} sagas acknowledged, {} in flight on the killed master, {} starts failed, {} step calls repeated with their key, 0 lost",
        acked.len(),
        in_flight.len(),
        load.failed.lock().unwrap().len(),
        participant.reruns().len()
    );
}

/// Item 11: a coordinated failover and a reshard of slots holding saga partitions mid-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_and_a_reshard_mid_run_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = cluster() else {
        return;
    };
    let store = connect(&cluster, "failover_reshard", false).await;
    let owners = block_in_place(|| partition_owners(&cluster, &store));
    let masters = block_in_place(|| cluster.masters());
    let count = |m: usize| owners.iter().filter(|o| **o == m).count();
    let from = *masters.iter().max_by_key(|m| count(**m)).unwrap();
    let to = *masters.iter().find(|m| **m != from).unwrap();
    let third = *masters.iter().find(|m| **m != from && **m != to).unwrap();
    let promoted = block_in_place(|| replicas_of(&cluster, third))[0];

    let (participant, gate) = (Participant::default(), Gate::default());
    let engine = engine(
        store.clone(),
        &participant,
        &gate,
        "reshard-a",
        Duration::from_secs(20),
    );
    let running = RunningCoordinator::spawn(&engine);
    let load = Load::default();
    let tasks = load.spawn(&engine, "reshard", 3);
    load.until_acked(0, 30).await;

    block_in_place(|| cluster.manual_failover(promoted, BOUND));
    let acked = load.acked().len();
    load.until_acked(acked, 15).await;

    // Half of `from`'s partition slots (at least one) move to `to`, keys and all.
    let layout = store.keys();
    let mut slots: Vec<u16> = (0..layout.partitions())
        .filter(|p| owners[usize::from(*p)] == from)
        .map(|p| block_in_place(|| cluster.slot_of(&layout.partition_base(p))))
        .collect();
    slots.sort_unstable();
    slots.dedup();
    slots.truncate(slots.len().div_ceil(2));
    let moved = block_in_place(|| cluster.migrate_slots(from, to, &slots));
    assert!(moved > 0, "the migrated slots {slots:?} held no keys");
    block_in_place(|| cluster.wait_until_healthy(BOUND));
    for slot in &slots {
        assert_eq!(block_in_place(|| cluster.master_of_slot(*slot)), to);
    }
    let acked = load.acked().len();
    load.until_acked(acked, 30).await;
    load.stop(tasks).await;

    let acked = load.acked();
    assert_completed(&store, &participant, &acked).await;
    running.stop().await;
    // Sagas in the moved partitions were started after the move, and completed there.
    let new_owners = block_in_place(|| partition_owners(&cluster, &store));
    let moved_partitions: BTreeSet<u16> = (0..layout.partitions())
        .filter(|p| owners[usize::from(*p)] == from && new_owners[usize::from(*p)] == to)
        .collect();
    assert!(!moved_partitions.is_empty());
    assert!(
        acked
            .iter()
            .any(|job| moved_partitions.contains(&layout.partition_of(saga_of(job)))),
        "no acknowledged saga lives in a moved partition"
    );
    participant.assert_once();
    assert!(participant.regressions().is_empty());
    let errors = block_in_place(|| error_counts(&cluster));
    assert!(
        !errors.contains_key("CROSSSLOT"),
        "a node answered CROSSSLOT: {errors:?}"
    );
    // The store's clients were redirected (and followed): the demoted master and the old
    // owner of the moved slots answer MOVED to requests sent by the stale slot map.
    assert!(
        errors.get("MOVED").is_some_and(|n| *n > 0),
        "no redirect happened: {errors:?}"
    );
    let failures = load.failed.lock().unwrap().clone();
    assert!(
        failures.iter().all(|(_, err)| !err.contains("CROSSSLOT")),
        "{failures:?}"
    );
    eprintln!(
        "item 11: {} sagas acknowledged, {moved} keys in {} slots moved from node {from} to node {to}, node {promoted} promoted by CLUSTER FAILOVER, {} starts failed, {} step calls repeated with their key; server error counts: {errors:?}",
        acked.len(),
        slots.len(),
        failures.len(),
        participant.reruns().len()
    );
}

/// Item 12: a lagging replica promoted by force. Without `WAIT` the writes made while it
/// lagged are lost (exactly those); with `WAIT 1` they are refused instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_promoted_loses_unreplicated_writes_unless_wait() {
    let _serial = SERIAL.lock().await;
    let Some(mut cluster) = cluster() else {
        return;
    };
    // --- Without WAIT ---
    let store = connect(&cluster, "failover_lag", false).await;
    let owners = block_in_place(|| partition_owners(&cluster, &store));
    let master = owners[0];
    let replica = block_in_place(|| replicas_of(&cluster, master))[0];
    let (participant, gate) = (Participant::default(), Gate::default());
    let engine_a = engine(
        store.clone(),
        &participant,
        &gate,
        "lag-a",
        Duration::from_secs(10),
    );
    let running = RunningCoordinator::spawn(&engine_a);
    let mut next = 0;

    // Gated jobs: step 0 done and step 1 begun, replicated; the rest happens during the lag.
    const GATED: usize = 2;
    let gated: Vec<String> = (0..GATED)
        .map(|_| job_on(&store, &owners, master, "gated", &mut next))
        .collect();
    for job in &gated {
        start(&engine_a, job, true).await.unwrap();
    }
    let deadline = Instant::now() + BOUND;
    while gate.waiting.load(Ordering::SeqCst) < GATED {
        assert!(
            Instant::now() < deadline,
            "the gated jobs never reached the gate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    block_in_place(|| {
        cluster.wait_replicated(master, BOUND);
        cluster.pause(replica);
    });
    let cut = block_in_place(|| cluster.cut_replication(master));
    assert_eq!(cut, 1, "master {master} had {cut} replica links to cut");

    // While the replica lags: the gated jobs finish, and new jobs run from start to end.
    gate.open.send_replace(true);
    assert_completed(&store, &participant, &gated).await;
    const LAGGED: usize = 4;
    let lagged: Vec<String> = (0..LAGGED)
        .map(|_| job_on(&store, &owners, master, "lagged", &mut next))
        .collect();
    for job in &lagged {
        start(&engine_a, job, false).await.unwrap();
    }
    assert_completed(&store, &participant, &lagged).await;

    block_in_place(|| {
        cluster.kill(master);
        cluster.resume(replica);
        cluster.forced_failover(replica, BOUND);
        cluster.restart(master);
        cluster.wait_until_healthy(BOUND);
        cluster.wait_replicated(replica, BOUND);
    });
    let mut lost_starts = Vec::new();
    for job in &lagged {
        if store.load(saga_of(job)).await.unwrap().is_none() {
            lost_starts.push(job.clone());
        }
    }
    assert_eq!(
        lost_starts, lagged,
        "every start acknowledged while the replica lagged is lost on its promotion"
    );
    // The gated jobs come back at their second step and run it and the third again, with the
    // same keys: the participant answers from its first application.
    assert_completed(&store, &participant, &gated).await;
    running.stop().await;
    let regressions = participant.regressions();
    assert_eq!(
        regressions,
        gated.iter().cloned().collect::<BTreeSet<_>>(),
        "the gated jobs' lagged commits are lost and their steps run again"
    );
    let reruns = participant.reruns();
    for job in &gated {
        assert!(
            reruns.iter().any(|(j, _)| j == job),
            "{job} ran no step again: {reruns:?}"
        );
    }
    participant.assert_once();
    eprintln!(
        "item 12 without WAIT: {} acknowledged starts lost ({} effects applied for sagas that no longer exist), {} sagas rolled back to before their lost commits, {} step calls repeated with their key",
        lost_starts.len(),
        lost_starts.len() * STEPS as usize,
        regressions.len(),
        reruns.len()
    );

    // --- With WAIT 1 ---
    // Now `replica` is a master and `master` its replica.
    let store = connect(&cluster, "failover_lag_wait", true).await;
    let owners = block_in_place(|| partition_owners(&cluster, &store));
    let (participant, gate) = (Participant::default(), Gate::default());
    let engine_b = engine(
        store.clone(),
        &participant,
        &gate,
        "lag-b",
        Duration::from_secs(2),
    );
    let running = RunningCoordinator::spawn(&engine_b);
    block_in_place(|| cluster.pause(master));
    let mut next = 0;
    let refused: Vec<String> = (0..3)
        .map(|_| job_on(&store, &owners, replica, "refused", &mut next))
        .collect();
    let other = *owners.iter().find(|o| **o != replica).unwrap();
    let accepted: Vec<String> = (0..3)
        .map(|_| job_on(&store, &owners, other, "accepted", &mut next))
        .collect();
    let starts = refused
        .iter()
        .chain(&accepted)
        .map(|job| {
            let (engine, job) = (engine_b.clone(), job.clone());
            tokio::spawn(async move { (job.clone(), start(&engine, &job, false).await) })
        })
        .collect::<Vec<_>>();
    let mut answers = BTreeMap::new();
    for task in starts {
        let (job, answer) = task.await.unwrap();
        answers.insert(job, answer);
    }
    // Not acknowledged: the replica wait fails, or (as every WAIT holds the store's one
    // connection to that master for its timeout) the create times out behind the WAITs.
    let mut refusals = BTreeSet::new();
    for job in &refused {
        match &answers[job] {
            Err(EngineError::Store(StoreError::Unavailable { message, .. })) => {
                refusals.insert(message.clone());
            }
            other => panic!("{job} on the master whose replica is paused: {other:?}"),
        }
    }
    for job in &accepted {
        assert!(answers[job].is_ok(), "{job}: {:?}", answers[job]);
    }
    block_in_place(|| {
        cluster.kill(replica);
        cluster.resume(master);
        cluster.forced_failover(master, BOUND);
        cluster.restart(replica);
        cluster.wait_until_healthy(BOUND);
        cluster.wait_replicated(master, BOUND);
    });
    // A refused start may or may not have reached the promoted replica: started again with
    // the same key it is the same saga, and runs its steps under the same keys.
    let mut survived = 0;
    for job in &refused {
        if store.load(saga_of(job)).await.unwrap().is_some() {
            survived += 1;
        }
        start(&engine_b, job, false).await.unwrap();
    }
    let all: Vec<String> = refused.iter().chain(&accepted).cloned().collect();
    assert_completed(&store, &participant, &all).await;
    running.stop().await;
    participant.assert_once();
    let regressions = participant.regressions();
    for job in &accepted {
        assert!(!regressions.contains(job), "{job} lost a committed step");
    }
    eprintln!(
        "item 12 with WAIT 1: {} starts refused while the replica was paused ({refusals:?}; {survived} of them reached the promoted replica anyway), {} accepted, 0 acknowledged writes lost, {} step calls repeated with their key",
        refused.len(),
        accepted.len(),
        participant.reruns().len()
    );
}

/// The fix behind item 12's `WAIT` half: a create retried after its replica wait failed
/// finds its own saga, and must not be acknowledged (as `Existing`) before a replica has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_waits_for_replicas_as_the_first_did() {
    if !can_spawn_servers("a_retried_create_waits_for_replicas_as_the_first_did") {
        return;
    }
    let server = block_in_place(|| RedisServer::start(ServerConfig::new()));
    let store = RedisStore::builder()
        .url(server.url())
        .key_prefix(unique_prefix("retried_create"))
        .wait_for_replicas(1, Duration::from_millis(50))
        .connect()
        .await
        .unwrap();
    let id = SagaId::random();
    let new = NewSaga {
        id,
        saga_type: CHAIN.to_owned(),
        version: 1,
        idempotency_key: None,
        fingerprint: "fp".to_owned(),
        state: "{}".to_owned(),
        events: vec![r#"{"event":"started"}"#.to_owned()],
        claim: None,
    };
    for attempt in ["first", "retried"] {
        match store.create(new.clone()).await {
            Err(StoreError::Unavailable { message, .. }) => {
                assert!(message.contains("0 of 1 replicas"), "{attempt}: {message}");
            }
            other => panic!("{attempt} create without a replica: {other:?}"),
        }
    }
    assert!(
        store.load(id).await.unwrap().is_some(),
        "the saga is on the primary, unreplicated"
    );
}
