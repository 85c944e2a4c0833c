//! A gRPC server that never answers properly, built directly on `h2` so it can send what
//! tonic would refuse to: error statuses for every call, or a "successful" call whose
//! message is not the protobuf the client expects. Used for the filter's `error` and
//! `bad_response` outcomes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response};
use tokio::net::TcpStream;

use crate::net::{Acceptor, Handler};
use crate::util::lock;

/// How every call is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misbehaviour {
    /// HTTP 200, no message, trailers `grpc-status: code`, `grpc-message: message`.
    ErrorStatus(u32, String),
    /// `grpc-status: 0` with one length-prefixed message `ff ff ff ff`, which is not a valid
    /// protobuf `CheckResponse` (a truncated varint field).
    GarbageMessage,
    /// `grpc-status: 0` with this exact message payload (length prefix added).
    Message(Bytes),
}

/// A running misbehaving gRPC server on `127.0.0.1:0`; stops when dropped.
pub struct GrpcMisbehaving {
    acceptor: Arc<Acceptor>,
    shared: Arc<Shared>,
}

struct Shared {
    behaviour: Mutex<Misbehaviour>,
    calls: AtomicU64,
    paths: Mutex<Vec<String>>,
}

impl GrpcMisbehaving {
    /// Starts the server answering every call with `behaviour`.
    pub async fn start(behaviour: Misbehaviour) -> Result<GrpcMisbehaving> {
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            calls: AtomicU64::new(0),
            paths: Mutex::new(Vec::new()),
        });
        let handler_shared = shared.clone();
        let handler: Handler = Arc::new(move |stream, _peer| {
            let shared = handler_shared.clone();
            Box::pin(async move { serve(stream, shared).await })
        });
        let acceptor = Acceptor::bind(SocketAddr::from(([127, 0, 0, 1], 0)), handler)?;
        Ok(GrpcMisbehaving { acceptor, shared })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr()
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.acceptor.addr().port()
    }

    /// Changes the answer for subsequent calls.
    pub fn set(&self, behaviour: Misbehaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    /// Calls received so far.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// The `:path` of every call received (e.g. `/envoy.service.auth.v3.Authorization/Check`).
    pub fn paths(&self) -> Vec<String> {
        lock(&self.shared.paths).clone()
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    let Ok(mut connection) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((request, respond))) = connection.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = answer(request, respond, &shared).await;
        });
    }
}

async fn answer(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    shared: &Shared,
) -> Result<()> {
    lock(&shared.paths).push(request.uri().path().to_owned());
    shared.calls.fetch_add(1, Ordering::SeqCst);
    let mut body = request.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }

    let behaviour = lock(&shared.behaviour).clone();
    let response = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())?;
    let mut send = respond.send_response(response, false)?;
    let mut trailers = HeaderMap::new();
    match behaviour {
        Misbehaviour::ErrorStatus(code, message) => {
            trailers.insert("grpc-status", HeaderValue::from(code));
            trailers.insert(
                "grpc-message",
                HeaderValue::from_str(&percent_encode(&message))?,
            );
        }
        Misbehaviour::GarbageMessage => {
            send.send_data(grpc_frame(&[0xff, 0xff, 0xff, 0xff]), false)?;
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
        }
        Misbehaviour::Message(payload) => {
            send.send_data(grpc_frame(&payload), false)?;
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
        }
    }
    send.send_trailers(trailers)?;
    Ok(())
}

/// gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, payload.
pub fn grpc_frame(payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(5 + payload.len());
    frame.put_u8(0);
    frame.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    frame.put_slice(payload);
    frame.freeze()
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
