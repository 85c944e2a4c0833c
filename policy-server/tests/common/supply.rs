//! Real parts for the supply-chain tests, on 127.0.0.1: a test CA and server certificate
//! (generated per test) and Debian's `docker-registry` over TLS with it (shared with the
//! end-to-end tests: `arbiter_e2e::registry`), a TCP proxy that can stall (a slow registry),
//! and an HTTPS file server (hyper + rustls) with ETags. Everything stops on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use arbiter_e2e::registry::TestPki;

/// A TCP proxy on 127.0.0.1 to `target` that, while stalled, accepts connections and holds
/// them without a byte either way (a registry that hangs). Stalling closes the connections
/// being forwarded, so a client's pooled connection cannot slip past it.
pub struct StallProxy {
    /// Its address.
    pub addr: SocketAddr,
    stalled: Arc<AtomicBool>,
    forwarding: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl StallProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stalled);
        let forwarding = Arc::new(Mutex::new(Vec::new()));
        let forwarders = Arc::clone(&forwarding);
        let task = tokio::spawn(async move {
            let held = Arc::new(Mutex::new(Vec::new()));
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                // Under the lock `stall` takes: no connection slips past a stall.
                let mut forwarding = forwarders.lock().unwrap();
                if flag.load(Ordering::SeqCst) {
                    held.lock().unwrap().push(client);
                    continue;
                }
                let forwarder = tokio::spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
                forwarding.push(forwarder);
            }
        });
        StallProxy {
            addr,
            stalled,
            forwarding,
            task,
        }
    }

    /// New connections hang (`true`) or are forwarded (`false`).
    pub fn stall(&self, stalled: bool) {
        let mut forwarding = self.forwarding.lock().unwrap();
        self.stalled.store(stalled, Ordering::SeqCst);
        if stalled {
            for forwarder in forwarding.drain(..) {
                forwarder.abort();
            }
        }
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
        for forwarder in self.forwarding.lock().unwrap().drain(..) {
            forwarder.abort();
        }
    }
}

/// One request the HTTPS server answered: path, `If-None-Match`, status.
pub type Hit = (String, Option<String>, u16);

#[derive(Default)]
struct Files {
    files: HashMap<String, Vec<u8>>,
    hits: Vec<Hit>,
}

/// An HTTPS file server (hyper + rustls, the test CA's certificate): `ETag` is the
/// content's SHA-256, `If-None-Match` gets `304`; it can stall every request.
pub struct HttpsServer {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<Mutex<Files>>,
    stalled: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl HttpsServer {
    /// Starts serving (nothing yet).
    pub async fn start(pki: &TestPki) -> HttpsServer {
        use http_body_util::Full;
        use hyper::body::Bytes;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let state = Arc::new(Mutex::new(Files::default()));
        let stalled = Arc::new(AtomicBool::new(false));
        let (files, stall) = (Arc::clone(&state), Arc::clone(&stalled));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let (files, stall) = (Arc::clone(&files), Arc::clone(&stall));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let (files, stall) = (Arc::clone(&files), Arc::clone(&stall));
                            async move {
                                if stall.load(Ordering::SeqCst) {
                                    std::future::pending::<()>().await;
                                }
                                let path = request.uri().path().to_owned();
                                let since = request
                                    .headers()
                                    .get("if-none-match")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned);
                                let mut state = files.lock().unwrap();
                                let response = match state.files.get(&path) {
                                    None => hyper::Response::builder()
                                        .status(404)
                                        .body(Full::new(Bytes::new())),
                                    Some(body) => {
                                        let etag = format!(
                                            "\"{}\"",
                                            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                                                body
                                            ))
                                        );
                                        if since.as_deref() == Some(etag.as_str()) {
                                            hyper::Response::builder()
                                                .status(304)
                                                .header("etag", etag)
                                                .body(Full::new(Bytes::new()))
                                        } else {
                                            hyper::Response::builder()
                                                .header("etag", etag)
                                                .body(Full::new(Bytes::from(body.clone())))
                                        }
                                    }
                                }
                                .unwrap();
                                state.hits.push((path, since, response.status().as_u16()));
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HttpsServer {
            addr,
            state,
            stalled,
            task,
        }
    }

    /// Serves `body` at `path` (`None`: 404).
    pub fn put(&self, path: &str, body: Option<Vec<u8>>) {
        let mut state = self.state.lock().unwrap();
        match body {
            Some(body) => state.files.insert(path.to_owned(), body),
            None => state.files.remove(path),
        };
    }

    /// Every request answered so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.state.lock().unwrap().hits.clone()
    }

    /// Requests hang (`true`) or are answered.
    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `arbiter ARGS`: stdout, or panics with stderr.
pub fn arbiter(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "arbiter {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The registry's `auth:` section for an htpasswd file of `users` (name, password), bcrypt
/// as the registry requires, written into `dir`.
pub fn htpasswd_auth(dir: &Path, users: &[(&str, &str)]) -> String {
    let path = dir.join("htpasswd");
    let mut text = String::new();
    for (user, password) in users {
        // The lowest cost: the registry checks it on every request.
        text.push_str(&format!("{user}:{}\n", bcrypt::hash(password, 4).unwrap()));
    }
    std::fs::write(&path, text).unwrap();
    format!(
        "auth:\n  htpasswd:\n    realm: arbiter-test\n    path: {}\n",
        path.display()
    )
}

/// A Docker `config.json` at `path` with `registry`'s credentials (`auth` form).
pub fn write_docker_config(path: &Path, registry: &str, user: &str, password: &str) {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let json = serde_json::json!({"auths": {registry: {"auth": auth}}});
    // Written aside and renamed, as a Kubernetes Secret volume or a credential helper does.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// One request an [`HttpsRecorder`] answered: method, path and query, `Authorization`.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `GET`, …
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

/// What an [`HttpsRecorder`] answers: status, headers, body.
pub type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// The handler of an [`HttpsRecorder`].
pub type Handler = Arc<dyn Fn(&Recorded) -> Answer + Send + Sync>;

/// An HTTPS server (hyper + rustls, the test CA's certificate) answering every request with
/// `handler` and recording it.
pub struct HttpsRecorder {
    /// Its address.
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl HttpsRecorder {
    /// Starts serving.
    pub async fn start(pki: &TestPki, handler: Handler) -> HttpsRecorder {
        use http_body_util::Full;
        use hyper::body::Bytes;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let (log, handler) = (Arc::clone(&log), Arc::clone(&handler));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |request: hyper::Request<hyper::body::Incoming>| {
                            let (log, handler) = (Arc::clone(&log), Arc::clone(&handler));
                            async move {
                                let recorded = Recorded {
                                    method: request.method().to_string(),
                                    uri: request
                                        .uri()
                                        .path_and_query()
                                        .map(|p| p.to_string())
                                        .unwrap_or_default(),
                                    authorization: request
                                        .headers()
                                        .get("authorization")
                                        .and_then(|v| v.to_str().ok())
                                        .map(str::to_owned),
                                };
                                let (status, headers, body) = handler(&recorded);
                                log.lock().unwrap().push(recorded);
                                let mut response = hyper::Response::builder().status(status);
                                for (name, value) in headers {
                                    response = response.header(name, value);
                                }
                                Ok::<_, std::convert::Infallible>(
                                    response.body(Full::new(Bytes::from(body))).unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HttpsRecorder {
            addr,
            requests,
            task,
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for HttpsRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How the [`TokenServer`] signs and what it grants.
struct Issuer {
    key: p256::ecdsa::SigningKey,
    cert_der: Vec<u8>,
    service: String,
    /// `user:password` accepted (basic auth).
    basic: String,
    /// Repository → actions the user may have.
    grants: HashMap<String, Vec<String>>,
    /// Lifetime (`expires_in`) of every token but the first.
    expires_in: u64,
    /// The first token: `(seconds the registry still accepts it, expires_in)`.
    first: Option<(i64, u64)>,
    /// Tokens issued so far.
    issued: Vec<String>,
}

/// A registry token server (the distribution token flow): `GET /token?service=…&scope=…`
/// with the user's basic credentials gets a JWT (ES256, `x5c` of a self-signed certificate
/// the registry trusts through `rootcertbundle`) granting what the user may of the scope.
pub struct TokenServer {
    /// The HTTPS server.
    pub http: HttpsRecorder,
    /// The registry's `auth:` section.
    pub registry_auth: String,
    issuer: Arc<Mutex<Issuer>>,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Issuer {
    fn answer(&mut self, request: &Recorded) -> Answer {
        use base64::Engine as _;
        use p256::ecdsa::signature::Signer as _;
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(&self.basic)
        );
        if request.authorization.as_deref() != Some(expected.as_str()) {
            return (401, vec![], b"{\"details\":\"bad credentials\"}".to_vec());
        }
        let query: Vec<(String, String)> =
            reqwest::Url::parse(&format!("https://x{}", request.uri))
                .unwrap()
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        if !query.contains(&("service".to_owned(), self.service.clone())) {
            return (400, vec![], b"{\"details\":\"wrong service\"}".to_vec());
        }
        let mut access = Vec::new();
        for scope in query.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v) {
            let mut parts = scope.splitn(3, ':');
            if let (Some("repository"), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            {
                let granted: Vec<&str> = actions
                    .split(',')
                    .filter(|a| {
                        self.grants
                            .get(name)
                            .is_some_and(|g| g.iter().any(|x| x == a))
                    })
                    .collect();
                access.push(
                    serde_json::json!({"type": "repository", "name": name, "actions": granted}),
                );
            }
        }
        let now = unix_now();
        let (exp, expires_in) = match self.first.take() {
            // Accepted for `valid` more seconds (the registry allows 60 s of leeway).
            Some((valid, expires_in)) => (now + valid - 60, expires_in),
            None => (now + self.expires_in as i64, self.expires_in),
        };
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(&self.cert_der)],
        });
        let claims = serde_json::json!({
            "iss": "arbiter-test-issuer",
            "sub": self.basic.split(':').next().unwrap(),
            "aud": self.service,
            "exp": exp,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("t{}", self.issued.len()),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let signature: p256::ecdsa::Signature = self.key.sign(signing_input.as_bytes());
        let token = format!("{signing_input}.{}", b64url(&signature.to_bytes()));
        self.issued.push(token.clone());
        let body = serde_json::json!({"token": token, "expires_in": expires_in, "issued_at": "2026-01-01T00:00:00Z"});
        (
            200,
            vec![("content-type".to_owned(), "application/json".to_owned())],
            body.to_string().into_bytes(),
        )
    }
}

impl TokenServer {
    /// Starts a token server for `service` accepting `user:password`, granting `grants`
    /// (repository, actions); its certificate is written into `dir`.
    pub async fn start(
        dir: &Path,
        pki: &TestPki,
        service: &str,
        user: &str,
        password: &str,
        grants: &[(&str, &[&str])],
    ) -> TokenServer {
        use p256::pkcs8::DecodePrivateKey as _;
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let key = p256::ecdsa::SigningKey::from_pkcs8_der(&key_pair.serialize_der()).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "arbiter test token issuer");
        let cert = params.self_signed(&key_pair).unwrap();
        let bundle = dir.join("token-root.pem");
        std::fs::write(&bundle, cert.pem()).unwrap();
        let issuer = Arc::new(Mutex::new(Issuer {
            key,
            cert_der: cert.der().to_vec(),
            service: service.to_owned(),
            basic: format!("{user}:{password}"),
            grants: grants
                .iter()
                .map(|(repo, actions)| {
                    (
                        (*repo).to_owned(),
                        actions.iter().map(|a| (*a).to_owned()).collect(),
                    )
                })
                .collect(),
            expires_in: 300,
            first: None,
            issued: Vec::new(),
        }));
        let answering = Arc::clone(&issuer);
        let http = HttpsRecorder::start(
            pki,
            Arc::new(move |request| answering.lock().unwrap().answer(request)),
        )
        .await;
        let registry_auth = format!(
            "auth:\n  token:\n    realm: https://{}/token\n    service: {service}\n    issuer: arbiter-test-issuer\n    rootcertbundle: {}\n",
            http.addr,
            bundle.display()
        );
        TokenServer {
            http,
            registry_auth,
            issuer,
        }
    }

    /// The first token issued from now on is accepted by the registry for `valid` seconds
    /// while `expires_in` says `expires_in`; later ones say `later`.
    pub fn lifetimes(&self, first: Option<(i64, u64)>, later: u64) {
        let mut issuer = self.issuer.lock().unwrap();
        issuer.first = first;
        issuer.expires_in = later;
    }

    /// Every token issued so far.
    pub fn issued(&self) -> Vec<String> {
        self.issuer.lock().unwrap().issued.clone()
    }
}

/// `arbiter ARGS`, expected to fail: its stderr (panics if it succeeds).
pub fn arbiter_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_arbiter"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "arbiter {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
