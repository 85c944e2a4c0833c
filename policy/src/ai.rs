//! AI request attributes: what an OpenAI-style JSON body tells policy (model, stream,
//! max_tokens, message count, size), read without keeping the prompt.
//!
//! Outcomes are defined for every body: none sent, complete and parsed, complete but not an
//! OpenAI-style JSON object (`parse_error`), or cut at the route's `max_body_bytes`
//! (`truncated`; never parsed, since a prefix can say anything). The size is exact or
//! marked unknown (`size_known`), never guessed. Nothing here fails.

use std::fmt;

use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

/// Header Envoy (and the Arbiter filter) set on a CheckRequest whose body was cut at the
/// route's limit.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// What the request body says, for policy and the audit record. Never holds prompt text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyAttributes {
    /// Body size in bytes: the exact length when [`Self::size_known`], else the bytes
    /// received (a lower bound: 0 when nothing was sent).
    pub bytes: u64,
    /// Whether `bytes` is the body's exact length: the filter reported it (`http.size >= 0`:
    /// content-length, the complete buffered body, or 0 for a request without body), or the
    /// complete body was sent. False for a body of unknown length (chunked HTTP/1.1, HTTP/2
    /// without content-length) that was not sent whole, so a size limit can refuse it.
    pub size_known: bool,
    /// The body was cut at the route's `max_body_bytes`; no attribute was read from it.
    pub truncated: bool,
    /// A complete body was received but is not an OpenAI-style JSON object (not UTF-8 JSON,
    /// not an object, a known field of the wrong type, a known field twice, or a key that
    /// differs from a known field only in case).
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
#[derive(Default)]
struct OpenAiBody {
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    // `IgnoredAny` is zero-sized: counting messages allocates nothing per message.
    messages: Option<Vec<IgnoredAny>>,
}

/// The top-level keys policy reads.
const FIELDS: [&str; 5] = [
    "model",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "messages",
];

/// A key that is not one of [`FIELDS`] but that a provider may read as one: the same
/// letters in another case. Go's `encoding/json` (behind Ollama and many gateways) matches
/// keys that way, with Unicode simple folding (`ſ` U+017F is an `s`, the Kelvin sign U+212A
/// a `k`), and the last match wins: `{"model":"cheap","MODEL":"dear"}` is `dear` there.
fn folds_to_field(key: &str) -> bool {
    let fold = |c: char| match c {
        '\u{17f}' => 's',
        '\u{212a}' => 'k',
        c => c.to_ascii_lowercase(),
    };
    FIELDS
        .iter()
        .any(|field| key.chars().map(fold).eq(field.chars()))
}

impl<'de> Deserialize<'de> for OpenAiBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(OpenAiBodyVisitor)
    }
}

struct OpenAiBodyVisitor;

/// Reads one known field once; a second copy is ambiguous (parsers differ on which wins).
fn once<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    seen: &mut bool,
    name: &'static str,
) -> Result<Option<T>, A::Error> {
    if std::mem::replace(seen, true) {
        return Err(A::Error::duplicate_field(name));
    }
    map.next_value()
}

impl<'de> Visitor<'de> for OpenAiBodyVisitor {
    type Value = OpenAiBody;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an OpenAI-style JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OpenAiBody, A::Error> {
        let mut body = OpenAiBody::default();
        let mut seen = [false; FIELDS.len()];
        let [model, stream, max_tokens, max_completion_tokens, messages] = &mut seen;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "model" => body.model = once(&mut map, model, "model")?,
                "stream" => body.stream = once(&mut map, stream, "stream")?,
                "max_tokens" => body.max_tokens = once(&mut map, max_tokens, "max_tokens")?,
                "max_completion_tokens" => {
                    body.max_completion_tokens =
                        once(&mut map, max_completion_tokens, "max_completion_tokens")?
                }
                "messages" => body.messages = once(&mut map, messages, "messages")?,
                other if folds_to_field(other) => {
                    return Err(A::Error::custom(
                        "a key that differs from a known field only in case",
                    ))
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(body)
    }
}

impl BodyAttributes {
    /// Reads the body the filter sent. `body` is what arrived (empty when the route does not
    /// send bodies), `reported_size` the CheckRequest's `http.size` (the exact length, or -1
    /// when unknown), `partial` whether the partial-body header was `true`.
    pub fn from_body(body: &[u8], reported_size: i64, partial: bool) -> Self {
        let received = body.len() as u64;
        let reported = u64::try_from(reported_size).ok();
        // A body that is all there is complete whatever the marker says: the filter marks a
        // body it cut, and a cut body is shorter than its known length. Reading it anyway
        // means a stray marker cannot hide a complete body's model from policy.
        let truncated = partial && reported.is_none_or(|size| received < size);
        let size_known = reported.is_some() || (received > 0 && !truncated);
        // Never less than what arrived, whatever was reported.
        let bytes = reported.map_or(received, |size| size.max(received));
        let mut attributes = Self {
            bytes,
            size_known,
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
        // So is a key a provider may take for a known one: Go's `encoding/json` matches
        // keys ignoring case (Unicode folding included), and the last match wins there.
        for ambiguous in [
            r#"{"model":"cheap","MODEL":"dear"}"#,
            r#"{"Model":"dear"}"#,
            "{\"model\":\"cheap\",\"max_to\u{212a}ens\":100000}",
            "{\"\u{17f}tream\":true}",
            r#"{"model":"cheap","Messages":[]}"#,
            r#"{"model":"cheap","model":null}"#,
        ] {
            let a = BodyAttributes::from_body(ambiguous.as_bytes(), 0, false);
            assert!(a.parse_error, "{ambiguous}");
            assert_eq!(a.model, None, "{ambiguous}");
        }
        // Other keys are the prompt's business; an escaped key is the key itself.
        let a = BodyAttributes::from_body(
            br#"{"m\u006fdel":"cheap","models":1,"mode":2,"model_":3,"Temperature":1}"#,
            0,
            false,
        );
        assert_eq!((a.model.as_deref(), a.parse_error), (Some("cheap"), false));
    }

    #[test]
    fn no_body() {
        // Size 0: the request has no body, and that is known.
        let a = BodyAttributes::from_body(b"", 0, false);
        assert_eq!(
            a,
            BodyAttributes {
                size_known: true,
                ..BodyAttributes::default()
            }
        );
        // Size -1 and nothing sent: 0 bytes seen, size unknown.
        let a = BodyAttributes::from_body(b"", -1, false);
        assert_eq!(a, BodyAttributes::default());
        assert!(!a.size_known);
        // A route that does not send bodies still reports content-length.
        let a = BodyAttributes::from_body(b"", 5_000, false);
        assert_eq!((a.bytes, a.size_known), (5_000, true));
    }

    #[test]
    fn size_is_exact_or_marked_unknown() {
        let body = br#"{"model":"gpt-4o-mini","messages":[]}"#;
        let len = body.len() as u64;
        // Chunked, sent whole: the body itself is the size.
        let a = BodyAttributes::from_body(body, -1, false);
        assert_eq!((a.bytes, a.size_known, a.truncated), (len, true, false));
        assert_eq!(a.model.as_deref(), Some("gpt-4o-mini"));
        // Chunked, cut at the route's limit: what arrived is only a lower bound.
        let a = BodyAttributes::from_body(&body[..10], -1, true);
        assert_eq!((a.bytes, a.size_known, a.truncated), (10, false, true));
        // Content-length known, cut: the full length.
        let a = BodyAttributes::from_body(&body[..10], 70_000, true);
        assert_eq!((a.bytes, a.size_known, a.truncated), (70_000, true, true));
        // A size smaller than what arrived is not believed.
        let a = BodyAttributes::from_body(body, 3, false);
        assert_eq!((a.bytes, a.size_known), (len, true));
        // Absurd sizes.
        let a = BodyAttributes::from_body(b"", i64::MIN, false);
        assert_eq!((a.bytes, a.size_known), (0, false));
        let a = BodyAttributes::from_body(b"{}", i64::MAX, false);
        assert_eq!((a.bytes, a.size_known), (i64::MAX as u64, true));
    }

    #[test]
    fn a_partial_marker_on_a_complete_body_is_ignored() {
        // All `size` bytes arrived: the body is complete, so its model is read and checked.
        let body = br#"{"model":"gpt-4o","messages":[]}"#;
        let a = BodyAttributes::from_body(body, body.len() as i64, true);
        assert!(!a.truncated);
        assert!(a.size_known);
        assert_eq!(a.model.as_deref(), Some("gpt-4o"));
        // Without a known size the marker is believed (the filter must strip forged ones).
        let a = BodyAttributes::from_body(body, -1, true);
        assert!(a.truncated && !a.size_known);
        assert_eq!(a.model, None);
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
        assert!(a.size_known);
    }
}
