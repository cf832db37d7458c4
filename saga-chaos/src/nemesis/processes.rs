//! The processes of a run: the Redis server(s) (from `saga-redis-testkit`) and the
//! coordinator processes (this binary re-executed as `saga-chaos coordinator ...`). Every
//! process is signalled by the pid of a child this harness started, never by name.

use std::fs::File;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use saga_redis_testkit::{RedisCluster, RedisServer, ServerConfig};

/// How often a bounded wait on a process looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// How the Redis servers persist writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fsync {
    /// AOF with `appendfsync always`: every acknowledged write survives a kill (what
    /// deployments run).
    Always,
    /// AOF with `appendfsync everysec`: a kill may lose the last second of writes.
    Everysec,
    /// No persistence at all: a restart loses everything (the harness must then report
    /// a violation; a check of the checker).
    Off,
}

/// The Redis the run uses.
pub enum Backend {
    /// One durable standalone server.
    Standalone(RedisServer),
    /// A local durable cluster of three masters, each with one replica.
    Cluster(RedisCluster),
}

impl Backend {
    /// Starts the servers, persisting as `fsync` says.
    ///
    /// # Errors
    /// `redis-server` (or `redis-cli` for a cluster) is missing or did not come up; the
    /// message is the testkit's.
    pub fn start(cluster: bool, fsync: Fsync) -> Result<Self, String> {
        let config = match fsync {
            Fsync::Always => ServerConfig::new().durable(),
            Fsync::Everysec => ServerConfig::new().fsync_every_second(),
            Fsync::Off => ServerConfig::new(),
        };
        // The testkit panics with an explanation when it cannot start a server.
        std::panic::catch_unwind(move || {
            if cluster {
                // Failure detection well above a loaded machine's stalls: a master the
                // cluster fails over by itself while it is only slow would lose the writes
                // its replica had not yet received (the example's office does not `WAIT`).
                let config = config.directive("cluster-node-timeout 5000");
                Self::Cluster(RedisCluster::start_with_replicas(3, 1, &config))
            } else {
                Self::Standalone(RedisServer::start(config))
            }
        })
        .map_err(|panic| panic_text(&*panic))
    }

    /// The URLs of every node.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        match self {
            Self::Standalone(server) => vec![server.url()],
            Self::Cluster(cluster) => cluster.urls(),
        }
    }

    /// The address of the standalone server (`None` for a cluster).
    #[must_use]
    pub fn standalone_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Standalone(server) => Some(SocketAddr::from(([127, 0, 0, 1], server.port()))),
            Self::Cluster(_) => None,
        }
    }

    /// Nodes there are.
    #[must_use]
    pub fn nodes(&self) -> usize {
        match self {
            Self::Standalone(_) => 1,
            Self::Cluster(cluster) => cluster.nodes().len(),
        }
    }

    /// The pid of node `n`.
    #[must_use]
    pub fn pid(&self, n: usize) -> Option<u32> {
        match self {
            Self::Standalone(server) => server.pid(),
            Self::Cluster(cluster) => cluster.nodes().get(n).and_then(RedisServer::pid),
        }
    }

    /// SIGKILLs the standalone server and starts it again on the same port and AOF.
    ///
    /// # Errors
    /// A cluster (its nodes are not restarted one at a time), or the server did not come
    /// back.
    pub fn restart_standalone(&mut self) -> Result<(), String> {
        match self {
            Self::Standalone(server) => {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.restart()))
                    .map_err(|panic| panic_text(&*panic))
            }
            Self::Cluster(_) => Err("a cluster node cannot be restarted by the testkit".into()),
        }
    }

    /// `CLUSTER FAILOVER` on the replica of the `pick`-th master (modulo the masters there
    /// are now), waiting until the replica itself sees that it serves the master's slots and
    /// the cluster is healthy again. A manual failover the cluster gives up on (its master
    /// busy past the failover timeout, a node slow to answer on a loaded machine) is tried
    /// again, up to three times. Returns what happened, for the report, and whether a
    /// replica was promoted.
    ///
    /// # Errors
    /// A standalone server.
    pub fn manual_failover(&self, pick: usize) -> Result<(String, bool), String> {
        let Self::Cluster(cluster) = self else {
            return Err("a failover needs a cluster".into());
        };
        let mut tries = Vec::new();
        for _ in 0..FAILOVER_TRIES {
            let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                // The picked master, or the next one that has a replica (a former master
                // rejoining as a replica shows up a gossip round later).
                cluster.wait_until_healthy(FAILOVER_BOUND);
                let masters = cluster.masters();
                let (master, replica) = (0..masters.len())
                    .map(|k| masters[(pick + k) % masters.len()])
                    .find_map(|m| cluster.replicas_of(m).first().map(|r| (m, *r)))
                    .ok_or_else(|| format!("no master has a replica: masters {masters:?}"))?;
                // Returns only once the replica serves the slots (it panics otherwise).
                cluster.manual_failover(replica, FAILOVER_BOUND);
                cluster.wait_until_healthy(FAILOVER_BOUND);
                Ok::<_, String>(format!(
                    "CLUSTER FAILOVER on node {replica} (replica of node {master}): node {replica} is master; masters now {:?}",
                    cluster.masters()
                ))
            }));
            match attempt {
                Ok(Ok(what)) => {
                    tries.push(what);
                    return Ok((tries.join("; "), true));
                }
                Ok(Err(why)) => tries.push(why),
                Err(panic) => tries.push(panic_text(&*panic)),
            }
        }
        Ok((
            format!("no failover took effect: {}", tries.join("; ")),
            false,
        ))
    }

    /// Everything node `n` logged.
    #[must_use]
    pub fn log(&self, n: usize) -> String {
        match self {
            Self::Standalone(server) => server.log(),
            Self::Cluster(cluster) => cluster
                .nodes()
                .get(n)
                .map(RedisServer::log)
                .unwrap_or_default(),
        }
    }
}

/// How long a manual failover, and the cluster's agreement on it, may take.
const FAILOVER_BOUND: Duration = Duration::from_secs(20);

/// Manual failovers tried before the fault counts as not taking effect.
const FAILOVER_TRIES: usize = 3;

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "the Redis testkit panicked".to_owned())
}

/// How to start a coordinator.
#[derive(Clone, Debug)]
pub struct CoordinatorSpec {
    /// This binary.
    pub exe: PathBuf,
    /// Where logs go.
    pub dir: PathBuf,
    /// The key prefix of the run.
    pub prefix: String,
    /// Lease length.
    pub lease: Duration,
    /// The simulated services' latency, `--latency-ms` of the coordinators.
    pub service_latency_ms: String,
}

/// One incarnation of coordinator number `index`: its stdout and stderr are files in the
/// run's directory, its stdin a pipe this harness holds (the coordinator exits when it
/// closes, so a harness that dies leaves no coordinator behind).
pub struct CoordinatorProc {
    /// Its number.
    pub index: usize,
    /// How many coordinators ran under this number before it.
    pub incarnation: usize,
    /// Its owner id (unique per incarnation, as `<hostname>-<pid>` is in production).
    pub owner: String,
    child: Child,
    lifeline: Option<ChildStdin>,
    stdout: PathBuf,
    stderr: PathBuf,
    exit: Option<ExitStatus>,
}

impl CoordinatorProc {
    /// Starts it with `store_flags` (`--redis-url ...` or `--cluster-urls ...`).
    ///
    /// # Errors
    /// The log files cannot be created or the process cannot be spawned.
    pub fn spawn(
        spec: &CoordinatorSpec,
        index: usize,
        incarnation: usize,
        store_flags: &[String],
    ) -> Result<Self, String> {
        let owner = format!("coord-{index}-{incarnation}");
        let stdout = spec.dir.join(format!("{owner}.out"));
        let stderr = spec.dir.join(format!("{owner}.err"));
        let create = |path: &Path| {
            File::create(path).map_err(|err| format!("cannot create {}: {err}", path.display()))
        };
        let mut command = Command::new(&spec.exe);
        command
            .arg("coordinator")
            .args(store_flags)
            .args(["--key-prefix", &spec.prefix, "--owner", &owner])
            .args(["--log-format", "json", "--http-addr", "off"])
            .args(["--poll-interval", "100ms", "--shutdown-grace", "2s"])
            .arg("--lease")
            .arg(humantime::format_duration(spec.lease).to_string())
            // The engine wants in-process waits well inside the lease.
            .arg("--inline-wait-max")
            .arg(humantime::format_duration(spec.lease / 4).to_string())
            .args(["--workers", "16"])
            .args(["--latency-ms", &spec.service_latency_ms])
            .env_remove("REDIS_URL")
            .env_remove("REDIS_CLUSTER_URLS")
            .env_remove("REDIS_URL_FILE")
            .env_remove("SAGA_KEY_PREFIX")
            .env("RUST_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(create(&stdout)?)
            .stderr(create(&stderr)?);
        let mut child = command
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", spec.exe.display()))?;
        let lifeline = child.stdin.take();
        Ok(Self {
            index,
            incarnation,
            owner,
            child,
            lifeline,
            stdout,
            stderr,
            exit: None,
        })
    }

    /// Its pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Whether it printed its `ready` line.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        read(&self.stdout).contains("\"event\":\"ready\"")
    }

    /// Its stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        read(&self.stderr)
    }

    /// Waits up to `bound` for the ready line.
    ///
    /// # Errors
    /// It exited first or was not ready in time (with the end of its stderr).
    pub fn wait_ready(&mut self, bound: Duration) -> Result<(), String> {
        let deadline = Instant::now() + bound;
        loop {
            if self.is_ready() {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} exited ({status}) before it was ready: {}",
                    self.owner,
                    tail(&self.stderr(), 800)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} not ready within {bound:?}: {}",
                    self.owner,
                    tail(&self.stderr(), 800)
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`) to its pid with `kill(1)`.
    ///
    /// # Errors
    /// `kill` could not run or refused (the process is gone).
    pub fn signal(&mut self, signal: &str) -> Result<(), String> {
        if self.exited().is_some() {
            return Err(format!("{} has already exited", self.owner));
        }
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|err| format!("cannot run kill: {err}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{signal} {} failed ({status})", self.pid()))
        }
    }

    /// SIGKILL by the child's handle (no pid reuse race), and reaps it.
    ///
    /// # Errors
    /// It had already exited, or could not be reaped.
    pub fn kill(&mut self) -> Result<ExitStatus, String> {
        if let Some(status) = self.exited() {
            return Err(format!("{} had already exited ({status})", self.owner));
        }
        self.child
            .kill()
            .map_err(|err| format!("cannot kill {}: {err}", self.owner))?;
        let status = self
            .child
            .wait()
            .map_err(|err| format!("cannot reap {}: {err}", self.owner))?;
        self.exit = Some(status);
        Ok(status)
    }

    /// SIGCONT (in case it is stopped), SIGTERM, and a wait of up to `bound`; SIGKILL if it
    /// is still running then. Returns whether it stopped gracefully.
    pub fn stop(&mut self, bound: Duration) -> bool {
        if self.exited().is_some() {
            return false;
        }
        let _ = self.signal("CONT");
        if self.signal("TERM").is_err() {
            return false;
        }
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return true;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.kill();
        false
    }

    /// The process state letter from `/proc/<pid>/stat` (`T` when stopped), on Linux.
    #[must_use]
    pub fn proc_state(&self) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // `pid (comm) S ...`: the state follows the last `)`.
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    /// Waits up to `bound` for its state letter to satisfy `want`.
    #[must_use]
    pub fn wait_state(&self, bound: Duration, want: impl Fn(char) -> bool) -> Option<char> {
        let deadline = Instant::now() + bound;
        loop {
            let state = self.proc_state();
            if state.is_some_and(&want) || Instant::now() >= deadline {
                return state;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // Only this run's own child, by its handle; SIGCONT first in case it is stopped.
            let _ = self.signal("CONT");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        drop(self.lifeline.take());
    }
}

fn read(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    text
}

/// The last `max` bytes of `text` (on a char boundary).
#[must_use]
pub fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
