//! The route table end to end: routes without arbiter metadata, named the way Istio and
//! Envoy Gateway generate them, get their settings from the plugin configuration's route
//! table. Real Envoy, the real wasm filter, the real policy server (or none, for the fail
//! modes). Each test asserts what the upstream (the mock LLM) saw.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use anyhow::Result;
use arbiter_e2e::envoy::{self, Envoy};
use arbiter_e2e::stack::{chat_body, default_vars, yaml_single_quoted, Reply, Stack, E2E_TEMPLATE};
use reqwest::Method;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

fn counter(stats: &HashMap<String, u64>, name: &str) -> u64 {
    stats
        .get(&format!("wasmcustom.arbiter.{name}"))
        .copied()
        .unwrap_or(0)
}

fn in_hours(hours: i64) -> String {
    (OffsetDateTime::now_utc() + time::Duration::hours(hours))
        .format(&Rfc3339)
        .unwrap()
}

/// The table a platform team would write for the mesh routes of `tests/envoy/e2e.yaml.tmpl`.
fn table() -> Value {
    json!({
        "policy_cluster": "arbiter_policy",
        "timeout_ms": 200,
        // Every failure is its own (unreachable), not the breaker's, in these tests.
        "breaker_threshold": 0,
        "routes": [
            // Policy sees `regulated`: the example bundle refuses anonymous callers there.
            {"name": "regulated",
             "match": {"route_name": "chat.completions", "path_prefix": "/mesh/istio/regulated/"},
             "settings": {"fail_mode": "closed", "context": {"classification": "regulated"}}},
            {"name": "chat",
             "match": {"route_name": "chat.completions", "method": "POST"},
             "settings": {"fail_mode": "closed", "timeout_ms": 200}},
            {"name": "embeddings",
             "match": {"route_name": "httproute/llm/embeddings/*", "authority": "*.example.com"},
             "settings": {"fail_mode": "open", "timeout_ms": 200}},
            {"name": "health",
             "match": {"route_name": "ops.health", "method": "GET"},
             "settings": {"disabled": true}},
            {"name": "incident",
             "match": {"path_prefix": "/mesh/override/"},
             "settings": {"fail_mode": "closed", "fail_open_until": in_hours(1)}},
            {"name": "order-open",
             "match": {"path_prefix": "/mesh/order/"},
             "settings": {"fail_mode": "open"}},
            {"name": "order-closed",
             "match": {"route_name": "order.both"},
             "settings": {"fail_mode": "closed"}},
            // Loses to the route's own metadata (closed).
            {"name": "meta-loser",
             "match": {"route_name": "t_mesh_meta"},
             "settings": {"fail_mode": "open"}},
        ]
    })
}

fn assert_closed(reply: &Reply, route: &str) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    let body = reply.json().unwrap();
    assert_eq!(body["error"]["type"], "policy_unavailable", "{body}");
    assert_eq!(body["error"]["route"], route, "{body}");
}

async fn post(stack: &Stack, path: &str, host: Option<&str>) -> Result<Reply> {
    let mut request = stack.request(Method::POST, path).json(&chat_body());
    if let Some(host) = host {
        request = request.header("host", host);
    }
    stack.send(request).await
}

/// The access-log line of the request the upstream did or did not see, by Envoy route name.
async fn log_lines(envoy: &Envoy, n: usize) -> Result<Vec<Value>> {
    envoy.wait_access_log(n).await
}

#[tokio::test(flavor = "multi_thread")]
async fn table_fail_modes_override_disabled_and_precedence_with_the_server_down() -> Result<()> {
    let stack = Stack::builder()
        .policy_server(false)
        .plugin_config(table().to_string())
        .start()
        .await?;

    // Istio-named route, table entry `chat`: closed. Nothing reaches the provider.
    let reply = post(&stack, "/mesh/istio/v1/chat/completions", None).await?;
    assert_closed(&reply, "chat");
    assert_eq!(stack.upstream_requests(), 0);

    // Envoy Gateway-named route, entry `embeddings` (authority *.example.com): open.
    let reply = post(&stack, "/mesh/eg/v1/embeddings", Some("api.example.com")).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = stack.primary.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-arbiter-fail-open"), Some("unreachable"));
    assert_eq!(seen[0].path, "/mesh/eg/v1/embeddings");

    // Same route, another authority: no entry matches, so the plugin default (closed)
    // applies under Envoy's route name.
    let reply = post(&stack, "/mesh/eg/v1/embeddings", Some("api.other.org")).await?;
    assert_closed(
        &reply,
        "httproute/llm/embeddings/rule/0/match/0/api_example_com",
    );
    assert_eq!(stack.upstream_requests(), 1);

    // `incident`: closed, but fail_open_until is an hour ahead: let through, an override.
    let reply = post(&stack, "/mesh/override/v1/chat/completions", None).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = stack.primary.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("x-arbiter-fail-open"), Some("unreachable"));

    // `health`: disabled for GET; the provider sees it unmarked. POST matches no entry:
    // closed by default.
    let reply = stack.get("/mesh/health").await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = stack.primary.requests();
    assert_eq!(seen.len(), 3);
    assert!(!seen[2].has_header("x-arbiter-fail-open"));
    let reply = post(&stack, "/mesh/health", None).await?;
    assert_closed(&reply, "ops.health");

    // Both `order-open` and `order-closed` match: the first wins (open).
    let reply = post(&stack, "/mesh/order/v1/chat/completions", None).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = stack.primary.requests();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3].header("x-arbiter-fail-open"), Some("unreachable"));

    // The route's own metadata (closed) beats the open entry naming it.
    let reply = post(&stack, "/mesh/meta/v1/chat/completions", None).await?;
    assert_closed(&reply, "t_mesh_meta");
    assert_eq!(
        stack.upstream_requests(),
        4,
        "nothing more reached a provider"
    );
    assert_eq!(stack.backup.requests().len(), 0);

    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "checks.fail_open"), 3);
    assert_eq!(counter(&stats, "checks.fail_closed"), 4);
    assert_eq!(counter(&stats, "checks.disabled"), 1);
    assert_eq!(counter(&stats, "checks.override"), 1);
    assert_eq!(counter(&stats, "checks.invalid_route_config"), 0);

    // The access log names the route policy saw next to Envoy's route name.
    let lines = log_lines(&stack.envoy, 8).await?;
    let routes: Vec<(String, String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["route_name"].as_str().unwrap_or_default().to_owned(),
                l["arbiter_route"].as_str().unwrap_or_default().to_owned(),
                l["arbiter_outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("chat.completions", "chat", "fail_closed"),
        (
            "httproute/llm/embeddings/rule/0/match/0/api_example_com",
            "embeddings",
            "fail_open",
        ),
        (
            "httproute/llm/embeddings/rule/0/match/0/api_example_com",
            "httproute/llm/embeddings/rule/0/match/0/api_example_com",
            "fail_closed",
        ),
        ("incident.override", "incident", "fail_open"),
        ("ops.health", "health", "disabled"),
        ("ops.health", "ops.health", "fail_closed"),
        ("order.both", "order-open", "fail_open"),
        ("t_mesh_meta", "t_mesh_meta", "fail_closed"),
    ];
    assert_eq!(lines.len(), expected.len(), "{lines:?}");
    for (got, want) in routes.iter().zip(expected) {
        assert_eq!(
            (got.0.as_str(), got.1.as_str(), got.2.as_str()),
            want,
            "{lines:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_decides_table_routes_under_the_entry_name() -> Result<()> {
    let stack = Stack::builder()
        .plugin_config(table().to_string())
        .start()
        .await?;

    let reply = post(&stack, "/mesh/istio/v1/chat/completions", None).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = stack.primary.requests();
    assert_eq!(seen.len(), 1);
    let audit_id = seen[0]
        .header("x-arbiter-audit-id")
        .unwrap_or_default()
        .to_owned();
    assert!(!audit_id.is_empty());
    assert!(!seen[0].has_header("x-arbiter-fail-open"));

    // The entry's context reaches policy: anonymous callers are refused on `regulated`.
    let reply = post(&stack, "/mesh/istio/regulated/v1/chat/completions", None).await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.json()?["error"]["type"], "policy_denied");
    assert_eq!(
        stack.upstream_requests(),
        1,
        "the denied request stayed at the gateway"
    );

    let records = stack.policy.as_ref().unwrap().audit_records()?;
    let decisions: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["decision"].is_string())
        .map(|r| {
            (
                r["route"].as_str().unwrap_or_default(),
                r["decision"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [("chat", "allow"), ("regulated", "deny")],
        "{records:?}"
    );
    let allow = records.iter().find(|r| r["route"] == "chat").unwrap();
    assert_eq!(allow["id"], audit_id.as_str());
    Ok(())
}

/// `envoy --mode validate` over the e2e config with `plugin` as the filter's configuration.
fn validate(plugin: &Value) -> (bool, String) {
    let template =
        std::fs::read_to_string(arbiter_e2e::workspace_root().join(E2E_TEMPLATE)).unwrap();
    let mut vars = default_vars(&template).unwrap();
    for port in ["POLICY_PORT", "PRIMARY_PORT", "BACKUP_PORT"] {
        vars.insert(port.into(), "9".into());
    }
    vars.insert(
        "PLUGIN_CONFIG_JSON".into(),
        yaml_single_quoted(&plugin.to_string()),
    );
    let output = envoy::validate(E2E_TEMPLATE, &vars).unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), log)
}

#[test]
fn envoy_refuses_an_invalid_route_table_naming_the_entry() {
    let (ok, log) = validate(&table());
    assert!(ok, "the good table must load: {log}");

    let with_entry = |bad: Value| {
        let mut t = table();
        t["routes"].as_array_mut().unwrap().push(bad);
        t
    };
    for (plugin, needle) in [
        (
            with_entry(json!({"name": "typo", "match": {"path": "/x"}})),
            "`routes[8]` (`typo`): `match`: unknown field `path`",
        ),
        (
            with_entry(json!({"name": "chat", "match": {"method": "GET"}})),
            "`routes[8]` (`chat`): duplicate name",
        ),
        (
            with_entry(json!({"name": "mode", "settings": {"fail_mode": "sometimes"}})),
            "`routes[8]` (`mode`): `settings`: `fail_mode` must be `closed` or `open`",
        ),
        (
            with_entry(json!({"name": "far", "settings": {"fail_open_until": in_hours(48)}})),
            "`routes[8]` (`far`): `settings`: `fail_open_until` is",
        ),
        (
            with_entry(json!({"name": "late", "settings": {"timeout_ms": "fast"}})),
            "`routes[8]` (`late`): `settings`: `timeout_ms` must be a whole number",
        ),
        (
            json!({"policy_cluster": "arbiter_policy", "routes": {"chat": {}}}),
            "`routes` must be a list",
        ),
    ] {
        let (ok, log) = validate(&plugin);
        assert!(!ok, "{plugin} was accepted: {log}");
        assert!(
            log.contains(needle),
            "{plugin}: Envoy's log lacks {needle}:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_lets_a_deny_through_marked_and_records_it() -> Result<()> {
    let stack = Stack::builder()
        .plugin_config(
            json!({
                "policy_cluster": "arbiter_policy",
                "timeout_ms": 200,
                "routes": [{"name": "rollout", "match": {"route_name": "chat.completions"},
                            "settings": {"dry_run": true, "context": {"classification": "regulated"}}}]
            })
            .to_string(),
        )
        .start()
        .await?;

    // Route metadata `dry_run: true`: policy denies (anonymous on a regulated route), the
    // request goes upstream marked, the client gets the provider's answer. A client's own
    // marker never arrives.
    let mut request = stack
        .request(Method::POST, "/t/dry-run/v1/chat/completions")
        .json(&chat_body());
    request = request.header("x-arbiter-dry-run", "allow");
    let reply = stack.send(request).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));
    assert!(!reply.text().contains("policy_denied"), "{}", reply.text());
    // Table entry `dry_run: true` on an Istio-named route.
    let reply = post(&stack, "/mesh/istio/v1/chat/completions", None).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let seen = stack.primary.requests();
    assert_eq!(seen.len(), 2);
    for upstream in &seen {
        let markers: Vec<&str> = upstream
            .headers
            .iter()
            .filter(|(k, _)| k == "x-arbiter-dry-run")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(markers, ["deny"], "{upstream:?}");
        assert!(!upstream.has_header("x-arbiter-fail-open"));
    }

    // The audit log has both decisions as denies, marked dry-run (not enforced), and the
    // upstream got each record's id.
    let records = stack.policy.as_ref().unwrap().audit_records()?;
    let denies: Vec<&Value> = records.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denies.len(), 2, "{records:?}");
    for (record, upstream) in denies.iter().zip(&seen) {
        assert_eq!(record["route_context"]["dry_run"], "true", "{record}");
        // Said plainly at top level: this deny was not enforced.
        assert_eq!(record["dry_run"], true, "{record}");
        assert_eq!(
            upstream.header("x-arbiter-audit-id"),
            record["id"].as_str(),
            "{record}"
        );
    }
    assert_eq!(denies[0]["route"], "t_dry_run");
    assert_eq!(denies[1]["route"], "rollout");

    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "checks.dry_run_deny"), 2);
    assert_eq!(counter(&stats, "checks.deny"), 0);
    let lines = log_lines(&stack.envoy, 2).await?;
    for line in &lines {
        assert_eq!(line["arbiter_outcome"], "dry_run_deny", "{line}");
        assert_eq!(line["response_code"], 200, "{line}");
    }

    // Nothing else changes: with no decision, the closed dry-run route still refuses.
    stack.fault.set(arbiter_e2e::fault::Fault::Refuse).await?;
    let reply = post(&stack, "/t/dry-run/v1/chat/completions", None).await?;
    assert_closed(&reply, "t_dry_run");
    assert_eq!(stack.upstream_requests(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_does_not_start_with_an_invalid_route_table() -> Result<()> {
    // Entry 1 is fine, entry 2 has an unknown setting: the whole table is refused, so the
    // listener never comes up and no request can pass with partial settings.
    let mut plugin = table();
    plugin["routes"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "typo", "settings": {"fial_mode": "open"}}));
    let started = Stack::builder()
        .policy_server(false)
        .plugin_config(plugin.to_string())
        .start()
        .await;
    let Err(e) = started else {
        panic!("Envoy started with an invalid route table");
    };
    assert!(
        format!("{e:#}").contains("exited during startup"),
        "unexpected failure: {e:#}"
    );
    Ok(())
}
