//! Two real policy servers behind the `arbiter_policy` cluster of a real Envoy, with gRPC
//! health checks every 300 ms: an instance whose audit log cannot be written, or whose
//! process is wedged (SIGSTOP), leaves rotation, the other one decides every request in the
//! meantime, and the first returns once it recovers.
//!
//! Instance A is the harness's usual server (behind the fault proxy, so Envoy knows it as
//! `127.0.0.1:<fault proxy port>`); B is reached directly. Every wait polls with a generous
//! deadline (a loaded 2-core CI box): nothing here asserts on speed.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use arbiter_e2e::stack::{PolicyServer, Stack};
use arbiter_e2e::util::{eventually, Stopped};

/// Envoy's health-check interval for the policy cluster in these tests (the template's
/// timeout is 250 ms, two failures take a host out, one success brings it back).
const HC_INTERVAL: &str = "0.3s";
/// Bound on every wait for a state change.
const WAIT: Duration = Duration::from_secs(30);
/// Requests in each window that must all be decided by the healthy instance.
const WINDOW: usize = 20;
/// A closed route whose policy-call timeout (`TIMEOUT_MS`) is generous: a decision that is
/// slow because the machine is loaded must still count as a decision.
const ROUTE: &str = "/t/closed/v1/chat/completions";

async fn two_instances() -> Result<Stack> {
    Stack::builder()
        .second_policy_server()
        .var("POLICY_HC_INTERVAL", HC_INTERVAL)
        .var("TIMEOUT_MS", "2000")
        .plugin_config(r#"{"policy_cluster":"arbiter_policy","timeout_ms":2000}"#)
        // Decision events off, so each server's own log stays smaller than the file-size
        // limit put on its audit log.
        .policy_arg("--log")
        .policy_arg("info,arbiter::decision=warn")
        .policy_arg("--health-interval")
        .policy_arg("200ms")
        // This test is about failover, not speed: no synthetic decision should miss this.
        .policy_arg("--health-decision-timeout")
        .policy_arg("5s")
        .start()
        .await
}

fn a(stack: &Stack) -> &PolicyServer {
    stack.policy.as_ref().unwrap()
}

fn b(stack: &Stack) -> &PolicyServer {
    stack.second_policy.as_ref().unwrap()
}

/// How Envoy knows A (through the fault proxy) and B.
fn hosts(stack: &Stack) -> (String, String) {
    (
        format!("127.0.0.1:{}", stack.fault.port()),
        b(stack).addr().to_string(),
    )
}

async fn flags(stack: &Stack, host: &str) -> Result<String> {
    let flags = stack.envoy.host_health_flags("arbiter_policy").await?;
    flags
        .get(host)
        .cloned()
        .with_context(|| format!("arbiter_policy has no host {host}: {flags:?}"))
}

/// Waits until Envoy's health flags of `host` satisfy `ok` (e.g. `healthy`).
async fn wait_flags(stack: &Stack, host: &str, what: &str, ok: fn(&str) -> bool) -> Result<()> {
    eventually(WAIT, &format!("{host} {what}"), || async {
        let flags = flags(stack, host).await.ok()?;
        ok(&flags).then_some(())
    })
    .await
}

/// The policy cluster's hosts as Envoy's admin `/clusters` shows them, for failure messages.
async fn clusters(stack: &Stack) -> String {
    match stack.envoy.admin_get("/clusters").await {
        Ok(text) => text
            .lines()
            .filter(|l| l.starts_with("arbiter_policy::"))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("(no /clusters: {e:#})"),
    }
}

fn is_healthy(flags: &str) -> bool {
    flags == "healthy"
}

/// Out of rotation because of its health checks (not outlier detection).
fn failed_health_checks(flags: &str) -> bool {
    flags.contains("/failed_active_hc")
}

fn records(server: &PolicyServer) -> usize {
    server.audit_records().unwrap().len()
}

/// `arbiter_health_serving` of `server`.
async fn health_serving(server: &PolicyServer) -> Result<f64> {
    let addr = server.metrics_addr().context("no metrics listener")?;
    let text = arbiter_e2e::stack::client()?
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix("arbiter_health_serving "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no arbiter_health_serving in\n{text}"))
}

/// One request that must be allowed by policy: 200 from the provider, which got the audit
/// id of the decision. Returns that id.
async fn allowed(stack: &Stack) -> Result<String> {
    stack.primary.clear();
    let reply = stack.chat(ROUTE).await?;
    ensure!(reply.status == 200, "{}: {}", reply.status, reply.text());
    let requests = stack.primary.requests();
    let upstream = requests.last().context("the provider got nothing")?;
    upstream
        .header("x-arbiter-audit-id")
        .map(str::to_owned)
        .context("allowed without an audit id")
}

/// Sends allowed requests (each must be allowed) until `done`, for at most [`WAIT`].
async fn allowed_until(stack: &Stack, what: &str, done: impl Fn() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + WAIT;
    while !done() {
        if std::time::Instant::now() >= deadline {
            bail!(
                "timed out after {WAIT:?} waiting for {what}\n{}",
                clusters(stack).await
            );
        }
        allowed(stack).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Both instances in rotation and deciding: each has decided at least one request.
async fn both_deciding(stack: &Stack) -> Result<()> {
    let (host_a, host_b) = hosts(stack);
    wait_flags(stack, &host_a, "healthy", is_healthy).await?;
    wait_flags(stack, &host_b, "healthy", is_healthy).await?;
    allowed_until(stack, "both instances to decide", || {
        records(a(stack)) > 0 && records(b(stack)) > 0
    })
    .await
}

/// With A out of rotation: every request of a window is allowed, with B's decision (B's
/// audit log has exactly these ids), and A records nothing.
async fn b_decides_everything(stack: &Stack) -> Result<()> {
    let (host_a, _) = hosts(stack);
    let before_a = records(a(stack));
    let before_b = records(b(stack));
    let mut ids = HashSet::new();
    for i in 0..WINDOW {
        let id = allowed(stack)
            .await
            .with_context(|| format!("request {i} of the window"))?;
        ids.insert(id);
    }
    assert_eq!(
        records(a(stack)),
        before_a,
        "A decided while out of rotation"
    );
    let recorded: HashSet<String> = b(stack).audit_records()?[before_b..]
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        recorded, ids,
        "B's new records are exactly the window's decisions"
    );
    assert_eq!(ids.len(), WINDOW);
    let still = flags(stack, &host_a).await?;
    assert!(failed_health_checks(&still), "A back too early: {still}");
    Ok(())
}

/// A back in rotation: requests reach it again, and every one of them is allowed.
async fn a_decides_again(stack: &Stack) -> Result<()> {
    let before = records(a(stack));
    allowed_until(stack, "A to decide again", || records(a(stack)) > before).await
}

/// A file-size limit on the running server makes every audit write fail (EFBIG).
fn set_file_size_limit(pid: u32, soft: Option<u64>) -> Result<()> {
    let soft = soft.map_or("unlimited".to_owned(), |n| n.to_string());
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--fsize={soft}:unlimited"))
        .status()
        .context("running prlimit")?;
    ensure!(status.success(), "prlimit failed: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_cannot_write_its_audit_log_leaves_rotation_and_returns() -> Result<()> {
    let stack = two_instances().await?;
    let (host_a, host_b) = hosts(&stack);
    both_deciding(&stack).await?;

    let pid = a(&stack).pid().context("A is not running")?;
    let audit = a(&stack).audit_log_path().unwrap().to_owned();
    let size = std::fs::metadata(&audit)?.len();
    set_file_size_limit(pid, Some(size))?;
    // A finds out at its next write: the first request it gets is refused (no decision
    // without a record), which the closed route answers with 503, reason `error`. B's
    // answers on the way are allowed.
    let mut refused = false;
    for _ in 0..50 {
        let reply = stack.chat(ROUTE).await?;
        match reply.status {
            200 => continue,
            503 => {
                let body = reply.json()?;
                assert_eq!(body["error"]["reason"], "error", "{body}");
                refused = true;
                break;
            }
            other => bail!("unexpected {other}: {}", reply.text()),
        }
    }
    assert!(refused, "no request reached A in 50");
    // A reports NOT_SERVING, and Envoy's health checks take it out of rotation.
    eventually(WAIT, "A's arbiter_health_serving 0", || async {
        (health_serving(a(&stack)).await.ok()? == 0.0).then_some(())
    })
    .await?;
    wait_flags(&stack, &host_a, "out of rotation", failed_health_checks).await?;
    assert!(is_healthy(&flags(&stack, &host_b).await?));
    assert!(
        stack
            .envoy
            .stat("cluster.arbiter_policy.health_check.failure")
            .await?
            > 0
    );
    b_decides_everything(&stack).await?;

    // Writing works again: A turns SERVING by itself and Envoy puts it back.
    set_file_size_limit(pid, None)?;
    wait_flags(&stack, &host_a, "back in rotation", is_healthy).await?;
    assert_eq!(health_serving(a(&stack)).await?, 1.0);
    a_decides_again(&stack).await?;

    for server in [a(&stack), b(&stack)] {
        let (code, out) = server.verify_audit()?;
        assert_eq!(code, 0, "{out}");
    }
    let log = a(&stack).log();
    assert!(
        log.contains("health NOT_SERVING: audit log not writable"),
        "{log}"
    );
    assert!(log.contains("health SERVING again"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wedged_instance_leaves_rotation_and_returns() -> Result<()> {
    let stack = two_instances().await?;
    let (host_a, host_b) = hosts(&stack);
    both_deciding(&stack).await?;

    let pid = a(&stack).pid().context("A is not running")?;
    let stopped = Stopped::stop(pid)?;
    // A answers nothing any more: its health checks time out and it leaves rotation.
    wait_flags(&stack, &host_a, "out of rotation", failed_health_checks).await?;
    assert!(is_healthy(&flags(&stack, &host_b).await?));
    b_decides_everything(&stack).await?;

    drop(stopped);
    wait_flags(&stack, &host_a, "back in rotation", is_healthy).await?;
    a_decides_again(&stack).await?;
    Ok(())
}
