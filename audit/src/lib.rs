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
///
/// Written digit by digit: every decision formats two of these, and `format!` with its
/// zero padding cost ~3,100 instructions each (callgrind), this ~300. The same bytes as
/// [`timestamp_fmt`] for every time (`prop_timestamp_equals_format` in the tests); a year
/// outside `0..=9999` (not four digits) goes through it.
pub fn timestamp(at: OffsetDateTime) -> String {
    let (year, month, day) = at.to_calendar_date();
    let Ok(year @ 0..=9999) = u32::try_from(year) else {
        return timestamp_fmt(at);
    };
    let (hour, minute, second, micros) = at.to_hms_micro();
    let mut out = [0u8; 27];
    put_digits(&mut out[0..4], year);
    out[4] = b'-';
    put_digits(&mut out[5..7], u32::from(u8::from(month)));
    out[7] = b'-';
    put_digits(&mut out[8..10], u32::from(day));
    out[10] = b'T';
    put_digits(&mut out[11..13], u32::from(hour));
    out[13] = b':';
    put_digits(&mut out[14..16], u32::from(minute));
    out[16] = b':';
    put_digits(&mut out[17..19], u32::from(second));
    out[19] = b'.';
    put_digits(&mut out[20..26], micros);
    out[26] = b'Z';
    // Only ASCII digits and separators: always UTF-8.
    String::from_utf8(out.to_vec()).unwrap_or_else(|_| timestamp_fmt(at))
}

/// `value`'s last `out.len()` decimal digits into `out`, zero-padded.
fn put_digits(out: &mut [u8], mut value: u32) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + u8::try_from(value % 10).unwrap_or_default();
        value /= 10;
    }
}

/// [`timestamp`] with `format!`: the reference, and the path for years that are not four
/// digits.
fn timestamp_fmt(at: OffsetDateTime) -> String {
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

    fn utc(year: i32, month: time::Month, day: u8, nanos_of_day: u64) -> OffsetDateTime {
        let date = time::Date::from_calendar_date(year, month, day).unwrap();
        let nanos = time::Duration::nanoseconds(i64::try_from(nanos_of_day).unwrap());
        OffsetDateTime::new_utc(date, time::Time::MIDNIGHT) + nanos
    }

    #[test]
    fn timestamps_at_and_outside_four_digit_years_are_formatted_as_before() {
        let last_nano = 86_400 * 1_000_000_000 - 1;
        for at in [
            OffsetDateTime::UNIX_EPOCH,
            utc(0, time::Month::January, 1, 0),
            utc(9999, time::Month::December, 31, last_nano),
            utc(-1, time::Month::June, 15, 45_045_500_000_000),
            utc(-9999, time::Month::January, 1, 0),
        ] {
            assert_eq!(timestamp(at), timestamp_fmt(at), "{at}");
        }
        assert_eq!(
            timestamp(utc(987, time::Month::June, 5, 14_582_000_010_000)),
            "0987-06-05T04:03:02.000010Z"
        );
    }

    proptest::proptest! {
        /// The digit-by-digit timestamp is byte for byte the `format!` one, over every
        /// time of the years 0 to 9999 (other years take the `format!` path).
        #[test]
        fn prop_timestamp_equals_format(
            nanos in i128::from(utc(0, time::Month::January, 1, 0).unix_timestamp()) * 1_000_000_000
                ..i128::from(utc(9999, time::Month::December, 31, 0).unix_timestamp()) * 1_000_000_000,
        ) {
            let at = OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap();
            proptest::prop_assert_eq!(timestamp(at), timestamp_fmt(at));
        }
    }
}
