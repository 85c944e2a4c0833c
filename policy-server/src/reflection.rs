//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`), so `grpcurl` and other
//! generic clients list and call the server's services without proto files.
//!
//! The descriptors are the ones the services are built from: `arbiter-proto`'s, compiled by
//! protox from the vendored ext_authz protos (the wire contract the filter uses), and
//! `tonic-health`'s for `grpc.health.v1`.

use tonic_reflection::server::{v1, v1alpha, Builder, Error};

/// Both reflection services: v1 for current clients, v1alpha for older `grpcurl`s and
/// libraries that ask only for it.
pub fn services() -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    Error,
> {
    let builder = || {
        Builder::configure()
            .register_encoded_file_descriptor_set(arbiter_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
