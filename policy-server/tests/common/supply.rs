//! Real parts for the supply-chain tests, on 127.0.0.1: a test CA and server certificate
//! (generated per test) and Debian's `docker-registry` over TLS with it (shared with the
//! end-to-end tests: `arbiter_e2e::registry`), a TCP proxy that can stall (a slow registry),
//! and an HTTPS file server (hyper + rustls) with ETags. Everything stops on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
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
