//! `saga signal` on the store (a real redis-server, as every direct command) and
//! `saga api signal` through the HTTP API (a memory store, no Redis): a signal is delivered
//! once per key (the repeat says "duplicate"), the waiting saga completes with its payload,
//! and a finished saga (exit 3), an unknown one, a reused key with another payload and a
//! payload that is not JSON fail with one line on stderr.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use saga_core::{
    Engine, MemoryStore, RunOutcome, Saga, SagaContext, SagaError, SagaId, SagaStatus, StartOptions,
};
use saga_http::{ApiTokens, Auth, GeneratedToken, HttpApi, Principal, Scope, ServeConfig};
use saga_redis::RedisStore;
use saga_redis_testkit::{shared_server, unique_prefix};
use serde_json::{Value, json};

/// Waits (up to a day) for `approval` and returns its payload as its output.
struct AwaitApproval;

impl Saga for AwaitApproval {
    type Input = String;
    type Output = Value;
    const NAME: &'static str = "cli_await_approval";

    async fn run(&self, saga: &mut SagaContext, _deal: String) -> Result<Value, SagaError> {
        match saga
            .wait_for_signal::<Value>("approval", Duration::from_secs(24 * 3600))
            .await?
        {
            Some(payload) => Ok(payload),
            None => Err(SagaError::Aborted("no approval within a day".into())),
        }
    }
}

/// Runs `saga` with `args`, and nothing of the caller's saga or Redis settings.
fn saga(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_saga"));
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
    command
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run saga: {err}"))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A successful run's stdout.
fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "saga failed ({}):\n{}\n{}",
        output.status,
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(output)
}

/// A failed run's one error line, after checking its exit status.
fn fails(output: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {} stderr: {stderr}",
        stdout(output)
    );
    assert!(
        output.stdout.is_empty(),
        "printed on stdout: {}",
        stdout(output)
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not one JSON document ({err}): {text}"))
}

#[test]
fn signal_on_the_store_delivers_once_and_refuses_a_finished_saga() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = shared_server().url();
    let prefix = unique_prefix("cli_signal");
    let store = runtime
        .block_on(
            RedisStore::builder()
                .url(&url)
                .key_prefix(&prefix)
                .connect(),
        )
        .unwrap_or_else(|err| panic!("connect {url}: {err}"));
    let engine = Engine::builder(store)
        .register(AwaitApproval)
        .owner("test-coordinator")
        .build()
        .unwrap();
    let id = runtime
        .block_on(engine.start_with::<AwaitApproval>(&"deal".to_owned(), StartOptions::default()))
        .unwrap()
        .id;
    // It waits for the signal: suspended, not finished.
    match runtime.block_on(engine.run_once(id)) {
        Ok(RunOutcome::Suspended(_)) => {}
        other => panic!("the saga should wait for its signal: {other:?}"),
    }
    let id_text = id.to_string();
    let direct = |rest: &[&str]| {
        let mut args = vec!["--redis-url", url.as_str(), "--key-prefix", prefix.as_str()];
        args.extend_from_slice(rest);
        saga(&args)
    };
    let payload = r#"{"partner": "ada", "amount": 250}"#;

    let text = ok(&direct(&[
        "signal",
        &id_text,
        "approval",
        "--payload",
        payload,
        "--key",
        "committee-1",
    ]));
    assert_eq!(
        text,
        format!("signal `approval` delivered to saga {id} as #1\n")
    );
    // The same command again (after a lost answer, say): delivered once.
    let text = ok(&direct(&[
        "signal",
        &id_text,
        "approval",
        "--payload",
        payload,
        "--key",
        "committee-1",
    ]));
    assert!(text.contains("duplicate of #1"), "{text}");
    let out = json_of(&ok(&direct(&[
        "--json",
        "signal",
        &id_text,
        "approval",
        "--payload",
        payload,
        "--key",
        "committee-1",
    ])));
    assert_eq!(out["duplicate"], true);
    assert_eq!(out["delivered"], false);
    assert_eq!(out["sequence"], 1);

    // The same key with another payload is refused; so is a payload that is not JSON.
    let err = fails(
        &direct(&[
            "signal",
            &id_text,
            "approval",
            "--payload",
            "2",
            "--key",
            "committee-1",
        ]),
        1,
    );
    assert!(err.contains("different payload"), "{err}");
    let err = fails(
        &direct(&[
            "signal",
            &id_text,
            "approval",
            "--payload",
            "yes",
            "--key",
            "k-2",
        ]),
        1,
    );
    assert!(err.contains("not valid JSON"), "{err}");

    // A payload from a file, under a new key: a second signal.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("note.json");
    std::fs::write(&file, "{\"note\": \"from a file\"}\n").unwrap();
    let out = json_of(&ok(&direct(&[
        "--json",
        "signal",
        &id_text,
        "note",
        "--payload-file",
        file.to_str().unwrap(),
        "--key",
        "note-1",
    ])));
    assert_eq!(
        out,
        json!({
            "id": id_text,
            "signal": "note",
            "key": "note-1",
            "sequence": 2,
            "delivered": true,
            "duplicate": false,
        })
    );

    // The saga reads its signal and completes with the first payload.
    let outcome = runtime.block_on(engine.run_once(id)).unwrap();
    assert!(
        matches!(outcome, RunOutcome::Finished(_)),
        "the signal should end the wait: {outcome:?}"
    );
    let done = runtime.block_on(engine.outcome(id)).unwrap();
    assert_eq!(done.status, SagaStatus::Completed);
    assert_eq!(done.output, Some(json_of(payload)));

    // A finished saga refuses (exit 3), an unknown one is not found (exit 1).
    let err = fails(
        &direct(&["signal", &id_text, "approval", "--key", "committee-2"]),
        3,
    );
    assert!(err.contains("completed"), "{err}");
    let unknown = SagaId::random().to_string();
    let err = fails(&direct(&["signal", &unknown, "approval", "--key", "k"]), 1);
    assert!(err.contains("not found"), "{err}");

    // The key is required, and says why.
    let out = direct(&["signal", &id_text, "approval"]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let help = ok(&saga(&["signal", "--help"]));
    assert!(help.contains("the same key twice delivers once"), "{help}");
}

/// The API on a memory store, on a runtime of its own; stopped when dropped.
struct Server {
    addr: SocketAddr,
    engine: Engine,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    fn start(tokens: ApiTokens) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let engine = Engine::builder(MemoryStore::new())
            .register(AwaitApproval)
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let api = HttpApi::new(engine.clone(), Auth::tokens(tokens));
        let task = runtime.spawn(async move {
            api.serve(listener, ServeConfig::default(), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            engine,
            runtime: Some(runtime),
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.as_ref().unwrap().block_on(future)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let (Some(runtime), Some(task)) = (self.runtime.take(), self.task.take()) {
            let _ = runtime.block_on(task);
        }
    }
}

#[test]
fn api_signal_delivers_once_and_maps_refusals_to_exit_codes() {
    let mut lines = Vec::new();
    let mut issue = |name: &str, scopes: BTreeSet<Scope>| {
        let generated = GeneratedToken::new(&Principal::new(name, scopes).unwrap()).unwrap();
        lines.push(generated.config_line);
        generated.token
    };
    let operator = issue("operator", BTreeSet::from([Scope::Read, Scope::Operate]));
    let reader = issue("reader", BTreeSet::from([Scope::Read]));
    let server = Server::start(ApiTokens::parse(&lines.join("\n")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("operator.token");
    std::fs::write(&token_file, format!("{operator}\n")).unwrap();
    let reader_file = dir.path().join("reader.token");
    std::fs::write(&reader_file, format!("{reader}\n")).unwrap();
    let url = format!("http://{}", server.addr);
    let api = |token: &std::path::Path, rest: &[&str]| {
        let mut args = vec![
            "--retry-for",
            "0s",
            "api",
            "--api-url",
            url.as_str(),
            "--api-token-file",
            token.to_str().unwrap(),
        ];
        args.extend_from_slice(rest);
        saga(&args)
    };
    let id = server
        .block_on(
            server
                .engine
                .start_with::<AwaitApproval>(&"deal".to_owned(), StartOptions::default()),
        )
        .unwrap()
        .id;
    let id_text = id.to_string();

    let text = ok(&api(
        &token_file,
        &[
            "signal",
            &id_text,
            "approval",
            "--payload",
            "\"yes\"",
            "--key",
            "t-1",
        ],
    ));
    assert_eq!(
        text,
        format!("signal `approval` delivered to saga {id} as #1\n")
    );
    let out = json_of(&ok(&api(
        &token_file,
        &[
            "--json",
            "signal",
            &id_text,
            "approval",
            "--payload",
            "\"yes\"",
            "--key",
            "t-1",
        ],
    )));
    assert_eq!(out["duplicate"], true);
    assert_eq!(out["sequence"], 1);
    let text = ok(&api(
        &token_file,
        &[
            "signal",
            &id_text,
            "approval",
            "--payload",
            "\"yes\"",
            "--key",
            "t-1",
        ],
    ));
    assert!(text.contains("duplicate of #1"), "{text}");

    // Refusals from the server: another payload under the key, no `operate`, an unknown
    // saga (exit 1); a finished saga (exit 3).
    let err = fails(
        &api(
            &token_file,
            &[
                "signal",
                &id_text,
                "approval",
                "--payload",
                "1",
                "--key",
                "t-1",
            ],
        ),
        1,
    );
    assert!(err.contains("signal_conflict"), "{err}");
    let err = fails(
        &api(
            &reader_file,
            &["signal", &id_text, "approval", "--key", "t-2"],
        ),
        1,
    );
    assert!(err.contains("operate"), "{err}");
    let unknown = SagaId::random().to_string();
    let err = fails(
        &api(
            &token_file,
            &["signal", &unknown, "approval", "--key", "t-2"],
        ),
        1,
    );
    assert!(err.contains("404"), "{err}");

    let outcome = server.block_on(server.engine.run_once(id)).unwrap();
    assert!(
        matches!(outcome, RunOutcome::Finished(_)),
        "the signal should end the wait: {outcome:?}"
    );
    let err = fails(
        &api(
            &token_file,
            &["signal", &id_text, "approval", "--key", "t-3"],
        ),
        3,
    );
    assert!(err.contains("saga_finished"), "{err}");
}
