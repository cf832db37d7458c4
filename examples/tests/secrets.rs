//! No secret on any output: every binary of the example, asked for `--help` or failing to
//! reach Redis, with a password in its environment or in a URL file, never prints it.
//! (Issue 8, item 3; `saga --help` is checked in saga-cli's own tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

const SECRET: &str = "s3cr3t-Pa55w0rd-never-printed";

/// A command line and the environment it runs with.
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);

fn binaries() -> [(&'static str, &'static str); 3] {
    [
        ("deal-flow", env!("CARGO_BIN_EXE_deal-flow")),
        (
            "deal-flow-coordinator",
            env!("CARGO_BIN_EXE_deal-flow-coordinator"),
        ),
        ("deal-flow-load", env!("CARGO_BIN_EXE_deal-flow-load")),
    ]
}

/// A URL nobody listens on (port 1), with the secret as its password.
fn secret_url() -> String {
    format!("redis://app:{SECRET}@127.0.0.1:1")
}

fn run(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(bin);
    command.args(args);
    command
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_URLS");
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn help_never_shows_a_password_from_the_environment() {
    let url = secret_url();
    for (name, bin) in binaries() {
        let (ok, text) = run(
            bin,
            &["--help"],
            &[
                ("REDIS_URL", url.as_str()),
                ("REDIS_URL_FILE", "/nonexistent"),
            ],
        );
        assert!(ok, "{name} --help failed: {text}");
        assert!(
            text.contains("REDIS_URL"),
            "{name} --help names its variables: {text}"
        );
        assert!(
            !text.contains(SECRET),
            "{name} --help printed the password:\n{text}"
        );
    }
}

#[test]
fn a_store_that_cannot_be_reached_is_reported_without_the_password() {
    let url = secret_url();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("redis-url");
    std::fs::write(&file, format!("{url}\n")).unwrap();
    let file = file.to_str().unwrap().to_owned();
    for (name, bin) in binaries() {
        let mut cases: Vec<Case<'_>> = vec![(Vec::new(), vec![("REDIS_URL", url.as_str())])];
        if name != "deal-flow" {
            cases.push((vec!["--redis-url-file", file.as_str()], Vec::new()));
        }
        for (mut args, envs) in cases {
            if name == "deal-flow-coordinator" {
                args.extend(["--http-addr", "off"]);
            }
            if name == "deal-flow-load" {
                args.extend(["--count", "1"]);
            }
            let (ok, text) = run(bin, &args, &envs);
            assert!(
                !ok,
                "{name} {args:?} reached a store that does not exist: {text}"
            );
            assert!(
                !text.contains(SECRET),
                "{name} {args:?} printed the password:\n{text}"
            );
        }
    }
}

#[test]
fn an_unreadable_url_file_is_a_clear_error() {
    for (name, bin) in binaries().into_iter().skip(1) {
        let mut args = vec!["--redis-url-file", "/nonexistent/redis-url"];
        if name == "deal-flow-coordinator" {
            // Without API tokens the coordinator refuses its HTTP settings first.
            args.extend(["--http-addr", "off"]);
        }
        let (ok, text) = run(bin, &args, &[]);
        assert!(!ok);
        assert!(
            text.contains("cannot read the Redis URL from /nonexistent/redis-url"),
            "{name}: {text}"
        );
    }
}
