//! Arbiter benchmarks: what Arbiter costs a request, measured against the alternatives a
//! user would compare it with, in the same run on the same machine.
//!
//! Scenarios through Envoy (one listener shape, one mock upstream): no-auth (the floor),
//! Envoy's native `ext_authz` calling the Arbiter policy server, the Arbiter wasm filter
//! (write-mode and fsync audit once the server has them), the filter with its allow-cache;
//! then the policy server alone over gRPC, and decision latency by bundle size. Latency comes
//! from an open-loop generator measuring from each request's intended send time, maximum
//! rate from a closed loop; CPU seconds per 1,000 requests from `/proc/<pid>/stat`; results
//! are medians of interleaved repeats, reported as ratios against the same run's baselines.
//! See `bench/README.md`.
//!
//! Like the end-to-end harness it builds on (`arbiter_e2e`), this is test tooling: errors are
//! `anyhow` and go to the operator running it.

pub mod filter_cpu;
pub mod grpc;
pub mod h2load;
pub mod http;
pub mod latency;
pub mod load;
pub mod policies;
pub mod procfs;
pub mod profile;
pub mod readme;
pub mod report;
pub mod runner;
pub mod soak;
pub mod svg;

/// The request body sent through Envoy: a small OpenAI chat completion.
pub const CHAT_BODY: &[u8] =
    br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
