//! What the policy server reads from a body (model, stream, max_tokens, message count, size),
//! computed the same way here for the Envoy-side record, so a replay of a request nobody
//! decided sees the facts the server would have seen. Mirrors the server's `ai.rs`
//! (`BodyAttributes::from_body`); `body_facts_match_the_servers_rules` pins the cases.

use serde::de::IgnoredAny;
use serde::Deserialize;

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
    #[serde(default)]
    messages: Option<Vec<IgnoredAny>>,
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
            br#"{"stream":1}"#,
        ] {
            let f = body_facts(Some(bad), None, false);
            assert!(f.parse_error, "{}", String::from_utf8_lossy(bad));
            assert_eq!((f.model, f.stream), (None, None));
        }
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
