//! Provider failover end to end: real Envoy with the shipped retry policy and local-reply
//! mapping, the real wasm filter and policy server, and mock providers that answer a chosen
//! status, reset or refuse. Each case asserts which provider got the request, how many times
//! and with which bytes (the one decided request, never anything undecided), what the caller
//! got, and the counter an SRE alerts on.
#![allow(clippy::unwrap_used)]

use anyhow::Result;
use arbiter_e2e::adversary::{
    filter_counter, filter_stat, patient_stack, wait_filter_counter, Answer, H1Conn, H1Request,
    H2Conn, Head, Proto,
};
use arbiter_e2e::mock_llm::{Mode, Received, STATUS_RETRY_AFTER};
use arbiter_e2e::stack::{Reply, Stack};
use reqwest::Method;
use serde_json::{json, Value};

/// A closed route with the patient plugin default timeout (3 s): the cases are about
/// providers, and a policy call must not time out because this 2-core box is busy.
const CHAT: &str = "/t/nometa/v1/chat/completions";
/// A route that sends the body to policy (`include_body`), so the decided body is the one
/// policy read.
const BODY_CHAT: &str = "/t/body/v1/chat/completions";
/// Requests that failed on every provider: the counter of "all providers failed".
const ALL_FAILED: &str = "cluster.llm.upstream_rq_retry_limit_exceeded";

/// A chat body naming `tag`, so each request is recognisable at the providers.
fn chat_request(tag: &str) -> Vec<u8> {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": tag}]})
        .to_string()
        .into_bytes()
}

async fn post(stack: &Stack, path: &str, body: &[u8]) -> Result<Reply> {
    stack
        .send(
            stack
                .request(Method::POST, path)
                .header("content-type", "application/json")
                .body(body.to_vec()),
        )
        .await
}

async fn stat(stack: &Stack, name: &str) -> Result<u64> {
    Ok(stack.stats().await?.get(name).copied().unwrap_or(0))
}

/// Both providers answer normally again, and one request is served by the primary: a
/// success resets outlier detection's count of consecutive failures, so the next case finds
/// the primary in rotation (five failures in a row would eject it for 10 s).
async fn recover(stack: &Stack) -> Result<()> {
    stack.primary.set_mode(Mode::Ok).await?;
    stack.backup.set_mode(Mode::Ok).await?;
    let reply = stack.chat(CHAT).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.provider(),
        Some("primary"),
        "the primary is in rotation"
    );
    stack.primary.clear();
    stack.backup.clear();
    Ok(())
}

/// The one decided request each provider in `seen` received: exactly `body`, carrying the
/// decision's audit id (the same one at every provider: one decision, several tries).
#[track_caller]
fn assert_one_decided_request(seen: &[(&str, Vec<Received>)], path: &str, body: &[u8]) {
    let mut audit_ids = Vec::new();
    for (provider, requests) in seen {
        assert_eq!(requests.len(), 1, "{provider} got {requests:?}");
        let request = &requests[0];
        assert_eq!(request.path, path, "{provider}");
        assert_eq!(
            request.body_raw.as_ref(),
            body,
            "{provider}: the body differs"
        );
        let audit_id = request.header("x-arbiter-audit-id");
        assert!(audit_id.is_some_and(|id| !id.is_empty()), "{provider}");
        assert!(!request.has_header("x-arbiter-fail-open"), "{provider}");
        audit_ids.push(audit_id.unwrap().to_owned());
    }
    audit_ids.dedup();
    assert_eq!(
        audit_ids.len(),
        1,
        "one decision for every try: {audit_ids:?}"
    );
}

/// Envoy's answer when no provider could answer: Arbiter's JSON error shape.
#[track_caller]
fn assert_provider_unavailable(reply: &Reply, route: &str) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.provider(), None, "Envoy answers, not a provider");
    let body = reply.json().unwrap();
    assert_eq!(body["error"]["type"], "provider_unavailable", "{body}");
    assert_eq!(body["error"]["route"], route, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no LLM provider")),
        "{body}"
    );
    assert!(
        body["error"]["request_id"]
            .as_str()
            .is_some_and(|id| id.len() >= 32),
        "{body}"
    );
}

/// The access-log line of the request with `request_id`.
async fn log_line(stack: &Stack, request_id: &str, lines: usize) -> Result<Value> {
    let all = stack.envoy.wait_access_log(lines).await?;
    all.iter()
        .find(|l| l["request_id"] == request_id)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no access-log line for {request_id}: {all:?}"))
}

/// Each failure of the primary that an AI gateway fails over on (429, 500, 502, 503, 504,
/// a reset before the response, a refused connection) is served by the backup, on a plain
/// and on a body route: the backup gets the same decided request, byte for byte, once.
#[tokio::test(flavor = "multi_thread")]
async fn every_retriable_failure_of_the_primary_is_served_by_the_backup() -> Result<()> {
    let stack = patient_stack().start().await?;
    let failures = [
        Mode::Status(429),
        Mode::Status(500),
        Mode::Status(502),
        Mode::Status(503),
        Mode::Status(504),
        Mode::Reset,
        Mode::Refuse,
    ];
    let mut requests = 0;
    for failure in failures {
        recover(&stack).await?;
        requests += 1;
        stack.primary.set_mode(failure).await?;
        for path in [CHAT, BODY_CHAT] {
            let body = chat_request(&format!("{failure:?} on {path}"));
            let reply = post(&stack, path, &body).await?;
            requests += 1;
            assert_eq!(reply.status, 200, "{failure:?} {path}: {}", reply.text());
            assert_eq!(reply.provider(), Some("backup"), "{failure:?} {path}");
            let mut seen = vec![("backup", stack.backup.requests())];
            if failure == Mode::Refuse {
                assert!(stack.primary.requests().is_empty());
            } else {
                seen.push(("primary", stack.primary.requests()));
            }
            assert_one_decided_request(&seen, path, &body);
            stack.primary.clear();
            stack.backup.clear();
        }
    }
    let stats = stack.stats().await?;
    assert_eq!(
        filter_counter(&stats, "checks.allow"),
        requests,
        "one decision per request, not per try"
    );
    assert_eq!(
        stats.get("cluster.llm.upstream_rq_retry").copied(),
        Some(14)
    );
    assert_eq!(
        stats.get("cluster.llm.upstream_rq_retry_success").copied(),
        Some(14)
    );
    assert_eq!(stats.get(ALL_FAILED).copied().unwrap_or(0), 0);
    Ok(())
}

/// A 4xx other than 429 is the caller's fault: the backup would refuse it too. It goes back
/// as the provider sent it, and the backup never sees the request.
#[tokio::test(flavor = "multi_thread")]
async fn client_errors_are_returned_as_sent_and_never_retried() -> Result<()> {
    let stack = patient_stack().start().await?;
    for code in [400, 401, 403, 404, 409, 413, 422] {
        stack.primary.set_mode(Mode::Status(code)).await?;
        let body = chat_request(&format!("status {code}"));
        let reply = post(&stack, CHAT, &body).await?;
        assert_eq!(reply.status, code, "{}", reply.text());
        assert_eq!(reply.provider(), Some("primary"));
        assert_eq!(reply.json()?["error"]["type"], "mock_status");
        assert!(stack.backup.requests().is_empty(), "{code} was retried");
        assert_one_decided_request(&[("primary", stack.primary.requests())], CHAT, &body);
        stack.primary.clear();
    }
    let stats = stack.stats().await?;
    assert_eq!(stats.get("cluster.llm.upstream_rq_retry").copied(), Some(0));
    assert_eq!(stats.get(ALL_FAILED).copied().unwrap_or(0), 0);
    Ok(())
}

/// When every provider fails, the caller gets one clear answer and the request is counted
/// once. No answer at all (refused, reset) becomes Arbiter's JSON shape, `503`
/// `provider_unavailable` with `retry-after`; a provider's own answer (its 429 with its
/// `retry-after`, its 500) reaches the caller as the last provider sent it, which is what
/// SDKs read to back off.
#[tokio::test(flavor = "multi_thread")]
async fn when_every_provider_fails_the_caller_gets_one_clear_answer() -> Result<()> {
    /// What the caller should get.
    enum Expect {
        ProviderUnavailable,
        FromBackup(u16),
    }
    let stack = patient_stack().start().await?;
    // Ordered so that neither provider fails five times in a row (outlier ejection).
    let cases = [
        (Mode::Refuse, Mode::Refuse, Expect::ProviderUnavailable),
        (Mode::Reset, Mode::Reset, Expect::ProviderUnavailable),
        (
            Mode::Status(429),
            Mode::Status(429),
            Expect::FromBackup(429),
        ),
        (
            Mode::Status(503),
            Mode::Status(500),
            Expect::FromBackup(500),
        ),
        (Mode::Status(502), Mode::Reset, Expect::ProviderUnavailable),
        (Mode::Refuse, Mode::Status(503), Expect::FromBackup(503)),
        (
            Mode::Status(504),
            Mode::Status(429),
            Expect::FromBackup(429),
        ),
    ];
    let mut lines = 0;
    for (n, (primary, backup, expect)) in cases.into_iter().enumerate() {
        recover(&stack).await?;
        lines += 1;
        let case = format!("primary {primary:?}, backup {backup:?}");
        stack.primary.set_mode(primary).await?;
        stack.backup.set_mode(backup).await?;
        let body = chat_request(&case);
        let reply = post(&stack, CHAT, &body).await?;
        lines += 1;
        let request_id = match expect {
            Expect::ProviderUnavailable => {
                assert_provider_unavailable(&reply, "t_nometa");
                reply.json()?["error"]["request_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
            Expect::FromBackup(code) => {
                assert_eq!(reply.status, code, "{case}: {}", reply.text());
                assert_eq!(reply.provider(), Some("backup"), "{case}");
                let error = reply.json()?;
                assert_eq!(error["error"]["type"], "mock_status", "{case}: {error}");
                let retry_after = matches!(code, 429 | 503).then_some(STATUS_RETRY_AFTER);
                assert_eq!(reply.header("retry-after"), retry_after, "{case}");
                stack.backup.requests()[0]
                    .header("x-request-id")
                    .unwrap()
                    .to_owned()
            }
        };
        let mut seen = Vec::new();
        for (name, mode, mock) in [
            ("primary", primary, &stack.primary),
            ("backup", backup, &stack.backup),
        ] {
            if mode == Mode::Refuse {
                assert!(mock.requests().is_empty(), "{case}");
            } else {
                seen.push((name, mock.requests()));
            }
        }
        if !seen.is_empty() {
            assert_one_decided_request(&seen, CHAT, &body);
        }
        assert_eq!(stat(&stack, ALL_FAILED).await?, n as u64 + 1, "{case}");
        let line = log_line(&stack, &request_id, lines).await?;
        assert_eq!(line["arbiter_outcome"], "allow", "{case}: {line}");
        assert_eq!(line["attempts"], 2, "{case}: {line}");
        assert!(
            line["response_flags"]
                .as_str()
                .is_some_and(|f| f.contains("URX")),
            "{case}: {line}"
        );
    }
    Ok(())
}

/// The mapping rewrites Envoy's replies about providers only: Arbiter's deny and
/// fail-closed answers keep their status, body and headers while every provider is down,
/// a fail-open request that then finds no provider gets `provider_unavailable`, not
/// `policy_unavailable`, and one that fails over keeps its `x-arbiter-fail-open` marker.
#[tokio::test(flavor = "multi_thread")]
async fn arbiters_own_answers_are_not_rewritten() -> Result<()> {
    let mut stack = patient_stack().start().await?;
    stack.primary.set_mode(Mode::Refuse).await?;
    stack.backup.set_mode(Mode::Refuse).await?;

    let reply = stack.chat("/t/regulated/v1/chat/completions").await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    let body = reply.json()?;
    assert_eq!(body["error"]["type"], "policy_denied", "{body}");
    assert!(body["error"]["policy_ids"].is_array(), "{body}");
    assert!(reply.header("retry-after").is_none());

    stack.policy()?.stop();
    let reply = stack.chat("/t/closed/v1/chat/completions").await?;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some("1"));
    let body = reply.json()?;
    assert_eq!(body["error"]["type"], "policy_unavailable", "{body}");
    assert_eq!(body["error"]["reason"], "unreachable", "{body}");
    assert_eq!(body["error"]["route"], "t_closed", "{body}");

    let reply = stack.chat("/t/open/v1/chat/completions").await?;
    assert_provider_unavailable(&reply, "t_open");
    assert_eq!(stack.upstream_requests(), 0);

    // A request let through on an open route keeps its marker on every try.
    stack.primary.set_mode(Mode::Status(503)).await?;
    stack.backup.set_mode(Mode::Ok).await?;
    let reply = stack.chat("/t/open/v1/chat/completions").await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("backup"));
    for seen in [stack.primary.requests(), stack.backup.requests()] {
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].header("x-arbiter-fail-open"), Some("unreachable"));
    }

    let stats = stack.stats().await?;
    assert_eq!(filter_counter(&stats, "checks.deny"), 1);
    assert_eq!(filter_counter(&stats, "checks.fail_closed"), 1);
    assert_eq!(filter_counter(&stats, "checks.fail_open"), 2);
    assert_eq!(stats.get(ALL_FAILED).copied(), Some(1), "only the open one");
    Ok(())
}

/// Envoy lets only 3 retries per cluster be in flight by default; the shipped config lets
/// every request fail over, so many callers failing over at once all reach the backup.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_failovers_all_reach_the_backup() -> Result<()> {
    const CALLERS: usize = 8;
    let stack = patient_stack().start().await?;
    // A 429 keeps the primary in rotation (not a 5xx), so every caller fails over; the slow
    // backup keeps the retries in flight together.
    stack.primary.set_mode(Mode::Status(429)).await?;
    stack
        .backup
        .set_mode(Mode::Slow(std::time::Duration::from_secs(2)))
        .await?;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLERS {
        let body = chat_request(&format!("caller {i}"));
        let http = stack.http().clone();
        let url = stack.url(CHAT);
        calls.spawn(async move {
            let response = http
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            Reply::read(response).await
        });
    }
    while let Some(joined) = calls.join_next().await {
        let reply = joined??;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.provider(), Some("backup"));
    }
    assert_eq!(stack.primary.requests().len(), CALLERS);
    assert_eq!(stack.backup.requests().len(), CALLERS);
    assert_eq!(
        stat(&stack, "cluster.llm.upstream_rq_retry_overflow").await?,
        0
    );
    Ok(())
}

/// A body still arriving when the decision comes is released after it (the smuggling fix);
/// the router's copy that a retry resends is exactly the released body. Both providers get
/// the whole body once, including bytes that look like a second request, and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_resends_exactly_the_released_body() -> Result<()> {
    let stack = patient_stack().start().await?;
    stack.primary.set_mode(Mode::Status(503)).await?;
    let first = chat_request(&"h".repeat(200));
    let second =
        b"POST /v1/chat/completions/SMUGGLED HTTP/1.1\r\nhost: provider\r\ncontent-length: 2\r\n\r\n{}"
            .to_vec();
    let whole = [first.clone(), second.clone()].concat();
    let path = "/t/closed/v1/chat/completions";
    for proto in Proto::BOTH {
        let allowed = filter_stat(&stack, "checks.allow").await?;
        let answer = match proto {
            Proto::H1 => {
                let mut h1 = H1Conn::to(&stack).await?;
                let request = H1Request::post(path, &whole);
                h1.write(&request.head_bytes()).await?;
                h1.write(&first).await?;
                wait_filter_counter(&stack, "checks.allow", allowed + 1).await?;
                h1.write(&second).await?;
                h1.answer().await?
            }
            Proto::H2 => {
                let mut h2 = H2Conn::to(&stack).await?;
                let head = Head::post(path).content_length(whole.len());
                let mut stream = h2.open(&head, false).await?;
                stream.data(&first, false)?;
                wait_filter_counter(&stack, "checks.allow", allowed + 1).await?;
                stream.data(&second, true)?;
                stream.answer().await?
            }
        };
        let reply = match answer {
            Answer::Reply(reply) => reply,
            Answer::Reset(why) => anyhow::bail!("{proto:?}: no answer: {why}"),
        };
        assert_eq!(reply.status, 200, "{proto:?}: {}", reply.text());
        assert_eq!(reply.provider(), Some("backup"), "{proto:?}");
        // Any undecided request would have reached a provider by now: the answer came after
        // both tries, on connections Envoy keeps per provider.
        assert_one_decided_request(
            &[
                ("primary", stack.primary.requests()),
                ("backup", stack.backup.requests()),
            ],
            path,
            &whole,
        );
        assert_eq!(filter_stat(&stack, "checks.allow").await?, allowed + 1);
        stack.primary.clear();
        stack.backup.clear();
    }
    Ok(())
}

/// A route's own timeout (Envoy's, flag UT) is answered in the same JSON shape, as a 504
/// `provider_timeout`, and is not retried on the backup.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_timeout_is_answered_in_the_same_shape() -> Result<()> {
    let stack = patient_stack().start().await?;
    stack
        .primary
        .set_mode(Mode::Slow(std::time::Duration::from_secs(8)))
        .await?;
    let reply = stack
        .chat("/t/provider-timeout/v1/chat/completions")
        .await?;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json()?;
    assert_eq!(body["error"]["type"], "provider_timeout", "{body}");
    assert_eq!(body["error"]["route"], "t_provider_timeout", "{body}");
    assert_eq!(stack.primary.requests().len(), 1);
    assert!(stack.backup.requests().is_empty());
    assert_eq!(stat(&stack, ALL_FAILED).await?, 0);
    Ok(())
}

/// The shipped provider routes have no total timeout: Envoy's default (15 s) spans the whole
/// response and would cut an answer that takes longer (a long completion, a streamed one).
/// A 16 s answer on a shipped route reaches the caller whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_answer_on_a_shipped_route_is_not_cut_at_15_seconds() -> Result<()> {
    let stack = patient_stack().start().await?;
    let answer_after = std::time::Duration::from_secs(16);
    stack.primary.set_mode(Mode::Slow(answer_after)).await?;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(120))
        .build()?;
    let started = std::time::Instant::now();
    let reply = Reply::read(http.get(stack.url("/v1/models")).send().await?).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));
    assert_eq!(reply.json()?["path"], "/v1/models");
    assert!(started.elapsed() >= answer_after);
    assert!(stack.backup.requests().is_empty());
    Ok(())
}

/// The retriable set is a per-route choice: a route with its own retry policy (here without
/// 429, for a backup that shares the primary's quota) returns the primary's 429 with its
/// `retry-after`, and still fails over on a 503.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_can_choose_its_own_retriable_set() -> Result<()> {
    let stack = patient_stack().start().await?;
    let path = "/t/no-429-failover/v1/chat/completions";
    stack.primary.set_mode(Mode::Status(429)).await?;
    let body = chat_request("no 429 failover");
    let reply = post(&stack, path, &body).await?;
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));
    assert_eq!(reply.header("retry-after"), Some(STATUS_RETRY_AFTER));
    assert!(stack.backup.requests().is_empty());
    assert_one_decided_request(&[("primary", stack.primary.requests())], path, &body);
    stack.primary.clear();

    stack.primary.set_mode(Mode::Status(503)).await?;
    let reply = post(&stack, path, &body).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("backup"));
    assert_one_decided_request(
        &[
            ("primary", stack.primary.requests()),
            ("backup", stack.backup.requests()),
        ],
        path,
        &body,
    );
    Ok(())
}

/// How much body Envoy keeps for a retry is the downstream stream's buffer limit: over
/// HTTP/1.1 the listener's `per_connection_buffer_limit_bytes` (1 MiB by default), over
/// HTTP/2 the stream's flow-control window (256 MiB by default). A 2 MiB body over HTTP/2
/// fails over whole; over HTTP/1.1 (sent after the decision, so the filter does not answer
/// 413 while holding it) it is not kept: the primary's answer reaches the caller as it is,
/// and Envoy counts the abandoned retry. The README states this limit; this test keeps it
/// honest.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_beyond_the_retry_buffer_gets_the_primarys_answer() -> Result<()> {
    let stack = patient_stack().start().await?;
    stack.primary.set_mode(Mode::Status(503)).await?;
    let body = chat_request(&"x".repeat(2 << 20));

    let mut h2 = H2Conn::to(&stack).await?;
    let head = Head::post(CHAT).content_length(body.len());
    let mut stream = h2.open(&head, false).await?;
    stream.data(&body, true)?;
    let reply = match stream.answer().await? {
        Answer::Reply(reply) => reply,
        Answer::Reset(why) => anyhow::bail!("HTTP/2: no answer: {why}"),
    };
    assert_eq!(reply.status, 200, "HTTP/2: {}", reply.text());
    assert_eq!(reply.provider(), Some("backup"));
    assert_one_decided_request(
        &[
            ("primary", stack.primary.requests()),
            ("backup", stack.backup.requests()),
        ],
        CHAT,
        &body,
    );
    assert_eq!(
        stat(&stack, "cluster.llm.retry_or_shadow_abandoned").await?,
        0
    );
    stack.primary.clear();
    stack.backup.clear();

    let allowed = filter_stat(&stack, "checks.allow").await?;
    let mut h1 = H1Conn::to(&stack).await?;
    h1.write(&H1Request::post(CHAT, &body).head_bytes()).await?;
    wait_filter_counter(&stack, "checks.allow", allowed + 1).await?;
    h1.write(&body).await?;
    let reply = match h1.answer().await? {
        Answer::Reply(reply) => reply,
        Answer::Reset(why) => anyhow::bail!("HTTP/1.1: no answer: {why}"),
    };
    assert_eq!(reply.status, 503, "HTTP/1.1: {}", reply.text());
    assert_eq!(reply.provider(), Some("primary"), "{}", reply.text());
    assert_eq!(reply.header("retry-after"), Some(STATUS_RETRY_AFTER));
    assert!(stack.backup.requests().is_empty());
    assert_one_decided_request(&[("primary", stack.primary.requests())], CHAT, &body);
    assert_eq!(
        stat(&stack, "cluster.llm.retry_or_shadow_abandoned").await?,
        1
    );
    Ok(())
}
