//! Local Redis Clusters: masters only ([`RedisCluster::start`]) or masters with replicas
//! ([`RedisCluster::start_with_replicas`]), and the faults a test inflicts on them: a node
//! killed, restarted, paused (`SIGSTOP`) or resumed, a failover by hand or by force, slots
//! moved between masters. Nodes are named by their index in [`RedisCluster::nodes`]; every
//! wait has a bound and panics with what it saw when the bound passes.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use redis::FromRedisValue;

use super::{
    POLL_PAUSE, RedisServer, START_BOUND, ServerConfig, binary, cluster_info, require_binary,
};

/// The number of hash slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// How long one command to one node may take before the node counts as unreachable (a
/// paused node accepts connections but never answers).
const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// Keys moved per `MIGRATE` while resharding: small, so that a migration stays in progress
/// (and clients see `ASK` and `TRYAGAIN`) for more than an instant.
const MIGRATE_BATCH: usize = 10;

/// `redis.conf` lines of a cluster with replicas, before the caller's own (which win): a
/// failure is detected after a second, a replica syncs without delay and may be promoted
/// whatever its data age, and replicas stay with the master they were given.
const REPLICA_DIRECTIVES: [&str; 4] = [
    "cluster-node-timeout 1000",
    "repl-diskless-sync-delay 0",
    "cluster-replica-validity-factor 0",
    "cluster-allow-replica-migration no",
];

/// A local Redis Cluster started by this test process: masters, and with
/// [`start_with_replicas`](Self::start_with_replicas) their replicas. Every node is killed
/// (by pid) on drop, paused ones included.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    paused: Vec<bool>,
}

/// One node as `CLUSTER NODES` describes it (see [`RedisCluster::topology`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    /// Its index in [`RedisCluster::nodes`] (`None`: a node this cluster did not start).
    pub index: Option<usize>,
    /// Its cluster node id.
    pub id: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Flagged `master`.
    pub master: bool,
    /// Flagged `fail` or `fail?` by the node that answered.
    pub failing: bool,
    /// For a replica: its master's node id.
    pub master_id: Option<String>,
    /// The slot ranges it serves (inclusive), without migrations in progress.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    /// How many slots it serves.
    #[must_use]
    pub fn slot_count(&self) -> usize {
        self.slots
            .iter()
            .map(|(a, b)| usize::from(*b) - usize::from(*a) + 1)
            .sum()
    }

    /// Whether it serves `slot`.
    #[must_use]
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled servers, joins them with
    /// `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`, and waits until
    /// every node reports `cluster_state:ok`.
    #[must_use]
    pub fn start(masters: usize) -> Self {
        Self::start_with(masters, &ServerConfig::new())
    }

    /// As [`start`](Self::start), each node configured with `config` (e.g.
    /// [`ServerConfig::durable`], ACL users). The `default` user must keep the permissions
    /// that `redis-cli --cluster create` and `CLUSTER INFO` need without a password; restrict
    /// it afterwards (`ACL SETUSER` on each node) to test other rules.
    #[must_use]
    pub fn start_with(masters: usize, config: &ServerConfig) -> Self {
        let cluster = Self::create(masters, 0, config);
        cluster.wait_until_ok(masters);
        cluster
    }

    /// Starts `masters` masters with `replicas_per_master` replicas each (joined with
    /// `redis-cli --cluster create ... --cluster-replicas n`), and waits (within
    /// [`START_BOUND`]) until it is [healthy](Self::wait_until_healthy) and every replica has
    /// synced. The nodes run with `cluster-node-timeout 1000` (a dead master is replaced
    /// within a few seconds), `repl-diskless-sync-delay 0`, `cluster-replica-validity-factor
    /// 0` (any replica may be promoted, however stale) and `cluster-allow-replica-migration
    /// no`; a directive of `config` overrides them.
    #[must_use]
    pub fn start_with_replicas(
        masters: usize,
        replicas_per_master: usize,
        config: &ServerConfig,
    ) -> Self {
        let mut config = config.clone();
        let mut directives: Vec<String> =
            REPLICA_DIRECTIVES.iter().map(|d| (*d).to_owned()).collect();
        directives.append(&mut config.directives);
        config.directives = directives;
        let cluster = Self::create(masters, replicas_per_master, &config);
        cluster.wait_until_ok(masters * (1 + replicas_per_master));
        cluster.wait_until_healthy(START_BOUND);
        for master in cluster.masters() {
            cluster.wait_replicated(master, START_BOUND);
        }
        cluster
    }

    fn create(masters: usize, replicas: usize, config: &ServerConfig) -> Self {
        require_binary("redis-cli");
        let count = masters * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| RedisServer::start(config.clone().cluster_node()))
            .collect();
        let cluster = RedisCluster {
            paused: vec![false; nodes.len()],
            nodes,
        };
        let mut create = Command::new(binary("redis-cli"));
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let output = create
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("cannot run redis-cli --cluster create: {err}"));
        if !output.status.success() {
            panic!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        cluster
    }

    fn wait_until_ok(&self, known: usize) {
        let deadline = Instant::now() + START_BOUND;
        for node in &self.nodes {
            loop {
                let info = cluster_info(&node.url());
                if info.as_deref().is_ok_and(|info| {
                    info.contains("cluster_state:ok")
                        && info.contains(&format!("cluster_known_nodes:{known}"))
                }) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster node on port {} did not reach cluster_state:ok within {START_BOUND:?}: {info:?}",
                    node.port
                );
                std::thread::sleep(POLL_PAUSE);
            }
        }
    }

    /// The nodes' URLs (`redis://127.0.0.1:<port>`).
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes.
    #[must_use]
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Whether node `index` runs and is not paused (so it answers).
    #[must_use]
    pub fn is_up(&self, index: usize) -> bool {
        self.nodes[index].pid().is_some() && !self.paused[index]
    }

    /// Sends `cmd` to node `index` (with a one-second bound on connecting and on the reply)
    /// and decodes the reply.
    ///
    /// # Errors
    /// The node cannot be reached, does not answer in time, answers an error, or answers
    /// something that does not decode as `T`; the message says which.
    pub fn query<T: FromRedisValue>(&self, index: usize, cmd: &redis::Cmd) -> Result<T, String> {
        let port = self.nodes[index].port;
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .map_err(|err| format!("node {index} (port {port}): {err}"))?;
        let mut connection = client
            .get_connection_with_timeout(NODE_TIMEOUT)
            .map_err(|err| format!("node {index} (port {port}): {err}"))?;
        connection
            .set_read_timeout(Some(NODE_TIMEOUT))
            .and_then(|()| connection.set_write_timeout(Some(NODE_TIMEOUT)))
            .map_err(|err| format!("node {index} (port {port}): {err}"))?;
        cmd.query::<T>(&mut connection)
            .map_err(|err| format!("node {index} (port {port}): {err}"))
    }

    /// `INFO <section>` of node `index` (e.g. `replication`, `errorstats`).
    ///
    /// # Errors
    /// As [`query`](Self::query).
    pub fn info(&self, index: usize, section: &str) -> Result<String, String> {
        self.query(index, redis::cmd("INFO").arg(section))
    }

    /// The cluster as node `index` sees it (`CLUSTER NODES`).
    ///
    /// # Errors
    /// The node does not answer, or its answer does not parse.
    pub fn topology_from(&self, index: usize) -> Result<Vec<ClusterNode>, String> {
        let text: String = self.query(index, redis::cmd("CLUSTER").arg("NODES"))?;
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| self.parse_node(line))
            .collect()
    }

    /// The cluster as the first node that answers sees it. Panics when none answers.
    #[must_use]
    pub fn topology(&self) -> Vec<ClusterNode> {
        let mut failures = Vec::new();
        for index in (0..self.nodes.len()).filter(|i| self.is_up(*i)) {
            match self.topology_from(index) {
                Ok(topology) => return topology,
                Err(err) => failures.push(err),
            }
        }
        panic!("no cluster node answered CLUSTER NODES: {failures:?}");
    }

    fn parse_node(&self, line: &str) -> Result<ClusterNode, String> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(format!("cannot parse CLUSTER NODES line {line:?}"));
        }
        let port: u16 = fields[1]
            .split(['@', ','])
            .next()
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .ok_or_else(|| format!("no port in CLUSTER NODES line {line:?}"))?;
        let flags: Vec<&str> = fields[2].split(',').collect();
        let mut slots = Vec::new();
        for field in &fields[8..] {
            if field.starts_with('[') {
                continue;
            }
            let range = match field.split_once('-') {
                Some((a, b)) => a.parse().ok().zip(b.parse().ok()),
                None => field.parse().ok().map(|s| (s, s)),
            };
            slots.push(range.ok_or_else(|| format!("bad slot {field:?} in {line:?}"))?);
        }
        Ok(ClusterNode {
            index: self.nodes.iter().position(|n| n.port == port),
            id: fields[0].to_owned(),
            port,
            master: flags.contains(&"master"),
            failing: flags.contains(&"fail") || flags.contains(&"fail?"),
            master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
            slots,
        })
    }

    /// The indices of the masters that serve slots, as the cluster sees it now.
    #[must_use]
    pub fn masters(&self) -> Vec<usize> {
        self.topology()
            .into_iter()
            .filter(|n| n.master && !n.slots.is_empty())
            .filter_map(|n| n.index)
            .collect()
    }

    /// The indices of the replicas of master `index`, as the cluster sees it now.
    #[must_use]
    pub fn replicas_of(&self, index: usize) -> Vec<usize> {
        let topology = self.topology();
        let Some(id) = topology
            .iter()
            .find(|n| n.index == Some(index))
            .map(|n| n.id.clone())
        else {
            return Vec::new();
        };
        topology
            .into_iter()
            .filter(|n| !n.master && n.master_id.as_deref() == Some(id.as_str()))
            .filter_map(|n| n.index)
            .collect()
    }

    /// The index of the master serving `slot`, as the cluster sees it now. Panics when no
    /// node this cluster started serves it.
    #[must_use]
    pub fn master_of_slot(&self, slot: u16) -> usize {
        self.topology()
            .into_iter()
            .find(|n| n.master && n.serves(slot))
            .and_then(|n| n.index)
            .unwrap_or_else(|| panic!("no master of this cluster serves slot {slot}"))
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, so hash tags count as Redis counts them).
    #[must_use]
    pub fn slot_of(&self, key: &str) -> u16 {
        let index = (0..self.nodes.len())
            .find(|i| self.is_up(*i))
            .unwrap_or_else(|| panic!("no cluster node is up to ask for the slot of {key:?}"));
        self.query(index, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .unwrap_or_else(|err| panic!("CLUSTER KEYSLOT {key:?}: {err}"))
    }

    /// Waits (within `bound`) until the cluster is healthy: every node that is up reports
    /// `cluster_state:ok`, they all agree which node serves each of the 16384 slots, every
    /// serving node is up and seen by none as failing, and every replica that is up has its
    /// link to its master up. Panics with the last thing that was wrong.
    pub fn wait_until_healthy(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        loop {
            let problem = match self.health() {
                Ok(()) => return,
                Err(problem) => problem,
            };
            assert!(
                Instant::now() < deadline,
                "the cluster did not become healthy within {bound:?}: {problem}"
            );
            std::thread::sleep(POLL_PAUSE);
        }
    }

    fn health(&self) -> Result<(), String> {
        let mut agreed: Option<Vec<Option<String>>> = None;
        for index in (0..self.nodes.len()).filter(|i| self.is_up(*i)) {
            let info: String = self.query(index, redis::cmd("CLUSTER").arg("INFO"))?;
            if !info.contains("cluster_state:ok") {
                return Err(format!("node {index} is not in cluster_state:ok"));
            }
            let topology = self.topology_from(index)?;
            let mut owners: Vec<Option<String>> = vec![None; SLOTS];
            for node in &topology {
                if !node.master {
                    if !node.failing
                        && let Some(replica) = node.index
                        && self.is_up(replica)
                    {
                        let replication: String =
                            self.query(replica, redis::cmd("INFO").arg("replication"))?;
                        if !replication.contains("master_link_status:up") {
                            return Err(format!("replica {replica} has no link to its master"));
                        }
                    }
                    continue;
                }
                if node.slots.is_empty() {
                    continue;
                }
                if node.failing || !node.index.is_some_and(|i| self.is_up(i)) {
                    return Err(format!(
                        "node {index} sees slots served by {} (port {}), which is down or failing",
                        node.id, node.port
                    ));
                }
                for (a, b) in &node.slots {
                    for slot in *a..=*b {
                        owners[usize::from(slot)] = Some(node.id.clone());
                    }
                }
            }
            if let Some(slot) = owners.iter().position(Option::is_none) {
                return Err(format!("node {index} sees slot {slot} unserved"));
            }
            match &agreed {
                None => agreed = Some(owners),
                Some(first) if *first != owners => {
                    return Err(format!(
                        "node {index} disagrees about who serves which slot"
                    ));
                }
                Some(_) => {}
            }
        }
        if agreed.is_none() {
            return Err("no node is up".into());
        }
        Ok(())
    }

    /// Waits (within `bound`) until every replica connected to master `index` has
    /// acknowledged what the master had written when this was called (its offset in `INFO
    /// replication` has reached that `master_repl_offset`; later writes may go on), and at
    /// least as many are connected as the cluster lists replicas of it that are up. Panics
    /// otherwise.
    pub fn wait_replicated(&self, index: usize, bound: Duration) {
        let deadline = Instant::now() + bound;
        let mut target = None;
        loop {
            let expected = self
                .replicas_of(index)
                .into_iter()
                .filter(|r| self.is_up(*r))
                .count();
            let problem = match self.info(index, "replication") {
                Ok(info) => match replication_lag(&info, expected, &mut target) {
                    Ok(()) => return,
                    Err(problem) => problem,
                },
                Err(err) => err,
            };
            assert!(
                Instant::now() < deadline,
                "the replicas of node {index} did not catch up within {bound:?}: {problem}"
            );
            std::thread::sleep(POLL_PAUSE);
        }
    }

    /// Kills node `index` (SIGKILL by pid, paused or not) and waits for it to exit.
    pub fn kill(&mut self, index: usize) {
        self.nodes[index].kill();
        self.paused[index] = false;
    }

    /// Kills node `index` and starts it again on the same port and directory: it rejoins
    /// the cluster from its `nodes.conf` (a former master whose slots were taken over comes
    /// back as a replica of the new master). Waits until it answers `PING`.
    pub fn restart(&mut self, index: usize) {
        self.nodes[index].restart();
        self.paused[index] = false;
    }

    /// Stops node `index` with SIGSTOP: it keeps its sockets but answers nothing, replicates
    /// nothing and gossips nothing, like a process stuck in a long pause.
    pub fn pause(&mut self, index: usize) {
        self.signal(index, "STOP");
        self.paused[index] = true;
    }

    /// Lets a [paused](Self::pause) node run again (SIGCONT).
    pub fn resume(&mut self, index: usize) {
        self.signal(index, "CONT");
        self.paused[index] = false;
    }

    fn signal(&self, index: usize, signal: &str) {
        let pid = self.nodes[index]
            .pid()
            .unwrap_or_else(|| panic!("node {index} is not running: cannot send SIG{signal}"));
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|err| panic!("cannot run kill -{signal} {pid}: {err}"));
        assert!(status.success(), "kill -{signal} {pid} failed: {status}");
    }

    /// Closes master `index`'s connections to its replicas (`CLIENT KILL TYPE replica`) and
    /// returns how many it closed. With the replicas [paused](Self::pause), nothing the
    /// master writes afterwards reaches them, even in socket buffers: they come back without
    /// it once the master is gone.
    pub fn cut_replication(&self, index: usize) -> u64 {
        self.query(
            index,
            redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"),
        )
        .unwrap_or_else(|err| panic!("CLIENT KILL TYPE replica: {err}"))
    }

    /// `CLUSTER FAILOVER` on replica `index` (a coordinated failover: its master stops
    /// writes until the replica has caught up), then waits (within `bound`) until the
    /// replica serves its former master's slots. Redis gives a manual failover five seconds
    /// (`CLUSTER_MF_TIMEOUT`) and then drops it silently ("Manual failover timed out", seen
    /// on a loaded machine when the master answers late), so the request is sent again each
    /// time that window has passed without a promotion. Panics when `bound` runs out.
    pub fn manual_failover(&self, index: usize, bound: Duration) {
        // Longer than Redis's own manual-failover timeout, so a live attempt is never cut
        // short by a second request.
        const RETRY_AFTER: Duration = Duration::from_secs(8);
        let deadline = Instant::now() + bound;
        loop {
            let answer: Result<String, String> =
                self.query(index, redis::cmd("CLUSTER").arg("FAILOVER"));
            if let Err(err) = answer {
                // A node already promoted refuses ("You should send CLUSTER FAILOVER to a
                // replica"): an earlier request took effect after all.
                if self.serves_slots(index) {
                    return;
                }
                panic!("CLUSTER FAILOVER on node {index}: {err}");
            }
            let attempt_ends = (Instant::now() + RETRY_AFTER).min(deadline);
            while Instant::now() < attempt_ends {
                if self.serves_slots(index) {
                    return;
                }
                std::thread::sleep(POLL_PAUSE);
            }
            if Instant::now() >= deadline {
                // One last look, with the topology in the message.
                self.wait_until_serving(index, Duration::ZERO);
                return;
            }
        }
    }

    /// `CLUSTER FAILOVER TAKEOVER` on replica `index`: promoted at once, without its master
    /// (which may be dead) or the other masters agreeing, with whatever data it has. Waits
    /// (within `bound`) until it serves slots. A node already promoted (the cluster failed
    /// over by itself first) is left as it is.
    pub fn forced_failover(&self, index: usize, bound: Duration) {
        let answer: Result<String, String> =
            self.query(index, redis::cmd("CLUSTER").arg("FAILOVER").arg("TAKEOVER"));
        if let Err(err) = answer {
            let promoted = self.topology_from(index).is_ok_and(|topology| {
                topology
                    .iter()
                    .any(|n| n.index == Some(index) && n.master && !n.slots.is_empty())
            });
            assert!(promoted, "CLUSTER FAILOVER TAKEOVER on node {index}: {err}");
        }
        self.wait_until_serving(index, bound);
    }

    /// Whether node `index` itself reports that it is a master serving slots.
    fn serves_slots(&self, index: usize) -> bool {
        self.topology_from(index).is_ok_and(|topology| {
            topology
                .iter()
                .any(|n| n.index == Some(index) && n.master && !n.slots.is_empty())
        })
    }

    fn wait_until_serving(&self, index: usize, bound: Duration) {
        let deadline = Instant::now() + bound;
        loop {
            let seen = self.topology_from(index);
            if seen.as_ref().is_ok_and(|topology| {
                topology
                    .iter()
                    .any(|n| n.index == Some(index) && n.master && !n.slots.is_empty())
            }) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {index} was not promoted within {bound:?}: {seen:?}"
            );
            std::thread::sleep(POLL_PAUSE);
        }
    }

    /// Moves `slots` (each served by master `from`) with their keys to master `to`, one slot
    /// after the other, as `redis-cli --cluster reshard` does: `CLUSTER SETSLOT IMPORTING`
    /// and `MIGRATING`, the keys in small batches of `MIGRATE`, then `SETSLOT NODE` on both
    /// and on every other master. Clients see `ASK` and `TRYAGAIN` meanwhile. Returns how
    /// many keys moved. Panics when a step fails.
    pub fn migrate_slots(&self, from: usize, to: usize, slots: &[u16]) -> usize {
        let topology = self.topology();
        let id_of = |index: usize| {
            topology
                .iter()
                .find(|n| n.index == Some(index))
                .map(|n| n.id.clone())
                .unwrap_or_else(|| panic!("node {index} is not in the cluster"))
        };
        let (from_id, to_id) = (id_of(from), id_of(to));
        let others: Vec<usize> = topology
            .iter()
            .filter(|n| n.master && !n.slots.is_empty())
            .filter_map(|n| n.index)
            .filter(|i| *i != from && *i != to)
            .collect();
        let to_port = self.nodes[to].port;
        let mut moved = 0;
        for slot in slots {
            let setslot = |index: usize, how: &str, id: &str| {
                let answer: Result<String, String> = self.query(
                    index,
                    redis::cmd("CLUSTER")
                        .arg("SETSLOT")
                        .arg(slot)
                        .arg(how)
                        .arg(id),
                );
                if let Err(err) = answer {
                    panic!("CLUSTER SETSLOT {slot} {how} {id} on node {index}: {err}");
                }
            };
            setslot(to, "IMPORTING", &from_id);
            setslot(from, "MIGRATING", &to_id);
            loop {
                let keys: Vec<String> = self
                    .query(
                        from,
                        redis::cmd("CLUSTER")
                            .arg("GETKEYSINSLOT")
                            .arg(slot)
                            .arg(MIGRATE_BATCH),
                    )
                    .unwrap_or_else(|err| panic!("CLUSTER GETKEYSINSLOT {slot}: {err}"));
                if keys.is_empty() {
                    break;
                }
                let answer: Result<String, String> = self.query(
                    from,
                    redis::cmd("MIGRATE")
                        .arg("127.0.0.1")
                        .arg(to_port)
                        .arg("")
                        .arg(0)
                        .arg(5000)
                        .arg("KEYS")
                        .arg(&keys),
                );
                if let Err(err) = answer {
                    panic!("MIGRATE of {keys:?} (slot {slot}) to node {to}: {err}");
                }
                moved += keys.len();
            }
            setslot(to, "NODE", &to_id);
            setslot(from, "NODE", &to_id);
            for other in &others {
                setslot(*other, "NODE", &to_id);
            }
        }
        moved
    }
}

/// `Ok` when `INFO replication` of a master shows at least `expected` connected replicas,
/// each with an offset at `target` (set from the master's offset on first use).
fn replication_lag(info: &str, expected: usize, target: &mut Option<u64>) -> Result<(), String> {
    let fields: BTreeMap<&str, &str> = info
        .lines()
        .filter_map(|line| line.trim().split_once(':'))
        .collect();
    let master_offset: u64 = fields
        .get("master_repl_offset")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no master_repl_offset in {info:?}"))?;
    let target = *target.get_or_insert(master_offset);
    let offsets: Vec<u64> = fields
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix("slave")
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
        .filter(|(_, v)| v.contains("state=online"))
        .filter_map(|(_, v)| {
            v.split(',')
                .find_map(|kv| kv.strip_prefix("offset="))
                .and_then(|o| o.parse().ok())
        })
        .collect();
    if offsets.len() < expected {
        return Err(format!(
            "{} of {expected} replicas connected and online",
            offsets.len()
        ));
    }
    if let Some(behind) = offsets.iter().find(|o| **o < target) {
        return Err(format!(
            "a replica is at offset {behind}, short of the master's {target}"
        ));
    }
    Ok(())
}
