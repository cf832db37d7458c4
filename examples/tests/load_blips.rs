//! `deal-flow-load` rides out store blips (issue 8, item 6): a `deal-flow-coordinator` and a
//! `deal-flow-load` run against a durable redis-server (AOF, `appendfsync always`), and in
//! the middle of the run the server is (1) killed with SIGKILL, kept down for 5 s and
//! restarted on the same port and directory, or (2) paused with `CLIENT PAUSE 10000 ALL`.
//! The load must still exit 0, and every saga it acknowledged must be terminal in the store
//! afterwards, each exactly once.
//!
//! "Mid-run" is a condition (the ledger shows effects applied, the load still runs), never a
//! sleep; the 5 s outage is a deliberate length, not synchronisation. Each test ends only the
//! processes it started, by their handles.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod support;

use std::time::{Duration, Instant};

use saga_core::store::ListQuery;
use saga_core::{Engine, Saga as _, SagaId, SagaStore as _, content_key};
use saga_examples::deal::DealFlow;
use saga_examples::redis_office::RedisOffice;
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers, unique_prefix};
use support::Proc;

const POLL: Duration = Duration::from_millis(20);

/// Sagas per run: enough that the run is still going when the blip comes.
const COUNT: usize = 240;

const RUN_ID: &str = "blips";

fn coordinator(dir: &tempfile::TempDir, url: &str, prefix: &str) -> Proc {
    let args = [
        "--redis-url",
        url,
        "--key-prefix",
        prefix,
        "--owner",
        "blip-coordinator",
        "--log-format",
        "json",
        "--http-addr",
        "off",
        "--poll-interval",
        "100ms",
        "--workers",
        "8",
        "--latency-ms",
        "10..30",
    ]
    .map(str::to_owned);
    let mut proc = Proc::spawn(
        dir,
        "coordinator",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &args,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while proc.event("ready").is_none() {
        if let Some(status) = proc.exited() {
            panic!(
                "the coordinator exited ({status}) before it was ready:\n{}",
                proc.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator was not ready within 60 s"
        );
        std::thread::sleep(POLL);
    }
    proc
}

fn load(dir: &tempfile::TempDir, url: &str, prefix: &str) -> Proc {
    let args = [
        "--redis-url",
        url,
        "--key-prefix",
        prefix,
        "--run-id",
        RUN_ID,
        "--count",
        &COUNT.to_string(),
        "--timeout",
        "50s",
        "--log-format",
        "json",
    ]
    .map(str::to_owned);
    Proc::spawn(dir, "load", env!("CARGO_BIN_EXE_deal-flow-load"), &args)
}

/// Effects applied so far (0 while the server cannot be read).
fn ledger_entries(url: &str, prefix: &str) -> usize {
    redis::Client::open(url)
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
        .and_then(|mut conn| {
            redis::cmd("LLEN")
                .arg(RedisOffice::entries_key(prefix))
                .query::<usize>(&mut conn)
        })
        .unwrap_or(0)
}

/// Waits until the run is in full swing: effects applied, the load still running.
fn wait_mid_run(url: &str, prefix: &str, load: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while ledger_entries(url, prefix) < COUNT / 4 {
        assert!(
            load.exited().is_none(),
            "the load ended before the blip:\n{}\n{}",
            load.stdout(),
            load.stderr()
        );
        assert!(
            Instant::now() < deadline,
            "no effects applied within 40 s:\n{}",
            load.stderr()
        );
        std::thread::sleep(POLL);
    }
    assert!(
        load.exited().is_none(),
        "the load ended before the blip:\n{}",
        load.stdout()
    );
}

/// The load exited 0 with a summary that counts every saga as acknowledged and finished.
fn assert_load_completed(load: &mut Proc) -> serde_json::Value {
    let status = load.wait_exit(Duration::from_secs(90));
    let summary = load.event("load_summary").unwrap_or_else(|| {
        panic!(
            "no summary from the load ({status}):\n{}\n{}",
            load.stdout(),
            load.stderr()
        )
    });
    println!("{}", load.stdout());
    assert!(
        status.success(),
        "the load failed ({status}): {summary}\n{}",
        load.stderr()
    );
    assert_eq!(summary["acknowledged"], COUNT, "{summary}");
    assert_eq!(summary["start_errors"], 0, "{summary}");
    assert_eq!(summary["unfinished"], 0, "{summary}");
    assert_eq!(summary["ledger_ok"], true, "{summary}");
    summary
}

/// Checked from outside the load: every acknowledged saga (the run's keys) is terminal, and
/// the store holds no other saga (no start made a second one).
fn assert_every_saga_terminal(url: &str, prefix: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = RedisStore::builder()
            .url(url)
            .key_prefix(prefix)
            .connect()
            .await
            .unwrap();
        let engine = Engine::builder(store.clone()).build().unwrap();
        for index in 0..COUNT {
            let key = content_key(&["deal-flow-load", RUN_ID, &index.to_string()]);
            let id = SagaId::from_idempotency_key(DealFlow::NAME, &key);
            let outcome = engine
                .outcome(id)
                .await
                .unwrap_or_else(|err| panic!("saga #{index} ({id}) is missing: {err}"));
            assert!(
                outcome.status.is_terminal(),
                "saga #{index} ({id}) is {}",
                outcome.status
            );
        }
        let mut stored = 0;
        let mut after = None;
        loop {
            let page = store
                .list(&ListQuery {
                    limit: 1000,
                    after,
                    ..ListQuery::default()
                })
                .await
                .unwrap();
            stored += page.sagas.len();
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(stored, COUNT, "the store holds other sagas than the run's");
    });
}

#[test]
fn the_load_completes_across_a_killed_and_restarted_server() {
    if !can_spawn_servers("the_load_completes_across_a_killed_and_restarted_server") {
        return;
    }
    let mut server = RedisServer::start(ServerConfig::new().durable());
    let url = server.url();
    let prefix = unique_prefix("blip_kill");
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = coordinator(&dir, &url, &prefix);
    let mut load = load(&dir, &url, &prefix);

    wait_mid_run(&url, &prefix, &mut load);
    server.kill(); // SIGKILL: a crash, not a shutdown
    // A deliberate outage of 5 s, not synchronisation.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        load.exited().is_none(),
        "the load gave up while the server was down:\n{}\n{}",
        load.stdout(),
        load.stderr()
    );
    server.restart();

    assert_load_completed(&mut load);
    // It met the outage and rode it out (this is what used to end it with "broken pipe").
    assert!(
        load.stderr().contains("store unavailable; retrying"),
        "the load never retried:\n{}",
        load.stderr()
    );
    assert_every_saga_terminal(&url, &prefix);
    let status = coordinator.terminate();
    assert!(
        status.success(),
        "the coordinator exited with {status}:\n{}",
        coordinator.stderr()
    );
}

#[test]
fn the_load_completes_across_a_client_pause() {
    if !can_spawn_servers("the_load_completes_across_a_client_pause") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    let url = server.url();
    let prefix = unique_prefix("blip_pause");
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = coordinator(&dir, &url, &prefix);
    let mut load = load(&dir, &url, &prefix);

    wait_mid_run(&url, &prefix, &mut load);
    let mut admin = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("ALL")
        .query::<()>(&mut admin)
        .unwrap();

    assert_load_completed(&mut load);
    assert_every_saga_terminal(&url, &prefix);
    let status = coordinator.terminate();
    assert!(
        status.success(),
        "the coordinator exited with {status}:\n{}",
        coordinator.stderr()
    );
}
