//! The audit trail end to end: real Envoy, the real wasm filter, the real policy server
//! writing its audit log, checked with the real `arbiter` CLI.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arbiter_e2e::stack::{chat_body, Reply, Stack};
use arbiter_e2e::{eventually, PolicyServer};
use reqwest::Method;
use serde_json::Value;
use sha2::Digest as _;

/// Audit ids of every request the server decided, as the client and the upstreams saw
/// them: allowed requests carry `x-arbiter-audit-id` upstream, denied ones name it in the
/// 403 body.
fn seen_ids(stack: &Stack, denied: &[Value]) -> HashSet<String> {
    let mut ids: HashSet<String> = stack
        .primary
        .requests()
        .iter()
        .chain(stack.backup.requests().iter())
        .filter_map(|r| r.header("x-arbiter-audit-id").map(str::to_owned))
        .collect();
    ids.extend(
        denied
            .iter()
            .map(|body| body["error"]["audit_id"].as_str().unwrap().to_owned()),
    );
    ids
}

fn assert_verifies(policy: &PolicyServer) {
    let (code, out) = policy.verify_audit().unwrap();
    assert_eq!(code, 0, "arbiter audit verify failed:\n{out}");
    assert!(out.contains("ok: "), "{out}");
}

fn policy(stack: &Stack) -> &PolicyServer {
    stack.policy.as_ref().unwrap()
}

/// Sends `method path` (with the chat body for POST) on a spawned task.
fn send(stack: &Stack, method: Method, path: &str) -> tokio::task::JoinHandle<Result<Reply>> {
    let mut request = stack.http().request(method.clone(), stack.url(path));
    if method == Method::POST {
        request = request.json(&chat_body());
    }
    tokio::spawn(async move { Reply::read(request.send().await?).await })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_decision_through_envoy_has_exactly_one_record() -> Result<()> {
    // Generous policy-call timeouts: this test is about records, not about latency on a
    // loaded machine.
    let stack = Stack::builder()
        .var("TIMEOUT_MS", "2000")
        .plugin_config(r#"{"policy_cluster":"arbiter_policy","timeout_ms":2000}"#)
        .start()
        .await?;
    let mut denied = Vec::new();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for round in 0..6 {
        let tasks: Vec<_> = (0..8)
            .map(|i| match (round + i) % 4 {
                0 => send(&stack, Method::POST, "/t/closed/v1/chat/completions"),
                1 => send(&stack, Method::POST, "/t/regulated/v1/chat/completions"),
                2 => send(&stack, Method::GET, "/t/closed/v1/models"),
                _ => send(&stack, Method::GET, "/t/closed/files"),
            })
            .collect();
        for task in tasks {
            let reply = task.await??;
            *statuses.entry(reply.status).or_default() += 1;
            match reply.status {
                200 => {}
                403 => denied.push(reply.json()?),
                // No decision in time (a loaded machine): the route's fail mode, no record
                // needed. Anything else is a bug.
                503 => assert_eq!(reply.json()?["error"]["reason"], "timeout"),
                other => panic!("unexpected status {other}: {}", reply.text()),
            }
        }
    }
    let undecided = statuses.get(&503).copied().unwrap_or(0);
    assert!(undecided <= 4, "{statuses:?}");

    let seen = seen_ids(&stack, &denied);
    assert_eq!(seen.len(), 48 - undecided, "{statuses:?}");
    let records = policy(&stack).audit_records()?;
    let logged: Vec<String> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let unique: HashSet<String> = logged.iter().cloned().collect();
    assert_eq!(unique.len(), logged.len(), "a record written twice");
    assert!(seen.is_subset(&unique), "a decision without a record");
    // A record beyond what was seen can only be a decision Envoy gave up waiting for.
    assert!(logged.len() - seen.len() <= undecided, "{statuses:?}");
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record["seq"], index as u64 + 1);
    }

    // The record names Envoy's request id, route and request shape.
    let access = stack.envoy.wait_access_log(48).await?;
    let by_request: HashMap<&str, &Value> = access
        .iter()
        .map(|l| (l["request_id"].as_str().unwrap_or_default(), l))
        .collect();
    for record in records
        .iter()
        .filter(|r| seen.contains(r["id"].as_str().unwrap()))
    {
        let line = by_request
            .get(record["request_id"].as_str().unwrap())
            .with_context(|| format!("no access-log line for {record}"))?;
        assert_eq!(line["route_name"], record["route"]);
        assert_eq!(line["method"], record["method"]);
        let expected = if record["decision"] == "allow" {
            200
        } else {
            403
        };
        assert_eq!(line["response_code"], expected, "{record}\n{line}");
        assert!(record["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    assert_verifies(policy(&stack));
    Ok(())
}

/// Steady load through Envoy while the policy server is killed (SIGKILL) and restarted
/// four times: every decision a client or upstream saw is in the log exactly once and the
/// chain verifies across the restarts.
#[tokio::test(flavor = "multi_thread")]
async fn decisions_survive_kill_9_under_load() -> Result<()> {
    let mut stack = Stack::builder().start().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for worker in 0..6 {
        let http = stack.http().clone();
        let urls = [
            stack.url("/t/closed/v1/chat/completions"),
            stack.url("/t/regulated/v1/chat/completions"),
        ];
        let stop = Arc::clone(&stop);
        clients.push(tokio::spawn(async move {
            let mut replies = Vec::new();
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                let url = &urls[i % 2];
                i += 1;
                let reply = Reply::read(http.post(url).json(&chat_body()).send().await?).await?;
                replies.push(reply);
            }
            anyhow::Ok(replies)
        }));
    }
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        stack.policy()?.stop();
        tokio::time::sleep(Duration::from_millis(150)).await;
        stack.policy()?.restart().await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut denied = Vec::new();
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for client in clients {
        for reply in client.await?? {
            *statuses.entry(reply.status).or_default() += 1;
            match reply.status {
                403 => denied.push(reply.json()?),
                200 | 503 => {}
                other => panic!("unexpected status {other}: {}", reply.text()),
            }
        }
    }
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 10,
        "{statuses:?}"
    );
    assert!(
        statuses.get(&403).copied().unwrap_or(0) > 10,
        "{statuses:?}"
    );

    let seen = seen_ids(&stack, &denied);
    let records = policy(&stack).audit_records()?;
    let mut logged: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *logged
            .entry(record["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let missing: Vec<&String> = seen.iter().filter(|id| !logged.contains_key(*id)).collect();
    assert!(missing.is_empty(), "answered but not recorded: {missing:?}");
    assert!(logged.values().all(|n| *n == 1), "a record written twice");
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=records.len() as u64).collect::<Vec<_>>());
    assert_verifies(policy(&stack));
    eprintln!(
        "kill -9 under load: {statuses:?}, {} decisions seen, {} records",
        seen.len(),
        records.len()
    );
    Ok(())
}

/// Sets the soft file-size limit of a running process (`None`: unlimited). Past it every
/// write fails (EFBIG), which the audit writer handles like a full disk.
fn set_file_size_limit(pid: u32, soft: Option<u64>) -> Result<()> {
    let soft = soft.map_or("unlimited".to_owned(), |n| n.to_string());
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--fsize={soft}:unlimited"))
        .status()
        .context("running prlimit")?;
    anyhow::ensure!(status.success(), "prlimit failed: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unwritable_audit_log_means_no_decision_then_recovers() -> Result<()> {
    let mut stack = Stack::builder()
        .var("TIMEOUT_MS", "2000")
        .plugin_config(r#"{"policy_cluster":"arbiter_policy","timeout_ms":2000}"#)
        // Decision events off: the server's own log must stay smaller than the limit.
        .policy_arg("--log")
        .policy_arg("info,arbiter::decision=warn")
        .start()
        .await?;
    for _ in 0..10 {
        assert_eq!(
            stack.chat("/t/closed/v1/chat/completions").await?.status,
            200
        );
    }
    let audit = policy(&stack).audit_log_path().unwrap().to_owned();
    let size = std::fs::metadata(&audit)?.len();
    let pid = stack.policy()?.pid().unwrap();
    set_file_size_limit(pid, Some(size))?;

    let closed = stack.chat("/t/closed/v1/chat/completions").await?;
    assert_eq!(closed.status, 503, "{}", closed.text());
    let body = closed.json()?;
    assert_eq!(body["error"]["type"], "policy_unavailable", "{body}");
    assert_eq!(body["error"]["reason"], "error", "{body}");

    stack.primary.clear();
    let open = stack.chat("/t/open/v1/chat/completions").await?;
    assert_eq!(open.status, 200, "{}", open.text());
    let upstream = &stack.primary.requests()[0];
    assert_eq!(upstream.header("x-arbiter-fail-open"), Some("error"));
    assert!(!upstream.has_header("x-arbiter-audit-id"));
    assert_eq!(
        policy(&stack).audit_records()?.len(),
        10,
        "no record, no decision"
    );

    set_file_size_limit(pid, None)?;
    eventually(Duration::from_secs(10), "decisions again", || async {
        let reply = stack.chat("/t/closed/v1/chat/completions").await.ok()?;
        (reply.status == 200).then_some(())
    })
    .await?;
    let records = policy(&stack).audit_records()?;
    assert_eq!(records.last().unwrap()["route"], "t_closed");
    assert_verifies(policy(&stack));
    let log = policy(&stack).log();
    assert!(log.contains("audit log not writable"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_and_prompts_stay_out_of_the_audit_log_and_envoy_logs() -> Result<()> {
    let stack = Stack::builder()
        .var("TIMEOUT_MS", "2000")
        .plugin_config(r#"{"policy_cluster":"arbiter_policy","timeout_ms":2000}"#)
        .policy_arg("--redact-header")
        .policy_arg("x-tenant-pin")
        .start()
        .await?;
    let secrets = [
        "sk-live-AAAA1111",
        "COOKIE2222",
        "sk-key-BBBB3333",
        "PIN-4242",
        "TOP-SECRET-PROMPT-5555",
    ];
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": secrets[4]}],
    });
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = stack
        .post_json_with(
            "/t/body/v1/chat/completions",
            &[
                ("authorization", &format!("Bearer {}", secrets[0])),
                ("cookie", &format!("session={}", secrets[1])),
                ("x-api-key", secrets[2]),
                ("x-tenant-pin", secrets[3]),
                ("traceparent", traceparent),
            ],
            &body,
        )
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    stack.envoy.wait_access_log(1).await?;

    let policy = policy(&stack);
    let mut texts = Vec::new();
    for file in policy.audit_files()? {
        texts.push((file.display().to_string(), std::fs::read_to_string(file)?));
    }
    // The decision's own line included: the secrets must not be in it either.
    texts.push(("policy server log".into(), policy.decisions_logged().await?));
    texts.push(("envoy log".into(), stack.envoy.log()));
    texts.push((
        "access log".into(),
        std::fs::read_to_string(stack.envoy.access_log_path())?,
    ));
    for (name, text) in &texts {
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "`{secret}` found in {name}:\n{text}"
            );
        }
    }
    let record = &policy.audit_records()?[0];
    for header in ["authorization", "cookie", "x-api-key", "x-tenant-pin"] {
        assert_eq!(record["headers"][header], "[redacted]", "{record}");
    }
    assert_eq!(record["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    // The route sends the body (`include_body`): the record holds its hash and length,
    // never its text.
    let sent = serde_json::to_vec(&body)?;
    assert_eq!(
        record["prompt_sha256"],
        hex::encode(sha2::Sha256::digest(&sent)),
        "{record}"
    );
    assert_eq!(record["body_bytes"], sent.len());
    assert_eq!(record["body_truncated"], false);
    assert_verifies(policy);
    Ok(())
}

/// The incident: the policy server is down while callers use an `open` route (and a
/// `closed` one); afterwards `arbiter audit replay` over Envoy's access log and the audit
/// log names exactly the requests policy refuses.
#[tokio::test(flavor = "multi_thread")]
async fn replay_names_the_requests_let_through_that_policy_denies() -> Result<()> {
    let mut stack = Stack::builder()
        .var("TIMEOUT_MS", "2000")
        .plugin_config(r#"{"policy_cluster":"arbiter_policy","timeout_ms":2000}"#)
        .start()
        .await?;
    assert_eq!(
        stack.chat("/t/closed/v1/chat/completions").await?.status,
        200
    );
    stack.policy()?.stop();

    // (method, path, would policy deny it?)
    let incident = [
        (Method::POST, "/t/open/v1/chat/completions", false),
        (Method::GET, "/t/open/v1/models", false),
        (Method::GET, "/t/open/admin/users", true),
        (Method::POST, "/t/open/v1/embeddings", false),
        (Method::DELETE, "/t/open/v1/files/f-1", true),
        (Method::POST, "/t/open/v1/chat/completions", false),
    ];
    for (method, path, _) in &incident {
        let reply = send(&stack, method.clone(), path).await??;
        assert_eq!(reply.status, 200, "{method} {path}: {}", reply.text());
    }
    let closed = stack.chat("/t/closed/v1/chat/completions").await?;
    assert_eq!(closed.status, 503);

    stack.policy()?.restart().await?;
    eventually(Duration::from_secs(15), "decisions again", || async {
        let reply = stack.chat("/v1/chat/completions").await.ok()?;
        (reply.status == 200 && reply.header("x-mock-provider").is_some()).then_some(())
    })
    .await?;
    let lines = stack.envoy.wait_access_log(incident.len() + 3).await?;
    let records = lines
        .iter()
        .filter(|l| {
            l["arbiter_record"]
                .as_str()
                .is_some_and(|r| r.starts_with('{'))
        })
        .count();
    assert!(records > incident.len(), "{lines:?}");

    let policies = stack.workspace().join("examples/ai-gateway/policies");
    let mut args = vec![
        "audit".into(),
        "replay".into(),
        "--json".into(),
        "--policies".into(),
        policies.into_os_string(),
        stack.envoy.access_log_path().into(),
    ];
    args.extend(policy(&stack).audit_files()?.into_iter().map(Into::into));
    let (code, out) = arbiter_e2e::stack::arbiter_cli(&args)?;
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    assert_eq!(report["fail_open"]["replayed"], incident.len(), "{report}");
    assert!(
        report["server"]["replayed"].as_u64().unwrap() >= 2,
        "{report}"
    );
    assert_eq!(report["server"]["differ"], 0, "{report}");

    let mut denied: Vec<(String, String)> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["verdict"] == "would have been denied")
        .map(|d| {
            assert_eq!(d["recorded"]["kind"], "fail_open", "{d}");
            (
                d["method"].as_str().unwrap().to_owned(),
                d["path"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    denied.sort();
    let mut expected: Vec<(String, String)> = incident
        .iter()
        .filter(|(_, _, deny)| *deny)
        .map(|(m, p, _)| (m.to_string(), (*p).to_owned()))
        .collect();
    expected.sort();
    assert_eq!(denied, expected, "{report}");

    // The closed route refused a request policy allows (so may the `chat` requests that
    // met the filter's open breaker while waiting for the server to come back).
    let allowed: Vec<&Value> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["verdict"] == "would have been allowed")
        .collect();
    assert!(
        allowed
            .iter()
            .all(|d| d["recorded"]["kind"] == "fail_closed"),
        "{report}"
    );
    assert_eq!(
        allowed.iter().filter(|d| d["route"] == "t_closed").count(),
        1,
        "{report}"
    );

    // The text report says the same for humans.
    let mut text_args = args.clone();
    text_args.retain(|a| a != "--json");
    let (code, text) = arbiter_e2e::stack::arbiter_cli(&text_args)?;
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("2 would have been denied"), "{text}");
    Ok(())
}

/// A request answered from the allow-cache is attributable through Envoy's access log: its
/// line carries an Envoy-side record naming the decision that allowed it, that decision is
/// in the audit log, and replay re-decides the cached request as allowed by it.
#[tokio::test(flavor = "multi_thread")]
async fn cached_allows_leave_a_record_naming_their_decision() -> Result<()> {
    let stack = Stack::builder().start().await?;
    let path = "/t/cached/v1/chat/completions";
    assert_eq!(stack.chat(path).await?.status, 200);
    assert_eq!(stack.chat(path).await?.status, 200);
    let upstream = stack.primary.requests();
    assert_eq!(upstream.len(), 2);
    let audit_id = upstream[0]
        .header("x-arbiter-audit-id")
        .context("no audit id upstream")?
        .to_owned();

    let lines = stack.envoy.wait_access_log(2).await?;
    let by_outcome = |outcome: &str| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["arbiter_outcome"] == outcome)
            .collect()
    };
    let (decided, cached) = (by_outcome("allow"), by_outcome("cached"));
    assert_eq!((decided.len(), cached.len()), (1, 1), "{lines:?}");
    let record: Value = serde_json::from_str(
        cached[0]["arbiter_record"]
            .as_str()
            .with_context(|| format!("no record: {}", cached[0]))?,
    )?;
    assert_eq!(record["outcome"], "cached", "{record}");
    assert_eq!(record["audit_id"], audit_id.as_str(), "{record}");
    assert_eq!(record["request_id"], cached[0]["request_id"], "{record}");
    assert_ne!(record["request_id"], decided[0]["request_id"], "{record}");
    assert_eq!(record["route"], "t_cached");
    assert_eq!(record["method"], "POST");
    assert_eq!(record["path"], path);
    assert!(
        record["source"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{record}"
    );
    assert!(record["ts"].as_str().unwrap().ends_with('Z'), "{record}");
    let decision = policy(&stack)
        .audit_records()?
        .into_iter()
        .find(|r| r["id"] == audit_id.as_str())
        .context("the decision named is not in the audit log")?;
    assert_eq!(decision["decision"], "allow");
    assert_eq!(decision["request_id"], decided[0]["request_id"]);

    let policies = stack.workspace().join("examples/ai-gateway/policies");
    let mut args = vec![
        "audit".into(),
        "replay".into(),
        "--json".into(),
        "--policies".into(),
        policies.into_os_string(),
        stack.envoy.access_log_path().into(),
    ];
    args.extend(policy(&stack).audit_files()?.into_iter().map(Into::into));
    let (code, out) = arbiter_e2e::stack::arbiter_cli(&args)?;
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    assert_eq!(report["cached"]["replayed"], 1, "{report}");
    assert_eq!(report["cached"]["differ"], 0, "{report}");
    assert_eq!(report["incomplete"], serde_json::json!([]), "{report}");
    Ok(())
}
