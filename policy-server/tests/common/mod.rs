//! Helpers shared by the server tests.

#![allow(dead_code)]

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
