//! The Redis flags of `deal-flow-coordinator` and `deal-flow-load` against real servers:
//! the refusal of a server that loses every saga on restart (redis/redis#14541) and its
//! `--allow-unsafe-redis-config` override, and TLS with a private CA and a client
//! certificate (`--redis-ca-file`, `--redis-client-cert`, `--redis-client-key`). Each test
//! ends only the processes it started, by their `Child`, and waits on conditions with bounds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use saga_redis_testkit::{
    RedisServer, ServerConfig, can_spawn_servers, openssl_available, unique_prefix,
};

const APP_PASSWORD: &str = "app-pw-not-for-output";
const BOUND: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// A process this test started, with its output in files.
struct Proc {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    /// Starts `program` with `args`; the Redis URL comes from the environment (never `ps`).
    fn spawn(dir: &Path, name: &str, program: &str, url: &str, args: &[&str]) -> Self {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = Command::new(program)
            .args(args)
            .env("REDIS_URL", url)
            .env_remove("REDIS_CLUSTER_URLS")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {program}: {err}"));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until it exits (panics after `BOUND`, killing it).
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("did not exit within {BOUND:?}; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits for the coordinator's `ready` line (panics if it exits first or after `BOUND`).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + BOUND;
        while !self.stdout().contains(r#""event":"ready""#) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("exited ({status}) before it was ready:\n{}", self.stderr());
            }
            assert!(Instant::now() < deadline, "not ready within {BOUND:?}");
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM (a graceful stop) and waits for it to exit.
    fn stop(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_exit()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn coordinator_args<'a>(prefix: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--key-prefix",
        prefix,
        "--http-addr",
        "off",
        "--log-format",
        "json",
    ];
    args.extend_from_slice(extra);
    args
}

/// AOF on, `user default off` (no permissions), an `app` user.
fn unsafe_server() -> RedisServer {
    RedisServer::start(
        ServerConfig::new()
            .durable()
            .acl_user("default off")
            .acl_user(&format!("app on >{APP_PASSWORD} ~* &* +@all")),
    )
}

#[test]
fn coordinator_and_load_refuse_a_server_that_loses_every_saga_on_restart() {
    let test = "coordinator_and_load_refuse_a_server_that_loses_every_saga_on_restart";
    if !can_spawn_servers(test) {
        return;
    }
    let server = unsafe_server();
    let url = server.url_with_credentials(Some("app"), APP_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("safety");

    let mut refused = Proc::spawn(
        dir.path(),
        "refused",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &url,
        &coordinator_args(&prefix, &[]),
    );
    let status = refused.wait_exit();
    let stderr = refused.stderr();
    assert_eq!(status.code(), Some(2), "it cannot start:\n{stderr}");
    for needle in [
        "redis/redis#14541",
        "user default on",
        "--allow-unsafe-redis-config aof-acl-replay-loss",
    ] {
        assert!(
            stderr.contains(needle),
            "{needle:?} missing from:\n{stderr}"
        );
    }
    assert!(!stderr.contains(APP_PASSWORD), "{stderr}");
    assert!(!refused.stdout().contains("ready"), "{}", refused.stdout());

    let mut load = Proc::spawn(
        dir.path(),
        "load",
        env!("CARGO_BIN_EXE_deal-flow-load"),
        &url,
        &["--key-prefix", &prefix, "--count", "1", "--timeout", "30s"],
    );
    let status = load.wait_exit();
    assert!(!status.success(), "deal-flow-load must refuse too");
    assert!(
        load.stderr().contains("redis/redis#14541"),
        "{}",
        load.stderr()
    );

    // Allowed explicitly: it starts, and says loudly what it accepted.
    let mut allowed = Proc::spawn(
        dir.path(),
        "allowed",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &url,
        &coordinator_args(
            &prefix,
            &["--allow-unsafe-redis-config", "aof-acl-replay-loss"],
        ),
    );
    allowed.wait_ready();
    let stderr = allowed.stderr();
    let warning = stderr
        .lines()
        .find(|line| line.contains("allow_unsafe_server_config"))
        .unwrap_or_else(|| panic!("no warning about the allowed configuration:\n{stderr}"));
    assert!(warning.contains("ERROR"), "logged as an error: {warning}");
    assert!(warning.contains("loses every saga"), "{warning}");
    assert!(allowed.stop().success(), "{}", allowed.stderr());
}

#[test]
fn tls_flags_trust_a_private_ca_and_present_a_client_certificate() {
    let test = "tls_flags_trust_a_private_ca_and_present_a_client_certificate";
    if !can_spawn_servers(test) || !openssl_available(test) {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().tls_client_auth());
    let url = server.tls_url().unwrap();
    let ca = server.tls_ca_path().unwrap();
    let cert = server.tls_client_cert_path().unwrap();
    let key = server.tls_client_key_path().unwrap();
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("tls");

    // The CA alone: the server asks for a client certificate and refuses the handshake.
    let mut no_cert = Proc::spawn(
        dir.path(),
        "no-cert",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &url,
        &coordinator_args(&prefix, &["--redis-ca-file", ca]),
    );
    assert_eq!(no_cert.wait_exit().code(), Some(2), "{}", no_cert.stderr());

    // A key without its certificate is a usage error.
    let mut half = Proc::spawn(
        dir.path(),
        "half",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &url,
        &coordinator_args(&prefix, &["--redis-ca-file", ca, "--redis-client-key", key]),
    );
    assert!(!half.wait_exit().success());
    assert!(
        half.stderr().contains("--redis-client-cert"),
        "{}",
        half.stderr()
    );

    // CA and client certificate: the store and the back office both connect over TLS.
    let mut tls = Proc::spawn(
        dir.path(),
        "tls",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &url,
        &coordinator_args(
            &prefix,
            &[
                "--redis-ca-file",
                ca,
                "--redis-client-cert",
                cert,
                "--redis-client-key",
                key,
            ],
        ),
    );
    tls.wait_ready();

    // The load generator runs sagas through the same TLS settings, given by the environment;
    // the coordinator above runs them to their end.
    let mut load = {
        let stdout = dir.path().join("load.out");
        let stderr = dir.path().join("load.err");
        let child = Command::new(env!("CARGO_BIN_EXE_deal-flow-load"))
            .args(["--key-prefix", &prefix, "--count", "3", "--timeout", "60s"])
            .env("REDIS_URL", &url)
            .env("REDIS_CA_FILE", ca)
            .env("REDIS_CLIENT_CERT", cert)
            .env("REDIS_CLIENT_KEY", key)
            .env_remove("REDIS_CLUSTER_URLS")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Proc {
            child,
            stdout,
            stderr,
        }
    };
    let status = load.wait_exit();
    assert!(
        status.success(),
        "deal-flow-load over mutual TLS:\n{}\n{}",
        load.stdout(),
        load.stderr()
    );
    assert!(tls.stop().success(), "{}", tls.stderr());
}
