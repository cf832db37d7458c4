//! The Redis flags of `deal-flow-coordinator` and `deal-flow-load` against real servers:
//! the refusal of a server that loses every saga on restart (redis/redis#14541) and its
//! `--allow-unsafe-redis-config` override, and TLS with a private CA and a client
//! certificate (`--redis-ca-file`, `--redis-client-cert`, `--redis-client-key`). Each test
//! ends only the processes it started, by their `Child`, and waits on conditions with bounds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use saga_redis_testkit::{
    RedisServer, ServerConfig, can_spawn_servers, openssl_available, unique_prefix,
};
use support::Proc;

const APP_PASSWORD: &str = "app-pw-not-for-output";
const BOUND: Duration = Duration::from_secs(60);

/// Starts `program` with `args`; the Redis URL comes from the environment (never `ps`).
fn spawn(dir: &Path, name: &str, program: &str, url: &str, args: &[&str]) -> Proc {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    Proc::spawn_with_env(dir, name, program, &args, &[("REDIS_URL", url)])
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

    let mut refused = spawn(
        dir.path(),
        "refused",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &url,
        &coordinator_args(&prefix, &[]),
    );
    let status = refused.wait_exit(BOUND);
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

    let mut load = spawn(
        dir.path(),
        "load",
        env!("CARGO_BIN_EXE_deal-flow-load"),
        &url,
        &["--key-prefix", &prefix, "--count", "1", "--timeout", "30s"],
    );
    let status = load.wait_exit(BOUND);
    assert!(!status.success(), "deal-flow-load must refuse too");
    assert!(
        load.stderr().contains("redis/redis#14541"),
        "{}",
        load.stderr()
    );

    // Allowed explicitly: it starts, and says loudly what it accepted.
    let mut allowed = spawn(
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
    assert!(allowed.terminate().success(), "{}", allowed.stderr());
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
    let mut no_cert = spawn(
        dir.path(),
        "no-cert",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &url,
        &coordinator_args(&prefix, &["--redis-ca-file", ca]),
    );
    assert_eq!(
        no_cert.wait_exit(BOUND).code(),
        Some(2),
        "{}",
        no_cert.stderr()
    );

    // A key without its certificate is a usage error.
    let mut half = spawn(
        dir.path(),
        "half",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &url,
        &coordinator_args(&prefix, &["--redis-ca-file", ca, "--redis-client-key", key]),
    );
    assert!(!half.wait_exit(BOUND).success());
    assert!(
        half.stderr().contains("--redis-client-cert"),
        "{}",
        half.stderr()
    );

    // CA and client certificate: the store and the back office both connect over TLS.
    let mut tls = spawn(
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
    let args: Vec<String> = ["--key-prefix", &prefix, "--count", "3", "--timeout", "60s"]
        .map(str::to_owned)
        .to_vec();
    let mut load = Proc::spawn_with_env(
        dir.path(),
        "load",
        env!("CARGO_BIN_EXE_deal-flow-load"),
        &args,
        &[
            ("REDIS_URL", url.as_str()),
            ("REDIS_CA_FILE", ca),
            ("REDIS_CLIENT_CERT", cert),
            ("REDIS_CLIENT_KEY", key),
        ],
    );
    let status = load.wait_exit(BOUND);
    assert!(
        status.success(),
        "deal-flow-load over mutual TLS:\n{}\n{}",
        load.stdout(),
        load.stderr()
    );
    assert!(tls.terminate().success(), "{}", tls.stderr());
}
