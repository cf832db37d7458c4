//! The system under test while it runs: the Redis backend, one fault proxy per coordinator
//! (standalone mode), the coordinator processes, and a client connection to the store for
//! the harness's own reads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_core::SagaStore;
use serde::Serialize;

use super::processes::{Backend, CoordinatorProc, CoordinatorSpec, tail};
use crate::{Fault, FaultProxy};

/// How long a coordinator may take to print its ready line.
pub const READY_BOUND: Duration = Duration::from_secs(60);

/// A coordinator that exited when no fault had stopped it.
#[derive(Clone, Debug, Serialize)]
pub struct UnexpectedExit {
    /// Its owner id.
    pub owner: String,
    /// When it was found gone, after the start of the fault phase.
    pub at_ms: u64,
    /// Its exit status.
    pub status: String,
    /// The end of its stderr.
    pub stderr_tail: String,
}

/// The running system.
pub struct Rig {
    /// The Redis server(s).
    pub backend: Backend,
    /// One proxy per coordinator in standalone mode (empty for a cluster).
    pub proxies: Vec<FaultProxy>,
    /// How coordinators are started.
    pub spec: CoordinatorSpec,
    /// The current incarnation of each coordinator.
    pub coordinators: Vec<CoordinatorProc>,
    /// Every incarnation that ended, for the logs.
    pub retired: Vec<CoordinatorProc>,
    /// Coordinators down on purpose (killed, not restarted yet), by number.
    pub down: Vec<bool>,
    /// Coordinators stopped on purpose (SIGSTOP), by number.
    pub paused: Vec<bool>,
    /// Coordinators started again after they were killed (or exited).
    pub restarts: usize,
    /// Coordinators that exited without a fault.
    pub unexpected_exits: Vec<UnexpectedExit>,
    /// The harness's client store (direct, never through a proxy).
    pub store: Arc<dyn SagaStore>,
    /// The runtime the proxies, the store and the load run on.
    pub runtime: tokio::runtime::Handle,
    /// Start of the fault phase.
    pub began: Instant,
}

impl Rig {
    /// The store flags of coordinator `n`: its proxy's URL, or the cluster's URLs.
    #[must_use]
    pub fn store_flags(&self, n: usize) -> Vec<String> {
        match self.proxies.get(n) {
            Some(proxy) => vec!["--redis-url".into(), format!("redis://{}", proxy.addr())],
            None => vec!["--cluster-urls".into(), self.backend.urls().join(",")],
        }
    }

    /// Milliseconds since the start of the fault phase.
    #[must_use]
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Starts a new incarnation of coordinator `n` in place of the current one (which
    /// must have exited); does not wait for its ready line.
    ///
    /// # Errors
    /// It could not be spawned.
    pub fn respawn(&mut self, n: usize) -> Result<(), String> {
        let flags = self.store_flags(n);
        let incarnation = self.coordinators.get(n).map_or(0, |c| c.incarnation + 1);
        let fresh = CoordinatorProc::spawn(&self.spec, n, incarnation, &flags)?;
        let old = std::mem::replace(&mut self.coordinators[n], fresh);
        self.retired.push(old);
        self.restarts += 1;
        if let Some(down) = self.down.get_mut(n) {
            *down = false;
        }
        Ok(())
    }

    /// Restarts every coordinator that exited although no fault holds it down (a start
    /// that found Redis down exits with status 2, as it should: the harness, like a
    /// process supervisor, starts it again). Each such exit is recorded.
    pub fn supervise(&mut self) {
        for n in 0..self.coordinators.len() {
            if self.down[n] {
                continue;
            }
            let Some(status) = self.coordinators[n].exited() else {
                continue;
            };
            let exit = UnexpectedExit {
                owner: self.coordinators[n].owner.clone(),
                at_ms: self.now_ms(),
                status: status.to_string(),
                stderr_tail: tail(&self.coordinators[n].stderr(), 600).to_owned(),
            };
            self.unexpected_exits.push(exit);
            let _ = self.respawn(n);
        }
    }

    /// Heals everything: SIGCONT the paused, every proxy back to forwarding, `maxmemory 0`
    /// on every node, the killed started again; then waits for every coordinator's ready
    /// line.
    ///
    /// # Errors
    /// A coordinator did not become ready within [`READY_BOUND`] (after a restart of one
    /// that exited).
    pub fn heal_all(&mut self) -> Result<(), String> {
        for n in 0..self.coordinators.len() {
            if self.paused[n] {
                let _ = self.coordinators[n].signal("CONT");
                self.paused[n] = false;
            }
        }
        for proxy in &self.proxies {
            proxy.set(Fault::None);
        }
        for url in self.backend.urls() {
            let _ = super::faults::redis_command(
                &url,
                redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0),
            );
        }
        for n in 0..self.coordinators.len() {
            if self.down[n] {
                self.respawn(n)?;
            }
        }
        let deadline = Instant::now() + READY_BOUND;
        for n in 0..self.coordinators.len() {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.coordinators[n].wait_ready(left) {
                    Ok(()) => break,
                    Err(_) if self.coordinators[n].exited().is_some() && !left.is_zero() => {
                        self.supervise();
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(())
    }

    /// Stops every coordinator (SIGTERM, then SIGKILL after `bound`); returns how many
    /// stopped gracefully.
    pub fn stop_all(&mut self, bound: Duration) -> usize {
        let mut graceful = 0;
        for coordinator in &mut self.coordinators {
            graceful += usize::from(coordinator.stop(bound));
        }
        graceful
    }

    /// Every incarnation, ended or running.
    pub fn all_incarnations(&self) -> impl Iterator<Item = &CoordinatorProc> {
        self.retired.iter().chain(self.coordinators.iter())
    }
}
