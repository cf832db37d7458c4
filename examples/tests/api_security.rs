//! The coordinator's HTTP edge as shipped (issue 8, items 1 and 10): it will not serve
//! without tokens unless told to, never without authentication on a public address unless
//! insisted, refuses bad token files with the line, and with tokens answers 401 to anyone
//! without one. None of these checks needs Redis: they run before the store is touched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn coordinator(args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_deal-flow-coordinator"));
    // A store nobody listens on: reaching it would fail with a different message.
    command
        .args(["--redis-url", "redis://127.0.0.1:1"])
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_URLS")
        .env_remove("SAGA_API_TOKENS")
        .env_remove("SAGA_API_TOKENS_FILE")
        .env_remove("SAGA_NO_AUTH")
        .env_remove("SAGA_HTTP_ADDR");
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn token_line(name: &str, scopes: &str) -> (String, String) {
    let principal =
        saga_http::Principal::new(name, saga_http::parse_scopes(scopes).unwrap()).unwrap();
    let token = saga_http::GeneratedToken::new(&principal).unwrap();
    (token.token, token.config_line)
}

#[test]
fn without_tokens_the_api_is_not_served() {
    let (ok, text) = coordinator(&["--http-addr", "127.0.0.1:0"], &[]);
    assert!(!ok);
    assert!(text.contains("needs API tokens"), "{text}");
    assert!(text.contains("saga token new"), "{text}");
    // The Dockerfile's default address, without tokens: refused just the same.
    let (ok, text) = coordinator(&[], &[("SAGA_HTTP_ADDR", "0.0.0.0:8080")]);
    assert!(!ok);
    assert!(text.contains("needs API tokens"), "{text}");
}

#[test]
fn no_auth_is_refused_on_a_public_address_unless_insisted() {
    let (ok, text) = coordinator(&["--http-addr", "0.0.0.0:0", "--no-auth"], &[]);
    assert!(!ok);
    assert!(text.contains("not a loopback address"), "{text}");
    // Insisting gets past the check (and fails later, at the store nobody runs), loudly.
    let (ok, text) = coordinator(
        &[
            "--http-addr",
            "0.0.0.0:0",
            "--no-auth",
            "--no-auth-on-public-address",
        ],
        &[],
    );
    assert!(!ok);
    assert!(!text.contains("not a loopback address"), "{text}");
    assert!(text.contains("DISABLED"), "{text}");
    // The loud flag alone means nothing.
    let (ok, text) = coordinator(
        &["--http-addr", "0.0.0.0:0", "--no-auth-on-public-address"],
        &[],
    );
    assert!(!ok);
    assert!(text.contains("--no-auth"), "{text}");
}

#[test]
fn bad_token_configurations_are_refused_with_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let (_, good) = token_line("intake", "start,read");
    std::fs::write(&file, format!("{good}\nops read,write sha256:00\n")).unwrap();
    let (ok, text) = coordinator(
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--api-tokens-file",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok);
    assert!(text.contains("line 2"), "{text}");
    let (ok, text) = coordinator(
        &[
            "--http-addr",
            "127.0.0.1:0",
            "--api-tokens-file",
            "/nonexistent/tokens",
        ],
        &[],
    );
    assert!(!ok);
    assert!(text.contains("/nonexistent/tokens"), "{text}");
    // A token itself (not its hash) is refused, and never echoed.
    let (ok, text) = coordinator(
        &["--http-addr", "127.0.0.1:0"],
        &[("SAGA_API_TOKENS", "ops read saga_plaintext_secret_value")],
    );
    assert!(!ok);
    assert!(text.contains("never the token itself"), "{text}");
    assert!(!text.contains("saga_plaintext_secret_value"), "{text}");
    // Tokens and --no-auth together contradict each other.
    let (ok, text) = coordinator(
        &["--http-addr", "127.0.0.1:0", "--no-auth"],
        &[("SAGA_API_TOKENS", good.as_str())],
    );
    assert!(!ok);
    assert!(text.contains("contradicts"), "{text}");
}

#[test]
fn help_hides_token_values_from_the_environment() {
    let (_, line) = token_line("intake", "start");
    let mut command = Command::new(env!("CARGO_BIN_EXE_deal-flow-coordinator"));
    let output = command
        .arg("--help")
        .env("SAGA_API_TOKENS", &line)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("SAGA_API_TOKENS"), "{text}");
    assert!(!text.contains(&line[line.len() - 20..]), "{text}");
}
