//! Throughput and latency of the engine on Redis: a 4-step saga at 1, 16 and 64 sagas in
//! flight against a redis-server this binary spawns, next to the raw rate of the same
//! store's commit script called directly at the same concurrency (the ceiling on this
//! machine), with Redis commands per step counted from `INFO commandstats`.
//!
//! `cargo run --release -p saga-bench --bin redis-throughput -- --sagas 3000`
//! (`--redis-url` to use a running server instead; `--durable` for AOF `appendfsync always`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use saga_bench::redis_info::{commit_ceiling, delta, parse_commandstats};
use saga_bench::{FourSteps, percentiles};
use saga_core::{Engine, SagaStatus, StartOptions};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig};

/// Redis throughput benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Sagas per concurrency level.
    #[arg(long, default_value_t = 3_000)]
    sagas: u64,
    /// Concurrency levels (sagas in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    in_flight: Vec<u64>,
    /// Use this server instead of spawning one.
    #[arg(long)]
    redis_url: Option<String>,
    /// Spawn the server with AOF and `appendfsync always`.
    #[arg(long)]
    durable: bool,
}

fn commandstats(url: &str) -> BTreeMap<String, u64> {
    let client = redis::Client::open(url).unwrap_or_else(|err| panic!("bad url: {err}"));
    let mut conn = client
        .get_connection()
        .unwrap_or_else(|err| panic!("connect: {err}"));
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .unwrap_or_default();
    parse_commandstats(&info)
}

async fn store(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder()
        .url(url.to_owned())
        .key_prefix(prefix.to_owned())
        .connect()
        .await
        .unwrap_or_else(|err| panic!("connect: {err}"))
}

struct Row {
    in_flight: u64,
    sagas_per_s: f64,
    steps_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    calls_per_step: f64,
    inside_per_step: f64,
    commands: BTreeMap<String, u64>,
    ceiling_calls_per_s: f64,
    engine_calls_per_s: f64,
}

async fn engine_run(
    url: &str,
    sagas: u64,
    in_flight: u64,
) -> (Duration, Vec<Duration>, BTreeMap<String, u64>) {
    let store = store(url, &format!("bench-engine-{in_flight}")).await;
    let engine = Engine::builder(store)
        .register(FourSteps)
        .build()
        .unwrap_or_else(|err| panic!("{err}"));
    let per_task = sagas / in_flight;
    let before = commandstats(url);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..in_flight {
        let engine = engine.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(per_task as usize);
            for i in 0..per_task {
                let begun = Instant::now();
                let outcome = engine
                    .execute::<FourSteps>(&(t * per_task + i), StartOptions::default())
                    .await
                    .unwrap_or_else(|err| panic!("saga failed: {err}"));
                assert_eq!(outcome.status, SagaStatus::Completed);
                latencies.push(begun.elapsed());
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        latencies.extend(joined.unwrap_or_else(|err| panic!("task: {err}")));
    }
    let elapsed = started.elapsed();
    (elapsed, latencies, delta(&before, &commandstats(url)))
}

/// The ceiling: the store's commit script called directly, `in_flight` tasks each committing
/// to its own saga, `calls` commits in all.
async fn ceiling(url: &str, calls: u64, in_flight: u64) -> f64 {
    let store = Arc::new(store(url, &format!("bench-ceiling-{in_flight}")).await);
    commit_ceiling(store, in_flight, calls / in_flight, None)
        .await
        .unwrap_or_else(|err| panic!("ceiling: {err}"))
        .calls_per_s()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let spawned;
    let url = match &args.redis_url {
        Some(url) => url.clone(),
        None => {
            let config = if args.durable {
                ServerConfig::new().durable()
            } else {
                ServerConfig::new()
            };
            spawned = RedisServer::start(config);
            spawned.url()
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "4-step saga on Redis ({}), {} sagas per level",
        if args.durable {
            "AOF appendfsync always"
        } else {
            "no persistence"
        },
        args.sagas
    );
    let _ = writeln!(
        out,
        "{:>9} {:>10} {:>10} {:>9} {:>9} {:>11} {:>12} {:>13} {:>13} {:>7}",
        "in flight",
        "sagas/s",
        "steps/s",
        "p50 ms",
        "p99 ms",
        "calls/step",
        "inside/step",
        "engine call/s",
        "ceiling c/s",
        "ratio"
    );
    let mut rows = Vec::new();
    for &in_flight in &args.in_flight {
        let in_flight = in_flight.max(1);
        let (elapsed, latencies, commands) = engine_run(&url, args.sagas, in_flight).await;
        let done = latencies.len() as f64;
        let steps = done * 4.0;
        // INFO commandstats also counts the commands that scripts run inside the server;
        // the round trips a client makes are the script calls themselves.
        let calls: u64 = commands
            .iter()
            .filter(|(name, _)| name.starts_with("eval") || name.starts_with("fcall"))
            .map(|(_, calls)| calls)
            .sum();
        let inside: u64 = commands.values().sum::<u64>() - calls;
        let engine_calls_per_s = calls as f64 / elapsed.as_secs_f64();
        let ceiling_calls_per_s = ceiling(&url, calls.max(in_flight * 50), in_flight).await;
        let (p50, p99) = percentiles(latencies);
        let row = Row {
            in_flight,
            sagas_per_s: done / elapsed.as_secs_f64(),
            steps_per_s: steps / elapsed.as_secs_f64(),
            p50_ms: p50 / 1000.0,
            p99_ms: p99 / 1000.0,
            calls_per_step: calls as f64 / steps,
            inside_per_step: inside as f64 / steps,
            commands,
            ceiling_calls_per_s,
            engine_calls_per_s,
        };
        let _ = writeln!(
            out,
            "{:>9} {:>10.0} {:>10.0} {:>9.2} {:>9.2} {:>11.2} {:>12.1} {:>13.0} {:>13.0} {:>7.2}",
            row.in_flight,
            row.sagas_per_s,
            row.steps_per_s,
            row.p50_ms,
            row.p99_ms,
            row.calls_per_step,
            row.inside_per_step,
            row.engine_calls_per_s,
            row.ceiling_calls_per_s,
            row.engine_calls_per_s / row.ceiling_calls_per_s
        );
        rows.push(row);
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "in_flight": r.in_flight, "sagas_per_s": r.sagas_per_s, "steps_per_s": r.steps_per_s,
                "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "redis_calls_per_step": r.calls_per_step,
                "commands_inside_scripts_per_step": r.inside_per_step,
                "commands": r.commands, "engine_calls_per_s": r.engine_calls_per_s,
                "ceiling_calls_per_s": r.ceiling_calls_per_s,
                "ratio_to_ceiling": r.engine_calls_per_s / r.ceiling_calls_per_s,
            })
        })
        .collect();
    let _ = writeln!(out, "{}", serde_json::json!({ "redis_throughput": json }));
}
