//! The shipped alert rules and dashboard parse as Prometheus rules / PromQL, and every
//! metric they name is one a real Envoy running the real filter exports.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use anyhow::Result;
use arbiter_e2e::stack::Stack;
use serde::Deserialize;

const ALERTS: &str = "examples/observability/arbiter-alerts.yaml";
const DASHBOARD: &str = "examples/observability/arbiter-dashboard.json";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<Group>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
    annotations: std::collections::BTreeMap<String, String>,
}

/// Metric names in a PromQL expression that belong to Arbiter.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("arbiter_") {
                names.insert(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    names
}

fn expressions() -> Result<Vec<(String, String)>> {
    let root = arbiter_e2e::workspace_root();
    let rules: RuleFile = serde_yaml::from_str(&std::fs::read_to_string(root.join(ALERTS))?)?;
    let mut out = Vec::new();
    for group in &rules.groups {
        assert!(!group.name.is_empty());
        for rule in &group.rules {
            assert!(
                ["page", "ticket"].contains(&rule.labels["severity"].as_str()),
                "{}",
                rule.alert
            );
            assert!(!rule.annotations["summary"].is_empty(), "{}", rule.alert);
            if let Some(f) = &rule.for_ {
                promql_parser::util::parse_duration(f).unwrap();
            }
            out.push((rule.alert.clone(), rule.expr.clone()));
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join(DASHBOARD))?)?;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            out.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    Ok(out)
}

#[test]
fn alert_rules_and_dashboard_are_valid_promql() -> Result<()> {
    let exprs = expressions()?;
    assert!(exprs.len() >= 10);
    for (name, expr) in &exprs {
        if let Err(e) = promql_parser::parser::parse(expr) {
            panic!("{name}: `{expr}` does not parse: {e}");
        }
        assert!(
            !metric_names(expr).is_empty(),
            "{name} names no Arbiter metric"
        );
    }
    Ok(())
}

/// Series names of a Prometheus text exposition, including the ones a labelled family will
/// have once it is observed (`# TYPE` lines: counters get `_total`, histograms their parts).
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                match kind {
                    "counter" => {
                        names.insert(format!("{name}_total"));
                    }
                    "histogram" => {
                        for suffix in ["_bucket", "_sum", "_count"] {
                            names.insert(format!("{name}{suffix}"));
                        }
                    }
                    _ => {}
                }
                names.insert(name.to_owned());
            }
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next() {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_they_name_is_exported_by_envoy_or_the_policy_server() -> Result<()> {
    let stack = Stack::builder().start().await?;
    assert_eq!(stack.chat("/v1/chat/completions").await?.status, 200);
    let mut exported = exported_names(&stack.envoy.admin_get("/stats/prometheus").await?);
    let metrics_addr = stack
        .policy
        .as_ref()
        .and_then(|p| p.metrics_addr())
        .expect("the harness starts the server with --metrics-listen");
    let server = arbiter_e2e::stack::client()?
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    exported.extend(exported_names(&server));
    for (name, expr) in expressions()? {
        for metric in metric_names(&expr) {
            assert!(
                exported.contains(&metric),
                "{name}: nothing exports `{metric}`"
            );
        }
    }
    Ok(())
}
