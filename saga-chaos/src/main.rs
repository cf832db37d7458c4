//! `saga-chaos`: the nemesis harness. Starts Redis and coordinator processes, runs a client
//! load under a seeded fault schedule, heals, waits until every saga ended, and checks the
//! invariants from the participants' side. Exit status 0 when every invariant holds, 1 on a
//! violation (the report names the seed and the command that reproduces it), 2 when the
//! run cannot be made.
//!
//! `saga-chaos coordinator <flags>` (hidden) is one deal-flow coordinator, the same as
//! `deal-flow-coordinator`: the harness re-executes itself so it never has to find another
//! binary.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use saga_chaos::nemesis::processes::Fsync;
use saga_chaos::nemesis::{self, NemesisError, Options, schedule::FaultKind};
use saga_examples::coordinator::{self, CoordinatorArgs};
use saga_examples::ops;

/// The report format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    /// For people.
    Text,
    /// One JSON object on stdout, for scripts and tests.
    Json,
}

/// `--redis-fsync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RedisFsync {
    /// AOF, `appendfsync always`.
    Always,
    /// AOF, `appendfsync everysec`.
    Everysec,
    /// No persistence.
    Off,
}

/// Runs a Jepsen-style nemesis against real coordinator processes and real redis-servers,
/// then checks, from the participants' ledger, that every acknowledged saga ended, every
/// effect applied once, every compensation ran once in reverse order, every history folds,
/// and that no write of a fenced coordinator was accepted.
///
/// Exit status: 0 every invariant holds; 1 a violation (the report gives the command that
/// reproduces it); 2 the run could not be made (no redis-server, a coordinator did not
/// start).
#[derive(Debug, clap::Parser)]
#[command(name = "saga-chaos", version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Length of the fault phase in seconds (the load runs as long; healing and the wait
    /// for every saga to end follow).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seed of the fault schedule and of the generated deals. Default: a random seed,
    /// printed first.
    #[arg(long)]
    seed: Option<u64>,
    /// Coordinator processes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=16))]
    coordinators: u64,
    /// Run against a local Redis Cluster of 3 masters and 3 replicas instead of one
    /// standalone server (the proxy faults and redis-restart do not apply there; failover
    /// applies only there).
    #[arg(long)]
    cluster: bool,
    /// The fault kinds to draw from, comma-separated: kill (SIGKILL a coordinator, start
    /// another 0.5–3 s later), pause (SIGSTOP a coordinator past its lease), redis-restart
    /// (SIGKILL redis-server, restart on its AOF), client-pause (CLIENT PAUSE ALL),
    /// maxmemory (writes refused with OOM for a few seconds), script-flush (SCRIPT FLUSH),
    /// proxy-latency, proxy-reset, proxy-blackhole, proxy-drop-replies (on one
    /// coordinator's link), failover (cluster: CLUSTER FAILOVER on a master's replica under
    /// load). Default: every kind that applies to the mode. Each selected
    /// kind is scheduled at least once when the run is long enough (0.5 s per kind).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<FaultKind>,
    /// Deal sagas started per second.
    #[arg(long, default_value_t = 8.0)]
    rate: f64,
    /// The coordinators' lease (a pause lasts longer than this).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// How long to wait, after healing, for every saga to end.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    quiesce: Duration,
    /// Deliver every n-th start twice (idempotent start); 0: never.
    #[arg(long, default_value_t = 5)]
    duplicate_every: usize,
    /// Share of deals for watchlisted companies (their sagas compensate).
    #[arg(long, default_value_t = 0.15, value_parser = ops::parse_rate)]
    watchlist_rate: f64,
    /// The simulated services' latency in milliseconds, `5` or `5..40` (passed to every
    /// coordinator as `--latency-ms`): slower sagas hold more leases at any moment, so the
    /// faults catch more of them mid-step.
    #[arg(long, default_value = "5..40", value_parser = parse_latency)]
    service_latency_ms: String,
    /// How the redis-servers persist writes: `always` (AOF, `appendfsync always`, what
    /// deployments run), `everysec` (a kill may lose the last second), `off` (a restart
    /// loses everything: the run must then fail, which checks the checker).
    #[arg(long, value_enum, default_value_t = RedisFsync::Always)]
    redis_fsync: RedisFsync,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    report: ReportFormat,
    /// Keep the run's directory (coordinator stdout/stderr per incarnation, Redis logs) and
    /// print where it is.
    #[arg(long)]
    keep_dir: bool,
    /// Print the schedule and exit without running anything.
    #[arg(long)]
    dry_run: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// One deal-flow coordinator (the harness starts these itself).
    #[command(hide = true)]
    Coordinator(Box<CoordinatorArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Coordinator(args)) = cli.command {
        return run_coordinator(*args);
    }
    let seed = cli.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut err = std::io::stderr();
    let _ = writeln!(err, "saga-chaos: seed {seed}");
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            let _ = writeln!(err, "saga-chaos: cannot find its own executable: {e}");
            return ExitCode::from(2);
        }
    };
    let options = Options {
        seconds: cli.seconds,
        seed,
        coordinators: usize::try_from(cli.coordinators).unwrap_or(3),
        cluster: cli.cluster,
        faults: cli.faults,
        rate: cli.rate,
        lease: cli.lease,
        quiesce: cli.quiesce,
        duplicate_every: cli.duplicate_every,
        watchlist_rate: cli.watchlist_rate,
        keep_dir: cli.keep_dir,
        service_latency_ms: cli.service_latency_ms,
        fsync: match cli.redis_fsync {
            RedisFsync::Always => Fsync::Always,
            RedisFsync::Everysec => Fsync::Everysec,
            RedisFsync::Off => Fsync::Off,
        },
        exe,
    };
    let schedule = match options.schedule() {
        Ok(schedule) => schedule,
        Err(e) => {
            let _ = writeln!(err, "saga-chaos: {e}");
            return ExitCode::from(2);
        }
    };
    let _ = writeln!(err, "saga-chaos: schedule ({} faults):", schedule.len());
    for planned in &schedule {
        let _ = writeln!(err, "  {planned}");
    }
    let _ = writeln!(
        err,
        "saga-chaos: reproduce with: {}",
        options.command_line()
    );
    if cli.dry_run {
        return ExitCode::SUCCESS;
    }
    let result = nemesis::run(&options, &mut |line| {
        let _ = writeln!(std::io::stderr(), "saga-chaos: {line}");
    });
    let report = match result {
        Ok(report) => report,
        Err(NemesisError::CannotRun(why)) => {
            let _ = writeln!(err, "saga-chaos: cannot run: {why}");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    let printed = match cli.report {
        ReportFormat::Text => write!(out, "{}", report.text()),
        ReportFormat::Json => match serde_json::to_string(&report) {
            Ok(json) => writeln!(out, "{json}"),
            Err(e) => writeln!(err, "saga-chaos: cannot encode the report: {e}"),
        },
    };
    let _ = printed.and_then(|()| out.flush());
    if report.pass {
        ExitCode::SUCCESS
    } else {
        let _ = writeln!(
            err,
            "saga-chaos: INVARIANT VIOLATED (seed {seed}); reproduce with: {}",
            report.reproduce
        );
        ExitCode::from(1)
    }
}

/// Checks a `--service-latency-ms` value the way the coordinators will parse it.
fn parse_latency(text: &str) -> Result<String, String> {
    ops::parse_latency(text).map(|_| text.to_owned())
}

/// The hidden `coordinator` subcommand: what `deal-flow-coordinator` does, plus an exit
/// when stdin closes (the harness holds the other end: a harness that dies takes its
/// coordinators with it).
fn run_coordinator(args: CoordinatorArgs) -> ExitCode {
    std::thread::spawn(|| {
        let mut sink = [0_u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(3);
    });
    ops::init_logs(args.log_format, "info");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "saga-chaos coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(coordinator::run(args)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "saga-chaos coordinator could not run");
            let _ = writeln!(std::io::stderr(), "saga-chaos coordinator: {err}");
            ExitCode::from(2)
        }
    }
}
