//! The `saga` binary against a real Redis: every command, its table and its `--json` shape,
//! and its errors.
//!
//! Each test prepares its own sagas under its own key prefix on one shared `redis-server`:
//! one `Completed`, one `Compensated`, one `Failed` (its compensation gave up), one `Running`
//! that waits on a durable timer while another coordinator (`worker-7`) holds its lease, and
//! one quarantined. Then it runs the real binary.

use std::process::{Command, Output};
use std::time::Duration;

use saga_core::store::ClaimRequest;
use saga_core::{
    Compensation, Engine, EventKind, FailureKind, HttpStatus, Jitter, RetryPolicy, RunOutcome,
    Saga, SagaContext, SagaError, SagaId, SagaStatus, SagaStore, StartOptions, Step, StepContext,
};
use saga_redis::RedisStore;
use saga_redis_testkit::{shared_server, unique_prefix};
use serde_json::Value;

/// Step 0: reserves; its compensation fails (transiently, twice, then gives up) for
/// `undo_fails`.
struct Reserve;

impl Step for Reserve {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "reserve";
    const COMPENSATION: Compensation = Compensation::OnSuccess;

    async fn forward(&self, _ctx: &StepContext, mode: String) -> Result<String, HttpStatus> {
        Ok(format!("hold-{mode}"))
    }

    async fn compensate(
        &self,
        _ctx: &StepContext,
        mode: String,
        _output: Option<String>,
    ) -> Result<(), HttpStatus> {
        if mode == "undo_fails" {
            Err(HttpStatus::new(503))
        } else {
            Ok(())
        }
    }

    fn compensation_retry_policy(&self) -> RetryPolicy {
        RetryPolicy::default()
            .with_max_attempts(2)
            .with_initial_delay(Duration::from_millis(1))
            .with_max_delay(Duration::from_millis(1))
            .with_jitter(Jitter::None)
    }
}

/// Step 1: charges. `ok` succeeds, `slow` fails transiently with a one-hour backoff (a
/// durable timer), anything else is declined for good.
struct Charge;

impl Step for Charge {
    type Input = String;
    type Output = String;
    type Error = HttpStatus;
    const NAME: &'static str = "charge";
    const COMPENSATION: Compensation = Compensation::None;

    async fn forward(&self, _ctx: &StepContext, mode: String) -> Result<String, HttpStatus> {
        match mode.as_str() {
            "ok" => Ok("charged".into()),
            "slow" => Err(HttpStatus::new(503)),
            _ => Err(HttpStatus::new(402)),
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

struct Demo;

impl Saga for Demo {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "cli_demo";

    async fn run(&self, saga: &mut SagaContext, mode: String) -> Result<String, SagaError> {
        let hold = saga.run(Reserve, mode.clone()).await?;
        let charge = saga.run(Charge, mode).await?;
        Ok(format!("{hold}/{charge}"))
    }
}

/// Another type, for `--type`.
struct Other;

impl Saga for Other {
    type Input = String;
    type Output = String;
    const NAME: &'static str = "cli_other";

    async fn run(&self, saga: &mut SagaContext, mode: String) -> Result<String, SagaError> {
        saga.run(Reserve, mode).await
    }
}

const QUARANTINE_REASON: &str = "input does not decode (test quarantine)";

struct Fixture {
    runtime: tokio::runtime::Runtime,
    url: String,
    prefix: String,
    store: RedisStore,
    engine: Engine,
    completed: SagaId,
    compensated: SagaId,
    failed: SagaId,
    running: SagaId,
    quarantined: SagaId,
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
        let (store, engine, ids) = runtime.block_on(prepare(&url, &prefix));
        let [completed, compensated, failed, running, quarantined] = ids;
        Self {
            runtime,
            url,
            prefix,
            store,
            engine,
            completed,
            compensated,
            failed,
            running,
            quarantined,
        }
    }

    fn all(&self) -> Vec<SagaId> {
        let mut ids = vec![
            self.completed,
            self.compensated,
            self.failed,
            self.running,
            self.quarantined,
        ];
        ids.sort();
        ids
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

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.saga(args);
        assert!(
            out.status.success(),
            "saga {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap_or_else(|err| panic!("stdout not UTF-8: {err}"))
    }

    /// Runs a command with `--json` that must succeed; returns its one JSON document.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.ok(&all);
        serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("saga {args:?}: not one JSON document ({err}): {text}"))
    }

    /// Runs a command that must fail with status 1; returns its one-line stderr.
    fn fails(&self, args: &[&str]) -> String {
        expect_failure(&self.saga(args), args)
    }

    fn stored(&self, id: SagaId) -> Option<saga_core::store::StoredSaga> {
        self.runtime
            .block_on(self.store.load(id))
            .unwrap_or_else(|err| panic!("load {id}: {err}"))
    }

    fn history(&self, id: SagaId) -> Vec<EventKind> {
        self.runtime
            .block_on(self.engine.history(id))
            .unwrap_or_else(|err| panic!("history {id}: {err}"))
            .into_iter()
            .map(|event| event.kind)
            .collect()
    }
}

fn expect_failure(out: &Output, args: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "saga {args:?} should exit 1; stdout: {} stderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty(), "saga {args:?} printed on stdout");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "saga {args:?}: stderr is not one line: {stderr}"
    );
    stderr
}

async fn prepare(url: &str, prefix: &str) -> (RedisStore, Engine, [SagaId; 5]) {
    let store = RedisStore::builder()
        .url(url)
        .key_prefix(prefix)
        .connect()
        .await
        .unwrap_or_else(|err| panic!("connect {url}: {err}"));
    let engine = Engine::builder(store.clone())
        .register(Demo)
        .register(Other)
        .owner("test-coordinator")
        .build()
        .unwrap_or_else(|err| panic!("engine: {err}"));
    let run = |mode: &'static str, expected: SagaStatus| {
        let engine = engine.clone();
        async move {
            let outcome = engine
                .execute::<Demo>(&mode.to_owned(), StartOptions::default())
                .await
                .unwrap_or_else(|err| panic!("execute {mode}: {err}"));
            assert_eq!(outcome.status, expected, "saga {mode}");
            outcome.id
        }
    };
    let completed = run("ok", SagaStatus::Completed).await;
    let compensated = run("declined", SagaStatus::Compensated).await;
    let failed = run("undo_fails", SagaStatus::Failed).await;

    // Running: its charge failed transiently and waits on a one-hour durable timer; then
    // another coordinator takes its lease.
    let running = engine
        .start_with::<Demo>(&"slow".to_owned(), StartOptions::default())
        .await
        .unwrap_or_else(|err| panic!("start: {err}"))
        .id;
    match engine.run_once(running).await {
        Ok(RunOutcome::Suspended(_)) => {}
        other => panic!("the slow saga should wait on a durable timer: {other:?}"),
    }
    let claim = ClaimRequest {
        owner: "worker-7".into(),
        ttl: Duration::from_secs(600),
    };
    store
        .claim(running, &claim)
        .await
        .unwrap_or_else(|err| panic!("claim: {err}"));

    let quarantined = engine
        .start_with::<Other>(&"ok".to_owned(), StartOptions::default())
        .await
        .unwrap_or_else(|err| panic!("start: {err}"))
        .id;
    store
        .quarantine(quarantined, QUARANTINE_REASON)
        .await
        .unwrap_or_else(|err| panic!("quarantine: {err}"));
    (
        store,
        engine,
        [completed, compensated, failed, running, quarantined],
    )
}

fn ids_of(page: &Value) -> Vec<String> {
    page["sagas"]
        .as_array()
        .unwrap_or_else(|| panic!("no sagas array: {page}"))
        .iter()
        .map(|row| row["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn strings(ids: &[SagaId]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

#[test]
fn list_filters_and_pages() {
    let fx = Fixture::new("cli_list");
    let all = fx.json(&["list"]);
    assert_eq!(ids_of(&all), strings(&fx.all()));
    assert_eq!(all["next"], Value::Null);
    let row = all["sagas"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|row| row["id"] == fx.quarantined.to_string())
        })
        .unwrap_or_else(|| panic!("quarantined saga missing: {all}"));
    assert_eq!(row["saga_type"], "cli_other");
    assert_eq!(row["status"], "running");
    assert_eq!(row["quarantined"], QUARANTINE_REASON);
    assert!(row["updated_at"].as_str().is_some_and(|t| t.ends_with('Z')));

    let failed = fx.json(&["list", "--status", "failed"]);
    assert_eq!(ids_of(&failed), strings(&[fx.failed]));
    let other = fx.json(&["list", "--type", "cli_other"]);
    assert_eq!(ids_of(&other), strings(&[fx.quarantined]));
    let running = fx.json(&["list", "--status", "running", "--type", "cli_demo"]);
    assert_eq!(ids_of(&running), strings(&[fx.running]));

    // Paging: two at a time, following `next`, returns every saga exactly once.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = vec!["list", "--limit", "2"];
        if let Some(after) = &after {
            args.extend(["--after", after.as_str()]);
        }
        let page = fx.json(&args);
        let ids = ids_of(&page);
        assert!(ids.len() <= 2, "page too long: {page}");
        seen.extend(ids);
        pages += 1;
        assert!(pages <= 5, "paging does not end");
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, strings(&fx.all()));
    assert_eq!(pages, 3);

    // The table.
    let text = fx.ok(&["list"]);
    let header = text.lines().next().unwrap_or_default();
    for column in ["ID", "TYPE", "STATUS", "UPDATED", "QUARANTINED"] {
        assert!(header.contains(column), "header: {header}");
    }
    for id in fx.all() {
        assert!(text.contains(&id.to_string()), "{id} missing: {text}");
    }
    assert!(text.contains(QUARANTINE_REASON));
    assert!(text.contains("5 saga(s)"), "{text}");
    let first = fx.ok(&["list", "--limit", "2"]);
    assert!(first.contains("next page: saga list --after"), "{first}");
    assert!(
        fx.ok(&["list", "--status", "compensating"])
            .contains("no sagas match")
    );
}

#[test]
fn show_prints_timeline_steps_and_lease() {
    let fx = Fixture::new("cli_show");

    // The failed saga: its compensation gave up after two attempts.
    let shown = fx.json(&["show", &fx.failed.to_string()]);
    assert_eq!(shown["id"], fx.failed.to_string());
    assert_eq!(shown["saga_type"], "cli_demo");
    assert_eq!(shown["version"], 1);
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["failure"]["kind"], "compensation_failed");
    assert!(
        shown["compensation_reason"]
            .as_str()
            .is_some_and(|r| r.contains("charge") && r.contains("402")),
        "{shown}"
    );
    assert_eq!(shown["lease"], Value::Null);
    let steps = shown["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("no steps: {shown}"));
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["name"], "reserve");
    assert_eq!(steps[0]["status"], "succeeded");
    assert_eq!(steps[0]["attempts"], 1);
    assert_eq!(steps[0]["compensation"]["attempts"], 2);
    assert_eq!(steps[0]["compensation"]["error"]["class"], "transient");
    // The first undo attempt backed off 1 ms (the second gave up).
    assert_eq!(steps[0]["compensation"]["backoffs_seconds"][0], 0.001);
    assert_eq!(steps[1]["name"], "charge");
    assert_eq!(steps[1]["status"], "failed");
    assert_eq!(steps[1]["error"]["class"], "permanent");
    assert!(
        steps[1]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("402"))
    );
    let events = shown["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events: {shown}"));
    assert_eq!(events[0]["type"], "SagaStarted");
    assert_eq!(
        events.last().map(|e| &e["type"]),
        Some(&Value::from("SagaFailed"))
    );
    let timeline = shown["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("no timeline: {shown}"));
    assert_eq!(timeline.len(), events.len());

    let text = fx.ok(&["show", &fx.failed.to_string()]);
    for needle in [
        "started cli_demo v1",
        "#0 reserve",
        "#1 charge",
        "FAILED on attempt 1",
        "COMPENSATING:",
        "undo attempt 1 failed",
        "FAILED (CompensationFailed)",
        "status",
        "failed",
        "compensation_failed",
        "failed (2 attempt(s)",
        "not held",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from:\n{text}");
    }

    // The running saga: worker-7 holds its lease; its charge waits an hour.
    let stored = fx
        .stored(fx.running)
        .unwrap_or_else(|| panic!("running saga gone"));
    let shown = fx.json(&["show", &fx.running.to_string()]);
    assert_eq!(shown["status"], "running");
    assert_eq!(shown["lease"]["owner"], "worker-7");
    assert_eq!(shown["lease"]["fence"], stored.fence);
    assert_eq!(shown["fence"], stored.fence);
    assert!(stored.fence >= 2, "two claims were made: {}", stored.fence);
    let expiry = stored
        .lease
        .as_ref()
        .map(|lease| lease.expires_at.to_rfc3339())
        .unwrap_or_else(|| panic!("lease missing"));
    assert_eq!(shown["lease"]["expires_at"], expiry.as_str());
    assert_eq!(shown["steps"][1]["attempts"], 1);
    assert_eq!(shown["steps"][1]["status"], "retrying");
    assert_eq!(
        shown["steps"][1]["backoffs_seconds"],
        serde_json::json!([3600.0])
    );
    assert!(shown["steps"][1]["next_retry_at"].is_string());
    let text = fx.ok(&["show", &fx.running.to_string()]);
    let lease_line = format!(
        "held by worker-7 until {expiry} (fencing token {})",
        stored.fence
    );
    assert!(
        text.contains(&lease_line),
        "`{lease_line}` missing:\n{text}"
    );
    assert!(text.contains("retry in 3600.00s"), "{text}");
    assert!(text.contains("lease taken by test-coordinator"), "{text}");

    // The quarantined saga.
    let shown = fx.json(&["show", &fx.quarantined.to_string()]);
    assert_eq!(shown["quarantined"], QUARANTINE_REASON);
    assert_eq!(shown["saga_type"], "cli_other");
    let text = fx.ok(&["show", &fx.quarantined.to_string()]);
    assert!(text.contains(QUARANTINE_REASON), "{text}");
    assert!(text.contains("(no steps yet)"), "{text}");

    // The completed saga has its output.
    let shown = fx.json(&["show", &fx.completed.to_string()]);
    assert_eq!(shown["status"], "completed");
    assert_eq!(shown["output"], "hold-ok/charged");
}

#[test]
fn retry_resumes_a_failed_saga() {
    let fx = Fixture::new("cli_retry");
    let id = fx.failed.to_string();
    let out = fx.json(&["retry", &id, "--reason", "fixed the inventory API"]);
    assert_eq!(out["id"], id);
    assert_eq!(out["action"], "retry");
    assert_eq!(out["status"], "compensating");
    let stored = fx.stored(fx.failed).unwrap_or_else(|| panic!("gone"));
    assert_eq!(stored.status, SagaStatus::Compensating);
    assert!(stored.lease.is_none());
    assert!(stored.due_at.is_some(), "a retried saga is due: {stored:?}");
    let history = fx.history(fx.failed);
    assert!(
        history.iter().any(|kind| matches!(
            kind,
            EventKind::SagaRetried { reason, status: SagaStatus::Compensating }
                if reason == "fixed the inventory API"
        )),
        "{history:?}"
    );

    // Not failed any more, and never was for the completed one.
    let err = fx.fails(&["retry", &id]);
    assert!(
        err.contains("only failed or quarantined sagas can be retried"),
        "{err}"
    );
    let err = fx.fails(&["retry", &fx.completed.to_string()]);
    assert!(
        err.contains(&format!("saga {} is completed", fx.completed)),
        "{err}"
    );

    // A quarantined saga is released from quarantine, in text mode.
    let text = fx.ok(&["retry", &fx.quarantined.to_string()]);
    assert!(text.contains("retried; it resumes running"), "{text}");
    let stored = fx.stored(fx.quarantined).unwrap_or_else(|| panic!("gone"));
    assert_eq!(stored.quarantined, None);
}

#[test]
fn cancel_requests_compensation() {
    let fx = Fixture::new("cli_cancel");
    let id = fx.running.to_string();
    let out = fx.json(&["cancel", &id, "--reason", "customer withdrew"]);
    assert_eq!(out["action"], "cancel");
    assert_eq!(out["id"], id);
    assert_eq!(out["status"], "running");
    let history = fx.history(fx.running);
    assert!(
        history.iter().any(|kind| matches!(
            kind,
            EventKind::CancelRequested { reason } if reason == "customer withdrew"
        )),
        "{history:?}"
    );
    let stored = fx.stored(fx.running).unwrap_or_else(|| panic!("gone"));
    assert!(stored.cancel_requested);
    let shown = fx.json(&["show", &id]);
    assert_eq!(shown["cancel_requested"], true);

    let err = fx.fails(&["cancel", &fx.completed.to_string()]);
    assert!(err.contains("already ended"), "{err}");
}

#[test]
fn abandon_ends_a_saga_failed() {
    let fx = Fixture::new("cli_abandon");
    let id = fx.running.to_string();
    // The reason is required.
    let out = fx.saga(&["abandon", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reason"));

    let out = fx.json(&["abandon", &id, "--reason", "duplicate deal, closed by hand"]);
    assert_eq!(out["action"], "abandon");
    assert_eq!(out["status"], "failed");
    let state = fx
        .runtime
        .block_on(fx.engine.state(fx.running))
        .unwrap_or_else(|err| panic!("state: {err}"));
    assert_eq!(state.status, SagaStatus::Failed);
    assert!(
        matches!(&state.failure, Some((FailureKind::Abandoned, _))),
        "{:?}",
        state.failure
    );
    assert!(
        fx.history(fx.running)
            .iter()
            .any(|kind| matches!(kind, EventKind::SagaAbandoned { .. }))
    );

    let err = fx.fails(&["abandon", &fx.compensated.to_string(), "--reason", "x"]);
    assert!(err.contains("already ended"), "{err}");
    let err = fx.fails(&["abandon", &id, "--reason", "again"]);
    assert!(err.contains("already ended"), "{err}");
    // An abandoned saga is not retried.
    let err = fx.fails(&["retry", &id]);
    assert!(err.contains("abandoned"), "{err}");
}

#[test]
fn purge_deletes_only_old_terminal_sagas() {
    let fx = Fixture::new("cli_purge");
    let out = fx.json(&["purge", "--older-than", "7d"]);
    assert_eq!(out["deleted"], 0);
    assert_eq!(out["older_than_seconds"], 7 * 24 * 3600);
    for id in fx.all() {
        assert!(fx.stored(id).is_some());
    }

    let out = fx.json(&["purge", "--older-than", "0s", "--limit", "1"]);
    assert_eq!(out["deleted"], 1);
    let text = fx.ok(&["purge", "--older-than", "0s"]);
    assert!(text.contains("purged 2 terminal saga(s)"), "{text}");
    for id in [fx.completed, fx.compensated, fx.failed] {
        assert!(fx.stored(id).is_none(), "{id} should be purged");
    }
    for id in [fx.running, fx.quarantined] {
        assert!(fx.stored(id).is_some(), "{id} should be kept");
    }
    let err = fx.fails(&["show", &fx.completed.to_string()]);
    assert!(err.contains(&format!("saga {} not found", fx.completed)));

    let out = fx.saga(&["purge", "--older-than", "soon"]);
    assert!(!out.status.success());
}

#[test]
fn stats_counts_and_groups_failures() {
    let fx = Fixture::new("cli_stats");
    let stats = fx.json(&["stats"]);
    let counts = fx
        .runtime
        .block_on(fx.store.count_by_status())
        .unwrap_or_else(|err| panic!("count: {err}"));
    for (status, n) in &counts {
        assert_eq!(stats["counts"][status.as_str()], *n, "{status}: {stats}");
    }
    assert_eq!(stats["counts"]["running"], 2);
    assert_eq!(stats["counts"]["completed"], 1);
    assert_eq!(stats["counts"]["compensated"], 1);
    assert_eq!(stats["counts"]["failed"], 1);
    assert_eq!(stats["total"], 5);
    // The quarantined saga counts under `running`, and is reported as set aside.
    assert_eq!(stats["quarantined"], 1, "{stats}");
    let recent = &stats["recent_failures"];
    assert_eq!(recent["scanned"], 1);
    assert_eq!(recent["reasons"][0]["kind"], "compensation_failed");
    assert_eq!(recent["reasons"][0]["count"], 1);
    assert_eq!(recent["reasons"][0]["sagas"][0], fx.failed.to_string());
    assert!(
        recent["reasons"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("reserve") && r.contains("503"))
    );
    assert!(
        recent["compensation_reasons"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("charge") && r.contains("402"))
    );

    let text = fx.ok(&["stats"]);
    for needle in [
        "STATUS",
        "running",
        "failed",
        "total",
        "5",
        "compensation_failed",
        "quarantined: 1",
    ] {
        assert!(text.contains(needle), "`{needle}` missing:\n{text}");
    }
}

#[test]
fn errors_are_one_clear_line() {
    let fx = Fixture::new("cli_errors");
    let unknown = SagaId::random().to_string();
    for command in ["show", "retry", "cancel"] {
        let err = fx.fails(&[command, &unknown]);
        assert!(err.contains(&format!("saga {unknown} not found")), "{err}");
    }
    let err = fx.fails(&["abandon", &unknown, "--reason", "x"]);
    assert!(err.contains(&format!("saga {unknown} not found")), "{err}");

    let err = fx.fails(&["show", "not-a-uuid"]);
    assert!(err.contains("invalid saga id `not-a-uuid`"), "{err}");
    let err = fx.fails(&["list", "--after", "42"]);
    assert!(err.contains("invalid saga id `42`"), "{err}");
    let err = fx.fails(&["--json", "retry", "xyz"]);
    assert!(err.contains("invalid saga id"), "{err}");

    // A port nobody listens on.
    let port = {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|err| panic!("bind: {err}"));
        listener
            .local_addr()
            .unwrap_or_else(|err| panic!("addr: {err}"))
            .port()
    };
    let url = format!("redis://127.0.0.1:{port}");
    // Without retrying the outage (the CLI rides out blips for 30 s by default).
    let args = ["--redis-url", url.as_str(), "--retry-for", "0s", "stats"];
    let out = Command::new(env!("CARGO_BIN_EXE_saga"))
        .env_remove("REDIS_URL")
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("run: {err}"));
    let err = expect_failure(&out, &args);
    assert!(
        err.contains(&format!("cannot reach Redis at {url}")),
        "{err}"
    );
    assert!(err.contains("Redis must be running"), "{err}");

    // No URL at all.
    let out = Command::new(env!("CARGO_BIN_EXE_saga"))
        .env_remove("REDIS_URL")
        .args(["list"])
        .output()
        .unwrap_or_else(|err| panic!("run: {err}"));
    let err = expect_failure(&out, &["list"]);
    assert!(err.contains("REDIS_URL"), "{err}");

    // The URL from the environment works.
    let out = Command::new(env!("CARGO_BIN_EXE_saga"))
        .env("REDIS_URL", &fx.url)
        .args([
            "--key-prefix",
            &fx.prefix,
            "--json",
            "list",
            "--status",
            "failed",
        ])
        .output()
        .unwrap_or_else(|err| panic!("run: {err}"));
    assert!(out.status.success());
    let page: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(ids_of(&page), strings(&[fx.failed]));
}

/// No secret on any output: `--help` and a failed connection with a password in the
/// environment or in `--redis-url-file` never print it (issue 8, item 3).
#[test]
fn passwords_never_reach_the_output() {
    const SECRET: &str = "s3cr3t-Pa55w0rd-never-printed";
    let url = format!("redis://app:{SECRET}@127.0.0.1:1");
    let dir = std::env::temp_dir().join(format!("saga-cli-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("mkdir: {err}"));
    let file = dir.join("redis-url");
    std::fs::write(&file, format!("{url}\n")).unwrap_or_else(|err| panic!("write: {err}"));
    let file = file
        .to_str()
        .unwrap_or_else(|| panic!("utf-8 path"))
        .to_owned();
    let cases: [(&[&str], bool); 3] = [
        (&["--help"], true),
        (&["--retry-for", "0s", "stats"], false),
        (
            &[
                "--retry-for",
                "0s",
                "--redis-url-file",
                file.as_str(),
                "stats",
            ],
            false,
        ),
    ];
    for (args, succeeds) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_saga"))
            .env("REDIS_URL", &url)
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("run: {err}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.success(), succeeds, "saga {args:?}: {text}");
        assert!(
            !text.contains(SECRET),
            "saga {args:?} printed the password:\n{text}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_saga"))
        .env_remove("REDIS_URL")
        .args(["--redis-url-file", "/nonexistent/redis-url", "stats"])
        .output()
        .unwrap_or_else(|err| panic!("run: {err}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read the Redis URL from /nonexistent/redis-url"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
