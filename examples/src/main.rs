//! `deal-flow`: runs the VC deal-flow example and checks the ledger. Exit status 0 only when
//! no effect was applied twice and every compensated saga was fully undone.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use saga_core::{MemoryStore, SagaStore};
use saga_examples::ledger::{MemoryOffice, OfficeStore};
use saga_examples::redis_office::RedisOffice;
use saga_examples::report::{self, Timelines};
use saga_examples::scenario::{self, Progress, Settings};
use saga_redis::RedisStore;

/// Sources companies and books deals as sagas against simulated services with injected
/// faults, then prints every saga's timeline, the totals and the ledger check.
#[derive(Debug, Parser)]
#[command(name = "deal-flow", version)]
struct Cli {
    /// Companies to source (in batches, one sourcing saga each; each high score gets a child
    /// deal saga).
    #[arg(long, default_value_t = 6)]
    companies: usize,
    /// Companies per sourcing saga (their data is pulled in parallel, 4 branches at once).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=200))]
    batch_size: u64,
    /// How long a deal waits for the investment committee's approval before it is withdrawn.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    approval_timeout: std::time::Duration,
    /// The simulated partner never answers: every deal times out waiting for the committee
    /// and is compensated.
    #[arg(long)]
    no_approval: bool,
    /// The durable sleep between two messages to the partners.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    partner_spacing: std::time::Duration,
    /// Seed for the company directory, the fault injection and the partner's decisions.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Probability of a transient fault (503, timeout, 429 with retry-after) per call.
    #[arg(long, default_value_t = 0.3, value_parser = parse_rate)]
    fault_rate: f64,
    /// Force a permanent failure at this step for every saga that reaches it
    /// (e.g. `update_portfolio`, `notify_committee`, `upsert_deal_record`).
    #[arg(long)]
    fail_at: Option<String>,
    /// Stop the coordinator abruptly after this many applied effects, then restart it and
    /// resume every unfinished saga from its journal.
    #[arg(long)]
    crash_after: Option<u64>,
    /// Sagas in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Which timelines to print.
    #[arg(long, value_enum, default_value_t = Timelines::Interesting)]
    timelines: Timelines,
    /// Print JSON log lines (one per attempt outcome) on stderr.
    #[arg(long)]
    json_logs: bool,
    /// Keep sagas, books and ledger in Redis at this URL instead of in memory, so that a
    /// killed run can be resumed by running the same command again.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Key prefix in Redis (`--redis-url` mode).
    #[arg(long, default_value = "dealflow")]
    key_prefix: String,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{rate} is not between 0 and 1"))
    }
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn company_done(&self) {
        self.0.inc(1);
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if json { "info" } else { "off" }));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.json_logs);
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "deal-flow: {err}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<bool, Box<dyn std::error::Error>> {
    let settings = Settings {
        companies: cli.companies,
        batch_size: usize::try_from(cli.batch_size).unwrap_or(usize::MAX),
        seed: cli.seed,
        fault_rate: cli.fault_rate,
        fail_at: cli.fail_at.clone(),
        crash_after: cli.crash_after,
        concurrency: cli.concurrency,
        owner: "deal-flow-coordinator".into(),
        search_date: "2025-01-15".into(),
        approval_timeout: cli.approval_timeout,
        partner: !cli.no_approval,
        partner_spacing: cli.partner_spacing,
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "VC deal flow: {} companies in batches of {}, seed {}, fault rate {:.0}%, committee {}{}{} — {}",
        settings.companies,
        settings.batch_size,
        settings.seed,
        settings.fault_rate * 100.0,
        if settings.partner {
            format!("answers within {:?}", settings.approval_timeout)
        } else {
            format!(
                "never answers (--no-approval: deals time out after {:?})",
                settings.approval_timeout
            )
        },
        settings
            .fail_at
            .as_deref()
            .map(|s| format!(", forced failure at `{s}`"))
            .unwrap_or_default(),
        settings
            .crash_after
            .map(|n| format!(", crash after {n} effects"))
            .unwrap_or_default(),
        cli.redis_url.as_deref().map_or_else(
            || "in-memory store".to_owned(),
            |url| format!("Redis at {}", saga_redis::redact_url(url))
        ),
    )?;
    out.flush()?;
    let (store, office_state): (Arc<dyn SagaStore>, Arc<dyn OfficeStore>) = match &cli.redis_url {
        None => (
            Arc::new(MemoryStore::new()),
            Arc::new(MemoryOffice::default()),
        ),
        Some(url) => {
            let store = RedisStore::builder()
                .url(url.clone())
                .key_prefix(cli.key_prefix.clone())
                .connect()
                .await?;
            let office = RedisOffice::connect(url, &cli.key_prefix).await?;
            (Arc::new(store), Arc::new(office))
        }
    };
    let progress: Arc<dyn Progress> = if settings.companies > 20 && !cli.json_logs {
        let bar = ProgressBar::new(settings.companies as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} companies {elapsed_precise}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Arc::new(Bar(bar))
    } else {
        Arc::new(())
    };
    let started = std::time::Instant::now();
    let run = scenario::run(&settings, store, Arc::clone(&office_state), progress).await?;
    let elapsed = started.elapsed();
    let sagas = report::collect(&run.engine).await?;
    write!(out, "{}", report::render_timelines(&sagas, cli.timelines))?;
    let office = office_state.snapshot().await?;
    let totals = report::totals(&sagas, run.duplicate_starts, &office);
    writeln!(
        out,
        "\nTotals ({:.2}s{})",
        elapsed.as_secs_f64(),
        if run.crashed {
            ", with one crash and restart"
        } else {
            ""
        }
    )?;
    writeln!(out, "  {}", totals.line())?;
    writeln!(out, "  {}", report::primitives(&sagas).line())?;
    let check = report::check_ledger(&sagas, &office);
    if check.holds() {
        writeln!(
            out,
            "Ledger check: OK — {} effects, each applied exactly once; {} compensations, each once and in reverse order; {} child sagas undone with their parents; books match the outcomes",
            check.effects, check.compensations, check.children_undone
        )?;
    } else {
        writeln!(out, "Ledger check: FAILED")?;
        for problem in &check.problems {
            writeln!(out, "  - {problem}")?;
        }
    }
    Ok(check.holds())
}
