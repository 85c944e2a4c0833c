//! Prost messages for Envoy's external authorization API (`envoy.service.auth.v3`) and the
//! core types it imports, generated from the protos vendored under `vendor/`. The crate
//! builds for `wasm32-wasip1` (no tonic, no tokio) so the filter can encode `CheckRequest`
//! and decode `CheckResponse` itself.
#![allow(missing_docs, clippy::all)]

/// `envoy.*` packages.
pub mod envoy {
    /// `envoy.config.*`
    pub mod config {
        /// `envoy.config.core`
        pub mod core {
            /// `envoy.config.core.v3`
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
            }
        }
    }
    /// `envoy.service.*`
    pub mod service {
        /// `envoy.service.auth`
        pub mod auth {
            /// `envoy.service.auth.v3`
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.auth.v3.rs"));
            }
        }
    }
    /// `envoy.type.*`
    pub mod r#type {
        /// `envoy.type.v3`
        pub mod v3 {
            include!(concat!(env!("OUT_DIR"), "/envoy.r#type.v3.rs"));
        }
    }
}

/// `google.rpc.*`
pub mod google {
    /// `google.rpc`
    pub mod rpc {
        include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
    }
}

/// `xds.*`
pub mod xds {
    /// `xds.core`
    pub mod core {
        /// `xds.core.v3`
        pub mod v3 {
            include!(concat!(env!("OUT_DIR"), "/xds.core.v3.rs"));
        }
    }
}

/// Fully qualified gRPC method the filter calls.
/// The encoded `FileDescriptorSet` of the vendored protos (ext_authz and every file it
/// imports), as protox compiled them: the policy server serves it over gRPC reflection.
/// Unused by the filter, so it stays out of the wasm module.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/file_descriptor_set.bin"));

pub const CHECK_SERVICE: &str = "envoy.service.auth.v3.Authorization";
/// Method name within [`CHECK_SERVICE`].
pub const CHECK_METHOD: &str = "Check";

/// Largest encoded `CheckRequest` the filter sends and the policy server accepts.
///
/// One number both sides agree on: the filter never sends a larger message (it cuts the body
/// further and marks it partial), and the server's gRPC decoder accepts up to this size, so
/// no request can make the server refuse a Check for its size. It covers the largest
/// `max_body_bytes` (8 MiB) plus Envoy's largest request header block (8 MiB) with room
/// for the message framing.
pub const MAX_CHECK_REQUEST_BYTES: usize = 17 * 1024 * 1024;
