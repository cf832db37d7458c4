//! Per-step overhead of the in-memory engine on a 4-step saga, against calling the same four
//! async fns directly, in the same run: single-threaded, and with many sagas in flight.
//!
//! `cargo run --release -p saga-bench --bin engine-overhead -- --sagas 20000 --in-flight 64`

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use saga_bench::{FourSteps, percentiles, step_four, step_one, step_three, step_two, timed};
use saga_core::{Engine, MemoryStore, Resources, StartOptions, StepContext};

/// Engine overhead benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Sagas per measurement.
    #[arg(long, default_value_t = 20_000)]
    sagas: u64,
    /// Sagas in flight in the concurrent measurement.
    #[arg(long, default_value_t = 64)]
    in_flight: u64,
}

async fn direct(ctx: &StepContext, input: u64) -> u64 {
    let a = step_one(ctx, input).await.unwrap_or_default();
    let b = step_two(ctx, a).await.unwrap_or_default();
    let c = step_three(ctx, b).await.unwrap_or_default();
    step_four(ctx, c).await.unwrap_or_default()
}

fn engine() -> Engine {
    match Engine::builder(MemoryStore::new())
        .register(FourSteps)
        .build()
    {
        Ok(engine) => engine,
        Err(err) => panic!("engine configuration: {err}"),
    }
}

async fn run_saga(engine: &Engine, input: u64) {
    if let Err(err) = engine
        .execute::<FourSteps>(&input, StartOptions::default())
        .await
    {
        panic!("saga failed: {err}");
    }
}

struct Measure {
    direct: Duration,
    engine: Duration,
    latencies: Vec<Duration>,
}

fn single_threaded(sagas: u64) -> Measure {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let rt = rt.unwrap_or_else(|err| panic!("runtime: {err}"));
    rt.block_on(async {
        let ctx = StepContext::standalone("bench", Resources::default());
        // Warm-up, so that allocator and caches are in the same state for both sides.
        for i in 0..1_000 {
            std::hint::black_box(direct(&ctx, i).await);
        }
        let direct_time = timed(async {
            for i in 0..sagas {
                std::hint::black_box(direct(&ctx, i).await);
            }
        })
        .await;
        let engine = engine();
        for i in 0..1_000 {
            run_saga(&engine, i).await;
        }
        let mut latencies = Vec::with_capacity(sagas as usize);
        let engine_time = timed(async {
            for i in 0..sagas {
                let started = Instant::now();
                run_saga(&engine, i).await;
                latencies.push(started.elapsed());
            }
        })
        .await;
        Measure {
            direct: direct_time,
            engine: engine_time,
            latencies,
        }
    })
}

fn concurrent(sagas: u64, in_flight: u64) -> Measure {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let rt = rt.unwrap_or_else(|err| panic!("runtime: {err}"));
    rt.block_on(async {
        let per_task = sagas / in_flight.max(1);
        let direct_time = timed(async {
            let mut tasks = tokio::task::JoinSet::new();
            for t in 0..in_flight {
                tasks.spawn(async move {
                    let ctx = StepContext::standalone("bench", Resources::default());
                    for i in 0..per_task {
                        std::hint::black_box(direct(&ctx, t * per_task + i).await);
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        })
        .await;
        let engine = engine();
        let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(sagas as usize)));
        let engine_time = timed(async {
            let mut tasks = tokio::task::JoinSet::new();
            for t in 0..in_flight {
                let engine = engine.clone();
                let latencies = Arc::clone(&latencies);
                tasks.spawn(async move {
                    let mut mine = Vec::with_capacity(per_task as usize);
                    for i in 0..per_task {
                        let started = Instant::now();
                        run_saga(&engine, t * per_task + i).await;
                        mine.push(started.elapsed());
                    }
                    latencies
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend(mine);
                });
            }
            while tasks.join_next().await.is_some() {}
        })
        .await;
        let latencies = std::mem::take(
            &mut *latencies
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        Measure {
            direct: direct_time,
            engine: engine_time,
            latencies,
        }
    })
}

fn report(name: &str, sagas: u64, m: Measure, out: &mut impl std::io::Write) -> serde_json::Value {
    let steps = (sagas * 4) as f64;
    let direct_us = m.direct.as_secs_f64() * 1e6 / steps;
    let engine_us = m.engine.as_secs_f64() * 1e6 / steps;
    let overhead = engine_us - direct_us;
    let sagas_per_s = sagas as f64 / m.engine.as_secs_f64();
    let (p50, p99) = percentiles(m.latencies);
    let _ = writeln!(
        out,
        "{name:<16} {sagas:>8} {direct_us:>14.3} {engine_us:>14.3} {overhead:>14.3} {sagas_per_s:>12.0} {p50:>10.1} {p99:>10.1}"
    );
    serde_json::json!({
        "mode": name, "sagas": sagas, "direct_us_per_step": direct_us, "engine_us_per_step": engine_us,
        "overhead_us_per_step": overhead, "sagas_per_s": sagas_per_s, "p50_us": p50, "p99_us": p99,
    })
}

fn main() {
    let args = Args::parse();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "4-step saga on MemoryStore vs the same 4 async fns called directly"
    );
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:>14} {:>14} {:>14} {:>12} {:>10} {:>10}",
        "mode",
        "sagas",
        "direct µs/step",
        "engine µs/step",
        "overhead µs",
        "sagas/s",
        "p50 µs",
        "p99 µs"
    );
    let single = report(
        "single-threaded",
        args.sagas,
        single_threaded(args.sagas),
        &mut out,
    );
    let name = format!("{}-in-flight", args.in_flight);
    let many = report(
        &name,
        args.sagas,
        concurrent(args.sagas, args.in_flight),
        &mut out,
    );
    let _ = writeln!(
        out,
        "{}",
        serde_json::json!({ "engine_overhead": [single, many] })
    );
}
