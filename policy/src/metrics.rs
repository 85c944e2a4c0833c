//! What the engine reports while it decides and swaps bundles ([`EngineMetrics`]).
//!
//! The policy server records these as Prometheus metrics; [`Metrics`] only counts them (for
//! tools and tests that run an engine without a server).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::bundle::Bundle;
use crate::engine::Disagreement;

/// Which bundle a report is about.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum BundleRole {
    /// The bundle that decides.
    Active,
    /// The candidate evaluated beside it, in shadow.
    Shadow,
}

/// Receives what a [`crate::PolicyEngine`] does.
pub trait EngineMetrics: Send + Sync {
    /// `bundle` is now in use as `role`.
    fn bundle_loaded(&self, role: BundleRole, bundle: &Bundle);
    /// One decision and how long it took.
    fn decision(&self, allowed: bool, took: Duration);
    /// A request the engine could not decide.
    fn decision_error(&self);
    /// A shadow decision, and whether it disagreed.
    fn shadow(&self, disagreement: Option<Disagreement>);
    /// A shadow evaluation that failed.
    fn shadow_error(&self);
}

/// Counts of what an engine reported.
#[derive(Debug, Default)]
pub struct Metrics {
    decisions: AtomicU64,
    decision_errors: AtomicU64,
    shadow_decisions: AtomicU64,
    would_allow: AtomicU64,
    would_deny: AtomicU64,
    shadow_errors: AtomicU64,
}

impl Metrics {
    /// Decisions made.
    pub fn decisions(&self) -> u64 {
        self.decisions.load(Ordering::Relaxed)
    }

    /// Requests that could not be decided.
    pub fn decision_errors(&self) -> u64 {
        self.decision_errors.load(Ordering::Relaxed)
    }

    /// Shadow decisions made.
    pub fn shadow_decisions(&self) -> u64 {
        self.shadow_decisions.load(Ordering::Relaxed)
    }

    /// Shadow decisions that disagreed in `direction`.
    pub fn disagreements(&self, direction: Disagreement) -> u64 {
        match direction {
            Disagreement::WouldAllow => self.would_allow.load(Ordering::Relaxed),
            Disagreement::WouldDeny => self.would_deny.load(Ordering::Relaxed),
        }
    }

    /// Shadow evaluations that failed.
    pub fn shadow_errors(&self) -> u64 {
        self.shadow_errors.load(Ordering::Relaxed)
    }
}

impl EngineMetrics for Metrics {
    fn bundle_loaded(&self, _role: BundleRole, _bundle: &Bundle) {}

    fn decision(&self, _allowed: bool, _took: Duration) {
        self.decisions.fetch_add(1, Ordering::Relaxed);
    }

    fn decision_error(&self) {
        self.decision_errors.fetch_add(1, Ordering::Relaxed);
    }

    fn shadow(&self, disagreement: Option<Disagreement>) {
        self.shadow_decisions.fetch_add(1, Ordering::Relaxed);
        match disagreement {
            Some(Disagreement::WouldAllow) => self.would_allow.fetch_add(1, Ordering::Relaxed),
            Some(Disagreement::WouldDeny) => self.would_deny.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
    }

    fn shadow_error(&self) {
        self.shadow_errors.fetch_add(1, Ordering::Relaxed);
    }
}
