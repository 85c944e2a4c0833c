//! Incident controls through real Envoy: the breaker toward the policy server, the
//! allow-cache, request bodies sent to policy, and the Envoy-side record of undecided
//! requests.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use arbiter_e2e::fault::Fault;
use arbiter_e2e::stack::{chat_body, PolicyServer, Reply, Stack};
use arbiter_e2e::util::{eventually, Stopped};
use serde_json::{json, Value};

fn counter(stats: &HashMap<String, u64>, name: &str) -> u64 {
    stats
        .get(&format!("wasmcustom.arbiter.{name}"))
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn breaker_stops_waiting_probes_and_recovers() -> Result<()> {
    // One worker, so one breaker (it is per worker VM). The probe after the cool-down is
    // the first call on a new connection to the policy server: on a loaded 2-core CI box
    // that alone has taken over 200 ms, timing the probe out and opening the breaker a
    // second time. The routes get 1 s, which this test's mechanics do not depend on. The
    // cool-down stays at 1 s (no backoff: the maximum equals it), as this test's bounds
    // were written for; backoff has its own test below.
    let stack = Stack::builder()
        .concurrency(1)
        .var("TIMEOUT_MS", "1000")
        .plugin_config(r#"{"policy_cluster":"arbiter_policy","timeout_ms":1000,"breaker_threshold":3,"breaker_cooldown_ms":1000,"breaker_cooldown_max_ms":1000}"#)
        .start()
        .await?;
    assert_eq!(
        stack.chat("/t/closed/v1/chat/completions").await?.status,
        200
    );
    stack.fault.set(Fault::Blackhole).await?;

    for _ in 0..3 {
        let reply = stack.chat("/t/closed").await?;
        assert_eq!(reply.json()?["error"]["reason"], "timeout");
    }
    let opened_at = Instant::now();
    let started = Instant::now();
    let reply = stack.chat("/t/closed").await?;
    let took = started.elapsed();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()?["error"]["reason"], "breaker_open");
    assert!(
        took < Duration::from_millis(150),
        "an open breaker must not wait for the timeout: {took:?}"
    );
    let reply = stack.chat("/t/open").await?;
    assert_eq!(reply.status, 200);
    assert_eq!(
        stack
            .primary
            .requests()
            .last()
            .unwrap()
            .header("x-arbiter-fail-open"),
        Some("breaker_open")
    );

    // The server comes back; traffic recovers once the cool-down lets a probe through.
    stack.fault.set(Fault::Pass).await?;
    eventually(
        Duration::from_secs(5),
        "recovery after the cool-down",
        || async {
            let reply = stack.chat("/t/closed/v1/chat/completions").await.ok()?;
            (reply.status == 200).then_some(())
        },
    )
    .await?;
    let recovered = opened_at.elapsed();
    assert!(
        recovered >= Duration::from_millis(900) && recovered < Duration::from_millis(1000 + 4000),
        "recovered after {recovered:?}"
    );

    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "breaker.opened"), 1);
    assert_eq!(counter(&stats, "breaker.closed"), 1);
    assert!(counter(&stats, "no_decision.breaker_open") >= 2);
    assert_eq!(counter(&stats, "no_decision.timeout"), 3);
    let log = stack.envoy.log();
    assert!(log.contains("breaker open for 1000 ms"), "{log}");
    Ok(())
}

/// The reason of a fail-closed answer.
fn reason(reply: &Reply) -> String {
    reply
        .json()
        .ok()
        .and_then(|body| body["error"]["reason"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("(no reason: {} {})", reply.status, reply.text()))
}

/// The policy server stalls (SIGSTOP: it keeps its connection and answers nothing) just
/// long enough to open the breaker. Once the stall is over the breaker answers with the
/// fail mode only for its first, short cool-down: requests are decided again long before
/// the maximum cool-down (a minute here, so the two cannot be confused on a loaded machine;
/// before backoff, the breaker stayed open for its one cool-down whatever the stall). Then
/// a stall that outlasts a probe: the failed probe opens the breaker again for twice as
/// long, counted as a re-opening, so opened − closed is 0 again once it recovers.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_short_stall_the_breaker_lets_decisions_back_after_its_first_cool_down(
) -> Result<()> {
    const THRESHOLD: usize = 2;
    // Long enough for the `breaker_open` answers below to be seen on a loaded machine
    // before the cool-down ends.
    const FIRST: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(60);
    // Generous for a loaded 2-core machine, still a quarter of the maximum.
    const BOUND: Duration = Duration::from_secs(15);
    // One worker, so one breaker (it is per worker VM); the policy calls get 1 s, so a
    // decision that is slow because the machine is loaded is still a decision.
    let stack = Stack::builder()
        .concurrency(1)
        .var("TIMEOUT_MS", "1000")
        .plugin_config(format!(
            r#"{{"policy_cluster":"arbiter_policy","timeout_ms":1000,"breaker_threshold":{THRESHOLD},"breaker_cooldown_ms":{},"breaker_cooldown_max_ms":{}}}"#,
            FIRST.as_millis(),
            MAX.as_millis()
        ))
        .start()
        .await?;
    let closed = "/t/closed/v1/chat/completions";
    let open = "/t/open/v1/chat/completions";
    assert_eq!(stack.chat(closed).await?.status, 200);
    let pid = stack
        .policy
        .as_ref()
        .and_then(PolicyServer::pid)
        .context("the policy server is not running")?;

    // The stall: THRESHOLD calls time out and open the breaker; then it is over.
    let stalled = Stopped::stop(pid)?;
    for _ in 0..THRESHOLD {
        let reply = stack.chat(closed).await?;
        assert_eq!((reply.status, reason(&reply).as_str()), (503, "timeout"));
    }
    stalled.resume()?;
    let resumed = Instant::now();
    // The breaker is open although the server is back: the closed route refuses (and
    // says it may be retried), the open route lets the request through unchecked, marked.
    let reply = stack.chat(closed).await?;
    assert_eq!(
        (reply.status, reason(&reply).as_str()),
        (503, "breaker_open")
    );
    assert!(reply.header("retry-after").is_some(), "{:?}", reply.headers);
    let seen = stack.primary.requests().len();
    assert_eq!(stack.chat(open).await?.status, 200);
    let passed = stack.primary.requests();
    assert_eq!(passed.len(), seen + 1);
    assert_eq!(
        passed.last().unwrap().header("x-arbiter-fail-open"),
        Some("breaker_open")
    );

    // After the first cool-down a probe is decided and closes the breaker: the closed
    // route is decided again, refusing only with `breaker_open` until then ...
    let mut refused = 0;
    loop {
        let reply = stack.chat(closed).await?;
        if reply.status == 200 {
            break;
        }
        assert_eq!(
            (reply.status, reason(&reply).as_str()),
            (503, "breaker_open")
        );
        refused += 1;
        ensure!(
            resumed.elapsed() < BOUND,
            "still `breaker_open` {:?} after the stall ended ({refused} refusals); the maximum cool-down is {MAX:?}",
            resumed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = resumed.elapsed();
    // ... and so is the open route: the upstream sees a decided request, not a marked one.
    assert_eq!(stack.chat(open).await?.status, 200);
    let last = stack.primary.requests().pop().unwrap();
    assert!(
        last.has_header("x-arbiter-audit-id") && !last.has_header("x-arbiter-fail-open"),
        "{last:?}"
    );
    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "breaker.opened"), 1);
    assert_eq!(counter(&stats, "breaker.closed"), 1);
    assert_eq!(counter(&stats, "breaker.reopened"), 0);
    assert!(
        stack.envoy.log().contains(&format!(
            "policy server failing: breaker open for {} ms",
            FIRST.as_millis()
        )),
        "{}",
        stack.envoy.log()
    );
    eprintln!("decided again {recovered:?} after the stall ended ({refused} refusals)");

    // A stall that outlasts the first cool-down: the probe gets no decision either, and
    // the breaker opens again for twice as long.
    let stalled = Stopped::stop(pid)?;
    for _ in 0..THRESHOLD {
        let reply = stack.chat(closed).await?;
        assert_eq!((reply.status, reason(&reply).as_str()), (503, "timeout"));
    }
    eventually(
        BOUND,
        "the probe after the first cool-down to time out",
        || async {
            let reply = stack.chat(closed).await.ok()?;
            (reason(&reply) == "timeout").then_some(())
        },
    )
    .await?;
    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "breaker.opened"), 2);
    assert_eq!(counter(&stats, "breaker.reopened"), 1);
    assert!(
        stack.envoy.log().contains(&format!(
            "policy server still failing (a probe got no decision): breaker open for {} ms",
            (2 * FIRST).as_millis()
        )),
        "{}",
        stack.envoy.log()
    );
    stalled.resume()?;
    eventually(BOUND, "decisions after the longer stall", || async {
        let reply = stack.chat(closed).await.ok()?;
        (reply.status == 200).then_some(())
    })
    .await?;
    // Every opening was closed again: no worker counts as open (what `arbiter probe`, the
    // shipped alert and dashboard compute as opened − closed).
    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "breaker.opened"), 2);
    assert_eq!(counter(&stats, "breaker.closed"), 2);
    assert!(counter(&stats, "breaker.reopened") >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_cache_hits_misses_and_never_caches_denies() -> Result<()> {
    let stack = Stack::builder().start().await?;
    let path = "/t/cached/v1/chat/completions";

    assert_eq!(stack.chat(path).await?.status, 200);
    let reply = stack.chat(path).await?;
    assert_eq!(reply.status, 200);
    let stats = stack.stats().await?;
    assert_eq!(
        (
            counter(&stats, "checks.allow"),
            counter(&stats, "checks.cached")
        ),
        (1, 1),
        "a cached allow makes no policy call"
    );
    let upstream = stack.primary.requests();
    assert_eq!(upstream.len(), 2);
    assert_eq!(
        upstream[0].header("x-arbiter-audit-id"),
        upstream[1].header("x-arbiter-audit-id"),
        "the cached request carries the audit id of the decision that allowed it"
    );

    // Another caller (any header policy may read) misses.
    let reply = stack
        .post_json_with(path, &[("x-caller", "other")], &chat_body())
        .await?;
    assert_eq!(reply.status, 200);
    assert_eq!(counter(&stack.stats().await?, "checks.allow"), 2);

    // Denies are never stored: both ask the server.
    for _ in 0..2 {
        assert_eq!(stack.get("/t/cached/files").await?.status, 403);
    }
    // Another route with the same request is not served from this route's entries.
    assert_eq!(
        stack.chat("/t/closed/v1/chat/completions").await?.status,
        200
    );

    let stats = stack.stats().await?;
    assert_eq!(counter(&stats, "checks.cached"), 1);
    assert_eq!(counter(&stats, "checks.allow"), 3);
    assert_eq!(counter(&stats, "checks.deny"), 2);
    assert_eq!(counter(&stats, "cache.stores"), 2);
    let lines = stack.envoy.wait_access_log(6).await?;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["arbiter_outcome"] == "cached")
            .count(),
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_cache_is_bounded_and_follows_the_policy_version() -> Result<()> {
    let bundle = tempfile::tempdir()?;
    for entry in
        std::fs::read_dir(arbiter_e2e::workspace_root().join("examples/ai-gateway/policies"))?
    {
        let entry = entry?;
        std::fs::copy(entry.path(), bundle.path().join(entry.file_name()))?;
    }
    let mut stack = Stack::builder()
        .policies(bundle.path())
        .plugin_config(
            r#"{"policy_cluster":"arbiter_policy","timeout_ms":200,"cache_max_entries":4}"#,
        )
        .start()
        .await?;
    let path = "/t/cached/v1/chat/completions";

    // 40 distinct callers, then the same 40 again: at most 4 slots can answer.
    for round in 0..2 {
        for i in 0..40 {
            let caller = format!("caller-{i}");
            let reply = stack
                .post_json_with(path, &[("x-caller", caller.as_str())], &chat_body())
                .await?;
            assert_eq!(reply.status, 200, "round {round}");
        }
    }
    let stats = stack.stats().await?;
    assert!(
        counter(&stats, "checks.cached") <= 4,
        "{} hits from 4 slots",
        counter(&stats, "checks.cached")
    );

    // A new policy version: once any request brings it back from the server, entries
    // allowed under the old version stop answering.
    let cached_before = counter(&stats, "checks.cached");
    assert_eq!(
        stack
            .post_json_with(path, &[("x-caller", "caller-39")], &chat_body())
            .await?
            .status,
        200
    );
    assert_eq!(
        counter(&stack.stats().await?, "checks.cached"),
        cached_before + 1,
        "caller-39 is cached"
    );
    std::fs::write(
        bundle.path().join("zz-extra.cedar"),
        "@id(\"extra-completions\")\npermit (principal, action == Arbiter::Action::\"completions\", resource);\n",
    )?;
    stack.policy()?.restart().await?;
    assert_eq!(
        stack
            .post_json_with(path, &[("x-caller", "fresh")], &chat_body())
            .await?
            .status,
        200
    );
    let allows = counter(&stack.stats().await?, "checks.allow");
    assert_eq!(
        stack
            .post_json_with(path, &[("x-caller", "caller-39")], &chat_body())
            .await?
            .status,
        200
    );
    let stats = stack.stats().await?;
    assert_eq!(
        counter(&stats, "checks.allow"),
        allows + 1,
        "the old version's entry missed"
    );
    assert_eq!(counter(&stats, "checks.cached"), cached_before + 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn body_goes_to_policy_up_to_the_limit_and_whole_to_the_upstream() -> Result<()> {
    let stack = Stack::builder().start().await?;
    let small = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    // The first call also carries the HTTP/2 preface and fills the header table: measure
    // the second.
    assert_eq!(
        stack
            .post_json("/t/body/v1/chat/completions", &small)
            .await?
            .status,
        200
    );
    let before = stack.fault.bytes_to_target();
    assert_eq!(
        stack
            .post_json("/t/body/v1/chat/completions", &small)
            .await?
            .status,
        200
    );
    let small_cost = stack.fault.bytes_to_target() - before;

    // 20 KiB of prompt: policy gets the first 1024 bytes (route max_body_bytes), the
    // upstream gets everything.
    let big = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(20 * 1024)}]});
    let before = stack.fault.bytes_to_target();
    let reply = stack.post_json("/t/body/v1/chat/completions", &big).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let big_cost = stack.fault.bytes_to_target() - before;
    // 1024 body bytes instead of ~80: the difference is the prefix, never the 20 KiB.
    assert!(
        big_cost > small_cost + 800,
        "policy saw the body prefix: {small_cost} vs {big_cost}"
    );
    assert!(
        big_cost < small_cost + 2048,
        "policy saw at most max_body_bytes: {small_cost} vs {big_cost}"
    );
    let upstream = stack.primary.requests();
    assert_eq!(
        upstream.last().unwrap().body_len,
        serde_json::to_vec(&big)?.len()
    );

    // No body at all on a body route: checked at once.
    assert_eq!(stack.get("/t/body/v1/models").await?.status, 200);
    assert_eq!(counter(&stack.stats().await?, "checks.allow"), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn undecided_requests_are_recorded_on_the_envoy_side_without_secrets() -> Result<()> {
    let stack = Stack::builder().policy_server(false).start().await?;
    let prompt = "PROMPT-TEXT-MUST-NOT-LEAK";
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]});
    let reply = stack
        .post_json_with(
            "/t/open/v1/chat/completions?api_key=QUERY-SECRET",
            &[
                ("x-api-key", "sk-APIKEY-MUST-NOT-LEAK"),
                ("authorization", "Bearer TOKEN-MUST-NOT-LEAK"),
                ("x-tenant-id", "acme"),
            ],
            &body,
        )
        .await?;
    assert_eq!(reply.status, 200);
    let reply = stack.chat("/t/closed").await?;
    assert_eq!(reply.status, 503);

    let lines = stack.envoy.wait_access_log(2).await?;
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l["arbiter_record"].as_str().unwrap()).unwrap())
        .collect();
    let open = records.iter().find(|r| r["route"] == "t_open").unwrap();
    assert_eq!(open["outcome"], "fail_open");
    assert_eq!(open["reason"], "unreachable");
    assert_eq!(open["method"], "POST");
    assert_eq!(open["path"], "/t/open/v1/chat/completions");
    assert_eq!(open["tenant"], "acme");
    assert_eq!(open["api_key_sha256"].as_str().map(str::len), Some(64));
    assert!(!open["request_id"].as_str().unwrap().is_empty());
    let closed = records.iter().find(|r| r["route"] == "t_closed").unwrap();
    assert_eq!(closed["outcome"], "fail_closed");

    let access_log = std::fs::read_to_string(stack.envoy.access_log_path())?;
    let envoy_log = stack.envoy.log();
    for secret in [
        prompt,
        "sk-APIKEY-MUST-NOT-LEAK",
        "TOKEN-MUST-NOT-LEAK",
        "QUERY-SECRET",
    ] {
        assert!(!access_log.contains(secret), "{secret} in the access log");
        assert!(!envoy_log.contains(secret), "{secret} in Envoy's log");
    }
    Ok(())
}
