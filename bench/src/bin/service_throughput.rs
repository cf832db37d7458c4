//! The headline benchmark: the coordinator service through its HTTP API on Redis with
//! `appendfsync always`, as a ratio to the store's raw ceiling measured in the same run.
//!
//! ```sh
//! cargo build --release -p saga-bench
//! target/release/service-throughput --in-flight 50 --seconds 20
//! target/release/service-throughput --in-flight 1 --seconds 5     # sequential figures
//! target/release/service-throughput --no-fsync                    # AOF off
//! ```
//!
//! It spawns a redis-server (AOF, `appendfsync always`; `--no-fsync` for AOF off;
//! `--redis-url` to use a running one), N `bench-coordinator` processes (the binary next to
//! this one, so build the whole crate first) each serving the HTTP API on a free port, and
//! runs a closed-loop HTTP load generator in this process: `--in-flight` clients, each on
//! its own keep-alive HTTP/1.1 connection, spread round-robin over the coordinators, each
//! doing `POST /sagas/four_steps_may_fail` (unique `Idempotency-Key`) then
//! `GET /sagas/{id}/wait` until the saga is terminal. `--fail-percent` of the sagas fail
//! permanently at step 3 and compensate steps 2 and 1.
//!
//! After a warm-up it measures a window of `--seconds`: sagas finished per second, end-to-end
//! latency (POST sent to wait answered), Redis round trips per saga (`INFO commandstats`
//! around the window; a short `MONITOR` sample after it tells which non-script commands came
//! from clients, see `saga_bench::redis_info`). Then, with the load stopped: every
//! acknowledged saga must be terminal (`lost` counts those that are not), submit-to-first-step
//! latency from a sample of histories (event timestamps have millisecond resolution), memory
//! per stored saga, and last the ceiling: the store's commit script called directly at the
//! same concurrency. `ceiling_sagas_per_s` is that rate divided by the calls per saga of the
//! service run, and `ratio` is the service's sagas/s over it. The last stdout line is one
//! JSON object with every figure.
//!
//! Coordinators are stopped by pid (SIGTERM, then SIGKILL after a bound) at the end, on an
//! error and on a panic; they also exit by themselves when this process dies (their stdin
//! is a lifeline).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use saga_bench::redis_info::{
    self, CommandCounts, MonitorSample, commit_ceiling, delta, info_field, is_script_call,
    parse_commandstats, subtract,
};
use saga_bench::{BoxError, FAIL_AT_STEP_THREE, FourStepsMayFail};
use saga_core::{Engine, EventKind, SagaId, SagaStatus};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, unique_prefix};
use serde::Deserialize;
use tokio::net::TcpStream;

/// How long a coordinator may take to print its ready line.
const READY_BOUND: Duration = Duration::from_secs(30);
/// How long a coordinator may take to exit after SIGTERM (its shutdown grace is 10 s).
const TERM_BOUND: Duration = Duration::from_secs(15);
/// How long after SIGKILL before giving up on a coordinator.
const KILL_BOUND: Duration = Duration::from_secs(5);
/// How many times a request is sent again on a fresh connection after a transport error.
const REQUEST_ATTEMPTS: u32 = 3;
/// Starts refused in a row after which a client stops.
const MAX_FAILED_STARTS: u32 = 20;

/// Service throughput benchmark.
#[derive(Debug, Parser)]
#[command(name = "service-throughput")]
struct Args {
    /// Clients in closed loop (each keeps one saga in flight).
    #[arg(long, default_value_t = 50)]
    in_flight: usize,
    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Load before the measured window, not counted.
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Coordinator processes (each serves the HTTP API).
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
    /// Workers per coordinator.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Percentage of sagas that fail permanently at step 3 (and compensate).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    fail_percent: u64,
    /// Spawn the server with AOF off (no persistence) instead of `appendfsync always`.
    #[arg(long, conflicts_with = "redis_url")]
    no_fsync: bool,
    /// Use this standalone server instead of spawning one.
    #[arg(long)]
    redis_url: Option<String>,
    /// Serve the API without authentication (for measuring what bearer-token checks cost;
    /// the default authenticates every request, as deployed).
    #[arg(long)]
    no_auth: bool,
    /// `timeout_ms` of each `GET /sagas/{id}/wait`.
    #[arg(long, default_value_t = 30_000)]
    wait_timeout_ms: u64,
    /// A saga not terminal this long after its POST is given up by its client (and then
    /// checked again, bounded, before it counts as lost).
    #[arg(long, default_value_t = 120)]
    saga_timeout_seconds: u64,
    /// Histories read (after the window) for submit-to-first-step latency.
    #[arg(long, default_value_t = 500)]
    history_sample: usize,
    /// Length of the MONITOR sample after the window that splits non-script commands into
    /// client calls and commands run inside scripts (0: count script calls only).
    #[arg(long, default_value_t = 1.0)]
    monitor_seconds: f64,
    /// Length of the ceiling measurement, in seconds.
    #[arg(long, default_value_t = 5)]
    ceiling_seconds: u64,
    /// Print used_memory and stored-saga counts every this many seconds during the run (the
    /// counting adds a few ZCARD calls to the measured commands).
    #[arg(long, value_name = "SECONDS")]
    memory_samples: Option<u64>,
    /// A raw argument appended to every bench-coordinator command line (repeatable).
    #[arg(
        long = "coordinator-arg",
        value_name = "ARG",
        allow_hyphen_values = true
    )]
    coordinator_args: Vec<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "service-throughput: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes one line on stdout (the table and the final JSON line).
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

async fn run(args: Args) -> Result<(), BoxError> {
    let in_flight = args.in_flight.max(1);
    // Declared before the coordinators so that it is dropped after them.
    let (_spawned, url) = redis_server(&args);
    let mut info_conn = redis_info::connect(&url).await?;
    let fsync = match server_fsyncs_always(&mut info_conn).await {
        Some(fsync) => fsync,
        None => args.redis_url.is_none() && !args.no_fsync,
    };
    let prefix = unique_prefix("svc");
    say_setup(&args, in_flight, &url, fsync);
    let engine = reader_engine(&url, &prefix).await?;
    let sample_cost = memory_sample_cost(&args, &mut info_conn, &engine).await?;
    let (mut coordinators, addrs) = start_coordinators(&args, &url, &prefix).await?;
    // After the coordinators connected: their connections are not sagas.
    let memory_before = used_memory(&mut info_conn).await?;
    let (load, clients) = start_load(&args, &prefix, in_flight, &addrs);
    let run_started = Instant::now();
    let sampler = args.memory_samples.map(|every| {
        MemorySampler::start(
            url.clone(),
            engine.clone(),
            Duration::from_secs(every.max(1)),
            run_started,
        )
    });
    let window = measure_window(&args, &mut info_conn, &url).await?;
    load.stop.store(true, Ordering::Relaxed);
    let (mut records, http_errors) = drain_clients(clients, load.saga_timeout).await?;
    let memory_timeline = match sampler {
        Some(sampler) => sampler.stop().await,
        None => Vec::new(),
    };
    let lost = recheck_unfinished(&engine, &mut records).await;
    let stored = StoredCounts::read(&engine).await?;
    let memory_after = used_memory(&mut info_conn).await?;
    let figures = window_figures(
        &engine,
        &records,
        &window,
        &memory_timeline,
        &sample_cost,
        args.history_sample,
    )
    .await;
    let outcomes = Outcomes::of(&records, lost, http_errors);

    // The service is done: stop it before the ceiling so that it gets the machine alone.
    drop(records);
    let exits = coordinators.stop();
    let ceiling_calls_per_s =
        measure_ceiling(&url, &prefix, in_flight, args.ceiling_seconds).await?;
    let results = Results {
        in_flight,
        fsync,
        figures,
        monitor_length: window.sample.as_ref().map(|sample| sample.length),
        ceiling_calls_per_s,
        outcomes,
        stored,
        memory_before,
        memory_after,
        memory_timeline,
    };
    results.print_table();
    results.print_commands();
    results.print_warnings(&exits);
    say!("{}", results.json(&args));
    Ok(())
}

/// The server to use: `--redis-url`, or a redis-server spawned here (returned so that the
/// caller keeps it running).
fn redis_server(args: &Args) -> (Option<RedisServer>, String) {
    match &args.redis_url {
        Some(url) => (None, url.clone()),
        None => {
            let config = if args.no_fsync {
                ServerConfig::new()
            } else {
                ServerConfig::new().durable()
            };
            let spawned = RedisServer::start(config);
            let url = spawned.url();
            (Some(spawned), url)
        }
    }
}

/// A client-side engine for the reads after the window (histories, outcomes, counts); it
/// runs nothing.
async fn reader_engine(url: &str, prefix: &str) -> Result<Engine, BoxError> {
    let store = RedisStore::builder()
        .url(url.to_owned())
        .key_prefix(prefix.to_owned())
        .connect()
        .await?;
    Ok(Engine::builder(store).register(FourStepsMayFail).build()?)
}

/// Spawns `--coordinators` bench-coordinator processes; returns them once every one is
/// ready, with their HTTP addresses.
async fn start_coordinators(
    args: &Args,
    url: &str,
    prefix: &str,
) -> Result<(Coordinators, Vec<SocketAddr>), BoxError> {
    let exe_dir = current_exe_dir()?;
    let mut coordinators = Coordinators::default();
    for n in 0..args.coordinators.max(1) {
        coordinators.spawn(&exe_dir, url, prefix, n, args)?;
    }
    let addrs = coordinators.wait_ready(READY_BOUND).await?;
    Ok((coordinators, addrs))
}

/// Starts `in_flight` closed-loop clients, spread round-robin over `addrs`; returns the
/// load they share (its `stop` ends them) and their tasks.
fn start_load(
    args: &Args,
    prefix: &str,
    in_flight: usize,
    addrs: &[SocketAddr],
) -> (Arc<Load>, tokio::task::JoinSet<ClientReport>) {
    let load = Arc::new(Load {
        prefix: prefix.to_owned(),
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        fail_percent: args.fail_percent,
        wait_timeout_ms: args.wait_timeout_ms,
        saga_timeout: Duration::from_secs(args.saga_timeout_seconds),
    });
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..in_flight {
        let addr = addrs[c % addrs.len()];
        let load = Arc::clone(&load);
        clients.spawn(async move { client_loop(addr, &load).await });
    }
    (load, clients)
}

/// The first line: what is measured, on what.
fn say_setup(args: &Args, in_flight: usize, url: &str, fsync: bool) {
    say!(
        "service-throughput: {in_flight} clients in closed loop over HTTP, {} coordinator(s) x {} workers, Redis {} ({}), {} s window after {} s warm-up, {}% fail at step 3",
        args.coordinators.max(1),
        args.workers,
        saga_redis::redact_url(url),
        if fsync {
            "AOF appendfsync always"
        } else {
            "no fsync per write"
        },
        args.seconds,
        args.warmup_seconds,
        args.fail_percent
    );
}

/// What one memory sample costs in commands, measured while nothing else talks to the
/// server, to take the samples taken in the window off its counts.
async fn memory_sample_cost(
    args: &Args,
    info_conn: &mut redis::aio::MultiplexedConnection,
    engine: &Engine,
) -> Result<CommandCounts, BoxError> {
    Ok(match args.memory_samples {
        Some(_) => {
            let before = commandstats(info_conn).await?;
            engine.store().count_by_status().await?;
            delta(&before, &commandstats(info_conn).await?)
        }
        None => CommandCounts::new(),
    })
}

/// The measured window: its bounds and the server's counters around it.
struct Window {
    start: Instant,
    end: Instant,
    stats_before: CommandCounts,
    stats_after: CommandCounts,
    /// The MONITOR sample taken right after it.
    sample: Option<MonitorSample>,
}

/// Lets the load warm up, then measures the window of `--seconds`.
async fn measure_window(
    args: &Args,
    info_conn: &mut redis::aio::MultiplexedConnection,
    url: &str,
) -> Result<Window, BoxError> {
    // The window is timed by the clock on purpose: it is the measurement, not a wait for
    // something to happen.
    tokio::time::sleep(Duration::from_secs(args.warmup_seconds)).await;
    let stats_before = commandstats(info_conn).await?;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds.max(1))).await;
    let end = Instant::now();
    let stats_after = commandstats(info_conn).await?;
    let sample = if args.monitor_seconds > 0.0 {
        Some(redis_info::monitor_sample(url, Duration::from_secs_f64(args.monitor_seconds)).await?)
    } else {
        None
    };
    Ok(Window {
        start,
        end,
        stats_before,
        stats_after,
        sample,
    })
}

/// Waits for the stopped clients; returns their records and HTTP error count.
async fn drain_clients(
    mut clients: tokio::task::JoinSet<ClientReport>,
    saga_timeout: Duration,
) -> Result<(Vec<Record>, u64), BoxError> {
    // Each client finishes its saga in flight, bounded by its own saga timeout.
    let drain_bound = saga_timeout + Duration::from_secs(30);
    let mut records = Vec::new();
    let mut http_errors = 0u64;
    let drained = tokio::time::timeout(drain_bound, async {
        while let Some(joined) = clients.join_next().await {
            match joined {
                Ok(done) => {
                    records.extend(done.records);
                    http_errors += done.errors;
                }
                Err(err) => return Err(format!("a client task failed: {err}")),
            }
        }
        Ok(())
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => {
            clients.abort_all();
            return Err(format!("the clients did not finish within {drain_bound:?}").into());
        }
    }
    Ok((records, http_errors))
}

/// The memory sampler task and the switch that stops it.
struct MemorySampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<MemorySample>>,
}

impl MemorySampler {
    fn start(url: String, engine: Engine, every: Duration, since: Instant) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(memory_sampler(url, engine, every, since, stopped));
        Self { stop, task }
    }

    /// Stops it; returns its samples.
    async fn stop(self) -> Vec<MemorySample> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// Every acknowledged saga must be terminal; the ones whose client gave up get one more,
/// bounded, look. Returns how many are still not terminal.
async fn recheck_unfinished(engine: &Engine, records: &mut [Record]) -> u64 {
    let mut lost = 0u64;
    let recheck_deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for record in records.iter_mut().filter(|r| r.status.is_none()) {
        let left = recheck_deadline.saturating_duration_since(tokio::time::Instant::now());
        match engine
            .wait(record.id, left.max(Duration::from_millis(1)))
            .await
        {
            Ok(outcome) if outcome.status.is_terminal() => record.status = Some(outcome.status),
            _ => lost += 1,
        }
    }
    lost
}

/// The store's own count of its sagas (`count_by_status`).
struct StoredCounts {
    stored: u64,
    terminal: u64,
}

impl StoredCounts {
    async fn read(engine: &Engine) -> Result<Self, BoxError> {
        let counts = engine.store().count_by_status().await?;
        Ok(Self {
            stored: counts.values().sum(),
            terminal: counts
                .iter()
                .filter(|(status, _)| status.is_terminal())
                .map(|(_, n)| n)
                .sum(),
        })
    }
}

/// What the sagas that ended in the window show.
struct WindowFigures {
    window: Duration,
    finished_in_window: u64,
    sagas_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    history: HistoryFigures,
    calls: Calls,
}

async fn window_figures(
    engine: &Engine,
    records: &[Record],
    window: &Window,
    memory_timeline: &[MemorySample],
    sample_cost: &CommandCounts,
    history_limit: usize,
) -> WindowFigures {
    let in_window: Vec<&Record> = records
        .iter()
        .filter(|r| r.ended >= window.start && r.ended <= window.end)
        .collect();
    let length = window.end.duration_since(window.start);
    let finished_in_window = in_window.len() as u64;
    let sagas_per_s = finished_in_window as f64 / length.as_secs_f64();
    let (p50_ms, p99_ms) = percentiles_ms(in_window.iter().map(|r| r.ended - r.began).collect());
    let history = history_sample(engine, &in_window, history_limit).await;
    let mut window_commands = delta(&window.stats_before, &window.stats_after);
    let samples_in_window = memory_timeline
        .iter()
        .filter(|s| s.at >= window.start && s.at <= window.end)
        .count() as u64;
    subtract(&mut window_commands, sample_cost, samples_in_window);
    let calls = Calls::new(&window_commands, window.sample.as_ref(), finished_in_window);
    WindowFigures {
        window: length,
        finished_in_window,
        sagas_per_s,
        p50_ms,
        p99_ms,
        history,
        calls,
    }
}

/// How the acknowledged sagas ended, as their clients and the recheck saw them.
struct Outcomes {
    completed: usize,
    compensated: usize,
    failed: usize,
    acknowledged: u64,
    lost: u64,
    http_errors: u64,
}

impl Outcomes {
    fn of(records: &[Record], lost: u64, http_errors: u64) -> Self {
        let tally =
            |wanted: SagaStatus| records.iter().filter(|r| r.status == Some(wanted)).count();
        Self {
            completed: tally(SagaStatus::Completed),
            compensated: tally(SagaStatus::Compensated),
            failed: tally(SagaStatus::Failed),
            acknowledged: records.len() as u64,
            lost,
            http_errors,
        }
    }
}

/// The store's commit script called directly at the service's concurrency: commits per
/// second.
async fn measure_ceiling(
    url: &str,
    prefix: &str,
    in_flight: usize,
    ceiling_seconds: u64,
) -> Result<f64, BoxError> {
    let ceiling_store = RedisStore::builder()
        .url(url.to_owned())
        .key_prefix(format!("{prefix}-ceiling"))
        .connect()
        .await?;
    let ceiling = commit_ceiling(
        Arc::new(ceiling_store),
        in_flight as u64,
        u64::MAX,
        Some(Duration::from_secs(ceiling_seconds.max(1))),
    )
    .await?;
    Ok(ceiling.calls_per_s())
}

/// Everything the run measured, for the table and the JSON line.
struct Results {
    in_flight: usize,
    fsync: bool,
    figures: WindowFigures,
    /// How long the MONITOR sample lasted, when one was taken.
    monitor_length: Option<Duration>,
    ceiling_calls_per_s: f64,
    outcomes: Outcomes,
    stored: StoredCounts,
    memory_before: u64,
    memory_after: u64,
    memory_timeline: Vec<MemorySample>,
}

impl Results {
    /// The ceiling in sagas: commits per second over the service's calls per saga.
    fn ceiling_sagas_per_s(&self) -> f64 {
        if self.figures.calls.per_saga > 0.0 {
            self.ceiling_calls_per_s / self.figures.calls.per_saga
        } else {
            0.0
        }
    }

    fn ratio(&self) -> f64 {
        let ceiling_sagas_per_s = self.ceiling_sagas_per_s();
        if ceiling_sagas_per_s > 0.0 {
            self.figures.sagas_per_s / ceiling_sagas_per_s
        } else {
            0.0
        }
    }

    fn bytes_per_saga(&self) -> f64 {
        if self.stored.stored > 0 {
            self.memory_after.saturating_sub(self.memory_before) as f64 / self.stored.stored as f64
        } else {
            0.0
        }
    }

    /// The table of measures.
    fn print_table(&self) {
        say!("");
        say!("{:<34} {:>12}", "measure", "value");
        let rows = [self.speed_rows(), self.cost_rows(), self.outcome_rows()].concat();
        for (name, value) in &rows {
            say!("{name:<34} {value:>12}");
        }
    }

    /// Throughput and latencies.
    fn speed_rows(&self) -> Vec<(&'static str, String)> {
        let WindowFigures {
            finished_in_window,
            sagas_per_s,
            p50_ms,
            p99_ms,
            history,
            ..
        } = &self.figures;
        vec![
            ("sagas/s (window)", format!("{sagas_per_s:.0}")),
            ("sagas finished in window", finished_in_window.to_string()),
            ("p50 end-to-end ms", format!("{p50_ms:.2}")),
            ("p99 end-to-end ms", format!("{p99_ms:.2}")),
            (
                "submit→first step p50 ms (1 ms res)",
                format!("{:.0}", history.submit_to_first_step.0),
            ),
            (
                "submit→first step p99 ms",
                format!("{:.0}", history.submit_to_first_step.1),
            ),
            (
                "  submit→lease acquired p50 ms",
                format!("{:.0}", history.submit_to_lease.0),
            ),
            (
                "  lease→first step p50 ms",
                format!("{:.0}", history.lease_to_first_step.0),
            ),
            (
                "first step→terminal p50 ms",
                format!("{:.0}", history.first_step_to_end.0),
            ),
        ]
    }

    /// Redis calls per saga and the ceiling they imply.
    fn cost_rows(&self) -> Vec<(&'static str, String)> {
        let calls = &self.figures.calls;
        let ceiling_calls_per_s = self.ceiling_calls_per_s;
        vec![
            ("Redis calls/saga", format!("{:.2}", calls.per_saga)),
            (
                "  script calls/saga",
                format!("{:.2}", calls.scripts_per_saga),
            ),
            (
                "  other client commands/saga",
                format!("{:.2}", calls.other_client_per_saga),
            ),
            (
                "commands inside scripts/saga",
                format!("{:.2}", calls.inside_per_saga),
            ),
            (
                "ceiling commit calls/s",
                format!("{ceiling_calls_per_s:.0}"),
            ),
            (
                "ceiling sagas/s",
                format!("{:.0}", self.ceiling_sagas_per_s()),
            ),
            ("ratio to ceiling", format!("{:.3}", self.ratio())),
        ]
    }

    /// How the sagas ended, what the store holds and what it costs in memory.
    fn outcome_rows(&self) -> Vec<(&'static str, String)> {
        let Outcomes {
            completed,
            compensated,
            failed,
            acknowledged,
            lost,
            http_errors,
        } = &self.outcomes;
        let StoredCounts { stored, terminal } = &self.stored;
        vec![
            (
                "completed / compensated / failed",
                format!("{completed} / {compensated} / {failed}"),
            ),
            (
                "acknowledged / lost / http errors",
                format!("{acknowledged} / {lost} / {http_errors}"),
            ),
            (
                "stored / terminal (count_by_status)",
                format!("{stored} / {terminal}"),
            ),
            (
                "bytes/saga (used_memory)",
                format!("{:.0}", self.bytes_per_saga()),
            ),
        ]
    }

    /// The Redis commands of the window, per saga, with their client share.
    fn print_commands(&self) {
        say!("");
        say!(
            "Redis commands in the window, per saga ({}):",
            match self.monitor_length {
                Some(length) => format!(
                    "client share from a {:.1} s MONITOR sample after the window",
                    length.as_secs_f64()
                ),
                None => "no MONITOR sample: only script calls count as client calls".to_owned(),
            }
        );
        say!(
            "{:<24} {:>12} {:>12} {:>14}",
            "command",
            "total/saga",
            "client share",
            "client/saga"
        );
        for row in &self.figures.calls.breakdown {
            say!(
                "{:<24} {:>12.3} {:>12.2} {:>14.3}",
                row.name,
                row.per_saga,
                row.client_share,
                row.per_saga * row.client_share
            );
        }
    }

    /// Sagas not seen ending, and coordinators that did not exit cleanly (`exits`).
    fn print_warnings(&self, exits: &[String]) {
        let Outcomes {
            acknowledged, lost, ..
        } = self.outcomes;
        let stored_terminal = self.stored.terminal;
        if lost > 0 || stored_terminal < acknowledged {
            say!(
                "WARNING: {lost} acknowledged saga(s) not terminal at the end; the store holds {stored_terminal} terminal of {acknowledged} acknowledged"
            );
        }
        for (n, exit) in exits.iter().enumerate() {
            if !exit.starts_with("exit status: 0") {
                say!("note: coordinator {n} ended with {exit}");
            }
        }
    }

    /// The last stdout line: every figure.
    fn json(&self, args: &Args) -> serde_json::Value {
        let figures = &self.figures;
        let (history, calls, outcomes) = (&figures.history, &figures.calls, &self.outcomes);
        serde_json::json!({
            "sagas_per_s": figures.sagas_per_s,
            "p50_ms": figures.p50_ms,
            "p99_ms": figures.p99_ms,
            "submit_to_first_step_p50_ms": history.submit_to_first_step.0,
            "submit_to_first_step_p99_ms": history.submit_to_first_step.1,
            "submit_to_lease_p50_ms": history.submit_to_lease.0,
            "lease_to_first_step_p50_ms": history.lease_to_first_step.0,
            "first_step_to_end_p50_ms": history.first_step_to_end.0,
            "history_sample": history.sampled,
            "timestamp_resolution_ms": 1,
            "redis_calls_per_saga": calls.per_saga,
            "script_calls_per_saga": calls.scripts_per_saga,
            "other_client_commands_per_saga": calls.other_client_per_saga,
            "commands_inside_scripts_per_saga": calls.inside_per_saga,
            "commands_per_saga": calls.breakdown.iter().map(|r| (r.name.clone(), r.per_saga)).collect::<BTreeMap<_, _>>(),
            "calls_split": if self.monitor_length.is_some() { "monitor_sample" } else { "script_calls_only" },
            "ceiling_calls_per_s": self.ceiling_calls_per_s,
            "ceiling_sagas_per_s": self.ceiling_sagas_per_s(),
            "ratio": self.ratio(),
            "completed": outcomes.completed,
            "compensated": outcomes.compensated,
            "failed": outcomes.failed,
            "lost": outcomes.lost,
            "acknowledged": outcomes.acknowledged,
            "http_errors": outcomes.http_errors,
            "stored_sagas": self.stored.stored,
            "stored_terminal": self.stored.terminal,
            "sagas_in_window": figures.finished_in_window,
            "bytes_per_saga": self.bytes_per_saga(),
            "used_memory_before": self.memory_before,
            "used_memory_after": self.memory_after,
            "memory_samples": self.memory_timeline.iter().map(|s| &s.json).collect::<Vec<_>>(),
            "in_flight": self.in_flight,
            "coordinators": args.coordinators.max(1),
            "workers": args.workers,
            "fail_percent": args.fail_percent,
            "fsync": self.fsync,
            "seconds": args.seconds.max(1),
            "window_s": figures.window.as_secs_f64(),
        })
    }
}

/// The closed-loop load shared by every client.
struct Load {
    prefix: String,
    next: AtomicU64,
    stop: AtomicBool,
    fail_percent: u64,
    wait_timeout_ms: u64,
    saga_timeout: Duration,
}

impl Load {
    /// Whether saga `n` is told to fail: a multiplicative hash spreads the failing ones
    /// evenly over time instead of in runs of consecutive numbers.
    fn fails(&self, n: u64) -> bool {
        (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 100 < self.fail_percent
    }
}

/// One acknowledged saga as its client saw it.
struct Record {
    id: SagaId,
    began: Instant,
    ended: Instant,
    /// The terminal status of the wait answer; `None` when the client gave up.
    status: Option<SagaStatus>,
}

/// What one client did.
#[derive(Default)]
struct ClientReport {
    records: Vec<Record>,
    errors: u64,
}

#[derive(Deserialize)]
struct StartAnswer {
    id: SagaId,
}

#[derive(Deserialize)]
struct WaitAnswer {
    status: SagaStatus,
    terminal: bool,
}

async fn client_loop(addr: SocketAddr, load: &Load) -> ClientReport {
    let mut report = ClientReport::default();
    let mut http = Http::new(addr);
    let mut failed_starts = 0;
    while !load.stop.load(Ordering::Relaxed) {
        let n = load.next.fetch_add(1, Ordering::Relaxed);
        let input = if load.fails(n) {
            n | FAIL_AT_STEP_THREE
        } else {
            n
        };
        let key = format!("{}-{n}", load.prefix);
        let began = Instant::now();
        // A POST whose answer was lost is sent again with the same key: the API answers with
        // the saga it already created.
        let started = http
            .send(
                Method::POST,
                "/sagas/four_steps_may_fail",
                Some(&key),
                input.to_string(),
                &mut report.errors,
            )
            .await;
        let answer = match started {
            Some((status, body)) if status == StatusCode::CREATED || status == StatusCode::OK => {
                serde_json::from_slice::<StartAnswer>(&body).ok()
            }
            _ => None,
        };
        let Some(StartAnswer { id }) = answer else {
            report.errors += 1;
            failed_starts += 1;
            if failed_starts >= MAX_FAILED_STARTS {
                // The service is not taking sagas; hammering it would only burn the CPU
                // the other clients measure with.
                break;
            }
            continue;
        };
        failed_starts = 0;
        let path = format!("/sagas/{id}/wait?timeout_ms={}", load.wait_timeout_ms);
        let deadline = began + load.saga_timeout;
        let mut refused = 0;
        let status = loop {
            let answer = http
                .send(Method::GET, &path, None, String::new(), &mut report.errors)
                .await;
            if let Some((StatusCode::OK, body)) = &answer
                && let Ok(wait) = serde_json::from_slice::<WaitAnswer>(body)
                && wait.terminal
            {
                break Some(wait.status);
            }
            if !matches!(answer, Some((StatusCode::ACCEPTED, _))) {
                // Anything but "not yet" is an error: a few in a row and the client gives
                // this saga up (the check after the run looks at it again).
                report.errors += 1;
                refused += 1;
            }
            if Instant::now() >= deadline || refused >= REQUEST_ATTEMPTS {
                break None;
            }
        };
        report.records.push(Record {
            id,
            began,
            ended: Instant::now(),
            status,
        });
    }
    report
}

/// One keep-alive HTTP/1.1 connection, opened again after a transport error.
struct Http {
    addr: SocketAddr,
    host: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// The benchmark's API token: the coordinators authenticate every request, as deployed.
fn bench_token() -> &'static saga_http::GeneratedToken {
    static TOKEN: std::sync::OnceLock<saga_http::GeneratedToken> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        let scopes = saga_http::parse_scopes("start,read").unwrap_or_default();
        saga_http::Principal::new("bench", scopes)
            .and_then(|principal| saga_http::GeneratedToken::new(&principal))
            // Both inputs are constants and the OS generator does not fail on Linux.
            .unwrap_or_else(|err| panic!("cannot make the benchmark token: {err}"))
    })
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            host: addr.to_string(),
            sender: None,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, BoxError> {
        let stream = TcpStream::connect(self.addr).await?;
        // Small requests answered at once: Nagle would hold each one back.
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Sends one request (again on a new connection after a transport error, up to
    /// [`REQUEST_ATTEMPTS`] times) and returns the status and body; `None` when every
    /// attempt failed. Transport errors are added to `errors`.
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: String,
        errors: &mut u64,
    ) -> Option<(StatusCode, Bytes)> {
        for _ in 0..REQUEST_ATTEMPTS {
            match self.try_send(method.clone(), path, key, body.clone()).await {
                Ok(answer) => return Some(answer),
                Err(_) => {
                    *errors += 1;
                    self.sender = None;
                }
            }
        }
        None
    }

    async fn try_send(
        &mut self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: String,
    ) -> Result<(StatusCode, Bytes), BoxError> {
        let sender = match &mut self.sender {
            Some(sender) => sender,
            None => self.sender.insert(self.connect().await?),
        };
        sender.ready().await?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.host)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", bench_token().token),
            );
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(key) = key {
            request = request.header(saga_http::IDEMPOTENCY_KEY, key);
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// Redis calls per saga in the measured window.
struct Calls {
    /// Client round trips per saga: script calls plus other client commands.
    per_saga: f64,
    scripts_per_saga: f64,
    other_client_per_saga: f64,
    inside_per_saga: f64,
    breakdown: Vec<CommandRow>,
}

struct CommandRow {
    name: String,
    per_saga: f64,
    client_share: f64,
}

impl Calls {
    fn new(window: &CommandCounts, sample: Option<&MonitorSample>, sagas: u64) -> Self {
        let sagas = sagas.max(1) as f64;
        let mut calls = Self {
            per_saga: 0.0,
            scripts_per_saga: 0.0,
            other_client_per_saga: 0.0,
            inside_per_saga: 0.0,
            breakdown: Vec::new(),
        };
        // `info` is this benchmark's own reads of the counters.
        for (name, &count) in window.iter().filter(|(name, _)| name.as_str() != "info") {
            let per_saga = count as f64 / sagas;
            let client_share = match sample {
                Some(sample) => sample.client_share(name),
                None if is_script_call(name) => 1.0,
                None => 0.0,
            };
            if is_script_call(name) {
                calls.scripts_per_saga += per_saga;
            } else {
                calls.other_client_per_saga += per_saga * client_share;
            }
            calls.inside_per_saga += per_saga * (1.0 - client_share);
            calls.breakdown.push(CommandRow {
                name: name.clone(),
                per_saga,
                client_share,
            });
        }
        calls.per_saga = calls.scripts_per_saga + calls.other_client_per_saga;
        calls
            .breakdown
            .sort_by(|a, b| b.per_saga.total_cmp(&a.per_saga));
        calls
    }
}

/// Latencies read from the histories of a sample of sagas, in ms: (p50, p99).
#[derive(Default)]
struct HistoryFigures {
    sampled: usize,
    submit_to_first_step: (f64, f64),
    submit_to_lease: (f64, f64),
    lease_to_first_step: (f64, f64),
    first_step_to_end: (f64, f64),
}

/// Reads up to `limit` histories spread over `records`. Both ends of each figure are stamped
/// by coordinator clocks on this machine (`SagaStarted` by the one that took the POST), in
/// whole milliseconds.
async fn history_sample(engine: &Engine, records: &[&Record], limit: usize) -> HistoryFigures {
    if records.is_empty() || limit == 0 {
        return HistoryFigures::default();
    }
    let step = records.len().div_ceil(limit).max(1);
    let (mut to_first, mut to_lease, mut lease_to_first, mut to_end) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sampled = 0;
    for record in records.iter().step_by(step) {
        let Ok(history) = engine.history(record.id).await else {
            continue;
        };
        sampled += 1;
        let submitted = history.first().map(|e| e.at);
        let lease = history
            .iter()
            .find(|e| matches!(e.kind, EventKind::LeaseAcquired { .. }))
            .map(|e| e.at);
        let first = history
            .iter()
            .find(|e| matches!(e.kind, EventKind::StepStarted { .. }))
            .map(|e| e.at);
        let last = history.last().map(|e| e.at);
        if let (Some(a), Some(b)) = (submitted, first) {
            to_first.push(b.since(a));
        }
        if let (Some(a), Some(b)) = (submitted, lease) {
            to_lease.push(b.since(a));
        }
        if let (Some(a), Some(b)) = (lease, first) {
            lease_to_first.push(b.since(a));
        }
        if let (Some(a), Some(b)) = (first, last) {
            to_end.push(b.since(a));
        }
    }
    HistoryFigures {
        sampled,
        submit_to_first_step: percentiles_ms(to_first),
        submit_to_lease: percentiles_ms(to_lease),
        lease_to_first_step: percentiles_ms(lease_to_first),
        first_step_to_end: percentiles_ms(to_end),
    }
}

fn percentiles_ms(samples: Vec<Duration>) -> (f64, f64) {
    let (p50, p99) = saga_bench::percentiles(samples);
    (p50 / 1000.0, p99 / 1000.0)
}

/// One memory sample.
struct MemorySample {
    /// When its commands were sent.
    at: Instant,
    json: serde_json::Value,
}

/// Prints used_memory and stored-saga counts every `every` until told to stop; returns the
/// samples.
async fn memory_sampler(
    url: String,
    engine: Engine,
    every: Duration,
    since: Instant,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<MemorySample> {
    let mut samples = Vec::new();
    let Ok(mut conn) = redis_info::connect(&url).await else {
        return samples;
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return samples,
        }
        let at = Instant::now();
        let memory = used_memory(&mut conn).await.unwrap_or(0);
        let Ok(counts) = engine.store().count_by_status().await else {
            continue;
        };
        let stored: u64 = counts.values().sum();
        let open: u64 = counts
            .iter()
            .filter(|(status, _)| !status.is_terminal())
            .map(|(_, n)| n)
            .sum();
        let t = at.duration_since(since).as_secs_f64();
        say!(
            "memory t={t:>6.1}s used_memory={memory:>12} stored_sagas={stored:>8} not_terminal={open:>5}"
        );
        samples.push(MemorySample {
            at,
            json: serde_json::json!({
                "t_s": t, "used_memory": memory, "stored_sagas": stored, "not_terminal": open,
            }),
        });
    }
}

async fn commandstats(
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<CommandCounts, BoxError> {
    Ok(parse_commandstats(
        &redis_info::info(conn, "commandstats").await?,
    ))
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> Result<u64, BoxError> {
    let info = redis_info::info(conn, "memory").await?;
    info_field(&info, "used_memory").ok_or_else(|| "INFO memory has no used_memory".into())
}

/// `Some(true)` when the server writes an AOF with `appendfsync always`; `None` when it does
/// not let us ask (CONFIG may be disabled).
async fn server_fsyncs_always(conn: &mut redis::aio::MultiplexedConnection) -> Option<bool> {
    let get = |name: &'static str| redis::cmd("CONFIG").arg("GET").arg(name).clone();
    let aof: Vec<String> = get("appendonly").query_async(conn).await.ok()?;
    let fsync: Vec<String> = get("appendfsync").query_async(conn).await.ok()?;
    Some(aof.get(1)? == "yes" && fsync.get(1)? == "always")
}

fn current_exe_dir() -> Result<PathBuf, BoxError> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("{} has no parent directory", exe.display()).into())
}

/// The coordinator processes of this run. Dropping it stops them (also on an error or a
/// panic): SIGTERM, then SIGKILL for those still running after [`TERM_BOUND`].
#[derive(Default)]
struct Coordinators {
    running: Vec<Running>,
}

struct Running {
    child: Child,
    /// Held open for the life of the process: the coordinator shuts down at its end of file.
    lifeline: Option<ChildStdin>,
    /// Gets the first stdout line (the ready line).
    ready: Option<tokio::sync::oneshot::Receiver<String>>,
}

impl Coordinators {
    fn spawn(
        &mut self,
        exe_dir: &Path,
        url: &str,
        prefix: &str,
        n: usize,
        args: &Args,
    ) -> Result<(), BoxError> {
        let exe = exe_dir.join("bench-coordinator");
        if !exe.is_file() {
            return Err(format!(
                "{} is missing: build every benchmark binary first (cargo build --release -p saga-bench)",
                exe.display()
            )
            .into());
        }
        let mut child = Command::new(&exe)
            .args(["--redis-url", url, "--key-prefix", prefix])
            .args(["--owner", &format!("svc-{n}")])
            .args(["--workers", &args.workers.to_string()])
            .args(["--http-addr", "127.0.0.1:0", "--stdin-lifeline"])
            .args(if args.no_auth {
                Vec::new()
            } else {
                vec!["--api-tokens", bench_token().config_line.as_str()]
            })
            .args(&args.coordinator_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", exe.display()))?;
        let lifeline = child.stdin.take();
        let stdout = child.stdout.take();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        if let Some(stdout) = stdout {
            // Reads the ready line, then keeps draining so the process never blocks on a
            // full pipe; what it prints later goes to stderr.
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                if let Some(Ok(line)) = lines.next() {
                    let _ = ready_tx.send(line);
                }
                for line in lines.map_while(Result::ok) {
                    let _ = writeln!(std::io::stderr(), "bench-coordinator {n}: {line}");
                }
            });
        }
        self.running.push(Running {
            child,
            lifeline,
            ready: Some(ready_rx),
        });
        Ok(())
    }

    /// Waits (each within `bound`) for every ready line and returns the HTTP addresses.
    async fn wait_ready(&mut self, bound: Duration) -> Result<Vec<SocketAddr>, BoxError> {
        let mut addrs = Vec::new();
        for (n, running) in self.running.iter_mut().enumerate() {
            let Some(ready) = running.ready.take() else {
                return Err(format!("coordinator {n} has no stdout").into());
            };
            let line = match tokio::time::timeout(bound, ready).await {
                Ok(Ok(line)) => line,
                Ok(Err(_)) => {
                    let status = match running.child.try_wait() {
                        Ok(Some(status)) => status.to_string(),
                        _ => "not reaped yet".to_owned(),
                    };
                    return Err(format!(
                        "coordinator {n} closed its stdout before its ready line ({status}; its stderr is above)"
                    )
                    .into());
                }
                Err(_) => {
                    return Err(format!("coordinator {n} was not ready within {bound:?}").into());
                }
            };
            let addr = line
                .strip_prefix("ready http_addr=")
                .and_then(|addr| addr.trim().parse().ok())
                .ok_or_else(|| format!("coordinator {n} answered `{line}`, not its ready line"))?;
            addrs.push(addr);
        }
        Ok(addrs)
    }

    /// Stops every coordinator by pid and returns how each ended.
    fn stop(&mut self) -> Vec<String> {
        let running = std::mem::take(&mut self.running);
        let (exited, exits) = std::sync::mpsc::channel::<(usize, std::io::Result<ExitStatus>)>();
        let mut pids = Vec::new();
        for (n, mut running) in running.into_iter().enumerate() {
            let pid = running.child.id();
            pids.push(pid);
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
            drop(running.lifeline.take());
            let exited = exited.clone();
            // The waiting thread owns the child until it is reaped, so the pid cannot be
            // reused by another process while a SIGKILL may still be sent to it.
            std::thread::spawn(move || {
                let _ = exited.send((n, running.child.wait()));
            });
        }
        drop(exited);
        let mut results: Vec<Option<String>> = vec![None; pids.len()];
        let collect = |until: Instant, results: &mut Vec<Option<String>>| {
            while results.iter().any(Option::is_none) {
                let left = until.saturating_duration_since(Instant::now());
                match exits.recv_timeout(left) {
                    Ok((n, status)) => {
                        results[n] = Some(match status {
                            Ok(status) => status.to_string(),
                            Err(err) => format!("wait failed: {err}"),
                        });
                    }
                    Err(_) => return,
                }
            }
        };
        collect(Instant::now() + TERM_BOUND, &mut results);
        for (n, pid) in pids.iter().enumerate() {
            if results[n].is_none() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        collect(Instant::now() + KILL_BOUND, &mut results);
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| "still running after SIGKILL".to_owned()))
            .collect()
    }
}

impl Drop for Coordinators {
    fn drop(&mut self) {
        if !self.running.is_empty() {
            let _ = self.stop();
        }
    }
}
