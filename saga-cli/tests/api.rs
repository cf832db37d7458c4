//! `saga api start|status|wait|cancel` (issue 8, item 1: the CLI sends a token): the `saga`
//! binary against an in-process `saga_http::HttpApi` with tokens, serving two tiny saga types
//! on 127.0.0.1:0 with a memory store and a coordinator. No Redis is involved (REDIS_URL is
//! removed from the environment). Output is checked as text and as `--json`; failures are
//! one line on stderr with exit status 1; the token never appears in any output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use saga_core::{Coordinator, Engine, MemoryStore, Saga, SagaContext, SagaError};
use saga_http::{ApiTokens, Auth, GeneratedToken, HttpApi, Principal, Scope, ServeConfig};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

struct Greet;

impl Saga for Greet {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "greet";
    async fn run(&self, _saga: &mut SagaContext, name: String) -> Result<String, SagaError> {
        Ok(format!("hello, {name}"))
    }
}

/// Runs until the test opens its gate: certainly still running meanwhile.
struct Hold(Arc<Semaphore>);

impl Saga for Hold {
    type Input = u32;
    type Output = u32;
    const NAME: &'static str = "hold";
    async fn run(&self, _saga: &mut SagaContext, n: u32) -> Result<u32, SagaError> {
        let _permit = self.0.acquire().await;
        Ok(n)
    }
}

/// The API and a coordinator on a runtime of their own, stopped when dropped.
struct Server {
    addr: SocketAddr,
    gate: Arc<Semaphore>,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    fn start(tokens: ApiTokens) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let engine = Engine::builder(MemoryStore::new())
            .register(Greet)
            .register(Hold(Arc::clone(&gate)))
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (stop_workers, workers_stopped) = tokio::sync::oneshot::channel::<()>();
        let api = HttpApi::new(engine.clone(), Auth::tokens(tokens));
        let server = runtime.spawn(async move {
            api.serve(listener, ServeConfig::default(), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
            let _ = stop_workers.send(());
        });
        let coordinator = Coordinator::new(engine).poll_interval(Duration::from_millis(20));
        let workers = runtime.spawn(async move {
            coordinator
                .run(async {
                    let _ = workers_stopped.await;
                })
                .await;
        });
        Self {
            addr,
            gate,
            runtime: Some(runtime),
            stop: Some(stop),
            tasks: vec![server, workers],
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.gate.add_permits(1000);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            for task in self.tasks.drain(..) {
                let _ = runtime.block_on(task);
            }
        }
    }
}

/// Tokens for `all` (every scope) and `reader` (read only): (config, all's, reader's).
fn tokens() -> (ApiTokens, String, String) {
    let mut lines = Vec::new();
    let mut issue = |name: &str, scopes: BTreeSet<Scope>| {
        let generated = GeneratedToken::new(&Principal::new(name, scopes).unwrap()).unwrap();
        lines.push(generated.config_line);
        generated.token
    };
    let all = issue("operator", Scope::ALL.into_iter().collect());
    let reader = issue("reader", BTreeSet::from([Scope::Read]));
    (ApiTokens::parse(&lines.join("\n")).unwrap(), all, reader)
}

/// Runs `saga` with `args` and `env`, and nothing of the caller's saga or Redis settings.
fn saga(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_saga"));
    command.args(args);
    for var in [
        "REDIS_URL",
        "REDIS_URL_FILE",
        "SAGA_API_URL",
        "SAGA_API_TOKEN",
        "SAGA_API_TOKEN_FILE",
        "SAGA_API_CA_FILE",
    ] {
        command.env_remove(var);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A successful run's stdout.
fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "saga failed ({}):\n{}\n{}",
        output.status,
        stdout(output),
        stderr(output)
    );
    stdout(output)
}

/// A failed run's one error line.
fn failed(output: &Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}\n{}",
        stdout(output),
        stderr(output)
    );
    let text = stderr(output);
    assert_eq!(text.lines().count(), 1, "not one line: {text}");
    assert!(text.starts_with("error: "), "{text}");
    text
}

fn write_token(dir: &Path, name: &str, token: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn start_status_wait_and_cancel_through_the_api() {
    let (config, all, reader) = tokens();
    let server = Server::start(config);
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let token_file = write_token(dir.path(), "operator.token", &all);
    let api = |rest: &[&str]| {
        let mut args = vec![
            "api",
            "--api-url",
            url.as_str(),
            "--api-token-file",
            &token_file,
        ];
        args.extend_from_slice(rest);
        let output = saga(&args, &[]);
        for secret in [&all, &reader] {
            assert!(
                !stdout(&output).contains(secret.as_str()),
                "{}",
                stdout(&output)
            );
            assert!(
                !stderr(&output).contains(secret.as_str()),
                "{}",
                stderr(&output)
            );
        }
        output
    };

    // Start (text, then the same key again as JSON).
    let text = ok(&api(&[
        "start",
        "greet",
        "--input",
        "\"deal team\"",
        "--key",
        "g-1",
    ]));
    assert!(text.contains(": started (greet, running)"), "{text}");
    let again: Value = serde_json::from_str(&ok(&api(&[
        "start",
        "greet",
        "--input",
        "\"deal team\"",
        "--key",
        "g-1",
        "--json",
    ])))
    .unwrap();
    assert_eq!(again["created"], false, "{again}");
    let id = again["id"].as_str().unwrap().to_owned();
    assert!(text.contains(&id), "{text} vs {id}");

    // Wait for it, then read its status.
    let text = ok(&api(&["wait", &id, "--timeout", "30s"]));
    assert!(text.contains("completed"), "{text}");
    assert!(text.contains("hello, deal team"), "{text}");
    let status: Value = serde_json::from_str(&ok(&api(&["status", &id, "--json"]))).unwrap();
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["output"], "hello, deal team", "{status}");
    let text = ok(&api(&["status", &id]));
    assert!(
        text.contains("status") && text.contains("completed"),
        "{text}"
    );
    assert!(text.contains("0 of 0 succeeded"), "{text}");

    // Cancelling a finished saga is the server's 409, on one line.
    let line = failed(&api(&["cancel", &id, "--reason", "too late"]));
    assert!(line.contains("409 (already_finished)"), "{line}");

    // A held saga: a short wait ends first, the cancel is accepted, then it ends.
    let held: Value =
        serde_json::from_str(&ok(&api(&["start", "hold", "--input", "7", "--json"]))).unwrap();
    assert_eq!(held["created"], true, "{held}");
    let held_id = held["id"].as_str().unwrap().to_owned();
    let waited: Value = serde_json::from_str(&ok(&api(&[
        "wait",
        &held_id,
        "--timeout",
        "50ms",
        "--json",
    ])))
    .unwrap();
    assert_eq!(waited["terminal"], false, "{waited}");
    assert_eq!(waited["status"], "running", "{waited}");
    let text = ok(&api(&["cancel", &held_id, "--reason", "changed my mind"]));
    assert!(text.contains("cancel requested"), "{text}");
    server.gate.add_permits(1);
    let waited: Value = serde_json::from_str(&ok(&api(&["wait", &held_id, "--json"]))).unwrap();
    assert_eq!(waited["terminal"], true, "{waited}");
    let status: Value = serde_json::from_str(&ok(&api(&["status", &held_id, "--json"]))).unwrap();
    assert_eq!(status["cancel_requested"], true, "{status}");

    // Mistakes are one clear line: bad JSON, an unknown type, input of the wrong type, a bad id.
    let line = failed(&api(&["start", "greet", "--input", "{not json"]));
    assert!(line.contains("--input is not valid JSON"), "{line}");
    let line = failed(&api(&["start", "nope", "--input", "1"]));
    assert!(line.contains("404 (unknown_saga_type)"), "{line}");
    let line = failed(&api(&["start", "hold", "--input", "\"seven\""]));
    assert!(line.contains("422 (invalid_input)"), "{line}");
    let line = failed(&api(&["status", "not-a-uuid"]));
    assert!(line.contains("invalid saga id"), "{line}");
}

#[test]
fn tokens_come_from_a_file_or_the_environment_and_refusals_say_what_to_do() {
    let (config, all, reader) = tokens();
    let server = Server::start(config);
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();

    // No token: 401, naming the flag to give one.
    let output = saga(
        &[
            "api",
            "--api-url",
            &url,
            "start",
            "greet",
            "--input",
            "\"x\"",
        ],
        &[],
    );
    let line = failed(&output);
    assert!(line.contains("401 (unauthenticated)"), "{line}");
    assert!(line.contains("--api-token-file"), "{line}");

    // A read-only token: 403, naming the missing scope.
    let reader_file = write_token(dir.path(), "reader.token", &reader);
    let output = saga(
        &[
            "api",
            "start",
            "greet",
            "--input",
            "\"x\"",
            "--api-url",
            &url,
            "--api-token-file",
            &reader_file,
        ],
        &[],
    );
    let line = failed(&output);
    assert!(line.contains("403 (forbidden)"), "{line}");
    assert!(line.contains("`start` scope"), "{line}");
    assert!(!line.contains(&reader), "{line}");

    // The URL and token from the environment (SAGA_API_URL, SAGA_API_TOKEN).
    let output = saga(
        &["api", "start", "greet", "--input", "\"env\"", "--json"],
        &[("SAGA_API_URL", &url), ("SAGA_API_TOKEN", &all)],
    );
    let started: Value = serde_json::from_str(&ok(&output)).unwrap();
    assert_eq!(started["created"], true, "{started}");
    assert!(!stdout(&output).contains(&all));

    // A token file that is empty, and no URL at all: clear errors before any request.
    let empty = write_token(dir.path(), "empty.token", "");
    let line = failed(&saga(
        &[
            "api",
            "--api-url",
            &url,
            "--api-token-file",
            &empty,
            "status",
            started["id"].as_str().unwrap(),
        ],
        &[],
    ));
    assert!(line.contains("is empty"), "{line}");
    let line = failed(&saga(
        &["api", "status", started["id"].as_str().unwrap()],
        &[("SAGA_API_TOKEN", &all)],
    ));
    assert!(line.contains("--api-url"), "{line}");

    // --help never shows the token from the environment.
    let output = saga(
        &["api", "--help"],
        &[("SAGA_API_TOKEN", &all), ("SAGA_API_URL", &url)],
    );
    let help = ok(&output);
    assert!(help.contains("--api-token-file"), "{help}");
    assert!(!help.contains(&all), "{help}");
}
