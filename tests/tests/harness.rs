//! Self-tests of the end-to-end harness: template rendering, the mock LLM behind real Envoy
//! (passthrough config, no wasm filter), the fault proxy and the misbehaving gRPC server on
//! loopback.

// clippy.toml allows unwrap in #[test] functions only; the helpers here are test code too.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbiter_e2e::envoy::{render, validate};
use arbiter_e2e::grpc_misbehaving::grpc_frame;
use arbiter_e2e::stack::{
    chat_body, client, default_vars, wasm_path, DEMO_TEMPLATE, E2E_TEMPLATE, EXT_AUTHZ_TEMPLATE,
    PASSTHROUGH_TEMPLATE,
};
use arbiter_e2e::{Fault, FaultProxy, GrpcMisbehaving, Misbehaviour, MockLlm, Mode, Stack};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn passthrough() -> Stack {
    Stack::builder()
        .template(PASSTHROUGH_TEMPLATE)
        .policy_server(false)
        .start()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// Templates

#[test]
fn render_replaces_placeholders_and_rejects_missing_ones() {
    let out = render(
        "a: {{A}}\nb: {{ B }}\nc: {{A}}",
        &vars(&[("A", "1"), ("B", "two"), ("UNUSED", "x")]),
    )
    .unwrap();
    assert_eq!(out, "a: 1\nb: two\nc: 1");

    let err = render(
        "a: {{A}} {{MISSING}} {{OTHER}} {{MISSING}}",
        &vars(&[("A", "1")]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "template placeholders without a value: MISSING, OTHER"
    );

    assert!(render("a: {{A", &vars(&[("A", "1")])).is_err());
}

/// The template without its leading comment block.
fn template_body(path: &str) -> String {
    let text = std::fs::read_to_string(arbiter_e2e::workspace_root().join(path)).unwrap();
    text.lines()
        .skip_while(|line| line.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` without the lines strictly between `begin` and `end` markers (or including the
/// markers, with `inclusive`).
fn strip_between(text: &str, begin: &str, end: &str, inclusive: bool) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.contains(begin) {
            inside = true;
            if !inclusive {
                out.push(line);
            }
        } else if line.contains(end) {
            inside = false;
            if !inclusive {
                out.push(line);
            }
        } else if !inside {
            out.push(line);
        }
    }
    out.join("\n")
}

#[test]
fn templates_stay_in_step() {
    let demo = template_body(DEMO_TEMPLATE);
    assert!(demo.contains("# --- arbiter-only begin ---"));
    assert_eq!(
        strip_between(
            &demo,
            "# --- arbiter-only begin ---",
            "# --- arbiter-only end ---",
            true
        ),
        template_body(PASSTHROUGH_TEMPLATE),
        "passthrough.yaml.tmpl must be arbiter.yaml.tmpl minus the arbiter-only blocks"
    );
    let e2e = template_body(E2E_TEMPLATE);
    assert!(e2e.contains("name: t_closed"));
    assert!(e2e.contains("{{POLICY_EXTRA_ENDPOINT}}"));
    let e2e = strip_between(
        &e2e,
        "# --- test-only routes begin",
        "# --- test-only routes end ---",
        false,
    );
    assert_eq!(
        strip_between(
            &e2e,
            "# --- test-only endpoints begin",
            "# --- test-only endpoints end ---",
            false
        ),
        demo,
        "e2e.yaml.tmpl must be arbiter.yaml.tmpl plus test-only routes and endpoints"
    );
    let ext_authz = template_body(EXT_AUTHZ_TEMPLATE);
    assert!(ext_authz.contains("name: envoy.filters.http.ext_authz"));
    assert_eq!(
        strip_between(
            &ext_authz,
            "# --- ext_authz-only begin ---",
            "# --- ext_authz-only end ---",
            true
        ),
        template_body(PASSTHROUGH_TEMPLATE),
        "ext_authz.yaml.tmpl must be passthrough.yaml.tmpl plus the ext_authz-only blocks"
    );
}

/// Validating the wasm templates loads the filter; without it they are skipped unless
/// `ARBITER_E2E_REQUIRE_WASM` is set (CI sets it after `make wasm`).
#[test]
fn filter_templates_validate() {
    if wasm_path().is_err() && std::env::var_os("ARBITER_E2E_REQUIRE_WASM").is_none() {
        eprintln!("skipped: {:#}", wasm_path().unwrap_err());
        return;
    }
    for template in [DEMO_TEMPLATE, E2E_TEMPLATE] {
        let text = std::fs::read_to_string(arbiter_e2e::workspace_root().join(template)).unwrap();
        let mut all = default_vars(&text).unwrap();
        all.extend(vars(&[
            ("POLICY_PORT", "1"),
            ("PRIMARY_PORT", "2"),
            ("BACKUP_PORT", "3"),
        ]));
        let output = validate(template, &all).unwrap();
        assert!(
            output.status.success(),
            "{template}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The module every end-to-end test loads went through `make wasm`'s post-link step: it
/// exports exactly the callbacks the filter needs (each export costs Envoy a VM entry per
/// request) and every one of them, so the enforcement tests run what ships.
#[test]
fn the_filter_module_exports_exactly_the_callbacks_it_needs() {
    let path = wasm_path().unwrap();
    let module = std::fs::read(&path).unwrap();
    let exports = arbiter_wasm_exports::exports(&module).unwrap();
    let mut expected: Vec<&str> = arbiter_wasm_exports::KEEP
        .iter()
        .map(|(name, _)| *name)
        .collect();
    let mut got: Vec<&str> = exports.iter().map(String::as_str).collect();
    expected.sort_unstable();
    got.sort_unstable();
    assert_eq!(
        got,
        expected,
        "{}: run `make wasm` (cargo alone leaves the SDK's unused callbacks exported)",
        path.display()
    );
}

#[test]
fn passthrough_template_validates() {
    let output = validate(
        PASSTHROUGH_TEMPLATE,
        &vars(&[("PRIMARY_PORT", "1"), ("BACKUP_PORT", "2")]),
    )
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn ext_authz_template_validates() {
    let output = validate(
        EXT_AUTHZ_TEMPLATE,
        &vars(&[
            ("POLICY_PORT", "1"),
            ("PRIMARY_PORT", "2"),
            ("BACKUP_PORT", "3"),
        ]),
    )
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// Mock LLMs behind real Envoy

#[tokio::test(flavor = "multi_thread")]
async fn request_reaches_primary() {
    let stack = passthrough().await;
    let reply = stack
        .post_json_with("/v1/chat/completions", &[("x-test", "yes")], &chat_body())
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));
    let body = reply.json().unwrap();
    assert_eq!(body["provider"], "primary");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-mini");

    let seen = stack.primary.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].header("x-test"), Some("yes"));
    assert!(
        seen[0].has_header("x-request-id"),
        "Envoy adds x-request-id"
    );
    assert_eq!(seen[0].body_len, chat_body().to_string().len());
    assert!(stack.backup.requests().is_empty());

    // Direct response, never upstream.
    let health = stack.get("/healthz").await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(stack.upstream_requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_503_is_answered_by_backup() {
    let stack = passthrough().await;
    stack.primary.set_mode(Mode::Status(503)).await.unwrap();
    let reply = stack.chat("/v1/chat/completions").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("backup"));
    assert_eq!(stack.primary.requests().len(), 1);
    assert_eq!(stack.backup.requests().len(), 1);

    let log = stack.envoy.wait_access_log(1).await.unwrap();
    assert_eq!(log[0]["attempts"], 2);
    assert_eq!(
        stack
            .envoy
            .stat("cluster.llm.upstream_rq_retry")
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn primary_400_is_not_retried() {
    let stack = passthrough().await;
    stack.primary.set_mode(Mode::Status(400)).await.unwrap();
    let reply = stack.chat("/v1/chat/completions").await.unwrap();
    assert_eq!(reply.status, 400);
    assert_eq!(reply.provider(), Some("primary"));
    assert_eq!(reply.json().unwrap()["error"]["type"], "mock_status");
    assert_eq!(stack.primary.requests().len(), 1);
    assert!(
        stack.backup.requests().is_empty(),
        "backup must not see a 4xx retry"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_primary_fails_over_to_backup_and_back() {
    let stack = passthrough().await;
    // Warm a pooled connection first: Refuse must also drop live connections.
    assert_eq!(
        stack.chat("/v1/chat/completions").await.unwrap().provider(),
        Some("primary")
    );

    stack.primary.set_mode(Mode::Refuse).await.unwrap();
    let reply = stack.chat("/v1/chat/completions").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("backup"));
    assert_eq!(stack.primary.requests().len(), 1);

    stack.primary.set_mode(Mode::Ok).await.unwrap();
    let reply = stack.chat("/v1/chat/completions").await.unwrap();
    assert_eq!(reply.provider(), Some("primary"), "same port re-bound");
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_lines_are_parsed() {
    let stack = passthrough().await;
    let reply = stack
        .post_json_with(
            "/regulated/v1/chat/completions",
            &[("x-request-id", "req-1"), ("x-arbiter-fail-open", "forged")],
            &chat_body(),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    // The route rewrites the prefix.
    assert_eq!(stack.primary.requests()[0].path, "/v1/chat/completions");
    stack.get("/healthz").await.unwrap();

    let log = stack.envoy.wait_access_log(2).await.unwrap();
    let first = &log[0];
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/regulated/v1/chat/completions");
    assert_eq!(first["route_name"], "regulated_chat");
    assert_eq!(first["response_code"], 200);
    assert_eq!(first["response_flags"], "-");
    // The listener takes its source from the TCP peer (use_remote_address), so a loopback
    // client is external to Envoy: its own x-request-id is replaced by Envoy's, the one the
    // upstream and every record carry.
    assert_ne!(first["request_id"], "req-1");
    assert_eq!(
        first["request_id"].as_str(),
        stack.primary.requests()[0].header("x-request-id")
    );
    assert_eq!(first["upstream_host"], stack.primary.addr().to_string());
    assert_eq!(first["attempts"], 1);
    assert!(first["duration"].is_u64());
    assert!(first["start_time"].is_string());
    // No wasm filter here, so the client's header reaches the log untouched.
    assert_eq!(first["x_arbiter_fail_open"], "forged");
    assert_eq!(first["arbiter_outcome"], Value::Null);
    assert_eq!(log[1]["route_name"], "health");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_mode_delays_answers() {
    let mock = MockLlm::start("slowpoke").await.unwrap();
    mock.set_mode(Mode::Slow(Duration::from_millis(150)))
        .await
        .unwrap();
    let url = format!("http://{}/v1/embeddings", mock.addr());
    let started = Instant::now();
    let response = client()
        .unwrap()
        .post(url)
        .json(&json!({"input": "x"}))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(response.headers()["x-mock-provider"], "slowpoke");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["provider"], "slowpoke");
}

#[tokio::test(flavor = "multi_thread")]
async fn mock_is_controllable_over_http() {
    let mock = MockLlm::start("ctl").await.unwrap();
    let http = client().unwrap();
    let main = format!("http://{}", mock.addr());
    let control = format!("http://{}", mock.control_addr());

    let echo: Value = http
        .get(format!("{main}/anything?x=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(echo["path"], "/anything?x=1");
    assert_eq!(echo["provider"], "ctl");

    let set = http
        .post(format!("{main}/__mock/mode"))
        .json(&json!({"mode": "status", "status": 429}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let limited = http.get(format!("{main}/x")).send().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(
        limited.headers()["retry-after"],
        "7",
        "as providers send it"
    );

    let recorded: Value = http
        .get(format!("{control}/__mock/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        recorded.as_array().unwrap().len(),
        2,
        "control calls are not recorded"
    );

    // Refuse from the main port itself: the answer still arrives, then the port closes.
    let set = http
        .post(format!("{main}/__mock/mode"))
        .json(&json!({"mode": "refuse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    assert_eq!(mock.mode(), Mode::Refuse);
    assert!(TcpStream::connect(mock.addr()).await.is_err());

    // Back to ok through the control port, which never closes.
    let set = http
        .post(format!("{control}/__mock/mode"))
        .json(&json!({"mode": "ok"}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    assert_eq!(
        http.get(format!("{main}/x")).send().await.unwrap().status(),
        200
    );

    // Reset: the request is read and recorded, the connection closes without an answer.
    let set = http
        .post(format!("{control}/__mock/mode"))
        .json(&json!({"mode": "reset"}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    assert_eq!(mock.mode(), Mode::Reset);
    let recorded = mock.requests().len();
    let mut raw = TcpStream::connect(mock.addr()).await.unwrap();
    raw.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
        .await
        .expect("the mock closes the connection");
    assert!(
        answer.is_empty(),
        "{read:?}: {}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(mock.requests().len(), recorded + 1);
    assert_eq!(mock.requests().last().unwrap().body, "{}");

    let bad = http
        .post(format!("{control}/__mock/mode"))
        .json(&json!({"mode": "sometimes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let cleared = http
        .delete(format!("{control}/__mock/requests"))
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 200);
    assert!(mock.requests().is_empty());
}

// ---------------------------------------------------------------------------------------
// Fault proxy on loopback

/// An echo server standing in for the policy server.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await?;
    Ok(back)
}

async fn proxy() -> FaultProxy {
    FaultProxy::start(echo_server().await).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_pass_forwards_and_counts() {
    let proxy = proxy().await;
    assert_eq!(proxy.connections(), 0);
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut stream, b"hello").await.unwrap(), b"hello");
    assert_eq!(round_trip(&mut stream, b"again").await.unwrap(), b"again");
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.bytes_to_target(), 10);
    assert_eq!(proxy.bytes_from_target(), 10);
    assert_eq!(proxy.active_connections(), 1);
    drop(stream);
    arbiter_e2e::eventually(Duration::from_secs(2), "connection to close", || async {
        (proxy.active_connections() == 0).then_some(())
    })
    .await
    .unwrap();
    proxy.reset_counters();
    assert_eq!(proxy.connections(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_delay_applies_to_live_connections() {
    let proxy = proxy().await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    let started = Instant::now();
    round_trip(&mut stream, b"fast").await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));

    proxy
        .set(Fault::Delay(Duration::from_millis(150)))
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(round_trip(&mut stream, b"slow").await.unwrap(), b"slow");
    let elapsed = started.elapsed();
    // Delayed on the way there and on the way back.
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");

    proxy.set(Fault::Pass).await.unwrap();
    let started = Instant::now();
    round_trip(&mut stream, b"fast").await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));

    // Lifting a delay waits until the held-back bytes are out, so what follows is fast.
    proxy
        .set(Fault::Delay(Duration::from_millis(300)))
        .await
        .unwrap();
    stream.write_all(b"held").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await; // let the proxy read it
    proxy.set(Fault::Pass).await.unwrap();
    let started = Instant::now();
    let mut held = [0u8; 4];
    stream.read_exact(&mut held).await.unwrap();
    assert_eq!(&held, b"held");
    assert_eq!(round_trip(&mut stream, b"next").await.unwrap(), b"next");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_blackhole_swallows_new_and_live_traffic() {
    let proxy = proxy().await;
    let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut live, b"ok").await.unwrap();

    proxy.set(Fault::Blackhole).await.unwrap();
    let timed_out =
        tokio::time::timeout(Duration::from_millis(300), round_trip(&mut live, b"lost")).await;
    assert!(timed_out.is_err(), "live connection must not be answered");

    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    let timed_out =
        tokio::time::timeout(Duration::from_millis(300), round_trip(&mut fresh, b"lost")).await;
    assert!(
        timed_out.is_err(),
        "new connection must be accepted but not answered"
    );
    assert_eq!(
        proxy.bytes_to_target(),
        2,
        "only the first round trip reached the target"
    );

    // Lifting the fault resets the connections whose bytes were swallowed, before `set`
    // returns, so a next request cannot race the reset.
    proxy.set(Fault::Pass).await.unwrap();
    assert_eq!(proxy.active_connections(), 0);
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(2), live.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut again, b"back").await.unwrap(), b"back");
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_reset_kills_new_and_live_connections() {
    let proxy = proxy().await;
    let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut live, b"ok").await.unwrap();

    proxy.set(Fault::Reset).await.unwrap();
    assert_eq!(proxy.active_connections(), 0);
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(2), live.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        read.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );

    // The RST can be quick enough to fail the connect itself.
    let err = match TcpStream::connect(proxy.addr()).await {
        Ok(mut fresh) => tokio::time::timeout(Duration::from_secs(2), fresh.read(&mut buf))
            .await
            .unwrap()
            .unwrap_err(),
        Err(err) => err,
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(proxy.connections(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_garbage_answers_with_non_http2_bytes() {
    let proxy = proxy().await;
    proxy.set(Fault::Garbage).await.unwrap();
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.len(), 64);
    assert_eq!(&answer[..3], &[0xff, 0xff, 0xff]);
    assert_eq!(proxy.bytes_to_target(), 0);

    // A live connection gets garbage as soon as the fault is set.
    proxy.set(Fault::Pass).await.unwrap();
    let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut live, b"ok").await.unwrap();
    proxy.set(Fault::Garbage).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), live.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.len(), 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_refuse_closes_the_port_until_lifted() {
    let proxy = proxy().await;
    let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
    round_trip(&mut live, b"ok").await.unwrap();

    proxy.set(Fault::Refuse).await.unwrap();
    let err = TcpStream::connect(proxy.addr()).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(2), live.read(&mut buf))
        .await
        .unwrap();
    assert!(read.is_err(), "live connections are reset: {read:?}");
    let connections = proxy.connections();

    proxy.set(Fault::Pass).await.unwrap();
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut again, b"back").await.unwrap(), b"back");
    assert_eq!(proxy.connections(), connections + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn fault_target_down_looks_like_a_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);
    let proxy = FaultProxy::start(closed).await.unwrap();
    let mut buf = [0u8; 4];
    let err = match TcpStream::connect(proxy.addr()).await {
        Ok(mut stream) => tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap_err(),
        Err(err) => err,
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

// ---------------------------------------------------------------------------------------
// Misbehaving gRPC server, checked with a plain h2 client

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// One unary gRPC call: returns (HTTP status, message bytes, grpc-status, grpc-message).
async fn call(addr: SocketAddr) -> (u16, Bytes, String, Option<String>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{CHECK_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(grpc_frame(b"\x0a\x00"), true).unwrap();
    let response = response.await.unwrap();
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    let grpc_status = trailers["grpc-status"].to_str().unwrap().to_owned();
    let grpc_message = trailers
        .get("grpc-message")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, Bytes::from(data), grpc_status, grpc_message)
}

#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_grpc_answers_error_status() {
    let server = GrpcMisbehaving::start(Misbehaviour::ErrorStatus(7, "no: ümlaut 100%".into()))
        .await
        .unwrap();
    let (status, data, grpc_status, grpc_message) = call(server.addr()).await;
    assert_eq!(status, 200);
    assert!(data.is_empty());
    assert_eq!(grpc_status, "7");
    assert_eq!(grpc_message.as_deref(), Some("no: %C3%BCmlaut 100%25"));
    assert_eq!(server.calls(), 1);
    assert_eq!(server.paths(), vec![CHECK_PATH.to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_grpc_answers_garbage_message() {
    let server = GrpcMisbehaving::start(Misbehaviour::GarbageMessage)
        .await
        .unwrap();
    let (status, data, grpc_status, _) = call(server.addr()).await;
    assert_eq!(status, 200);
    assert_eq!(grpc_status, "0");
    assert_eq!(&data[..], &[0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);

    server.set(Misbehaviour::Message(Bytes::from_static(b"\x0a\x00")));
    let (_, data, grpc_status, _) = call(server.addr()).await;
    assert_eq!(grpc_status, "0");
    assert_eq!(&data[..], &[0, 0, 0, 0, 2, 0x0a, 0x00]);
}
