//! The kill -9 demo as a test: run `deal-flow` against a real redis-server (AOF with
//! `appendfsync always`), SIGKILL it while sagas are in flight, run the same command again,
//! and check from the ledger (kept in Redis) that every saga ended terminal and no effect or
//! compensation was applied twice.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use saga_redis_testkit::{RedisServer, ServerConfig, can_spawn_servers};

fn deal_flow(url: &str, companies: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_deal-flow"));
    command
        .args([
            "--redis-url",
            url,
            "--companies",
            companies,
            "--timelines",
            "none",
        ])
        .env_remove("REDIS_URL")
        .stdin(Stdio::null());
    command
}

fn ledger_entries(url: &str) -> usize {
    let client = redis::Client::open(url).unwrap_or_else(|err| panic!("bad url {url}: {err}"));
    let Ok(mut conn) = client.get_connection() else {
        return 0;
    };
    redis::cmd("LLEN")
        .arg(saga_examples::redis_office::RedisOffice::entries_key(
            "dealflow",
        ))
        .query(&mut conn)
        .unwrap_or(0)
}

fn totals(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|line| line.trim_start().starts_with("sagas "))
        .unwrap_or_else(|| panic!("no totals line in:\n{stdout}"))
}

#[test]
fn killed_run_resumes_every_saga_without_double_effects() {
    if !can_spawn_servers("killed_run_resumes_every_saga_without_double_effects") {
        return;
    }
    let server = RedisServer::start(ServerConfig::new().durable());
    let url = server.url();

    let mut first = deal_flow(&url, "80")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start deal-flow: {err}"));
    // Wait (bounded) until the run has applied some effects, then kill it without warning.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger_entries(&url) < 15 {
        assert!(
            Instant::now() < deadline,
            "deal-flow applied no effects within 60 s"
        );
        assert!(
            first.try_wait().ok().flatten().is_none(),
            "deal-flow exited before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    first
        .kill()
        .unwrap_or_else(|err| panic!("cannot kill deal-flow: {err}")); // SIGKILL
    let killed = first
        .wait_with_output()
        .unwrap_or_else(|err| panic!("wait: {err}"));
    let killed_stdout = String::from_utf8_lossy(&killed.stdout);
    assert!(
        !killed_stdout.contains("Ledger check"),
        "the first run finished before the kill, so nothing was resumed:\n{killed_stdout}"
    );

    let second = deal_flow(&url, "80")
        .output()
        .unwrap_or_else(|err| panic!("cannot run deal-flow again: {err}"));
    let stdout = String::from_utf8_lossy(&second.stdout);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        second.status.success(),
        "second run failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("Ledger check: OK"), "{stdout}");
    let totals = totals(&stdout);
    let resumes: u64 = totals
        .split("resumes")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume count in `{totals}`"));
    assert!(resumes >= 1, "the second run resumed nothing: {totals}");
    // The ledger check covers every saga in the store: none is left running.
    assert!(!stdout.contains("did not finish"), "{stdout}");
}
