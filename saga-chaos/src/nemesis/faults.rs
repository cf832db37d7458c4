//! The faults themselves: injecting and healing each planned fault on the rig, and the
//! evidence that it really happened (the process died, it was in state `T`, Redis answered
//! `OK`, the proxy's counters moved, a probe through the proxy saw the fault).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use saga_core::store::ListQuery;
use saga_core::{SagaId, SagaStatus};
use serde::Serialize;

use super::rig::Rig;
use super::schedule::{FaultKind, Planned, Target};
use crate::{Fault, ProxyStats};

/// How long one admin command to Redis may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the harness's own store reads around a pause may take.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What one fault did.
#[derive(Clone, Debug, Serialize)]
pub struct Observation {
    /// Its number in the schedule.
    pub index: usize,
    /// The kind.
    pub kind: FaultKind,
    /// What it hit.
    pub target: Target,
    /// Planned injection, after the start of the fault phase.
    pub planned_ms: u64,
    /// Actual injection.
    pub injected_ms: u64,
    /// Actual heal (`None` until healed).
    pub healed_ms: Option<u64>,
    /// Whether its effect was observed.
    pub fired: bool,
    /// What was observed.
    pub evidence: Vec<String>,
}

/// What a pause left to check for fencing.
#[derive(Clone, Debug, Serialize)]
pub struct PauseRecord {
    /// The schedule number of the pause.
    pub index: usize,
    /// The paused incarnation's owner id.
    pub owner: String,
    /// How long it was stopped, in ms.
    pub stopped_ms: u64,
    /// Sagas it held a lease on once stopped (`None`: the store could not be read).
    pub held: Option<usize>,
    /// Of those, the ones another coordinator took over (a higher fence: a new claim)
    /// before it was continued. A saga that merely ended does not count: the stopped
    /// process's own last commit, already in the socket, may have landed after the stop.
    pub taken_over: Option<usize>,
    /// The sagas taken over.
    #[serde(skip)]
    pub taken_over_ids: Vec<SagaId>,
    /// Length of its stderr when it was stopped: what it logs after the SIGCONT starts
    /// here.
    #[serde(skip)]
    pub log_offset: usize,
}

/// Per-fault state between injection and heal.
#[derive(Default)]
struct Pending {
    proxy_before: Option<ProxyStats>,
    oom_before: Option<u64>,
    held: Option<Vec<(SagaId, u64)>>,
    stopped_at: Option<Instant>,
    log_offset: usize,
}

/// Injects and heals faults on a rig, recording what happened.
pub struct Nemesis {
    pending: Vec<Option<Pending>>,
    /// One entry per injected fault.
    pub observations: Vec<Observation>,
    /// One entry per pause that was healed.
    pub pauses: Vec<PauseRecord>,
}

impl Nemesis {
    /// A nemesis for a schedule of `len` faults.
    #[must_use]
    pub fn new(len: usize) -> Self {
        Self {
            pending: (0..len).map(|_| None).collect(),
            observations: Vec::new(),
            pauses: Vec::new(),
        }
    }

    fn observation(&mut self, index: usize) -> Option<&mut Observation> {
        self.observations.iter_mut().find(|o| o.index == index)
    }

    /// Injects `fault`.
    pub fn inject(&mut self, rig: &mut Rig, fault: &Planned) {
        let mut obs = Observation {
            index: fault.index,
            kind: fault.kind,
            target: fault.target,
            planned_ms: ms(fault.at),
            injected_ms: rig.now_ms(),
            healed_ms: None,
            fired: false,
            evidence: Vec::new(),
        };
        let mut pending = Pending::default();
        let result = match (fault.kind, fault.target) {
            (FaultKind::Kill, Target::Coordinator(n)) => kill(rig, n, &mut obs),
            (FaultKind::Pause, Target::Coordinator(n)) => pause(rig, n, &mut obs, &mut pending),
            (FaultKind::RedisRestart, Target::Redis(n)) => redis_restart(rig, n, &mut obs),
            (FaultKind::ClientPause, Target::Redis(n)) => {
                client_pause(rig, n, fault.hold, &mut obs)
            }
            (FaultKind::Maxmemory, Target::Redis(n)) => maxmemory(rig, n, &mut obs, &mut pending),
            (FaultKind::ScriptFlush, Target::Redis(n)) => script_flush(rig, n, &mut obs),
            (FaultKind::Failover, Target::Redis(n)) => failover(rig, n, &mut obs),
            (kind, Target::Coordinator(n)) => {
                proxy_inject(rig, n, kind, fault.latency, &mut obs, &mut pending)
            }
            (kind, target) => Err(format!("{kind} cannot hit {target}")),
        };
        if let Err(err) = result {
            obs.evidence.push(format!("error: {err}"));
        }
        self.pending[fault.index] = Some(pending);
        self.observations.push(obs);
    }

    /// Heals `fault` (injected before).
    pub fn heal(&mut self, rig: &mut Rig, fault: &Planned) {
        let Some(mut pending) = self.pending.get_mut(fault.index).and_then(Option::take) else {
            return;
        };
        let now = rig.now_ms();
        let mut notes = Vec::new();
        let mut fired = None;
        match (fault.kind, fault.target) {
            (FaultKind::Kill, Target::Coordinator(n)) => match rig.respawn(n) {
                Ok(()) => notes.push(format!(
                    "started {} in its place",
                    rig.coordinators[n].owner
                )),
                Err(err) => notes.push(format!("error: restart failed: {err}")),
            },
            (FaultKind::Pause, Target::Coordinator(n)) => {
                self.pauses
                    .push(unpause(rig, n, fault.index, &mut pending, &mut notes));
            }
            (FaultKind::Maxmemory, Target::Redis(n)) => {
                let url = node_url(rig, n);
                match redis_command(
                    &url,
                    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0),
                ) {
                    Ok(reply) => notes.push(format!("CONFIG SET maxmemory 0: {reply}")),
                    Err(err) => notes.push(format!("error: restoring maxmemory: {err}")),
                }
                if let (Some(before), Ok(after)) = (pending.oom_before, oom_errors(&url)) {
                    notes.push(format!(
                        "writes refused with OOM meanwhile: {}",
                        after.saturating_sub(before)
                    ));
                }
            }
            (
                FaultKind::ProxyLatency
                | FaultKind::ProxyReset
                | FaultKind::ProxyBlackhole
                | FaultKind::ProxyDropReplies,
                Target::Coordinator(n),
            ) => {
                if let Some(proxy) = rig.proxies.get(n) {
                    proxy.set(Fault::None);
                    if let Some(before) = pending.proxy_before {
                        let after = proxy.stats();
                        notes.push(format!(
                            "on coord-{n}'s link meanwhile: {} connections accepted, {} refused, {} closed by the fault, {} chunks dropped ({} replies)",
                            after.accepted - before.accepted,
                            after.refused - before.refused,
                            after.closed_by_fault - before.closed_by_fault,
                            after.chunks_dropped - before.chunks_dropped,
                            after.replies_dropped - before.replies_dropped,
                        ));
                        fired = match fault.kind {
                            FaultKind::ProxyReset => Some(after.refused > before.refused),
                            FaultKind::ProxyBlackhole => {
                                Some(after.chunks_dropped > before.chunks_dropped)
                            }
                            FaultKind::ProxyDropReplies => {
                                Some(after.replies_dropped > before.replies_dropped)
                            }
                            _ => None,
                        };
                    }
                }
            }
            // A client pause ends by itself; a restart and a flush have nothing to heal.
            _ => {}
        }
        if let Some(obs) = self.observation(fault.index) {
            obs.healed_ms = Some(now);
            obs.evidence.extend(notes);
            if let Some(fired) = fired {
                obs.fired &= fired;
            }
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn kill(rig: &mut Rig, n: usize, obs: &mut Observation) -> Result<(), String> {
    let coordinator = &mut rig.coordinators[n];
    let pid = coordinator.pid();
    let status = coordinator.kill()?;
    rig.down[n] = true;
    obs.fired = status.signal() == Some(9);
    obs.evidence.push(format!(
        "SIGKILL {} (pid {pid}): {status}",
        coordinator.owner
    ));
    Ok(())
}

/// Stops at most this many times before a pause settles for a coordinator that holds no
/// lease (the pause is then a pause of an idle process: nothing to fence).
const PAUSE_TRIES: usize = 20;

fn pause(
    rig: &mut Rig,
    n: usize,
    obs: &mut Observation,
    pending: &mut Pending,
) -> Result<(), String> {
    // Stop it while it holds a lease, so that the pause tests fencing: stopped with none,
    // it is continued and stopped again a little later (as a GC pause could hit anywhere).
    let mut tries = 0;
    let held = loop {
        tries += 1;
        let coordinator = &mut rig.coordinators[n];
        coordinator.signal("STOP")?;
        pending.stopped_at = Some(Instant::now());
        rig.paused[n] = true;
        let owner = coordinator.owner.clone();
        // Read its leases only once it has really stopped, so that nothing it sends
        // afterwards can change them (a write already on its way can still land; the
        // fencing check allows for a run that ended at the stop).
        let _ = coordinator.wait_state(Duration::from_secs(1), |s| s == 'T');
        let held = held_by(rig, &owner);
        match &held {
            Ok(leases) if leases.is_empty() && tries < PAUSE_TRIES => {
                rig.coordinators[n].signal("CONT")?;
                rig.paused[n] = false;
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => break held,
        }
    };
    let coordinator = &rig.coordinators[n];
    let state = coordinator.wait_state(Duration::from_secs(1), |s| s == 'T');
    obs.fired = state == Some('T');
    obs.evidence.push(format!(
        "SIGSTOP {} (pid {}, stop #{tries}): process state {}",
        coordinator.owner,
        coordinator.pid(),
        state.map_or_else(|| "unknown".to_owned(), String::from)
    ));
    // A stopped process writes nothing more: what it logs after the SIGCONT starts here.
    pending.log_offset = coordinator.stderr().len();
    match held {
        Ok(held) => {
            obs.evidence
                .push(format!("it held {} leases once stopped", held.len()));
            pending.held = Some(held);
        }
        Err(err) => obs
            .evidence
            .push(format!("its leases could not be read: {err}")),
    }
    Ok(())
}

fn unpause(
    rig: &mut Rig,
    n: usize,
    index: usize,
    pending: &mut Pending,
    notes: &mut Vec<String>,
) -> PauseRecord {
    // Read before the SIGCONT: which of its sagas another coordinator took meanwhile.
    // A stop found only after retries must still last past the lease.
    let least = rig.spec.lease + Duration::from_millis(500);
    if let Some(stopped) = pending.stopped_at {
        std::thread::sleep(least.saturating_sub(stopped.elapsed()));
    }
    let taken_ids = pending
        .held
        .as_ref()
        .and_then(|held| taken_over(rig, held).ok());
    let taken_over = taken_ids.as_ref().map(Vec::len);
    let coordinator = &mut rig.coordinators[n];
    let stopped_ms = pending.stopped_at.map_or(0, |t| ms(t.elapsed()));
    match coordinator.signal("CONT") {
        Ok(()) => {
            let state = coordinator.wait_state(Duration::from_secs(1), |s| s != 'T');
            notes.push(format!(
                "SIGCONT after {stopped_ms} ms: process state {}; {} of its sagas taken over meanwhile",
                state.map_or_else(|| "unknown".to_owned(), String::from),
                taken_over.map_or_else(|| "unknown".to_owned(), |t| t.to_string())
            ));
        }
        Err(err) => notes.push(format!("error: SIGCONT: {err}")),
    }
    rig.paused[n] = false;
    PauseRecord {
        index,
        owner: coordinator.owner.clone(),
        stopped_ms,
        held: pending.held.as_ref().map(Vec::len),
        taken_over,
        taken_over_ids: taken_ids.unwrap_or_default(),
        log_offset: pending.log_offset,
    }
}

/// The running sagas whose lease `owner` holds, with their fence.
fn held_by(rig: &Rig, owner: &str) -> Result<Vec<(SagaId, u64)>, String> {
    let store = rig.store.clone();
    let owner = owner.to_owned();
    rig.runtime.block_on(async move {
        tokio::time::timeout(READ_TIMEOUT, async {
            let mut held = Vec::new();
            for status in [SagaStatus::Running, SagaStatus::Compensating] {
                let query = ListQuery {
                    status: Some(status),
                    limit: 1000,
                    ..ListQuery::default()
                };
                for summary in store.list(&query).await.map_err(|e| e.to_string())?.sagas {
                    if let Some(saga) = store.load(summary.id).await.map_err(|e| e.to_string())?
                        && saga.lease.as_ref().is_some_and(|l| l.owner == owner)
                    {
                        held.push((saga.id, saga.fence));
                    }
                }
            }
            Ok(held)
        })
        .await
        .map_err(|_| format!("no answer within {READ_TIMEOUT:?}"))?
    })
}

/// How many of `held` have a higher fence now (another coordinator claimed them).
fn taken_over(rig: &Rig, held: &[(SagaId, u64)]) -> Result<Vec<SagaId>, String> {
    let store = rig.store.clone();
    let held = held.to_vec();
    rig.runtime.block_on(async move {
        tokio::time::timeout(READ_TIMEOUT, async {
            let mut taken = Vec::new();
            for (id, fence) in held {
                if let Some(saga) = store.load(id).await.map_err(|e| e.to_string())?
                    && saga.fence > fence
                {
                    taken.push(id);
                }
            }
            Ok(taken)
        })
        .await
        .map_err(|_| format!("no answer within {READ_TIMEOUT:?}"))?
    })
}

fn redis_restart(rig: &mut Rig, n: usize, obs: &mut Observation) -> Result<(), String> {
    let before = rig.backend.pid(n);
    rig.backend.restart_standalone()?;
    let after = rig.backend.pid(n);
    obs.fired = before.is_some() && after.is_some() && before != after;
    obs.evidence.push(format!(
        "redis-server pid {} SIGKILLed, restarted on its port and data directory as pid {}",
        before.map_or_else(|| "?".to_owned(), |p| p.to_string()),
        after.map_or_else(|| "?".to_owned(), |p| p.to_string())
    ));
    Ok(())
}

fn client_pause(rig: &Rig, n: usize, hold: Duration, obs: &mut Observation) -> Result<(), String> {
    let reply = redis_command(
        &node_url(rig, n),
        redis::cmd("CLIENT").arg("PAUSE").arg(ms(hold)).arg("ALL"),
    )?;
    obs.fired = reply == "OK";
    obs.evidence
        .push(format!("CLIENT PAUSE {} ALL: {reply}", ms(hold)));
    Ok(())
}

fn maxmemory(
    rig: &Rig,
    n: usize,
    obs: &mut Observation,
    pending: &mut Pending,
) -> Result<(), String> {
    let url = node_url(rig, n);
    let used = info_field(&url, "memory", "used_memory")?;
    pending.oom_before = oom_errors(&url).ok();
    let limit = used + 64 * 1024;
    let reply = redis_command(
        &url,
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(limit),
    )?;
    let got = redis_command(&url, redis::cmd("CONFIG").arg("GET").arg("maxmemory"))?;
    obs.fired = reply == "OK" && got.contains(&limit.to_string());
    obs.evidence.push(format!(
        "used_memory {used}; CONFIG SET maxmemory {limit}: {reply}; CONFIG GET: {got}"
    ));
    Ok(())
}

fn failover(rig: &Rig, n: usize, obs: &mut Observation) -> Result<(), String> {
    let (what, promoted) = rig.backend.manual_failover(n)?;
    obs.fired = promoted;
    obs.evidence.push(what);
    Ok(())
}

fn script_flush(rig: &Rig, n: usize, obs: &mut Observation) -> Result<(), String> {
    let url = node_url(rig, n);
    let before = info_field(&url, "memory", "number_of_cached_scripts").ok();
    let reply = redis_command(&url, redis::cmd("SCRIPT").arg("FLUSH"))?;
    obs.fired = reply == "OK";
    obs.evidence.push(format!(
        "SCRIPT FLUSH: {reply} ({} cached scripts before)",
        before.map_or_else(|| "?".to_owned(), |b| b.to_string())
    ));
    Ok(())
}

fn proxy_inject(
    rig: &Rig,
    n: usize,
    kind: FaultKind,
    latency: Duration,
    obs: &mut Observation,
    pending: &mut Pending,
) -> Result<(), String> {
    let proxy = rig
        .proxies
        .get(n)
        .ok_or_else(|| format!("coord-{n} has no proxy (cluster mode)"))?;
    let fault = match kind {
        FaultKind::ProxyLatency => Fault::Latency(latency),
        FaultKind::ProxyReset => Fault::Reset,
        FaultKind::ProxyBlackhole => Fault::Blackhole,
        FaultKind::ProxyDropReplies => Fault::DropReplies,
        other => return Err(format!("{other} is not a proxy fault")),
    };
    let before = proxy.stats();
    pending.proxy_before = Some(before);
    proxy.set(fault.clone());
    // A probe of our own through the same proxy shows the fault whatever the
    // coordinator happens to send meanwhile.
    // A latency probe waits out a Redis fault that may overlap (a CLIENT PAUSE of up to
    // 2 s, a restart); the others need only see no answer.
    let wait = if kind == FaultKind::ProxyLatency {
        Duration::from_secs(5)
    } else {
        Duration::from_millis(500)
    };
    let probe = probe(proxy.addr(), wait);
    // The probe shows the symptom; the proxy's counters, read again at the heal, show
    // the proxy did it (a reply that arrives late is counted late).
    let (fired, seen) = match (kind, &probe) {
        (FaultKind::ProxyLatency, Probe::Pong(rtt)) => (
            *rtt >= latency * 2,
            format!(
                "a PING through it took {} ms (at least 2 × {} ms)",
                rtt.as_millis(),
                latency.as_millis()
            ),
        ),
        (FaultKind::ProxyReset, Probe::Closed) => {
            (true, "a probe connection was closed at once".to_owned())
        }
        (FaultKind::ProxyBlackhole, Probe::NoAnswer) => {
            (true, "a PING through it got no answer".to_owned())
        }
        (FaultKind::ProxyDropReplies, Probe::NoAnswer | Probe::Closed) => (
            true,
            "a PING through it got no reply before the connection closed or timed out".to_owned(),
        ),
        (_, Probe::Failed(why)) => (false, format!("the probe failed: {why}")),
        (_, probe) => (false, format!("the probe saw {probe:?}, not the fault")),
    };
    obs.fired = fired;
    obs.evidence
        .push(format!("coord-{n}'s proxy set to {fault:?}; {seen}"));
    Ok(())
}

/// What a PING through a proxy saw.
#[derive(Debug)]
enum Probe {
    Pong(Duration),
    Closed,
    NoAnswer,
    Failed(String),
}

fn probe(addr: SocketAddr, wait: Duration) -> Probe {
    let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(stream) => stream,
        Err(err) => return Probe::Failed(err.to_string()),
    };
    let _ = stream.set_read_timeout(Some(wait));
    let sent = Instant::now();
    if let Err(err) = stream.write_all(b"*1\r\n$4\r\nPING\r\n") {
        return Probe::Failed(err.to_string());
    }
    let mut reply = Vec::new();
    let mut buf = [0_u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Probe::Closed,
            Ok(got) => {
                reply.extend_from_slice(&buf[..got]);
                if reply.ends_with(b"\r\n") {
                    return if reply.starts_with(b"+PONG") {
                        Probe::Pong(sent.elapsed())
                    } else {
                        Probe::Failed(String::from_utf8_lossy(&reply).into_owned())
                    };
                }
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Probe::NoAnswer;
            }
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return Probe::Closed,
            Err(err) => return Probe::Failed(err.to_string()),
        }
    }
}

fn node_url(rig: &Rig, n: usize) -> String {
    let urls = rig.backend.urls();
    urls.get(n)
        .or_else(|| urls.first())
        .cloned()
        .unwrap_or_default()
}

/// Runs one command on a fresh direct connection to `url` (never through a proxy) and
/// returns its reply as text.
///
/// # Errors
/// The connection or the command failed, or no answer came within 2 s.
pub fn redis_command(url: &str, command: &redis::Cmd) -> Result<String, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut connection = client
        .get_connection_with_timeout(ADMIN_TIMEOUT)
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    connection
        .set_read_timeout(Some(ADMIN_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let value: redis::Value = command.query(&mut connection).map_err(|e| e.to_string())?;
    Ok(value_text(&value))
}

fn value_text(value: &redis::Value) -> String {
    match value {
        redis::Value::Okay => "OK".to_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        redis::Value::Int(i) => i.to_string(),
        redis::Value::Array(items) => items.iter().map(value_text).collect::<Vec<_>>().join(" "),
        redis::Value::VerbatimString { text, .. } => text.clone(),
        other => format!("{other:?}"),
    }
}

/// One numeric field of `INFO <section>`.
fn info_field(url: &str, section: &str, field: &str) -> Result<u64, String> {
    let info = redis_command(url, redis::cmd("INFO").arg(section))?;
    info.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| format!("INFO {section} has no {field}"))
}

/// Commands refused with OOM since the server started (`INFO errorstats`).
fn oom_errors(url: &str) -> Result<u64, String> {
    let info = redis_command(url, redis::cmd("INFO").arg("errorstats"))?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("errorstat_OOM:count=")?.trim().parse().ok())
        .unwrap_or(0))
}
