//! Bounds on the values a client chooses that a record (and the decision log line) repeats.
//!
//! Every decision is written before it is answered, so whatever a request makes a record
//! carry, it makes the audit disk carry: a 60 KiB path or an 8 MiB `model` per request
//! would fill it quickly, and a full audit disk means no decisions at all (open routes fail
//! open, closed routes refuse everyone) or, with rotation and retention, older evidence
//! pushed out. So each such value is recorded up to a bound; a longer one keeps its first
//! bytes (cut at a character boundary, so the prefix still matches other logs) and the
//! record's `cut` member names it with the whole value's length and SHA-256, so the request
//! can still be matched against Envoy's access log, the provider's logs or a capture.
//!
//! Only the record and the log line are bounded: policy always decides on the whole value.
//!
//! The bounds keep every value a legitimate client sends whole (each constant says why);
//! in all, these fields can add at most ~5 KiB to a record (before JSON escaping), next to
//! the 8 KiB of headers ([`crate::redact::MAX_RECORDED_HEADER_BYTES`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `path` (without the query string): 2 KiB. API paths are short (OpenAI-style paths, Azure
/// deployment paths and route prefixes stay well under 200 bytes), and 2 KiB is the length
/// browsers, CDNs and proxies have long treated as the safe maximum of a URL; policies that
/// match path prefixes see far less.
pub const MAX_RECORDED_PATH: usize = 2048;
/// `host` (`:authority`, userinfo replaced): 512 bytes. A DNS name is at most 253 bytes,
/// plus a port, or an IPv6 literal; the rest is room for `[redacted]@`.
pub const MAX_RECORDED_HOST: usize = 512;
/// `request_id` (`x-request-id`): 256 bytes. Envoy's own ids are 36-byte UUIDs, and the ids
/// other proxies and tracing systems pass are well under 256; it is also the longest id the
/// filter forwards as gRPC metadata.
pub const MAX_RECORDED_REQUEST_ID: usize = 256;
/// `model` (from the body): 256 bytes. Model names, deployment names (Azure: 64), Hugging
/// Face repository ids (96) and Bedrock model ARNs (~150) all fit.
pub const MAX_RECORDED_MODEL: usize = 256;
/// `method`: 64 bytes. Methods are short tokens (`GET` … `VERSION-CONTROL`, 15).
pub const MAX_RECORDED_METHOD: usize = 64;
/// `scheme`: 64 bytes (`http`, `https`).
pub const MAX_RECORDED_SCHEME: usize = 64;
/// `principal`: 2 KiB. It comes from verified identity (the operator's CA or identity
/// provider, or an API key's hash), not from the client; SPIFFE IDs are at most 2048 bytes
/// and OIDC subjects 255, so none is cut, but the record's size does not depend on that.
pub const MAX_RECORDED_PRINCIPAL: usize = 2048;

/// Evidence of a value recorded cut: what the whole value was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    /// Length of the whole value, in bytes (UTF-8).
    pub bytes: u64,
    /// Lowercase hex SHA-256 of the whole value's bytes.
    pub sha256: String,
}

impl Cut {
    /// The evidence of `whole`.
    pub fn of(whole: &str) -> Self {
        Self {
            bytes: u64::try_from(whole.len()).unwrap_or(u64::MAX),
            sha256: hex::encode(Sha256::digest(whole.as_bytes())),
        }
    }
}

/// The longest prefix of `value` of at most `max` bytes that ends on a character boundary:
/// `value` itself when it fits. Allocates nothing (for the decision log line).
pub fn prefix(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// `value` as recorded with bound `max`: itself when it fits (no evidence), else its
/// [`prefix`] and the evidence of the whole value.
pub fn bound(value: &str, max: usize) -> (String, Option<Cut>) {
    let kept = prefix(value, max);
    let cut = (kept.len() < value.len()).then(|| Cut::of(value));
    (kept.to_owned(), cut)
}

/// Builds a record's bounded values and collects the evidence of those cut, by field name
/// (the record's `cut` member).
#[derive(Debug, Default)]
pub struct Bounder {
    cut: BTreeMap<String, Cut>,
}

impl Bounder {
    /// `value` of record field `field` bounded to `max` bytes; notes the evidence if cut.
    pub fn keep(&mut self, field: &str, value: &str, max: usize) -> String {
        let (kept, cut) = bound(value, max);
        if let Some(cut) = cut {
            self.cut.insert(field.to_owned(), cut);
        }
        kept
    }

    /// The evidence of every value cut so far.
    pub fn into_cut(self) -> BTreeMap<String, Cut> {
        self.cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn values_within_the_bound_are_kept_whole_without_evidence() {
        assert_eq!(
            bound("/v1/chat/completions", 2048),
            ("/v1/chat/completions".into(), None)
        );
        assert_eq!(bound("", 0), (String::new(), None));
        assert_eq!(bound("abc", 3), ("abc".into(), None));
    }

    #[test]
    fn a_longer_value_keeps_its_prefix_and_the_whole_values_length_and_hash() {
        let whole = "x".repeat(10_000);
        let (kept, cut) = bound(&whole, 256);
        assert_eq!(kept, "x".repeat(256));
        let cut = cut.unwrap();
        assert_eq!(cut.bytes, 10_000);
        assert_eq!(cut.sha256, hex::encode(Sha256::digest(whole.as_bytes())));
        assert_eq!(cut.sha256.len(), 64);
    }

    #[test]
    fn cuts_at_a_character_boundary() {
        // "é" is two bytes: a bound of 5 keeps two of them (4 bytes), not half a third.
        let (kept, cut) = bound("ééé", 5);
        assert_eq!(kept, "éé");
        assert_eq!(cut.unwrap().bytes, 6);
        // A four-byte character longer than the bound: nothing of it is kept.
        let (kept, cut) = bound("😀", 3);
        assert_eq!(kept, "");
        assert_eq!(cut.unwrap().bytes, 4);
    }

    #[test]
    fn the_bounder_names_only_the_fields_it_cut() {
        let mut bounder = Bounder::default();
        assert_eq!(bounder.keep("method", "POST", MAX_RECORDED_METHOD), "POST");
        let path = format!("/{}", "a".repeat(5000));
        assert_eq!(
            bounder.keep("path", &path, MAX_RECORDED_PATH).len(),
            MAX_RECORDED_PATH
        );
        let cut = bounder.into_cut();
        assert_eq!(cut.keys().collect::<Vec<_>>(), ["path"]);
        assert_eq!(cut["path"], Cut::of(&path));
    }

    #[test]
    fn evidence_reads_and_writes_as_bytes_and_sha256() {
        let cut = Cut::of("abc");
        let json = serde_json::to_value(&cut).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "bytes": 3,
                "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
            })
        );
        assert_eq!(serde_json::from_value::<Cut>(json).unwrap(), cut);
    }

    proptest! {
        /// Whatever the value and bound: the recorded value is within the bound, is a
        /// prefix of the value ending on a character boundary (it is a `&str` slice), the
        /// evidence is there exactly when something was cut and describes the whole value,
        /// and a value within the bound is kept unchanged.
        #[test]
        fn prop_bounded_values_are_char_boundary_prefixes_with_evidence_iff_cut(
            value in prop_oneof![any::<String>(), "\\PC{0,600}", "[a-zé😀/-]{0,3000}"],
            max in 0usize..2100,
        ) {
            let (kept, cut) = bound(&value, max);
            prop_assert!(kept.len() <= max);
            prop_assert!(value.starts_with(&kept));
            prop_assert!(value.is_char_boundary(kept.len()));
            // The longest such prefix: the next character would not have fit.
            if let Some(next) = value[kept.len()..].chars().next() {
                prop_assert!(kept.len() + next.len_utf8() > max);
            }
            prop_assert_eq!(prefix(&value, max), kept.as_str());
            if value.len() <= max {
                prop_assert_eq!(&kept, &value);
                prop_assert!(cut.is_none());
            } else {
                let cut = cut.unwrap();
                prop_assert!(kept.len() < value.len());
                prop_assert_eq!(cut.bytes, value.len() as u64);
                prop_assert_eq!(cut.sha256, hex::encode(Sha256::digest(value.as_bytes())));
            }
        }
    }
}
