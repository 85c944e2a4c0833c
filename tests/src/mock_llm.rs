//! An in-process mock of an OpenAI-compatible LLM provider.
//!
//! Every response carries `"provider": "<name>"` in its JSON and an `x-mock-provider`
//! header, so a test can tell which upstream answered; successful answers also echo the
//! `x-arbiter-*` request headers as `"arbiter_headers"`. Every request is recorded. The
//! behaviour ([`Mode`]) can be switched at runtime from Rust or over HTTP
//! (`POST /__mock/mode`, `GET /__mock/requests`, `DELETE /__mock/requests`), on the main
//! port and on a separate control port that stays open while the main port refuses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::net::{Acceptor, Handler};
use crate::util::lock;

/// Response header naming the mock that answered.
pub const PROVIDER_HEADER: &str = "x-mock-provider";

/// The `retry-after` (seconds) of a [`Mode::Status`] 429 or 503 answer.
pub const STATUS_RETRY_AFTER: &str = "7";

/// What a [`Mode::Reset`] mock's service returns: hyper then closes the connection without
/// writing a response.
#[derive(Debug)]
struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock resets the connection")
    }
}

impl std::error::Error for ResetConnection {}

/// How the mock answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// OpenAI-shaped 200 answers.
    Ok,
    /// Every request gets this status with an OpenAI-shaped error body; a 429 or 503 also
    /// carries `retry-after: `[`STATUS_RETRY_AFTER`], as providers send it.
    Status(u16),
    /// Every request is read whole and recorded, then its connection is closed without an
    /// answer (a provider crashing mid-request, as Envoy sees a reset before the response).
    Reset,
    /// Answers like `Ok` after this delay.
    Slow(Duration),
    /// The listener is closed: connects are refused and live connections are dropped.
    Refuse,
}

/// One request as the mock received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received {
    /// HTTP method.
    pub method: String,
    /// Path and query, as received (after any Envoy rewrite).
    pub path: String,
    /// All headers in arrival order, names lowercase.
    pub headers: Vec<(String, String)>,
    /// Body length in bytes.
    pub body_len: usize,
    /// Body, lossily decoded as UTF-8.
    pub body: String,
    /// Body, exactly as received.
    #[serde(skip)]
    pub body_raw: Bytes,
    /// Request trailers in arrival order, names lowercase (empty when none arrived).
    #[serde(default)]
    pub trailers: Vec<(String, String)>,
}

impl Received {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether header `name` is present (case-insensitive).
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }

    /// The first value of trailer `name` (case-insensitive).
    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running mock provider; stops when dropped.
pub struct MockLlm {
    shared: Arc<Shared>,
    main: Arc<Acceptor>,
    control: Arc<Acceptor>,
}

struct Shared {
    name: String,
    mode: Mutex<Mode>,
    requests: Mutex<Vec<Received>>,
    counter: AtomicU64,
    /// Set once both listeners exist, so the HTTP control API can close/reopen the main one.
    main: Mutex<Option<std::sync::Weak<Acceptor>>>,
}

impl MockLlm {
    /// Starts a mock named `name` on `127.0.0.1:0`.
    pub async fn start(name: &str) -> Result<MockLlm> {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0)), None).await
    }

    /// Starts a mock on `listen`, with its control API also on `control` (port 0 if `None`).
    pub async fn start_on(
        name: &str,
        listen: SocketAddr,
        control: Option<SocketAddr>,
    ) -> Result<MockLlm> {
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            mode: Mutex::new(Mode::Ok),
            requests: Mutex::new(Vec::new()),
            counter: AtomicU64::new(0),
            main: Mutex::new(None),
        });
        let main = Acceptor::bind(listen, handler(shared.clone(), true))?;
        let control_addr = control.unwrap_or_else(|| SocketAddr::new(listen.ip(), 0));
        let control = Acceptor::bind(control_addr, handler(shared.clone(), false))?;
        *lock(&shared.main) = Some(Arc::downgrade(&main));
        Ok(MockLlm {
            shared,
            main,
            control,
        })
    }

    /// The provider's name (as in `x-mock-provider`).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The main (provider) address.
    pub fn addr(&self) -> SocketAddr {
        self.main.addr()
    }

    /// The main port.
    pub fn port(&self) -> u16 {
        self.main.addr().port()
    }

    /// Address of the control-only listener (`/__mock/*`), open even in `Refuse` mode.
    pub fn control_addr(&self) -> SocketAddr {
        self.control.addr()
    }

    /// Everything received so far on the main port (control calls excluded).
    pub fn requests(&self) -> Vec<Received> {
        lock(&self.shared.requests).clone()
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *lock(&self.shared.mode)
    }

    /// Switches the mode; `Refuse` closes the main listener, any other mode re-binds it.
    ///
    /// Once this returns, a `Refuse` port refuses connects and an `Ok` port accepts them.
    pub async fn set_mode(&self, mode: Mode) -> Result<()> {
        apply_mode(&self.shared, &self.main, mode).await
    }
}

async fn apply_mode(shared: &Shared, main: &Acceptor, mode: Mode) -> Result<()> {
    if let Mode::Status(code) = mode {
        if StatusCode::from_u16(code).is_err() {
            bail!("`{code}` is not an HTTP status");
        }
    }
    *lock(&shared.mode) = mode;
    match mode {
        Mode::Refuse => main.close(true).await,
        _ => main.reopen()?,
    }
    Ok(())
}

fn handler(shared: Arc<Shared>, main: bool) -> Handler {
    Arc::new(move |stream: TcpStream, _peer| {
        let shared = shared.clone();
        Box::pin(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { handle(&shared, main, req).await }
            });
            // Errors here are the peer going away, which tests provoke on purpose.
            // Envoy's limits (100 headers, 60 KiB) are what tests examine; the mock takes
            // whatever Envoy forwards, headers Envoy adds (x-forwarded-for, ...) included.
            let _ = hyper::server::conn::http1::Builder::new()
                .max_headers(1000)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
    })
}

async fn handle(
    shared: &Shared,
    main: bool,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ResetConnection> {
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.to_string());
    if path.starts_with("/__mock/") {
        return Ok(control(shared, &method, &path, req).await);
    }
    if !main {
        return Ok(reply(
            shared,
            StatusCode::NOT_FOUND,
            json!({"error": "control port serves /__mock/* only"}),
        ));
    }
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    // Echoed in every answer so a demo user can see the markers the filter added upstream.
    let arbiter_headers: serde_json::Map<String, Value> = headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-arbiter-"))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let (body, trailers) = match req.into_body().collect().await {
        Ok(collected) => {
            let trailers: Vec<(String, String)> = collected
                .trailers()
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_owned(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            (collected.to_bytes(), trailers)
        }
        Err(_) => (Bytes::new(), Vec::new()),
    };
    lock(&shared.requests).push(Received {
        method: method.to_string(),
        path: path.clone(),
        headers,
        body_len: body.len(),
        body: String::from_utf8_lossy(&body).into_owned(),
        body_raw: body.clone(),
        trailers,
    });

    let mode = *lock(&shared.mode);
    match mode {
        Mode::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = reply(
                shared,
                status,
                json!({
                    "error": {"type": "mock_status", "message": format!("mock {} answers {code}", shared.name)},
                    "provider": shared.name,
                }),
            );
            if matches!(code, 429 | 503) {
                response.headers_mut().insert(
                    hyper::header::RETRY_AFTER,
                    hyper::header::HeaderValue::from_static(STATUS_RETRY_AFTER),
                );
            }
            return Ok(response);
        }
        Mode::Reset => return Err(ResetConnection),
        Mode::Slow(delay) => tokio::time::sleep(delay).await,
        Mode::Ok | Mode::Refuse => {}
    }
    let n = shared.counter.fetch_add(1, Ordering::Relaxed);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let answer = match path.split('?').next().unwrap_or_default() {
        "/v1/chat/completions" => json!({
            "id": format!("chatcmpl-{}-{n}", shared.name),
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "provider": shared.name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": format!("hello from {}", shared.name)},
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
            "arbiter_headers": arbiter_headers,
        }),
        "/v1/embeddings" => json!({
            "object": "list",
            "model": model,
            "provider": shared.name,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
            "arbiter_headers": arbiter_headers,
        }),
        _ => json!({
            "provider": shared.name,
            "method": method.as_str(),
            "path": path,
            "body_bytes": body.len(),
            "arbiter_headers": arbiter_headers,
        }),
    };
    Ok(reply(shared, StatusCode::OK, answer))
}

/// Body of `POST /__mock/mode`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeRequest {
    mode: String,
    status: Option<u16>,
    delay_ms: Option<u64>,
}

async fn control(
    shared: &Shared,
    method: &Method,
    path: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let result: Result<Value> = async {
        match (method, path) {
            (&Method::GET, "/__mock/requests") => {
                Ok(serde_json::to_value(&*lock(&shared.requests))?)
            }
            (&Method::DELETE, "/__mock/requests") => {
                lock(&shared.requests).clear();
                Ok(json!({"cleared": true}))
            }
            (&Method::GET, "/__mock/mode") => {
                Ok(json!({"mode": format!("{:?}", *lock(&shared.mode))}))
            }
            (&Method::POST, "/__mock/mode") => {
                let body = req.into_body().collect().await?.to_bytes();
                let wanted: ModeRequest = serde_json::from_slice(&body)?;
                let mode = match wanted.mode.as_str() {
                    "ok" => Mode::Ok,
                    "status" => Mode::Status(wanted.status.unwrap_or(503)),
                    "slow" => Mode::Slow(Duration::from_millis(wanted.delay_ms.unwrap_or(1000))),
                    "refuse" => Mode::Refuse,
                    "reset" => Mode::Reset,
                    other => bail!("unknown mode `{other}` (ok, status, slow, refuse, reset)"),
                };
                let Some(main) = lock(&shared.main)
                    .as_ref()
                    .and_then(std::sync::Weak::upgrade)
                else {
                    bail!("mock is shutting down");
                };
                if mode == Mode::Refuse {
                    // This very call may arrive on the main port: close the listener now but
                    // drop live connections only after the answer has gone out.
                    *lock(&shared.mode) = mode;
                    main.close(false).await;
                    let main = Arc::downgrade(&main);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if let Some(main) = main.upgrade() {
                            if !main.is_open() {
                                main.abort_connections().await;
                            }
                        }
                    });
                } else {
                    apply_mode(shared, &main, mode).await?;
                }
                Ok(json!({"mode": format!("{mode:?}")}))
            }
            _ => bail!("unknown control call `{method} {path}`"),
        }
    }
    .await;
    match result {
        Ok(value) => reply(shared, StatusCode::OK, value),
        Err(err) => reply(
            shared,
            StatusCode::BAD_REQUEST,
            json!({"error": err.to_string()}),
        ),
    }
}

fn reply(shared: &Shared, status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Ok(name) = hyper::header::HeaderValue::from_str(&shared.name) {
        headers.insert(PROVIDER_HEADER, name);
    }
    response
}
