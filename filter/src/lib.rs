//! Arbiter filter
