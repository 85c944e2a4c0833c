//! Policy cases as data: every `tests/fixtures/*.json` is one request decided with one
//! bundle, through the same `CheckRequest` boundary and engine the server uses, and compared
//! with the expected decision, determining policies and principal.
//!
//! Fixture format (unknown fields are refused):
//! ```json
//! { "description": "…",
//!   "bundle": "examples/ai-gateway/policies",      // relative to the workspace root
//!   "request": { …see `RequestSpec`… },
//!   "expect": { "decision": "deny", "policy_ids": ["…"],
//!               "principal": "…", "identity_source": "…" } }   // last two optional
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arbiter_policy_server::cli::policy::{check_with, RequestSpec};
use arbiter_policy_server::Bundle;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    description: String,
    bundle: PathBuf,
    request: RequestSpec,
    expect: Expect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    decision: Decision,
    policy_ids: Vec<String>,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    identity_source: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Decision {
    Allow,
    Deny,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_fixture_decides_as_expected() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 20,
        "only {} fixtures in {}",
        paths.len(),
        dir.display()
    );

    let mut bundles: HashMap<PathBuf, Bundle> = HashMap::new();
    let mut failures = Vec::new();
    for path in &paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let fixture: Fixture = match serde_json::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                failures.push(format!("{name}: invalid fixture: {e}"));
                continue;
            }
        };
        let bundle = bundles.entry(fixture.bundle.clone()).or_insert_with(|| {
            Bundle::load(&workspace().join(&fixture.bundle))
                .unwrap_or_else(|e| panic!("{name}: bundle `{}`: {e}", fixture.bundle.display()))
        });
        let report = match check_with(bundle, &fixture.request) {
            Ok(report) => report,
            Err(e) => {
                failures.push(format!("{name}: cannot decide: {e}"));
                continue;
            }
        };
        let d = &report.decision;
        let got = if d.allowed {
            Decision::Allow
        } else {
            Decision::Deny
        };
        let mut problems = Vec::new();
        if got != fixture.expect.decision {
            problems.push(format!(
                "decision {got:?}, expected {:?}",
                fixture.expect.decision
            ));
        }
        if d.policy_ids != fixture.expect.policy_ids {
            problems.push(format!(
                "policy_ids {:?}, expected {:?}",
                d.policy_ids, fixture.expect.policy_ids
            ));
        }
        if let Some(principal) = &fixture.expect.principal {
            if &d.principal != principal {
                problems.push(format!(
                    "principal `{}`, expected `{principal}`",
                    d.principal
                ));
            }
        }
        if let Some(source) = &fixture.expect.identity_source {
            if d.identity_source.as_str() != source {
                problems.push(format!(
                    "identity_source `{}`, expected `{source}`",
                    d.identity_source.as_str()
                ));
            }
        }
        if !d.errors.is_empty() {
            problems.push(format!("policies errored: {:?}", d.errors));
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{name} ({}): {}\n    {}",
                fixture.description,
                problems.join("; "),
                report.to_text().replace('\n', "\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        paths.len(),
        failures.join("\n")
    );
}
