//! The nemesis harness end to end: the `saga-chaos` binary against its own redis-servers
//! and coordinator processes, with a fixed seed (every default fault kind scheduled), a
//! random seed (printed, with the command that reproduces it) and a cluster run. Each run
//! must exit 0 (every invariant holds) and show every fault of its schedule fired.
//!
//! A fourth run turns Redis persistence off, so that a restart loses acknowledged sagas:
//! it must fail, which shows the checks can.
//!
//! Cost: about 50 s + 35 s + 25 s + 10 s on two cores in a debug build; the runs take
//! turns so that they do not starve each other's coordinators.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;

use saga_redis_testkit::can_spawn_servers;

/// One run at a time: each starts Redis and three coordinators of its own.
static TURN: Mutex<()> = Mutex::new(());

/// The default fault kinds of a standalone run.
const STANDALONE_KINDS: [&str; 10] = [
    "kill",
    "pause",
    "redis-restart",
    "client-pause",
    "maxmemory",
    "script-flush",
    "proxy-latency",
    "proxy-reset",
    "proxy-blackhole",
    "proxy-drop-replies",
];

/// Runs `saga-chaos <args> --report json`; returns its report after checking the exit
/// status and that every scheduled fault kind fired.
fn run(args: &[&str]) -> serde_json::Value {
    let report = run_expecting(args, 0);
    assert_eq!(report["pass"], true);
    assert_eq!(
        report["counts"]["acknowledged"], report["counts"]["submitted"],
        "a start failed for good: {}",
        report["load"]
    );
    report
}

/// Runs `saga-chaos <args> --report json` and checks its exit status is `code` and that
/// every scheduled fault kind fired.
fn run_expecting(args: &[&str], code: i32) -> serde_json::Value {
    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let output = Command::new(env!("CARGO_BIN_EXE_saga-chaos"))
        .args(args)
        .args(["--report", "json"])
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_URLS")
        .output()
        .expect("saga-chaos runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("saga-chaos {}\n{stderr}", args.join(" "));
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
        panic!(
            "no JSON report ({err}); exit {}; stdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        )
    });
    println!(
        "counts: {}\nfence lines: {}",
        report["counts"], report["fence_lines"]
    );
    assert_eq!(
        output.status.code(),
        Some(code),
        "saga-chaos exited {}; reproduce with `{}`; invariants: {:#}",
        output.status,
        report["reproduce"].as_str().unwrap_or_default(),
        report["invariants"]
    );
    let scheduled: BTreeSet<&str> = report["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    for kind in &scheduled {
        let fired = report["fired_by_kind"][*kind].as_u64().unwrap_or(0);
        assert!(
            fired >= 1,
            "{kind} was scheduled but never seen firing: {:#}",
            report["faults"]
        );
    }
    // Sagas really ran through the faults.
    assert!(report["counts"]["acknowledged"].as_u64().unwrap() > 0);
    report
}

fn kinds_of(report: &serde_json::Value) -> BTreeSet<String> {
    report["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_fixed_seed_fires_every_fault_kind_and_every_invariant_holds() {
    if !can_spawn_servers("a_fixed_seed_fires_every_fault_kind_and_every_invariant_holds") {
        return;
    }
    let report = run(&["--seed", "11", "--seconds", "30", "--coordinators", "3"]);
    let kinds = kinds_of(&report);
    for kind in STANDALONE_KINDS {
        assert!(kinds.contains(kind), "{kind} not scheduled: {kinds:?}");
    }
}

#[test]
fn a_random_seed_holds_every_invariant() {
    if !can_spawn_servers("a_random_seed_holds_every_invariant") {
        return;
    }
    let seed = std::collections::hash_map::RandomState::new();
    let seed = std::hash::BuildHasher::hash_one(&seed, std::process::id());
    println!(
        "random seed {seed}: reproduce with `cargo run -p saga-chaos -- --seed {seed} --seconds 30 --coordinators 3`"
    );
    let seed = seed.to_string();
    let report = run(&["--seed", &seed, "--seconds", "30", "--coordinators", "3"]);
    // 30 s leaves room for every kind (0.5 s each): the generator schedules them all.
    let kinds = kinds_of(&report);
    for kind in STANDALONE_KINDS {
        assert!(kinds.contains(kind), "{kind} not scheduled: {kinds:?}");
    }
}

#[test]
fn a_cluster_run_holds_every_invariant() {
    if !can_spawn_servers("a_cluster_run_holds_every_invariant") {
        return;
    }
    let report = run(&["--seed", "5", "--seconds", "20", "--cluster"]);
    let kinds = kinds_of(&report);
    for kind in [
        "kill",
        "pause",
        "client-pause",
        "maxmemory",
        "script-flush",
        "failover",
    ] {
        assert!(kinds.contains(kind), "{kind} not scheduled: {kinds:?}");
    }
    assert_eq!(report["mode"], "cluster");
}

/// The checker checked: with persistence off, a Redis restart loses acknowledged sagas, and
/// the run must say so (exit 1, the lost sagas named, the command to reproduce printed).
#[test]
fn losing_acknowledged_sagas_is_reported_as_a_violation() {
    if !can_spawn_servers("losing_acknowledged_sagas_is_reported_as_a_violation") {
        return;
    }
    let report = run_expecting(
        &[
            "--seed",
            "4",
            "--seconds",
            "6",
            "--faults",
            "redis-restart",
            "--redis-fsync",
            "off",
            "--quiesce",
            "3s",
        ],
        1,
    );
    assert_eq!(report["pass"], false);
    let verdict = report["invariants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "acknowledged sagas terminal")
        .unwrap();
    assert_eq!(verdict["pass"], false, "{verdict}");
    assert!(
        verdict["details"][0]
            .as_str()
            .unwrap()
            .contains("is not in the store"),
        "{verdict}"
    );
    assert!(
        report["reproduce"]
            .as_str()
            .unwrap()
            .contains("--seed 4 --seconds 6"),
        "{}",
        report["reproduce"]
    );
}
