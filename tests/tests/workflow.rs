//! The README's policy workflow ("### The policy workflow") end to end, with real parts: a
//! security team writes a new policy into a copy of the example bundle, formats and tests it
//! as CI does (`arbiter fmt --check`, `arbiter test`), builds, signs and pushes it to a real
//! registry (Debian's `docker-registry` over TLS on 127.0.0.1); the policy server pulls it and
//! verifies it with the team's public key; real Envoy runs the route in dry-run, then the route
//! is enforced. Each step asserts what the upstream (the mock LLM) saw.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use arbiter_e2e::registry::{openssl_key_pair, Registry, TestPki};
use arbiter_e2e::stack::{arbiter_cli, chat_body, PolicyServer, Reply, Stack};
use arbiter_e2e::util::workspace_root;
use reqwest::Method;
use serde_json::{json, Value};

/// The new policy, as a team first writes it (not yet in Cedar's format).
const NEW_POLICY: &str = "// The new `rollout` route is for identified callers only.\n\
@id(\"rollout-identified-callers\")\n\
forbid(principal, action, resource == Arbiter::Route::\"rollout\") unless { principal is Arbiter::Caller };\n";

/// Its test case, beside the example bundle's own.
const NEW_CASES: &str = r#"{
  "description": "the rollout route is for identified callers only",
  "cases": [
    {
      "name": "an anonymous caller is refused on the rollout route",
      "request": {
        "method": "POST", "path": "/v1/chat/completions", "route": "rollout",
        "body": { "model": "gpt-4o-mini", "messages": [] }
      },
      "expect": { "decision": "deny", "policy_ids": ["rollout-identified-callers"] }
    },
    {
      "name": "a caller with an API key may chat on the rollout route",
      "request": {
        "method": "POST", "path": "/v1/chat/completions", "route": "rollout",
        "api_key": "demo-key-acme-batch"
      },
      "expect": { "decision": "allow", "policy_ids": ["routine-chat"] }
    }
  ]
}
"#;

/// The route table entry for the Istio-named route of `tests/envoy/e2e.yaml.tmpl`, as the
/// README writes it: policy sees the route as `rollout`.
fn plugin_config(dry_run: bool) -> String {
    let mut settings = json!({"fail_mode": "closed", "timeout_ms": 5000});
    if dry_run {
        settings["dry_run"] = json!(true);
    }
    json!({
        "policy_cluster": "arbiter_policy",
        "timeout_ms": 5000,
        "routes": [{"name": "rollout", "match": {"route_name": "chat.completions"},
                    "settings": settings}]
    })
    .to_string()
}

const PATH: &str = "/mesh/istio/v1/chat/completions";
const API_KEY: &str = "demo-key-acme-batch";

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// `arbiter ARGS`: its output, after checking the exit code is `code`.
fn arbiter(args: &[&str], code: i32) -> Result<String> {
    let (status, out) = arbiter_cli(args)?;
    ensure!(
        status == code,
        "arbiter {args:?} exited {status}, expected {code}:\n{out}"
    );
    Ok(out)
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

async fn chat(stack: &Stack, api_key: Option<&str>) -> Result<Reply> {
    let mut request = stack.request(Method::POST, PATH).json(&chat_body());
    if let Some(key) = api_key {
        request = request.header("x-api-key", key);
    }
    stack.send(request).await
}

/// The audit records so far, after `arbiter audit verify` accepted the chain.
fn verified_records(server: &PolicyServer) -> Result<Vec<Value>> {
    let (code, out) = server.verify_audit()?;
    ensure!(code == 0, "audit verify: {out}");
    server.audit_records()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_policy_goes_through_ci_a_signed_push_and_dry_run_to_enforcement() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dir = dir.path();
    let policies = dir.join("policies");
    let tests = dir.join("tests");
    let example = workspace_root().join("examples/ai-gateway");
    copy_dir(&example.join("policies"), &policies)?;
    copy_dir(&example.join("tests"), &tests)?;

    // 1. Write the policy and format it: CI's check names the unformatted file until
    //    `arbiter fmt` has formatted it.
    std::fs::write(policies.join("rollout.cedar"), NEW_POLICY)?;
    let out = arbiter(&["fmt", "--check", s(&policies)], 1)?;
    ensure!(out.contains("rollout.cedar"), "{out}");
    arbiter(&["fmt", s(&policies)], 0)?;
    arbiter(&["fmt", "--check", s(&policies)], 0)?;
    ensure!(std::fs::read_to_string(policies.join("rollout.cedar"))? != NEW_POLICY);

    // 2. Test it as CI does: without a case, the new policy is reported unexercised and
    //    `--require-coverage` fails; with its cases, everything passes.
    let junit = dir.join("reports/policy-tests.xml");
    let ci = [
        "test",
        s(&tests),
        "--policies",
        s(&policies),
        "--junit",
        s(&junit),
        "--require-coverage",
    ];
    let out = arbiter(&ci, 1)?;
    ensure!(out.contains("rollout-identified-callers"), "{out}");
    std::fs::write(tests.join("rollout.json"), NEW_CASES)?;
    let out = arbiter(&ci, 0)?;
    ensure!(out.contains(" 0 failed"), "{out}");
    ensure!(std::fs::read_to_string(&junit)?.contains("rollout route"));

    // 3. Build, sign and push it to the registry the servers pull from.
    let (key, public) = openssl_key_pair(dir, "bundle-signing");
    let artifact = dir.join("bundle.tar.gz");
    let out = arbiter(&["bundle", "build", s(&policies), "-o", s(&artifact)], 0)?;
    // `sha256:…  bundle.tar.gz  (N policies, version ai-gateway@sha256:…)`
    let version = out
        .split("version ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .with_context(|| format!("no version in `{out}`"))?
        .to_owned();
    arbiter(&["bundle", "sign", s(&artifact), "--key", s(&key)], 0)?;
    let signature = PathBuf::from(format!("{}.sig", artifact.display()));
    arbiter(
        &["bundle", "verify", s(&artifact), "--public-key", s(&public)],
        0,
    )?;
    let pki = TestPki::new(dir);
    let registry = Registry::start(dir, &pki).await;
    let url = format!("oci://{}/security/policies:prod", registry.addr);
    arbiter(
        &[
            "bundle",
            "push",
            s(&artifact),
            &url,
            "--signature",
            s(&signature),
            "--ca-cert",
            s(&pki.ca),
        ],
        0,
    )?;

    // The server pulls it, verifies the signature with the team's public key, validates it.
    let cache = dir.join("bundle-cache");
    let server = PolicyServer::start_remote(&[
        "--bundle-url".into(),
        url.clone(),
        "--bundle-public-key".into(),
        s(&public).into(),
        "--bundle-cache".into(),
        s(&cache).into(),
        "--bundle-ca-cert".into(),
        s(&pki.ca).into(),
    ])
    .await?;

    // 4. Dry-run on one route: the request the new policy denies goes upstream, marked with
    //    the deny's audit id; the audit record says the deny was not enforced.
    let dry = Stack::builder()
        .policy_target(server.addr())
        .plugin_config(plugin_config(true))
        .start()
        .await?;
    let reply = chat(&dry, None).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));
    let reply = chat(&dry, Some(API_KEY)).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = dry.primary.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0].header("x-arbiter-dry-run"),
        Some("deny"),
        "{seen:?}"
    );
    assert!(!seen[1].has_header("x-arbiter-dry-run"), "{seen:?}");
    let log = dry.envoy.wait_access_log(2).await?;
    assert_eq!(log[0]["arbiter_outcome"], "dry_run_deny", "{log:?}");
    assert_eq!(log[1]["arbiter_outcome"], "allow", "{log:?}");

    let records = verified_records(&server)?;
    assert_eq!(records.len(), 2, "{records:?}");
    let (deny, allow) = (&records[0], &records[1]);
    assert_eq!(deny["decision"], "deny", "{deny}");
    assert_eq!(deny["dry_run"], true, "{deny}");
    assert_eq!(deny["route"], "rollout", "{deny}");
    assert_eq!(deny["policy_ids"], json!(["rollout-identified-callers"]));
    assert_eq!(deny["policy_version"], version.as_str(), "{deny}");
    assert_eq!(seen[0].header("x-arbiter-audit-id"), deny["id"].as_str());
    // Every decision on the route is marked dry-run; only a deny's marking changes anything.
    assert_eq!(allow["decision"], "allow", "{allow}");
    assert_eq!(allow["dry_run"], true, "{allow}");

    // Before enforcing: replaying the route's dry-run decisions with the bundle shows the
    // same deny, named as not enforced.
    let files = server.audit_files()?;
    let mut replay = vec!["audit", "replay", "--dry-run", "--policies", s(&policies)];
    replay.extend(files.iter().map(|f| s(f)));
    let out = arbiter(&replay, 0)?;
    ensure!(out.contains("on dry-run routes: 2 (1 denies"), "{out}");
    drop(dry);

    // 5. Enforce: the same entry without `dry_run` (a new Envoy configuration). The same
    //    request is refused and the upstream sees nothing of it; identified callers pass.
    let enforced = Stack::builder()
        .policy_target(server.addr())
        .plugin_config(plugin_config(false))
        .start()
        .await?;
    let reply = chat(&enforced, None).await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(reply.text().contains("policy_denied"), "{}", reply.text());
    assert_eq!(enforced.upstream_requests(), 0);
    let reply = chat(&enforced, Some(API_KEY)).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = enforced.primary.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(!seen[0].has_header("x-arbiter-dry-run"), "{seen:?}");
    assert_eq!(enforced.upstream_requests(), 1);
    let log = enforced.envoy.wait_access_log(2).await?;
    assert_eq!(log[0]["arbiter_outcome"], "deny", "{log:?}");

    let records = verified_records(&server)?;
    assert_eq!(records.len(), 4, "{records:?}");
    assert_eq!(records[2]["decision"], "deny", "{}", records[2]);
    assert!(records[2].get("dry_run").is_none(), "{}", records[2]);
    assert_eq!(
        records[2]["policy_ids"],
        json!(["rollout-identified-callers"])
    );
    drop(registry);
    Ok(())
}
