//! What the benchmarks read from Redis about Redis: `INFO commandstats` and `INFO memory`,
//! a `MONITOR` sample that tells the commands clients send from those scripts run, and the
//! store's raw commit ceiling.
//!
//! `INFO commandstats` counts every command the server executed, the ones scripts run inside
//! the server included, and Redis 7.0 keeps no per-client counter. Script calls (`evalsha`,
//! `eval`, `fcall`) are round trips by construction; for every other command a short
//! `MONITOR` sample ([`monitor_sample`]) says which share came from clients (MONITOR tags
//! commands run by a script with `lua`). The sample is taken outside the measured window:
//! MONITOR slows the server down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use saga_core::store::{ClaimRequest, CreateOutcome, NewSaga, Schedule, Transition};
use saga_core::{SagaId, SagaStatus, SagaStore, StoreError};

/// Command name → calls, as `INFO commandstats` reports them (`cmdstat_` stripped, so
/// subcommands look like `client|setinfo`).
pub type CommandCounts = BTreeMap<String, u64>;

/// Parses the text of `INFO commandstats`.
#[must_use]
pub fn parse_commandstats(info: &str) -> CommandCounts {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The calls made between two snapshots (commands with none left out).
#[must_use]
pub fn delta(before: &CommandCounts, after: &CommandCounts) -> CommandCounts {
    after
        .iter()
        .map(|(name, calls)| {
            let earlier = before.get(name).copied().unwrap_or(0);
            (name.clone(), calls.saturating_sub(earlier))
        })
        .filter(|(_, calls)| *calls > 0)
        .collect()
}

/// `true` for the commands that run a script: each is one client round trip.
#[must_use]
pub fn is_script_call(name: &str) -> bool {
    name.starts_with("eval") || name.starts_with("fcall")
}

/// `true` for connection and server commands (setup, pub/sub, admin), which only clients
/// send.
#[must_use]
pub fn is_connection_command(name: &str) -> bool {
    let base = name.split('|').next().unwrap_or(name);
    matches!(
        base,
        "auth"
            | "client"
            | "cluster"
            | "command"
            | "config"
            | "hello"
            | "info"
            | "monitor"
            | "ping"
            | "psubscribe"
            | "punsubscribe"
            | "quit"
            | "readonly"
            | "reset"
            | "script"
            | "select"
            | "ssubscribe"
            | "subscribe"
            | "sunsubscribe"
            | "unsubscribe"
            | "wait"
    )
}

/// Takes `times` × `cost` off `counts` (the commands of a known caller, such as a sampler
/// that ran during the window).
pub fn subtract(counts: &mut CommandCounts, cost: &CommandCounts, times: u64) {
    for (name, calls) in cost {
        if let Some(count) = counts.get_mut(name) {
            *count = count.saturating_sub(calls.saturating_mul(times));
        }
    }
    counts.retain(|_, count| *count > 0);
}

/// One `INFO <section>` field as an integer (`used_memory` of `INFO memory`, ...).
#[must_use]
pub fn info_field(info: &str, field: &str) -> Option<u64> {
    info.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name == field).then(|| value.trim().parse().ok())?
    })
}

/// A connection for the benchmark's own `INFO` reads.
///
/// # Errors
/// The URL is invalid or the server does not answer.
pub async fn connect(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// `INFO <section>` as text.
///
/// # Errors
/// The server does not answer.
pub async fn info(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
) -> redis::RedisResult<String> {
    redis::cmd("INFO").arg(section).query_async(conn).await
}

/// Commands seen in a `MONITOR` sample, by who sent them.
#[derive(Clone, Debug, Default)]
pub struct MonitorSample {
    /// Lowercase command name → commands sent by clients.
    pub client: BTreeMap<String, u64>,
    /// Lowercase command name → commands run inside scripts.
    pub script: BTreeMap<String, u64>,
    /// How long the sample lasted.
    pub length: Duration,
}

impl MonitorSample {
    /// The share of `name` (a commandstats name; `a|b` is looked up as `a`, since MONITOR
    /// shows subcommands as a second argument) that clients sent. Script calls are always
    /// client calls. A command the sample never saw (a rare one) is a client's when it is a
    /// connection or server command ([`is_connection_command`]: scripts cannot run those)
    /// and otherwise taken as run inside a script, since the store sends its data commands
    /// as scripts.
    #[must_use]
    pub fn client_share(&self, name: &str) -> f64 {
        if is_script_call(name) {
            return 1.0;
        }
        let base = name.split('|').next().unwrap_or(name);
        let client = self.client.get(base).copied().unwrap_or(0);
        let script = self.script.get(base).copied().unwrap_or(0);
        if client + script > 0 {
            client as f64 / (client + script) as f64
        } else if is_connection_command(name) {
            1.0
        } else {
            0.0
        }
    }
}

/// Watches `MONITOR` on `url` for `length` and tallies the commands by sender. The commands
/// of the connection that asks (none after `MONITOR` itself) are not in it.
///
/// # Errors
/// The server does not answer.
pub async fn monitor_sample(url: &str, length: Duration) -> redis::RedisResult<MonitorSample> {
    let monitor = redis::Client::open(url)?.get_async_monitor().await?;
    let mut lines = monitor.into_on_message::<String>();
    let mut sample = MonitorSample::default();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + length;
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline, lines.next()).await {
        if let Some((from_script, name)) = parse_monitor_line(&line) {
            let tally = if from_script {
                &mut sample.script
            } else {
                &mut sample.client
            };
            *tally.entry(name).or_insert(0) += 1;
        }
    }
    sample.length = started.elapsed();
    Ok(sample)
}

/// `1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" "..."` → (false, "evalsha");
/// `[0 lua] "HSET" ...` → (true, "hset").
fn parse_monitor_line(line: &str) -> Option<(bool, String)> {
    let (_, rest) = line.split_once('[')?;
    let (source, rest) = rest.split_once(']')?;
    let from_script = source.split_whitespace().nth(1)? == "lua";
    let quoted = rest.trim_start().strip_prefix('"')?;
    let (name, _) = quoted.split_once('"')?;
    Some((from_script, name.to_ascii_lowercase()))
}

/// What [`commit_ceiling`] measured.
#[derive(Clone, Copy, Debug)]
pub struct Ceiling {
    /// Commits made.
    pub calls: u64,
    /// From the first commit to the last answer.
    pub elapsed: Duration,
}

impl Ceiling {
    /// Commits per second.
    #[must_use]
    pub fn calls_per_s(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// The ceiling of a store on this machine: its commit transition (the one every step uses)
/// called directly, `tasks` tasks each committing to its own saga, until each made
/// `per_task` commits or `time_limit` passed. The sagas are created (and claimed) first, in
/// the store's own prefix, and not counted.
///
/// # Errors
/// A create or a commit failed.
pub async fn commit_ceiling(
    store: Arc<dyn SagaStore>,
    tasks: u64,
    per_task: u64,
    time_limit: Option<Duration>,
) -> Result<Ceiling, crate::BoxError> {
    let state = serde_json::json!({"journal": [{"name": "step", "output": 42}]}).to_string();
    let event = serde_json::json!({"type": "StepStarted", "position": 1, "attempt": 1}).to_string();
    let mut leases = Vec::new();
    for _ in 0..tasks.max(1) {
        let created = store
            .create(NewSaga {
                id: SagaId::random(),
                saga_type: "ceiling".into(),
                version: 1,
                idempotency_key: None,
                fingerprint: "f".into(),
                state: state.clone(),
                events: vec![event.clone()],
                claim: Some(ClaimRequest {
                    owner: "bench".into(),
                    ttl: Duration::from_secs(60),
                }),
            })
            .await?;
        match created {
            CreateOutcome::Created { lease: Some(lease) } => leases.push(lease),
            other => return Err(format!("the ceiling's create answered {other:?}").into()),
        }
    }
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for lease in leases {
        let store = Arc::clone(&store);
        let (state, event) = (state.clone(), event.clone());
        running.spawn(async move {
            let mut made = 0u64;
            while made < per_task && time_limit.is_none_or(|limit| started.elapsed() < limit) {
                let transition = Transition {
                    commit_id: format!("{}.{made}", lease.fence),
                    events: vec![event.clone()],
                    state: state.clone(),
                    status: SagaStatus::Running,
                    schedule: Schedule::Continue {
                        ttl: Duration::from_secs(60),
                    },
                };
                store.commit(&lease, transition).await?;
                made += 1;
            }
            Ok::<u64, StoreError>(made)
        });
    }
    let mut calls = 0;
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok(made) => calls += made?,
            Err(err) => return Err(format!("a ceiling task failed: {err}").into()),
        }
    }
    Ok(Ceiling {
        calls,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_lines_say_who_sent_the_command() {
        assert_eq!(
            parse_monitor_line(r#"1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" "ab" "3""#),
            Some((false, "evalsha".to_owned()))
        );
        assert_eq!(
            parse_monitor_line(r#"1700000000.123456 [0 lua] "HSET" "k" "f" "v""#),
            Some((true, "hset".to_owned()))
        );
        assert_eq!(parse_monitor_line("OK"), None);
    }

    #[test]
    fn unseen_commands_are_clients_only_when_scripts_cannot_send_them() {
        let mut sample = MonitorSample::default();
        sample.client.insert("zrangebyscore".into(), 3);
        sample.script.insert("zrangebyscore".into(), 1);
        sample.script.insert("hset".into(), 10);
        assert!((sample.client_share("zrangebyscore") - 0.75).abs() < 1e-9);
        assert!(sample.client_share("hset").abs() < 1e-9);
        assert!((sample.client_share("evalsha") - 1.0).abs() < 1e-9);
        assert!((sample.client_share("client|setinfo") - 1.0).abs() < 1e-9);
        assert!(sample.client_share("hgetall").abs() < 1e-9);
    }

    #[test]
    fn info_fields_and_commandstats_parse() {
        let info = "# Memory\r\nused_memory:1024\r\nused_memory_human:1K\r\n";
        assert_eq!(info_field(info, "used_memory"), Some(1024));
        let stats = "cmdstat_evalsha:calls=5,usec=1\r\ncmdstat_client|setinfo:calls=2,usec=1\r\n";
        let parsed = parse_commandstats(stats);
        assert_eq!(parsed.get("evalsha"), Some(&5));
        assert_eq!(parsed.get("client|setinfo"), Some(&2));
    }
}
