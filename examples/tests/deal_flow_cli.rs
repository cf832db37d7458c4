//! Runs the `deal-flow` binary as a user would and checks what it prints and its exit status.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_deal-flow"))
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run deal-flow: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.code().is_some(),
        "deal-flow {args:?} was killed by a signal\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (output.status.success(), stdout)
}

fn totals_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|line| line.trim_start().starts_with("sagas "))
        .unwrap_or_else(|| panic!("no totals line in:\n{stdout}"))
}

fn count(totals: &str, label: &str) -> u64 {
    let after = totals
        .split(label)
        .nth(1)
        .unwrap_or_else(|| panic!("no `{label}` in `{totals}`"));
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after `{label}` in `{totals}`"))
}

#[test]
fn default_run_shows_retries_and_a_compensation_and_passes_the_ledger_check() {
    let (ok, stdout) = run(&[]);
    assert!(ok, "default run failed:\n{stdout}");
    let totals = totals_line(&stdout);
    assert!(count(totals, "completed") >= 1, "{totals}");
    assert!(count(totals, "compensated") >= 1, "{totals}");
    assert!(count(totals, "retries") >= 1, "{totals}");
    assert!(count(totals, "idempotency hits") >= 1, "{totals}");
    assert!(stdout.contains("Ledger check: OK"), "{stdout}");
    // The compensated deal undoes its steps newest first.
    let undone: Vec<&str> = stdout
        .lines()
        .filter(|line| {
            line.contains("undone (compensation") || line.contains("undone: its reconciliation")
        })
        .map(|line| line.split_whitespace().nth(2).unwrap_or_default())
        .collect();
    assert_eq!(
        undone,
        ["notify_committee", "update_portfolio", "create_deal"],
        "{stdout}"
    );
}

#[test]
fn a_crash_mid_run_is_resumed_from_the_journal_without_double_effects() {
    let (ok, stdout) = run(&["--crash-after", "9", "--timelines", "none"]);
    assert!(ok, "crash run failed:\n{stdout}");
    assert!(stdout.contains("with one crash and restart"), "{stdout}");
    let totals = totals_line(&stdout);
    assert!(count(totals, "resumes") >= 1, "{totals}");
    assert!(stdout.contains("Ledger check: OK"), "{stdout}");
}

#[test]
fn a_forced_permanent_failure_compensates_every_deal() {
    let (ok, stdout) = run(&["--fail-at", "notify_committee", "--timelines", "none"]);
    assert!(ok, "forced failure run failed:\n{stdout}");
    let totals = totals_line(&stdout);
    assert!(count(totals, "compensated") >= 2, "{totals}");
    assert!(stdout.contains("Ledger check: OK"), "{stdout}");
}

#[test]
fn many_companies_under_heavy_faults_still_pass_the_ledger_check() {
    let (ok, stdout) = run(&[
        "--companies",
        "120",
        "--fault-rate",
        "0.5",
        "--seed",
        "11",
        "--timelines",
        "none",
    ]);
    assert!(ok, "heavy run failed:\n{stdout}");
    assert!(stdout.contains("Ledger check: OK"), "{stdout}");
}

#[test]
fn bad_flags_get_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_deal-flow"))
        .args(["--fault-rate", "1.5"])
        .output()
        .unwrap_or_else(|err| panic!("cannot run deal-flow: {err}"));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not between 0 and 1"), "{stderr}");
}
