//! The `arbiter` binary as a security team's CI runs it: exit codes and messages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Output};

use common::example_bundle;

const ARBITER: &str = env!("CARGO_BIN_EXE_arbiter");

fn arbiter(args: &[&str]) -> Output {
    Command::new(ARBITER).args(args).output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn validate_accepts_the_example_and_names_each_problem() {
    let example = example_bundle();
    let output = arbiter(&["validate", example.to_str().unwrap()]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("9 policies, 11 entities, version ai-gateway@sha256:"),
        "{}",
        text(&output)
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.cedar"),
        "permit(principal, action, resource)\n  when { context.modle == \"gpt-4o\" };\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.cedar"),
        "\n\nforbid(principal action, resource);\n",
    )
    .unwrap();
    let output = arbiter(&["validate", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("b.cedar:3:")),
        "{stderr}"
    );
    assert!(stderr.ends_with("is not a valid bundle\n"), "{stderr}");

    std::fs::remove_file(dir.path().join("b.cedar")).unwrap();
    let output = arbiter(&["validate", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.starts_with("a.cedar:2:") && stderr.contains("modle"),
        "{stderr}"
    );
}

#[test]
fn check_prints_decision_policies_and_reason() {
    let example = example_bundle();
    let dir = example.to_str().unwrap();
    let output = arbiter(&[
        "check",
        dir,
        "--method",
        "POST",
        "--path",
        "/regulated/v1/chat/completions",
        "--route",
        "regulated_chat",
        "--context",
        "classification=regulated",
        "--api-key",
        "demo-key-globex-intern",
        "--expect",
        "deny",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let out = text(&output);
    assert!(out.starts_with("deny\n"), "{out}");
    assert!(
        out.contains("denied by policy `regulated-requires-approval`"),
        "{out}"
    );
    assert!(
        out.contains("regulated-requires-approval (regulated.cedar:"),
        "{out}"
    );
    assert!(out.contains("globex-intern (identity: api_key)"), "{out}");
    assert!(
        !out.contains("demo-key-globex-intern"),
        "the key leaked: {out}"
    );

    // --expect turns the decision into the exit code.
    let output = arbiter(&[
        "check",
        dir,
        "--method",
        "POST",
        "--path",
        "/v1/chat/completions",
        "--route",
        "chat",
        "--expect",
        "deny",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));

    // JSON request file, JSON output.
    let files = tempfile::tempdir().unwrap();
    let request = files.path().join("request.json");
    std::fs::write(
        &request,
        r#"{"path": "/v1/chat/completions", "route": "chat",
            "jwt_claims": {"iss": "https://idp", "sub": "amy", "groups": ["premium-models"]},
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "secret prompt"}]}}"#,
    )
    .unwrap();
    let output = arbiter(&[
        "check",
        dir,
        "--request",
        request.to_str().unwrap(),
        "--json",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["decision"], "allow");
    assert_eq!(json["policy_ids"], serde_json::json!(["routine-chat"]));
    assert_eq!(json["principal"], "https://idp#amy");
    assert_eq!(json["model"], "gpt-4o");
    assert!(!text(&output).contains("secret prompt"));

    // --body FILE
    let body = files.path().join("body.json");
    std::fs::write(&body, r#"{"model":"o3-mini","messages":[]}"#).unwrap();
    let output = arbiter(&[
        "check",
        dir,
        "--path",
        "/v1/chat/completions",
        "--route",
        "chat",
        "--body",
        body.to_str().unwrap(),
        "--expect",
        "deny",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("model-allow-list"));
}

#[test]
fn check_reports_bad_input_with_exit_code_2() {
    let example = example_bundle();
    let dir = example.to_str().unwrap();
    let files = tempfile::tempdir().unwrap();
    let request = files.path().join("request.json");
    std::fs::write(&request, r#"{"path": "/", "principle": "x"}"#).unwrap();
    let output = arbiter(&["check", dir, "--request", request.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output).contains("unknown field `principle`"),
        "{}",
        text(&output)
    );

    let output = arbiter(&["check", dir, "--path", "/", "--jwt-claims", "[1]"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output).contains("`--jwt-claims` must be a JSON object"));

    let output = arbiter(&["check", "/nonexistent-bundle", "--path", "/"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output).contains("cannot read bundle directory"),
        "{}",
        text(&output)
    );
}

#[test]
fn schema_prints_the_built_in_schema() {
    let output = arbiter(&["schema"]);
    assert!(output.status.success());
    let schema = String::from_utf8(output.stdout).unwrap();
    assert!(schema.contains("namespace Arbiter"));
    assert!(schema.contains("type RequestContext"));
}
