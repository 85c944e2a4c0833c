//! What the audit record takes from a `CheckRequest` beyond the policy request: headers
//! with secrets replaced and the trace id. (The body's size and hash, never its text, come
//! from the policy request's body attributes, so the record shows exactly what policy saw.)
//!
//! Never written in clear, whatever the configuration (each entry has a test below):
//! - the value of a credential header ([`ALWAYS_REDACTED`], any name containing one of
//!   [`REDACTED_NAME_PARTS`], and `--redact-header` names);
//! - in a URL-valued header ([`URL_HEADERS`]) or any header value that is a URL or a
//!   request target with a query ([`looks_like_url`]): the userinfo (`user:pass@`) and the
//!   value of every credential parameter ([`REDACTED_QUERY_KEYS`]) in the query or fragment;
//! - the userinfo of `:authority` ([`redact_authority`]);
//! - the query string of `:path` (the record's `path` stops at `?`; pseudo-headers are not
//!   recorded as headers);
//! - the request body (only its length and SHA-256).

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Request},
    AttributeContext, CheckRequest,
};

/// Headers always redacted, whatever the configuration says.
pub const ALWAYS_REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
];
/// A header whose name contains one of these is redacted too: custom credential headers
/// (`x-goog-api-key`, `x-session-token`, …) are too many to list.
pub const REDACTED_NAME_PARTS: &[&str] = &[
    "auth",
    "cookie",
    "token",
    "secret",
    "key",
    "password",
    "session",
    "credential",
    "signature",
];
/// What a redacted header's value is replaced with.
pub const REDACTED: &str = "[redacted]";
/// Headers whose value is a URL or a request target, whatever it looks like: their query
/// string and userinfo are redacted like any URL's (see [`redact_url`]).
pub const URL_HEADERS: &[&str] = &[
    "referer",
    "referrer",
    "origin",
    "location",
    "content-location",
    "x-forwarded-uri",
    "x-forwarded-url",
    "x-original-uri",
    "x-original-url",
    "x-rewrite-url",
    "x-envoy-original-path",
    "x-envoy-original-url",
];
/// Query (and fragment) parameters whose value is replaced by [`REDACTED`] wherever a URL
/// is recorded, matched case-insensitively after percent-decoding the name.
///
/// A list of credential names rather than every value: the rest of a query (`model`,
/// `api-version`, `stream`, resource ids) is what an incident review needs to tell one
/// request from another, and is not a secret. The list covers the credentials providers and
/// common schemes put in URLs: API keys (`key` for Google, `api-key`/`api_key`/`apikey`),
/// OAuth (`access_token`, `refresh_token`, `id_token`, `code`, `client_secret`), signed
/// URLs (`sig`/`signature`, S3's `X-Amz-Signature`/`-Credential`/`-Security-Token`, GCS's
/// `X-Goog-Signature`/`-Credential`, Azure SAS `sig`), passwords and session ids.
pub const REDACTED_QUERY_KEYS: &[&str] = &[
    "key",
    "api_key",
    "api-key",
    "apikey",
    "x-api-key",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth",
    "auth_token",
    "authorization",
    "bearer",
    "jwt",
    "code",
    "client_secret",
    "secret",
    "password",
    "passwd",
    "pwd",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "session",
    "sessionid",
    "session_id",
];

/// Whether query parameter `name` (raw, as in the URL) names a credential.
pub fn is_secret_query_key(name: &str) -> bool {
    let decoded = percent_decode(name).to_ascii_lowercase();
    REDACTED_QUERY_KEYS.contains(&decoded.trim())
}

/// Whether a header value is a URL (`scheme://…`) or an origin-form request target with a
/// query (`/…?…`): such values are passed through [`redact_url`] whatever the header.
pub fn looks_like_url(value: &str) -> bool {
    scheme_len(value).is_some() || (value.starts_with('/') && value.contains('?'))
}

/// `value` with the userinfo of a `scheme://user:pass@host` URL and the values of
/// credential parameters ([`REDACTED_QUERY_KEYS`]) in its query and fragment replaced by
/// [`REDACTED`]. Anything else is kept byte for byte; never panics, whatever the input.
pub fn redact_url(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    if let Some(len) = scheme_len(value) {
        let (scheme, after) = rest.split_at(len);
        out.push_str(scheme);
        let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, after) = after.split_at(authority_end);
        match authority.rfind('@') {
            Some(at) => {
                out.push_str(REDACTED);
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = after;
    }
    // Path, then `?query`, then `#fragment` (OAuth's implicit flow puts tokens there).
    let path_end = rest.find(['?', '#']).unwrap_or(rest.len());
    let (path, mut rest) = rest.split_at(path_end);
    out.push_str(path);
    while let Some(sep) = rest.chars().next() {
        let body = &rest[sep.len_utf8()..];
        let end = if sep == '?' {
            body.find('#').unwrap_or(body.len())
        } else {
            body.len()
        };
        out.push(sep);
        redact_params(&body[..end], &mut out);
        rest = &body[end..];
    }
    out
}

/// `a=1&key=2;b` with the credential values replaced (`a=1&key=[redacted];b`).
fn redact_params(params: &str, out: &mut String) {
    // Walk the original string so every separator is kept as it was.
    let mut start = 0;
    for (i, c) in params
        .char_indices()
        .chain(std::iter::once((params.len(), '&')))
    {
        if c != '&' && c != ';' {
            continue;
        }
        let pair = &params[start..i];
        match pair.split_once('=') {
            Some((name, _)) if is_secret_query_key(name) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
        if i < params.len() {
            out.push(c);
        }
        start = i + 1;
    }
}

/// Length of `scheme://` at the start of `value` (RFC 3986 scheme: a letter, then letters,
/// digits, `+`, `-`, `.`).
fn scheme_len(value: &str) -> Option<usize> {
    let colon = value.find("://")?;
    let scheme = &value[..colon];
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(colon + 3)
}

/// `%XX` decoded (invalid escapes kept), `+` as a space, lossy UTF-8.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            b,
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `host` with the userinfo of an `user:pass@host` authority replaced by [`REDACTED`].
pub fn redact_authority(host: &str) -> String {
    match host.rfind('@') {
        Some(at) => format!("{REDACTED}{}", &host[at..]),
        None => host.to_owned(),
    }
}

/// Claims every record keeps: the principal of a JWT caller is `<iss>#<sub>`, in the record
/// anyway.
pub const ALWAYS_RECORDED_CLAIMS: &[&str] = &["iss", "sub"];

/// Which verified JWT claims an audit record keeps (`--audit-jwt-claims`). Claims can carry
/// personal data (email, name, phone, addresses); a record keeps only what explains its
/// decision unless the operator asks for more.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ClaimAllowList {
    /// The default: `iss`, `sub` and the claims the bundle's policies decide on (its tenant
    /// and groups claims), so the record explains the decision and `audit replay` re-decides
    /// it exactly. Everything else a token carries is left out.
    #[default]
    PolicyInputs,
    /// Exactly these claims, plus `iss` and `sub`.
    Only(BTreeSet<String>),
    /// Every claim (`*`): the records hold whatever the identity provider puts in tokens.
    All,
}

impl ClaimAllowList {
    /// From `--audit-jwt-claims` values: none for the default, `*` alone for every claim,
    /// else claim names (1-256 characters, no whitespace or control characters).
    pub fn parse(names: &[String]) -> Result<Self, String> {
        if names.is_empty() {
            return Ok(Self::PolicyInputs);
        }
        if names.iter().any(|n| n == "*") {
            if names.len() > 1 {
                return Err("`*` (every claim) cannot be combined with claim names".to_owned());
            }
            return Ok(Self::All);
        }
        let mut set = BTreeSet::new();
        for name in names {
            let valid = !name.is_empty()
                && name.len() <= 256
                && !name.chars().any(|c| c.is_whitespace() || c.is_control());
            if !valid {
                return Err(format!(
                    "`{}` is not a claim name (1-256 characters, no whitespace or control characters)",
                    name.escape_debug()
                ));
            }
            set.insert(name.clone());
        }
        Ok(Self::Only(set))
    }

    /// Whether `claim` is recorded, `policy_claims` being the bundle's tenant and groups
    /// claims.
    pub fn keeps(&self, claim: &str, policy_claims: &[&str]) -> bool {
        ALWAYS_RECORDED_CLAIMS.contains(&claim)
            || match self {
                Self::PolicyInputs => policy_claims.contains(&claim),
                Self::Only(names) => names.contains(claim),
                Self::All => true,
            }
    }
}

/// Which headers never reach the audit log in clear, and which JWT claims do.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    extra: BTreeSet<String>,
    claims: ClaimAllowList,
}

impl Redactor {
    /// The built-in rules plus `extra` header names (case-insensitive).
    pub fn new(extra: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        Self {
            extra: extra
                .into_iter()
                .map(|name| name.as_ref().trim().to_ascii_lowercase())
                .filter(|name| !name.is_empty())
                .collect(),
            claims: ClaimAllowList::default(),
        }
    }

    /// These rules, recording the JWT claims `claims` allows.
    pub fn with_jwt_claims(mut self, claims: ClaimAllowList) -> Self {
        self.claims = claims;
        self
    }

    /// Removes the claims the allow-list does not keep from a record's `identity.jwt`
    /// (`policy_claims`: the deciding bundle's tenant and groups claims), and says how many
    /// were left out (`identity.jwt_claims_withheld`; their names are not recorded either,
    /// as a claim name can say something about a person too).
    pub fn mask_identity(&self, identity: &mut Option<serde_json::Value>, policy_claims: &[&str]) {
        let Some(serde_json::Value::Object(identity)) = identity else {
            return;
        };
        let Some(serde_json::Value::Object(claims)) = identity.get_mut("jwt") else {
            return;
        };
        let before = claims.len();
        claims.retain(|name, _| self.claims.keeps(name, policy_claims));
        let withheld = before - claims.len();
        if withheld > 0 {
            identity.insert("jwt_claims_withheld".to_owned(), withheld.into());
        }
    }

    /// Whether the value of header `name` (lowercase) must not be recorded.
    pub fn is_secret(&self, name: &str) -> bool {
        ALWAYS_REDACTED.contains(&name)
            || self.extra.contains(name)
            || REDACTED_NAME_PARTS
                .iter()
                .any(|part| contains_bytes(name.as_bytes(), part.as_bytes()))
    }

    /// The audit facts of `check`.
    pub fn facts(&self, check: &CheckRequest) -> RequestFacts {
        let Some(http) = http(check) else {
            return RequestFacts::default();
        };
        let mut headers = BTreeMap::new();
        let mut trace = None;
        let all = http
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .chain(http.header_map.iter().flat_map(|map| {
                map.headers.iter().map(|h| {
                    let value = if h.raw_value.is_empty() {
                        h.value.clone()
                    } else {
                        String::from_utf8_lossy(&h.raw_value).into_owned()
                    };
                    (h.key.as_str(), value)
                })
            }));
        for (name, value) in all {
            let name = name.to_ascii_lowercase();
            // Pseudo-headers are recorded as method/path/host/scheme; `:path` carries the
            // query string, which may hold secrets.
            if name.starts_with(':') {
                continue;
            }
            if name == "traceparent" {
                trace = TraceParent::parse(&value);
            }
            let value = if self.is_secret(&name) {
                REDACTED.to_owned()
            } else if URL_HEADERS.contains(&name.as_str()) || looks_like_url(&value) {
                redact_url(&value)
            } else {
                value
            };
            headers.insert(name, value);
        }
        let headers_omitted = cap_headers(&mut headers);
        RequestFacts {
            headers,
            trace,
            headers_omitted,
        }
    }
}

/// `haystack.contains(needle)` for short strings: `str::contains` sets up a two-way searcher
/// and compares at every position, which cost a decision ~75 `memcmp` calls per header.
fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    let Some(&first) = needle.first() else {
        return true;
    };
    haystack
        .windows(needle.len())
        .any(|window| window[0] == first && window == needle)
}

/// Longest header value a record keeps; a longer one is cut (at a character boundary) and
/// says how many bytes it lost.
pub const MAX_RECORDED_HEADER_VALUE: usize = 1024;
/// Header bytes (names and values) a record keeps in all. A client controls its headers
/// (Envoy admits up to 60 KiB): without a bound, every decision would copy them into the
/// log, and a client could fill the audit disk, after which the server decides nothing and
/// open routes fail open. Headers past the budget are left out and counted.
pub const MAX_RECORDED_HEADER_BYTES: usize = 8 * 1024;
/// Headers recorded first, whatever their size rank: the ones `audit replay` and tracing read.
const RECORDED_FIRST: &[&str] = &["x-tenant-id", "traceparent", "x-request-id"];

/// Bounds `headers` to [`MAX_RECORDED_HEADER_BYTES`]: long values cut, then the headers in
/// [`RECORDED_FIRST`], then the others in name order while they fit. Returns how many were
/// left out.
fn cap_headers(headers: &mut BTreeMap<String, String>) -> u64 {
    for value in headers.values_mut() {
        if value.len() > MAX_RECORDED_HEADER_VALUE {
            let mut cut = MAX_RECORDED_HEADER_VALUE;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            let lost = value.len() - cut;
            value.truncate(cut);
            value.push_str(&format!("…[+{lost} bytes]"));
        }
    }
    let total: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total <= MAX_RECORDED_HEADER_BYTES {
        return 0;
    }
    let names: Vec<String> = RECORDED_FIRST
        .iter()
        .map(|n| (*n).to_owned())
        .filter(|n| headers.contains_key(n))
        .chain(
            headers
                .keys()
                .filter(|k| !RECORDED_FIRST.contains(&k.as_str()))
                .cloned(),
        )
        .collect();
    let mut used = 0;
    let mut omitted = 0;
    for name in names {
        let size = headers.get(&name).map_or(0, |v| name.len() + v.len());
        if used + size <= MAX_RECORDED_HEADER_BYTES {
            used += size;
        } else {
            headers.remove(&name);
            omitted += 1;
        }
    }
    omitted
}

/// Audit facts of one request; nothing here is secret.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// Headers without pseudo-headers, secret values replaced by [`REDACTED`].
    pub headers: BTreeMap<String, String>,
    /// The request's valid W3C `traceparent` header: its trace id goes into the record, and
    /// the decision's span continues it.
    pub trace: Option<TraceParent>,
    /// Headers left out to keep the record within [`MAX_RECORDED_HEADER_BYTES`].
    pub headers_omitted: u64,
}

fn http(check: &CheckRequest) -> Option<&HttpRequest> {
    match &check.attributes {
        Some(AttributeContext {
            request: Some(Request {
                http: Some(http), ..
            }),
            ..
        }) => Some(http),
        _ => None,
    }
}

/// A valid W3C `traceparent` (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// Trace id, 32 lowercase hex digits, not all zeros.
    pub trace_id: String,
    /// Id of the caller's span, 16 lowercase hex digits, not all zeros.
    pub parent_id: String,
    /// The caller's `sampled` flag.
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` when malformed or invalid per the spec (version
    /// `ff`, an all-zero trace or parent id, extra fields after a version-00 value).
    pub fn parse(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        let zeros = |s: &str| s.bytes().all(|b| b == b'0');
        // Version ff is invalid; later versions may append fields.
        if !hex(version, 2)
            || version.eq_ignore_ascii_case("ff")
            || (version == "00" && parts.next().is_some())
        {
            return None;
        }
        if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) || zeros(trace) || zeros(span) {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: trace.to_ascii_lowercase(),
            parent_id: span.to_ascii_lowercase(),
            sampled: flags & 1 == 1,
        })
    }
}

/// The trace id of a W3C `traceparent`, lowercase; `None` when it is not valid (see
/// [`TraceParent::parse`]).
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    TraceParent::parse(traceparent).map(|t| t.trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_allow_list_parses_and_keeps_iss_and_sub_always() {
        let policy = ["tenant", "groups"];
        let default = ClaimAllowList::parse(&[]).unwrap();
        for (claim, kept) in [
            ("iss", true),
            ("sub", true),
            ("tenant", true),
            ("groups", true),
            ("email", false),
            ("name", false),
        ] {
            assert_eq!(default.keeps(claim, &policy), kept, "{claim}");
        }
        let listed = ClaimAllowList::parse(&["email".into()]).unwrap();
        assert!(listed.keeps("email", &policy) && listed.keeps("sub", &policy));
        assert!(!listed.keeps("tenant", &policy));
        assert!(ClaimAllowList::parse(&["*".into()])
            .unwrap()
            .keeps("anything", &[]));
        for bad in [
            vec!["*".to_owned(), "email".to_owned()],
            vec![String::new()],
            vec!["a b".into()],
            vec!["x\u{0}".into()],
            vec!["c".repeat(257)],
        ] {
            assert!(ClaimAllowList::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn masking_counts_what_it_withholds_and_leaves_other_identities_alone() {
        let redactor = Redactor::default();
        let mut identity = Some(serde_json::json!({
            "source": "jwt",
            "jwt": {"iss": "i", "sub": "s", "groups": ["g"], "email": "e@x", "phone": "1"},
            "api_key_sha256": null,
        }));
        redactor.mask_identity(&mut identity, &["tenant", "groups"]);
        let identity = identity.unwrap();
        assert_eq!(
            identity["jwt"],
            serde_json::json!({"iss": "i", "sub": "s", "groups": ["g"]})
        );
        assert_eq!(identity["jwt_claims_withheld"], 2);
        let mut none = Some(serde_json::json!({"source": "mtls", "jwt": null}));
        let before = none.clone();
        redactor.mask_identity(&mut none, &["tenant", "groups"]);
        assert_eq!(none, before);
    }
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};

    fn check(headers: &[(&str, &str)], body: &[u8], size: i64) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        raw_body: body.to_vec(),
                        size,
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn redacts_secret_headers_and_drops_pseudo_headers() {
        let redactor = Redactor::new(["X-Tenant-Pin"]);
        let facts = redactor.facts(&check(
            &[
                (":path", "/v1/chat?key=sk-1"),
                ("authorization", "Bearer sk-live-1"),
                ("cookie", "sid=abc"),
                ("x-api-key", "sk-2"),
                ("x-goog-api-key", "g-3"),
                ("x-tenant-pin", "1234"),
                ("user-agent", "curl/8"),
            ],
            b"",
            0,
        ));
        assert_eq!(
            facts.headers,
            BTreeMap::from([
                ("authorization".into(), REDACTED.into()),
                ("cookie".into(), REDACTED.into()),
                ("user-agent".into(), "curl/8".into()),
                ("x-api-key".into(), REDACTED.into()),
                ("x-goog-api-key".into(), REDACTED.into()),
                ("x-tenant-pin".into(), REDACTED.into()),
            ])
        );
    }

    #[test]
    fn header_map_values_are_redacted_too() {
        let mut check = check(&[], b"", 0);
        let http = check
            .attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .http
            .as_mut()
            .unwrap();
        http.header_map = Some(HeaderMap {
            headers: vec![HeaderValue {
                key: "Authorization".into(),
                value: String::new(),
                raw_value: b"Bearer sk-raw".to_vec(),
            }],
        });
        let facts = Redactor::default().facts(&check);
        assert_eq!(facts.headers["authorization"], REDACTED);
    }

    #[test]
    fn trace_ids() {
        let tp = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id_of(tp).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        let facts = Redactor::default().facts(&check(&[("traceparent", tp)], b"", 0));
        assert_eq!(
            facts.trace,
            Some(TraceParent {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                parent_id: "00f067aa0ba902b7".into(),
                sampled: true,
            })
        );
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(
            TraceParent::parse(unsampled).map(|t| t.sampled),
            Some(false)
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(trace_id_of("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some());
    }

    /// Every credential query parameter, in every URL-valued header, in any case and
    /// percent-encoded, is replaced; the rest of the URL is kept.
    #[test]
    fn every_listed_query_key_is_redacted_in_every_url_header() {
        for key in REDACTED_QUERY_KEYS {
            for name in URL_HEADERS {
                let upper = key.to_ascii_uppercase();
                let encoded: String = key.bytes().map(|b| format!("%{b:02X}")).collect();
                for spelled in [key.to_string(), upper, encoded] {
                    let value = format!("/v1/chat?model=gpt&{spelled}=S3CRET-1&stream=true");
                    let facts = Redactor::default().facts(&check(&[(name, &value)], b"", 0));
                    assert_eq!(
                        facts.headers[*name],
                        format!("/v1/chat?model=gpt&{spelled}={REDACTED}&stream=true"),
                        "{name}: {value}"
                    );
                }
            }
        }
    }

    #[test]
    fn userinfo_query_and_fragment_of_urls_are_redacted() {
        let cases = [
            (
                "referer",
                "https://alice:pw-1@app.example/cb?state=x&code=S3CRET#access_token=S3CRET&t=1",
                "https://[redacted]@app.example/cb?state=x&code=[redacted]#access_token=[redacted]&t=1",
            ),
            // Any header whose value is a URL, whatever its name.
            (
                "x-callback",
                "http://u@h:8080/p?sig=S3CRET;a=1",
                "http://[redacted]@h:8080/p?sig=[redacted];a=1",
            ),
            // A request target with a query, whatever the header.
            (
                "x-upstream-target",
                "/models?api-key=S3CRET",
                "/models?api-key=[redacted]",
            ),
            // No credential: kept byte for byte.
            (
                "x-forwarded-uri",
                "/v1/chat?model=gpt&x=",
                "/v1/chat?model=gpt&x=",
            ),
            ("user-agent", "curl/8 (+http)", "curl/8 (+http)"),
            ("x-note", "a ?key=b", "a ?key=b"),
            // Only the authority holds userinfo: an `@` in the path is kept.
            ("referer", "https://h/@me?x=1", "https://h/@me?x=1"),
        ];
        for (name, value, expected) in cases {
            let facts = Redactor::default().facts(&check(&[(name, value)], b"", 0));
            assert_eq!(facts.headers[name], expected, "{name}: {value}");
        }
    }

    #[test]
    fn authority_userinfo_is_redacted() {
        assert_eq!(
            redact_authority("u:p@llm.local:443"),
            "[redacted]@llm.local:443"
        );
        assert_eq!(redact_authority("llm.local"), "llm.local");
    }

    /// The `:path` query is never a header of the record (pseudo-headers are left out) and
    /// a credential header beats URL parsing: the whole value goes.
    #[test]
    fn path_query_and_url_valued_secret_headers_never_reach_the_record() {
        let facts = Redactor::default().facts(&check(
            &[
                (":path", "/v1/chat?key=S3CRET"),
                ("x-auth-redirect", "https://h/?q=S3CRET"),
            ],
            b"",
            0,
        ));
        assert_eq!(
            facts.headers,
            BTreeMap::from([("x-auth-redirect".into(), REDACTED.into())])
        );
    }

    #[test]
    fn recorded_headers_are_bounded_and_keep_what_replay_reads() {
        let big = "v".repeat(900);
        let mut headers: Vec<(String, String)> = (0..60)
            .map(|i| (format!("x-filler-{i:02}"), big.clone()))
            .collect();
        headers.push(("x-tenant-id".into(), "acme".into()));
        headers.push(("zz-long".into(), "é".repeat(2000)));
        let pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let facts = Redactor::default().facts(&check(&pairs, b"", 0));
        let total: usize = facts.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total <= MAX_RECORDED_HEADER_BYTES, "{total}");
        assert_eq!(
            facts.headers["x-tenant-id"], "acme",
            "replay's header comes first"
        );
        assert_eq!(
            facts.headers_omitted as usize,
            62 - facts.headers.len(),
            "every left-out header is counted"
        );
        assert!(facts.headers_omitted > 0);

        // Small headers are untouched; one long value is cut at a character boundary.
        let long = "é".repeat(2000);
        let facts = Redactor::default().facts(&check(&[("a", "1"), ("b", long.as_str())], b"", 0));
        assert_eq!(facts.headers_omitted, 0);
        assert_eq!(facts.headers["a"], "1");
        let cut = &facts.headers["b"];
        assert!(cut.starts_with(&"é".repeat(512)));
        assert!(cut.ends_with("…[+2976 bytes]"), "{cut}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// The header-name check finds a credential part wherever `str::contains` does.
            #[test]
            fn prop_secret_name_parts_found_like_str_contains(
                name in "[a-z-]{0,6}(auth|key|token|sess|cook)?[a-zé-]{0,6}",
            ) {
                let redactor = Redactor::new(Vec::<String>::new());
                let by_str = ALWAYS_REDACTED.contains(&name.as_str())
                    || REDACTED_NAME_PARTS.iter().any(|part| name.contains(part));
                prop_assert_eq!(redactor.is_secret(&name), by_str);
                for part in REDACTED_NAME_PARTS {
                    prop_assert_eq!(
                        contains_bytes(name.as_bytes(), part.as_bytes()),
                        name.contains(part)
                    );
                }
            }

            /// Whatever headers a client sends, a record's headers stay within the budget,
            /// a small `x-tenant-id` is always kept, and every header is either kept or counted.
            #[test]
            fn prop_recorded_headers_stay_bounded(
                headers in prop::collection::vec(("[a-z-]{1,40}", ".{0,3000}"), 0..80),
                tenant in prop::option::of("[a-z0-9-]{1,64}"),
            ) {
                let mut all = headers.clone();
                if let Some(t) = &tenant {
                    all.push(("x-tenant-id".into(), t.clone()));
                }
                let pairs: Vec<(&str, &str)> =
                    all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let facts = Redactor::default().facts(&check(&pairs, b"", 0));
                let total: usize = facts.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
                prop_assert!(total <= MAX_RECORDED_HEADER_BYTES);
                if let Some(t) = &tenant {
                    prop_assert_eq!(&facts.headers["x-tenant-id"], t);
                }
                let distinct: std::collections::BTreeSet<&str> =
                    all.iter().map(|(k, _)| k.as_str()).collect();
                prop_assert_eq!(facts.headers.len() + facts.headers_omitted as usize, distinct.len());
            }

            /// Never panics, whatever the bytes (char boundaries, lone `%`, `@`, `?`, `#`).
            #[test]
            fn redaction_never_panics(value in any::<String>(), name in "[a-z:-]{0,20}") {
                let _ = redact_url(&value);
                let _ = redact_authority(&value);
                let _ = looks_like_url(&value);
                let _ = Redactor::default().facts(&check(&[(&name, &value)], b"", 0));
            }

            /// A listed key's value never survives, wherever the URL puts it: query or
            /// fragment, any case, between any other parameters and separators.
            #[test]
            fn a_listed_keys_value_never_survives(
                scheme in prop::option::of("[a-z][a-z0-9+.-]{0,6}"),
                userinfo in prop::option::of("[a-z0-9:._-]{0,12}"),
                host in "[a-z0-9.-]{1,12}",
                path in "(/[a-z0-9._~-]{0,8}){0,3}",
                before in prop::collection::vec(("[a-z0-9_]{1,6}", "[a-z0-9_]{0,6}"), 0..3),
                after in prop::collection::vec(("[a-z0-9_]{1,6}", "[a-z0-9_]{0,6}"), 0..3),
                key in prop::sample::select(REDACTED_QUERY_KEYS),
                upper in any::<bool>(),
                secret in "[A-Z]{8,16}",
                sep in prop::sample::select(&["&", ";"][..]),
                in_fragment in any::<bool>(),
                header in prop::sample::select(URL_HEADERS),
            ) {
                let pairs = |list: &[(String, String)]| {
                    list.iter().map(|(k, v)| format!("{k}={v}{sep}")).collect::<String>()
                };
                let key = if upper { key.to_ascii_uppercase() } else { key.to_string() };
                let params = format!("{}{key}={secret}{sep}{}", pairs(&before), pairs(&after));
                let mark = if in_fragment { "?a=b#" } else { "?" };
                let url = match (&scheme, &userinfo) {
                    (Some(scheme), Some(user)) => format!("{scheme}://{user}@{host}{path}{mark}{params}"),
                    (Some(scheme), None) => format!("{scheme}://{host}{path}{mark}{params}"),
                    (None, _) => format!("/{path}{mark}{params}"),
                };
                let redacted = redact_url(&url);
                prop_assert!(!redacted.contains(&secret), "{url} -> {redacted}");
                let facts = Redactor::default().facts(&check(&[(header, &url)], b"", 0));
                prop_assert!(!facts.headers[header].contains(&secret), "{url}");
                if let (Some(_), Some(user)) = (&scheme, &userinfo) {
                    if user.len() > 3 {
                        prop_assert!(!redacted.contains(&format!("{user}@")), "{url} -> {redacted}");
                    }
                }
            }
        }
    }
}
