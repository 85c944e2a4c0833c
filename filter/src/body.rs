//! What the policy server reads from a body (model, stream, max_tokens, message count, size),
//! computed the same way here for the Envoy-side record, so a replay of a request nobody
//! decided sees the facts the server would have seen. Mirrors the server's `ai.rs`
//! (`BodyAttributes::from_body`); `body_facts_match_the_servers_rules` pins the cases.

use std::fmt;

use serde::de::{Error as _, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The body's facts as the server derives them from the CheckRequest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyFacts {
    /// Exact size when `size_known`, else the bytes sent (a lower bound).
    pub bytes: u64,
    /// Whether `bytes` is exact.
    pub size_known: bool,
    /// Cut at `max_body_bytes`: nothing is read from it.
    pub truncated: bool,
    /// A complete body that is not an OpenAI-style JSON object.
    pub parse_error: bool,
    /// `model`.
    pub model: Option<String>,
    /// `stream` (`false` when a parsed body does not set it).
    pub stream: Option<bool>,
    /// `max_tokens`, else `max_completion_tokens`.
    pub max_tokens: Option<i64>,
    /// Number of `messages`.
    pub message_count: Option<i64>,
}

#[derive(Default)]
struct OpenAiBody {
    model: Option<String>,
    stream: Option<bool>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    messages: Option<Vec<IgnoredAny>>,
}

/// The top-level keys read, as the server's `ai.rs` reads them.
const FIELDS: [&str; 5] = [
    "model",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "messages",
];

/// A key that is not one of [`FIELDS`] but that a provider may read as one: the same
/// letters in another case, as Go's `encoding/json` matches keys (Unicode simple folding,
/// so `ſ` U+017F is an `s` and the Kelvin sign U+212A a `k`).
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

/// The facts of `body` (what policy is sent, `None` on routes that send none), with the
/// length the CheckRequest reports (`http.size`, `None` for -1) and the partial-body marker.
pub fn body_facts(body: Option<&[u8]>, reported: Option<u64>, partial: bool) -> BodyFacts {
    let body = body.unwrap_or_default();
    let received = body.len() as u64;
    let truncated = partial && reported.is_none_or(|size| received < size);
    let mut facts = BodyFacts {
        bytes: reported.map_or(received, |size| size.max(received)),
        size_known: reported.is_some() || (received > 0 && !truncated),
        truncated,
        ..BodyFacts::default()
    };
    if body.is_empty() || truncated {
        return facts;
    }
    let is_object = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    match serde_json::from_slice::<OpenAiBody>(body) {
        Ok(parsed) if is_object => {
            facts.model = parsed.model;
            facts.stream = Some(parsed.stream.unwrap_or(false));
            facts.max_tokens = parsed.max_tokens.or(parsed.max_completion_tokens);
            facts.message_count = parsed
                .messages
                .map(|m| i64::try_from(m.len()).unwrap_or(i64::MAX));
        }
        _ => facts.parse_error = true,
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_facts_match_the_servers_rules() {
        let chat = br#"{"model":"gpt-4o","stream":true,"max_tokens":256,"messages":[{},{}]}"#;
        let f = body_facts(Some(chat), Some(chat.len() as u64), false);
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
        assert_eq!(
            (f.stream, f.max_tokens, f.message_count),
            (Some(true), Some(256), Some(2))
        );
        assert!(f.size_known && !f.truncated && !f.parse_error);
        let f = body_facts(Some(br#"{"max_completion_tokens":9}"#), None, false);
        assert_eq!(
            (f.stream, f.max_tokens, f.size_known),
            (Some(false), Some(9), true)
        );
        for bad in [
            &b"[]"[..],
            b"nope",
            br#"{"model":"a","model":"b"}"#,
            br#"{"model":"a","model":null}"#,
            br#"{"stream":1}"#,
            br#"{"model":"a","MODEL":"b"}"#,
            br#"{"Model":"b"}"#,
            "{\"model\":\"a\",\"max_to\u{212a}ens\":1}".as_bytes(),
            "{\"model\":\"a\",\"\u{17f}tream\":true}".as_bytes(),
            br#"{"model":"a","MESSAGES":[]}"#,
        ] {
            let f = body_facts(Some(bad), None, false);
            assert!(f.parse_error, "{}", String::from_utf8_lossy(bad));
            assert_eq!((f.model, f.stream), (None, None));
        }
        // Keys of other lengths or letters are the prompt's business; an escaped key is
        // the key itself.
        let f = body_facts(
            Some(br#"{"m\u006fdel":"a","models":1,"mode":2,"model_":3,"Temperature":1}"#),
            None,
            false,
        );
        assert_eq!((f.model.as_deref(), f.parse_error), (Some("a"), false));
        // Cut at the limit: nothing read; the size exact only when announced.
        let f = body_facts(Some(&chat[..10]), None, true);
        assert_eq!(
            (f.bytes, f.size_known, f.truncated, f.stream),
            (10, false, true, None)
        );
        let f = body_facts(Some(&chat[..10]), Some(70_000), true);
        assert_eq!((f.bytes, f.size_known, f.truncated), (70_000, true, true));
        // A marker on a body that all arrived is not a cut.
        let f = body_facts(Some(chat), Some(chat.len() as u64), true);
        assert!(!f.truncated && f.model.is_some());
        // No body sent: only the size.
        assert_eq!(
            body_facts(None, Some(5), false),
            BodyFacts {
                bytes: 5,
                size_known: true,
                ..BodyFacts::default()
            }
        );
        assert_eq!(body_facts(None, None, false), BodyFacts::default());
    }
}
