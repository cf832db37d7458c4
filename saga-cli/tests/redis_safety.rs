//! The `saga` binary's Redis flags against real servers: a server that loses every saga on
//! restart (redis/redis#14541) is warned about, not refused (an operator must still be able
//! to look and repair), and TLS with a private CA and a client certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use saga_redis_testkit::{
    RedisServer, ServerConfig, can_spawn_servers, openssl_available, unique_prefix,
};

fn saga(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_saga"));
    command
        .args(args)
        .args(["--retry-for", "0s"])
        .env_remove("REDIS_URL")
        .env_remove("REDIS_URL_FILE")
        .env_remove("REDIS_CA_FILE")
        .env_remove("REDIS_CLIENT_CERT")
        .env_remove("REDIS_CLIENT_KEY");
    for (name, value) in envs {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_server_that_loses_every_saga_on_restart_is_warned_about_not_refused() {
    let test = "a_server_that_loses_every_saga_on_restart_is_warned_about_not_refused";
    if !can_spawn_servers(test) {
        return;
    }
    let server = RedisServer::start(
        ServerConfig::new()
            .durable()
            .acl_user("default off")
            .acl_user("app on >app-cli-pw ~* &* +@all"),
    );
    let url = server.url_with_credentials(Some("app"), "app-cli-pw");
    let prefix = unique_prefix("cli-safety");
    let output = saga(
        &["--key-prefix", &prefix, "stats"],
        &[("REDIS_URL", url.as_str())],
    );
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let warning = stderr
        .lines()
        .find(|line| line.starts_with("warning:"))
        .unwrap_or_else(|| panic!("no warning on stderr:\n{stderr}"));
    assert!(warning.contains("redis/redis#14541"), "{warning}");
    assert!(warning.contains("user default on"), "{warning}");
    assert!(!stderr.contains("app-cli-pw"), "{stderr}");
    assert!(text(&output.stdout).contains("running"), "the command ran");
}

#[test]
fn tls_flags_connect_with_a_private_ca_and_a_client_certificate() {
    let test = "tls_flags_connect_with_a_private_ca_and_a_client_certificate";
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
    let prefix = unique_prefix("cli-tls");

    let with_cert = saga(
        &[
            "--redis-url",
            &url,
            "--key-prefix",
            &prefix,
            "--redis-ca-file",
            ca,
            "--redis-client-cert",
            cert,
            "--redis-client-key",
            key,
            "stats",
        ],
        &[],
    );
    assert!(with_cert.status.success(), "{}", text(&with_cert.stderr));

    // The same through the environment.
    let from_env = saga(
        &["--key-prefix", &prefix, "stats"],
        &[
            ("REDIS_URL", url.as_str()),
            ("REDIS_CA_FILE", ca),
            ("REDIS_CLIENT_CERT", cert),
            ("REDIS_CLIENT_KEY", key),
        ],
    );
    assert!(from_env.status.success(), "{}", text(&from_env.stderr));

    // Without the client certificate the server refuses the handshake.
    let without = saga(&["--redis-url", &url, "--redis-ca-file", ca, "stats"], &[]);
    assert!(!without.status.success());
    assert!(
        text(&without.stderr).starts_with("error:"),
        "{}",
        text(&without.stderr)
    );

    // An unreadable CA file is named.
    let missing = server.dir().join("no-such-ca.pem");
    let missing = missing.to_str().unwrap();
    let bad = saga(
        &["--redis-url", &url, "--redis-ca-file", missing, "stats"],
        &[],
    );
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains(missing), "{}", text(&bad.stderr));
}
