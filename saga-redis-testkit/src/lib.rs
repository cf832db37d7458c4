//! Test support for `saga-redis`: throwaway `redis-server` processes and local Redis
//! Clusters, for tests that need a real server.
//!
//! - [`RedisServer::start`] spawns `redis-server` on a free loopback port with its own
//!   temporary directory (`save ""`, optional AOF with `appendfsync always`, optional
//!   `requirepass` and ACL users), waits until it answers `PING`, and kills it (by pid) when
//!   dropped, printing its log when the dropping thread is panicking. [`RedisServer::restart`]
//!   kills it and starts it again on the same port and directory, so an AOF is reloaded.
//! - [`ServerConfig::tls`] adds a TLS port with a throwaway CA, a server certificate and a
//!   client certificate (generated with `openssl`); [`ServerConfig::tls_client_auth`] makes
//!   the server require a client certificate (mutual TLS).
//! - [`RedisCluster::start`] spawns a local Redis Cluster of masters (no replicas) and waits
//!   until every node reports `cluster_state:ok`; [`RedisCluster::start_with`] configures
//!   its nodes (AOF, ACL users). [`RedisCluster::start_with_replicas`] adds replicas (with a
//!   short `cluster-node-timeout`, so failovers take seconds), and the cluster's fault helpers
//!   kill, restart, pause (`SIGSTOP`) and resume nodes, fail over by hand or by force, and
//!   move slots between masters, every wait bounded.
//! - [`shared_server`] and [`shared_cluster`] give one server (cluster) per test process,
//!   shared by all its tests: each test then uses its own key prefix. They honour
//!   `REDIS_URL` (and `REDIS_CLUSTER_URLS`, comma-separated) to use servers that already run.
//!
//! Every spawned server has a watchdog: a `sh` process that holds the read end of a pipe
//! whose write end only this test process holds. When the test process exits — even without
//! running destructors, as happens to statics, or when it is killed — the pipe closes and the
//! watchdog kills that one server by pid and removes its directory. Nothing is left running.
//!
//! When `redis-server` is not installed, starting one panics with a message that says how to
//! install it (`apt-get install redis-server`, or run `scripts/test.sh`, which does).
//! `REDIS_SERVER_BIN` and `REDIS_CLI_BIN` name other binaries to run.
//!
//! ```no_run
//! use saga_redis_testkit::{RedisServer, ServerConfig};
//!
//! let server = RedisServer::start(ServerConfig::new().durable());
//! let url = server.url();
//! // ... connect to `url` ...
//! drop(server); // killed here
//! ```

#![forbid(unsafe_code)]
// Test support: reporting a server log, a skipped test or a setup failure on stderr is this
// crate's job, and a setup failure is a panic with a message (there is no caller to recover).
#![allow(clippy::print_stderr)]

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod cluster;

pub use cluster::{ClusterNode, RedisCluster};

/// How long a server may take to answer `PING` (or a cluster to reach `cluster_state:ok`).
pub const START_BOUND: Duration = Duration::from_secs(30);

/// Pause between two polls of a starting server.
const POLL_PAUSE: Duration = Duration::from_millis(20);

/// How many times a start is retried on a new port when the chosen port was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// Environment variable naming an existing standalone server to use instead of spawning one.
pub const REDIS_URL_ENV: &str = "REDIS_URL";

/// Environment variable naming existing cluster nodes (comma-separated URLs).
pub const REDIS_CLUSTER_URLS_ENV: &str = "REDIS_CLUSTER_URLS";

/// How to configure a spawned server.
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    durable: bool,
    fsync_every_second: bool,
    password: Option<String>,
    acl_users: Vec<String>,
    directives: Vec<String>,
    cluster: bool,
    tls: bool,
    tls_client_auth: bool,
}

impl ServerConfig {
    /// No persistence (`save ""`, AOF off), no password.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// AOF on with `appendfsync always`: every acknowledged write survives a kill.
    #[must_use]
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// AOF on with `appendfsync everysec`: a kill may lose the writes of the last second or
    /// so (what a deployment that chose `everysec` risks).
    #[must_use]
    pub fn fsync_every_second(mut self) -> Self {
        self.durable = true;
        self.fsync_every_second = true;
        self
    }

    /// `requirepass password` (the `default` user's password).
    #[must_use]
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_owned());
        self
    }

    /// An ACL user, as the rest of a `user` directive, e.g.
    /// `"alice on >secret ~* &* +@all"`.
    #[must_use]
    pub fn acl_user(mut self, rule: &str) -> Self {
        self.acl_users.push(rule.to_owned());
        self
    }

    /// Any other `redis.conf` line, e.g. `"maxmemory-policy allkeys-lru"`.
    #[must_use]
    pub fn directive(mut self, line: &str) -> Self {
        self.directives.push(line.to_owned());
        self
    }

    /// Also listen for TLS on a second port ([`RedisServer::tls_url`]), with a certificate for
    /// `127.0.0.1` signed by a throwaway CA ([`RedisServer::tls_ca_pem`]); generated with the
    /// `openssl` command, which must be installed (see [`openssl_available`]).
    #[must_use]
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// [`tls`](Self::tls) with `tls-auth-clients yes`: the TLS port accepts only clients
    /// that present a certificate signed by the test CA (mutual TLS); one is generated with
    /// the server's ([`RedisServer::tls_client_cert_pem`], [`RedisServer::tls_client_key_pem`]).
    #[must_use]
    pub fn tls_client_auth(mut self) -> Self {
        self.tls = true;
        self.tls_client_auth = true;
        self
    }

    fn cluster_node(mut self) -> Self {
        self.cluster = true;
        self
    }
}

/// A `redis-server` process this test process started, on a loopback port, with its own
/// temporary directory. Killed by pid on drop.
#[derive(Debug)]
pub struct RedisServer {
    config: ServerConfig,
    port: u16,
    cluster_port: u16,
    tls_port: u16,
    dir: tempfile::TempDir,
    process: Option<Process>,
}

#[derive(Debug)]
struct Process {
    server: Child,
    watchdog: Child,
    /// Held open for the life of the server; its closing (at exit) fires the watchdog.
    _lifeline: Option<ChildStdin>,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`. Panics with a clear message when
    /// `redis-server` is missing or does not come up within [`START_BOUND`].
    #[must_use]
    pub fn start(config: ServerConfig) -> Self {
        require_binary("redis-server");
        let dir = tempfile::Builder::new()
            .prefix("saga-redis-test-")
            .tempdir()
            .unwrap_or_else(|err| {
                panic!("cannot create a temporary directory for redis-server: {err}")
            });
        if config.tls {
            generate_certificates(dir.path()).unwrap_or_else(|err| {
                panic!("cannot make TLS certificates for redis-server: {err}")
            });
        }
        let mut server = RedisServer {
            config,
            port: 0,
            cluster_port: 0,
            tls_port: 0,
            dir,
            process: None,
        };
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            server.cluster_port = free_port();
            server.tls_port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("redis-server did not start after {PORT_ATTEMPTS} attempts: {last_failure}");
    }

    /// The port it listens on (127.0.0.1).
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`, without credentials.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A URL with credentials: `redis://user:password@127.0.0.1:<port>` (no user: the
    /// `default` user).
    #[must_use]
    pub fn url_with_credentials(&self, user: Option<&str>, password: &str) -> String {
        format!(
            "redis://{}:{password}@127.0.0.1:{}",
            user.unwrap_or(""),
            self.port
        )
    }

    /// With [`ServerConfig::tls`]: `rediss://127.0.0.1:<tls port>`.
    #[must_use]
    pub fn tls_url(&self) -> Option<String> {
        self.config
            .tls
            .then(|| format!("rediss://127.0.0.1:{}", self.tls_port))
    }

    /// With [`ServerConfig::tls`]: the PEM certificate of the CA that signed the server's
    /// certificate (clients must trust it).
    #[must_use]
    pub fn tls_ca_pem(&self) -> Option<Vec<u8>> {
        if !self.config.tls {
            return None;
        }
        std::fs::read(self.dir.path().join("ca.crt")).ok()
    }

    /// With [`ServerConfig::tls`]: the path of the CA certificate file (PEM).
    #[must_use]
    pub fn tls_ca_path(&self) -> Option<PathBuf> {
        self.config.tls.then(|| self.dir.path().join("ca.crt"))
    }

    /// With [`ServerConfig::tls`]: a client certificate (PEM) signed by the test CA, for
    /// mutual TLS ([`ServerConfig::tls_client_auth`]).
    #[must_use]
    pub fn tls_client_cert_pem(&self) -> Option<Vec<u8>> {
        self.tls_client_cert_path()
            .and_then(|path| std::fs::read(path).ok())
    }

    /// With [`ServerConfig::tls`]: the private key (PEM) of [`Self::tls_client_cert_pem`].
    #[must_use]
    pub fn tls_client_key_pem(&self) -> Option<Vec<u8>> {
        self.tls_client_key_path()
            .and_then(|path| std::fs::read(path).ok())
    }

    /// With [`ServerConfig::tls`]: the path of the client certificate file (PEM).
    #[must_use]
    pub fn tls_client_cert_path(&self) -> Option<PathBuf> {
        self.config.tls.then(|| self.dir.path().join("client.crt"))
    }

    /// With [`ServerConfig::tls`]: the path of the client key file (PEM).
    #[must_use]
    pub fn tls_client_key_path(&self) -> Option<PathBuf> {
        self.config.tls.then(|| self.dir.path().join("client.key"))
    }

    /// The server's pid while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.server.id())
    }

    /// Its data directory (AOF, cluster config, log).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server logged so far.
    #[must_use]
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Kills the server (SIGKILL, by pid: a crash, not a shutdown) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.stop();
        }
    }

    /// Kills the server and starts it again on the same port with the same directory (so an
    /// AOF is replayed); waits until it answers `PING`.
    pub fn restart(&mut self) {
        self.kill();
        let mut last_failure = String::new();
        for _ in 0..PORT_ATTEMPTS {
            match self.spawn() {
                Ok(()) => return,
                Err(failure) => last_failure = failure,
            }
        }
        panic!(
            "redis-server did not restart on port {}: {last_failure}",
            self.port
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn write_config(&self) -> Result<PathBuf, String> {
        let dir = self.dir.path();
        let mut conf = String::new();
        let _ = writeln!(conf, "port {}", self.port);
        let _ = writeln!(conf, "bind 127.0.0.1");
        let _ = writeln!(conf, "dir {}", dir.display());
        let _ = writeln!(conf, "save \"\"");
        let _ = writeln!(conf, "daemonize no");
        let _ = writeln!(conf, "logfile \"\"");
        if self.config.durable {
            let _ = writeln!(conf, "appendonly yes");
            let fsync = if self.config.fsync_every_second {
                "everysec"
            } else {
                "always"
            };
            let _ = writeln!(conf, "appendfsync {fsync}");
        } else {
            let _ = writeln!(conf, "appendonly no");
        }
        if let Some(password) = &self.config.password {
            let _ = writeln!(conf, "requirepass {password}");
        }
        for user in &self.config.acl_users {
            let _ = writeln!(conf, "user {user}");
        }
        if self.config.cluster {
            let _ = writeln!(conf, "cluster-enabled yes");
            let _ = writeln!(conf, "cluster-config-file nodes.conf");
            let _ = writeln!(conf, "cluster-node-timeout 5000");
            let _ = writeln!(conf, "cluster-port {}", self.cluster_port);
        }
        if self.config.tls {
            let _ = writeln!(conf, "tls-port {}", self.tls_port);
            let _ = writeln!(conf, "tls-cert-file {}", dir.join("server.crt").display());
            let _ = writeln!(conf, "tls-key-file {}", dir.join("server.key").display());
            let _ = writeln!(conf, "tls-ca-cert-file {}", dir.join("ca.crt").display());
            let auth = if self.config.tls_client_auth {
                "yes"
            } else {
                "no"
            };
            let _ = writeln!(conf, "tls-auth-clients {auth}");
        }
        for line in &self.config.directives {
            let _ = writeln!(conf, "{line}");
        }
        let path = dir.join("redis.conf");
        std::fs::write(&path, conf)
            .map_err(|err| format!("cannot write {}: {err}", path.display()))?;
        Ok(path)
    }

    /// Spawns the process and its watchdog and waits for `PING`; on failure everything
    /// spawned is killed again and the reason returned.
    fn spawn(&mut self) -> Result<(), String> {
        let conf = self.write_config()?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|err| format!("cannot open the server log: {err}"))?;
        let log_err = log
            .try_clone()
            .map_err(|err| format!("cannot open the server log: {err}"))?;
        let server = Command::new(binary("redis-server"))
            .arg(&conf)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|err| format!("cannot spawn redis-server: {err}"))?;
        let mut process = Process::guard(server, self.dir.path())?;
        match self.wait_until_ready(&mut process) {
            Ok(()) => {
                self.process = Some(process);
                Ok(())
            }
            Err(failure) => {
                process.stop();
                Err(format!(
                    "{failure}\n--- redis-server log ---\n{}",
                    self.log()
                ))
            }
        }
    }

    fn wait_until_ready(&self, process: &mut Process) -> Result<(), String> {
        let deadline = Instant::now() + START_BOUND;
        // The default user (with `requirepass` if set), then every ACL user with a password.
        let mut urls = vec![match &self.config.password {
            Some(password) => self.url_with_credentials(None, password),
            None => self.url(),
        }];
        for rule in &self.config.acl_users {
            let mut words = rule.split_whitespace();
            let user = words.next().unwrap_or_default();
            if let Some(password) = words.find_map(|word| word.strip_prefix('>')) {
                urls.push(self.url_with_credentials(Some(user), password));
            }
        }
        loop {
            if let Ok(Some(status)) = process.server.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited with {status}",
                    self.port
                ));
            }
            let mut last = String::new();
            for url in &urls {
                match ping(url) {
                    Ok(()) => return Ok(()),
                    Err(err) => last = err,
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {} did not answer PING within {START_BOUND:?}: {last}",
                    self.port
                ));
            }
            std::thread::sleep(POLL_PAUSE);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- log of redis-server on port {} ({}) ---\n{}--- end of log ---",
                self.port,
                self.dir.path().display(),
                self.log()
            );
        }
        self.kill();
    }
}

impl Process {
    /// Starts the watchdog for `server`: `sh` blocks reading a pipe that only this process
    /// writes to; at EOF (this process exited) it kills the server by pid and removes `dir`.
    fn guard(mut server: Child, dir: &Path) -> Result<Self, String> {
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(r#"read _ignored; kill -9 "$1" 2>/dev/null; rm -rf "$2""#)
            .arg("saga-redis-watchdog")
            .arg(server.id().to_string())
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match watchdog {
            Ok(mut watchdog) => {
                let lifeline = watchdog.stdin.take();
                Ok(Process {
                    server,
                    watchdog,
                    _lifeline: lifeline,
                })
            }
            Err(err) => {
                let _ = server.kill();
                let _ = server.wait();
                Err(format!("cannot spawn the watchdog shell: {err}"))
            }
        }
    }

    /// Kills the watchdog first (so it does not fire), then the server; reaps both.
    fn stop(mut self) {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Where a shared standalone server is.
#[derive(Debug)]
pub enum SharedServer {
    /// A server this process spawned (killed when the process exits).
    Spawned(RedisServer),
    /// A server named by `REDIS_URL`; tests must not restart or kill it.
    External(String),
}

impl SharedServer {
    /// Its URL.
    #[must_use]
    pub fn url(&self) -> String {
        match self {
            SharedServer::Spawned(server) => server.url(),
            SharedServer::External(url) => url.clone(),
        }
    }
}

/// The standalone server shared by every test of this process: the one `REDIS_URL` names,
/// or one spawned on first use.
pub fn shared_server() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var(REDIS_URL_ENV) {
        Ok(url) if !url.is_empty() => SharedServer::External(url),
        _ => SharedServer::Spawned(RedisServer::start(ServerConfig::new())),
    })
}

/// Where a shared cluster is.
#[derive(Debug)]
pub enum SharedCluster {
    /// A 3-master cluster this process spawned.
    Spawned(RedisCluster),
    /// Nodes named by `REDIS_CLUSTER_URLS`.
    External(Vec<String>),
}

impl SharedCluster {
    /// Its nodes' URLs.
    #[must_use]
    pub fn urls(&self) -> Vec<String> {
        match self {
            SharedCluster::Spawned(cluster) => cluster.urls(),
            SharedCluster::External(urls) => urls.clone(),
        }
    }
}

/// The 3-master cluster shared by every test of this process: the one `REDIS_CLUSTER_URLS`
/// names, or one spawned on first use. `None` (with the reason printed) when it cannot be had:
/// `redis-server` is not installed and only `REDIS_URL` is set.
pub fn shared_cluster() -> Option<&'static SharedCluster> {
    static CLUSTER: OnceLock<Option<SharedCluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            if let Ok(urls) = std::env::var(REDIS_CLUSTER_URLS_ENV) {
                let urls: Vec<String> =
                    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
                if !urls.is_empty() {
                    return Some(SharedCluster::External(urls));
                }
            }
            if !binary_available("redis-server") && std::env::var(REDIS_URL_ENV).is_ok() {
                eprintln!(
                    "skipping Redis Cluster tests: redis-server is not installed (REDIS_URL is set, but a cluster needs {REDIS_CLUSTER_URLS_ENV} or a local redis-server)"
                );
                return None;
            }
            Some(SharedCluster::Spawned(RedisCluster::start(3)))
        })
        .as_ref()
}

/// `true` when this process may spawn (and so restart and kill) its own servers: `REDIS_URL`
/// is not set. Otherwise prints why `test` is skipped and returns `false`.
#[must_use]
pub fn can_spawn_servers(test: &str) -> bool {
    if std::env::var(REDIS_URL_ENV).is_ok_and(|url| !url.is_empty()) {
        eprintln!(
            "skipping {test}: REDIS_URL is set, and this test must start, restart or kill its own redis-server"
        );
        return false;
    }
    true
}

/// A fresh key prefix for one test: `t<random>` (no braces, so it cannot break hash tags).
#[must_use]
pub fn unique_prefix(test: &str) -> String {
    let clean: String = test
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(24)
        .collect();
    format!("t-{clean}-{:016x}", random_u64())
}

/// Random enough for key prefixes: std's randomly keyed hasher over a process-wide counter
/// and the pid.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// `true` when the `openssl` command is there (needed by [`ServerConfig::tls`]). Otherwise
/// prints why `test` is skipped.
#[must_use]
pub fn openssl_available(test: &str) -> bool {
    let found = Command::new("openssl")
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        eprintln!(
            "skipping {test}: the `openssl` command is not installed (apt-get install openssl)"
        );
    }
    found
}

/// A CA, a server certificate for 127.0.0.1 and localhost and a client certificate, both
/// signed by it, in `dir` (`ca.crt`, `server.crt`, `server.key`, `client.crt`,
/// `client.key`), valid for a day. Made with the `openssl` command (see
/// [`openssl_available`]); for any test that needs a private CA, not only Redis ones.
///
/// # Errors
/// A file cannot be written, or `openssl` fails (its stderr is in the message).
pub fn generate_certificates(dir: &Path) -> Result<(), String> {
    let extensions = "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
                      basicConstraints=CA:FALSE\n\
                      keyUsage=digitalSignature,keyEncipherment\n\
                      extendedKeyUsage=serverAuth\n";
    std::fs::write(dir.join("server.ext"), extensions)
        .map_err(|err| format!("cannot write server.ext: {err}"))?;
    let client_extensions = "basicConstraints=CA:FALSE\n\
                             keyUsage=digitalSignature,keyEncipherment\n\
                             extendedKeyUsage=clientAuth\n";
    std::fs::write(dir.join("client.ext"), client_extensions)
        .map_err(|err| format!("cannot write client.ext: {err}"))?;
    let steps: [&[&str]; 5] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=saga-redis test CA",
        ],
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "server.ext",
        ],
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=saga-redis test client",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.crt",
            "-days",
            "1",
            "-extfile",
            "client.ext",
        ],
    ];
    for args in steps {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|err| format!("cannot run openssl: {err}"))?;
        if !output.status.success() {
            return Err(format!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    Ok(())
}

fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|err| err.to_string())?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .map_err(|err| err.to_string())?;
    redis::cmd("PING")
        .query::<String>(&mut connection)
        .map(drop)
        .map_err(|err| err.to_string())
}

fn cluster_info(url: &str) -> Result<String, String> {
    let client = redis::Client::open(url).map_err(|err| err.to_string())?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .map_err(|err| err.to_string())?;
    redis::cmd("CLUSTER")
        .arg("INFO")
        .query::<String>(&mut connection)
        .map_err(|err| err.to_string())
}

/// A port that was free a moment ago (bound to port 0, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|err| panic!("cannot find a free loopback port: {err}"))
}

/// The program to run for `name`: `$REDIS_SERVER_BIN` / `$REDIS_CLI_BIN` when set.
fn binary(name: &str) -> String {
    let var = match name {
        "redis-server" => "REDIS_SERVER_BIN",
        _ => "REDIS_CLI_BIN",
    };
    std::env::var(var).unwrap_or_else(|_| name.to_owned())
}

fn binary_available(name: &str) -> bool {
    Command::new(binary(name))
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn require_binary(name: &str) {
    if !binary_available(name) {
        panic!(
            "`{name}` was not found on PATH: the Redis tests need a real Redis server. Install it with \
             `apt-get install redis-server redis-tools` (or run `scripts/test.sh`, which installs it), \
             or point REDIS_URL at a running server."
        );
    }
}
