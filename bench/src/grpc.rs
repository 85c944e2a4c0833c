//! The gRPC target: `envoy.service.auth.v3.Authorization/Check` straight to the policy server.
//!
//! The request is built by the filter's own `build_check_request` (what Envoy with the wasm
//! filter sends for `POST /v1/chat/completions` on route `chat`), encoded, and decoded into
//! the server-side `envoy-types` message, so the server sees exactly the filter's bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use arbiter_filter::check::{encode_check_request, RequestInfo};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use prost::Message;
use tonic::transport::{Channel, Endpoint};

use crate::load::{CallFuture, Target};

/// What the filter knows about the benchmark's chat request (as Envoy hands it over).
pub fn chat_request_info(listener: SocketAddr) -> RequestInfo {
    let headers = [
        (":authority", listener.to_string()),
        (":path", "/v1/chat/completions".to_owned()),
        (":method", "POST".to_owned()),
        (":scheme", "http".to_owned()),
        ("content-type", "application/json".to_owned()),
        ("content-length", crate::CHAT_BODY.len().to_string()),
        ("x-forwarded-proto", "http".to_owned()),
        (
            "x-request-id",
            "0b7e1c52-61a4-4a8e-9d43-1f3a9a1c2b7d".to_owned(),
        ),
    ];
    RequestInfo {
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        route_name: "chat".to_owned(),
        source_address: Some("127.0.0.1:40000".to_owned()),
        destination_address: Some(listener.to_string()),
        peer_principal: None,
        protocol: Some("HTTP/1.1".to_owned()),
        // As the filter reports it: the announced content-length.
        body_size: Some(crate::CHAT_BODY.len() as u64),
    }
}

/// The filter's CheckRequest for the chat request, as the server-side message.
pub fn chat_check_request() -> Result<CheckRequest> {
    let info = chat_request_info(SocketAddr::from(([127, 0, 0, 1], 10000)));
    let bytes = encode_check_request(&info, &[], SystemTime::now());
    CheckRequest::decode(bytes.as_slice()).context("decoding the filter's CheckRequest")
}

/// Sends the chat CheckRequest over one HTTP/2 connection (like one Envoy worker does) and
/// expects an allow.
pub struct GrpcTarget {
    client: AuthorizationClient<Channel>,
    request: CheckRequest,
}

impl GrpcTarget {
    /// Connects to the server at `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<Arc<GrpcTarget>> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .with_context(|| format!("connecting to the policy server at {addr}"))?;
        Ok(Arc::new(GrpcTarget {
            client: AuthorizationClient::new(channel),
            request: chat_check_request()?,
        }))
    }
}

impl Target for GrpcTarget {
    fn call(&self) -> CallFuture {
        let mut client = self.client.clone();
        let request = self.request.clone();
        Box::pin(async move {
            let response = client
                .check(request)
                .await
                .map_err(|s| format!("grpc status {:?}: {}", s.code(), s.message()))?
                .into_inner();
            match response.status.map(|s| s.code) {
                Some(0) => Ok(()),
                other => Err(format!("expected an allow, got status code {other:?}")),
            }
        })
    }
}
