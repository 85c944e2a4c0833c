//! The audit record: one JSON object per line, chained by SHA-256.
//!
//! A line is the compact JSON of [`AuditEvent`] framed by `v`, `seq` and `prev_hash`, with
//! `hash` as its last member. `hash` is the lowercase hex SHA-256 of the line's bytes with
//! that last member removed (`{…,"prev_hash":"…"}`), so anyone can check it with nothing
//! but the line: no JSON canonicalisation rules to agree on.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bound::Cut;

/// Version of the record format, the `v` member of every line.
pub const FORMAT_VERSION: u32 = 1;
/// `prev_hash` of the first record of a chain.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// `,"hash":"` + 64 hex digits + `"}`: how every line ends.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// Why a line is not a valid audit record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The line does not end with a `hash` member.
    #[error("line does not end with a `hash` member")]
    NoHash,
    /// The `hash` member does not match the rest of the line.
    #[error("hash mismatch: the line says `{stated}`, its content hashes to `{actual}`")]
    HashMismatch {
        /// The hash written in the line.
        stated: String,
        /// The hash of the line's content.
        actual: String,
    },
    /// The line is not a JSON audit record.
    #[error("not an audit record: {0}")]
    Json(String),
    /// A format version this build does not know.
    #[error("unknown record format version `{0}`")]
    Version(u32),
}

/// The decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The request may proceed.
    Allow,
    /// The request is refused.
    Deny,
}

impl Verdict {
    /// `allow` / `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// Why the decision came out as it did (Cedar semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Allowed by the `permit` policies in `policy_ids`.
    Permit,
    /// Denied by the `forbid` policies in `policy_ids`.
    Forbid,
    /// Denied because no `permit` applied (`policy_ids` is empty).
    DefaultDeny,
}

/// One decision as recorded, before the writer gives it its place in the chain.
///
/// Field order is the order in the line. Every field is always present (`null` when
/// unknown), except `dry_run` (only when true), `shadow_decision` (only when a candidate
/// bundle was evaluated), `headers_omitted` and `cut` (only when something was left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When the decision was made, RFC 3339 UTC with microseconds.
    pub ts: String,
    /// The time policy decided at (`context.time`), RFC 3339 UTC with microseconds: the
    /// CheckRequest's time when trusted, else the server's receipt time. `None` in records
    /// written before the field existed.
    #[serde(default)]
    pub request_time: Option<String>,
    /// The audit id: a UUID v7, also sent to the caller (`x-arbiter-audit-id`, deny body).
    pub id: String,
    /// Envoy's `x-request-id` (the CheckRequest's `http.id`).
    pub request_id: String,
    /// `allow` or `deny`: what policy decided.
    pub decision: Verdict,
    /// The route was in dry-run (`dry_run: true` in its settings): policy was advisory, so a
    /// `deny` here was **not enforced** — the request went upstream marked
    /// `x-arbiter-dry-run: deny`. Written only when true (`"decision":"deny","dry_run":true`);
    /// absent (false) in every other record and in records written before the field existed,
    /// whose hashes it therefore leaves unchanged.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dry_run: bool,
    /// `permit`, `forbid` or `default_deny`.
    pub reason: Reason,
    /// Version of the bundle that decided.
    pub policy_version: String,
    /// The determining policies.
    pub policy_ids: Vec<String>,
    /// The candidate bundle's decision, when one is evaluated in shadow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_decision: Option<serde_json::Value>,
    /// Caller id, as policy saw it.
    pub principal: String,
    /// Cedar action.
    pub action: String,
    /// Envoy route name.
    pub route: String,
    /// The route's context (`context_extensions` other than `route` and `action`).
    pub route_context: BTreeMap<String, String>,
    /// HTTP method.
    pub method: String,
    /// `http` / `https`.
    pub scheme: String,
    /// `:authority`.
    pub host: String,
    /// Path without the query string.
    pub path: String,
    /// Downstream address `ip:port`.
    pub source: Option<String>,
    /// How the caller was identified, for replay: `{"source": "mtls"|"jwt"|"api_key"|"none",
    /// "jwt": verified claims or null, "api_key_sha256": hex or null}`.
    #[serde(default)]
    pub identity: Option<serde_json::Value>,
    /// Request headers (no pseudo-headers); secret ones replaced, see `redact`. Bounded:
    /// values over 1 KiB are cut, and past 8 KiB in all headers are left out.
    pub headers: BTreeMap<String, String>,
    /// How many headers were left out to keep the record bounded (absent when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_omitted: Option<u64>,
    /// Model named in the request body.
    pub model: Option<String>,
    /// Body size policy saw (`context.body_bytes`): exact when `body_size_known`, else the
    /// bytes received (a lower bound).
    pub body_bytes: Option<u64>,
    /// Whether `body_bytes` is exact (`context.body_size_known`). `None` in records written
    /// before the field existed.
    #[serde(default)]
    pub body_size_known: Option<bool>,
    /// Whether the body was cut at `max_body_bytes` (`context.body_truncated`).
    pub body_truncated: Option<bool>,
    /// Whether a complete body was not an OpenAI-style JSON object
    /// (`context.body_parse_error`). `None` in records written before the body facts below
    /// existed: its presence says `stream`, `max_tokens` and `message_count` are recorded.
    #[serde(default)]
    pub body_parse_error: Option<bool>,
    /// `stream` from the body (`context.stream`); `null` when policy saw none.
    #[serde(default)]
    pub stream: Option<bool>,
    /// `max_tokens` (or `max_completion_tokens`) from the body (`context.max_tokens`).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Number of `messages` in the body (`context.message_count`).
    #[serde(default)]
    pub message_count: Option<i64>,
    /// SHA-256 (hex) of the body bytes the filter sent.
    pub prompt_sha256: Option<String>,
    /// W3C trace id from the request's `traceparent`.
    pub trace_id: Option<String>,
    /// Microseconds from receiving the Check to the decision (the audit write excluded).
    pub latency_us: u64,
    /// The client-chosen values recorded cut (see [`crate::bound`]), by field name
    /// (`request_id`, `path`, `host`, `method`, `scheme`, `model`, `principal`): each such
    /// field holds the first bytes of the value, and this the whole value's length and
    /// SHA-256. Absent when nothing was cut, and in records written before the field
    /// existed, whose hashes it therefore leaves unchanged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cut: BTreeMap<String, Cut>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl AuditEvent {
    /// What happened to the request: `allow`, `deny`, or `dry_run_deny` (policy denied on a
    /// dry-run route and the request was let through marked) — the filter's outcome names.
    pub fn outcome(&self) -> &'static str {
        match (self.decision, self.dry_run) {
            (Verdict::Deny, true) => "dry_run_deny",
            (verdict, _) => verdict.as_str(),
        }
    }
}

/// The line being hashed: the event framed by its place in the chain.
#[derive(Serialize)]
struct Framed<'a> {
    v: u32,
    seq: u64,
    #[serde(flatten)]
    event: &'a AuditEvent,
    prev_hash: &'a str,
}

/// A parsed and hash-checked line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AuditRecord {
    /// Format version.
    pub v: u32,
    /// Position in the chain, from 1, gapless.
    pub seq: u64,
    /// The decision.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// `hash` of the record before, or [`GENESIS_HASH`].
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
}

/// The place of a record in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ChainLink<'a> {
    /// Format version.
    pub v: u32,
    /// Sequence number.
    pub seq: u64,
    /// Previous hash.
    pub prev_hash: &'a str,
    /// This record's hash.
    pub hash: &'a str,
}

/// Appends the line for `event` at `seq` after `prev_hash` (with its `\n`) to `out` and
/// returns its hash.
pub fn encode(
    event: &AuditEvent,
    seq: u64,
    prev_hash: &str,
    out: &mut Vec<u8>,
) -> Result<String, serde_json::Error> {
    let start = out.len();
    serde_json::to_writer(
        &mut *out,
        &Framed {
            v: FORMAT_VERSION,
            seq,
            event,
            prev_hash,
        },
    )?;
    let hash = hex::encode(Sha256::digest(&out[start..]));
    // Replace the closing brace by the hash member.
    out.pop();
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\"}\n");
    Ok(hash)
}

/// Checks that `line` (without its `\n`) hashes to its `hash` member and returns its chain
/// link. Other members are not interpreted, so newer fields do not break verification.
pub fn check_line(line: &[u8]) -> Result<ChainLink<'_>, RecordError> {
    let split = line
        .len()
        .checked_sub(HASH_SUFFIX_LEN)
        .ok_or(RecordError::NoHash)?;
    let (content, suffix) = line.split_at(split);
    let stated = suffix
        .strip_prefix(b",\"hash\":\"")
        .and_then(|rest| rest.strip_suffix(b"\"}"))
        .filter(|hex| hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or(RecordError::NoHash)?;
    let mut hasher = Sha256::new();
    hasher.update(content);
    hasher.update(b"}");
    let actual = hex::encode(hasher.finalize());
    if actual.as_bytes() != stated {
        return Err(RecordError::HashMismatch {
            stated: String::from_utf8_lossy(stated).into_owned(),
            actual,
        });
    }
    let link: ChainLink<'_> =
        serde_json::from_slice(line).map_err(|e| RecordError::Json(e.to_string()))?;
    if link.v != FORMAT_VERSION {
        return Err(RecordError::Version(link.v));
    }
    Ok(link)
}

/// Parses a whole record, checking its hash.
pub fn parse_line(line: &[u8]) -> Result<AuditRecord, RecordError> {
    check_line(line)?;
    serde_json::from_slice(line).map_err(|e| RecordError::Json(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A complete event for tests.
    pub(crate) fn event() -> AuditEvent {
        AuditEvent {
            ts: "2026-11-22T02:00:00.000001Z".into(),
            request_time: Some("2026-11-22T02:00:00.000000Z".into()),
            id: "0193a1b2-0000-7000-8000-000000000001".into(),
            request_id: "r-1".into(),
            decision: Verdict::Allow,
            dry_run: false,
            reason: Reason::Permit,
            policy_version: "sha256:0123456789abcdef".into(),
            policy_ids: vec!["routine-chat".into()],
            shadow_decision: None,
            principal: "anonymous".into(),
            action: "chat.completions".into(),
            route: "chat".into(),
            route_context: BTreeMap::from([("classification".into(), "public".into())]),
            method: "POST".into(),
            scheme: "http".into(),
            host: "gw".into(),
            path: "/v1/chat/completions".into(),
            source: Some("127.0.0.1:5000".into()),
            identity: None,
            headers: BTreeMap::new(),
            headers_omitted: None,
            model: None,
            body_bytes: Some(12),
            body_size_known: Some(true),
            body_truncated: Some(false),
            body_parse_error: Some(false),
            stream: Some(false),
            max_tokens: None,
            message_count: Some(1),
            prompt_sha256: None,
            trace_id: None,
            latency_us: 42,
            cut: BTreeMap::new(),
        }
    }

    #[test]
    fn encodes_hash_last_and_checks() {
        let mut out = Vec::new();
        let hash = encode(&event(), 7, GENESIS_HASH, &mut out).unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        let line = &out[..out.len() - 1];
        let text = std::str::from_utf8(line).unwrap();
        assert!(text.starts_with("{\"v\":1,\"seq\":7,\"ts\":"), "{text}");
        assert!(text.ends_with(&format!(",\"hash\":\"{hash}\"}}")), "{text}");
        assert!(!text.contains("shadow_decision"));
        let link = check_line(line).unwrap();
        assert_eq!(
            (link.seq, link.prev_hash, link.hash),
            (7, GENESIS_HASH, hash.as_str())
        );
        let record = parse_line(line).unwrap();
        assert_eq!(record.event, event());
        assert_eq!(record.hash, hash);
    }

    #[test]
    fn dry_run_is_written_beside_the_decision_only_when_true() {
        let mut out = Vec::new();
        encode(&event(), 1, GENESIS_HASH, &mut out).unwrap();
        let plain = String::from_utf8(out).unwrap();
        assert!(!plain.contains("dry_run"), "{plain}");
        // Without the member, a line is what servers wrote before it existed: it parses as
        // enforced.
        let record = parse_line(plain.trim_end().as_bytes()).unwrap();
        assert!(!record.event.dry_run);
        assert_eq!(record.event.outcome(), "allow");

        let dry = AuditEvent {
            decision: Verdict::Deny,
            reason: Reason::DefaultDeny,
            dry_run: true,
            ..event()
        };
        let mut out = Vec::new();
        encode(&dry, 2, GENESIS_HASH, &mut out).unwrap();
        let line = String::from_utf8(out).unwrap();
        let line = line.trim_end();
        assert!(
            line.contains(r#""decision":"deny","dry_run":true,"reason":"default_deny""#),
            "{line}"
        );
        let record = parse_line(line.as_bytes()).unwrap();
        assert_eq!(record.event, dry);
        assert_eq!(record.event.outcome(), "dry_run_deny");
        for edited in [
            line.replace(r#","dry_run":true"#, ""),
            line.replace(r#""dry_run":true"#, r#""dry_run":false"#),
        ] {
            assert!(matches!(
                check_line(edited.as_bytes()),
                Err(RecordError::HashMismatch { .. })
            ));
        }
    }

    #[test]
    fn cut_values_carry_their_evidence_and_older_records_parse_without_it() {
        let mut out = Vec::new();
        encode(&event(), 1, GENESIS_HASH, &mut out).unwrap();
        let plain = String::from_utf8(out).unwrap();
        // Nothing cut: no member, the line as servers wrote it before the field existed.
        assert!(!plain.contains("\"cut\""), "{plain}");
        assert!(parse_line(plain.trim_end().as_bytes())
            .unwrap()
            .event
            .cut
            .is_empty());

        let whole = format!("/{}", "p".repeat(5000));
        let mut bounder = crate::bound::Bounder::default();
        let cut = AuditEvent {
            path: bounder.keep("path", &whole, crate::bound::MAX_RECORDED_PATH),
            ..event()
        };
        let cut = AuditEvent {
            cut: bounder.into_cut(),
            ..cut
        };
        let mut out = Vec::new();
        encode(&cut, 2, GENESIS_HASH, &mut out).unwrap();
        let line = String::from_utf8(out).unwrap();
        let line = line.trim_end();
        let sha = hex::encode(Sha256::digest(whole.as_bytes()));
        assert!(
            line.contains(&format!(
                r#""latency_us":42,"cut":{{"path":{{"bytes":5001,"sha256":"{sha}"}}}},"prev_hash""#
            )),
            "{line}"
        );
        let record = parse_line(line.as_bytes()).unwrap();
        assert_eq!(record.event, cut);
        assert_eq!(record.event.path.len(), crate::bound::MAX_RECORDED_PATH);
        // The evidence is under the hash like every other member.
        let edited = line.replace("\"bytes\":5001", "\"bytes\":5002");
        assert!(matches!(
            check_line(edited.as_bytes()),
            Err(RecordError::HashMismatch { .. })
        ));
    }

    #[test]
    fn detects_any_edit() {
        let mut out = Vec::new();
        encode(&event(), 1, GENESIS_HASH, &mut out).unwrap();
        let line = String::from_utf8(out[..out.len() - 1].to_vec()).unwrap();
        let edited = line.replace("\"allow\"", "\"deny\"");
        assert!(matches!(
            check_line(edited.as_bytes()),
            Err(RecordError::HashMismatch { .. })
        ));
        let no_hash = &line[..line.len() - HASH_SUFFIX_LEN];
        assert_eq!(check_line(no_hash.as_bytes()), Err(RecordError::NoHash));
        assert_eq!(check_line(b"{}"), Err(RecordError::NoHash));
        // A duplicated member cannot smuggle a second hash past the parser, even when the
        // outer hash is right.
        let content = line[..line.len() - HASH_SUFFIX_LEN].replacen("{", "{\"hash\":\"x\",", 1);
        let hash = hex::encode(Sha256::digest(format!("{content}}}")));
        let duplicate = format!("{content},\"hash\":\"{hash}\"}}");
        assert!(matches!(
            check_line(duplicate.as_bytes()),
            Err(RecordError::Json(_))
        ));
    }
}
