//! Arbiter's proxy-wasm HTTP filter. Per request it asks the policy server for a decision
//! over gRPC (`envoy.service.auth.v3.Authorization/Check`) within the route's timeout and,
//! when no decision arrives, applies the route's fail mode from Envoy route metadata.
//!
//! The decision logic (plugin config, route settings and fail-mode resolution, CheckRequest
//! building, outcome mapping, the per-request state machine) is plain Rust that builds and
//! tests natively; `wasm.rs` is the thin proxy-wasm glue, compiled only for wasm32.

pub mod body;
pub mod breaker;
pub mod cache;
pub mod check;
pub mod config;
pub mod filter;
pub mod host;
pub mod outcome;
pub mod route;
pub mod table;
pub mod upstream;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

#[cfg(target_arch = "wasm32")]
mod wasm;
