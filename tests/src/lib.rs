//! Arbiter end-to-end harness: real Envoy (with the real wasm filter), the real policy
//! server, in-process mock LLM providers, a TCP fault proxy for the policy path and a
//! misbehaving gRPC server. Everything binds `127.0.0.1` on ports picked at run time, every
//! wait has a deadline, every process is killed on drop and its log printed only when the
//! test fails (or with `ARBITER_E2E_LOGS=1`).
//!
//! Start with [`stack::Stack::builder`]:
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use arbiter_e2e::{Fault, Stack};
//!
//! let stack = Stack::builder().start().await?; // tests/envoy/e2e.yaml.tmpl, example policies
//! stack.fault.set(Fault::Blackhole).await?;    // the policy server stops answering
//! let reply = stack.chat("/t/open").await?;    // fail-open route
//! assert_eq!(reply.status, 200);
//! let seen = stack.primary.requests();
//! assert_eq!(seen[0].header("x-arbiter-fail-open"), Some("timeout"));
//! let log = stack.envoy.wait_access_log(1).await?;
//! assert_eq!(log[0]["arbiter_outcome"], "fail_open");
//! # Ok(())
//! # }
//! ```

pub mod adversary;
pub mod envoy;
pub mod fault;
pub mod grpc_misbehaving;
pub mod mock_llm;
mod net;
pub mod oci;
mod process;
pub mod registry;
pub mod stack;
pub mod util;

pub use envoy::{Envoy, EnvoyOptions};
pub use fault::{Fault, FaultProxy};
pub use grpc_misbehaving::{GrpcMisbehaving, Misbehaviour};
pub use mock_llm::{MockLlm, Mode, Received};
pub use stack::{PolicyServer, Reply, Stack, StackBuilder};
pub use util::{eventually, workspace_root};
