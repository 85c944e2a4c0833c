//! Arbiter end-to-end harness (placeholder until the harness lands).
