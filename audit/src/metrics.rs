//! Prometheus metrics of the audit log and its export.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Audit counters and gauges; clones share the same values.
#[derive(Debug, Clone)]
pub struct AuditMetrics {
    /// Records written (and fsynced in `fsync` mode).
    pub records_written: Counter,
    /// Failed writes (one per failed batch or probe).
    pub write_errors: Counter,
    /// Seconds per batch write (including fsync).
    pub write_seconds: Histogram,
    /// Records per batch (group commit).
    pub batch_records: Histogram,
    /// Records waiting for the writer.
    pub queue_depth: Gauge,
    /// 1 while the audit log is writable, 0 while decisions are refused.
    pub writable: Gauge,
    /// Torn last lines found at start (a crash while writing).
    pub torn_tails: Counter,
    /// Files rotated.
    pub rotations: Counter,
    /// Signed checkpoints written.
    pub checkpoints: Counter,
    /// Checkpoints that could not be written.
    pub checkpoint_errors: Counter,
    /// Records acknowledged by the OTLP receiver.
    pub otlp_exported: Counter,
    /// Failed OTLP export attempts.
    pub otlp_errors: Counter,
    /// Last seq acknowledged by the OTLP receiver.
    pub otlp_position: Gauge,
}

impl Default for AuditMetrics {
    fn default() -> Self {
        Self {
            records_written: Counter::default(),
            write_errors: Counter::default(),
            // 10 µs … ~5 s
            write_seconds: Histogram::new(exponential_buckets(0.000_01, 3.0, 12)),
            batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            queue_depth: Gauge::default(),
            writable: Gauge::default(),
            torn_tails: Counter::default(),
            rotations: Counter::default(),
            checkpoints: Counter::default(),
            checkpoint_errors: Counter::default(),
            otlp_exported: Counter::default(),
            otlp_errors: Counter::default(),
            otlp_position: Gauge::default(),
        }
    }
}

impl AuditMetrics {
    /// Registers every metric under `audit_` in `registry` (the server's registry carries
    /// the `arbiter` prefix, so they are exported as `arbiter_audit_*`).
    pub fn register(&self, registry: &mut Registry) {
        let audit = registry.sub_registry_with_prefix("audit");
        audit.register(
            "records_written",
            "Audit records written (fsynced in fsync mode)",
            self.records_written.clone(),
        );
        audit.register(
            "write_errors",
            "Failed audit writes; each refused its decisions with UNAVAILABLE",
            self.write_errors.clone(),
        );
        audit.register(
            "write_seconds",
            "Time to write (and fsync) one batch of audit records",
            self.write_seconds.clone(),
        );
        audit.register(
            "batch_records",
            "Audit records per write (group commit)",
            self.batch_records.clone(),
        );
        audit.register(
            "queue_depth",
            "Audit records waiting for the writer",
            self.queue_depth.clone(),
        );
        audit.register(
            "writable",
            "1 while the audit log is writable, 0 while decisions are refused",
            self.writable.clone(),
        );
        audit.register(
            "torn_tails",
            "Torn last audit lines found at start (crash while writing)",
            self.torn_tails.clone(),
        );
        audit.register(
            "rotations",
            "Audit log files rotated",
            self.rotations.clone(),
        );
        audit.register(
            "checkpoints",
            "Signed audit checkpoints written",
            self.checkpoints.clone(),
        );
        audit.register(
            "checkpoint_errors",
            "Audit checkpoints that could not be written (records after the last one are unsigned)",
            self.checkpoint_errors.clone(),
        );
        audit.register(
            "otlp_exported",
            "Audit records acknowledged by the OTLP receiver",
            self.otlp_exported.clone(),
        );
        audit.register(
            "otlp_errors",
            "Failed OTLP export attempts",
            self.otlp_errors.clone(),
        );
        audit.register(
            "otlp_position",
            "Last audit seq acknowledged by the OTLP receiver",
            self.otlp_position.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_with_prefix() {
        let metrics = AuditMetrics::default();
        metrics.write_errors.inc();
        // As the server does: its registry carries the `arbiter` prefix.
        let mut registry = Registry::with_prefix("arbiter");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("arbiter_audit_write_errors_total 1"),
            "{text}"
        );
        assert!(text.contains("arbiter_audit_queue_depth 0"), "{text}");
    }
}
