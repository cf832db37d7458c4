//! `deal-flow-load --api-url` (issue 8, item 1: the load generator sends a token): one
//! `deal-flow-coordinator` serving its API with tokens on a real redis-server, and the load
//! submitting and waiting through the API. With a token that may start and read, it exits 0
//! with every saga terminal and the ledger check holding (and a second run submits nothing
//! new); with a token that may only read it stops with a clear 403; without a token with a
//! clear 401. The token never appears in its output.
//!
//! Each test ends only the processes it started, by their handles, and waits for conditions
//! with bounds.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use saga_core::store::ListQuery;
use saga_core::{SagaStatus, SagaStore as _};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers, unique_prefix};
use support::Proc;

const COUNT: usize = 24;

/// A token for `name` with `scopes`: (its configuration line, the token).
fn token(name: &str, scopes: &str) -> (String, String) {
    let principal =
        saga_http::Principal::new(name, saga_http::parse_scopes(scopes).unwrap()).unwrap();
    let generated = saga_http::GeneratedToken::new(&principal).unwrap();
    (generated.config_line, generated.token)
}

/// Every saga in the store under `prefix`, by status.
fn stored_statuses(url: &str, prefix: &str) -> Vec<SagaStatus> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = RedisStore::builder()
            .url(url)
            .key_prefix(prefix)
            .connect()
            .await
            .unwrap();
        let mut statuses = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .list(&ListQuery {
                    limit: 1000,
                    after,
                    ..ListQuery::default()
                })
                .await
                .unwrap();
            statuses.extend(page.sagas.iter().map(|s| s.status));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        statuses
    })
}

#[test]
fn the_load_submits_through_the_api_with_a_token() {
    if !can_spawn_servers("the_load_submits_through_the_api_with_a_token") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new());
    let url = server.url();
    let prefix = unique_prefix("load_api");
    let dir = tempfile::tempdir().unwrap();
    let (loader_line, loader) = token("loader", "start,read");
    let (reader_line, reader) = token("reader", "read");
    let tokens = format!("{loader_line};{reader_line}");
    let coordinator_args = [
        "--redis-url",
        &url,
        "--key-prefix",
        &prefix,
        "--owner",
        "api-coordinator",
        "--log-format",
        "json",
        "--http-addr",
        "127.0.0.1:0",
        "--api-tokens",
        &tokens,
        "--poll-interval",
        "100ms",
        "--workers",
        "8",
    ]
    .map(str::to_owned);
    let mut coordinator = Proc::spawn_with_env(
        &dir,
        "coordinator",
        env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        &coordinator_args,
        &[],
    );
    let ready = coordinator.wait_ready();
    let api = format!(
        "http://{}",
        ready["http_addr"].as_str().expect("an HTTP address")
    );
    let token_file = dir.path().join("loader.token");
    std::fs::write(&token_file, format!("{loader}\n")).unwrap();
    let reader_file = dir.path().join("reader.token");
    std::fs::write(&reader_file, format!("{reader}\n")).unwrap();

    let load = |name: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "--redis-url",
            url.as_str(),
            "--key-prefix",
            prefix.as_str(),
            "--api-url",
            api.as_str(),
            "--run-id",
            "api",
            "--count",
            "24",
            "--timeout",
            "60s",
            "--log-format",
            "json",
        ];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        let mut proc =
            Proc::spawn_with_env(&dir, name, env!("CARGO_BIN_EXE_deal-flow-load"), &args, env);
        let status = proc.wait_exit(Duration::from_secs(120));
        let (stdout, stderr) = (proc.stdout(), proc.stderr());
        for secret in [&loader, &reader] {
            assert!(
                !stdout.contains(secret.as_str()) && !stderr.contains(secret.as_str()),
                "{name} printed a token:\n{stdout}\n{stderr}"
            );
        }
        (status, proc.event("load_summary"), stdout, stderr)
    };

    // A token that may start and read: every saga ends, the ledger check holds.
    let token_path = token_file.to_str().unwrap();
    let (status, summary, stdout, stderr) = load("load", &["--api-token-file", token_path], &[]);
    println!("{stdout}");
    let summary = summary.unwrap_or_else(|| panic!("no summary ({status}):\n{stdout}\n{stderr}"));
    assert!(
        status.success(),
        "the load failed ({status}): {summary}\n{stderr}"
    );
    assert!(stdout.contains("through the API at"), "{stdout}");
    assert_eq!(summary["acknowledged"], COUNT, "{summary}");
    assert_eq!(summary["start_errors"], 0, "{summary}");
    assert_eq!(summary["unfinished"], 0, "{summary}");
    assert_eq!(summary["ledger_ok"], true, "{summary}");
    assert!(
        summary["duplicate_starts"].as_u64().unwrap() > 0,
        "{summary}"
    );
    let statuses = stored_statuses(&url, &prefix);
    assert_eq!(statuses.len(), COUNT, "{statuses:?}");
    assert!(statuses.iter().all(|s| s.is_terminal()), "{statuses:?}");

    // Again, with the token from the environment: the same keys find the same sagas.
    let (status, summary, stdout, stderr) = load("again", &[], &[("SAGA_API_TOKEN", &loader)]);
    let summary = summary.unwrap_or_else(|| panic!("no summary ({status}):\n{stdout}\n{stderr}"));
    assert!(
        status.success(),
        "the second load failed ({status}): {summary}\n{stderr}"
    );
    assert_eq!(summary["acknowledged"], COUNT, "{summary}");
    assert_eq!(stored_statuses(&url, &prefix).len(), COUNT);

    // A token without `start`: a clear 403 naming the scope, and nothing started.
    let reader_path = reader_file.to_str().unwrap();
    let (status, _, stdout, stderr) = load("reader", &["--api-token-file", reader_path], &[]);
    println!("{stderr}");
    assert_eq!(status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("403 (forbidden)"), "{stderr}");
    assert!(stderr.contains("`start` scope"), "{stderr}");
    assert!(stderr.contains("`reader`"), "{stderr}");

    // No token at all: a clear 401 saying how to give one.
    let (status, _, stdout, stderr) = load("anonymous", &[], &[]);
    println!("{stderr}");
    assert_eq!(status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("401 (unauthenticated)"), "{stderr}");
    assert!(stderr.contains("--api-token-file"), "{stderr}");
    assert_eq!(stored_statuses(&url, &prefix).len(), COUNT);

    // The coordinator never logged a token either.
    let logs = coordinator.stderr() + &coordinator.stdout();
    assert!(!logs.contains(&loader) && !logs.contains(&reader));
    let seen: BTreeSet<_> = stored_statuses(&url, &prefix).into_iter().collect();
    assert!(seen.iter().all(|s| s.is_terminal()), "{seen:?}");
}
