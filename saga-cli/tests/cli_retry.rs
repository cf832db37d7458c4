//! `saga` rides out a Redis that is briefly away (issue 8, item 6): a command started while
//! the server is down completes once it is back (within `--retry-for`), `--retry-for 0s`
//! fails at once as before, and an error a retry cannot fix (a refused permission) fails at
//! once whatever `--retry-for` says. Real `redis-server` processes, each test its own; every
//! wait is bounded by a condition, never timed.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use saga_core::{Engine, Saga, SagaContext, SagaError, SagaId, StartOptions};
use saga_redis::RedisStore;
use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers, unique_prefix};

/// A saga that nobody runs here: it stays `running` for `saga show` to print.
struct Parked;

impl Saga for Parked {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "cli_parked";

    async fn run(&self, _saga: &mut SagaContext, input: String) -> Result<String, SagaError> {
        Ok(input)
    }
}

fn start_parked(url: &str, prefix: &str) -> SagaId {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|err| panic!("runtime: {err}"));
    runtime.block_on(async {
        let store = RedisStore::builder()
            .url(url)
            .key_prefix(prefix)
            .connect()
            .await
            .unwrap_or_else(|err| panic!("connect {url}: {err}"));
        let engine = Engine::builder(store)
            .register(Parked)
            .build()
            .unwrap_or_else(|err| panic!("engine: {err}"));
        engine
            .start_with::<Parked>(&"parked".to_owned(), StartOptions::key("cli-retry"))
            .await
            .unwrap_or_else(|err| panic!("start: {err}"))
            .id
    })
}

fn saga(url: &str, prefix: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_saga"));
    command
        .env_remove("REDIS_URL")
        .args(["--redis-url", url, "--key-prefix", prefix])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Waits (bounded) for a child of this test to exit, and returns its output; kills it (by
/// its handle) when the bound passes.
fn finish(mut child: Child, bound: Duration) -> Output {
    let deadline = Instant::now() + bound;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output();
            panic!("saga did not exit within {bound:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|err| panic!("wait: {err}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_command_started_while_redis_is_down_completes_once_it_is_back() {
    if !can_spawn_servers("a_command_started_while_redis_is_down_completes_once_it_is_back") {
        return;
    }
    let mut server = RedisServer::start(ServerConfig::new().durable());
    let url = server.url();
    let prefix = unique_prefix("cli_retry_down");
    let id = start_parked(&url, &prefix);

    server.kill();
    let child = saga(
        &url,
        &prefix,
        &["--retry-for", "60s", "--json", "show", &id.to_string()],
    )
    .spawn()
    .unwrap_or_else(|err| panic!("cannot run saga: {err}"));
    // A deliberate outage, not synchronisation: the command meets a server that is away.
    std::thread::sleep(Duration::from_secs(2));
    let mut child = child;
    assert!(
        child.try_wait().ok().flatten().is_none(),
        "saga gave up while Redis was down: {:?}",
        child.wait_with_output()
    );
    server.restart();
    let out = finish(child, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "saga show failed after the restart: {}",
        text(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {}", text(&out.stdout)));
    assert_eq!(shown["id"], id.to_string());
    assert_eq!(shown["status"], "running");
}

#[test]
fn retry_for_zero_fails_at_once_and_a_retried_failure_says_so() {
    if !can_spawn_servers("retry_for_zero_fails_at_once_and_a_retried_failure_says_so") {
        return;
    }
    let mut server = RedisServer::start(ServerConfig::new());
    let url = server.url();
    let prefix = unique_prefix("cli_retry_zero");
    server.kill();

    let out = finish(
        saga(&url, &prefix, &["--retry-for", "0s", "stats"])
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run saga: {err}")),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    assert!(!stderr.contains("retrying"), "{stderr}");

    // A short bound: retried, then the one error line says how long it tried.
    let out = finish(
        saga(&url, &prefix, &["--retry-for", "1s", "stats"])
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run saga: {err}")),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    assert!(
        stderr.contains("still failing after retrying for up to 1s"),
        "{stderr}"
    );
}

#[test]
fn a_refused_permission_fails_at_once_whatever_retry_for_says() {
    if !can_spawn_servers("a_refused_permission_fails_at_once_whatever_retry_for_says") {
        return;
    }
    // `limited` may read and write keys but not run scripts, which every store call needs.
    let server = RedisServer::start(
        ServerConfig::new().acl_user("limited on >limited-pw ~* &* +@all -@scripting"),
    );
    let url = server.url_with_credentials(Some("limited"), "limited-pw");
    let prefix = unique_prefix("cli_retry_noperm");
    // An hour of retrying would outlast the bound below: only failing at once passes.
    let out = finish(
        saga(&url, &prefix, &["--retry-for", "1h", "stats"])
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run saga: {err}")),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("store refused the operation"), "{stderr}");
    assert!(stderr.contains("lacks a permission"), "{stderr}");
    assert!(!stderr.contains("retrying"), "{stderr}");
    assert!(!stderr.contains("limited-pw"), "{stderr}");
}
