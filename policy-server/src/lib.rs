//! Arbiter policy server (placeholder until the server lands).
