//! Property tests of the server's parsers of untrusted input: the OpenAI-style body reader
//! ([`BodyAttributes::from_body`]) and the `CheckRequest` boundary
//! ([`AuthzRequest::try_from`]), up to a decision. Each must give a defined outcome for any
//! input, never a panic.
//!
//! Convention (shared with the filter's property tests): every property is a `#[test]` named
//! `prop_*` running `PROPTEST_CASES` cases (default 256, so `make test` runs them briefly;
//! `make fuzz` runs 1,000,000) and printing one line to stderr at the end:
//! `property <crate>::<name>: <N> cases passed`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use arbiter_policy_server::ai::BodyAttributes;
use arbiter_policy_server::engine::cedar_datetime;
use arbiter_policy_server::identity::{JWT_AUTHN_NAMESPACE, JWT_PAYLOAD_KEY};
use arbiter_policy_server::request::{request_time, MAX_CLOCK_SKEW};
use arbiter_policy_server::{AuthzRequest, PolicyEngine, RequestError, TimeSource};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, HeaderMap, HeaderValue, Metadata, Pipe,
    SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    AttributeContext, CheckRequest,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Timestamp, Value};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value as Json;

/// Cases per property: `PROPTEST_CASES`, else 256.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(256)
}

/// Runs `property` on a thread with a 64 MiB stack: the nested generators below need more
/// than a test thread's 2 MiB in debug builds (the code under test does not).
fn on_big_stack(property: impl FnOnce() + Send) {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn_scoped(scope, property)
            .unwrap();
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// Runs `test` on `cases()` values of `strategy`; panics with the minimal failing input, or
/// prints `property <crate>::<name>: <N> cases passed`.
fn check<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = Config {
        failure_persistence: None,
        ..Config::with_cases(cases())
    };
    let mut runner = TestRunner::new(config);
    let passed = Cell::new(0u64);
    let result = runner.run(&strategy, |value| {
        test(value)?;
        passed.set(passed.get() + 1);
        Ok(())
    });
    if let Err(e) = result {
        panic!("property {name} failed: {e}");
    }
    eprintln!(
        "property {}::{name}: {} cases passed",
        env!("CARGO_PKG_NAME").replace('-', "_"),
        passed.get()
    );
}

// --- the body reader -----------------------------------------------------------------------

/// The fields the reader looks at, and names close to them.
const BODY_KEYS: &[&str] = &[
    "model",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "messages",
    "Model",
    "input",
    "",
];

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::from),
        any::<u64>().prop_map(Json::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Json::from),
        ".{0,12}".prop_map(Json::String),
        prop_oneof![Just("gpt-4o"), Just("gpt-4o-mini"), Just("")]
            .prop_map(|s| Json::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Json::Array),
            proptest::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

/// A member name: one the reader knows, or any.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(BODY_KEYS).prop_map(str::to_owned),
        ".{0,8}",
    ]
}

/// A JSON object with the reader's fields (each absent, of the right type, or any value).
fn json_object() -> impl Strategy<Value = serde_json::Map<String, Json>> {
    let typed = |name: &'static str| -> BoxedStrategy<(&'static str, Option<Json>)> {
        let right: BoxedStrategy<Json> = match name {
            "model" => ".{0,12}".prop_map(Json::String).boxed(),
            "stream" => any::<bool>().prop_map(Json::Bool).boxed(),
            "max_tokens" | "max_completion_tokens" => any::<i64>().prop_map(Json::from).boxed(),
            _ => proptest::collection::vec(json_value(), 0..5)
                .prop_map(Json::Array)
                .boxed(),
        };
        proptest::option::of(prop_oneof![3 => right, 1 => json_value()])
            .prop_map(move |v| (name, v))
            .boxed()
    };
    (
        typed("model"),
        typed("stream"),
        typed("max_tokens"),
        typed("max_completion_tokens"),
        typed("messages"),
        proptest::collection::btree_map(".{0,8}", json_value(), 0..4),
    )
        .prop_map(|(a, b, c, d, e, others)| {
            let mut object: serde_json::Map<String, Json> = others.into_iter().collect();
            for (name, value) in [a, b, c, d, e] {
                match value {
                    Some(value) => object.insert(name.to_owned(), value),
                    None => object.remove(name),
                };
            }
            object
        })
}

/// What the reader must say about `object`, read as a `serde_json::Value`: the attributes,
/// or `None` for a parse error (a known field of the wrong type; `null` is absent).
#[allow(clippy::type_complexity)]
fn expected(
    object: &serde_json::Map<String, Json>,
) -> Option<(Option<String>, bool, Option<i64>, Option<i64>)> {
    // A key a provider may take for a known one (same letters, another case) is ambiguous.
    if object
        .keys()
        .any(|k| !BODY_FIELDS.contains(&k.as_str()) && folded(k).is_some())
    {
        return None;
    }
    let field = |name: &str| object.get(name).filter(|v| !v.is_null());
    let model = match field("model") {
        None => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(_) => return None,
    };
    let stream = match field("stream") {
        None => false,
        Some(Json::Bool(b)) => *b,
        Some(_) => return None,
    };
    let int = |name: &str| -> Result<Option<i64>, ()> {
        match field(name) {
            None => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or(()),
        }
    };
    let max_tokens = int("max_tokens").ok()?;
    let max_completion_tokens = int("max_completion_tokens").ok()?;
    let messages = match field("messages") {
        None => None,
        Some(Json::Array(items)) => Some(items.len() as i64),
        Some(_) => return None,
    };
    Some((
        model,
        stream,
        max_tokens.or(max_completion_tokens),
        messages,
    ))
}

/// Arbitrary bytes, and bytes that are almost JSON objects.
fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        json_object().prop_map(|o| serde_json::to_vec(&o).unwrap()),
        // A JSON object with bytes flipped, cut or appended.
        (
            json_object(),
            any::<prop::sample::Index>(),
            any::<u8>(),
            0..3u8
        )
            .prop_map(|(o, at, byte, how)| {
                let mut bytes = serde_json::to_vec(&o).unwrap();
                let i = at.index(bytes.len());
                match how {
                    0 => bytes[i] = byte,
                    1 => bytes.truncate(i),
                    _ => bytes.insert(i, byte),
                }
                bytes
            }),
    ]
}

/// Sizes the filter sends and sizes nobody should.
fn reported_size() -> impl Strategy<Value = i64> {
    prop_oneof![Just(-1i64), Just(0), 0..100_000i64, any::<i64>()]
}

#[test]
fn prop_body_reader_never_panics() {
    on_big_stack(|| {
        check(
            "prop_body_reader_never_panics",
            (body_bytes(), reported_size(), any::<bool>()),
            |(body, size, partial)| {
                let a = BodyAttributes::from_body(&body, size, partial);
                let received = body.len() as u64;
                prop_assert!(a.bytes >= received);
                if size >= 0 {
                    prop_assert!(a.size_known);
                    prop_assert_eq!(a.bytes, (size as u64).max(received));
                } else {
                    prop_assert_eq!(a.bytes, received);
                    prop_assert_eq!(a.size_known, received > 0 && !a.truncated);
                }
                // A body is cut only if the filter said so and it is shorter than its size.
                prop_assert!(!a.truncated || partial);
                if a.truncated && size >= 0 {
                    prop_assert!(received < size as u64);
                }
                prop_assert_eq!(a.sha256.is_some(), !body.is_empty());
                let attributes =
                    a.model.is_some() || a.max_tokens.is_some() || a.message_count.is_some();
                if a.truncated || a.parse_error || body.is_empty() {
                    prop_assert!(!attributes && a.stream.is_none());
                }
                prop_assert!(!(a.truncated && a.parse_error));
                Ok(())
            },
        );
    });
}

#[test]
fn prop_body_reader_agrees_with_serde_json_value() {
    on_big_stack(|| {
        check(
            "prop_body_reader_agrees_with_serde_json_value",
            (json_object(), any::<bool>()),
            |(object, pretty)| {
                let body = if pretty {
                    serde_json::to_vec_pretty(&object).unwrap()
                } else {
                    serde_json::to_vec(&object).unwrap()
                };
                let a = BodyAttributes::from_body(&body, body.len() as i64, false);
                prop_assert!(!a.truncated);
                prop_assert!(a.size_known);
                prop_assert_eq!(a.bytes, body.len() as u64);
                match expected(&object) {
                    Some((model, stream, max_tokens, messages)) => {
                        prop_assert!(!a.parse_error, "{}", String::from_utf8_lossy(&body));
                        prop_assert_eq!(a.model, model);
                        prop_assert_eq!(a.stream, Some(stream));
                        prop_assert_eq!(a.max_tokens, max_tokens);
                        prop_assert_eq!(a.message_count, messages);
                    }
                    None => {
                        prop_assert!(a.parse_error, "{}", String::from_utf8_lossy(&body));
                        prop_assert_eq!(a.model, None);
                    }
                }
                Ok(())
            },
        );
    });
}

/// The fields the body reader reads.
const BODY_FIELDS: [&str; 5] = [
    "model",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "messages",
];

/// The field `key` is to a parser that matches keys ignoring case with Unicode simple
/// folding (Go's `encoding/json`): `ſ` (U+017F) is `s`, the Kelvin sign (U+212A) is `k`.
fn folded(key: &str) -> Option<&'static str> {
    let lower: String = key
        .chars()
        .map(|c| match c {
            '\u{17f}' => 's',
            '\u{212a}' => 'k',
            c if c.is_ascii() => c.to_ascii_lowercase(),
            c => c,
        })
        .collect();
    BODY_FIELDS.iter().copied().find(|f| *f == lower)
}

/// `name` spelled another way a case-insensitive parser still reads as `name`: letters
/// flipped to upper case, `s` as `ſ` and `k` as the Kelvin sign, chosen by `mask` (never
/// `name` itself).
fn case_variant(name: &str, mask: u64) -> String {
    let variant: String = name
        .chars()
        .enumerate()
        .map(|(i, c)| match (c, (mask >> ((2 * i) % 64)) & 3) {
            ('s', 2) => '\u{17f}',
            ('k', 2) => '\u{212a}',
            (c, 1 | 2) => c.to_ascii_uppercase(),
            (c, _) => c,
        })
        .collect();
    if variant == name {
        name.to_ascii_uppercase()
    } else {
        variant
    }
}

#[test]
fn prop_body_reader_case_variants_of_known_keys_are_parse_errors() {
    on_big_stack(|| {
        check(
            "prop_body_reader_case_variants_of_known_keys_are_parse_errors",
            (
                proptest::sample::select(&BODY_FIELDS[..]),
                json_value(),
                any::<u64>(),
                any::<bool>(),
                json_object(),
                any::<prop::sample::Index>(),
            ),
            |(name, value, mask, escape, others, at)| {
                // The variant alone, or beside the field itself, anywhere among the others.
                let variant = case_variant(name, mask);
                prop_assert_eq!(folded(&variant), Some(name));
                let mut members: Vec<String> = others
                    .iter()
                    .map(|(k, v)| format!("{}:{}", Json::String(k.clone()), v))
                    .collect();
                let spelled = if escape {
                    escaped(&variant, mask)
                } else {
                    variant.clone()
                };
                members.insert(
                    at.index(members.len() + 1),
                    format!("\"{spelled}\":{value}"),
                );
                let body = format!("{{{}}}", members.join(","));
                let a = BodyAttributes::from_body(body.as_bytes(), body.len() as i64, false);
                prop_assert!(a.parse_error, "{}", body);
                prop_assert_eq!(a.model, None);
                prop_assert_eq!(a.stream, None);
                Ok(())
            },
        );
    });
}

/// `name` with some characters written as `\uXXXX` escapes (the same member to a parser).
fn escaped(name: &str, mask: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask & (1 << (i % 64)) != 0 {
                format!("\\u{:04x}", c as u32)
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[test]
fn prop_body_reader_duplicate_keys_are_parse_errors() {
    on_big_stack(|| {
        const KNOWN: &[&str] = &[
            "model",
            "stream",
            "max_tokens",
            "max_completion_tokens",
            "messages",
        ];
        check(
            "prop_body_reader_duplicate_keys_are_parse_errors",
            (
                proptest::sample::select(KNOWN),
                json_value(),
                json_value(),
                any::<u64>(),
                json_object(),
                any::<prop::sample::Index>(),
            ),
            |(name, first, second, mask, others, at)| {
                // Members as text, with `name` twice (once possibly escaped) somewhere among them.
                let mut members: Vec<String> = others
                    .iter()
                    .filter(|(k, _)| k.as_str() != name)
                    .map(|(k, v)| format!("{}:{}", Json::String(k.clone()), v))
                    .collect();
                members.push(format!("\"{name}\":{first}"));
                let i = at.index(members.len() + 1);
                members.insert(i, format!("\"{}\":{second}", escaped(name, mask)));
                let body = format!("{{{}}}", members.join(","));
                let a = BodyAttributes::from_body(body.as_bytes(), body.len() as i64, false);
                prop_assert!(a.parse_error, "{}", body);
                prop_assert_eq!(a.model, None);
                prop_assert_eq!(a.stream, None);
                Ok(())
            },
        );
    });
}

// --- the CheckRequest boundary --------------------------------------------------------------

/// Strings an attacker would try: empty, long, control characters, `?` and `#`, non-ASCII.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,16}",
        "[/?#a-z0-9%&=.:\\[\\]@-]{0,24}",
        Just(String::new()),
        "\\PC{0,4}\\?\\PC{0,8}",
    ]
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "x-api-key",
                "X-Api-Key",
                "x-tenant-id",
                "x-envoy-auth-partial-body",
                "traceparent",
                "authorization",
                ":path",
                "content-length",
            ][..]
        )
        .prop_map(str::to_owned),
        text(),
    ]
}

fn headers() -> impl Strategy<Value = HashMap<String, String>> {
    proptest::collection::hash_map(
        header_name(),
        prop_oneof![Just("true".to_owned()), Just("TRUE".to_owned()), text()],
        0..6,
    )
}

fn header_map() -> impl Strategy<Value = Option<HeaderMap>> {
    proptest::option::of(
        proptest::collection::vec(
            (
                header_name(),
                text(),
                proptest::collection::vec(any::<u8>(), 0..12),
            )
                .prop_map(|(key, value, raw_value)| HeaderValue {
                    key,
                    value,
                    raw_value,
                }),
            0..4,
        )
        .prop_map(|headers| HeaderMap { headers }),
    )
}

fn address() -> impl Strategy<Value = Option<Address>> {
    let ip = prop_oneof![
        any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
        any::<std::net::Ipv6Addr>().prop_map(|ip| ip.to_string()),
        any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_ipv6_mapped().to_string()),
        any::<std::net::Ipv4Addr>().prop_map(|ip| format!("::{ip}")),
        text(),
    ];
    let port = proptest::option::of(prop_oneof![
        any::<u32>().prop_map(PortSpecifier::PortValue),
        text().prop_map(PortSpecifier::NamedPort),
    ]);
    proptest::option::of(prop_oneof![
        4 => (ip, port).prop_map(|(address, port_specifier)| {
            address::Address::SocketAddress(SocketAddress {
                address,
                port_specifier,
                ..Default::default()
            })
        }),
        1 => text().prop_map(|path| address::Address::Pipe(Pipe { path, mode: 0 })),
    ])
    .prop_map(|address| {
        address.map(|address| Address {
            address: Some(address),
        })
    })
}

/// A protobuf `Value`, a few levels deep (JWT claims arrive as these).
fn proto_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Kind::NullValue(0)),
        any::<bool>().prop_map(Kind::BoolValue),
        any::<f64>().prop_map(Kind::NumberValue),
        text().prop_map(Kind::StringValue),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        let value = inner.prop_map(|kind| Value { kind: Some(kind) });
        prop_oneof![
            proptest::collection::vec(value.clone(), 0..4)
                .prop_map(|values| Kind::ListValue(ListValue { values })),
            proptest::collection::btree_map(text(), value, 0..4).prop_map(|fields| {
                Kind::StructValue(Struct {
                    fields: fields.into_iter().collect(),
                })
            }),
        ]
    })
    .prop_map(|kind| Value { kind: Some(kind) })
}

/// `jwt_authn` metadata with claims that look like a caller's, or anything.
fn metadata() -> impl Strategy<Value = Option<Metadata>> {
    let claim = |names: &'static [&'static str]| {
        (proptest::sample::select(names), proto_value()).prop_map(|(k, v)| (k.to_owned(), v))
    };
    let claims =
        proptest::collection::btree_map(text(), proto_value(), 0..3).prop_flat_map(move |others| {
            proptest::collection::vec(claim(&["sub", "iss", "tenant", "groups"]), 0..5).prop_map(
                move |known| {
                    let mut fields: BTreeMap<String, Value> = others.clone();
                    fields.extend(known);
                    Struct {
                        fields: fields.into_iter().collect(),
                    }
                },
            )
        });
    proptest::option::of((claims, any::<bool>()).prop_map(|(claims, nested)| {
        let payload = if nested {
            Struct {
                fields: [(
                    JWT_PAYLOAD_KEY.to_owned(),
                    Value {
                        kind: Some(Kind::StructValue(claims)),
                    },
                )]
                .into_iter()
                .collect(),
            }
        } else {
            claims
        };
        Metadata {
            filter_metadata: [(JWT_AUTHN_NAMESPACE.to_owned(), payload)]
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }))
}

/// Timestamps near now, and any.
fn timestamp() -> impl Strategy<Value = Option<Timestamp>> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    proptest::option::of(
        prop_oneof![
            ((now - 600)..(now + 600), 0..1_000_000_000i32),
            (any::<i64>(), any::<i32>()),
            (
                prop_oneof![Just(253_402_300_800i64), Just(-62_135_596_800), Just(0)],
                any::<i32>()
            ),
        ]
        .prop_map(|(seconds, nanos)| Timestamp { seconds, nanos }),
    )
}

fn http_request() -> impl Strategy<Value = HttpRequest> {
    (
        (
            text(),
            prop_oneof![
                proptest::sample::select(&["GET", "POST", "DELETE", ""][..])
                    .prop_map(str::to_owned),
                text(),
            ],
            prop_oneof![
                proptest::sample::select(
                    &[
                        "/v1/chat/completions",
                        "/v1/chat/completions?key=secret",
                        "/v1/models/x?y",
                        "?",
                        ""
                    ][..]
                )
                .prop_map(str::to_owned),
                text(),
            ],
            text(),
            text(),
        ),
        (headers(), header_map()),
        (
            reported_size(),
            prop_oneof![Just(String::new()), text()],
            prop_oneof![Just(Vec::new()), body_bytes()],
        ),
    )
        .prop_map(
            |((id, method, path, host, scheme), (headers, header_map), (size, body, raw_body))| {
                HttpRequest {
                    id,
                    method,
                    headers,
                    header_map,
                    path,
                    host,
                    scheme,
                    size,
                    body,
                    raw_body,
                    ..Default::default()
                }
            },
        )
}

fn context_extensions() -> impl Strategy<Value = HashMap<String, String>> {
    proptest::collection::hash_map(
        prop_oneof![
            proptest::sample::select(
                &[
                    "route",
                    "action",
                    "classification",
                    "body_policy",
                    "size_policy"
                ][..]
            )
            .prop_map(str::to_owned),
            text(),
        ],
        text(),
        0..4,
    )
}

/// Any CheckRequest, with every part sometimes missing.
fn check_request() -> impl Strategy<Value = CheckRequest> {
    let peer = (address(), text()).prop_map(|(address, principal)| Peer {
        address,
        principal,
        ..Default::default()
    });
    let request = (timestamp(), proptest::option::of(http_request()))
        .prop_map(|(time, http)| Request { time, http });
    let attributes = (
        proptest::option::of(peer),
        proptest::option::weighted(0.95, request),
        context_extensions(),
        metadata(),
    )
        .prop_map(
            |(source, request, context_extensions, metadata_context)| AttributeContext {
                source,
                request,
                context_extensions,
                metadata_context,
                ..Default::default()
            },
        );
    proptest::option::weighted(0.95, attributes).prop_map(|attributes| CheckRequest { attributes })
}

/// The error `check` must give, if any: exactly the part it lacks.
fn missing_part(check: &CheckRequest) -> Option<RequestError> {
    let Some(attributes) = &check.attributes else {
        return Some(RequestError::MissingAttributes);
    };
    let Some(request) = &attributes.request else {
        return Some(RequestError::MissingRequest);
    };
    request.http.is_none().then_some(RequestError::MissingHttp)
}

#[test]
fn prop_check_request_conversion_never_panics() {
    on_big_stack(|| {
        check(
            "prop_check_request_conversion_never_panics",
            check_request(),
            |check| {
                let missing = missing_part(&check);
                let stated_path = check
                    .attributes
                    .as_ref()
                    .and_then(|a| a.request.as_ref())
                    .and_then(|r| r.http.as_ref())
                    .map(|h| h.path.clone());
                let before = SystemTime::now();
                let result = AuthzRequest::try_from(check);
                let after = SystemTime::now();
                match (result, missing) {
                    (Err(e), Some(missing)) => prop_assert_eq!(e, missing),
                    (Err(e), None) => prop_assert!(false, "refused a complete request: {}", e),
                    (Ok(_), Some(missing)) => prop_assert!(false, "accepted without {}", missing),
                    (Ok(req), None) => {
                        prop_assert!(!req.path.contains('?'), "{}", req.path);
                        let stated_path = stated_path.unwrap_or_default();
                        prop_assert!(stated_path.starts_with(&req.path));
                        // Policy's time is the server's or within the skew of it.
                        prop_assert!(req.time <= after + MAX_CLOCK_SKEW);
                        prop_assert!(req.time + MAX_CLOCK_SKEW >= before);
                        if req.time_source != TimeSource::Request {
                            prop_assert!(req.time >= before && req.time <= after);
                        }
                        let text = cedar_datetime(req.time);
                        prop_assert_eq!(text.len(), "2026-11-22T07:00:00.123Z".len());
                    }
                }
                Ok(())
            },
        );
    });
}

#[test]
fn prop_request_time_never_panics_and_stays_near_the_server_clock() {
    on_big_stack(|| {
        check(
            "prop_request_time_never_panics_and_stays_near_the_server_clock",
            (
                timestamp(),
                prop_oneof![
                    Just(0u64),
                    0..4_000_000_000u64,
                    Just(253_402_300_799u64),
                    any::<u32>().prop_map(u64::from)
                ],
            ),
            |(stated, received)| {
                let received = SystemTime::UNIX_EPOCH + Duration::from_secs(received);
                let (at, source) = request_time(stated.as_ref(), received);
                match source {
                    TimeSource::Request => {
                        let skew = at.duration_since(received).unwrap_or_else(|e| e.duration());
                        prop_assert!(skew <= MAX_CLOCK_SKEW);
                    }
                    TimeSource::Receipt => {
                        prop_assert!(stated.is_none());
                        prop_assert_eq!(at, received);
                    }
                    TimeSource::Untrusted => prop_assert_eq!(at, received),
                }
                let text = cedar_datetime(at);
                prop_assert_eq!(text.len(), 24);
                Ok(())
            },
        );
    });
}

#[test]
fn prop_any_complete_request_is_decided() {
    on_big_stack(|| {
        let engine = PolicyEngine::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../examples/ai-gateway/policies"),
        )
        .unwrap();
        check(
            "prop_any_complete_request_is_decided",
            check_request(),
            |check| {
                let Ok(req) = AuthzRequest::try_from(check) else {
                    return Ok(());
                };
                // Whatever the request holds, Cedar can express it: an answer, never an error.
                match engine.decide(&req) {
                    Ok(_) => Ok(()),
                    Err(e) => Err(TestCaseError::fail(format!("{e}: {req:?}"))),
                }
            },
        );
    });
}

// --- `arbiter fmt` ---------------------------------------------------------------------------

/// A Cedar expression, as tokens (never split by the layout below).
fn cedar_expr() -> impl Strategy<Value = Vec<String>> {
    let leaf = prop_oneof![
        Just("true"),
        Just("false"),
        Just("1"),
        Just("-7"),
        Just("\"acme\""),
        Just("\"http://a // not a comment\""),
        Just("context.model"),
        Just("context.route_context.classification"),
        Just("principal.tenant"),
        Just("Arbiter::Group::\"premium-models\""),
        Just("ip(\"10.0.0.1\")"),
    ]
    .prop_map(|t| vec![t.to_owned()]);
    leaf.prop_recursive(3, 16, 3, |inner| {
        let two = (inner.clone(), inner.clone());
        prop_oneof![
            (
                inner.clone(),
                prop_oneof![
                    Just("&&"),
                    Just("||"),
                    Just("=="),
                    Just("<"),
                    Just("+"),
                    Just("in")
                ],
                inner.clone()
            )
                .prop_map(|(a, op, b)| [a, vec![op.to_owned()], b].concat()),
            inner.clone().prop_map(|a| [
                vec!["!".to_owned(), "(".to_owned()],
                a,
                vec![")".to_owned()]
            ]
            .concat()),
            inner
                .clone()
                .prop_map(|a| [vec!["(".to_owned()], a, vec![")".to_owned()]].concat()),
            inner
                .clone()
                .prop_map(|a| [a, vec!["has".to_owned(), "model".to_owned()]].concat()),
            (inner.clone(), two.clone()).prop_map(|(c, (a, b))| {
                [
                    vec!["if".to_owned()],
                    c,
                    vec!["then".to_owned()],
                    a,
                    vec!["else".to_owned()],
                    b,
                ]
                .concat()
            }),
            two.prop_map(|(a, b)| {
                [
                    vec!["[".to_owned()],
                    a,
                    vec![
                        ",".to_owned(),
                        "\"x\"".to_owned(),
                        "]".to_owned(),
                        ".".to_owned(),
                        "contains".to_owned(),
                        "(".to_owned(),
                    ],
                    b,
                    vec![")".to_owned()],
                ]
                .concat()
            }),
        ]
    })
}

/// A policy file: policies of any scope and conditions, as tokens.
fn cedar_policies() -> impl Strategy<Value = Vec<String>> {
    let scope = (
        prop_oneof![
            Just("principal"),
            Just("principal == Arbiter::Caller::\"acme-batch\""),
            Just("principal in Arbiter::Group::\"regulated-approved\""),
            Just("principal is Arbiter::Anonymous"),
        ],
        prop_oneof![
            Just("action"),
            Just("action == Arbiter::Action::\"chat.completions\""),
            Just("action in [Arbiter::Action::\"embeddings\", Arbiter::Action::\"models.list\"]"),
        ],
        prop_oneof![
            Just("resource"),
            Just("resource == Arbiter::Route::\"chat\"")
        ],
    );
    let policy = (
        proptest::option::of(0u8..50),
        prop_oneof![Just("permit"), Just("forbid")],
        scope,
        proptest::collection::vec((any::<bool>(), cedar_expr()), 0..3),
    )
        .prop_map(|(id, effect, (p, a, r), conditions)| {
            let mut tokens = Vec::new();
            if let Some(id) = id {
                tokens.push(format!("@id(\"p{id}\")"));
            }
            tokens.extend([effect, "(", p, ",", a, ",", r, ")"].map(str::to_owned));
            for (when, expr) in conditions {
                tokens.push(if when { "when" } else { "unless" }.to_owned());
                tokens.push("{".to_owned());
                tokens.extend(expr);
                tokens.push("}".to_owned());
            }
            tokens.push(";".to_owned());
            tokens
        });
    proptest::collection::vec(policy, 1..4).prop_map(|policies| policies.concat())
}

/// `tokens` laid out with `layout` choosing each separator: spaces, tabs, newlines and
/// comments, as people write them.
fn lay_out(tokens: &[String], layout: &[u8]) -> String {
    const SEPARATORS: &[&str] = &[
        " ",
        " ",
        "\n",
        "  ",
        "\t",
        " // a comment\n",
        "\n\n",
        "\n// line\n  ",
    ];
    let mut text = String::from("// header\n");
    for (i, token) in tokens.iter().enumerate() {
        text.push_str(token);
        let choice = layout.get(i % layout.len().max(1)).copied().unwrap_or(0);
        text.push_str(SEPARATORS[usize::from(choice) % SEPARATORS.len()]);
    }
    text
}

#[test]
fn prop_fmt_keeps_meaning() {
    use arbiter_policy_server::cli::fmt::{format_text, policy_json};
    on_big_stack(|| {
        check(
            "prop_fmt_keeps_meaning",
            (
                cedar_policies(),
                proptest::collection::vec(any::<u8>(), 1..64),
            ),
            |(tokens, layout)| {
                let text = lay_out(&tokens, &layout);
                let Ok(meaning) = policy_json(&text) else {
                    // Not every generated expression parses (e.g. `1 in 2 in 3` does); those
                    // are `prop_fmt_never_touches_what_it_cannot_parse`'s business.
                    return Ok(());
                };
                let formatted =
                    format_text(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
                prop_assert_eq!(policy_json(&formatted).unwrap(), meaning, "{}", text);
                prop_assert_eq!(
                    format_text(&formatted).unwrap(),
                    formatted.clone(),
                    "not idempotent"
                );
                // Comments survive.
                prop_assert!(formatted.contains("// header"), "{}", formatted);
                Ok(())
            },
        );
    });
}

#[test]
fn prop_fmt_never_touches_what_it_cannot_parse() {
    use arbiter_policy_server::cli::fmt::{format_text, policy_json};
    on_big_stack(|| {
        check(
            "prop_fmt_never_touches_what_it_cannot_parse",
            (
                cedar_policies(),
                proptest::collection::vec(any::<u8>(), 1..64),
                any::<usize>(),
                ".{0,3}",
            ),
            |(tokens, layout, at, junk)| {
                // A valid-looking file with a few characters inserted anywhere.
                let mut text = lay_out(&tokens, &layout);
                let mut at = at % (text.len() + 1);
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                text.insert_str(at, &junk);
                match (policy_json(&text), format_text(&text)) {
                    (Ok(meaning), Ok(formatted)) => {
                        prop_assert_eq!(policy_json(&formatted).unwrap(), meaning);
                    }
                    (Err(_), Ok(formatted)) => {
                        return Err(TestCaseError::fail(format!(
                            "formatted text Cedar does not parse:\n{text}\n->\n{formatted}"
                        )));
                    }
                    (_, Err(_)) => {}
                }
                Ok(())
            },
        );
    });
}
