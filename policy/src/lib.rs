//! Arbiter's policy engine: the Cedar model of a request ([`schema`], [`request`],
//! [`identity`], [`ai`]), policy bundles loaded and validated as a whole ([`bundle`]) and
//! indexed by scope ([`index`]), and the decisions made with them ([`engine`]).
//!
//! Host-independent: no network, no gRPC server. The policy server
//! (`arbiter-policy-server`) maps ext_authz calls onto it, records what the engine reports
//! ([`metrics`]) and audits every decision.

pub mod ai;
pub mod bundle;
pub mod conditions;
pub mod engine;
pub mod identity;
pub mod index;
pub mod metrics;
pub mod request;
pub mod schema;

pub use bundle::{Bundle, BundleError};
pub use engine::{Decision, EngineError, PolicyEngine};
pub use request::{AuthzRequest, RequestError, TimeSource};
