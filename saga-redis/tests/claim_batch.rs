//! `claim_due` on Redis, beyond the conformance suite: batches are the oldest due sagas over
//! all partitions (a busy partition does not starve another, a burst of new sagas does not
//! starve a due retry), on a standalone server and on a 3-master cluster; a saga submitted by
//! another process is claimed after one wake-up without a sweep; with nothing due, a claim
//! makes no round trip at all; timers set elsewhere are found by the sweep.
//!
//! Nothing is timed: every wait is on a condition, with a bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use saga_core::store::{ClaimOutcome, ClaimRequest, CreateOutcome, NewSaga, Schedule, Transition};
use saga_core::{SagaId, SagaStatus, SagaStore};
use saga_redis::RedisStore;
use saga_redis_testkit::{
    RedisServer, ServerConfig, can_spawn_servers, shared_cluster, shared_server, unique_prefix,
};

const BOUND: Duration = Duration::from_secs(20);

fn request(owner: &str) -> ClaimRequest {
    ClaimRequest {
        owner: owner.to_owned(),
        ttl: Duration::from_secs(60),
    }
}

fn new_saga(id: SagaId) -> NewSaga {
    NewSaga {
        id,
        saga_type: "claim_batch".into(),
        version: 1,
        idempotency_key: None,
        fingerprint: "fp".into(),
        state: "{}".into(),
        events: vec!["started".into()],
        claim: None,
    }
}

/// A fresh saga id in partition `p`.
fn id_in(store: &RedisStore, p: u16) -> SagaId {
    loop {
        let id = SagaId::random();
        if store.keys().partition_of(id) == p {
            return id;
        }
    }
}

async fn create_in(store: &RedisStore, p: u16) -> SagaId {
    let id = id_in(store, p);
    let created = store.create(new_saga(id)).await.unwrap();
    assert!(matches!(created, CreateOutcome::Created { lease: None }));
    id
}

async fn standalone(prefix: &str) -> RedisStore {
    RedisStore::builder()
        .url(shared_server().url())
        .key_prefix(unique_prefix(prefix))
        .connect()
        .await
        .unwrap()
}

async fn cluster(prefix: &str) -> RedisStore {
    let builder = RedisStore::builder().key_prefix(unique_prefix(prefix));
    let builder = match shared_cluster() {
        Some(cluster) => builder.cluster(cluster.urls()),
        // Printed by `shared_cluster`: the cases still run, on the standalone server.
        None => builder.url(shared_server().url()),
    };
    builder.connect().await.unwrap()
}

/// Claims in batches of `limit` until nothing is due; returns the batches.
async fn drain(store: &RedisStore, limit: usize) -> Vec<Vec<SagaId>> {
    let mut batches = Vec::new();
    loop {
        let leases = store.claim_due(&request("worker"), limit).await.unwrap();
        if leases.is_empty() {
            return batches;
        }
        assert!(
            leases.len() <= limit,
            "claim_due({limit}) returned {}",
            leases.len()
        );
        batches.push(leases.into_iter().map(|l| l.saga_id).collect());
    }
}

async fn a_busy_partition_does_not_starve_another(store: RedisStore) {
    // One saga in partition 9 first, then a burst of 40 in partition 2.
    let lone = create_in(&store, 9).await;
    let mut burst = Vec::new();
    for _ in 0..40 {
        burst.push(create_in(&store, 2).await);
    }
    let batches = drain(&store, 8).await;
    assert!(
        batches[0].contains(&lone),
        "the older saga of the quiet partition must be in the first batch: {batches:?}"
    );
    let all: Vec<SagaId> = batches.concat();
    let unique: HashSet<SagaId> = all.iter().copied().collect();
    assert_eq!(all.len(), 41, "every saga claimed: {batches:?}");
    assert_eq!(unique.len(), 41, "no saga claimed twice");
    let burst: HashSet<SagaId> = burst.into_iter().collect();
    assert!(burst.iter().all(|id| unique.contains(id)));
    assert!(
        batches.len() <= 41_usize.div_ceil(8),
        "batches are full: {} batches of 8 for 41 sagas",
        batches.len()
    );
}

async fn a_burst_of_new_sagas_does_not_starve_a_due_retry(store: RedisStore) {
    let retry = create_in(&store, 3).await;
    let lease = match store.claim(retry, &request("first")).await.unwrap() {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("claim: {other:?}"),
    };
    let wake = Transition {
        commit_id: "attempt-1-failed".into(),
        events: vec!["attempt failed".into()],
        state: "{}".into(),
        status: SagaStatus::Running,
        schedule: Schedule::WakeAfter(Duration::from_millis(30)),
    };
    store.commit(&lease, wake).await.unwrap();
    // Wait until the retry is due (the server runs on this machine's clock).
    let due = store.load(retry).await.unwrap().unwrap().due_at.unwrap();
    let started = std::time::Instant::now();
    while now_ms() <= due.0 + 2 {
        assert!(started.elapsed() < BOUND, "the retry never fell due");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A burst far larger than a batch, in every partition.
    for i in 0..48 {
        create_in(&store, i % 16).await;
    }
    let first = store.claim_due(&request("worker"), 4).await.unwrap();
    assert!(
        first.iter().any(|l| l.saga_id == retry),
        "the retry fell due before the burst and must be in the first batch: {first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_busy_partition() {
    a_busy_partition_does_not_starve_another(standalone("busy").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_busy_partition() {
    a_busy_partition_does_not_starve_another(cluster("busy").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_retry_before_burst() {
    a_burst_of_new_sagas_does_not_starve_a_due_retry(standalone("retry").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_retry_before_burst() {
    a_burst_of_new_sagas_does_not_starve_a_due_retry(cluster("retry").await).await;
}

/// Waits until the store's wake-up subscription is live (its first change).
async fn subscribed(store: &RedisStore) -> tokio::sync::watch::Receiver<u64> {
    let mut rx = store.wakeups().expect("a Redis store has wake-ups");
    tokio::time::timeout(BOUND, rx.changed())
        .await
        .expect("the wake-up subscription comes up")
        .unwrap();
    rx
}

async fn submitted_elsewhere_is_claimed_after_one_wake_up(prefix: &str, cluster_urls: bool) {
    let connect = |sweep: Duration| {
        let builder = RedisStore::builder()
            .key_prefix(prefix.to_owned())
            .due_sweep_interval(sweep);
        let builder = match (cluster_urls, shared_cluster()) {
            (true, Some(cluster)) => builder.cluster(cluster.urls()),
            _ => builder.url(shared_server().url()),
        };
        builder.connect()
    };
    // The coordinator's store never sweeps after its first claim: only hints find work.
    let coordinator = connect(Duration::from_secs(3600)).await.unwrap();
    let mut wake = subscribed(&coordinator).await;
    assert!(
        coordinator
            .claim_due(&request("c"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let client = connect(Duration::from_secs(3600)).await.unwrap();
    for p in [0, 7, 15] {
        let id = create_in(&client, p).await;
        wake.borrow_and_update();
        let mut claimed = Vec::new();
        let started = std::time::Instant::now();
        // The claim follows the wake-up; the message may arrive after the create returns.
        while claimed.is_empty() {
            assert!(started.elapsed() < BOUND, "saga {id} was never claimed");
            let _ = tokio::time::timeout(Duration::from_millis(200), wake.changed()).await;
            claimed = coordinator.claim_due(&request("c"), 10).await.unwrap();
        }
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].saga_id, id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_submitted_elsewhere_is_claimed_after_one_wake_up() {
    submitted_elsewhere_is_claimed_after_one_wake_up(&unique_prefix("elsewhere"), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_submitted_elsewhere_is_claimed_after_one_wake_up() {
    submitted_elsewhere_is_claimed_after_one_wake_up(&unique_prefix("elsewhere"), true).await;
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

fn evalsha_calls(url: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let stats = line
                .strip_prefix("cmdstat_evalsha:")
                .or_else(|| line.strip_prefix("cmdstat_eval:"))?;
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_due_a_claim_makes_no_round_trip_and_timers_set_elsewhere_are_swept() {
    if !can_spawn_servers("claim_batch") {
        return;
    }
    // Its own server, so that nobody else's calls show in its command counts.
    let server = RedisServer::start(ServerConfig::new());
    let prefix = unique_prefix("quiet");
    let connect = |sweep: Duration| {
        RedisStore::builder()
            .url(server.url())
            .key_prefix(prefix.clone())
            .due_sweep_interval(sweep)
            .connect()
    };
    let quiet = connect(Duration::from_secs(3600)).await.unwrap();
    let _wake = subscribed(&quiet).await;
    assert!(quiet.claim_due(&request("q"), 10).await.unwrap().is_empty());
    let before = evalsha_calls(&server.url());
    for _ in 0..20 {
        assert!(quiet.claim_due(&request("q"), 10).await.unwrap().is_empty());
    }
    assert_eq!(
        evalsha_calls(&server.url()),
        before,
        "claims with no hint of due work must not call the server"
    );

    // A timer set by another process announces nothing; the sweep finds it.
    let sweeping = connect(Duration::from_millis(50)).await.unwrap();
    let _wake = subscribed(&sweeping).await;
    assert!(
        sweeping
            .claim_due(&request("s"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let other = connect(Duration::from_secs(3600)).await.unwrap();
    // Created with its creator's lease (announces nothing), then put on a timer (neither).
    let id = id_in(&other, 4);
    let mut new = new_saga(id);
    new.claim = Some(request("other"));
    let lease = match other.create(new).await.unwrap() {
        CreateOutcome::Created { lease: Some(lease) } => lease,
        created => panic!("create: {created:?}"),
    };
    let sleep = Transition {
        commit_id: "sleep".into(),
        events: vec!["sleeping".into()],
        state: "{}".into(),
        status: SagaStatus::Running,
        schedule: Schedule::WakeAfter(Duration::from_millis(100)),
    };
    other.commit(&lease, sleep).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let claimed = sweeping.claim_due(&request("s"), 10).await.unwrap();
        if claimed.iter().any(|l| l.saga_id == id) {
            break;
        }
        assert!(started.elapsed() < BOUND, "the timer was never found");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_partition_key_does_not_stop_claiming_from_the_others() {
    let store = standalone("damaged").await;
    let healthy = create_in(&store, 5).await;
    // Partition 3's due set is overwritten with a string (an operator's mistake).
    let client = redis::Client::open(shared_server().url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("SET")
        .arg(store.keys().due(3))
        .arg("not a zset")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let claimed = store.claim_due(&request("worker"), 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|l| l.saga_id).collect::<Vec<_>>(),
        vec![healthy],
        "the healthy partition is claimed from"
    );
}
