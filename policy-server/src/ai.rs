//! AI request attributes: what an OpenAI-style JSON body tells policy (model, stream,
//! max_tokens, message count, size), read without keeping the prompt.
//!
//! Outcomes are defined for every body: none sent, complete and parsed, complete but not an
//! OpenAI-style JSON object (`parse_error`), or cut at the route's `max_body_bytes`
//! (`truncated`; never parsed, since a prefix can say anything). Nothing here fails.

use serde::de::IgnoredAny;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Header Envoy (and the Arbiter filter) set on a CheckRequest whose body was cut at the
/// route's limit.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// What the request body says, for policy and the audit record. Never holds prompt text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyAttributes {
    /// Body size in bytes: the full length when the filter reported it, else the bytes
    /// received; 0 when no body was sent.
    pub bytes: u64,
    /// The body was cut at the route's `max_body_bytes`; no attribute was read from it.
    pub truncated: bool,
    /// A complete body was received but is not an OpenAI-style JSON object (not UTF-8 JSON,
    /// not an object, a known field of the wrong type, or a known field twice).
    pub parse_error: bool,
    /// `model`.
    pub model: Option<String>,
    /// `stream` (`false` when a parsed body does not set it, as in the OpenAI API).
    pub stream: Option<bool>,
    /// `max_tokens`, else `max_completion_tokens`.
    pub max_tokens: Option<i64>,
    /// Number of entries in `messages`.
    pub message_count: Option<i64>,
    /// Hex SHA-256 of the body bytes received, for the audit record (the text never leaves
    /// this module).
    pub sha256: Option<String>,
}

/// The fields policy reads; everything else (the prompt) is skipped without being kept.
#[derive(Deserialize)]
struct OpenAiBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    // `IgnoredAny` is zero-sized: counting messages allocates nothing per message.
    #[serde(default)]
    messages: Option<Vec<IgnoredAny>>,
}

impl BodyAttributes {
    /// Reads the body the filter sent. `body` is what arrived (empty when the route does not
    /// send bodies), `reported_size` the CheckRequest's `http.size` (full length, or <= 0
    /// when unknown), `truncated` whether the partial-body header was `true`.
    pub fn from_body(body: &[u8], reported_size: i64, truncated: bool) -> Self {
        let received = body.len() as u64;
        let bytes = u64::try_from(reported_size).unwrap_or(0).max(received);
        let mut attributes = Self {
            bytes,
            truncated,
            ..Self::default()
        };
        if body.is_empty() {
            return attributes;
        }
        attributes.sha256 = Some(hex::encode(Sha256::digest(body)));
        if truncated {
            return attributes;
        }
        // Serde also reads a struct from a JSON array (`[]` would parse as an empty
        // request): only an object is an OpenAI request.
        let is_object = body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{');
        if !is_object {
            attributes.parse_error = true;
            return attributes;
        }
        match serde_json::from_slice::<OpenAiBody>(body) {
            Ok(parsed) => {
                attributes.model = parsed.model;
                attributes.stream = Some(parsed.stream.unwrap_or(false));
                attributes.max_tokens = parsed.max_tokens.or(parsed.max_completion_tokens);
                attributes.message_count = parsed
                    .messages
                    .map(|m| i64::try_from(m.len()).unwrap_or(i64::MAX));
            }
            // The serde error may quote the body: it is neither logged nor kept.
            Err(_) => attributes.parse_error = true,
        }
        attributes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_body() {
        let body = br#"{"model":"gpt-4o","stream":true,"max_tokens":256,
            "messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]}"#;
        let a = BodyAttributes::from_body(body, body.len() as i64, false);
        assert_eq!(a.model.as_deref(), Some("gpt-4o"));
        assert_eq!(a.stream, Some(true));
        assert_eq!(a.max_tokens, Some(256));
        assert_eq!(a.message_count, Some(2));
        assert_eq!(a.bytes, body.len() as u64);
        assert!(!a.truncated && !a.parse_error);
        assert_eq!(a.sha256.as_deref().map(str::len), Some(64));
    }

    #[test]
    fn defaults_and_other_shapes() {
        let a = BodyAttributes::from_body(br#"{"model":"m","max_completion_tokens":9}"#, 0, false);
        assert_eq!(a.stream, Some(false));
        assert_eq!(a.max_tokens, Some(9));
        assert_eq!(a.message_count, None);
        let a = BodyAttributes::from_body(br#"{"input":["a","b"],"model":null}"#, -1, false);
        assert_eq!(a.model, None);
        assert!(!a.parse_error);
        // Duplicate keys are ambiguous (parsers differ on which one wins): a parse error,
        // so a policy cannot be shown one model while the upstream uses another.
        let a = BodyAttributes::from_body(br#"{"model":"cheap","model":"dear"}"#, 0, false);
        assert!(a.parse_error);
        assert_eq!(a.model, None);
    }

    #[test]
    fn no_body() {
        let a = BodyAttributes::from_body(b"", 0, false);
        assert_eq!(a, BodyAttributes::default());
    }

    #[test]
    fn bad_bodies_are_parse_errors_not_failures() {
        for body in [
            &b"not json"[..],
            b"[1,2]",
            b"[]",
            b"  [\"gpt-4o\"]",
            b"\"text\"",
            br#"{"model": 5}"#,
            br#"{"messages": "hi"}"#,
            br#"{"max_tokens": -1.5}"#,
            b"{\"model\":\"\xff\xfe\"}",
            b"{\"model\":",
        ] {
            let a = BodyAttributes::from_body(body, 0, false);
            assert!(a.parse_error, "{}", String::from_utf8_lossy(body));
            assert_eq!(a.model, None);
            assert_eq!(a.bytes, body.len() as u64);
        }
    }

    #[test]
    fn truncated_bodies_are_not_parsed() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"aaaa"#;
        let a = BodyAttributes::from_body(body, 70_000, true);
        assert!(a.truncated);
        assert!(!a.parse_error);
        assert_eq!(a.model, None);
        assert_eq!(a.bytes, 70_000);
    }
}
