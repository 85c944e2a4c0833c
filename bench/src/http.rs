//! The HTTP target: a small OpenAI chat completion POSTed to Envoy over kept-alive HTTP/1.1
//! connections (hyper's pooled client, so the open loop opens more connections when requests
//! overlap).

use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::load::{CallFuture, Target};

/// POSTs `body` to `uri` and expects `200`.
pub struct HttpTarget {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    body: Bytes,
}

impl HttpTarget {
    /// A target for `url` (e.g. `http://127.0.0.1:10000/v1/chat/completions`).
    pub fn new(url: &str, body: Bytes) -> Result<Arc<HttpTarget>> {
        let uri: Uri = url.parse().with_context(|| format!("bad url `{url}`"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(usize::MAX)
            .build(connector);
        Ok(Arc::new(HttpTarget { client, uri, body }))
    }
}

impl Target for HttpTarget {
    fn call(&self) -> CallFuture {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(self.body.clone()));
        let client = self.client.clone();
        Box::pin(async move {
            let request = request.map_err(|e| format!("building the request: {e}"))?;
            let response = client
                .request(request)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = response.status();
            // Read to the end: the latency is the whole answer, and the connection goes back
            // to the pool only once its body is consumed.
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            if status != http::StatusCode::OK {
                return Err(format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ));
            }
            Ok(())
        })
    }
}

/// GETs `url` and returns its body as text; anything but `200` is an error.
pub async fn get_text(url: &str) -> Result<String> {
    let uri: Uri = url.parse().with_context(|| format!("bad url `{url}`"))?;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let response = client
        .get(uri)
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading {url}"))?
        .to_bytes();
    if status != http::StatusCode::OK {
        anyhow::bail!("GET {url}: status {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}
