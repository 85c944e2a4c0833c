//! The adversarial tier: real Envoy, the real wasm filter and the real policy server, tried
//! as an attacker and as an unlucky operator would, over HTTP/1.1 and HTTP/2. Every case
//! settles a [`Ledger`]: (a) the upstream saw nothing that was not allowed or marked
//! fail-open, (b) every request that reached the filter has exactly one outcome and the
//! server recorded its decisions, (c) no wasm VM crashed or reloaded.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use arbiter_e2e::adversary::{
    error_kind, filter_counter, filter_stat, patient_stack, policy_calls, send, send_all, send_ok,
    wait_active_requests, wait_filter_counter, wait_idle, wait_policy_call, Answer, Framing,
    H1Body, H1Conn, H1Request, H2Conn, Head, Ledger, Outcomes, Proto, Req, Settled,
    FORWARD_TRAILERS,
};
use arbiter_e2e::fault::Fault;
use arbiter_e2e::mock_llm::Mode;
use arbiter_e2e::stack::{Reply, Stack};
use arbiter_e2e::util::eventually;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
/// Resolves to the identified caller `acme-batch` (examples/ai-gateway/policies).
const APPROVED_KEY: &str = "demo-key-acme-batch";
const TRAILERS: [(&str, &str); 2] = [("x-checksum", "c0ffee"), ("x-stream-end", "1")];

fn chat(model: &str) -> Vec<u8> {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

/// A chat body of exactly `size` bytes (`size` >= 70) naming `model`.
fn chat_of_size(model: &str, size: usize) -> Vec<u8> {
    let empty = chat_with(model, "").len();
    assert!(size >= empty, "{size} < {empty}");
    let body = chat_with(model, &"x".repeat(size - empty));
    assert_eq!(body.len(), size);
    body
}

fn chat_with(model: &str, content: &str) -> Vec<u8> {
    json!({"model": model, "messages": [{"role": "user", "content": content}]})
        .to_string()
        .into_bytes()
}

fn path(route: &str) -> String {
    format!("{route}{CHAT}")
}

#[track_caller]
fn assert_denied(reply: &Reply, policy: &str) {
    assert_eq!(reply.status, 403, "{}", reply.text());
    let body = reply.json().unwrap();
    assert_eq!(body["error"]["type"], "policy_denied", "{body}");
    assert_eq!(body["error"]["policy_ids"], json!([policy]), "{body}");
}

#[track_caller]
fn assert_unavailable(reply: &Reply, reason: &str) {
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(
        error_kind(reply),
        ("policy_unavailable".to_owned(), reason.to_owned()),
        "{}",
        reply.text()
    );
}

#[track_caller]
fn assert_upstream(reply: &Reply) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.provider().is_some(), "{}", reply.text());
}

// ---------------------------------------------------------------------------------------
// Trailers

/// Each route kind, with the server answering and then hanging: trailers never release a
/// request before its decision (or fail mode).
#[tokio::test(flavor = "multi_thread")]
async fn trailers_are_held_until_the_decision_on_every_route_kind() -> Result<()> {
    let stack = patient_stack().start().await?;
    let case = |proto: Proto, what: &str| format!("{proto:?}: {what}");

    for proto in Proto::BOTH {
        // One caller per protocol, so the cached case starts empty each time.
        let caller = format!("trailers-{proto:?}");
        let ledger = Ledger::take(&stack).await?;
        let reply = send_ok(
            &stack,
            proto,
            &Req::post(&path("/t/regulated"), chat("gpt-4o-mini")).trailers(&TRAILERS),
        )
        .await?;
        assert_denied(&reply, "regulated-requires-identity");
        let reply = send_ok(
            &stack,
            proto,
            &Req::get("/t/regulated/v1/models").trailers(&TRAILERS),
        )
        .await?;
        assert_denied(&reply, "regulated-requires-identity");
        // On a body route trailers complete the body: policy reads the model.
        for req in [
            Req::post(&path("/t/strict-body"), chat("gpt-4o")),
            Req::post(&path("/t/strict-body"), chat("gpt-4o")).no_length(),
            Req::post(&path("/t/body"), chat("o3-mini")).no_length(),
        ] {
            let reply = send_ok(&stack, proto, &req.trailers(&TRAILERS)).await?;
            assert_denied(&reply, "model-allow-list");
        }
        ledger
            .settle(
                &stack,
                &case(proto, "denied with trailers"),
                Outcomes::none().deny(5),
            )
            .await?;

        let ledger = Ledger::take(&stack).await?;
        let allowed = [
            Req::post(&path("/t/closed"), chat("gpt-4o-mini")),
            Req::post(&path("/t/open"), chat("gpt-4o-mini")).no_length(),
            Req::post(&path("/t/strict-body"), chat("gpt-4o-mini")),
            Req::post(&path("/t/strict-body"), chat("gpt-4o-mini")).no_length(),
            Req::get("/t/closed/v1/models"),
        ];
        for req in &allowed {
            assert_upstream(&send_ok(&stack, proto, &req.clone().trailers(&TRAILERS)).await?);
        }
        let settled = ledger
            .settle(
                &stack,
                &case(proto, "allowed with trailers"),
                Outcomes::none().allow(allowed.len() as u64),
            )
            .await?;
        for (req, seen) in allowed.iter().zip(&settled.upstream) {
            assert_eq!(
                seen.body_raw, req.body,
                "{proto:?} {}: body intact",
                req.path
            );
        }

        let ledger = Ledger::take(&stack).await?;
        for _ in 0..2 {
            let req = Req::post(&path("/t/cached"), chat("gpt-4o-mini"))
                .header("x-caller", &caller)
                .trailers(&TRAILERS);
            assert_upstream(&send_ok(&stack, proto, &req).await?);
        }
        let req = Req::post(&path("/t/disabled"), chat("gpt-4o")).trailers(&TRAILERS);
        assert_upstream(&send_ok(&stack, proto, &req).await?);
        ledger
            .settle(
                &stack,
                &case(proto, "cached and disabled with trailers"),
                Outcomes::none().allow(1).cached(1).disabled(1),
            )
            .await?;
    }

    // Under a hanging server every request waits out the same timeout: all at once.
    stack.fault.set(Fault::Blackhole).await?;
    let both = |reqs: Vec<Req>| -> Vec<(Proto, Req)> {
        Proto::BOTH
            .iter()
            .flat_map(|proto| reqs.iter().map(|r| (*proto, r.clone().trailers(&TRAILERS))))
            .collect()
    };
    let ledger = Ledger::take(&stack).await?;
    let closed = both(vec![
        Req::post(&path("/t/closed"), chat("gpt-4o-mini")),
        Req::get("/t/closed/v1/models"),
        Req::post(&path("/t/bounded-body"), chat("gpt-4o-mini")),
        Req::post(&path("/t/bounded-body"), chat("gpt-4o-mini")).no_length(),
    ]);
    for answer in send_all(&stack, &closed).await? {
        assert_unavailable(&answer.reply()?, "timeout");
    }
    ledger
        .settle(
            &stack,
            "closed routes with trailers, server hanging",
            Outcomes::none().fail_closed(closed.len() as u64),
        )
        .await?;

    let ledger = Ledger::take(&stack).await?;
    let open = both(vec![
        Req::post(&path("/t/open"), chat("gpt-4o")),
        Req::post(&path("/t/lenient-body"), chat("gpt-4o")).no_length(),
        Req::get("/t/open/v1/models"),
    ]);
    for answer in send_all(&stack, &open).await? {
        assert_upstream(&answer.reply()?);
    }
    let settled = ledger
        .settle(
            &stack,
            "open routes with trailers, server hanging",
            Outcomes::none().fail_open(open.len() as u64),
        )
        .await?;
    for seen in &settled.upstream {
        assert_eq!(seen.header("x-arbiter-fail-open"), Some("timeout"));
        let (_, sent) = open.iter().find(|(_, r)| r.path == seen.path).unwrap();
        assert_eq!(seen.body_raw, sent.body, "{}: body intact", seen.path);
    }

    // The cached allow still answers; the disabled route never asks.
    for proto in Proto::BOTH {
        let caller = format!("trailers-{proto:?}");
        let ledger = Ledger::take(&stack).await?;
        let req = Req::post(&path("/t/cached"), chat("gpt-4o-mini"))
            .header("x-caller", &caller)
            .trailers(&TRAILERS);
        assert_upstream(&send_ok(&stack, proto, &req).await?);
        let req = Req::post(&path("/t/disabled"), chat("gpt-4o")).trailers(&TRAILERS);
        assert_upstream(&send_ok(&stack, proto, &req).await?);
        ledger
            .settle(
                &stack,
                &case(proto, "cached and disabled, server hanging"),
                Outcomes::none().cached(1).disabled(1),
            )
            .await?;
    }
    Ok(())
}

/// With Envoy told to forward request trailers to the providers (not the shipped default),
/// the filter releases them with the request: intact on allow, cached, fail-open and
/// disabled routes. Envoy itself drops them toward an HTTP/1.1 provider when the request
/// has a `content-length` (no chunked framing to carry them), and drops an HTTP/1.1
/// client's trailer section at its downstream codec.
#[tokio::test(flavor = "multi_thread")]
async fn trailers_reach_the_upstream_intact_when_envoy_forwards_them() -> Result<()> {
    let stack = patient_stack()
        .edit_template(FORWARD_TRAILERS.0, FORWARD_TRAILERS.1)
        .start()
        .await?;
    let sent: Vec<(String, String)> = TRAILERS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let cached = || {
        Req::post(&path("/t/cached"), chat("gpt-4o-mini"))
            .header("x-caller", "trailers")
            .no_length()
            .trailers(&TRAILERS)
    };
    let ledger = Ledger::take(&stack).await?;
    let reqs = [
        Req::post(&path("/t/closed"), chat("gpt-4o-mini"))
            .no_length()
            .trailers(&TRAILERS),
        Req::post(&path("/t/strict-body"), chat("gpt-4o-mini"))
            .no_length()
            .trailers(&TRAILERS),
        cached(),
        cached(),
        Req::post(&path("/t/disabled"), chat("gpt-4o"))
            .no_length()
            .trailers(&TRAILERS),
    ];
    for req in &reqs {
        assert_upstream(&send_ok(&stack, Proto::H2, req).await?);
    }
    // Envoy's own limits, the filter not involved (disabled route): a request with a
    // content-length loses its trailers toward HTTP/1.1, and so does an HTTP/1.1 client's.
    let disabled = Req::post(&path("/t/disabled"), chat("gpt-4o")).trailers(&TRAILERS);
    assert_upstream(&send_ok(&stack, Proto::H2, &disabled).await?);
    assert_upstream(&send_ok(&stack, Proto::H1, &disabled).await?);
    let settled = ledger
        .settle(
            &stack,
            "trailers forwarded",
            Outcomes::none().allow(3).cached(1).disabled(3),
        )
        .await?;
    for (req, seen) in reqs.iter().zip(&settled.upstream) {
        assert_eq!(seen.trailers, sent, "{}", req.path);
        assert_eq!(seen.body_raw, req.body, "{}", req.path);
    }
    for seen in &settled.upstream[reqs.len()..] {
        assert!(seen.trailers.is_empty(), "{seen:?}");
    }

    stack.fault.set(Fault::Blackhole).await?;
    let ledger = Ledger::take(&stack).await?;
    let req = Req::post(&path("/t/lenient-body"), chat("gpt-4o"))
        .no_length()
        .trailers(&TRAILERS);
    assert_upstream(&send_ok(&stack, Proto::H2, &req).await?);
    let settled = ledger
        .settle(
            &stack,
            "trailers forwarded, fail open",
            Outcomes::none().fail_open(1),
        )
        .await?;
    assert_eq!(settled.upstream[0].trailers, sent);
    assert_eq!(settled.upstream[0].body_raw, req.body);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Clients that go away

/// A client that resets or disconnects while its request waits (for the check, or for the
/// rest of its body) leaves the outcome `cancelled` and nothing upstream, on closed and
/// open routes alike.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_before_the_decision_is_cancelled_and_nothing_goes_upstream() -> Result<()> {
    // Long route timeouts: the client, not the timeout, ends each request.
    let stack = patient_stack().var("TIMEOUT_MS", "5000").start().await?;
    let body = chat("gpt-4o-mini");

    // Mid-body on a body route: the filter is still reading the body, no check yet.
    let ledger = Ledger::take(&stack).await?;
    let calls = policy_calls(&stack).await?;
    let long = chat_of_size("gpt-4o-mini", 800);
    let mut h2 = H2Conn::to(&stack).await?;
    let mut stream = h2
        .open(
            &Head::post(&path("/t/body")).content_length(long.len()),
            false,
        )
        .await?;
    stream.data(&long[..300], false)?;
    wait_active_requests(&stack, 1).await?;
    stream.reset();
    wait_idle(&stack).await?;
    let head = H1Request::post(&path("/t/body"), &long).head_bytes();
    for fin in [false, true] {
        let mut h1 = H1Conn::to(&stack).await?;
        h1.write(&head).await?;
        h1.write(&long[..300]).await?;
        wait_active_requests(&stack, 1).await?;
        if fin {
            h1.close().await;
        } else {
            h1.reset();
        }
        wait_idle(&stack).await?;
    }
    let settled = ledger
        .settle(
            &stack,
            "gone mid-body on a body route",
            Outcomes::none().cancelled(3),
        )
        .await?;
    assert_logged_cancelled(&settled);
    assert_eq!(
        policy_calls(&stack).await?,
        calls,
        "no policy call for an incomplete body"
    );

    // While the check is in flight (the server hangs).
    stack.fault.set(Fault::Blackhole).await?;
    for route in ["/t/closed", "/t/open"] {
        let ledger = Ledger::take(&stack).await?;
        let calls = policy_calls(&stack).await?;
        let mut h2 = H2Conn::to(&stack).await?;
        let mut stream = h2
            .open(&Head::post(&path(route)).content_length(body.len()), false)
            .await?;
        stream.data(&body, true)?;
        wait_policy_call(&stack, calls).await?;
        stream.reset();
        for fin in [false, true] {
            let calls = policy_calls(&stack).await?;
            let mut h1 = H1Conn::to(&stack).await?;
            h1.write(&H1Request::post(&path(route), &body).to_bytes())
                .await?;
            wait_policy_call(&stack, calls).await?;
            if fin {
                h1.close().await;
            } else {
                h1.reset();
            }
        }
        let settled = ledger
            .settle(
                &stack,
                &format!("{route}: RST_STREAM / RST / FIN while the check hangs"),
                Outcomes::none().cancelled(3),
            )
            .await?;
        assert_logged_cancelled(&settled);
    }

    // After the decision the request is the upstream's: a reset then is no second outcome.
    stack.fault.set(Fault::Pass).await?;
    stack
        .primary
        .set_mode(Mode::Slow(Duration::from_secs(2)))
        .await?;
    let ledger = Ledger::take(&stack).await?;
    let allowed = filter_stat(&stack, "checks.allow").await?;
    let mut h2 = H2Conn::to(&stack).await?;
    let mut stream = h2
        .open(
            &Head::post(&path("/t/closed")).content_length(body.len()),
            false,
        )
        .await?;
    stream.data(&body, true)?;
    wait_filter_counter(&stack, "checks.allow", allowed + 1).await?;
    eventually(
        Duration::from_secs(10),
        "the request at the provider",
        || async { (!stack.primary.requests().is_empty()).then_some(()) },
    )
    .await?;
    stream.reset();
    wait_idle(&stack).await?;
    ledger
        .settle(
            &stack,
            "reset after the decision",
            Outcomes::none().allow(1),
        )
        .await?;
    stack.primary.set_mode(Mode::Ok).await?;

    // While the check is only late: it may reach the server (and be recorded) before the
    // cancel does. Last, so a late record cannot land in another case's ledger.
    stack.fault.set(Fault::Pass).await?;
    stack
        .fault
        .set(Fault::Delay(Duration::from_millis(300)))
        .await?;
    let ledger = Ledger::take(&stack).await?;
    for route in ["/t/closed", "/t/open"] {
        let calls = policy_calls(&stack).await?;
        let mut h2 = H2Conn::to(&stack).await?;
        let mut stream = h2
            .open(&Head::post(&path(route)).content_length(body.len()), false)
            .await?;
        stream.data(&body, true)?;
        wait_policy_call(&stack, calls).await?;
        stream.reset();
    }
    // Deliver what the delay holds, then count.
    stack.fault.set(Fault::Pass).await?;
    ledger
        .settle(
            &stack,
            "RST_STREAM while the check is delayed",
            Outcomes::none()
                .cancelled(2)
                .extra_server_decisions_at_most(2),
        )
        .await?;
    Ok(())
}

/// Every access-log line Envoy wrote for requests that ended undecided says `cancelled`.
#[track_caller]
fn assert_logged_cancelled(settled: &Settled) {
    for line in &settled.access_log {
        assert_eq!(line["arbiter_outcome"], "cancelled", "{line}");
        assert!(line["upstream_host"].is_null(), "{line}");
    }
}

/// The breaker's half-open probe is cancelled by its client (h2 `RST_STREAM`, then an
/// HTTP/1.1 connection drop): once the server is back, requests are decided by policy
/// again within the cool-down plus a generous bound, on closed and open routes.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_breaker_probe_does_not_wedge_the_breaker() -> Result<()> {
    const THRESHOLD: u64 = 2;
    const COOLDOWN: Duration = Duration::from_millis(500);
    // One worker, so one breaker (it is per worker VM).
    let stack = patient_stack()
        .concurrency(1)
        .plugin_config(format!(
            r#"{{"policy_cluster":"arbiter_policy","timeout_ms":1000,"breaker_threshold":{THRESHOLD},"breaker_cooldown_ms":{}}}"#,
            COOLDOWN.as_millis()
        ))
        .start()
        .await?;
    let body = chat("gpt-4o-mini");
    let closed = Req::post(&path("/t/closed"), &body);
    let open = Req::post(&path("/t/open"), &body);

    for (round, cancel) in [(1u64, "h2 RST_STREAM"), (2, "h1 connection drop")] {
        let ledger = Ledger::take(&stack).await?;
        let mut expect = Outcomes::none();
        assert_upstream(&send_ok(&stack, Proto::H2, &closed).await?);
        expect.allow += 1;

        let opened_at_start = filter_stat(&stack, "breaker.opened").await?;
        stack.fault.set(Fault::Blackhole).await?;
        for _ in 0..THRESHOLD {
            assert_unavailable(&send_ok(&stack, Proto::H1, &closed).await?, "timeout");
        }
        let opened = Instant::now();
        wait_filter_counter(&stack, "breaker.opened", opened_at_start + 1).await?;
        assert_unavailable(&send_ok(&stack, Proto::H1, &closed).await?, "breaker_open");
        expect.fail_closed += THRESHOLD + 1;

        // Wait out the cool-down: the next request is the probe.
        tokio::time::sleep_until((opened + COOLDOWN + Duration::from_millis(50)).into()).await;
        let calls = policy_calls(&stack).await?;
        if round == 1 {
            let mut h2 = H2Conn::to(&stack).await?;
            let mut probe = h2
                .open(
                    &Head::post(&path("/t/closed")).content_length(body.len()),
                    false,
                )
                .await?;
            probe.data(&body, true)?;
            wait_policy_call(&stack, calls).await?;
            probe.reset();
        } else {
            let mut h1 = H1Conn::to(&stack).await?;
            h1.write(&closed.h1().to_bytes()).await?;
            wait_policy_call(&stack, calls).await?;
            h1.reset();
        }
        expect.cancelled += 1;
        wait_idle(&stack).await?;

        // The server is back: within the cool-down (and a generous bound for this box) a
        // request is decided by policy again.
        stack.fault.set(Fault::Pass).await?;
        let deadline = Instant::now() + COOLDOWN + Duration::from_secs(15);
        loop {
            let reply = send_ok(&stack, Proto::H1, &closed).await?;
            if reply.status == 200 {
                expect.allow += 1;
                break;
            }
            assert_eq!(reply.status, 503, "{}", reply.text());
            expect.fail_closed += 1;
            ensure!(
                Instant::now() < deadline,
                "round {round} ({cancel}): still refused {:?} after the server came back: {}",
                COOLDOWN + Duration::from_secs(15),
                reply.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Open routes are decided again, not passed unchecked.
        assert_upstream(&send_ok(&stack, Proto::H2, &open).await?);
        expect.allow += 1;
        let settled = ledger
            .settle(
                &stack,
                &format!("round {round}: probe cancelled by {cancel}"),
                expect,
            )
            .await?;
        let last = settled.upstream.last().unwrap();
        assert!(last.has_header("x-arbiter-audit-id") && !last.has_header("x-arbiter-fail-open"));
        // A first call on a new policy connection may still time out on a loaded box and
        // re-open the breaker once more; every opening must have been closed again.
        let stats = stack.stats().await?;
        let opened = filter_counter(&stats, "breaker.opened");
        assert!(opened >= round, "opened {opened} times by round {round}");
        assert_eq!(filter_counter(&stats, "breaker.closed"), opened);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Slow bodies and many streams

/// Bytes trickling in on a body route: nothing is decided, answered or sent upstream
/// before the body is complete; then policy reads the whole body (a model split across
/// pieces is still seen).
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_body_is_decided_only_once_complete() -> Result<()> {
    let stack = patient_stack().start().await?;
    const PIECES: usize = 4;
    const GAP: Duration = Duration::from_millis(40);
    let route = path("/t/strict-body");

    for (model, status) in [("gpt-4o", 403), ("gpt-4o-mini", 200)] {
        let body = chat(model);
        let piece = body.len().div_ceil(PIECES);
        let pieces: Vec<Vec<u8>> = body.chunks(piece).map(<[u8]>::to_vec).collect();

        for (form, length) in [("h1 content-length", true), ("h1 chunked", false)] {
            let ledger = Ledger::take(&stack).await?;
            let request = if length {
                H1Request::post(&route, &body)
            } else {
                H1Request::post_chunked(&route, pieces.clone())
            };
            let wire = match &request.body {
                H1Body::Length(_) => pieces.clone(),
                _ => request.body_pieces(),
            };
            let mut h1 = H1Conn::to(&stack).await?;
            h1.write(&request.head_bytes()).await?;
            let (last, first) = wire.split_last().unwrap();
            for bytes in first {
                h1.write(bytes).await?;
                tokio::time::sleep(GAP).await;
                ensure!(!h1.has_bytes().await, "{form} {model}: answered mid-body");
                ledger
                    .assert_quiet(&stack, &format!("{form} {model}"))
                    .await?;
            }
            h1.write(last).await?;
            let reply = h1.answer().await?.reply()?;
            assert_eq!(reply.status, status, "{form} {model}: {}", reply.text());
            let settled = ledger.settle(&stack, form, decided(status)).await?;
            if status == 200 {
                assert_eq!(settled.upstream[0].body_raw, body);
            }
        }

        for (form, length) in [("h2 content-length", true), ("h2 no length", false)] {
            let ledger = Ledger::take(&stack).await?;
            let mut head = Head::post(&route);
            if length {
                head = head.content_length(body.len());
            }
            let mut h2 = H2Conn::to(&stack).await?;
            let mut stream = h2.open(&head, false).await?;
            let (last, first) = pieces.split_last().unwrap();
            for bytes in first {
                stream.data(bytes, false)?;
                tokio::time::sleep(GAP).await;
                ensure!(
                    !stream.answered_early(),
                    "{form} {model}: answered mid-body"
                );
                ledger
                    .assert_quiet(&stack, &format!("{form} {model}"))
                    .await?;
            }
            stream.data(last, true)?;
            let reply = stream.answer().await?.reply()?;
            assert_eq!(reply.status, status, "{form} {model}: {}", reply.text());
            let settled = ledger.settle(&stack, form, decided(status)).await?;
            if status == 200 {
                assert_eq!(settled.upstream[0].body_raw, body);
            }
        }
    }
    Ok(())
}

fn decided(status: u16) -> Outcomes {
    if status == 200 {
        Outcomes::none().allow(1)
    } else {
        Outcomes::none().deny(1)
    }
}

/// A body whose first part arrives before the decision and the rest after it reaches the
/// upstream exactly as sent, with and without `content-length`, over both protocols, on a
/// plain route, a body route and an open route failing open.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_split_around_the_decision_reaches_the_upstream_exactly_once() -> Result<()> {
    let stack = patient_stack().start().await?;
    // Over t_body's max_body_bytes, so a body route decides on the first part.
    let body = chat_of_size("gpt-4o-mini", 3000);
    let (first, rest) = body.split_at(1500);
    let mut broken = Vec::new();
    for (route, outcome) in [
        ("/t/closed", "allow"),
        ("/t/body", "allow"),
        ("/t/open", "fail_open"),
    ] {
        if outcome == "fail_open" {
            stack.fault.set(Fault::Blackhole).await?;
        }
        for proto in Proto::BOTH {
            for framing in [Framing::Length, Framing::Unknown] {
                let what = format!("{route} {proto:?} {framing:?}");
                let ledger = Ledger::take(&stack).await?;
                let decided = filter_stat(&stack, &format!("checks.{outcome}")).await?;
                let answer = match proto {
                    Proto::H1 => {
                        let request = match framing {
                            Framing::Length => H1Request::post(&path(route), &body),
                            _ => H1Request::post_chunked(
                                &path(route),
                                vec![first.to_vec(), rest.to_vec()],
                            ),
                        };
                        let pieces = match framing {
                            Framing::Length => vec![first.to_vec(), rest.to_vec()],
                            _ => request.body_pieces(),
                        };
                        let mut h1 = H1Conn::to(&stack).await?;
                        h1.write(&request.head_bytes()).await?;
                        h1.write(&pieces[0]).await?;
                        wait_filter_counter(&stack, &format!("checks.{outcome}"), decided + 1)
                            .await?;
                        for piece in &pieces[1..] {
                            h1.write(piece).await?;
                        }
                        h1.answer().await?
                    }
                    Proto::H2 => {
                        let mut head = Head::post(&path(route));
                        if framing == Framing::Length {
                            head = head.content_length(body.len());
                        }
                        let mut h2 = H2Conn::to(&stack).await?;
                        let mut stream = h2.open(&head, false).await?;
                        stream.data(first, false)?;
                        wait_filter_counter(&stack, &format!("checks.{outcome}"), decided + 1)
                            .await?;
                        stream.data(rest, true)?;
                        stream.answer().await?
                    }
                };
                assert_upstream(&answer.reply()?);
                let mut expect = Outcomes::none();
                if outcome == "allow" {
                    expect.allow = 1;
                } else {
                    expect.fail_open = 1;
                }
                let settled = ledger.settle(&stack, &what, expect).await?;
                let seen = &settled.upstream[0].body_raw;
                if *seen != body {
                    let twice = [first, first].concat();
                    let why = if seen.len() == body.len() + first.len() && seen.ends_with(&body) {
                        " (the part before the decision twice)"
                    } else if seen.len() == body.len() && seen.starts_with(&twice) {
                        " (the part before the decision twice; the rest went past content-length)"
                    } else {
                        ""
                    };
                    broken.push(format!(
                        "{what}: the upstream got {} bytes for {} sent{why}",
                        seen.len(),
                        body.len()
                    ));
                }
            }
        }
    }
    // Denied on the first part: the rest has nowhere to go.
    stack.fault.set(Fault::Pass).await?;
    let cut = chat_of_size("gpt-4o", 3000);
    let (first, rest) = cut.split_at(1500);
    for proto in Proto::BOTH {
        let ledger = Ledger::take(&stack).await?;
        let denied = filter_stat(&stack, "checks.deny").await?;
        let answer = match proto {
            Proto::H1 => {
                let mut h1 = H1Conn::to(&stack).await?;
                h1.write(&H1Request::post(&path("/t/strict-body"), &cut).head_bytes())
                    .await?;
                h1.write(first).await?;
                wait_filter_counter(&stack, "checks.deny", denied + 1).await?;
                h1.write(rest).await?;
                h1.answer().await?
            }
            Proto::H2 => {
                let mut h2 = H2Conn::to(&stack).await?;
                let head = Head::post(&path("/t/strict-body")).content_length(cut.len());
                let mut stream = h2.open(&head, false).await?;
                stream.data(first, false)?;
                wait_filter_counter(&stack, "checks.deny", denied + 1).await?;
                // Envoy may have closed the stream with the answer already.
                let _ = stream.data(rest, true);
                stream.answer().await?
            }
        };
        assert_denied(&answer.reply()?, "body-must-be-readable");
        ledger
            .settle(
                &stack,
                &format!("{proto:?}: denied on the first part"),
                Outcomes::none().deny(1),
            )
            .await?;
    }
    ensure!(
        broken.is_empty(),
        "bodies changed on the way:\n  {}",
        broken.join("\n  ")
    );
    Ok(())
}

/// Request smuggling toward the provider: a `content-length` request whose second half
/// comes after the decision must not turn into a second, undecided request on the upstream
/// connection. (The first half arriving twice upstream would push the second half past the
/// announced length, where the provider reads it as a request of its own.)
#[tokio::test(flavor = "multi_thread")]
async fn no_request_is_smuggled_to_the_provider_behind_a_decided_one() -> Result<()> {
    let stack = patient_stack().start().await?;
    let first = chat_with("gpt-4o-mini", &"h".repeat(250));
    let head = "POST /v1/chat/completions/SMUGGLED HTTP/1.1\r\nhost: provider\r\ncontent-length: 2\r\nx-pad: ";
    let pad = first.len() - head.len() - "\r\n\r\n{}".len();
    let smuggled = format!("{head}{}\r\n\r\n{{}}", "a".repeat(pad)).into_bytes();
    assert_eq!(smuggled.len(), first.len());
    let total = first.len() + smuggled.len();
    for proto in Proto::BOTH {
        let ledger = Ledger::take(&stack).await?;
        let allowed = filter_stat(&stack, "checks.allow").await?;
        let answer = match proto {
            Proto::H1 => {
                let mut h1 = H1Conn::to(&stack).await?;
                let request = H1Request::post(&path("/t/closed"), vec![b'x'; total]);
                h1.write(&request.head_bytes()).await?;
                h1.write(&first).await?;
                wait_filter_counter(&stack, "checks.allow", allowed + 1).await?;
                h1.write(&smuggled).await?;
                h1.answer().await?
            }
            Proto::H2 => {
                let mut h2 = H2Conn::to(&stack).await?;
                let head = Head::post(&path("/t/closed")).content_length(total);
                let mut stream = h2.open(&head, false).await?;
                stream.data(&first, false)?;
                wait_filter_counter(&stack, "checks.allow", allowed + 1).await?;
                stream.data(&smuggled, true)?;
                stream.answer().await?
            }
        };
        assert_upstream(&answer.reply()?);
        let settled = ledger
            .settle(
                &stack,
                &format!("{proto:?}: second half after the decision"),
                Outcomes::none().allow(1),
            )
            .await?;
        assert!(
            settled
                .upstream
                .iter()
                .all(|r| !r.path.contains("SMUGGLED")),
            "{proto:?}: a request nobody decided reached the provider"
        );
    }
    Ok(())
}

/// 1,000 concurrent streams on one HTTP/2 connection: each is answered and decided exactly
/// once, the counters add up, and the upstream saw exactly the allowed ones.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_streams_on_one_connection_are_each_decided_once() -> Result<()> {
    const STREAMS: usize = 1000;
    // Generous timeouts: this case is about accounting, not about a slow debug server.
    let stack = patient_stack()
        .plugin_config(
            r#"{"policy_cluster":"arbiter_policy","timeout_ms":30000,"breaker_threshold":0}"#,
        )
        .var("TIMEOUT_MS", "30000")
        .start()
        .await?;
    // Out of every ten streams one is allowed, one is on a disabled route and eight are
    // denied (four each on a plain and a body route): the decisions are what is under test,
    // and hundreds of simultaneous provider connections would only test Envoy's connect
    // timeout on this box.
    let kind = |i: usize| match i % 10 {
        0 => ("/t/closed", chat("gpt-4o-mini"), 200),
        1 => ("/t/disabled", chat("gpt-4o"), 200),
        2..=5 => ("/t/regulated", chat("gpt-4o-mini"), 403),
        _ => ("/t/strict-body", chat("gpt-4o"), 403),
    };
    let ledger = Ledger::take(&stack).await?;
    let mut h2 = H2Conn::to(&stack).await?;
    let mut answers = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let (route, body, _) = kind(i);
        let head = Head::post(&path(route))
            .content_length(body.len())
            .header("x-stream", i.to_string());
        let mut stream = h2.open(&head, false).await?;
        stream.data(&body, true)?;
        // Generous: the last of 1,000 waits for the 999 before it on a busy box.
        answers.spawn(async move { (i, stream.answer_within(Duration::from_secs(120)).await) });
    }
    let mut answered = vec![0u32; STREAMS];
    let mut passed = Vec::new();
    while let Some(joined) = answers.join_next().await {
        let (i, answer) = joined?;
        let reply = answer?.reply()?;
        answered[i] += 1;
        let (_, _, status) = kind(i);
        if status == 200 && reply.status != 200 {
            // Allowed, then Envoy could not reach a provider in time: its own 503, never
            // the filter's.
            assert_eq!(reply.status, 503, "stream {i}: {}", reply.text());
            assert_ne!(error_kind(&reply).0, "policy_unavailable", "stream {i}");
            continue;
        }
        assert_eq!(reply.status, status, "stream {i}: {}", reply.text());
        if status == 200 {
            passed.push(i);
        }
    }
    assert!(
        answered.iter().all(|n| *n == 1),
        "every stream answered once"
    );
    let tenth = (STREAMS / 10) as u64;
    let settled = ledger
        .settle(
            &stack,
            "1,000 streams",
            Outcomes::none()
                .allow(tenth)
                .disabled(tenth)
                .deny(8 * tenth)
                .upstream(passed.len() as u64),
        )
        .await?;
    // Exactly the allowed streams upstream, each once.
    let mut upstream: Vec<usize> = settled
        .upstream
        .iter()
        .map(|r| r.header("x-stream").unwrap().parse().unwrap())
        .collect();
    upstream.sort_unstable();
    passed.sort_unstable();
    assert_eq!(upstream, passed);
    assert!(
        passed.len() as u64 >= tenth,
        "most allowed streams reached a provider: {} of {}",
        passed.len(),
        2 * tenth
    );
    // One decision per checked stream, none twice.
    let mut ids: Vec<&str> = settled
        .audit
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, 9 * tenth);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Headers

/// Envoy's header limits (60 KiB, 100 headers) refuse floods before any filter runs:
/// HTTP/1.1 gets 431, HTTP/2 a stream reset; nothing is counted or sent upstream. Just
/// under the limits the request is decided normally and arrives whole.
#[tokio::test(flavor = "multi_thread")]
async fn header_floods_and_oversized_headers_never_pass_undecided() -> Result<()> {
    let stack = patient_stack().start().await?;
    let body = chat("gpt-4o-mini");
    let base = || Req::post(&path("/t/closed"), &body);
    let with = |n: usize, name: &dyn Fn(usize) -> String, value: &str| {
        (0..n).fold(base(), |req, i| req.header(&name(i), value))
    };
    let distinct = |i: usize| format!("x-flood-{i}");
    let repeated = |_| "x-flood".to_owned();
    // What Envoy refuses before any filter runs, and the HTTP/1.1 status it answers with
    // (HTTP/2 streams are reset).
    let refused: Vec<(&str, Req, u16)> = vec![
        (
            "one 80 KiB header",
            base().header("x-huge", "a".repeat(80 * 1024)),
            431,
        ),
        ("150 distinct headers", with(150, &distinct, "v"), 431),
        ("150 copies of one header", with(150, &repeated, "v"), 431),
        (
            "70 headers of 1 KiB",
            with(70, &distinct, &"b".repeat(1024)),
            431,
        ),
        (
            "150 forged markers",
            with(150, &|_| "x-arbiter-fail-open".to_owned(), "timeout"),
            431,
        ),
        // Underscore names: `x_api_key` is `x-api-key` to CGI-style upstreams.
        (
            "an underscore credential",
            base().header("x_api_key", APPROVED_KEY),
            400,
        ),
        (
            "an underscore marker",
            base().header("x_envoy_auth_partial_body", "true"),
            400,
        ),
    ];
    for proto in Proto::BOTH {
        for (what, req, status) in &refused {
            let ledger = Ledger::take(&stack).await?;
            let answer = send(&stack, proto, req).await?;
            match (proto, &answer) {
                (Proto::H1, Answer::Reply(reply)) => {
                    assert_eq!(reply.status, *status, "{proto:?} {what}: {}", reply.text())
                }
                (Proto::H2, Answer::Reset(_)) => {}
                _ => panic!("{proto:?} {what}: {answer:?}"),
            }
            let settled = ledger
                .settle(&stack, &format!("{proto:?} {what}"), Outcomes::none())
                .await?;
            // Envoy's codec refused it: no route, no filter (some refusals leave no line).
            for line in &settled.access_log {
                assert!(line["route_name"].is_null(), "{proto:?} {what}: {line}");
            }
        }

        // Just under the limits.
        let ledger = Ledger::take(&stack).await?;
        let under = [
            base().header("x-big", "a".repeat(55 * 1024)),
            with(90, &repeated, "v"),
            with(50, &distinct, &"b".repeat(1000)),
        ];
        for req in &under {
            assert_upstream(&send_ok(&stack, proto, req).await?);
        }
        let settled = ledger
            .settle(
                &stack,
                &format!("{proto:?} just under the header limits"),
                Outcomes::none().allow(3),
            )
            .await?;
        assert_eq!(
            settled.upstream[0].header("x-big").map(str::len),
            Some(55 * 1024)
        );
        let copies = settled.upstream[1]
            .headers
            .iter()
            .filter(|(k, _)| k == "x-flood")
            .count();
        assert_eq!(copies, 90, "{proto:?}: repeated headers arrive as sent");
    }
    Ok(())
}

/// Framing tricks: pipelined HTTP/1.1 requests are each decided in turn; a request with
/// both `content-length` and chunked framing (the smuggling shape) and an upgrade Envoy is
/// not configured for are refused before the filter; `expect: 100-continue` on a body route
/// is decided once the body follows; an HTTP/2 body longer than its `content-length` is
/// reset and ends `cancelled`.
#[tokio::test(flavor = "multi_thread")]
async fn framing_tricks_never_pass_undecided() -> Result<()> {
    let stack = patient_stack().start().await?;
    let body = chat("gpt-4o-mini");

    let ledger = Ledger::take(&stack).await?;
    let pipelined = [
        ("/t/regulated", 403),
        ("/t/closed", 200),
        ("/t/disabled", 200),
        ("/t/strict-body", 403),
        ("/t/closed", 200),
    ];
    let mut wire = Vec::new();
    for (route, status) in pipelined {
        let model = if status == 403 {
            "gpt-4o"
        } else {
            "gpt-4o-mini"
        };
        wire.extend(H1Request::post(&path(route), chat(model)).to_bytes());
    }
    let mut h1 = H1Conn::to(&stack).await?;
    h1.write(&wire).await?;
    for (route, status) in pipelined {
        let reply = h1.answer().await?.reply()?;
        assert_eq!(reply.status, status, "pipelined {route}: {}", reply.text());
    }
    ledger
        .settle(
            &stack,
            "five pipelined requests",
            Outcomes::none().allow(2).deny(2).disabled(1),
        )
        .await?;

    let ledger = Ledger::take(&stack).await?;
    let mut h1 = H1Conn::to(&stack).await?;
    let mut smuggle = format!(
        "POST {} HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
        path("/t/open"),
        body.len()
    )
    .into_bytes();
    smuggle.extend_from_slice(&body);
    smuggle.extend_from_slice(b"\r\n0\r\n\r\n");
    h1.write(&smuggle).await?;
    assert_eq!(h1.answer().await?.status(), Some(400));
    let mut h1 = H1Conn::to(&stack).await?;
    h1.write(
        b"GET /t/open/v1/models HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await?;
    assert_eq!(h1.answer().await?.status(), Some(403));
    ledger
        .settle(&stack, "smuggling shape and upgrade", Outcomes::none())
        .await?;

    let ledger = Ledger::take(&stack).await?;
    let request =
        H1Request::post(&path("/t/strict-body"), chat("gpt-4o")).header("expect", "100-continue");
    let mut h1 = H1Conn::to(&stack).await?;
    h1.write(&request.head_bytes()).await?;
    assert_eq!(h1.answer().await?.status(), Some(100));
    ledger
        .assert_quiet(&stack, "100-continue before the body")
        .await?;
    for piece in request.body_pieces() {
        h1.write(&piece).await?;
    }
    assert_denied(&h1.answer().await?.reply()?, "model-allow-list");
    ledger
        .settle(&stack, "expect: 100-continue", Outcomes::none().deny(1))
        .await?;

    let ledger = Ledger::take(&stack).await?;
    let mut h2 = H2Conn::to(&stack).await?;
    let mut stream = h2
        .open(
            &Head::post(&path("/t/strict-body")).content_length(10),
            false,
        )
        .await?;
    let _ = stream.data(&body, true);
    let answer = stream.answer().await?;
    assert!(matches!(answer, Answer::Reset(_)), "{answer:?}");
    let settled = ledger
        .settle(
            &stack,
            "h2 body longer than its content-length",
            Outcomes::none().cancelled(1),
        )
        .await?;
    assert_logged_cancelled(&settled);
    Ok(())
}

/// Header values with obs-text bytes (0x80–0xFF, not UTF-8) over both protocols: each
/// request has one outcome; they cannot forge an identity, a tenant or a marker.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_in_header_values_has_a_defined_outcome() -> Result<()> {
    let stack = patient_stack().start().await?;
    let body = chat("gpt-4o-mini");
    let junk: &[u8] = b"caf\xe9 \x80\xff\xfe";
    for proto in Proto::BOTH {
        let ledger = Ledger::take(&stack).await?;
        // An ordinary header: decided (allowed) and passed on.
        let reply = send_ok(
            &stack,
            proto,
            &Req::post(&path("/t/closed"), &body).header("x-note", junk),
        )
        .await?;
        assert_upstream(&reply);
        // A key that is not a key: anonymous on the regulated route.
        let reply = send_ok(
            &stack,
            proto,
            &Req::post(&path("/t/regulated"), &body).header("x-api-key", junk),
        )
        .await?;
        assert_denied(&reply, "regulated-requires-identity");
        // A tenant an anonymous caller may not name.
        let reply = send_ok(
            &stack,
            proto,
            &Req::post(&path("/t/closed"), &body).header("x-tenant-id", junk),
        )
        .await?;
        assert_denied(&reply, "tenant-isolation");
        // A forged marker, even undecodable, never arrives.
        let reply = send_ok(
            &stack,
            proto,
            &Req::post(&path("/t/disabled"), &body).header("x-arbiter-fail-open", junk),
        )
        .await?;
        assert_upstream(&reply);
        let settled = ledger
            .settle(
                &stack,
                &format!("{proto:?} obs-text header values"),
                Outcomes::none().allow(1).deny(2).disabled(1),
            )
            .await?;
        assert_eq!(
            settled.upstream[0].header("x-note"),
            Some(String::from_utf8_lossy(junk).as_ref()),
            "{proto:?}: the value went on as sent"
        );
    }

    // Not even a request: invalid bytes in the HTTP/1.1 request target.
    let ledger = Ledger::take(&stack).await?;
    let mut h1 = H1Conn::to(&stack).await?;
    h1.write(b"GET /t/closed/\xff\x80 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await?;
    let answer = h1.answer().await?;
    assert_eq!(answer.status(), Some(400), "{answer:?}");
    ledger
        .settle(&stack, "obs-text in the request target", Outcomes::none())
        .await?;
    Ok(())
}

/// Only the filter speaks for Envoy: a client's `x-arbiter-*` (any case, any number of
/// copies, even a real audit id replayed) and `x-envoy-auth-partial-body` never reach
/// policy or the upstream as the client wrote them, and a client's `x-forwarded-for` is
/// not the source policy sees.
#[tokio::test(flavor = "multi_thread")]
async fn forged_arbiter_and_envoy_headers_never_speak_for_the_filter() -> Result<()> {
    let stack = patient_stack().start().await?;
    // A real audit id to replay.
    assert_upstream(
        &send_ok(
            &stack,
            Proto::H1,
            &Req::post(&path("/t/closed"), chat("gpt-4o-mini")),
        )
        .await?,
    );
    let real_id = stack.primary.requests()[0]
        .header("x-arbiter-audit-id")
        .unwrap()
        .to_owned();
    let forge = |req: Req| {
        req.header("X-Arbiter-Fail-Open", "timeout")
            .header("x-arbiter-fail-open", "unreachable")
            .header("x-arbiter-audit-id", &real_id)
            .header("X-ARBITER-DRY-RUN", "deny")
            .header("x-arbiter-policy-version", "forged")
            .header("X-Envoy-Auth-Partial-Body", "true")
            .header("x-forwarded-for", "10.9.9.9")
            // The default credential header: an identity that is neither approved nor
            // premium, so the decisions below stay denials.
            .header("x-api-key", "demo-key-globex-intern")
    };

    for proto in Proto::BOTH {
        let caller = format!("forged-{proto:?}");
        let ledger = Ledger::take(&stack).await?;
        let decided = [
            (
                forge(Req::post(&path("/t/closed"), chat("gpt-4o-mini"))),
                200,
            ),
            // A body route that lets cut bodies through: were the client's "partial body"
            // believed, policy would skip the model and allow.
            (forge(Req::post(&path("/t/body"), chat("gpt-4o"))), 403),
            (
                forge(
                    Req::post(&path("/t/body"), chat("o3-mini"))
                        .header("x-envoy-auth-partial-body", "TRUE"),
                ),
                403,
            ),
            (
                forge(Req::post(&path("/t/body"), chat("gpt-4o-mini")).no_length()),
                200,
            ),
            (
                forge(Req::post(&path("/t/regulated"), chat("gpt-4o-mini"))),
                403,
            ),
        ];
        for (req, status) in &decided {
            let reply = send_ok(&stack, proto, req).await?;
            assert_eq!(
                reply.status,
                *status,
                "{proto:?} {}: {}",
                req.path,
                reply.text()
            );
            if *status == 403 && req.path.starts_with("/t/body") {
                assert_denied(&reply, "model-allow-list");
            }
        }
        let cached =
            forge(Req::post(&path("/t/cached"), chat("gpt-4o-mini")).header("x-caller", &caller));
        assert_upstream(&send_ok(&stack, proto, &cached).await?);
        assert_upstream(&send_ok(&stack, proto, &cached).await?);
        assert_upstream(
            &send_ok(
                &stack,
                proto,
                &forge(Req::post(&path("/t/disabled"), chat("gpt-4o"))),
            )
            .await?,
        );
        let settled = ledger
            .settle(
                &stack,
                &format!("{proto:?} forged headers"),
                Outcomes::none().allow(3).deny(3).cached(1).disabled(1),
            )
            .await?;
        for seen in &settled.upstream {
            assert!(
                !seen.has_header("x-envoy-auth-partial-body"),
                "{proto:?}: {seen:?}"
            );
            assert_ne!(seen.header("x-arbiter-audit-id"), Some(real_id.as_str()));
            assert!(!seen.has_header("x-arbiter-dry-run"));
            assert_ne!(seen.header("x-arbiter-policy-version"), Some("forged"));
            assert!(!seen.has_header("x-api-key"), "{proto:?}: {seen:?}");
        }
        for record in &settled.audit {
            // Policy saw the TCP peer, and no client copy of the partial-body marker.
            let source = record["source"].as_str().unwrap_or_default();
            assert!(
                source.starts_with("127.0.0.1:"),
                "{proto:?}: source {source}"
            );
            assert!(
                record["headers"].get("x-envoy-auth-partial-body").is_none(),
                "{record}"
            );
            assert_ne!(record["body_truncated"], true, "{record}");
            assert_eq!(record["principal"], "globex-intern", "{record}");
        }
        let allowed_body = settled
            .audit
            .iter()
            .find(|r| r["route"] == "t_body" && r["decision"] == "allow")
            .unwrap();
        assert_eq!(allowed_body["model"], "gpt-4o-mini");
    }

    // Under a hanging server the marker is the filter's, once, with the real reason.
    stack.fault.set(Fault::Blackhole).await?;
    let ledger = Ledger::take(&stack).await?;
    let mut reqs = Vec::new();
    for proto in Proto::BOTH {
        reqs.push((
            proto,
            forge(Req::post(&path("/t/lenient-body"), chat("gpt-4o-mini"))),
        ));
        reqs.push((
            proto,
            forge(Req::post(&path("/t/closed"), chat("gpt-4o-mini"))),
        ));
    }
    for ((proto, req), answer) in reqs.iter().zip(send_all(&stack, &reqs).await?) {
        let reply = answer.reply()?;
        if req.path.starts_with("/t/closed") {
            assert_unavailable(&reply, "timeout");
        } else {
            assert_eq!(reply.status, 200, "{proto:?}: {}", reply.text());
        }
    }
    let settled = ledger
        .settle(
            &stack,
            "forged headers, server hanging",
            Outcomes::none().fail_open(2).fail_closed(2),
        )
        .await?;
    for seen in &settled.upstream {
        assert_eq!(seen.header("x-arbiter-fail-open"), Some("timeout"));
        assert!(!seen.has_header("x-envoy-auth-partial-body"));
        assert!(!seen.has_header("x-api-key"));
    }
    Ok(())
}

/// Gateway credentials stop at the gateway: `x-api-key` (the default) and one more
/// configured name never reach the upstream, on allowed, cached, fail-open and disabled
/// routes, while policy still identifies the caller by the key.
#[tokio::test(flavor = "multi_thread")]
async fn gateway_credentials_never_reach_the_upstream() -> Result<()> {
    let stack = patient_stack()
        .plugin_config(r#"{"policy_cluster":"arbiter_policy","timeout_ms":3000,"breaker_threshold":0,"credential_headers":["x-api-key","x-gateway-token"]}"#)
        .start()
        .await?;
    let keyed = |req: Req| {
        req.header("X-Api-Key", APPROVED_KEY)
            .header("x-gateway-token", "gw-SECRET-TOKEN")
    };
    for proto in Proto::BOTH {
        let caller = format!("creds-{proto:?}");
        let ledger = Ledger::take(&stack).await?;
        // Only an identified caller is allowed on the regulated route: policy saw the key.
        assert_upstream(
            &send_ok(
                &stack,
                proto,
                &keyed(Req::post(
                    "/regulated/v1/chat/completions",
                    chat("gpt-4o-mini"),
                )),
            )
            .await?,
        );
        // Premium model on a body route: allowed for this caller only.
        assert_upstream(
            &send_ok(
                &stack,
                proto,
                &keyed(Req::post(&path("/t/strict-body"), chat("gpt-4o"))),
            )
            .await?,
        );
        let cached =
            keyed(Req::post(&path("/t/cached"), chat("gpt-4o-mini")).header("x-caller", &caller));
        assert_upstream(&send_ok(&stack, proto, &cached).await?);
        assert_upstream(&send_ok(&stack, proto, &cached).await?);
        assert_upstream(
            &send_ok(
                &stack,
                proto,
                &keyed(Req::post(&path("/t/disabled"), chat("gpt-4o"))),
            )
            .await?,
        );
        let settled = ledger
            .settle(
                &stack,
                &format!("{proto:?} credentials, server answering"),
                Outcomes::none().allow(3).cached(1).disabled(1),
            )
            .await?;
        for seen in &settled.upstream {
            assert!(
                !seen.has_header("x-api-key"),
                "{proto:?} {}: x-api-key upstream",
                seen.path
            );
            assert!(
                !seen.has_header("x-gateway-token"),
                "{proto:?} {}",
                seen.path
            );
        }
        for record in &settled.audit {
            assert_eq!(record["principal"], "acme-batch", "{record}");
        }

        // Two keys are no key: anonymous, and neither copy goes on.
        let ledger = Ledger::take(&stack).await?;
        let twice = keyed(Req::post(
            "/regulated/v1/chat/completions",
            chat("gpt-4o-mini"),
        ))
        .header("x-api-key", "demo-key-globex-intern");
        let reply = send_ok(&stack, proto, &twice).await?;
        assert_denied(&reply, "regulated-requires-identity");
        let twice = keyed(Req::post(&path("/t/disabled"), chat("gpt-4o-mini")))
            .header("x-api-key", "demo-key-globex-intern");
        assert_upstream(&send_ok(&stack, proto, &twice).await?);
        let settled = ledger
            .settle(
                &stack,
                &format!("{proto:?} two keys"),
                Outcomes::none().deny(1).disabled(1),
            )
            .await?;
        assert!(!settled.upstream[0].has_header("x-api-key"));
    }
    stack.fault.set(Fault::Blackhole).await?;
    let ledger = Ledger::take(&stack).await?;
    let reqs: Vec<(Proto, Req)> = Proto::BOTH
        .iter()
        .map(|proto| {
            (
                *proto,
                keyed(Req::post(&path("/t/open"), chat("gpt-4o-mini"))),
            )
        })
        .collect();
    for answer in send_all(&stack, &reqs).await? {
        assert_upstream(&answer.reply()?);
    }
    let settled = ledger
        .settle(
            &stack,
            "credentials, fail open",
            Outcomes::none().fail_open(2),
        )
        .await?;
    for seen in &settled.upstream {
        assert!(!seen.has_header("x-api-key"));
        assert!(!seen.has_header("x-gateway-token"));
    }
    // Nothing secret in the access log either.
    let access_log = std::fs::read_to_string(stack.envoy.access_log_path())?;
    assert!(!access_log.contains(APPROVED_KEY) && !access_log.contains("gw-SECRET-TOKEN"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bodies

/// The route `t_body`'s `max_body_bytes`.
const BODY_LIMIT: usize = 1024;

/// A body of exactly `size` bytes: empty, one byte (not JSON), or a chat request.
fn body_of(size: usize) -> Vec<u8> {
    match size {
        0 => Vec::new(),
        1 => b"{".to_vec(),
        _ => chat_of_size("gpt-4o-mini", size),
    }
}

/// The audit record's view of a body of `size` bytes: exact whenever the size is known,
/// and "known" whenever it could be (announced, or read to the end within the limit).
fn assert_sized(record: &Value, size: usize, framing: Framing, what: &str) -> Result<()> {
    let known = record["body_size_known"]
        .as_bool()
        .with_context(|| format!("{what}: no body_size_known in {record}"))?;
    let bytes = record["body_bytes"]
        .as_u64()
        .with_context(|| format!("{what}: no body_bytes in {record}"))?;
    // Under the limit the filter reads to the end. At the limit without a length it may
    // decide on `max_body_bytes` bytes before it sees the end (HTTP/1.1 chunked: the last
    // chunk comes as its own event), and then says "cut, size unknown": stricter, not wrong.
    if framing == Framing::Length || size < BODY_LIMIT {
        ensure!(known, "{what}: the size could be known: {record}");
    }
    if known {
        ensure!(bytes == size as u64, "{what}: {bytes} bytes: {record}");
    } else {
        // Cut at the limit before its end: at least what policy got, never more than sent.
        ensure!(
            (BODY_LIMIT as u64..=size as u64).contains(&bytes),
            "{what}: {bytes} bytes for an unknown size of {size}: {record}"
        );
    }
    Ok(())
}

/// Policy sees the size that was received: 0 and 1 byte, just under, at and over the
/// route's `max_body_bytes`, with and without `content-length`, over both protocols; and
/// a body cut before its end is said to be of unknown size, not 0.
#[tokio::test(flavor = "multi_thread")]
async fn policy_sees_the_body_size_that_was_received() -> Result<()> {
    let stack = patient_stack().start().await?;
    for proto in Proto::BOTH {
        for framing in [Framing::Length, Framing::Unknown] {
            for size in [
                0,
                1,
                BODY_LIMIT - 1,
                BODY_LIMIT,
                BODY_LIMIT + 1,
                4 * BODY_LIMIT,
            ] {
                let what = format!("{proto:?} {framing:?} {size} bytes");
                let ledger = Ledger::take(&stack).await?;
                let req = Req::post(&path("/t/body"), body_of(size)).framing(framing);
                let reply = send_ok(&stack, proto, &req).await?;
                let settled = ledger.settle(&stack, &what, decided(reply.status)).await?;
                assert_sized(&settled.audit[0], size, framing, &what)?;
                if reply.status == 200 {
                    assert_eq!(settled.upstream[0].body_raw, req.body, "{what}");
                }
                // Bodies that are chat requests are allowed, whole or cut.
                assert_eq!(
                    reply.status,
                    if size == 1 { 403 } else { 200 },
                    "{what}: {}",
                    reply.text()
                );
            }
        }
    }

    // The size cannot be known: the first 1100 bytes arrive, policy decides, then the rest.
    let body = body_of(3000);
    let (first, rest) = body.split_at(1100);
    for proto in Proto::BOTH {
        let ledger = Ledger::take(&stack).await?;
        let audit = || {
            stack
                .policy
                .as_ref()
                .unwrap()
                .audit_records()
                .unwrap()
                .len()
        };
        let before = audit();
        let answer = match proto {
            Proto::H1 => {
                let request =
                    H1Request::post_chunked(&path("/t/body"), vec![first.to_vec(), rest.to_vec()]);
                let pieces = request.body_pieces();
                let mut h1 = H1Conn::to(&stack).await?;
                h1.write(&request.head_bytes()).await?;
                h1.write(&pieces[0]).await?;
                eventually_recorded(&audit, before).await?;
                for piece in &pieces[1..] {
                    h1.write(piece).await?;
                }
                h1.answer().await?
            }
            Proto::H2 => {
                let mut h2 = H2Conn::to(&stack).await?;
                let mut stream = h2.open(&Head::post(&path("/t/body")), false).await?;
                stream.data(first, false)?;
                eventually_recorded(&audit, before).await?;
                stream.data(rest, true)?;
                stream.answer().await?
            }
        };
        assert_upstream(&answer.reply()?);
        let what = format!("{proto:?} cut before its end");
        let settled = ledger
            .settle(&stack, &what, Outcomes::none().allow(1))
            .await?;
        let record = &settled.audit[0];
        assert_eq!(record["body_size_known"], false, "{what}: {record}");
        assert_eq!(record["body_truncated"], true, "{what}: {record}");
        assert_sized(record, body.len(), Framing::Unknown, &what)?;
        // What the upstream gets of a body split around the decision: see
        // a_body_split_around_the_decision_reaches_the_upstream_exactly_once.
    }
    Ok(())
}

async fn eventually_recorded(audit: &dyn Fn() -> usize, before: usize) -> Result<()> {
    arbiter_e2e::util::eventually(
        Duration::from_secs(10),
        "the decision on a partial body",
        || async { (audit() > before).then_some(()) },
    )
    .await
}

/// A policy limiting the body size (the example bundle's `body-size-limit`: over 1 MiB, or
/// of unknown size) holds whatever the client leaves out: a body the filter could measure
/// is judged by its size, one it could not is refused, with and without `content-length`.
#[tokio::test(flavor = "multi_thread")]
async fn a_size_limit_holds_without_content_length() -> Result<()> {
    const MIB: usize = 1 << 20;
    let stack = patient_stack().start().await?;
    let route = path("/t/bounded-body");
    let small = chat_of_size("gpt-4o-mini", 1000);
    let large = chat_of_size("gpt-4o-mini", MIB + 1);
    let cases = [
        (Proto::H1, &small, Framing::Length, 200, Some(true)),
        (Proto::H1, &small, Framing::Unknown, 200, Some(true)),
        (Proto::H2, &small, Framing::Length, 200, Some(true)),
        (Proto::H2, &small, Framing::Unknown, 200, Some(true)),
        (Proto::H2, &large, Framing::Length, 403, Some(true)),
        // Cut at max_body_bytes before its end: of unknown size, so refused.
        (Proto::H2, &large, Framing::Unknown, 403, Some(false)),
    ];
    for (proto, body, framing, status, known) in cases {
        let what = format!("{proto:?} {framing:?} {} bytes", body.len());
        let ledger = Ledger::take(&stack).await?;
        let reply = send_ok(&stack, proto, &Req::post(&route, body).framing(framing)).await?;
        assert_eq!(reply.status, status, "{what}: {}", reply.text());
        if status == 403 {
            assert_denied(&reply, "body-size-limit");
        }
        let settled = ledger.settle(&stack, &what, decided(status)).await?;
        let record = &settled.audit[0];
        assert_eq!(
            record["body_size_known"].as_bool(),
            known,
            "{what}: {record}"
        );
        if known == Some(true) {
            assert_eq!(record["body_bytes"], body.len() as u64, "{what}: {record}");
        }
    }

    // HTTP/1.1 chunked, decided on its first 1100 bytes: the rest is never measured.
    let ledger = Ledger::take(&stack).await?;
    let denied = filter_stat(&stack, "checks.deny").await?;
    let body = chat_of_size("gpt-4o-mini", 3000);
    let request =
        H1Request::post_chunked(&route, vec![body[..1100].to_vec(), body[1100..].to_vec()]);
    let pieces = request.body_pieces();
    let mut h1 = H1Conn::to(&stack).await?;
    h1.write(&request.head_bytes()).await?;
    h1.write(&pieces[0]).await?;
    wait_filter_counter(&stack, "checks.deny", denied + 1).await?;
    for piece in &pieces[1..] {
        h1.write(piece).await?;
    }
    assert_denied(&h1.answer().await?.reply()?, "body-size-limit");
    ledger
        .settle(
            &stack,
            "h1 chunked, cut before its end",
            Outcomes::none().deny(1),
        )
        .await?;
    Ok(())
}

/// Bodies near the largest `max_body_bytes` (8 MiB) get a decision, not `error`, and do not
/// open the breaker. Over Envoy's 1 MiB buffer limit while the filter holds the request,
/// HTTP/1.1 gets Envoy's 413 (the request ends `cancelled`) and HTTP/2 is flow-controlled
/// until the decision: nothing reaches the upstream undecided either way.
#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_are_decided_or_refused_never_passed_undecided() -> Result<()> {
    const MIB: usize = 1 << 20;
    let stack = patient_stack()
        .plugin_config(
            r#"{"policy_cluster":"arbiter_policy","timeout_ms":3000,"breaker_threshold":2}"#,
        )
        .start()
        .await?;
    let big_route = path("/t/big-body");

    // HTTP/2: decided whatever the size; over the old 4 MiB gRPC limit, at the route's limit.
    let ledger = Ledger::take(&stack).await?;
    let sizes = [MIB + 1, 4 * MIB + 1, 7_999_999, 8_000_000, 8_000_001];
    for size in sizes {
        let req = Req::post(&big_route, chat_of_size("gpt-4o-mini", size));
        let reply = send_ok(&stack, Proto::H2, &req).await?;
        assert_eq!(reply.status, 200, "h2 {size} bytes: {}", reply.text());
    }
    let settled = ledger
        .settle(
            &stack,
            "h2 large bodies",
            Outcomes::none().allow(sizes.len() as u64),
        )
        .await?;
    for (size, record) in sizes.iter().zip(&settled.audit) {
        assert_eq!(record["body_bytes"], *size as u64, "{record}");
        assert_eq!(record["body_truncated"], *size > 8_000_000, "{size}");
    }
    let stats = stack.stats().await?;
    assert_eq!(filter_counter(&stats, "breaker.opened"), 0);
    assert_eq!(filter_counter(&stats, "no_decision.error"), 0);

    // HTTP/1.1: Envoy buffers at most 1 MiB per connection while the filter reads the body.
    let ledger = Ledger::take(&stack).await?;
    let under = send_ok(
        &stack,
        Proto::H1,
        &Req::post(&big_route, chat_of_size("gpt-4o-mini", MIB - 64 * 1024)),
    )
    .await?;
    assert_upstream(&under);
    let over = send_ok(
        &stack,
        Proto::H1,
        &Req::post(&big_route, chat_of_size("gpt-4o-mini", MIB + 64 * 1024)),
    )
    .await?;
    assert_eq!(over.status, 413, "{}", over.text());
    ledger
        .settle(
            &stack,
            "h1 around the buffer limit on a body route",
            Outcomes::none().allow(1).cancelled(1),
        )
        .await?;

    // Any route while the check is in flight (the server hangs).
    stack.fault.set(Fault::Blackhole).await?;
    let ledger = Ledger::take(&stack).await?;
    let body = chat_of_size("gpt-4o-mini", 3 * MIB);
    let reqs: Vec<(Proto, Req)> = [
        (Proto::H1, "/t/open"),
        (Proto::H1, "/t/closed"),
        (Proto::H2, "/t/open"),
        (Proto::H2, "/t/closed"),
    ]
    .iter()
    .map(|(proto, route)| (*proto, Req::post(&path(route), &body)))
    .collect();
    for ((proto, req), answer) in reqs.iter().zip(send_all(&stack, &reqs).await?) {
        let reply = answer.reply()?;
        match (proto, req.path.starts_with("/t/open")) {
            (Proto::H1, _) => assert_eq!(reply.status, 413, "h1 {}: {}", req.path, reply.text()),
            (Proto::H2, true) => assert_upstream(&reply),
            (Proto::H2, false) => assert_unavailable(&reply, "timeout"),
        }
    }
    let settled = ledger
        .settle(
            &stack,
            "3 MiB while the check hangs",
            Outcomes::none().cancelled(2).fail_closed(1).fail_open(1),
        )
        .await?;
    assert_eq!(
        settled.upstream[0].body_raw, body,
        "the open route passes it whole, marked"
    );
    let statuses: Vec<(Value, Value)> = settled
        .access_log
        .iter()
        .map(|l| (l["response_code"].clone(), l["arbiter_outcome"].clone()))
        .collect();
    assert!(
        statuses.contains(&(json!(413), json!("cancelled"))),
        "{statuses:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Operator mistakes

/// `fail_open_until` at the edges of time, with the server answering and then hanging:
/// long expired (1900, 1969) behaves as configured (closed) and is valid; far future
/// (9999, or more than 24 h ahead) and not RFC 3339 (year 10000) are invalid, closed and
/// counted, and never open.
#[tokio::test(flavor = "multi_thread")]
async fn fail_open_until_at_the_edges_of_time_never_opens_a_route() -> Result<()> {
    let stack = patient_stack().start().await?;
    let routes = [
        ("/t/until-ancient", false),
        ("/t/until-pre1970", false),
        ("/t/until-far", true),
        ("/t/until-year10000", true),
        ("/t/override-too-far", true),
    ];
    let invalid_routes = routes.iter().filter(|(_, invalid)| *invalid).count() as u64;
    let body = chat("gpt-4o-mini");
    let counter =
        |stats: &std::collections::HashMap<String, u64>, name: &str| filter_counter(stats, name);

    let before = stack.stats().await?;
    let ledger = Ledger::take(&stack).await?;
    for (route, _) in routes {
        assert_upstream(&send_ok(&stack, Proto::H1, &Req::post(&path(route), &body)).await?);
    }
    ledger
        .settle(
            &stack,
            "edges of time, server answering",
            Outcomes::none().allow(routes.len() as u64),
        )
        .await?;

    stack.fault.set(Fault::Blackhole).await?;
    let ledger = Ledger::take(&stack).await?;
    let reqs: Vec<(Proto, Req)> = Proto::BOTH
        .iter()
        .flat_map(|proto| {
            routes
                .iter()
                .map(|(route, _)| (*proto, Req::post(&path(route), &body)))
        })
        .collect();
    for answer in send_all(&stack, &reqs).await? {
        assert_unavailable(&answer.reply()?, "timeout");
    }
    ledger
        .settle(
            &stack,
            "edges of time, server hanging",
            Outcomes::none().fail_closed(2 * routes.len() as u64),
        )
        .await?;
    let after = stack.stats().await?;
    let grew = |name: &str| counter(&after, name) - counter(&before, name);
    assert_eq!(grew("checks.invalid_route_config"), 3 * invalid_routes);
    assert_eq!(grew("checks.override"), 0);
    assert_eq!(grew("override_active_requests"), 0);
    let log = stack.envoy.log();
    for (route, invalid) in routes {
        let name = format!(
            "route `t_{}`",
            route.trim_start_matches("/t/").replace('-', "_")
        );
        assert_eq!(
            log.contains(&name),
            invalid,
            "{name} in Envoy's log:\n{log}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The ledger itself

/// The ledger's (c) is not vacuous: a filter whose VM traps on every request (what a panic
/// is to Envoy) is reported, through the stats and log lines this tier watches.
#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_notices_a_crashing_filter() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wasm = dir.path().join("trap.wasm");
    arbiter_e2e::adversary::write_trapping_filter(&wasm)?;
    let stack = Stack::builder()
        .var("WASM_PATH", wasm.display().to_string())
        .start()
        .await?;
    let ledger = Ledger::take(&stack).await?;
    let reply = send_ok(
        &stack,
        Proto::H1,
        &Req::post(&path("/t/closed"), chat("gpt-4o-mini")),
    )
    .await?;
    assert_eq!(
        reply.status,
        503,
        "FAIL_RELOAD refuses the request: {}",
        reply.text()
    );
    // The next request reloads the VM (or is refused during the back-off).
    let _ = send(
        &stack,
        Proto::H1,
        &Req::post(&path("/t/closed"), chat("gpt-4o-mini")),
    )
    .await?;
    let err = ledger
        .settle(&stack, "a trapping filter", Outcomes::none().upstream(0))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("(c)"), "the ledger missed the crash: {err}");
    assert_eq!(
        stack.upstream_requests(),
        0,
        "a failed VM lets nothing through"
    );
    Ok(())
}
