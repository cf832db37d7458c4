//! `saga token new`: a token and the line that configures it, without any Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn saga(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_saga"))
        .env_remove("REDIS_URL")
        .env_remove("REDIS_URL_FILE")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_new_token_authenticates_with_its_own_config_line_only() {
    let out = saga(&["token", "new", "intake", "--scopes", "start,read"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let token = lines.next().unwrap();
    let line = lines.next().unwrap().strip_prefix("# config: ").unwrap();
    assert!(
        token.starts_with("saga_") && token.len() == 5 + 64,
        "{token}"
    );
    assert!(line.starts_with("intake read,start sha256:"), "{line}");
    assert!(
        !line.contains(token),
        "the config line holds the hash, not the token"
    );
    // The whole output is a valid token file (the token line aside, it is a comment).
    let tokens = saga_http::ApiTokens::parse(line).unwrap();
    let principal = tokens.authenticate(token).unwrap();
    assert_eq!(principal.name(), "intake");
    assert!(principal.may(saga_http::Scope::Start) && !principal.may(saga_http::Scope::Operate));

    // Two runs, two tokens.
    let again = saga(&["--json", "token", "new", "intake", "--scopes", "start,read"]);
    let json: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_ne!(json["token"], token);
    assert_eq!(json["principal"], "intake");
    assert_eq!(json["scopes"], serde_json::json!(["read", "start"]));
}

#[test]
fn bad_names_and_scopes_are_one_clear_line() {
    for (args, expected) in [
        (
            &["token", "new", "in/take", "--scopes", "read"][..],
            "principal name",
        ),
        (
            &["token", "new", "intake", "--scopes", "write"][..],
            "unknown scope `write`",
        ),
        (
            &["token", "new", "intake", "--scopes", ","][..],
            "no scopes",
        ),
    ] {
        let out = saga(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
