//! Arbiter's audit trail: one hash-chained record per decision, written before the answer.
//!
//! This crate knows the record format, the file and the proofs over it; it does not know the
//! policy engine (the server builds each [`AuditEvent`] from its own request and decision
//! types, and `arbiter audit replay` re-decides on the server side).
//!
//! - [`record`]: the line format and its hash.
//! - [`writer`]: [`AuditLog`], the single writer with group commit, rotation and recovery.
//! - [`checkpoint`]: signed checkpoints of the chain's head (completeness, not just order).
//! - [`redact`]: what a record may take from a `CheckRequest` (secrets never in clear).
//! - [`bound`]: how long a client-chosen value a record keeps (and the evidence of a cut one).
//! - [`verify`]: the logic of `arbiter audit verify`.
//! - [`export`]: the OTLP outbox.
//! - [`metrics`]: the audit metrics ([`AuditMetrics`]).

pub mod bound;
pub mod checkpoint;
pub mod export;
pub mod metrics;
pub mod record;
pub mod redact;
pub mod verify;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

use time::OffsetDateTime;

pub use metrics::AuditMetrics;
pub use record::{AuditEvent, AuditRecord, Reason, Verdict};
pub use redact::{ClaimAllowList, Redactor, RequestFacts, TraceParent};
pub use writer::{AuditError, AuditLog, Written};

/// Default `--audit-max-bytes`: 128 MiB per file.
pub const DEFAULT_MAX_BYTES: u64 = 128 * 1024 * 1024;

/// When a record counts as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditSync {
    /// After `fdatasync`: survives power loss (group commit shares one sync per batch).
    Fsync,
    /// After `write`: survives a crash of the server, not of the machine.
    Write,
}

/// Where and how the audit log is written.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The active file; rotated files sit beside it.
    pub path: PathBuf,
    /// When a record counts as written.
    pub sync: AuditSync,
    /// Size at which the active file is rotated.
    pub max_bytes: u64,
    /// Signed checkpoints, when the operator configured a key.
    pub checkpoints: Option<Checkpointing>,
}

/// When and with which key the writer signs checkpoints (see [`checkpoint`]).
#[derive(Debug, Clone)]
pub struct Checkpointing {
    /// The operator's private key.
    pub key: p256::ecdsa::SigningKey,
    /// A checkpoint after this many records…
    pub every: u64,
    /// …or once the oldest unsigned record is this old, whichever comes first.
    pub interval: Duration,
}

/// Default `--audit-checkpoint-every`.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;
/// Default `--audit-checkpoint-interval-secs`.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

impl AuditConfig {
    /// `fsync` mode, default rotation size, no checkpoints.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            sync: AuditSync::Fsync,
            max_bytes: DEFAULT_MAX_BYTES,
            checkpoints: None,
        }
    }
}

/// RFC 3339 UTC with exactly six fractional digits (fixed width, sorts as text).
pub fn timestamp(at: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_fixed_width_utc() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_795_000_000_000_000_123).unwrap();
        let ts = timestamp(at);
        assert_eq!(ts.len(), "2026-11-18T08:26:40.000000Z".len());
        assert!(ts.ends_with(".000000Z"), "{ts}");
    }
}
