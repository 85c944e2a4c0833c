//! The shipped alert rules and dashboard parse as Prometheus rules / PromQL, and every
//! metric they name is one a real Envoy running the real filter exports; each request
//! outcome moves exactly its own counters.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use arbiter_e2e::fault::Fault;
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

/// Metric names in a PromQL expression that belong to Arbiter or to Envoy (`envoy_*`: the
/// provider alerts use the `llm` cluster's own counters). Label matchers (`{...}`) are
/// skipped: `envoy_cluster_name` is a label, not a metric.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut in_matchers = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if !in_matchers && (word.starts_with("arbiter_") || word.starts_with("envoy_")) {
                names.insert(std::mem::take(&mut word));
            }
            word.clear();
            match c {
                '{' => in_matchers = true,
                '}' => in_matchers = false,
                _ => {}
            }
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
            "{name} names no Arbiter or Envoy metric"
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

/// Arbiter's counters in Envoy (`wasmcustom.arbiter.*`, without the prefix).
async fn filter_counters(stack: &Stack) -> Result<BTreeMap<String, u64>> {
    Ok(stack
        .stats()
        .await?
        .into_iter()
        .filter_map(|(name, value)| {
            name.strip_prefix("wasmcustom.arbiter.")
                .map(|n| (n.to_owned(), value))
        })
        .collect())
}

/// The server's `arbiter_decisions_total` samples by `decision` label.
async fn server_decisions(stack: &Stack) -> Result<BTreeMap<String, u64>> {
    let metrics_addr = stack
        .policy
        .as_ref()
        .and_then(|p| p.metrics_addr())
        .context("the harness starts the server with --metrics-listen")?;
    let text = arbiter_e2e::stack::client()?
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter_map(|line| line.strip_prefix("arbiter_decisions_total{decision=\""))
        .filter_map(|rest| {
            let (label, value) = rest.split_once("\"} ")?;
            Some((label.to_owned(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect())
}

/// What moved between two snapshots (counters that did not move are left out).
fn moved(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(name, value)| {
            let delta = value - before.get(name).copied().unwrap_or(0);
            (delta > 0).then(|| (name.clone(), delta))
        })
        .collect()
}

/// Counters and how much they move.
type Moves = &'static [(&'static str, u64)];
/// What a request is, its path, its status, and what it moves in Envoy and on the server.
type Step = (&'static str, &'static str, u16, Moves, Moves);
/// The same for requests the server does not answer (nothing moves there).
type Unanswered = (&'static str, &'static str, u16, Moves);

/// Each request outcome moves exactly its own counters, in Envoy and on the server, and
/// nothing else: a dashboard or alert built on them counts what it says.
#[tokio::test(flavor = "multi_thread")]
async fn each_outcome_moves_exactly_its_counters() -> Result<()> {
    // One worker, so one breaker (per worker VM); three failures open it for a minute.
    let stack = Stack::builder()
        .concurrency(1)
        .plugin_config(
            r#"{"policy_cluster":"arbiter_policy","timeout_ms":2000,"breaker_threshold":3,"breaker_cooldown_ms":60000}"#,
        )
        .start()
        .await?;
    let steps: [Step; 6] = [
        (
            "allow",
            "/t/closed/v1/chat/completions",
            200,
            &[("checks.allow", 1)],
            &[("allow", 1)],
        ),
        (
            "deny",
            "/t/regulated/v1/chat/completions",
            403,
            &[("checks.deny", 1)],
            &[("deny", 1)],
        ),
        (
            "disabled",
            "/t/disabled/v1/chat/completions",
            200,
            &[("checks.disabled", 1)],
            &[],
        ),
        (
            "first on a cached route",
            "/t/cached/v1/chat/completions",
            200,
            &[
                ("checks.allow", 1),
                ("cache.misses", 1),
                ("cache.stores", 1),
            ],
            &[("allow", 1)],
        ),
        (
            "cached",
            "/t/cached/v1/chat/completions",
            200,
            &[("checks.cached", 1)],
            &[],
        ),
        (
            "invalid route metadata (checked as closed)",
            "/t/bad-mode/v1/chat/completions",
            200,
            &[("checks.allow", 1), ("checks.invalid_route_config", 1)],
            &[("allow", 1)],
        ),
    ];
    for (what, path, status, filter_expected, server_expected) in steps {
        let (filter_before, server_before) = (
            filter_counters(&stack).await?,
            server_decisions(&stack).await?,
        );
        let reply = stack.chat(path).await?;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert_eq!(
            moved(&filter_before, &filter_counters(&stack).await?),
            filter_expected
                .iter()
                .map(|(n, v)| ((*n).to_owned(), *v))
                .collect::<BTreeMap<_, _>>(),
            "{what}: Envoy counters"
        );
        assert_eq!(
            moved(&server_before, &server_decisions(&stack).await?),
            server_expected
                .iter()
                .map(|(n, v)| ((*n).to_owned(), *v))
                .collect::<BTreeMap<_, _>>(),
            "{what}: server decisions"
        );
    }

    // The policy server stops answering (connections refused): no decision.
    stack.fault.set(Fault::Refuse).await?;
    let unanswered: [Unanswered; 4] = [
        (
            "fail closed",
            "/t/closed/v1/chat/completions",
            503,
            &[("checks.fail_closed", 1), ("no_decision.unreachable", 1)],
        ),
        (
            "fail open",
            "/t/open/v1/chat/completions",
            200,
            &[("checks.fail_open", 1), ("no_decision.unreachable", 1)],
        ),
        (
            "override (the third failure opens the breaker)",
            "/t/override-active/v1/chat/completions",
            200,
            &[
                ("checks.fail_open", 1),
                ("checks.override", 1),
                ("override_active_requests", 1),
                ("no_decision.unreachable", 1),
                ("breaker.opened", 1),
            ],
        ),
        (
            "breaker open",
            "/t/closed/v1/chat/completions",
            503,
            &[("checks.fail_closed", 1), ("no_decision.breaker_open", 1)],
        ),
    ];
    for (what, path, status, filter_expected) in unanswered {
        let before = filter_counters(&stack).await?;
        let reply = stack.chat(path).await?;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        assert_eq!(
            moved(&before, &filter_counters(&stack).await?),
            filter_expected
                .iter()
                .map(|(n, v)| ((*n).to_owned(), *v))
                .collect::<BTreeMap<_, _>>(),
            "{what}: Envoy counters"
        );
    }
    Ok(())
}
