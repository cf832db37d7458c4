//! A saga past its pivot, through the `saga` binary (issue 9): on a real Redis, a saga whose
//! pivot step succeeded and whose next step waits on a one-hour durable timer is still
//! running; `saga cancel` refuses it with exit status 3 and changes nothing, `saga show`
//! prints its pivot row, and `saga api cancel` (against an HTTP API on the same store) is
//! refused with status 3 too. A saga that has ended is refused with status 1, as before.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use saga_core::{
    Compensation, Engine, EventKind, HttpStatus, Jitter, RetryPolicy, RunOutcome, Saga,
    SagaContext, SagaError, SagaId, SagaStatus, SagaStore, StartOptions, Step, StepContext,
};
use saga_http::{ApiTokens, Auth, GeneratedToken, HttpApi, Principal, Scope, ServeConfig};
use saga_redis::RedisStore;
use saga_redis_testkit::{shared_server, unique_prefix};
use serde_json::Value;

/// Step 0: holds the goods (compensated, before the pivot).
struct Hold;

impl Step for Hold {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "hold";
    const COMPENSATION: Compensation = Compensation::OnSuccess;

    async fn forward(&self, _ctx: &StepContext, mode: String) -> Result<String, HttpStatus> {
        Ok(format!("held-{mode}"))
    }

    async fn compensate(
        &self,
        _ctx: &StepContext,
        _mode: String,
        _held: Option<String>,
    ) -> Result<(), HttpStatus> {
        Ok(())
    }
}

/// Step 1: the pivot, the point of no return.
struct Commit;

impl Step for Commit {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "commit";
    const COMPENSATION: Compensation = Compensation::Pivot;

    async fn forward(&self, _ctx: &StepContext, _mode: String) -> Result<String, HttpStatus> {
        Ok("committed".into())
    }
}

/// Step 2: `slow` fails transiently with a one-hour backoff (a durable timer), anything else
/// succeeds.
struct Deliver;

impl Step for Deliver {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "deliver";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, _ctx: &StepContext, mode: String) -> Result<String, HttpStatus> {
        if mode == "slow" {
            Err(HttpStatus::new(503))
        } else {
            Ok("delivered".into())
        }
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
            .with_max_attempts(3)
            .with_initial_delay(Duration::from_secs(3600))
            .with_max_delay(Duration::from_secs(3600))
            .with_jitter(Jitter::None)
    }
}

struct Shipment;

impl Saga for Shipment {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "cli_pivot";

    async fn run(&self, saga: &mut SagaContext, mode: String) -> Result<String, SagaError> {
        let held = saga.run(Hold, mode.clone()).await?;
        let committed = saga.run(Commit, mode.clone()).await?;
        let delivered = saga.run(Deliver, mode).await?;
        Ok(format!("{held}/{committed}/{delivered}"))
    }
}

/// One saga past its pivot and waiting on its timer, one that completed past its pivot, and
/// an HTTP API on the same store, on a runtime of their own.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    url: String,
    prefix: String,
    store: RedisStore,
    engine: Engine,
    running: SagaId,
    completed: SagaId,
    api: SocketAddr,
    token: String,
    stop_api: Option<tokio::sync::oneshot::Sender<()>>,
    api_task: Option<tokio::task::JoinHandle<()>>,
}

impl Fixture {
    fn new(test: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap_or_else(|err| panic!("runtime: {err}"));
        let url = shared_server().url();
        let prefix = unique_prefix(test);
        let (store, engine, running, completed) = runtime.block_on(prepare(&url, &prefix));

        let principal = Principal::new("operator", Scope::ALL.into_iter().collect::<BTreeSet<_>>())
            .unwrap_or_else(|err| panic!("principal: {err}"));
        let generated =
            GeneratedToken::new(&principal).unwrap_or_else(|err| panic!("token: {err}"));
        let tokens = ApiTokens::parse(&generated.config_line)
            .unwrap_or_else(|err| panic!("token config: {err}"));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap_or_else(|err| panic!("bind: {err}"));
        let api = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("local address: {err}"));
        let (stop_api, stopped) = tokio::sync::oneshot::channel::<()>();
        // No coordinator: the waiting saga must stay exactly where it is.
        let server = HttpApi::new(engine.clone(), Auth::tokens(tokens));
        let api_task = runtime.spawn(async move {
            server
                .serve(listener, ServeConfig::default(), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap_or_else(|err| panic!("serve: {err}"));
        });
        Self {
            runtime,
            url,
            prefix,
            store,
            engine,
            running,
            completed,
            api,
            token: generated.token,
            stop_api: Some(stop_api),
            api_task: Some(api_task),
        }
    }

    /// Runs `saga --redis-url .. --key-prefix .. <args>`.
    fn saga(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_saga"))
            .env_remove("REDIS_URL")
            .args(["--redis-url", &self.url, "--key-prefix", &self.prefix])
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("cannot run saga: {err}"))
    }

    /// Runs `saga api --api-url .. <args>` with the operator's token in the environment.
    fn saga_api(&self, args: &[&str]) -> Output {
        let url = format!("http://{}", self.api);
        let mut command = Command::new(env!("CARGO_BIN_EXE_saga"));
        for var in [
            "REDIS_URL",
            "REDIS_URL_FILE",
            "SAGA_API_URL",
            "SAGA_API_TOKEN_FILE",
            "SAGA_API_CA_FILE",
        ] {
            command.env_remove(var);
        }
        command
            .env("SAGA_API_TOKEN", &self.token)
            .args(["api", "--api-url", &url])
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("cannot run saga: {err}"))
    }

    fn history(&self, id: SagaId) -> Vec<EventKind> {
        self.runtime
            .block_on(self.engine.history(id))
            .unwrap_or_else(|err| panic!("history {id}: {err}"))
            .into_iter()
            .map(|event| event.kind)
            .collect()
    }

    fn cancel_requested(&self, id: SagaId) -> bool {
        let stored = self
            .runtime
            .block_on(self.store.load(id))
            .unwrap_or_else(|err| panic!("load {id}: {err}"))
            .unwrap_or_else(|| panic!("saga {id} is gone"));
        let state = self
            .runtime
            .block_on(self.engine.state(id))
            .unwrap_or_else(|err| panic!("state {id}: {err}"));
        stored.cancel_requested || state.cancel_requested
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(stop) = self.stop_api.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.api_task.take() {
            let _ = self.runtime.block_on(task);
        }
    }
}

async fn prepare(url: &str, prefix: &str) -> (RedisStore, Engine, SagaId, SagaId) {
    let store = RedisStore::builder()
        .url(url)
        .key_prefix(prefix)
        .connect()
        .await
        .unwrap_or_else(|err| panic!("connect {url}: {err}"));
    let engine = Engine::builder(store.clone())
        .register(Shipment)
        .owner("test-coordinator")
        .build()
        .unwrap_or_else(|err| panic!("engine: {err}"));

    // Past the pivot, its delivery failed transiently: it waits an hour for the next try.
    let running = engine
        .start_with::<Shipment>(&"slow".to_owned(), StartOptions::default())
        .await
        .unwrap_or_else(|err| panic!("start: {err}"))
        .id;
    match engine.run_once(running).await {
        Ok(RunOutcome::Suspended(_)) => {}
        other => panic!("the slow saga should wait on a durable timer: {other:?}"),
    }
    let state = engine
        .state(running)
        .await
        .unwrap_or_else(|err| panic!("state: {err}"));
    assert_eq!(state.status, SagaStatus::Running);
    let pivot = state
        .past_pivot
        .as_ref()
        .unwrap_or_else(|| panic!("the saga should be past its pivot: {state:?}"));
    assert_eq!((pivot.position, pivot.step.as_str()), (1, "commit"));

    let completed = engine
        .execute::<Shipment>(&"ok".to_owned(), StartOptions::default())
        .await
        .unwrap_or_else(|err| panic!("execute: {err}"));
    assert_eq!(completed.status, SagaStatus::Completed, "{completed:?}");
    (store, engine, running, completed.id)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a refusal: exit status 3, nothing on stdout, one line on stderr; that line.
fn refused(out: &Output, what: &str) -> String {
    assert_eq!(
        out.status.code(),
        Some(3),
        "{what} should exit 3; stdout: {} stderr: {}",
        stdout(out),
        stderr(out)
    );
    assert!(
        out.stdout.is_empty(),
        "{what} printed on stdout: {}",
        stdout(out)
    );
    let text = stderr(out);
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "{what}: not one line: {text}"
    );
    assert!(text.starts_with("error: "), "{what}: {text}");
    text
}

/// A successful run's stdout.
fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        stderr(out)
    );
    stdout(out)
}

#[test]
fn cancel_past_the_pivot_exits_3_and_changes_nothing() {
    let fx = Fixture::new("cli_pivot_cancel");
    let id = fx.running.to_string();
    let before = fx.history(fx.running);

    let line = refused(
        &fx.saga(&["cancel", &id, "--reason", "too late?"]),
        "saga cancel",
    );
    assert!(line.contains("cannot be cancelled"), "{line}");
    assert!(line.contains("pivot"), "{line}");
    assert!(line.contains("`commit`"), "{line}");
    assert!(line.contains(&id), "{line}");
    // The way out it names exists.
    assert!(line.contains("abandon"), "{line}");

    // The same with --json: a refusal is not a document on stdout.
    let line = refused(&fx.saga(&["--json", "cancel", &id]), "saga --json cancel");
    assert!(line.contains("pivot"), "{line}");

    // Nothing changed: no cancel flag, no event, still running.
    assert!(!fx.cancel_requested(fx.running));
    assert_eq!(fx.history(fx.running), before);
    let shown: Value = serde_json::from_str(&ok(&fx.saga(&["--json", "show", &id]), "show"))
        .unwrap_or_else(|err| panic!("show --json: {err}"));
    assert_eq!(shown["status"], "running", "{shown}");
    assert_eq!(shown["cancel_requested"], false, "{shown}");

    // A saga that has ended is refused for that, with the ordinary failure status.
    let done = fx.completed.to_string();
    let out = fx.saga(&["cancel", &done]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("already ended"), "{}", stderr(&out));
}

#[test]
fn show_prints_the_pivot_row() {
    let fx = Fixture::new("cli_pivot_show");
    let id = fx.running.to_string();

    let text = ok(&fx.saga(&["show", &id]), "saga show");
    let row = text
        .lines()
        .find(|line| line.trim_start().starts_with("pivot"))
        .unwrap_or_else(|| panic!("no pivot row: {text}"));
    assert!(
        row.contains("past the pivot #1 commit: it only goes forward"),
        "{row}"
    );
    assert!(!text.contains("refused past the pivot"), "{text}");

    let shown: Value = serde_json::from_str(&ok(&fx.saga(&["--json", "show", &id]), "show"))
        .unwrap_or_else(|err| panic!("show --json: {err}"));
    assert_eq!(shown["past_pivot"], "#1 commit", "{shown}");

    // The completed one passed its pivot too.
    let text = ok(&fx.saga(&["show", &fx.completed.to_string()]), "saga show");
    assert!(text.contains("past the pivot #1 commit"), "{text}");
}

#[test]
fn api_cancel_past_the_pivot_exits_3() {
    let fx = Fixture::new("cli_pivot_api");
    let id = fx.running.to_string();
    let before = fx.history(fx.running);

    let line = refused(
        &fx.saga_api(&["cancel", &id, "--reason", "too late?"]),
        "saga api cancel",
    );
    assert!(line.contains("409 (past_pivot)"), "{line}");
    assert!(line.contains("cannot be cancelled"), "{line}");
    assert!(line.contains("`commit`"), "{line}");
    assert!(!line.contains(&fx.token), "{line}");
    assert!(!fx.cancel_requested(fx.running));
    assert_eq!(fx.history(fx.running), before);

    // The API's status shows where the pivot is.
    let status: Value = serde_json::from_str(&ok(
        &fx.saga_api(&["status", &id, "--json"]),
        "saga api status",
    ))
    .unwrap_or_else(|err| panic!("api status --json: {err}"));
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["past_pivot"]["step"], "commit", "{status}");
    assert_eq!(status["past_pivot"]["position"], 1, "{status}");

    // An ended saga through the API: 409 already_finished, status 1.
    let out = fx.saga_api(&["cancel", &fx.completed.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("409 (already_finished)"),
        "{}",
        stderr(&out)
    );
}
