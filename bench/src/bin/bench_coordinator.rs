//! A coordinator process for the benchmarks' 4-step sagas (`FourSteps`, `FourStepsMayFail`):
//! runs `Coordinator` on a Redis (or Redis Cluster) store until SIGTERM or SIGINT, and with
//! `--http-addr` serves the HTTP API (`saga-http`, with `/metrics`) on the same engine.
//! Started by `coordinators-throughput` and `service-throughput`.
//!
//! Once it is connected (and listening) it prints one line on stdout: `ready`, or
//! `ready http_addr=<ip:port>` with `--http-addr` (port 0 picks a free port; the line names
//! the bound one). With `--stdin-lifeline` it also shuts down when its stdin closes, so a
//! benchmark that dies without cleaning up takes its coordinators with it.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use saga_bench::{BoxError, FourSteps, FourStepsMayFail};
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
    /// Retention of finished sagas in milliseconds (0: off, the default here, so that a
    /// benchmark measures what a saga costs to keep).
    #[arg(long, default_value_t = 0)]
    retention_ms: u64,
    /// Serve the HTTP API on this address (port 0: any free port, named in the ready line).
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// API token lines (`name scopes sha256:<hash>`, `;`-separated); without them the API
    /// is served without authentication (loopback addresses only).
    #[arg(long)]
    api_tokens: Option<String>,
    /// Also shut down when stdin reaches end of file (the parent closed it or died).
    #[arg(long)]
    stdin_lifeline: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "bench-coordinator: {err}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<(), BoxError> {
    let builder = RedisStore::builder().key_prefix(args.key_prefix.clone());
    let builder = match &args.redis_url {
        Some(url) => builder.url(url.clone()),
        None => builder.cluster(args.cluster_urls.clone()),
    };
    let store = builder.connect().await?;
    let engine = Engine::builder(store)
        .register(FourSteps)
        .register(FourStepsMayFail)
        .owner(args.owner)
        .build()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (http, ready) = match args.http_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let bound = listener.local_addr()?;
            let auth = match &args.api_tokens {
                Some(lines) => saga_http::Auth::tokens(saga_http::ApiTokens::parse(lines)?),
                None => saga_http::Auth::Disabled,
            };
            saga_http::check_exposure(&auth, bound, false)?;
            let router =
                saga_http::router(engine.clone(), auth, Some(saga_http::install_metrics()?));
            let mut http_stopped = stopped.clone();
            let http = tokio::spawn(saga_http::serve_listener(router, listener, async move {
                let _ = http_stopped.wait_for(|stop| *stop).await;
            }));
            (Some(http), format!("ready http_addr={bound}"))
        }
        None => (None, "ready".to_owned()),
    };
    let lifeline = args.stdin_lifeline.then(stdin_closed);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{ready}")?;
        out.flush()?;
    }
    let shutdown = async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return std::future::pending().await;
        };
        let lifeline = async move {
            match lifeline {
                Some(closed) => {
                    let _ = closed.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
            () = lifeline => {}
        }
    };
    let retention = (args.retention_ms > 0).then(|| Duration::from_millis(args.retention_ms));
    Coordinator::new(engine)
        .workers(args.workers)
        .retention(retention)
        .housekeeping_interval(Duration::from_secs(1))
        .run(shutdown)
        .await;
    // The API outlives the workers' drain so that waits in flight get their answers.
    let _ = stop.send(true);
    if let Some(http) = http {
        http.await??;
    }
    Ok(())
}

/// Completes when stdin reaches end of file (or fails): the parent closed its end or died.
fn stdin_closed() -> tokio::sync::oneshot::Receiver<()> {
    let (closed, on_close) = tokio::sync::oneshot::channel();
    // A blocking read is the only portable way to see the pipe close; a plain thread keeps
    // it off the runtime's workers.
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = closed.send(());
    });
    on_close
}
