//! Helpers shared by the server tests.

#![allow(dead_code)]

pub mod supply;

use std::path::PathBuf;

use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    AttributeContext, CheckRequest,
};

/// The example bundle the demo and end-to-end tests use.
pub fn example_bundle() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/ai-gateway/policies")
}

/// The HTTP request inside `request`, to change it in a test.
pub fn http_mut(request: &mut CheckRequest) -> &mut HttpRequest {
    request
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("a CheckRequest with an HTTP request")
}

/// A CheckRequest as the filter sends it.
pub fn check_request(
    principal: &str,
    method: &str,
    path: &str,
    extensions: &[(&str, &str)],
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "127.0.0.1".into(),
                        port_specifier: Some(PortSpecifier::PortValue(40000)),
                        ..Default::default()
                    })),
                }),
                principal: principal.into(),
                ..Default::default()
            }),
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "test-request-1".into(),
                    method: method.into(),
                    path: path.into(),
                    host: "gateway.local".into(),
                    scheme: "http".into(),
                    headers: [("authorization".to_owned(), "Bearer sk-secret".to_owned())]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }),
            }),
            context_extensions: extensions
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    }
}

/// A server running in this process on `127.0.0.1:0` (gRPC and metrics), with the bundle
/// watchers of `run`, stopped on drop.
pub struct Running {
    /// gRPC address.
    pub addr: std::net::SocketAddr,
    /// Metrics address.
    pub metrics: std::net::SocketAddr,
    /// Holds the audit log's directory.
    pub audit_dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), arbiter_policy_server::ServerError>>>,
}

impl Running {
    /// Starts a server deciding with `policies` (and `shadow`), polling every `interval`.
    pub async fn start(
        policies: &std::path::Path,
        shadow: Option<&std::path::Path>,
        interval: std::time::Duration,
    ) -> Running {
        use arbiter_policy_server::{
            Bundle, BundleRole, Extras, Metrics, PolicyEngine, StatusBoard, Watch,
        };
        use std::sync::Arc;
        let status = Arc::new(StatusBoard::default());
        let mut watches = vec![Watch::new(BundleRole::Active, policies)];
        let bundle = Bundle::load(policies).unwrap();
        status.loaded(BundleRole::Active, policies, &bundle);
        let engine = Arc::new(PolicyEngine::with_metrics(bundle, Arc::new(Metrics::new())));
        if let Some(shadow) = shadow {
            watches.push(Watch::new(BundleRole::Shadow, shadow));
            let bundle = Bundle::load(shadow).unwrap();
            status.loaded(BundleRole::Shadow, shadow, &bundle);
            engine.set_shadow(Some(Arc::new(bundle)));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = metrics_listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let extras = Extras {
            watches,
            reload_interval: interval,
            metrics_listener: Some(metrics_listener),
            status,
            ..Extras::default()
        };
        let audit_dir = tempfile::tempdir().unwrap();
        let mut audit_config =
            arbiter_policy_server::AuditConfig::new(audit_dir.path().join("audit.log"));
        audit_config.sync = arbiter_policy_server::AuditSync::Write;
        let audit = arbiter_policy_server::AuditLog::open(
            &audit_config,
            arbiter_policy_server::AuditMetrics::default(),
        )
        .unwrap();
        let task = tokio::spawn(arbiter_policy_server::serve_with(
            listener,
            engine,
            audit,
            arbiter_policy_server::Redactor::default(),
            extras,
            async {
                let _ = stopped.await;
            },
        ));
        Running {
            addr,
            metrics,
            audit_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A gRPC channel to the server.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// `GET path` on the metrics listener: the body.
    pub async fn http_get(&self, path: &str) -> String {
        http_get(self.metrics, path).await
    }

    /// The value of the metric line starting with `series` (0 if absent).
    pub async fn metric(&self, series: &str) -> f64 {
        metric(&self.http_get("/metrics").await, series)
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(std::time::Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `GET path` over HTTP/1.0 on `addr`: the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .unwrap()
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}

/// The value of the line starting with `series` in a metrics text (0 if absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The audit id a `CheckResponse` names (its dynamic metadata).
pub fn audit_id(response: &envoy_types::pb::envoy::service::auth::v3::CheckResponse) -> String {
    use envoy_types::pb::google::protobuf::value::Kind;
    match response
        .dynamic_metadata
        .as_ref()
        .and_then(|m| m.fields.get("audit_id"))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(id)) => id.clone(),
        other => panic!("no audit_id in {other:?}"),
    }
}

/// The lines of an audit file, parsed.
pub fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The built `arbiter-policy-server` binary, started on `127.0.0.1:0` with the example
/// bundle, JSON logs into `<dir>/server.log` and `--audit-log <dir>/audit.jsonl`; killed on
/// drop.
pub struct Server {
    /// The process.
    pub child: tokio::process::Child,
    /// Its gRPC address.
    pub addr: std::net::SocketAddr,
    /// Its audit log.
    pub audit: PathBuf,
    /// Its log file.
    pub log: PathBuf,
}

impl Server {
    /// Starts the server with `args` added; waits until it listens (30 s at most).
    pub async fn start(dir: &std::path::Path, args: &[&str]) -> Server {
        Self::start_with(dir, &example_bundle(), args).await
    }

    /// [`Server::start`] with the bundle `policies`.
    pub async fn start_with(
        dir: &std::path::Path,
        policies: &std::path::Path,
        args: &[&str],
    ) -> Server {
        let policies = policies.to_str().unwrap();
        let mut all = vec!["--policies", policies];
        all.extend_from_slice(args);
        match Self::launch(dir, &all).await {
            Ok(server) => server,
            Err(log) => panic!("{log}"),
        }
    }

    /// Starts the server with only `args` (no `--policies`): the server, or, if it exits
    /// before it listens, its exit status and log.
    pub async fn launch(dir: &std::path::Path, args: &[&str]) -> Result<Server, String> {
        let audit = dir.join("audit.jsonl");
        let log = dir.join("server.log");
        let before = std::fs::read_to_string(&log).unwrap_or_default().len();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_arbiter-policy-server"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ARBITER_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--audit-log")
            .arg(&audit)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let addr = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let found = text[before..].lines().find_map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).ok()?;
                event["fields"]["message"]
                    .as_str()?
                    .strip_prefix("listening on ")?
                    .parse()
                    .ok()
            });
            if let Some(addr) = found {
                break addr;
            }
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("server exited ({status}):\n{}", &text[before..]));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server did not listen:\n{text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        Ok(Server {
            child,
            addr,
            audit,
            log,
        })
    }

    /// The metrics address the server logged (`--metrics-listen`).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.log()
            .lines()
            .find_map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).ok()?;
                event["fields"]["message"]
                    .as_str()?
                    .strip_prefix("metrics on http://")?
                    .strip_suffix("/metrics")?
                    .parse()
                    .ok()
            })
            .expect("no metrics address in the log")
    }

    /// A connected channel.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's log once the decision line of every record in the audit log is in it.
    /// The server's log thread writes decision lines shortly after the answer, so a test
    /// that reads them polls (generously: a loaded machine may delay that thread).
    pub async fn decisions_logged(&self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let log = self.log();
            let records = audit_lines(&self.audit);
            let missing: Vec<&str> = records
                .iter()
                .filter_map(|record| record["id"].as_str())
                .filter(|id| !log.contains(id))
                .collect();
            if missing.is_empty() {
                return log;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no decision line for {missing:?} in the log:\n{log}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, like a crash.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}
