//! Throughput, p99 saga latency and submit-to-first-step latency of 1, 2 and 4 coordinator
//! processes (`bench-coordinator`) on one Redis and on a local 3-master Redis Cluster, with a
//! client-only process (this one) submitting 4-step sagas and waiting for their outcomes.
//!
//! `cargo build --release -p saga-bench && target/release/coordinators-throughput --sagas 2000`

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use saga_bench::{FourSteps, percentiles};
use saga_core::{Engine, EventKind, SagaStatus, StartOptions};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisCluster, RedisServer, ServerConfig, unique_prefix};

/// Multi-coordinator benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Sagas per measurement.
    #[arg(long, default_value_t = 2_000)]
    sagas: u64,
    /// Coordinator process counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    coordinators: Vec<usize>,
    /// Sagas the client keeps in flight.
    #[arg(long, default_value_t = 64)]
    in_flight: u64,
    /// Workers per coordinator.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Skip the cluster measurements.
    #[arg(long)]
    no_cluster: bool,
}

#[derive(Clone)]
enum Target {
    Standalone(String),
    Cluster(Vec<String>),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Standalone(_) => "redis",
            Target::Cluster(_) => "cluster",
        }
    }

    fn args(&self) -> Vec<String> {
        match self {
            Target::Standalone(url) => vec!["--redis-url".into(), url.clone()],
            Target::Cluster(urls) => vec!["--cluster-urls".into(), urls.join(",")],
        }
    }

    async fn store(&self, prefix: &str) -> RedisStore {
        let builder = RedisStore::builder().key_prefix(prefix.to_owned());
        let builder = match self {
            Target::Standalone(url) => builder.url(url.clone()),
            Target::Cluster(urls) => builder.cluster(urls.clone()),
        };
        builder
            .connect()
            .await
            .unwrap_or_else(|err| panic!("connect: {err}"))
    }
}

fn spawn_coordinator(target: &Target, prefix: &str, owner: &str, workers: usize) -> Child {
    let exe = std::env::current_exe()
        .unwrap_or_else(|err| panic!("current exe: {err}"))
        .with_file_name("bench-coordinator");
    let mut child = Command::new(&exe)
        .args(target.args())
        .args([
            "--key-prefix",
            prefix,
            "--owner",
            owner,
            "--workers",
            &workers.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot start {}: {err} (build it: cargo build --release -p saga-bench)",
                exe.display()
            )
        });
    // Wait for its "ready" line (bounded by the process: it exits on a failure).
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    assert_eq!(line.trim(), "ready", "bench-coordinator did not start");
    child
}

struct Row {
    target: &'static str,
    coordinators: usize,
    sagas_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    first_step_p50_ms: f64,
    first_step_p99_ms: f64,
}

async fn measure(target: &Target, coordinators: usize, args: &Args) -> Row {
    let prefix = unique_prefix("bench");
    let mut children: Vec<Child> = (0..coordinators)
        .map(|n| spawn_coordinator(target, &prefix, &format!("bench-{n}"), args.workers))
        .collect();
    // A client-only engine: it submits and waits, it runs nothing.
    let engine = Engine::builder(target.store(&prefix).await)
        .register(FourSteps)
        .build()
        .unwrap_or_else(|err| panic!("{err}"));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.in_flight {
        let (engine, next, total) = (engine.clone(), Arc::clone(&next), args.sagas);
        tasks.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return mine;
                }
                let begun = Instant::now();
                let id = engine
                    .start_with::<FourSteps>(&n, StartOptions::default())
                    .await
                    .unwrap_or_else(|err| panic!("start: {err}"))
                    .id;
                let outcome = engine
                    .wait(id, Duration::from_secs(120))
                    .await
                    .unwrap_or_else(|err| panic!("wait: {err}"));
                assert_eq!(outcome.status, SagaStatus::Completed);
                mine.push((id, begun.elapsed()));
            }
        });
    }
    let mut done = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        done.extend(joined.unwrap_or_else(|err| panic!("task: {err}")));
    }
    let elapsed = started.elapsed();
    // Submit-to-first-step, from the histories of a sample (the store's clock on both ends).
    let mut first_step = Vec::new();
    for (id, _) in done.iter().step_by(10) {
        let history = engine
            .history(*id)
            .await
            .unwrap_or_else(|err| panic!("history: {err}"));
        let submitted = history.first().map(|e| e.at);
        let first = history
            .iter()
            .find(|e| matches!(e.kind, EventKind::StepStarted { .. }))
            .map(|e| e.at);
        if let (Some(a), Some(b)) = (submitted, first) {
            first_step.push(b.since(a));
        }
    }
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (p50, p99) = percentiles(done.iter().map(|(_, d)| *d).collect());
    let (f50, f99) = percentiles(first_step);
    Row {
        target: target.name(),
        coordinators,
        sagas_per_s: done.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: p50 / 1000.0,
        p99_ms: p99 / 1000.0,
        first_step_p50_ms: f50 / 1000.0,
        first_step_p99_ms: f99 / 1000.0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let server = RedisServer::start(ServerConfig::new());
    let cluster = (!args.no_cluster).then(|| RedisCluster::start(3));
    let mut targets = vec![Target::Standalone(server.url())];
    if let Some(cluster) = &cluster {
        targets.push(Target::Cluster(cluster.urls()));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "4-step sagas, {} per run, {} in flight from one client-only process, {} workers per coordinator",
        args.sagas, args.in_flight, args.workers
    );
    let _ = writeln!(
        out,
        "{:>8} {:>12} {:>9} {:>9} {:>9} {:>16} {:>16}",
        "target",
        "coordinators",
        "sagas/s",
        "p50 ms",
        "p99 ms",
        "submit→step p50",
        "submit→step p99"
    );
    let mut rows = Vec::new();
    for target in &targets {
        for &n in &args.coordinators {
            let row = measure(target, n.max(1), &args).await;
            let _ = writeln!(
                out,
                "{:>8} {:>12} {:>9.0} {:>9.2} {:>9.2} {:>13.1} ms {:>13.1} ms",
                row.target,
                row.coordinators,
                row.sagas_per_s,
                row.p50_ms,
                row.p99_ms,
                row.first_step_p50_ms,
                row.first_step_p99_ms
            );
            rows.push(row);
        }
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "target": r.target, "coordinators": r.coordinators, "sagas_per_s": r.sagas_per_s,
                "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                "submit_to_first_step_p50_ms": r.first_step_p50_ms,
                "submit_to_first_step_p99_ms": r.first_step_p99_ms,
            })
        })
        .collect();
    let _ = writeln!(
        out,
        "{}",
        serde_json::json!({ "coordinators_throughput": json })
    );
}
