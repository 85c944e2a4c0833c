//! Clients that misbehave on purpose, and the ledger every adversarial case settles.
//!
//! [`H2Conn`] is a raw HTTP/2 client on the `h2` crate: it sends `HEADERS`, `DATA`,
//! `TRAILERS` and `RST_STREAM` at the points a test chooses, and many streams on one
//! connection. [`H1Conn`] writes HTTP/1.1 bytes to a `TcpStream` as given (chunked, slow,
//! invalid bytes) and can drop the connection at any point.
//!
//! [`Ledger`] is taken before a case and settled after it, asserting the three things every
//! case must hold: (a) the upstream saw nothing that was neither allowed by policy nor let
//! through by an open route's fail mode and marked; (b) every request that reached the
//! filter has exactly one outcome in the filter's counters, and the server's audit log grew
//! by its decisions; (c) no wasm VM crashed or was reloaded.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::mock_llm::Received;
use crate::stack::{Reply, Stack, StackBuilder};
use crate::util::eventually;

/// The filter's outcome counters: every request that reaches the filter moves exactly one.
pub const OUTCOMES: [&str; 8] = [
    "allow",
    "deny",
    "dry_run_deny",
    "fail_open",
    "fail_closed",
    "disabled",
    "cached",
    "cancelled",
];

/// The no-decision reasons an upstream may see in `x-arbiter-fail-open` (DESIGN §1).
pub const REASONS: [&str; 6] = [
    "timeout",
    "unreachable",
    "error",
    "bad_response",
    "breaker_open",
    "invalid_route_config",
];

/// Envoy stats that move when a wasm VM is created, fails or is reloaded (V8 runtime and
/// the plugin's `FAIL_RELOAD` counters).
pub const VM_STATS: [&str; 6] = [
    "wasm.envoy.wasm.runtime.v8.created",
    "wasm.envoy.wasm.runtime.v8.active",
    "wasm.arbiter.vm_reload_success",
    "wasm.arbiter.vm_reload_failure",
    "wasm.arbiter.vm_reload_backoff",
    "wasm.wasm_vm_count",
];

/// What a panicking or trapping filter leaves in Envoy's log: the Rust SDK's panic hook
/// (`panicked at`), the wasm host's report of a trapped call (`Function: proxy_on_… failed:
/// Uncaught RuntimeError: …`) and the response details of a request refused because its VM
/// failed (`wasm_fail_stream`, also checked in the access log).
pub const CRASH_MARKERS: [&str; 4] = [
    "panicked at",
    "RuntimeError",
    "failed: Uncaught",
    "wasm_fail_stream",
];

/// How long a ledger waits for counters, audit records and the upstream to catch up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);

/// `wasmcustom.arbiter.<name>` from a stats map (0 when absent).
pub fn filter_counter(stats: &std::collections::HashMap<String, u64>, name: &str) -> u64 {
    stats
        .get(&format!("wasmcustom.arbiter.{name}"))
        .copied()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The stack

/// Plugin configuration of [`patient_stack`]: routes without their own `timeout_ms` give
/// the server 3 s, and no breaker turns a run of hangs into `breaker_open`.
pub const PATIENT_PLUGIN_CONFIG: &str =
    r#"{"policy_cluster":"arbiter_policy","timeout_ms":3000,"breaker_threshold":0}"#;

/// `TIMEOUT_MS` in [`patient_stack`]: the `t_*` routes that cases make time out.
pub const PATIENT_ROUTE_TIMEOUT_MS: u64 = 1000;

/// The stack adversarial cases start from. A case that expects a decision must not get a
/// timeout because this 2-core box is busy or its disk stalls an `fdatasync` for 200 ms:
/// policy calls get 1 s (routes with `{{TIMEOUT_MS}}`) or 3 s (the others), and audit
/// records are written without `fdatasync` (`--audit-sync write`, durability is not under
/// test here).
pub fn patient_stack() -> StackBuilder {
    Stack::builder()
        .plugin_config(PATIENT_PLUGIN_CONFIG)
        .var("TIMEOUT_MS", PATIENT_ROUTE_TIMEOUT_MS.to_string())
        .policy_arg("--audit-sync")
        .policy_arg("write")
}

// ---------------------------------------------------------------------------------------
// The ledger

/// Expected growth of each filter outcome counter over one case.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// `checks.allow`.
    pub allow: u64,
    /// `checks.deny`.
    pub deny: u64,
    /// `checks.fail_open`.
    pub fail_open: u64,
    /// `checks.fail_closed`.
    pub fail_closed: u64,
    /// `checks.disabled`.
    pub disabled: u64,
    /// `checks.cached`.
    pub cached: u64,
    /// `checks.cancelled`.
    pub cancelled: u64,
    /// Audit records the server writes, as an inclusive range; `None` means exactly
    /// `allow + deny`. A request cancelled after its Check reached the server may still be
    /// decided and recorded there.
    pub server_decisions: Option<(u64, u64)>,
    /// Upstream requests; `None` means `allow + cached + fail_open + disabled`.
    pub upstream: Option<u64>,
}

macro_rules! outcome_setters {
    ($($field:ident),*) => {$(
        #[doc = concat!("Expect `checks.", stringify!($field), "` to grow by `n`.")]
        pub fn $field(mut self, n: u64) -> Self {
            self.$field = n;
            self
        }
    )*};
}

impl Outcomes {
    /// Nothing reaches the filter.
    pub fn none() -> Self {
        Self::default()
    }

    outcome_setters!(
        allow,
        deny,
        fail_open,
        fail_closed,
        disabled,
        cached,
        cancelled
    );

    /// Expect this many audit records instead of `allow + deny`.
    pub fn server_decisions(mut self, n: u64) -> Self {
        self.server_decisions = Some((n, n));
        self
    }

    /// Expect `allow + deny` up to `allow + deny + extra` audit records (checks of cancelled
    /// requests that reached the server before the cancel).
    pub fn extra_server_decisions_at_most(mut self, extra: u64) -> Self {
        let n = self.allow + self.deny;
        self.server_decisions = Some((n, n + extra));
        self
    }

    /// Expect this many upstream requests instead of `allow + cached + fail_open + disabled`.
    pub fn upstream(mut self, n: u64) -> Self {
        self.upstream = Some(n);
        self
    }

    fn get(&self, name: &str) -> u64 {
        match name {
            "allow" => self.allow,
            "deny" => self.deny,
            "fail_open" => self.fail_open,
            "fail_closed" => self.fail_closed,
            "disabled" => self.disabled,
            "cached" => self.cached,
            "cancelled" => self.cancelled,
            _ => 0,
        }
    }

    fn expected_audit(&self) -> (u64, u64) {
        self.server_decisions
            .unwrap_or((self.allow + self.deny, self.allow + self.deny))
    }

    fn expected_upstream(&self) -> u64 {
        self.upstream
            .unwrap_or(self.allow + self.cached + self.fail_open + self.disabled)
    }
}

/// Counters, audit log, upstream requests, access log and VM state before a case.
#[derive(Debug, Clone)]
pub struct Ledger {
    outcomes: BTreeMap<&'static str, u64>,
    audit: usize,
    primary: usize,
    backup: usize,
    access_log: usize,
    vm: BTreeMap<&'static str, u64>,
    log_offset: usize,
}

/// What a case left behind, after [`Ledger::settle`] checked it.
#[derive(Debug, Clone)]
pub struct Settled {
    /// Requests the mocks received during the case (primary first, then backup).
    pub upstream: Vec<Received>,
    /// Audit records written during the case.
    pub audit: Vec<serde_json::Value>,
    /// Access-log lines written during the case.
    pub access_log: Vec<serde_json::Value>,
}

/// Everything [`Ledger::settle`] reads, at one moment.
struct Observed {
    counts: BTreeMap<&'static str, u64>,
    audit: Vec<serde_json::Value>,
    upstream: Vec<Received>,
    access_log: Vec<serde_json::Value>,
}

impl Ledger {
    /// Takes the ledger's baseline.
    pub async fn take(stack: &Stack) -> Result<Ledger> {
        let stats = stack.stats().await?;
        Ok(Ledger {
            outcomes: OUTCOMES
                .iter()
                .map(|o| (*o, filter_counter(&stats, &format!("checks.{o}"))))
                .collect(),
            audit: audit_records(stack)?.len(),
            primary: stack.primary.requests().len(),
            backup: stack.backup.requests().len(),
            access_log: stack.envoy.access_log()?.len(),
            vm: vm_stats(&stats),
            log_offset: stack.envoy.log().len(),
        })
    }

    async fn observe(&self, stack: &Stack) -> Result<Observed> {
        let stats = stack.stats().await?;
        let mut upstream: Vec<Received> = stack
            .primary
            .requests()
            .into_iter()
            .skip(self.primary)
            .collect();
        upstream.extend(stack.backup.requests().into_iter().skip(self.backup));
        Ok(Observed {
            counts: OUTCOMES
                .iter()
                .map(|o| {
                    let now = filter_counter(&stats, &format!("checks.{o}"));
                    (*o, now.saturating_sub(self.outcomes[o]))
                })
                .collect(),
            audit: audit_records(stack)?.into_iter().skip(self.audit).collect(),
            upstream,
            access_log: stack
                .envoy
                .access_log()?
                .into_iter()
                .skip(self.access_log)
                .collect(),
        })
    }

    /// Asserts that nothing happened since the baseline: no outcome, no audit record, no
    /// upstream request (a request still held is undecided).
    pub async fn assert_quiet(&self, stack: &Stack, what: &str) -> Result<()> {
        let o = self.observe(stack).await?;
        let moved: Vec<String> = o
            .counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} +{n}"))
            .collect();
        if !moved.is_empty() || !o.audit.is_empty() || !o.upstream.is_empty() {
            bail!(
                "{what}: expected nothing decided yet, got outcomes {moved:?}, {} audit records, upstream {:?}",
                o.audit.len(),
                o.upstream.iter().map(summary).collect::<Vec<_>>()
            );
        }
        Ok(())
    }

    /// Waits (bounded) until the counters, the audit log, the upstream and the access log
    /// caught up with `expected`, then asserts the three invariants exactly; `case` names
    /// the case in failure messages. Returns what the case left behind.
    pub async fn settle(&self, stack: &Stack, case: &str, expected: Outcomes) -> Result<Settled> {
        let logged = |o: &Observed, outcome: &str| {
            o.access_log
                .iter()
                .filter(|l| l["arbiter_outcome"] == outcome)
                .count() as u64
        };
        let reached = eventually(SETTLE_TIMEOUT, &format!("{case}: outcomes"), || async {
            let o = self.observe(stack).await.ok()?;
            let counted = OUTCOMES.iter().all(|n| o.counts[n] >= expected.get(n));
            // Cancelled requests may end before Envoy writes their line.
            let logged = OUTCOMES
                .iter()
                .filter(|n| **n != "cancelled")
                .all(|n| logged(&o, n) >= expected.get(n));
            (counted
                && logged
                && o.audit.len() as u64 >= expected.expected_audit().0
                && o.upstream.len() as u64 >= expected.expected_upstream())
            .then_some(())
        })
        .await;
        let o = self.observe(stack).await?;
        let stats = stack.stats().await?;
        let log = stack.envoy.log();
        let new_log = log.get(self.log_offset..).unwrap_or_default();
        let want: BTreeMap<&str, u64> = OUTCOMES.iter().map(|n| (*n, expected.get(n))).collect();

        let mut problems = Vec::new();
        if let Err(e) = reached {
            problems.push(format!("{e:#}"));
        }
        // (b) exactly one outcome per request, one audit record per server decision.
        if o.counts != want {
            problems.push(format!(
                "(b) outcome counters grew by {:?}, expected {want:?}",
                o.counts
            ));
        }
        let (least, most) = expected.expected_audit();
        if !(least..=most).contains(&(o.audit.len() as u64)) {
            problems.push(format!(
                "(b) {} audit records written, expected {least}..={most}",
                o.audit.len(),
            ));
        }
        for outcome in OUTCOMES {
            let lines = logged(&o, outcome);
            let bad = if outcome == "cancelled" {
                lines > want[outcome]
            } else {
                lines != want[outcome]
            };
            if bad {
                problems.push(format!(
                    "(b) {lines} access-log lines say `{outcome}`, the counter grew by {}",
                    o.counts[outcome]
                ));
            }
        }
        // (a) nothing upstream that was not allowed or marked.
        for line in &o.access_log {
            if line["arbiter_outcome"].is_null() && !line["upstream_host"].is_null() {
                problems.push(format!(
                    "(a) a request reached the upstream without any outcome: {line}"
                ));
            }
        }
        if o.upstream.len() as u64 != expected.expected_upstream() {
            problems.push(format!(
                "(a) the upstream received {} requests, expected {}: {:?}",
                o.upstream.len(),
                expected.expected_upstream(),
                o.upstream.iter().map(summary).collect::<Vec<_>>()
            ));
        }
        let records = audit_records(stack)?;
        let allowed_ids: HashSet<&str> = records
            .iter()
            .filter(|r| r["decision"] == "allow")
            .filter_map(|r| r["id"].as_str())
            .collect();
        let (mut decided, mut marked, mut unmarked) = (0, 0, 0);
        for request in &o.upstream {
            let audit_ids = header_values(request, "x-arbiter-audit-id");
            let markers = header_values(request, "x-arbiter-fail-open");
            let arbiter: Vec<&str> = request
                .headers
                .iter()
                .filter(|(k, _)| k.starts_with("x-arbiter-"))
                .map(|(k, _)| k.as_str())
                .collect();
            match (audit_ids.as_slice(), markers.as_slice()) {
                ([id], []) if allowed_ids.contains(id) => decided += 1,
                ([], [reason]) if REASONS.contains(reason) && arbiter.len() == 1 => marked += 1,
                ([], []) if arbiter.is_empty() => unmarked += 1,
                _ => problems.push(format!(
                    "(a) upstream request neither allowed by a recorded decision nor marked once: {}",
                    summary(request)
                )),
            }
            let distinct: HashSet<&str> = arbiter.iter().copied().collect();
            if distinct.len() != arbiter.len() {
                problems.push(format!(
                    "(a) an x-arbiter-* header arrived more than once: {}",
                    summary(request)
                ));
            }
            if let Some(forged) = request
                .headers
                .iter()
                .find(|(k, _)| k.starts_with("x-arbiter-") && !FILTER_MARKERS.contains(&k.as_str()))
            {
                problems.push(format!(
                    "(a) upstream request carries `{}` that neither the filter nor the server sets: {}",
                    forged.0,
                    summary(request)
                ));
            }
        }
        if expected.upstream.is_none() {
            let categories = [
                (
                    "with an allowing audit id",
                    decided,
                    o.counts["allow"] + o.counts["cached"],
                ),
                ("marked fail-open", marked, o.counts["fail_open"]),
                ("unmarked (disabled routes)", unmarked, o.counts["disabled"]),
            ];
            for (what, seen, outcomes) in categories {
                if seen != outcomes {
                    problems.push(format!(
                        "(a) {seen} upstream requests {what}, but {outcomes} such outcomes"
                    ));
                }
            }
        }
        // (c) no VM crashed or was reloaded.
        let vm = vm_stats(&stats);
        if vm != self.vm {
            problems.push(format!("(c) VM stats changed: {:?} -> {vm:?}", self.vm));
        }
        for marker in CRASH_MARKERS {
            if new_log.contains(marker) {
                problems.push(format!("(c) Envoy's log shows `{marker}`"));
            }
        }
        for line in &o.access_log {
            if line["response_code_details"] == "wasm_fail_stream" {
                problems.push(format!("(c) a request met a failed VM: {line}"));
            }
        }
        if !problems.is_empty() {
            bail!("{case}:\n  {}", problems.join("\n  "));
        }
        Ok(Settled {
            upstream: o.upstream,
            audit: o.audit,
            access_log: o.access_log,
        })
    }
}

/// The `x-arbiter-*` headers the filter or the policy server put on an upstream request.
pub const FILTER_MARKERS: [&str; 3] = [
    "x-arbiter-audit-id",
    "x-arbiter-policy-version",
    "x-arbiter-fail-open",
];

fn header_values<'a>(request: &'a Received, name: &str) -> Vec<&'a str> {
    request
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The stats of [`VM_STATS`] (absent ones as 0).
pub fn vm_stats(stats: &std::collections::HashMap<String, u64>) -> BTreeMap<&'static str, u64> {
    VM_STATS
        .iter()
        .map(|s| (*s, stats.get(*s).copied().unwrap_or(0)))
        .collect()
}

fn audit_records(stack: &Stack) -> Result<Vec<serde_json::Value>> {
    match &stack.policy {
        Some(server) => server.audit_records(),
        None => Ok(Vec::new()),
    }
}

fn summary(r: &Received) -> String {
    let arbiter: Vec<String> = r
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-arbiter-"))
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    format!(
        "{} {} [{}] {} bytes",
        r.method,
        r.path,
        arbiter.join(", "),
        r.body_len
    )
}

// ---------------------------------------------------------------------------------------
// Answers

/// How the gateway ended one request.
#[derive(Debug)]
pub enum Answer {
    /// A complete response.
    Reply(Reply),
    /// The stream (h2) or the connection (h1) ended without a complete response.
    Reset(String),
}

impl Answer {
    /// The reply, or an error naming the reset.
    pub fn reply(self) -> Result<Reply> {
        match self {
            Answer::Reply(reply) => Ok(reply),
            Answer::Reset(why) => Err(anyhow!("no response: {why}")),
        }
    }

    /// The status, if a response arrived.
    pub fn status(&self) -> Option<u16> {
        match self {
            Answer::Reply(reply) => Some(reply.status),
            Answer::Reset(_) => None,
        }
    }
}

/// The JSON error `type` and `reason` of a gateway answer (`policy_denied`,
/// `policy_unavailable`), for assertions.
pub fn error_kind(reply: &Reply) -> (String, String) {
    let body = reply.json().unwrap_or_default();
    (
        body["error"]["type"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        body["error"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

// ---------------------------------------------------------------------------------------
// HTTP/2

/// One HTTP/2 connection to Envoy (prior knowledge, cleartext).
pub struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    driver: JoinHandle<()>,
    authority: String,
}

/// One request head for [`H2Conn::open`].
#[derive(Debug, Clone)]
pub struct Head {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Headers in order; repeated names stay repeated. Values are raw bytes (any byte but
    /// CR, LF and NUL).
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    /// `POST path` with `content-type: application/json`.
    pub fn post(path: &str) -> Head {
        Head {
            method: Method::POST,
            path: path.to_owned(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Head {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    /// Adds `content-length: n`.
    pub fn content_length(self, n: usize) -> Head {
        self.header("content-length", n.to_string())
    }
}

impl H2Conn {
    /// Connects to `addr` and completes the HTTP/2 handshake.
    pub async fn connect(addr: SocketAddr) -> Result<H2Conn> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::Builder::new()
            // Bodies up to a few MiB go out without waiting for window updates per stream.
            .initial_window_size(8 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake::<_, Bytes>(tcp)
            .await
            .context("HTTP/2 handshake with Envoy")?;
        let mut connection = connection;
        let ping_pong = connection.ping_pong();
        let driver = tokio::spawn(async move {
            // Ends when Envoy closes the connection or the client is dropped.
            let _ = connection.await;
        });
        // Envoy's SETTINGS come before its answer to a PING: once the PONG is here, the
        // client knows Envoy's `max_concurrent_streams` (100) and waits for a free stream
        // instead of opening more, which Envoy would refuse (REFUSED_STREAM) — a race the
        // client lost on a loaded machine when it opened streams right after the handshake.
        if let Some(mut ping_pong) = ping_pong {
            tokio::time::timeout(Duration::from_secs(30), ping_pong.ping(h2::Ping::opaque()))
                .await
                .context("no PONG from Envoy within 30 s")?
                .context("HTTP/2 PING to Envoy")?;
        }
        Ok(H2Conn {
            send,
            driver,
            authority: addr.to_string(),
        })
    }

    /// Sends `authority` as the `:authority` of the streams opened from now on.
    pub fn authority(mut self, authority: &str) -> H2Conn {
        authority.clone_into(&mut self.authority);
        self
    }

    /// Connects to the stack's Envoy listener.
    pub async fn to(stack: &Stack) -> Result<H2Conn> {
        H2Conn::connect(SocketAddr::from(([127, 0, 0, 1], stack.envoy.port()?))).await
    }

    /// Sends the headers of a new stream (with `END_STREAM` when `end_of_stream`).
    pub async fn open(&mut self, head: &Head, end_of_stream: bool) -> Result<H2Stream> {
        let mut builder = Request::builder()
            .method(head.method.clone())
            .uri(format!("http://{}{}", self.authority, head.path));
        for (name, value) in &head.headers {
            builder = builder.header(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_bytes(value)?,
            );
        }
        let request = builder.body(())?;
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .context("Envoy's HTTP/2 connection is not ready for a new stream")?;
        let (response, stream) = send
            .send_request(request, end_of_stream)
            .context("sending HEADERS")?;
        Ok(H2Stream { response, stream })
    }
}

impl Drop for H2Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// One open HTTP/2 stream.
pub struct H2Stream {
    response: h2::client::ResponseFuture,
    stream: h2::SendStream<Bytes>,
}

/// How long a raw client waits for a gateway answer (generous: a loaded 2-core box).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

impl H2Stream {
    /// Sends a `DATA` frame (h2 splits it to the peer's frame size and flow control).
    pub fn data(&mut self, bytes: &[u8], end_of_stream: bool) -> Result<()> {
        self.stream
            .send_data(Bytes::copy_from_slice(bytes), end_of_stream)
            .context("sending DATA")
    }

    /// Sends `TRAILERS` (ends the stream).
    pub fn trailers(&mut self, trailers: &[(&str, &str)]) -> Result<()> {
        let mut map = HeaderMap::new();
        for (name, value) in trailers {
            map.append(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        self.stream.send_trailers(map).context("sending TRAILERS")
    }

    /// Sends `RST_STREAM` (`CANCEL`): the client gives up on this request.
    pub fn reset(&mut self) {
        self.stream.send_reset(h2::Reason::CANCEL);
    }

    /// Waits for the response head and body, or for the stream to be reset.
    pub async fn answer(self) -> Result<Answer> {
        self.answer_within(ANSWER_TIMEOUT).await
    }

    /// Like [`H2Stream::answer`] with a deadline of its own.
    pub async fn answer_within(self, timeout: Duration) -> Result<Answer> {
        let H2Stream { response, stream } = self;
        let read = async move {
            // Keep the send half alive while reading: dropping it may reset the stream.
            let _stream = stream;
            let response = match response.await {
                Ok(response) => response,
                Err(e) => return Ok(Answer::Reset(e.to_string())),
            };
            let (parts, mut body) = response.into_parts();
            let mut bytes = BytesMut::new();
            while let Some(chunk) = body.data().await {
                match chunk {
                    Ok(chunk) => {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        bytes.extend_from_slice(&chunk);
                    }
                    Err(e) => return Ok(Answer::Reset(format!("reset mid-body: {e}"))),
                }
            }
            Ok(Answer::Reply(Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: bytes.freeze(),
            }))
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| anyhow!("no answer on the HTTP/2 stream within {timeout:?}"))?
    }

    /// Whether Envoy already answered (or reset) without waiting for the rest of the
    /// request: polls the response once, without blocking.
    pub fn answered_early(&mut self) -> bool {
        use std::future::Future;
        use std::task::{Context as TaskContext, Poll};
        let waker = std::task::Waker::noop();
        let mut cx = TaskContext::from_waker(waker);
        matches!(
            std::pin::Pin::new(&mut self.response).poll(&mut cx),
            Poll::Ready(_)
        )
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1

/// An HTTP/1.1 request written byte for byte.
#[derive(Debug, Clone)]
pub struct H1Request {
    /// Method.
    pub method: String,
    /// Request target.
    pub path: String,
    /// Headers in order, values as raw bytes (sent as given: obs-text, repeats).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body and how it is framed.
    pub body: H1Body,
}

/// How an [`H1Request`] frames its body.
#[derive(Debug, Clone)]
pub enum H1Body {
    /// No body, no framing header.
    None,
    /// `content-length` and the bytes.
    Length(Vec<u8>),
    /// `transfer-encoding: chunked`, one chunk each, then the trailer section.
    Chunked(Vec<Vec<u8>>, Vec<(String, String)>),
}

impl H1Request {
    /// `method path` with `host` set and no body.
    pub fn new(method: &str, path: &str) -> H1Request {
        H1Request {
            method: method.to_owned(),
            path: path.to_owned(),
            headers: vec![("host".into(), b"arbiter.test".to_vec())],
            body: H1Body::None,
        }
    }

    /// A JSON `POST` of `body` with `content-length`.
    pub fn post(path: &str, body: impl AsRef<[u8]>) -> H1Request {
        H1Request::new("POST", path)
            .header("content-type", "application/json")
            .body(H1Body::Length(body.as_ref().to_vec()))
    }

    /// A JSON `POST` of `chunks` with `transfer-encoding: chunked`.
    pub fn post_chunked(path: &str, chunks: Vec<Vec<u8>>) -> H1Request {
        H1Request::new("POST", path)
            .header("content-type", "application/json")
            .body(H1Body::Chunked(chunks, Vec::new()))
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> H1Request {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: H1Body) -> H1Request {
        self.body = body;
        self
    }

    /// The head (request line, headers, blank line).
    pub fn head_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        match &self.body {
            H1Body::None => {}
            H1Body::Length(body) => {
                out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes())
            }
            H1Body::Chunked(..) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The body bytes as framed on the wire, in the pieces a slow client would send.
    pub fn body_pieces(&self) -> Vec<Vec<u8>> {
        match &self.body {
            H1Body::None => Vec::new(),
            H1Body::Length(body) => vec![body.clone()],
            H1Body::Chunked(chunks, trailers) => {
                let mut pieces: Vec<Vec<u8>> = chunks
                    .iter()
                    .filter(|c| !c.is_empty())
                    .map(|c| {
                        let mut piece = format!("{:x}\r\n", c.len()).into_bytes();
                        piece.extend_from_slice(c);
                        piece.extend_from_slice(b"\r\n");
                        piece
                    })
                    .collect();
                let mut last = b"0\r\n".to_vec();
                for (name, value) in trailers {
                    last.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                }
                last.extend_from_slice(b"\r\n");
                pieces.push(last);
                pieces
            }
        }
    }

    /// The whole request on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.head_bytes();
        for piece in self.body_pieces() {
            out.extend_from_slice(&piece);
        }
        out
    }
}

/// One HTTP/1.1 connection to Envoy, driven byte by byte.
pub struct H1Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl H1Conn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<H1Conn> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        Ok(H1Conn {
            tcp,
            buf: Vec::new(),
        })
    }

    /// Connects to the stack's Envoy listener.
    pub async fn to(stack: &Stack) -> Result<H1Conn> {
        H1Conn::connect(SocketAddr::from(([127, 0, 0, 1], stack.envoy.port()?))).await
    }

    /// Writes raw bytes. A peer that already closed is not an error here: the answer (or
    /// its absence) is what the test looks at.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if let Err(e) = self.tcp.write_all(bytes).await {
            if !matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Writes a whole request and reads its answer.
    pub async fn request(&mut self, request: &H1Request) -> Result<Answer> {
        self.write(&request.to_bytes()).await?;
        self.answer().await
    }

    /// Reads one response (`content-length`, chunked, or until close), or reports the
    /// connection closing first.
    pub async fn answer(&mut self) -> Result<Answer> {
        self.answer_within(ANSWER_TIMEOUT).await
    }

    /// Like [`H1Conn::answer`] with a deadline of its own.
    pub async fn answer_within(&mut self, timeout: Duration) -> Result<Answer> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((reply, used)) = parse_response(&self.buf, false)? {
                self.buf.drain(..used);
                return Ok(Answer::Reply(reply));
            }
            let mut chunk = [0u8; 16 * 1024];
            let left = deadline.saturating_duration_since(Instant::now());
            let read = tokio::time::timeout(left, self.tcp.read(&mut chunk))
                .await
                .map_err(|_| anyhow!("no HTTP/1.1 answer within {timeout:?}"))?;
            match read {
                Ok(0) | Err(_) => {
                    // Closed: a response delimited by the close is complete now.
                    if let Some((reply, used)) = parse_response(&self.buf, true)? {
                        self.buf.drain(..used);
                        return Ok(Answer::Reply(reply));
                    }
                    let why = match read {
                        Err(e) => format!("connection error: {e}"),
                        _ => "connection closed".to_owned(),
                    };
                    return Ok(Answer::Reset(why));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether anything arrived from Envoy yet (without waiting).
    pub async fn has_bytes(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(Duration::from_millis(1), self.tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(Ok(_)) | Ok(Err(_)) => true,
            Err(_) => false,
        }
    }

    /// Closes the connection with FIN (the client goes away politely).
    pub async fn close(mut self) {
        let _ = self.tcp.shutdown().await;
    }

    /// Closes the connection with RST (`SO_LINGER` 0: the client vanishes).
    pub fn reset(self) {
        let _ = self.tcp.set_zero_linger();
        drop(self.tcp);
    }
}

/// Parses one HTTP/1.1 response from `buf`; `closed` means no more bytes will come.
fn parse_response(buf: &[u8], closed: bool) -> Result<Option<(Reply, usize)>> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line `{status_line}`"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            headers.append(
                HeaderName::from_bytes(name.trim().as_bytes())?,
                HeaderValue::from_str(value.trim())?,
            );
        }
    }
    let body_start = head_end + 4;
    let rest = &buf[body_start..];
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
    let (body, used) = if status == 204 || status == 304 || (100..200).contains(&status) {
        (Vec::new(), 0)
    } else if chunked {
        match decode_chunked(rest) {
            Some(done) => done,
            None => return Ok(None),
        }
    } else if let Some(length) = length {
        if rest.len() < length {
            return Ok(None);
        }
        (rest[..length].to_vec(), length)
    } else if closed {
        (rest.to_vec(), rest.len())
    } else {
        return Ok(None);
    };
    Ok(Some((
        Reply {
            status,
            headers,
            body: Bytes::from(body),
        },
        body_start + used,
    )))
}

/// Decodes a complete chunked body; `None` while incomplete.
fn decode_chunked(mut buf: &[u8]) -> Option<(Vec<u8>, usize)> {
    let total = buf.len();
    let mut body = Vec::new();
    loop {
        let line_end = find(buf, b"\r\n")?;
        let size_text = std::str::from_utf8(&buf[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        buf = &buf[line_end + 2..];
        if size == 0 {
            // Trailer section up to the blank line.
            let end = if buf.starts_with(b"\r\n") {
                2
            } else {
                find(buf, b"\r\n\r\n")? + 4
            };
            buf = &buf[end..];
            return Some((body, total - buf.len()));
        }
        if buf.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// One request, either protocol

/// The protocol a [`Req`] is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 over a fresh connection: `content-length`, or chunked when the length is
    /// withheld or trailers are sent (Envoy's HTTP/1 codec drops request trailers unless
    /// configured otherwise).
    H1,
    /// HTTP/2 (prior knowledge) over a fresh connection: `DATA` frames, `TRAILERS` last.
    H2,
}

impl Proto {
    /// Both protocols.
    pub const BOTH: [Proto; 2] = [Proto::H1, Proto::H2];
}

/// How a [`Req`] frames its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body at all: h1 without framing headers, h2 `END_STREAM` on the headers.
    None,
    /// `content-length` announces the body (also when it is empty).
    Length,
    /// The length is not announced: h1 chunked, h2 `DATA` frames without `content-length`
    /// (an empty body is an empty last chunk / `DATA` frame).
    Unknown,
}

/// A request described once and sent over either protocol by [`send`].
#[derive(Debug, Clone)]
pub struct Req {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// Headers in order, raw values.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body bytes (may be empty).
    pub body: Vec<u8>,
    /// How the body is framed.
    pub framing: Framing,
    /// Trailers (h2 `TRAILERS`, h1 chunked trailer section).
    pub trailers: Vec<(String, String)>,
}

impl Req {
    /// A JSON `POST` with `content-length`.
    pub fn post(path: &str, body: impl AsRef<[u8]>) -> Req {
        Req {
            method: Method::POST,
            path: path.to_owned(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: body.as_ref().to_vec(),
            framing: Framing::Length,
            trailers: Vec::new(),
        }
    }

    /// A `GET` without a body.
    pub fn get(path: &str) -> Req {
        Req {
            method: Method::GET,
            path: path.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            framing: Framing::None,
            trailers: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Req {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    /// Sends the body without announcing its length.
    pub fn no_length(self) -> Req {
        self.framing(Framing::Unknown)
    }

    /// Frames the body as `framing`.
    pub fn framing(mut self, framing: Framing) -> Req {
        self.framing = framing;
        self
    }

    /// Ends the request with these trailers.
    pub fn trailers(mut self, trailers: &[(&str, &str)]) -> Req {
        self.trailers = trailers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self
    }

    /// The HTTP/1.1 form (trailers need chunked framing, whatever `framing` says).
    pub fn h1(&self) -> H1Request {
        let mut request = H1Request::new(self.method.as_str(), &self.path);
        request.headers.extend(self.headers.iter().cloned());
        request.body = match self.framing {
            _ if !self.trailers.is_empty() || self.framing == Framing::Unknown => {
                let chunks = if self.body.is_empty() {
                    Vec::new()
                } else {
                    vec![self.body.clone()]
                };
                H1Body::Chunked(chunks, self.trailers.clone())
            }
            Framing::Length => H1Body::Length(self.body.clone()),
            Framing::None | Framing::Unknown => H1Body::None,
        };
        request
    }

    /// The HTTP/2 head.
    pub fn h2_head(&self) -> Head {
        let head = Head {
            method: self.method.clone(),
            path: self.path.clone(),
            headers: self.headers.clone(),
        };
        if self.framing == Framing::Length {
            head.content_length(self.body.len())
        } else {
            head
        }
    }

    /// Whether the h2 headers end the stream.
    fn h2_headers_end_stream(&self) -> bool {
        self.trailers.is_empty()
            && match self.framing {
                Framing::None => true,
                Framing::Length => self.body.is_empty(),
                Framing::Unknown => false,
            }
    }
}

/// Sends `req` over `proto` on a fresh connection and waits for the answer.
pub async fn send(stack: &Stack, proto: Proto, req: &Req) -> Result<Answer> {
    send_to(listener(stack)?, proto, req).await
}

/// Sends every request at once (each on its own connection) and returns the answers in
/// order: cases that wait out a hanging policy server cost one timeout, not one each.
pub async fn send_all(stack: &Stack, reqs: &[(Proto, Req)]) -> Result<Vec<Answer>> {
    let addr = listener(stack)?;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (proto, req)) in reqs.iter().enumerate() {
        let (proto, req) = (*proto, req.clone());
        tasks.spawn(async move { (i, send_to(addr, proto, &req).await) });
    }
    let mut answers: Vec<Option<Answer>> = reqs.iter().map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, answer) = joined?;
        answers[i] = Some(answer?);
    }
    answers
        .into_iter()
        .map(|a| a.context("a request got no answer"))
        .collect()
}

fn listener(stack: &Stack) -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], stack.envoy.port()?)))
}

async fn send_to(addr: SocketAddr, proto: Proto, req: &Req) -> Result<Answer> {
    match proto {
        Proto::H1 => H1Conn::connect(addr).await?.request(&req.h1()).await,
        Proto::H2 => {
            let mut h2 = H2Conn::connect(addr).await?;
            let end_after_headers = req.h2_headers_end_stream();
            let mut stream = h2.open(&req.h2_head(), end_after_headers).await?;
            // Envoy may reset the stream before it has all of it (e.g. headers over its
            // limits): sending the rest then fails, and the answer says why.
            let mut sent = Ok(());
            if !end_after_headers && (!req.body.is_empty() || req.trailers.is_empty()) {
                sent = stream.data(&req.body, req.trailers.is_empty());
            }
            if sent.is_ok() && !req.trailers.is_empty() {
                let trailers: Vec<(&str, &str)> = req
                    .trailers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                sent = stream.trailers(&trailers);
            }
            let _ = sent;
            stream.answer().await
        }
    }
}

/// Sends `req` and returns the complete reply (a reset is an error).
pub async fn send_ok(stack: &Stack, proto: Proto, req: &Req) -> Result<Reply> {
    send(stack, proto, req)
        .await?
        .reply()
        .with_context(|| format!("{proto:?} {} {}", req.method, req.path))
}

// ---------------------------------------------------------------------------------------
// Waiting for Envoy's side of things

/// How long the helpers below wait for Envoy to get somewhere.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Policy calls Envoy has started toward the policy cluster so far.
pub async fn policy_calls(stack: &Stack) -> Result<u64> {
    stack
        .envoy
        .stat("cluster.arbiter_policy.upstream_rq_total")
        .await
}

/// Waits until Envoy has started more than `before` policy calls: the check of the request
/// just sent is in flight.
pub async fn wait_policy_call(stack: &Stack, before: u64) -> Result<()> {
    eventually(STATE_TIMEOUT, "the policy call to be in flight", || async {
        (policy_calls(stack).await.ok()? > before).then_some(())
    })
    .await
}

/// Waits until Envoy holds `n` downstream requests (their headers reached the filter).
pub async fn wait_active_requests(stack: &Stack, n: u64) -> Result<()> {
    eventually(
        STATE_TIMEOUT,
        &format!("{n} active downstream requests"),
        || async {
            (stack
                .envoy
                .stat("http.ingress.downstream_rq_active")
                .await
                .ok()?
                >= n)
                .then_some(())
        },
    )
    .await
}

/// The filter counter `wasmcustom.arbiter.<name>` now.
pub async fn filter_stat(stack: &Stack, name: &str) -> Result<u64> {
    Ok(filter_counter(&stack.stats().await?, name))
}

/// Waits until Envoy holds no downstream request any more (a reset one has ended).
pub async fn wait_idle(stack: &Stack) -> Result<()> {
    eventually(STATE_TIMEOUT, "no active downstream requests", || async {
        (stack
            .envoy
            .stat("http.ingress.downstream_rq_active")
            .await
            .ok()?
            == 0)
            .then_some(())
    })
    .await
}

/// Waits until the filter counter `wasmcustom.arbiter.<name>` reaches `at_least`.
pub async fn wait_filter_counter(stack: &Stack, name: &str, at_least: u64) -> Result<()> {
    eventually(
        STATE_TIMEOUT,
        &format!("{name} to reach {at_least}"),
        || async {
            let stats = stack.stats().await.ok()?;
            (filter_counter(&stats, name) >= at_least).then_some(())
        },
    )
    .await
}

/// The template edit that makes Envoy forward request trailers to the (HTTP/1.1) providers.
/// The shipped config does not: Envoy's HTTP/1 codec drops trailers unless
/// `enable_trailers` is set, so trailers reach a provider only when an operator asks.
pub const FORWARD_TRAILERS: (&str, &str) = (
    "  - name: llm\n    type: STATIC\n",
    "  - name: llm\n    type: STATIC\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config:\n          http_protocol_options: { enable_trailers: true }\n",
);

// ---------------------------------------------------------------------------------------
// A filter that crashes, to prove the ledger notices

/// Writes a minimal proxy-wasm module (ABI 0.2.1) to `path` that starts and configures
/// like any filter and traps (`unreachable`) in every `proxy_on_request_headers`: what a
/// panicking filter looks like to Envoy. The ledger's (c) must catch it.
pub fn write_trapping_filter(path: &std::path::Path) -> Result<()> {
    fn leb(mut n: u32, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn section(id: u8, body: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(body.len() as u32, out);
        out.extend_from_slice(body);
    }
    const I32: u8 = 0x7f;
    // Function types: () -> (), (i32) -> i32, (i32 i32) -> (), (i32 i32) -> i32,
    // (i32 i32 i32) -> i32, (i32) -> ().
    let types: [&[u8]; 6] = [
        &[0x60, 0, 0],
        &[0x60, 1, I32, 1, I32],
        &[0x60, 2, I32, I32, 0],
        &[0x60, 2, I32, I32, 1, I32],
        &[0x60, 3, I32, I32, I32, 1, I32],
        &[0x60, 1, I32, 0],
    ];
    // (export name, type index, body without the locals count)
    let return_one: &[u8] = &[0x41, 1, 0x0b];
    let functions: [(&str, u8, &[u8]); 9] = [
        ("proxy_abi_version_0_2_1", 0, &[0x0b]),
        // Every allocation at offset 1024 of the one page: nothing is ever read back.
        ("proxy_on_memory_allocate", 1, &[0x41, 0x80, 0x08, 0x0b]),
        ("proxy_on_context_create", 2, &[0x0b]),
        ("proxy_on_vm_start", 3, return_one),
        ("proxy_on_configure", 3, return_one),
        ("proxy_on_request_headers", 4, &[0x00, 0x0b]),
        ("proxy_on_done", 1, return_one),
        ("proxy_on_log", 5, &[0x0b]),
        ("proxy_on_delete", 5, &[0x0b]),
    ];
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    let mut body = Vec::new();
    leb(types.len() as u32, &mut body);
    for t in types {
        body.extend_from_slice(t);
    }
    section(1, &body, &mut module);
    let mut body = Vec::new();
    leb(functions.len() as u32, &mut body);
    body.extend(functions.iter().map(|(_, t, _)| *t));
    section(3, &body, &mut module);
    section(5, &[1, 0, 1], &mut module);
    let mut body = Vec::new();
    leb(functions.len() as u32 + 1, &mut body);
    for (i, (name, _, _)) in functions.iter().enumerate() {
        leb(name.len() as u32, &mut body);
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        leb(i as u32, &mut body);
    }
    body.extend_from_slice(&[6, b'm', b'e', b'm', b'o', b'r', b'y', 2, 0]);
    section(7, &body, &mut module);
    let mut body = Vec::new();
    leb(functions.len() as u32, &mut body);
    for (_, _, code) in functions {
        leb(code.len() as u32 + 1, &mut body);
        body.push(0);
        body.extend_from_slice(code);
    }
    section(10, &body, &mut module);
    std::fs::write(path, module).with_context(|| format!("writing {}", path.display()))
}
