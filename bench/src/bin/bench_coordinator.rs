//! A coordinator process for the benchmark's 4-step saga: runs `Coordinator` on a Redis (or
//! Redis Cluster) store until SIGTERM or SIGINT. Started by `coordinators-throughput`.

use std::io::Write as _;

use clap::Parser;
use saga_bench::FourSteps;
use saga_core::{Coordinator, Engine};
use saga_redis::RedisStore;

/// Benchmark coordinator.
#[derive(Debug, Parser)]
struct Args {
    /// Standalone Redis URL.
    #[arg(long, conflicts_with = "cluster_urls")]
    redis_url: Option<String>,
    /// Cluster node URLs, comma-separated.
    #[arg(long, value_delimiter = ',')]
    cluster_urls: Vec<String>,
    /// Key prefix.
    #[arg(long)]
    key_prefix: String,
    /// Workers.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Owner id.
    #[arg(long)]
    owner: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let builder = RedisStore::builder().key_prefix(args.key_prefix.clone());
    let builder = match &args.redis_url {
        Some(url) => builder.url(url.clone()),
        None => builder.cluster(args.cluster_urls.clone()),
    };
    let store = match builder.connect().await {
        Ok(store) => store,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "bench-coordinator: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    let engine = match Engine::builder(store)
        .register(FourSteps)
        .owner(args.owner)
        .build()
    {
        Ok(engine) => engine,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "bench-coordinator: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    let _ = writeln!(std::io::stdout(), "ready");
    let _ = std::io::stdout().flush();
    let shutdown = async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    Coordinator::new(engine)
        .workers(args.workers)
        .run(shutdown)
        .await;
    std::process::ExitCode::SUCCESS
}
