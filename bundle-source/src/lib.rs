//! Arbiter's policy supply chain: where a policy bundle comes from when it is not a local
//! directory.
//!
//! - [`artifact`]: a bundle on the wire is one gzip-compressed tar of the bundle's files
//!   (built reproducibly by [`artifact::build`]); unpacking it is the untrusted-input parser
//!   ([`artifact::read`]: no paths, links or devices, bounded sizes).
//! - [`digest`]: the bundle digest is the SHA-256 of exactly those bytes (for OCI, the
//!   layer's digest).
//! - [`signature`]: a detached ECDSA P-256 / SHA-256 signature over the bundle digest, made
//!   by `arbiter bundle sign` or by `openssl dgst -sha256 -sign`.
//! - [`oci`] and [`https`]: the two remote sources, polled with ETag / digest.
//! - [`cache`]: the last verified artifact and its signature, persisted so that a restart
//!   during an outage starts with it (verified again).
//! - [`Verifier`]: what an artifact must satisfy before it is unpacked: a pinned digest or a
//!   valid signature.

pub mod artifact;
pub mod auth;
pub mod cache;
pub mod digest;
pub mod https;
pub mod oci;
pub mod signature;
mod source;

pub use digest::Digest;
pub use source::{Fetch, Fetched, Source, SourceError, Transport, Verifier, VerifyError};
