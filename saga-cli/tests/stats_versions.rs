//! `saga stats` shows the active sagas per type and workflow version, as a table and in its
//! `--json` form, against a real Redis.

use std::process::Command;
use std::time::Duration;

use saga_core::store::{ClaimOutcome, ClaimRequest, NewSaga, Schedule, Transition};
use saga_core::{SagaId, SagaStatus, SagaStore};
use saga_redis::RedisStore;
use saga_redis_testkit::{shared_server, unique_prefix};
use serde_json::{Value, json};

/// Creates a saga of `saga_type` under `version` and brings it to `status` (no engine: the
/// store's contract only, with opaque states).
async fn saga(store: &RedisStore, saga_type: &str, version: u32, status: SagaStatus) {
    let id = SagaId::random();
    store
        .create(NewSaga {
            id,
            saga_type: saga_type.to_owned(),
            version,
            idempotency_key: None,
            fingerprint: "fp".to_owned(),
            state: "{}".to_owned(),
            events: vec!["{}".to_owned()],
            claim: None,
        })
        .await
        .unwrap_or_else(|err| panic!("create: {err}"));
    if status == SagaStatus::Running {
        return;
    }
    let request = ClaimRequest {
        owner: "setup".to_owned(),
        ttl: Duration::from_secs(3600),
    };
    let lease = match store.claim(id, &request).await {
        Ok(ClaimOutcome::Claimed(lease)) => lease,
        other => panic!("claim {id}: {other:?}"),
    };
    let schedule = if status.is_terminal() {
        Schedule::Finished
    } else {
        Schedule::WakeAfter(Duration::from_secs(3600))
    };
    let transition = Transition {
        commit_id: "to-status".to_owned(),
        events: vec!["{}".to_owned()],
        state: "{}".to_owned(),
        status,
        schedule,
    };
    store
        .commit(&lease, transition)
        .await
        .unwrap_or_else(|err| panic!("commit {id}: {err}"));
}

fn stats(url: &str, prefix: &str, json: bool) -> String {
    let mut args = vec!["--redis-url", url, "--key-prefix", prefix];
    if json {
        args.push("--json");
    }
    args.push("stats");
    let out = Command::new(env!("CARGO_BIN_EXE_saga"))
        .args(&args)
        .output()
        .unwrap_or_else(|err| panic!("run saga: {err}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "saga {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn stats_counts_active_sagas_per_type_and_version() {
    let url = shared_server().url();
    let prefix = unique_prefix("cli_stats_versions");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|err| panic!("runtime: {err}"));
    runtime.block_on(async {
        let store = RedisStore::builder()
            .url(&url)
            .key_prefix(&prefix)
            .connect()
            .await
            .unwrap_or_else(|err| panic!("connect {url}: {err}"));
        let empty: Value = serde_json::from_str(&stats(&url, &prefix, true))
            .unwrap_or_else(|err| panic!("stats --json: {err}"));
        assert_eq!(empty["active_by_version"], json!([]), "{empty}");
        saga(&store, "orders", 1, SagaStatus::Running).await;
        saga(&store, "orders", 1, SagaStatus::Running).await;
        saga(&store, "orders", 2, SagaStatus::Compensating).await;
        saga(&store, "orders", 2, SagaStatus::Completed).await;
        saga(&store, "refunds", 7, SagaStatus::Running).await;
        saga(&store, "refunds", 7, SagaStatus::Failed).await;
    });

    let report: Value = serde_json::from_str(&stats(&url, &prefix, true))
        .unwrap_or_else(|err| panic!("stats --json: {err}"));
    assert_eq!(
        report["active_by_version"],
        json!([
            {"saga_type": "orders", "version": 1, "running": 2, "compensating": 0},
            {"saga_type": "orders", "version": 2, "running": 0, "compensating": 1},
            {"saga_type": "refunds", "version": 7, "running": 1, "compensating": 0},
        ]),
        "{report}"
    );

    let text = stats(&url, &prefix, false);
    let table: Vec<Vec<&str>> = text
        .lines()
        .skip_while(|line| !line.starts_with("active sagas by type and version"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        table,
        vec![
            vec!["TYPE", "VERSION", "RUNNING", "COMPENSATING"],
            vec!["orders", "1", "2", "0"],
            vec!["orders", "2", "0", "1"],
            vec!["refunds", "7", "1", "0"],
        ],
        "{text}"
    );
}
