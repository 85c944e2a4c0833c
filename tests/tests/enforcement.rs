//! The enforcement path end to end: real Envoy, the real wasm filter, the real policy
//! server over gRPC, faults injected at the network. Each test asserts what the client
//! saw, what the upstream received, and the counter and access-log field left behind.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use arbiter_e2e::envoy::{self, Envoy};
use arbiter_e2e::fault::Fault;
use arbiter_e2e::grpc_misbehaving::{GrpcMisbehaving, Misbehaviour};
use arbiter_e2e::mock_llm::Mode;
use arbiter_e2e::stack::{default_vars, yaml_single_quoted, Reply, Stack, E2E_TEMPLATE};
use serde_json::Value;

const TIMEOUT_MS: u64 = 200;

fn counter(stats: &HashMap<String, u64>, name: &str) -> u64 {
    stats
        .get(&format!("wasmcustom.arbiter.{name}"))
        .copied()
        .unwrap_or(0)
}

/// The access-log line of the request with `request_id` (Envoy's, echoed in our bodies or
/// seen by the upstream), or the last line for `route` when no id is known.
async fn log_line(envoy: &Envoy, route: &str, n: usize) -> Result<Value> {
    let lines = envoy.wait_access_log(n).await?;
    lines
        .iter()
        .rev()
        .find(|l| l["route_name"] == route)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no access log line for route {route}: {lines:?}"))
}

fn assert_fail_closed(reply: &Reply, reason: &str, route: &str) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json().unwrap();
    assert_eq!(body["error"]["type"], "policy_unavailable", "{body}");
    assert_eq!(body["error"]["reason"], reason, "{body}");
    assert_eq!(body["error"]["route"], route, "{body}");
    assert!(
        body["error"]["request_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_reaches_primary_with_server_headers_and_no_forged_marker() -> Result<()> {
    let stack = Stack::builder().start().await?;
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &[
                ("x-arbiter-fail-open", "yes"),
                ("x-arbiter-audit-id", "forged"),
            ],
            &arbiter_e2e::stack::chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));

    let seen = stack.primary.requests();
    assert_eq!(seen.len(), 1);
    let upstream = &seen[0];
    assert!(
        !upstream.has_header("x-arbiter-fail-open"),
        "forged marker reached the upstream"
    );
    let audit_id = upstream.header("x-arbiter-audit-id").unwrap_or_default();
    assert!(
        !audit_id.is_empty() && audit_id != "forged",
        "audit id {audit_id:?}"
    );
    // `<bundle name>@sha256:…` (the example bundle declares a name in bundle.toml).
    assert!(upstream
        .header("x-arbiter-policy-version")
        .is_some_and(|v| v.starts_with("ai-gateway@sha256:")));
    assert!(stack.backup.requests().is_empty());

    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "checks.allow"), 1);
    assert_eq!(counter(&stats, "checks.fail_open"), 0);
    let line = log_line(&stack.envoy, "chat", 1).await?;
    assert_eq!(line["arbiter_outcome"], "allow");
    assert_eq!(line["x_arbiter_fail_open"], Value::Null);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_answers_403_with_the_policy_json_and_sends_nothing_upstream() -> Result<()> {
    let stack = Stack::builder().start().await?;
    let reply = stack.chat("/t/regulated/v1/chat/completions").await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json()?;
    assert_eq!(body["error"]["type"], "policy_denied");
    assert_eq!(
        body["error"]["policy_ids"][0],
        "regulated-requires-identity"
    );
    assert!(body["error"]["audit_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));

    // Nothing permits an unknown action: default deny, no determining policy.
    let reply = stack.get("/t/closed/files").await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.json()?["error"]["policy_ids"], serde_json::json!([]));

    assert_eq!(stack.upstream_requests(), 0);
    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "checks.deny"), 2);
    assert_eq!(
        log_line(&stack.envoy, "t_regulated", 2).await?["arbiter_outcome"],
        "deny"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_route_makes_no_policy_call() -> Result<()> {
    let stack = Stack::builder().start().await?;
    let reply = stack
        .post_json_with(
            "/t/disabled",
            &[("x-arbiter-fail-open", "yes")],
            &arbiter_e2e::stack::chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));
    assert!(!stack.primary.requests()[0].has_header("x-arbiter-fail-open"));
    // Filter calls are Envoy "internal" requests on the policy cluster (health checks are not).
    let calls = |stats: &HashMap<String, u64>| {
        stats
            .get("cluster.arbiter_policy.internal.upstream_rq_completed")
            .copied()
            .unwrap_or(0)
    };
    let stats = stack.stats().await?;
    assert_eq!(
        calls(&stats),
        0,
        "a disabled route must not call the policy server"
    );
    assert_eq!(counter(&stats, "checks.disabled"), 1);
    assert_eq!(counter(&stats, "checks.allow"), 0);
    assert_eq!(
        log_line(&stack.envoy, "t_disabled", 1).await?["arbiter_outcome"],
        "disabled"
    );
    // The same counter does move for a checked route.
    assert_eq!(stack.chat("/v1/chat/completions").await?.status, 200);
    assert_eq!(calls(&stack.stats().await?), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_server_not_running() -> Result<()> {
    let stack = Stack::builder().policy_server(false).start().await?;

    let reply = stack.chat("/t/closed").await?;
    assert_fail_closed(&reply, "unreachable", "t_closed");
    assert_eq!(stack.upstream_requests(), 0);

    let reply = stack.chat("/t/open").await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = stack.primary.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-arbiter-fail-open"), Some("unreachable"));

    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "checks.fail_closed"), 1);
    assert_eq!(counter(&stats, "checks.fail_open"), 1);
    assert_eq!(counter(&stats, "no_decision.unreachable"), 2);
    let line = log_line(&stack.envoy, "t_open", 2).await?;
    assert_eq!(line["arbiter_outcome"], "fail_open");
    assert_eq!(line["arbiter_reason"], "unreachable");
    assert_eq!(line["x_arbiter_fail_open"], "unreachable");
    let line = log_line(&stack.envoy, "t_closed", 2).await?;
    assert_eq!(line["arbiter_outcome"], "fail_closed");
    assert_eq!(line["arbiter_reason"], "unreachable");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_server_hangs_closed_answers_within_the_timeout_open_passes() -> Result<()> {
    let stack = Stack::builder().start().await?;
    // Warm the HTTP/2 connection so the blackhole also covers a live connection.
    assert_eq!(
        stack.chat("/t/closed/v1/chat/completions").await?.status,
        200
    );
    stack.primary.clear();

    for fault in [
        Fault::Blackhole,
        Fault::Delay(Duration::from_millis(3 * TIMEOUT_MS)),
    ] {
        stack.fault.set(fault).await?;
        let started = Instant::now();
        let reply = stack.chat("/t/closed").await?;
        let took = started.elapsed();
        assert_fail_closed(&reply, "timeout", "t_closed");
        // A generous bound for a shared CI box; the precise figure belongs to the benchmark.
        assert!(
            took >= Duration::from_millis(TIMEOUT_MS - 10)
                && took < Duration::from_millis(TIMEOUT_MS + 1500),
            "{fault:?}: answered after {took:?}"
        );

        let reply = stack.chat("/t/open").await?;
        assert_eq!(reply.status, 200, "{fault:?}: {}", reply.text());
        let seen = stack.primary.requests();
        assert_eq!(
            seen.last().and_then(|r| r.header("x-arbiter-fail-open")),
            Some("timeout")
        );
    }
    assert_eq!(
        stack.primary.requests().len(),
        2,
        "closed routes sent nothing upstream"
    );
    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "no_decision.timeout"), 4);
    assert_eq!(
        log_line(&stack.envoy, "t_closed", 5).await?["arbiter_reason"],
        "timeout"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_connection_reset_and_garbage() -> Result<()> {
    let stack = Stack::builder().start().await?;

    stack.fault.set(Fault::Reset).await?;
    assert_fail_closed(&stack.chat("/t/closed").await?, "unreachable", "t_closed");

    stack.fault.set(Fault::Garbage).await?;
    assert_fail_closed(&stack.chat("/t/closed").await?, "bad_response", "t_closed");
    let reply = stack.chat("/t/open").await?;
    assert_eq!(reply.status, 200);
    assert_eq!(
        stack
            .primary
            .requests()
            .last()
            .and_then(|r| r.header("x-arbiter-fail-open")),
        Some("bad_response")
    );

    // Recovery: the same stack decides again once the network is healthy.
    stack.fault.set(Fault::Pass).await?;
    assert_eq!(
        stack.chat("/t/closed/v1/chat/completions").await?.status,
        200
    );

    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "no_decision.unreachable"), 1);
    assert_eq!(counter(&stats, "no_decision.bad_response"), 2);
    assert_eq!(counter(&stats, "checks.allow"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_error_and_undecodable_answer() -> Result<()> {
    let server =
        GrpcMisbehaving::start(Misbehaviour::ErrorStatus(13, "evaluation exploded".into())).await?;
    let stack = Stack::builder()
        .policy_server(false)
        .var("POLICY_PORT", server.port().to_string())
        .start()
        .await?;

    assert_fail_closed(&stack.chat("/t/closed").await?, "error", "t_closed");
    // The server's own UNAVAILABLE (e.g. it cannot write its audit log) is an error, not
    // an unreachable server.
    server.set(Misbehaviour::ErrorStatus(
        14,
        "audit log unavailable".into(),
    ));
    assert_fail_closed(&stack.chat("/t/closed").await?, "error", "t_closed");

    server.set(Misbehaviour::GarbageMessage);
    assert_fail_closed(&stack.chat("/t/closed").await?, "bad_response", "t_closed");
    // An empty message decodes as an all-default CheckResponse: no status, no answer.
    server.set(Misbehaviour::Message(Default::default()));
    assert_fail_closed(&stack.chat("/t/closed").await?, "bad_response", "t_closed");
    let reply = stack.chat("/t/open").await?;
    assert_eq!(reply.status, 200);
    assert_eq!(
        stack.primary.requests()[0].header("x-arbiter-fail-open"),
        Some("bad_response")
    );

    // Besides the filter's five Checks, only Envoy's health checks reach the server.
    let paths = server.paths();
    let checks = paths
        .iter()
        .filter(|p| *p == "/envoy.service.auth.v3.Authorization/Check")
        .count();
    assert_eq!(checks, 5, "{paths:?}");
    assert!(paths
        .iter()
        .all(|p| p == "/envoy.service.auth.v3.Authorization/Check"
            || p == "/grpc.health.v1.Health/Check"));
    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "no_decision.error"), 2);
    assert_eq!(counter(&stats, "no_decision.bad_response"), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_and_invalid_route_metadata_behave_closed_and_are_counted() -> Result<()> {
    let mut stack = Stack::builder().start().await?;

    // With the server up, invalid routes are still checked (with the secure defaults).
    assert_eq!(
        stack.chat("/t/bad-mode/v1/chat/completions").await?.status,
        200
    );
    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "checks.invalid_route_config"), 1);

    stack.policy()?.stop();
    assert_fail_closed(&stack.chat("/t/nometa").await?, "unreachable", "t_nometa");
    for (path, route) in [
        ("/t/bad-mode", "t_bad_mode"),
        ("/t/bad-timeout", "t_bad_timeout"),
        ("/t/bad-types", "t_bad_types"),
    ] {
        assert_fail_closed(&stack.chat(path).await?, "unreachable", route);
    }
    assert_eq!(
        stack.upstream_requests(),
        1,
        "only the allowed request went upstream"
    );

    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "checks.invalid_route_config"), 4);
    assert_eq!(counter(&stats, "checks.fail_closed"), 4);
    assert_eq!(counter(&stats, "checks.fail_open"), 0);
    // One log line per invalid route, naming it and the problem (per worker VM at most).
    let log = stack.envoy.log();
    assert!(
        log.contains("route `t_bad_mode`: invalid arbiter settings"),
        "{log}"
    );
    assert!(
        log.contains("`fail_mode` must be `closed` or `open`, got `\"sometimes\"`"),
        "{log}"
    );
    assert!(log.contains("route `t_bad_timeout`"), "{log}");
    assert!(
        log.contains("`timeout_ms` must be between 1 and 60000, got `-5`"),
        "{log}"
    );
    assert!(log.contains("route `t_bad_types`"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn incident_override_active_expired_and_too_far() -> Result<()> {
    let stack = Stack::builder().policy_server(false).start().await?;

    let reply = stack.chat("/t/override-active").await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        stack.primary.requests()[0].header("x-arbiter-fail-open"),
        Some("unreachable")
    );
    let line = log_line(&stack.envoy, "t_override_active", 1).await?;
    assert_eq!(line["arbiter_outcome"], "fail_open");
    assert_eq!(line["arbiter_override"], "true");

    assert_fail_closed(
        &stack.chat("/t/override-expired").await?,
        "unreachable",
        "t_override_expired",
    );
    assert_fail_closed(
        &stack.chat("/t/override-too-far").await?,
        "unreachable",
        "t_override_too_far",
    );
    assert_eq!(stack.upstream_requests(), 1);

    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "checks.override"), 1);
    assert_eq!(counter(&stats, "checks.fail_open"), 1);
    assert_eq!(counter(&stats, "checks.fail_closed"), 2);
    assert_eq!(
        counter(&stats, "checks.invalid_route_config"),
        1,
        "the 48 h override is invalid"
    );
    assert!(stack
        .envoy
        .log()
        .contains("an override may reach at most 24 h"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn status_on_error_is_used_for_fail_closed() -> Result<()> {
    let stack = Stack::builder().policy_server(false).start().await?;
    let reply = stack.chat("/t/status-on-error").await?;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.json()?["error"]["reason"], "unreachable");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_failover_is_envoys() -> Result<()> {
    let stack = Stack::builder().start().await?;

    stack.primary.set_mode(Mode::Status(503)).await?;
    let reply = stack.chat("/v1/chat/completions").await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("backup"));
    assert_eq!(stack.primary.requests().len(), 1);
    assert_eq!(stack.backup.requests().len(), 1);
    // The retry carries the decision's headers: it is the same allowed request.
    assert!(stack.backup.requests()[0].has_header("x-arbiter-audit-id"));

    stack.primary.clear();
    stack.backup.clear();
    stack.primary.set_mode(Mode::Status(400)).await?;
    let reply = stack.chat("/v1/chat/completions").await?;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));
    assert!(
        stack.backup.requests().is_empty(),
        "a 400 must not be retried"
    );

    stack.primary.set_mode(Mode::Refuse).await?;
    let reply = stack.chat("/v1/chat/completions").await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("backup"));

    let stats = stack.stats().await?;
    assert_eq!(
        counter(&stats, "checks.allow"),
        3,
        "one decision per client request, not per try"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_plugin_config_fails_envoy_validation_with_the_filter_message() -> Result<()> {
    let text = std::fs::read_to_string(envoy::template_path(E2E_TEMPLATE))?;
    let mut vars = default_vars(&text)?;
    for port in [
        "ADMIN_PORT",
        "LISTEN_PORT",
        "POLICY_PORT",
        "PRIMARY_PORT",
        "BACKUP_PORT",
    ] {
        vars.insert(port.into(), "1".into());
    }
    vars.insert("ACCESS_LOG".into(), "/dev/null".into());

    let out = envoy::validate(E2E_TEMPLATE, &vars)?;
    assert!(
        out.status.success(),
        "the shipped config must validate: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    vars.insert(
        "PLUGIN_CONFIG_JSON".into(),
        yaml_single_quoted(r#"{"timeout":100,"fail_mode":"sometimes"}"#),
    );
    let out = envoy::validate(E2E_TEMPLATE, &vars)?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "invalid plugin config validated: {output}"
    );
    assert!(
        output.contains("arbiter: invalid plugin configuration"),
        "{output}"
    );
    assert!(output.contains("unknown field `timeout`"), "{output}");
    assert!(
        output.contains("missing required field `policy_cluster`"),
        "{output}"
    );
    assert!(
        output.contains("`fail_mode` must be `closed` or `open`, got `sometimes`"),
        "{output}"
    );

    vars.insert("PLUGIN_CONFIG_JSON".into(), "not json".into());
    let out = envoy::validate(E2E_TEMPLATE, &vars)?;
    assert!(!out.status.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_header_values_and_many_headers_have_defined_results() -> Result<()> {
    let stack = Stack::builder().start().await?;

    // 40 KiB in one header: within Envoy's 60 KiB default, so it is checked and allowed.
    let big = "a".repeat(40 * 1024);
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &[("x-big", big.as_str())],
            &arbiter_e2e::stack::chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        stack.primary.requests()[0].header("x-big").map(str::len),
        Some(big.len())
    );

    // Over Envoy's header limits: Envoy answers 431 before any filter runs.
    let huge = "a".repeat(80 * 1024);
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &[("x-huge", huge.as_str())],
            &arbiter_e2e::stack::chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 431, "{}", reply.text());

    let names: Vec<String> = (0..200).map(|i| format!("x-h-{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &many,
            &arbiter_e2e::stack::chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 431, "{}", reply.text());

    // 90 headers pass Envoy's count limit and reach policy intact.
    let many: Vec<(&str, &str)> = names.iter().take(90).map(|n| (n.as_str(), "v")).collect();
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &many,
            &arbiter_e2e::stack::chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // The filter VM is still healthy: no crash, no reload.
    assert_eq!(stack.chat("/v1/chat/completions").await?.status, 200);
    let stats = stack.stats().await?;
    assert_eq!(stats.get("wasm.arbiter.vm_reload").copied().unwrap_or(0), 0);
    assert_eq!(counter(&stats, "checks.allow"), 3);
    Ok(())
}

/// Sends one HTTP/1.1 request exactly as written (no client-side URL clean-up) and returns
/// the status code of the answer.
async fn raw_status(stack: &Stack, request_line_target: &str, extra: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = stack.envoy.port()?;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let body = arbiter_e2e::stack::chat_body().to_string();
    conn.write_all(
        format!(
            "POST {request_line_target} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await??;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line in {text:?}"))?;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_are_normalised_before_routing_so_an_open_route_cannot_carry_a_closed_ones_traffic(
) -> Result<()> {
    let stack = Stack::builder().start().await?;
    stack.fault.set(Fault::Blackhole).await?;
    // Without normalisation these match the open route's prefix `/t/open`, pass fail-open,
    // and the provider resolves them to the closed route's path.
    for target in [
        "/t/open/../closed/v1/chat/completions",
        "/t/open/%2E%2E/closed/v1/chat/completions",
        "/t/open/./../closed/v1/chat/completions",
    ] {
        assert_eq!(raw_status(&stack, target, "").await?, 503, "{target}");
    }
    // Encoded slashes are refused outright; underscore header names too (an upstream may
    // read `x_arbiter_fail_open` as the marker).
    assert_eq!(
        raw_status(&stack, "/t/open/..%2Fclosed/v1/chat/completions", "").await?,
        400
    );
    assert_eq!(
        raw_status(&stack, "/t/open", "x_arbiter_fail_open: forged\r\n").await?,
        400
    );
    // Repeated slashes are merged: the same closed route.
    assert_eq!(
        raw_status(&stack, "//t//closed//v1/chat/completions", "").await?,
        503
    );
    assert_eq!(stack.upstream_requests(), 0, "nothing reached a provider");
    let lines = stack.envoy.wait_access_log(6).await?;
    for line in lines.iter().filter(|l| l["response_code"] == 503) {
        assert_eq!(line["route_name"], "t_closed", "{line}");
        assert_eq!(line["arbiter_outcome"], "fail_closed", "{line}");
    }
    Ok(())
}
