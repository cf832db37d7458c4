//! Several `deal-flow-coordinator` processes on one Redis (and on a Redis Cluster): real
//! processes, real servers. Each test ends only the processes it started (by their `Child`),
//! and waits for conditions with bounds (never a fixed sleep as synchronisation).

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_core::store::{ListQuery, SagaStore};
use saga_core::{Engine, EventKind, SagaEvent, SagaId, SagaStatus, StartOptions};
use saga_examples::deal::DealFlow;
use saga_examples::load::deal_request;
use saga_examples::ops::{StoreArgs, engine_builder};
use saga_examples::redis_office::RedisOffice;
use saga_redis_testkit::{
    RedisCluster, RedisServer, ServerConfig, can_spawn_servers, unique_prefix,
};
use support::Proc;

const POLL: Duration = Duration::from_millis(50);

/// Polls `condition` until it holds; panics with `what` after `bound`.
fn wait_until(what: &str, bound: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {bound:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Where the store is, as flags.
#[derive(Clone)]
enum Target {
    Server(String),
    Cluster(Vec<String>),
}

impl Target {
    fn flags(&self) -> Vec<String> {
        match self {
            Target::Server(url) => vec!["--redis-url".into(), url.clone()],
            Target::Cluster(urls) => vec!["--cluster-urls".into(), urls.join(",")],
        }
    }

    fn store_args(&self, prefix: &str) -> StoreArgs {
        StoreArgs {
            redis_url: match self {
                Target::Server(url) => Some(url.clone()),
                Target::Cluster(_) => None,
            },
            cluster_urls: match self {
                Target::Server(_) => Vec::new(),
                Target::Cluster(urls) => urls.clone(),
            },
            redis_url_file: None,
            key_prefix: prefix.to_owned(),
            partitions: 16,
            tls: Default::default(),
            allow_unsafe_redis_config: Vec::new(),
        }
    }

    fn ledger_entries(&self, prefix: &str) -> usize {
        let key = RedisOffice::entries_key(prefix);
        let result = match self {
            Target::Server(url) => redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("LLEN").arg(&key).query::<usize>(&mut c)),
            Target::Cluster(urls) => redis::cluster::ClusterClient::new(urls.clone())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("LLEN").arg(&key).query::<usize>(&mut c)),
        };
        result.unwrap_or(0)
    }
}

/// Log lines on stderr that report a rejected late write.
fn fenced_lines(proc: &Proc) -> usize {
    proc.stderr()
        .lines()
        .filter(|l| l.contains("write fenced") || l.contains("lease renewal rejected"))
        .count()
}

fn coordinator(
    dir: &tempfile::TempDir,
    owner: &str,
    target: &Target,
    prefix: &str,
    extra: &[&str],
) -> Proc {
    let mut args = target.flags();
    args.extend(
        [
            "--key-prefix",
            prefix,
            "--owner",
            owner,
            "--log-format",
            "json",
            "--http-addr",
            "off",
            "--poll-interval",
            "100ms",
        ]
        .map(str::to_owned),
    );
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut proc = Proc::spawn(
        dir,
        owner,
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &args,
    );
    proc.wait_ready();
    proc
}

fn load(
    dir: &tempfile::TempDir,
    target: &Target,
    prefix: &str,
    count: usize,
    timeout: &str,
) -> Proc {
    let mut args = target.flags();
    args.extend(
        [
            "--key-prefix",
            prefix,
            "--count",
            &count.to_string(),
            "--timeout",
            timeout,
            "--log-format",
            "json",
        ]
        .map(str::to_owned),
    );
    Proc::spawn(dir, "load", env!("CARGO_BIN_EXE_deal-flow-load"), &args)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A client-only engine on the test's store (it runs no workers).
fn client(rt: &tokio::runtime::Runtime, target: &Target, prefix: &str) -> Engine {
    rt.block_on(async {
        let (store, _) = target.store_args(prefix).connect().await.unwrap();
        engine_builder(store, "test-client").build().unwrap()
    })
}

fn sagas_with(rt: &tokio::runtime::Runtime, engine: &Engine) -> Vec<(SagaId, Vec<SagaEvent>)> {
    rt.block_on(async {
        let mut out = Vec::new();
        for (id, _, _) in saga_examples::scenario::all_sagas(engine).await.unwrap() {
            out.push((id, engine.history(id).await.unwrap()));
        }
        out
    })
}

/// Sagas whose lease `owner` holds now, with their fence.
fn held_by(
    rt: &tokio::runtime::Runtime,
    store: &Arc<dyn SagaStore>,
    owner: &str,
) -> BTreeMap<SagaId, u64> {
    rt.block_on(async {
        let mut held = BTreeMap::new();
        for status in [SagaStatus::Running, SagaStatus::Compensating] {
            let query = ListQuery {
                status: Some(status),
                limit: 1000,
                ..ListQuery::default()
            };
            for summary in store.list(&query).await.unwrap().sagas {
                if let Some(saga) = store.load(summary.id).await.unwrap()
                    && saga.lease.as_ref().is_some_and(|l| l.owner == owner)
                {
                    held.insert(saga.id, saga.fence);
                }
            }
        }
        held
    })
}

fn taken_over(
    rt: &tokio::runtime::Runtime,
    store: &Arc<dyn SagaStore>,
    held: &BTreeMap<SagaId, u64>,
) -> bool {
    rt.block_on(async {
        for (id, fence) in held {
            if let Some(saga) = store.load(*id).await.unwrap()
                && saga.fence > *fence
            {
                return true;
            }
        }
        false
    })
}

/// Three coordinators, 20 % transient faults; one is SIGKILLed and another SIGSTOPped past
/// its lease, then continued: every saga ends, the ledger check holds, and the stopped one's
/// late writes were rejected.
fn kill_and_stop(target: &Target, prefix: &str, count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--lease",
        "2s",
        "--inline-wait-max",
        "500ms",
        "--workers",
        "4",
        "--fault-rate",
        "0.2",
        "--seed",
        "5",
    ];
    let mut a = coordinator(&dir, "coord-a", target, prefix, &flags);
    let mut b = coordinator(&dir, "coord-b", target, prefix, &flags);
    let mut c = coordinator(&dir, "coord-c", target, prefix, &flags);
    let rt = runtime();
    let engine = client(&rt, target, prefix);
    let store = Arc::clone(engine.store());
    let mut load = load(&dir, target, prefix, count, "150s");

    // Effects are being applied: kill A without warning.
    wait_until("as many effects as sagas", Duration::from_secs(90), || {
        target.ledger_entries(prefix) >= count
    });
    a.kill();
    a.wait_exit(Duration::from_secs(10));
    // Stop B (it keeps its leases on paper) until another coordinator took over one of them.
    // What B holds is read once it is stopped: a saga listed while B runs may finish before
    // the signal lands (an effect takes milliseconds), and a finished saga is never taken
    // over. If B holds nothing once stopped, it is continued and stopped again later.
    let held = loop {
        if held_by(&rt, &store, "coord-b").is_empty() && load.exited().is_none() {
            std::thread::sleep(POLL);
            continue;
        }
        b.signal("STOP");
        let held = held_by(&rt, &store, "coord-b");
        if !held.is_empty() || load.exited().is_some() {
            break held;
        }
        b.signal("CONT");
    };
    println!("coord-b held {} sagas when stopped", held.len());
    // Unconditional: a run in which B never held a saga while the load ran proves nothing
    // about fencing, so it fails rather than passes quietly.
    assert!(
        !held.is_empty(),
        "coord-b held no saga whenever it was stopped before the load ended; the fencing of a stopped coordinator went untested"
    );
    wait_until(
        "a saga of the stopped coordinator to be taken over",
        Duration::from_secs(60),
        || taken_over(&rt, &store, &held),
    );
    b.signal("CONT");

    let status = load.wait_exit(Duration::from_secs(170));
    let summary = load.event("load_summary").unwrap_or_else(|| {
        panic!(
            "no summary from the load:\n{}\n{}",
            load.stdout(),
            load.stderr()
        )
    });
    println!("{}", load.stdout());
    assert!(status.success(), "load failed: {summary}");
    assert_eq!(summary["ledger_ok"], true, "{summary}");
    assert_eq!(summary["unfinished"], 0, "{summary}");
    assert!(
        summary["resumes"].as_u64().unwrap() >= 1,
        "nothing was resumed: {summary}"
    );

    for proc in [&mut b, &mut c] {
        proc.signal("TERM");
        let status = proc.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "{} exited with {status}:\n{}",
            proc.name(),
            proc.stderr()
        );
        assert!(proc.event("stopped").is_some(), "{}", proc.stdout());
    }
    let fenced = fenced_lines(&b);
    println!(
        "late writes of the stopped coordinator rejected: {fenced} (it held {} sagas)",
        held.len()
    );
    assert!(
        fenced >= 1,
        "the stopped coordinator held sagas but no late write was rejected"
    );
    // Every saga in the store is terminal.
    for (id, events) in sagas_with(&rt, &engine) {
        let terminal = events.iter().any(|e| {
            matches!(
                e.kind,
                EventKind::SagaCompleted { .. }
                    | EventKind::SagaCompensated
                    | EventKind::SagaFailed { .. }
            )
        });
        assert!(terminal, "saga {id} did not end");
    }
}

#[test]
fn three_coordinators_survive_a_kill_and_a_stop_on_one_redis() {
    if !can_spawn_servers("three_coordinators_survive_a_kill_and_a_stop_on_one_redis") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    let prefix = unique_prefix("kill_and_stop");
    kill_and_stop(&Target::Server(server.url()), &prefix, 300);
}

#[test]
fn three_coordinators_survive_a_kill_and_a_stop_on_a_cluster() {
    if !can_spawn_servers("three_coordinators_survive_a_kill_and_a_stop_on_a_cluster") {
        return;
    }
    let cluster = RedisCluster::start(3);
    let prefix = unique_prefix("kill_and_stop_cluster");
    kill_and_stop(&Target::Cluster(cluster.urls()), &prefix, 120);
}

/// SIGTERM: the coordinator exits 0 within its grace period and releases its leases; a second
/// coordinator resumes its sagas while the first one's 60 s leases would still be valid.
#[test]
fn sigterm_releases_leases_and_another_coordinator_resumes_at_once() {
    if !can_spawn_servers("sigterm_releases_leases_and_another_coordinator_resumes_at_once") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    let target = Target::Server(server.url());
    let prefix = unique_prefix("sigterm");
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_secs(60);
    let flags = [
        "--lease",
        "60s",
        "--workers",
        "6",
        "--latency-ms",
        "20..60",
        "--shutdown-grace",
        "5s",
    ];
    let mut first = coordinator(&dir, "first", &target, &prefix, &flags);
    let mut load = load(&dir, &target, &prefix, 60, "120s");
    wait_until("some effects", Duration::from_secs(60), || {
        target.ledger_entries(&prefix) >= 20
    });
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(5 + 15));
    assert!(
        status.success(),
        "first exited with {status}:\n{}",
        first.stderr()
    );
    let report = first.event("stopped").expect("a report line");
    println!("first coordinator's report: {report}");
    let released =
        report["interrupted"].as_u64().unwrap() + report["released_at_shutdown"].as_u64().unwrap();
    assert!(released >= 1, "no saga was in flight at SIGTERM: {report}");
    // Alone on the store with long leases, nothing fenced it and no lease lapsed: its runs
    // were interrupted by the shutdown, and the report says so by cause.
    let by = &report["interrupted_by"];
    assert_eq!(by["fenced"], 0, "{report}");
    assert_eq!(by["lease_lapsed"], 0, "{report}");
    let counted: u64 = ["fenced", "lease_lapsed", "store_unavailable", "shut_down"]
        .iter()
        .map(|cause| by[cause].as_u64().unwrap())
        .sum();
    assert!(
        counted <= report["interrupted"].as_u64().unwrap(),
        "{report}"
    );

    let mut second = coordinator(&dir, "second", &target, &prefix, &flags);
    let status = load.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "load failed:\n{}", load.stdout());
    second.signal("TERM");
    assert!(second.wait_exit(Duration::from_secs(20)).success());

    let rt = runtime();
    let engine = client(&rt, &target, &prefix);
    let mut handed_over = 0;
    for (id, events) in sagas_with(&rt, &engine) {
        let Some(taken) = events.iter().position(
            |e| matches!(&e.kind, EventKind::LeaseAcquired { owner, .. } if owner == "second"),
        ) else {
            continue;
        };
        let first_held = events[..taken]
            .iter()
            .any(|e| matches!(&e.kind, EventKind::LeaseAcquired { owner, .. } if owner == "first"));
        if !first_held {
            continue;
        }
        handed_over += 1;
        // The first coordinator's lease ran at least until its last write plus the lease.
        let last_write = events[taken - 1].at;
        let valid_until = last_write.plus(lease);
        assert!(
            events[taken].at < valid_until,
            "saga {id} was resumed only after the lease lapsed"
        );
        let end = events.last().unwrap();
        assert!(
            end.at < valid_until,
            "saga {id} ended only after the first lease would have lapsed"
        );
    }
    println!("sagas handed over by the graceful shutdown: {handed_over}");
    assert!(
        handed_over >= 1,
        "no saga of the first coordinator was resumed by the second"
    );
}

/// A 3 s durable backoff survives a restart of every coordinator, and the retry starts no
/// earlier than its recorded time.
#[test]
fn a_durable_backoff_survives_restarting_every_coordinator() {
    if !can_spawn_servers("a_durable_backoff_survives_restarting_every_coordinator") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    let target = Target::Server(server.url());
    let prefix = unique_prefix("durable_backoff");
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--inline-wait-max",
        "200ms",
        "--throttle",
        "update_portfolio=3s",
    ];
    let first = [
        coordinator(&dir, "old-1", &target, &prefix, &flags),
        coordinator(&dir, "old-2", &target, &prefix, &flags),
    ];
    let rt = runtime();
    let engine = client(&rt, &target, &prefix);
    let request = deal_request(3, 0, 0.0);
    let started = rt
        .block_on(engine.start_with::<DealFlow>(&request, StartOptions::key("durable-backoff-1")))
        .unwrap();
    let failed_at = || {
        rt.block_on(engine.history(started.id))
            .unwrap()
            .into_iter()
            .find_map(|e| match e.kind {
                EventKind::StepAttemptFailed {
                    position,
                    next_retry_at,
                    ..
                } => Some((position, next_retry_at)),
                _ => None,
            })
    };
    wait_until("the throttled attempt", Duration::from_secs(30), || {
        failed_at().is_some()
    });
    for mut proc in first {
        proc.signal("TERM");
        assert!(proc.wait_exit(Duration::from_secs(20)).success());
    }
    let _new = [
        coordinator(&dir, "new-1", &target, &prefix, &flags),
        coordinator(&dir, "new-2", &target, &prefix, &flags),
    ];
    let outcome = rt
        .block_on(engine.wait(started.id, Duration::from_secs(30)))
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed);
    let (position, next_retry_at) = failed_at().unwrap();
    let history = rt.block_on(engine.history(started.id)).unwrap();
    let retry = history
        .iter()
        .find(|e| matches!(e.kind, EventKind::StepStarted { position: p, attempt: 2, .. } if p == position))
        .expect("a second attempt");
    println!("retry due {next_retry_at}, started {}", retry.at);
    assert!(
        retry.at >= next_retry_at,
        "retried at {} before {next_retry_at}",
        retry.at
    );
    let resumed_by_new = history.iter().any(
        |e| matches!(&e.kind, EventKind::LeaseAcquired { owner, .. } if owner.starts_with("new-")),
    );
    assert!(
        resumed_by_new,
        "the retry did not run in a restarted coordinator"
    );
}

/// A saga submitted by a client-only process is picked up and completed; `wait` returns it.
#[test]
fn a_saga_from_a_client_only_process_is_picked_up() {
    if !can_spawn_servers("a_saga_from_a_client_only_process_is_picked_up") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new());
    let target = Target::Server(server.url());
    let prefix = unique_prefix("client_only");
    let dir = tempfile::tempdir().unwrap();
    let _worker = coordinator(&dir, "worker", &target, &prefix, &[]);
    let rt = runtime();
    let engine = client(&rt, &target, &prefix);
    let request = deal_request(9, 1, 0.0);
    let started = rt
        .block_on(engine.start_with::<DealFlow>(&request, StartOptions::key("client-1")))
        .unwrap();
    let outcome = rt
        .block_on(engine.wait(started.id, Duration::from_secs(30)))
        .unwrap();
    assert_eq!(outcome.status, SagaStatus::Completed, "{outcome:?}");
    assert!(outcome.output.is_some());
}

/// One HTTP/1.1 request over a fresh connection; returns the status code and the body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    // Chunked bodies keep their chunk-size lines; the metric lines parse regardless.
    (status, body)
}

/// The sum of every sample of `name` whose labels contain each of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.split_whitespace().next().unwrap_or_default();
            (series == name || series.starts_with(&format!("{name}{{")))
                && labels.iter().all(|label| series.contains(label))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// `/metrics` after a run shows counters that match the sagas' histories.
#[test]
fn metrics_match_the_run() {
    if !can_spawn_servers("metrics_match_the_run") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new());
    let target = Target::Server(server.url());
    let prefix = unique_prefix("metrics");
    let dir = tempfile::tempdir().unwrap();
    // The API as deployed: a token with the scopes this client needs.
    let principal = saga_http::Principal::new(
        "metrics-test",
        saga_http::parse_scopes("start,read,metrics").unwrap(),
    )
    .unwrap();
    let token = saga_http::GeneratedToken::new(&principal).unwrap();
    let bearer = format!("Bearer {}", token.token);
    let mut args = target.flags();
    args.extend(
        [
            "--api-tokens",
            &token.config_line,
            "--key-prefix",
            &prefix,
            "--owner",
            "metered",
            "--log-format",
            "json",
            "--http-addr",
            "127.0.0.1:0",
            "--fault-rate",
            "0.3",
            "--seed",
            "4",
        ]
        .map(str::to_owned),
    );
    let mut proc = Proc::spawn(
        &dir,
        "metered",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &args,
    );
    let ready = proc.wait_ready();
    let addr = ready["http_addr"]
        .as_str()
        .expect("an HTTP address")
        .to_owned();
    assert_eq!(http(&addr, "GET", "/healthz", &[], "").0, 200);
    assert_eq!(http(&addr, "GET", "/readyz", &[], "").0, 200);
    // The API as deployed answers nobody without a token.
    assert_eq!(http(&addr, "GET", "/metrics", &[], "").0, 401);
    let (status, reply) = http(
        &addr,
        "POST",
        "/sagas/deal_flow",
        &[("content-type", "application/json")],
        "{}",
    );
    assert_eq!(status, 401, "{reply}");
    let count = 15;
    let mut ids = Vec::new();
    for index in 0..count {
        let body = serde_json::to_string(&deal_request(4, index, 0.1)).unwrap();
        let key = format!("metrics-{index}");
        let headers = [
            ("content-type", "application/json"),
            ("idempotency-key", key.as_str()),
            ("authorization", bearer.as_str()),
        ];
        let (status, reply) = http(&addr, "POST", "/sagas/deal_flow", &headers, &body);
        assert!(status == 201, "start answered {status}: {reply}");
        let reply: serde_json::Value = serde_json::from_str(reply.trim()).unwrap();
        ids.push(reply["id"].as_str().unwrap().parse::<SagaId>().unwrap());
        if index == 0 {
            let (status, _) = http(&addr, "POST", "/sagas/deal_flow", &headers, &body);
            assert_eq!(status, 200, "a repeated key answers 200");
        }
    }
    let rt = runtime();
    let engine = client(&rt, &target, &prefix);
    for id in &ids {
        let outcome = rt
            .block_on(engine.wait(*id, Duration::from_secs(60)))
            .unwrap();
        assert!(outcome.status.is_terminal());
    }
    let histories = sagas_with(&rt, &engine);
    let events = || histories.iter().flat_map(|(_, e)| e.iter());
    let with_status = |status: &str| {
        histories
            .iter()
            .filter(|(_, e)| {
                e.iter().any(|ev| {
                    matches!(
                        (&ev.kind, status),
                        (EventKind::SagaCompleted { .. }, "completed")
                            | (EventKind::SagaCompensated, "compensated")
                    )
                })
            })
            .count() as f64
    };
    let retries = events()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::StepAttemptFailed { .. } | EventKind::CompensationAttemptFailed { .. }
            )
        })
        .count() as f64;
    let resumes = events()
        .filter(|e| matches!(e.kind, EventKind::SagaResumed { .. }))
        .count() as f64;
    // Counters are bumped right after the commit the waiters see: scrape until they settle.
    let mut text = String::new();
    wait_until(
        "the finished counter to reach the run's size",
        Duration::from_secs(20),
        || {
            text = http(&addr, "GET", "/metrics", &[("authorization", &bearer)], "").1;
            metric(&text, "saga_finished_total", &[]) >= count as f64
        },
    );
    println!(
        "{}",
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(metric(&text, "saga_started_total", &[]), count as f64);
    assert!(metric(&text, "saga_idempotency_hits_total", &[]) >= 1.0);
    assert_eq!(
        metric(&text, "saga_finished_total", &["status=\"completed\""]),
        with_status("completed")
    );
    assert_eq!(
        metric(&text, "saga_finished_total", &["status=\"compensated\""]),
        with_status("compensated")
    );
    assert_eq!(
        metric(&text, "saga_step_attempts_total", &["outcome=\"retry\""]),
        retries
    );
    assert!(retries >= 1.0, "a 30 % fault rate gave no retry");
    assert_eq!(metric(&text, "saga_resumed_total", &[]), resumes);
    assert!(metric(&text, "saga_step_attempts_total", &["outcome=\"success\""]) >= 1.0);
    assert_eq!(
        metric(&text, "saga_duration_seconds_count", &[]),
        count as f64
    );
    proc.signal("TERM");
    assert!(proc.wait_exit(Duration::from_secs(20)).success());
}

/// `scripts/local-cluster.sh` starts a 3-master cluster and two coordinators, a few sagas
/// complete on it, and `stop` ends exactly the recorded processes.
#[test]
fn local_cluster_script_runs_sagas_and_stops() {
    if !can_spawn_servers("local_cluster_script_runs_sagas_and_stops") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/local-cluster.sh");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_deal-flow-coordinator"))
        .parent()
        .unwrap()
        .to_owned();
    // Ports derived from the pid, so parallel test runs do not collide.
    let base = 20_000 + (std::process::id() % 2_000) * 10;
    let run = |cmd: &str| {
        Command::new("bash")
            .args([script, cmd, dir.path().to_str().unwrap()])
            .env("BIN_DIR", &bin)
            .env("BASE_PORT", base.to_string())
            .env("HTTP_BASE_PORT", (base + 5).to_string())
            .output()
            .unwrap()
    };
    let started = run("start");
    let stdout = String::from_utf8_lossy(&started.stdout).into_owned();
    let pids = std::fs::read_to_string(dir.path().join("pids")).unwrap_or_default();
    let stop_on_failure = scopeguard(|| {
        let _ = run("stop");
    });
    assert!(
        started.status.success(),
        "start failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&started.stderr)
    );
    assert_eq!(pids.lines().count(), 5, "{pids}");
    let urls: Vec<String> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("REDIS_CLUSTER_URLS="))
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect();
    let output = Command::new(env!("CARGO_BIN_EXE_deal-flow-load"))
        .args([
            "--cluster-urls",
            &urls.join(","),
            "--count",
            "5",
            "--timeout",
            "60s",
        ])
        .env_remove("REDIS_URL")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    // Dropping the guard runs `stop`.
    drop(stop_on_failure);
    assert!(!dir.path().join("pids").exists(), "stop left its pid file");
    for line in pids.lines() {
        let pid = line.split_whitespace().next().unwrap();
        wait_until(
            "the recorded processes to end",
            Duration::from_secs(20),
            || {
                !Command::new("kill")
                    .args(["-0", pid])
                    .status()
                    .unwrap()
                    .success()
            },
        );
    }
}

/// Runs `f` when dropped (a failed assertion stops the script's processes too).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
