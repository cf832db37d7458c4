//! The fault schedule: which fault hits what, when and for how long, generated from the
//! seed before the run so that a seed names one run.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// A kind of fault the nemesis injects.
///
/// A new kind (a replica `failover`, say) is one more variant here, its [`Resource`] and
/// hold in [`FaultKind::resource`] and [`FaultKind::hold`], its action in
/// [`faults`](super::faults), and whether it applies to a mode in [`FaultKind::applies`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL a coordinator; start a new one in its place 0.5–3 s later.
    Kill,
    /// SIGSTOP a coordinator for longer than the lease, then SIGCONT.
    Pause,
    /// SIGKILL the redis-server and start it again on the same port and AOF.
    RedisRestart,
    /// `CLIENT PAUSE <ms> ALL` on a Redis server.
    ClientPause,
    /// `CONFIG SET maxmemory` just above `used_memory` for a few seconds (writes are refused
    /// with OOM), then back to 0.
    Maxmemory,
    /// `SCRIPT FLUSH`: the store's scripts must be loaded again.
    ScriptFlush,
    /// Latency on one coordinator's link to Redis.
    ProxyLatency,
    /// Connection resets on one coordinator's link.
    ProxyReset,
    /// A blackhole (partition) on one coordinator's link.
    ProxyBlackhole,
    /// Replies lost on one coordinator's link (the commands are applied).
    ProxyDropReplies,
    /// Cluster only: `CLUSTER FAILOVER` on a replica of one master, under load (the master
    /// hands its slots over once the replica has caught up, so nothing is lost).
    Failover,
}

/// Every kind, in the order of the docs.
pub const ALL_KINDS: [FaultKind; 11] = [
    FaultKind::Kill,
    FaultKind::Pause,
    FaultKind::RedisRestart,
    FaultKind::ClientPause,
    FaultKind::Maxmemory,
    FaultKind::ScriptFlush,
    FaultKind::ProxyLatency,
    FaultKind::ProxyReset,
    FaultKind::ProxyBlackhole,
    FaultKind::ProxyDropReplies,
    FaultKind::Failover,
];

/// What a fault occupies while it lasts: two faults on one resource never overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// One coordinator process (and its proxy).
    Coordinator,
    /// The Redis server(s).
    Redis,
}

impl FaultKind {
    /// The kebab-case name used on the command line and in reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Pause => "pause",
            Self::RedisRestart => "redis-restart",
            Self::ClientPause => "client-pause",
            Self::Maxmemory => "maxmemory",
            Self::ScriptFlush => "script-flush",
            Self::ProxyLatency => "proxy-latency",
            Self::ProxyReset => "proxy-reset",
            Self::ProxyBlackhole => "proxy-blackhole",
            Self::ProxyDropReplies => "proxy-drop-replies",
            Self::Failover => "failover",
        }
    }

    /// What the fault occupies.
    #[must_use]
    pub fn resource(self) -> Resource {
        match self {
            Self::Kill
            | Self::Pause
            | Self::ProxyLatency
            | Self::ProxyReset
            | Self::ProxyBlackhole
            | Self::ProxyDropReplies => Resource::Coordinator,
            Self::RedisRestart
            | Self::ClientPause
            | Self::Maxmemory
            | Self::ScriptFlush
            | Self::Failover => Resource::Redis,
        }
    }

    /// Whether the fault can be injected in this mode: in a cluster the coordinators talk
    /// to every node directly (no proxy), and a node is not restarted on its own (a killed
    /// master's unreplicated writes would be lost: the example's office does not `WAIT`,
    /// see `tests/tests/cluster_failover.rs` for that fault); a failover needs a cluster.
    #[must_use]
    pub fn applies(self, cluster: bool) -> bool {
        if cluster {
            !matches!(
                self,
                Self::RedisRestart
                    | Self::ProxyLatency
                    | Self::ProxyReset
                    | Self::ProxyBlackhole
                    | Self::ProxyDropReplies
            )
        } else {
            self != Self::Failover
        }
    }

    /// How long the fault lasts, drawn from `rng` (`lease` bounds a pause from below).
    fn hold(self, rng: &mut fastrand::Rng, lease: Duration) -> Duration {
        let ms = |low: u64, high: u64, rng: &mut fastrand::Rng| {
            Duration::from_millis(rng.u64(low..=high))
        };
        match self {
            Self::Kill => ms(500, 3000, rng),
            // Past the lease, so that another coordinator takes the paused one's sagas.
            Self::Pause => lease + ms(500, 2000, rng),
            Self::RedisRestart | Self::ScriptFlush | Self::Failover => Duration::ZERO,
            Self::ClientPause => ms(500, 2000, rng),
            Self::Maxmemory
            | Self::ProxyLatency
            | Self::ProxyReset
            | Self::ProxyBlackhole
            | Self::ProxyDropReplies => ms(1000, 3000, rng),
        }
    }

    /// How long after its hold the resource stays reserved (a restarted process or server
    /// coming back), so that the next fault on it finds it up.
    fn settle(self) -> Duration {
        match self {
            Self::Kill | Self::RedisRestart => Duration::from_millis(1500),
            // The new topology reaches every node and client by gossip and redirects.
            Self::Failover => Duration::from_secs(2),
            // The continued process must live on long enough to try its late writes (and
            // log their refusal) before another fault, a kill say, hits it.
            Self::Pause => Duration::from_secs(3),
            _ => Duration::from_millis(300),
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault name on the command line that names no fault.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{0}` is not a fault kind; use a comma-separated list of: kill, pause, redis-restart, client-pause, maxmemory, script-flush, proxy-latency, proxy-reset, proxy-blackhole, proxy-drop-replies, failover"
)]
pub struct UnknownFault(pub String);

impl FromStr for FaultKind {
    type Err = UnknownFault;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ALL_KINDS
            .iter()
            .copied()
            .find(|k| k.name() == text.trim())
            .ok_or_else(|| UnknownFault(text.to_owned()))
    }
}

/// What a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "index")]
pub enum Target {
    /// Coordinator number `n` (its process, or its proxy).
    Coordinator(usize),
    /// Redis node number `n` (0 for a standalone server).
    Redis(usize),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Coordinator(n) => write!(f, "coord-{n}"),
            Self::Redis(n) => write!(f, "redis-{n}"),
        }
    }
}

/// One planned fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Planned {
    /// Its number in the schedule.
    pub index: usize,
    /// When it is injected, after the start of the fault phase.
    #[serde(rename = "at_ms", serialize_with = "as_ms")]
    pub at: Duration,
    /// The kind.
    pub kind: FaultKind,
    /// What it hits.
    pub target: Target,
    /// How long until it is healed.
    #[serde(rename = "hold_ms", serialize_with = "as_ms")]
    pub hold: Duration,
    /// The added delay of a `proxy-latency` (zero otherwise).
    #[serde(rename = "latency_ms", serialize_with = "as_ms")]
    pub latency: Duration,
}

impl fmt::Display for Planned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{:<2} t={:>6.2}s {:<18} {:<8} hold {:.2}s",
            self.index,
            self.at.as_secs_f64(),
            self.kind.name(),
            self.target.to_string(),
            self.hold.as_secs_f64()
        )?;
        if !self.latency.is_zero() {
            write!(f, " (+{} ms per chunk)", self.latency.as_millis())?;
        }
        Ok(())
    }
}

/// Serializes a duration as whole milliseconds.
pub(crate) fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the schedule is generated for.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    /// The seed.
    pub seed: u64,
    /// Length of the fault phase.
    pub phase: Duration,
    /// The kinds to draw from.
    pub kinds: &'a [FaultKind],
    /// Coordinators there are.
    pub coordinators: usize,
    /// Redis nodes there are (1 standalone).
    pub redis_nodes: usize,
    /// The coordinators' lease.
    pub lease: Duration,
}

/// Shortest and longest time between two fault starts.
const GAP_MS: (u64, u64) = (1000, 4000);

/// The first fault comes this long after the start of the fault phase (load first).
const FIRST_AT: Duration = Duration::from_secs(1);

/// Generates the schedule: a fault every 1–4 s from 1 s into the phase until its end. The
/// first faults are the selected kinds in a seeded order, each once, and the gaps shrink
/// (down to 0.5 s) when the rest of the phase would be too short for the kinds not drawn
/// yet, so every selected kind appears once the phase is at least `0.5 s × kinds` long.
/// Two faults never hold one coordinator, or Redis, at once: a fault whose resource is
/// busy is moved to when it is free (possibly past the end of the phase).
#[must_use]
pub fn generate(plan: &Plan<'_>) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let mut first: Vec<FaultKind> = plan.kinds.to_vec();
    first.sort_unstable();
    first.dedup();
    rng.shuffle(&mut first);
    let mut uncovered = first.len();
    let mut first = first.into_iter();
    let mut coordinator_free = vec![Duration::ZERO; plan.coordinators.max(1)];
    let mut redis_free = Duration::ZERO;
    let mut out = Vec::new();
    let mut t = FIRST_AT;
    while !plan.kinds.is_empty() && (t < plan.phase || uncovered > 0) {
        let kind = match first.next() {
            Some(kind) => {
                uncovered -= 1;
                kind
            }
            None => plan.kinds[rng.usize(0..plan.kinds.len())],
        };
        let hold = kind.hold(&mut rng, plan.lease);
        let latency = if kind == FaultKind::ProxyLatency {
            Duration::from_millis(rng.u64(20..=150))
        } else {
            Duration::ZERO
        };
        let (at, target) = match kind.resource() {
            Resource::Coordinator => {
                // A free coordinator at random, else the one free first.
                let free: Vec<usize> = (0..coordinator_free.len())
                    .filter(|&n| coordinator_free[n] <= t)
                    .collect();
                let n = if free.is_empty() {
                    (0..coordinator_free.len())
                        .min_by_key(|&n| coordinator_free[n])
                        .unwrap_or(0)
                } else {
                    free[rng.usize(0..free.len())]
                };
                let at = t.max(coordinator_free[n]);
                coordinator_free[n] = at + hold + kind.settle();
                (at, Target::Coordinator(n))
            }
            Resource::Redis => {
                let at = t.max(redis_free);
                redis_free = at + hold + kind.settle();
                (at, Target::Redis(rng.usize(0..plan.redis_nodes.max(1))))
            }
        };
        out.push(Planned {
            index: out.len(),
            at,
            kind,
            target,
            hold,
            latency,
        });
        let mut gap = Duration::from_millis(rng.u64(GAP_MS.0..=GAP_MS.1));
        if uncovered > 0 {
            let room = plan.phase.saturating_sub(t) / u32::try_from(uncovered).unwrap_or(1);
            gap = gap.min(room).max(Duration::from_millis(500));
        }
        t += gap;
    }
    out.sort_by_key(|p| p.at);
    for (index, planned) in out.iter_mut().enumerate() {
        planned.index = index;
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn plan(seed: u64, seconds: u64, kinds: &[FaultKind]) -> Vec<Planned> {
        generate(&Plan {
            seed,
            phase: Duration::from_secs(seconds),
            kinds,
            coordinators: 3,
            redis_nodes: 1,
            lease: Duration::from_secs(2),
        })
    }

    #[test]
    fn every_kind_appears_and_the_seed_fixes_the_schedule() {
        for seed in 0..200 {
            let schedule = plan(seed, 22, &ALL_KINDS);
            for kind in ALL_KINDS {
                assert!(
                    schedule.iter().any(|p| p.kind == kind),
                    "seed {seed}: {kind} missing"
                );
            }
            assert_eq!(schedule, plan(seed, 22, &ALL_KINDS));
        }
    }

    #[test]
    fn no_two_faults_hold_one_resource_at_once() {
        for seed in 0..200 {
            let schedule = plan(seed, 45, &ALL_KINDS);
            for (i, a) in schedule.iter().enumerate() {
                for b in &schedule[i + 1..] {
                    let same = match (a.target, b.target) {
                        (Target::Coordinator(x), Target::Coordinator(y)) => x == y,
                        (Target::Redis(_), Target::Redis(_)) => true,
                        _ => false,
                    };
                    if same {
                        assert!(b.at >= a.at + a.hold, "seed {seed}: {a} overlaps {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for kind in ALL_KINDS {
            assert_eq!(kind.name().parse::<FaultKind>().unwrap(), kind);
        }
        assert!("fail-over".parse::<FaultKind>().is_err());
    }
}
