//! `arbiter probe` against a real stack: the route's effective fail mode (from Envoy's live
//! config, resolved by the filter's code), overrides, invalid settings, breaker state, and
//! synthetic requests through Envoy and straight to the policy server.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use arbiter_e2e::fault::Fault;
use arbiter_e2e::stack::Stack;
use arbiter_policy_server::probe::{probe, ProbeOptions};

fn options(stack: &Stack, route: &str, path: &str) -> ProbeOptions {
    ProbeOptions {
        envoy_admin: Some(stack.envoy.admin_url().to_owned()),
        envoy_url: Some(stack.url("")),
        server: stack.policy.as_ref().map(|p| p.addr().to_string()),
        route: route.to_owned(),
        method: "POST".to_owned(),
        path: path.to_owned(),
        headers: Vec::new(),
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_reports_fail_mode_override_invalid_config_and_decisions() -> Result<()> {
    let stack = Stack::builder().start().await?;

    let report = probe(&options(
        &stack,
        "t_override_active",
        "/t/override-active/v1/chat/completions",
    ))
    .await?;
    let route = report.route.as_ref().unwrap();
    assert_eq!(
        route.fail_mode, "open",
        "the override makes the closed route fail open"
    );
    assert!(route.override_until.is_some());
    assert_eq!(route.breaker_open_workers, 0);
    assert_eq!(report.through_envoy.as_ref().unwrap().status, 200);
    assert_eq!(report.direct.as_ref().unwrap().outcome, "allow");
    let text = report.to_string();
    assert!(text.contains("override: ACTIVE until"), "{text}");

    let report = probe(&options(
        &stack,
        "t_bad_mode",
        "/t/bad-mode/v1/chat/completions",
    ))
    .await?;
    let route = report.route.as_ref().unwrap();
    assert_eq!(route.fail_mode, "closed");
    assert!(
        route.problems.iter().any(|p| p.contains("`fail_mode`")),
        "{:?}",
        route.problems
    );

    let report = probe(&options(
        &stack,
        "t_regulated",
        "/t/regulated/v1/chat/completions",
    ))
    .await?;
    assert_eq!(report.through_envoy.as_ref().unwrap().outcome, "deny");
    let direct = report.direct.as_ref().unwrap();
    assert_eq!(direct.outcome, "deny");
    assert!(
        direct.detail.contains("regulated-requires-identity"),
        "{}",
        direct.detail
    );

    assert!(probe(&options(&stack, "no_such_route", "/")).await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_sees_an_open_breaker_and_the_fail_mode_it_applies() -> Result<()> {
    let stack = Stack::builder()
        .concurrency(1)
        .plugin_config(r#"{"policy_cluster":"arbiter_policy","timeout_ms":200,"breaker_threshold":1,"breaker_cooldown_ms":60000}"#)
        .start()
        .await?;
    stack.fault.set(Fault::Blackhole).await?;
    assert_eq!(stack.chat("/t/closed").await?.status, 503);

    let mut opts = options(&stack, "t_closed", "/t/closed/v1/chat/completions");
    opts.server = None;
    let report = probe(&opts).await?;
    assert_eq!(report.route.as_ref().unwrap().breaker_open_workers, 1);
    let answer = report.through_envoy.unwrap();
    assert_eq!(
        (answer.outcome.as_str(), answer.detail.as_str()),
        ("fail_closed", "breaker_open")
    );
    Ok(())
}
