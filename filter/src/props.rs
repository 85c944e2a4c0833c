//! Property tests of every parser of untrusted or operator input in the filter: the plugin
//! configuration, route metadata, the policy server's `CheckResponse`, and the request state
//! machine fed arbitrary client behaviour. Each must never panic (a panic aborts the VM of
//! a whole worker) and always reach a defined, never-weaker outcome.
//!
//! `PROPTEST_CASES` sets the case count (default 256, the short run of `make test`);
//! `make fuzz` runs each for 1,000,000. Each test prints one `property ...: N cases passed`
//! line.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;
use prost_types::value::Kind;
use serde_json::{json, Value as Json};

use arbiter_proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption, Metadata};
use arbiter_proto::envoy::service::auth::v3::{
    check_response::HttpResponse, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use arbiter_proto::google::rpc::Status;

use crate::check::is_reserved_header;
use crate::config::{FailMode, FilterConfig};
use crate::filter::{Filter, Flow, Shared, DRY_RUN_HEADER, FAIL_OPEN_HEADER};
use crate::host::{Metric, Outcome};
use crate::outcome::{decode_response, Verdict};
use crate::route::{RouteSettings, MAX_OVERRIDE_AHEAD};
use crate::tests::MockHost;

/// Cases per property: `PROPTEST_CASES`, else 256.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Runs `test` over `strategy` for [`cases`] cases and reports the count.
fn check<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let ran = Cell::new(0u64);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |value| {
        ran.set(ran.get() + 1);
        test(value)
    });
    if let Err(e) = result {
        panic!("property {name} failed: {e:?}");
    }
    eprintln!(
        "property arbiter-filter::{name}: {} cases passed",
        ran.get()
    );
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)),
        ".{0,12}".prop_map(Json::String),
        prop_oneof![
            Just("closed"),
            Just("open"),
            Just("2026-11-22T06:00:00Z"),
            Just("1969-12-31T23:59:59Z"),
            Just("9999-12-31T23:59:59Z"),
            Just("x-api-key"),
        ]
        .prop_map(|s| Json::String(s.to_owned())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Json::Array),
            btree_map(".{0,8}", inner, 0..4).prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

const PLUGIN_FIELDS: &[&str] = &[
    "policy_cluster",
    "timeout_ms",
    "fail_mode",
    "status_on_error",
    "metadata_namespace",
    "metadata_namespaces",
    "breaker_threshold",
    "breaker_cooldown_ms",
    "breaker_cooldown_max_ms",
    "breaker_probes",
    "cache_max_entries",
    "credential_headers",
    "unknown_field",
];

const ROUTE_FIELDS: &[&str] = &[
    "fail_mode",
    "timeout_ms",
    "fail_open_until",
    "status_on_error",
    "include_body",
    "max_body_bytes",
    "cache_ttl_ms",
    "disabled",
    "context",
    "dry_run",
    "fail_mdoe",
];

/// Objects whose keys are mostly the known fields, with any values.
fn object_with(fields: &'static [&'static str]) -> impl Strategy<Value = Json> {
    btree_map(
        prop_oneof![
            4 => proptest::sample::select(fields).prop_map(str::to_owned),
            1 => ".{0,8}",
        ],
        json_value(),
        0..8,
    )
    .prop_map(|m| Json::Object(m.into_iter().collect()))
}

#[test]
fn prop_plugin_config_is_valid_or_refused() {
    check(
        "prop_plugin_config_is_valid_or_refused",
        prop_oneof![
            vec(any::<u8>(), 0..64).boxed(),
            object_with(PLUGIN_FIELDS)
                .prop_map(|v| v.to_string().into_bytes())
                .boxed(),
        ],
        |bytes| {
            match FilterConfig::parse(&bytes) {
                Ok(c) => {
                    prop_assert!(!c.policy_cluster.trim().is_empty());
                    prop_assert!((1..=crate::config::MAX_TIMEOUT_MS)
                        .contains(&(c.timeout.as_millis() as u64)));
                    prop_assert!((400..=599).contains(&c.status_on_error));
                    prop_assert!(!c.metadata_namespace.is_empty());
                    let max = Duration::from_millis(crate::config::MAX_BREAKER_COOLDOWN_MS);
                    prop_assert!(c.breaker.cooldown >= Duration::from_millis(1));
                    prop_assert!(c.breaker.cooldown <= c.breaker.cooldown_max);
                    prop_assert!(c.breaker.cooldown_max <= max);
                    for h in &c.credential_headers {
                        prop_assert!(!h.is_empty() && !is_reserved_header(h));
                        prop_assert_eq!(h, &h.to_ascii_lowercase());
                    }
                    // Valid configurations round-trip: what was accepted parses the same again.
                    let v: Json = serde_json::from_slice(&bytes)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(FilterConfig::parse(v.to_string().as_bytes()), Ok(c));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        },
    );
}

fn to_value(v: &Json) -> prost_types::Value {
    let kind = match v {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Json::Object(m) => Kind::StructValue(prost_types::Struct {
            fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

fn route_metadata(v: &Json) -> Vec<u8> {
    let mut md = Metadata::default();
    if let Json::Object(m) = v {
        md.filter_metadata.insert(
            "arbiter".into(),
            prost_types::Struct {
                fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
            },
        );
    }
    md.encode_to_vec()
}

fn instant() -> impl Strategy<Value = SystemTime> {
    (0u64..8_000_000_000).prop_map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

#[test]
fn prop_route_metadata_never_weakens_enforcement() {
    let defaults = FilterConfig::parse(br#"{"policy_cluster":"p","fail_mode":"open"}"#)
        .map_err(|e| e.to_string());
    let Ok(defaults) = defaults else {
        panic!("defaults: {defaults:?}")
    };
    check(
        "prop_route_metadata_never_weakens_enforcement",
        (
            prop_oneof![
                vec(any::<u8>(), 0..64).boxed(),
                object_with(ROUTE_FIELDS)
                    .prop_map(|v| route_metadata(&v))
                    .boxed(),
            ],
            instant(),
            0u64..200_000,
        ),
        |(bytes, loaded, later)| {
            let settings =
                RouteSettings::from_metadata_bytes(Some(&bytes), "arbiter").judge_at_load(loaded);
            let now = loaded + Duration::from_secs(later);
            let r = settings.resolve(&defaults, now);
            if !settings.problems.is_empty() {
                // Invalid: the secure defaults, whatever the fields or the plugin default.
                prop_assert!(r.invalid);
                prop_assert_eq!(r.fail_mode, FailMode::Closed);
                prop_assert!(!r.override_active && !r.disabled);
                prop_assert_eq!(r.cache_ttl, None);
                prop_assert_eq!(r.timeout, defaults.timeout);
            } else {
                prop_assert!(!r.invalid);
            }
            if r.override_active {
                // Only a live override, never more than 24 h ahead of when it was loaded.
                let until = settings.fail_open_until.unwrap_or(SystemTime::UNIX_EPOCH);
                prop_assert!(now < until);
                prop_assert!(
                    until.duration_since(loaded).unwrap_or_default() <= MAX_OVERRIDE_AHEAD
                );
            }
            // The same bytes always mean the same settings.
            let again =
                RouteSettings::from_metadata_bytes(Some(&bytes), "arbiter").judge_at_load(loaded);
            prop_assert_eq!(again, settings);
            Ok(())
        },
    );
}

fn header_option() -> impl Strategy<Value = HeaderValueOption> {
    (".{0,10}", ".{0,10}", vec(any::<u8>(), 0..6), any::<i32>()).prop_map(
        |(key, value, raw_value, action)| HeaderValueOption {
            header: Some(HeaderValue {
                key,
                value,
                raw_value,
            }),
            append_action: action % 4,
            ..Default::default()
        },
    )
}

fn check_response() -> impl Strategy<Value = CheckResponse> {
    let status = proptest::option::of((prop_oneof![Just(0i32), Just(7), any::<i32>()], ".{0,10}"))
        .prop_map(|s| {
            s.map(|(code, message)| Status {
                code,
                message,
                details: vec![],
            })
        });
    let http = proptest::option::of(prop_oneof![
        (
            vec(header_option(), 0..3),
            vec(".{0,8}", 0..3),
            vec(header_option(), 0..3)
        )
            .prop_map(|(headers, headers_to_remove, response_headers_to_add)| {
                HttpResponse::OkResponse(OkHttpResponse {
                    headers,
                    headers_to_remove,
                    response_headers_to_add,
                    ..Default::default()
                })
            }),
        (any::<i32>(), vec(header_option(), 0..3), ".{0,16}").prop_map(|(code, headers, body)| {
            HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(arbiter_proto::envoy::r#type::v3::HttpStatus { code }),
                headers,
                body,
            })
        }),
    ]);
    (status, http).prop_map(|(status, http_response)| CheckResponse {
        status,
        http_response,
        dynamic_metadata: None,
    })
}

#[test]
fn prop_check_response_decodes_to_one_defined_verdict() {
    check(
        "prop_check_response_decodes_to_one_defined_verdict",
        prop_oneof![
            vec(any::<u8>(), 0..96).boxed(),
            check_response().prop_map(|r| r.encode_to_vec()).boxed(),
        ],
        |bytes| {
            let verdict = decode_response(&bytes);
            match CheckResponse::decode(bytes.as_slice()) {
                Err(_) => prop_assert!(matches!(verdict, Verdict::NoDecision(_))),
                Ok(resp) => match (&resp.status, &verdict) {
                    // No status is no answer, never an allow.
                    (None, v) => prop_assert!(matches!(v, Verdict::NoDecision(_))),
                    (Some(s), Verdict::Allow { headers, .. }) => {
                        prop_assert_eq!(s.code, 0);
                        if let Some(HttpResponse::OkResponse(ok)) = &resp.http_response {
                            prop_assert_eq!(
                                headers.len(),
                                ok.headers.iter().filter(|h| h.header.is_some()).count()
                            );
                        }
                    }
                    (Some(s), Verdict::Deny { status, body, .. }) => {
                        prop_assert!(s.code != 0);
                        prop_assert!((200..=599).contains(status));
                        prop_assert!(!body.is_empty());
                    }
                    // OK with a denied body is contradictory: no decision.
                    (Some(s), Verdict::NoDecision(_)) => prop_assert_eq!(s.code, 0),
                },
            }
            Ok(())
        },
    );
}

/// One thing a client, Envoy or the policy server does to a request.
#[derive(Debug, Clone)]
enum Event {
    Body { chunk: usize, end: bool },
    Trailers,
    Answer { status: u32, body: Option<Vec<u8>> },
    End,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (0usize..300, any::<bool>()).prop_map(|(chunk, end)| Event::Body { chunk, end }),
        Just(Event::Trailers),
        (
            prop_oneof![Just(0u32), Just(3), Just(4), Just(14), any::<u32>()],
            proptest::option::of(prop_oneof![
                check_response().prop_map(|r| r.encode_to_vec()),
                vec(any::<u8>(), 0..32),
            ])
        )
            .prop_map(|(status, body)| Event::Answer { status, body }),
        // The server's own deny, with the audit id a dry-run route forwards.
        ".{0,40}".prop_map(|audit_id| Event::Answer {
            status: 0,
            body: Some(
                CheckResponse {
                    status: Some(Status {
                        code: 7,
                        message: "denied".into(),
                        details: vec![],
                    }),
                    http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                        status: None,
                        headers: vec![],
                        body: json!({"error": {"type": "policy_denied", "audit_id": audit_id}})
                            .to_string(),
                    })),
                    dynamic_metadata: None,
                }
                .encode_to_vec()
            ),
        }),
        Just(Event::End),
    ]
}

fn client_header() -> impl Strategy<Value = (String, Vec<u8>)> {
    (
        prop_oneof![
            Just("x-arbiter-fail-open".to_owned()),
            Just("X-Arbiter-Audit-Id".to_owned()),
            Just("x-arbiter-dry-run".to_owned()),
            Just("x-envoy-auth-partial-body".to_owned()),
            Just("x-api-key".to_owned()),
            Just("content-length".to_owned()),
            Just("x-request-id".to_owned()),
            "[a-z-]{1,12}",
        ],
        vec(any::<u8>(), 0..12),
    )
}

#[test]
fn prop_request_state_machine_has_one_outcome_and_never_leaks() {
    check(
        "prop_request_state_machine_has_one_outcome_and_never_leaks",
        (
            prop_oneof![
                3 => object_with(ROUTE_FIELDS),
                // Dry-run routes (with and without the body, and one invalid), so denies
                // let through are exercised as often as refused ones.
                1 => proptest::sample::select(vec![
                    json!({"dry_run": true}),
                    json!({"dry_run": true, "fail_mode": "open", "cache_ttl_ms": 1000}),
                    json!({"dry_run": true, "include_body": true, "max_body_bytes": 64}),
                    // Invalid: enforces, so its denies are refused.
                    json!({"dry_run": true, "fail_mode": "sometimes"}),
                ]),
            ],
            vec(client_header(), 0..6),
            any::<bool>(),
            vec(event(), 0..6),
            vec(any::<u8>(), 0..400),
        ),
        |(route, client_headers, end_of_stream, events, body)| {
            let config = FilterConfig::parse(br#"{"policy_cluster":"p","breaker_threshold":2}"#)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let shared = Rc::new(Shared::new(config));
            let host = MockHost::default();
            host.set_request(&client_headers, route_metadata(&route), body.clone());
            let mut filter = Filter::new(host.clone(), shared);
            let mut released = filter.on_request_headers(end_of_stream) == Flow::Continue;
            let mut received = 0usize;
            for e in &events {
                let flow = match e {
                    Event::Body { chunk, end } => {
                        received = (received + chunk).min(body.len());
                        filter.on_request_body(received, *end)
                    }
                    Event::Trailers => filter.on_request_trailers(),
                    Event::Answer { status, body } => {
                        host.set_answer(body.clone());
                        filter.on_check_response(MockHost::TOKEN, *status, 0)
                    }
                    // Envoy calls nothing on a stream after destroying its filter.
                    Event::End => break,
                };
                // A Continue after a local reply releases nothing: that reply ended the stream.
                if matches!(e, Event::Body { .. } | Event::Trailers)
                    && flow == Flow::Continue
                    && host.local_reply().is_none()
                {
                    released = true;
                }
            }
            filter.on_stream_end();

            let outcomes: Vec<Outcome> = Outcome::ALL
                .into_iter()
                .filter(|o| host.metric(Metric::Outcome(*o)) > 0)
                .collect();
            let total: u64 = Outcome::ALL
                .iter()
                .map(|o| host.metric(Metric::Outcome(*o)))
                .sum();
            prop_assert_eq!(total, 1, "exactly one outcome, got {:?}", outcomes);
            let outcome = outcomes[0];
            // Nothing forged or secret is left on the request that may go upstream.
            for (name, _) in host.request_headers_now() {
                prop_assert!(
                    !is_reserved_header(&name)
                        || name == FAIL_OPEN_HEADER
                        || (outcome == Outcome::DryRunDeny
                            && (name == DRY_RUN_HEADER || name == "x-arbiter-audit-id"))
                );
                prop_assert!(name != "x-api-key");
            }
            let let_through = released || host.resumed() > 0;
            match outcome {
                Outcome::Allow | Outcome::Cached | Outcome::Disabled => {}
                Outcome::FailOpen => prop_assert!(host.header_now(FAIL_OPEN_HEADER).is_some()),
                Outcome::Deny | Outcome::FailClosed => {
                    prop_assert!(host.local_reply().is_some());
                    prop_assert!(host.resumed() == 0, "a refused request was resumed");
                }
                Outcome::DryRunDeny => {
                    // Only a valid dry-run route lets a deny through, marked, with no reply.
                    let settings = RouteSettings::from_metadata_bytes(
                        Some(&route_metadata(&route)),
                        "arbiter",
                    );
                    prop_assert!(settings.dry_run && settings.problems.is_empty());
                    let marker = host.header_now(DRY_RUN_HEADER);
                    prop_assert_eq!(marker.as_deref(), Some("deny"));
                    prop_assert!(host.local_reply().is_none());
                }
                Outcome::Cancelled => prop_assert!(!let_through, "cancelled but let through"),
            }
            if let_through {
                prop_assert!(matches!(
                    outcome,
                    Outcome::Allow
                        | Outcome::Cached
                        | Outcome::Disabled
                        | Outcome::FailOpen
                        | Outcome::DryRunDeny
                ));
            }
            prop_assert!(host.resumed() <= 1);
            Ok(())
        },
    );
}

/// A value for one match field: mostly its own kind of pattern, sometimes anything.
fn match_value(good: &'static [&'static str]) -> impl Strategy<Value = Option<Json>> {
    proptest::option::weighted(
        0.5,
        prop_oneof![
            8 => proptest::sample::select(good).prop_map(|s| Json::String(s.to_owned())),
            1 => proptest::sample::select(&["a b", "", "*example.com", "/a?b", "x:0", "post"][..])
                .prop_map(|s| Json::String(s.to_owned())),
            1 => json_value(),
        ],
    )
}

/// A route table entry: mostly well-formed, with any junk mixed in.
fn table_entry() -> impl Strategy<Value = Json> {
    let matcher = (
        match_value(&[
            "httproute/default/llm/*",
            "chat.completions",
            "httproute/default/llm/rule/0/match/0/api_example_com",
        ]),
        match_value(&[
            "api.example.com",
            "*.example.com",
            "*",
            "API.example.com:8443",
            "[::1]:8080",
        ]),
        match_value(&["/v1/chat/", "/", "/healthz"]),
        match_value(&["POST", "GET"]),
        proptest::option::weighted(0.05, json_value()),
    )
        .prop_map(|(route_name, authority, path_prefix, method, path)| {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("route_name", route_name),
                ("authority", authority),
                ("path_prefix", path_prefix),
                ("method", method),
                ("path", path),
            ] {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            }
            Json::Object(m)
        });
    (
        prop_oneof![
            3 => proptest::sample::select(&["chat", "embeddings", "all", ""][..]).prop_map(|s| Some(json!(s))),
            1 => json_value().prop_map(Some),
            1 => Just(None),
        ],
        proptest::option::weighted(0.85, matcher),
        proptest::option::of(prop_oneof![
            4 => proptest::sample::select(vec![
                json!({}),
                json!({"fail_mode": "open", "timeout_ms": 40}),
                json!({"disabled": true}),
                json!({"fail_open_until": "2026-11-22T06:00:00Z"}),
                json!({"context": {"classification": "regulated"}}),
            ]),
            1 => object_with(ROUTE_FIELDS),
        ]),
        proptest::option::weighted(0.05, json_value()),
    )
        .prop_map(|(name, matcher, settings, extra)| {
            let mut m = serde_json::Map::new();
            if let Some(n) = name {
                m.insert("name".into(), n);
            }
            if let Some(v) = matcher {
                m.insert("match".into(), v);
            }
            if let Some(v) = settings {
                m.insert("settings".into(), v);
            }
            if let Some(v) = extra {
                m.insert("unknown".into(), v);
            }
            Json::Object(m)
        })
}

fn request_part() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "api.example.com",
                "Api.Example.com:443",
                "a.example.com",
                "[::1]:8080",
                "",
                "/v1/chat/completions?x=1",
                "/healthz",
                "POST",
                "GET",
                "httproute/default/llm/rule/0/match/0/api_example_com",
                "chat.completions",
            ][..]
        )
        .prop_map(str::to_owned),
        ".{0,24}",
    ]
}

#[test]
fn prop_route_table_is_valid_or_refused_and_first_match_wins() {
    use crate::table::{RequestKey, RouteTable};
    check(
        "prop_route_table_is_valid_or_refused_and_first_match_wins",
        (
            prop_oneof![
                4 => vec((table_entry(), any::<u8>()), 0..5).prop_map(|entries| {
                    // Mostly unique names, so that whole tables are often accepted.
                    Json::Array(
                        entries
                            .into_iter()
                            .enumerate()
                            .map(|(i, (mut e, keep))| {
                                if keep < 220 {
                                    e["name"] = json!(format!("r{i}"));
                                }
                                e
                            })
                            .collect(),
                    )
                }),
                1 => json_value(),
            ],
            instant(),
            (
                request_part(),
                request_part(),
                request_part(),
                request_part(),
            ),
        ),
        |(routes, loaded, (route_name, authority, path, method))| {
            let config = json!({"policy_cluster": "p", "routes": routes.clone()});
            let parsed = FilterConfig::parse_at(config.to_string().as_bytes(), loaded);
            let table = RouteTable::parse(&routes, loaded);
            // The plugin configuration stands or falls with its table.
            prop_assert_eq!(parsed.is_ok(), table.is_ok());
            let table = match table {
                Ok(t) => t,
                Err(problems) => {
                    prop_assert!(!problems.is_empty());
                    // Every problem names its entry (or the `routes` field itself).
                    for p in &problems {
                        prop_assert!(p.contains("routes"), "{}", p);
                    }
                    return Ok(());
                }
            };
            let mut names = std::collections::BTreeSet::new();
            for (i, e) in table.entries.iter().enumerate() {
                prop_assert!(!e.name.trim().is_empty());
                prop_assert!(names.insert(e.name.clone()), "duplicate {}", e.name);
                // Accepted settings are valid, and an override reaches at most 24 h ahead.
                prop_assert!(e.settings.problems.is_empty());
                if let Some(until) = e.settings.fail_open_until {
                    prop_assert!(
                        until.duration_since(loaded).unwrap_or_default() <= MAX_OVERRIDE_AHEAD
                    );
                }
                if e.matcher.is_catch_all() {
                    prop_assert_eq!(i + 1, table.entries.len(), "a catch-all is last");
                }
            }
            let request = RequestKey {
                route_name: &route_name,
                authority: &authority,
                path: &path,
                method: &method,
            };
            match table.find(&request) {
                Some((i, e)) => {
                    prop_assert!(e.matcher.matches(&request));
                    for earlier in &table.entries[..i] {
                        prop_assert!(!earlier.matcher.matches(&request));
                    }
                }
                None => {
                    for e in &table.entries {
                        prop_assert!(!e.matcher.matches(&request));
                    }
                }
            }
            // The same document loaded at the same time is the same table.
            prop_assert_eq!(RouteTable::parse(&routes, loaded), Ok(table));
            Ok(())
        },
    );
}

/// Whatever the request and route, the CheckRequest the filter encodes directly decodes to
/// the message the prost build gives (`check::reference_check_request`), at the same length
/// (so the size limit judges both alike).
#[test]
fn prop_direct_check_encoding_matches_prost() {
    let request = (
        vec(
            ("(:method|:path|x-request-id|accept|a|x-envoy-auth-partial-body|[a-z-]{0,6})", "\\PC{0,12}"),
            0..12,
        ),
        "\\PC{0,8}",
        proptest::option::of(
            "(127\\.0\\.0\\.1:[0-9]{1,5}|\\[::1\\]:80|\\[::ffff:1.2.3.4\\]:1|\\[0:0::2\\]:9|\\PC{0,8})",
        ),
        proptest::option::of("(10\\.0\\.0\\.2:443|\\PC{0,4})"),
        proptest::option::of("\\PC{0,10}"),
        proptest::option::of("(HTTP/1\\.1|HTTP/2|)"),
        proptest::option::of(any::<u64>()),
    );
    let route = (
        vec(("(route|dry_run|[a-z]{0,4})", "\\PC{0,6}"), 0..4),
        any::<bool>(),
        proptest::option::of(vec(any::<u8>(), 0..300)),
        any::<bool>(),
        any::<bool>(),
        (0u64..4_000_000_000, 0u32..1_000_000_000, any::<bool>()),
    );
    check(
        "prop_direct_check_encoding_matches_prost",
        (request, route),
        |(
            (headers, route_name, source, destination, principal, protocol, body_size),
            (context, dry_run, body, partial, with_metadata, (secs, nanos, before_epoch)),
        )| {
            let info = crate::check::RequestInfo {
                headers,
                route_name,
                source_address: source,
                destination_address: destination,
                peer_principal: principal,
                protocol,
                body_size,
            };
            let now = if before_epoch {
                SystemTime::UNIX_EPOCH - Duration::new(secs.max(1), nanos)
            } else {
                SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
            };
            let metadata = prost_types::Struct {
                fields: [(
                    "jwt_authn".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::StructValue(prost_types::Struct {
                            fields: [(
                                "sub".to_owned(),
                                prost_types::Value {
                                    kind: Some(Kind::StringValue(info.route_name.clone())),
                                },
                            )]
                            .into_iter()
                            .collect(),
                        })),
                    },
                )]
                .into_iter()
                .collect(),
            };
            let extras = crate::check::CheckExtras {
                dry_run,
                metadata: with_metadata.then_some(&metadata),
                body: body.as_deref(),
                partial,
            };
            let want = crate::check::reference_check_request(&info, &context, now, &extras);
            let got = crate::check::encode_check(&info, &context, now, &extras);
            let decoded =
                arbiter_proto::envoy::service::auth::v3::CheckRequest::decode(got.as_slice());
            prop_assert_eq!(decoded.ok(), Some(want.clone()));
            prop_assert_eq!(got.len(), want.encoded_len());
            Ok(())
        },
    );
}

/// A cache slot holds what was stored, whatever the headers' bytes: an entry comes back
/// exactly, only for its digest, version and lifetime; and any bytes in a slot (another
/// format, cut, garbage) are a miss or an entry, never a panic.
#[test]
fn prop_cache_entry_round_trips_and_garbage_misses() {
    use crate::cache::Entry;
    let ops = || vec(("\\PC{0,12}", "\\PC{0,16}", any::<bool>()), 0..4);
    check(
        "prop_cache_entry_round_trips_and_garbage_misses",
        (
            ("[0-9a-f]{0,64}", any::<u64>(), "\\PC{0,12}"),
            (ops(), vec("\\PC{0,12}", 0..3), ops()),
            vec(any::<u8>(), 0..200),
            0usize..400,
        ),
        |((digest, expires_ms, version), (headers, remove, response_headers), garbage, cut)| {
            let entry = Entry {
                digest: digest.clone(),
                expires_ms,
                policy_version: version.clone(),
                headers,
                remove,
                response_headers,
            };
            let bytes = entry.encode();
            let before =
                SystemTime::UNIX_EPOCH + Duration::from_millis(expires_ms.saturating_sub(1));
            let at_expiry = SystemTime::UNIX_EPOCH + Duration::from_millis(expires_ms);
            if expires_ms > 0 {
                prop_assert_eq!(
                    Entry::lookup(&bytes, &digest, Some(&version), before),
                    Some(entry.clone())
                );
            }
            prop_assert!(Entry::lookup(&bytes, &digest, Some(&version), at_expiry).is_none());
            prop_assert!(
                Entry::lookup(&bytes, &(digest.clone() + "x"), Some(&version), before).is_none()
            );
            prop_assert!(
                Entry::lookup(&bytes, &digest, Some(&(version.clone() + "x")), before).is_none()
            );
            prop_assert!(Entry::lookup(&bytes, &digest, None, before).is_none());
            let cut = cut.min(bytes.len());
            if cut < bytes.len() {
                prop_assert!(
                    Entry::lookup(&bytes[..cut], &digest, Some(&version), before).is_none()
                );
            }
            let _ = Entry::lookup(&garbage, &digest, Some(&version), before);
            Ok(())
        },
    );
}

/// What happens to a breaker at one moment, in [`prop_breaker_backs_off_from_first_to_max`].
#[derive(Debug, Clone, Copy)]
enum BreakerEvent {
    /// A request arrives; a call it makes fails or is answered later.
    Request,
    /// The oldest call in flight got no decision.
    Failure,
    /// The oldest call in flight got an answer.
    Success,
    /// The oldest call in flight was cancelled by its client.
    Cancel,
}

#[test]
fn prop_breaker_backs_off_from_first_to_max() {
    use crate::breaker::{Admit, Breaker, Transition};
    use crate::config::BreakerConfig;

    let event = prop_oneof![
        Just(BreakerEvent::Request),
        Just(BreakerEvent::Failure),
        Just(BreakerEvent::Success),
        Just(BreakerEvent::Cancel),
    ];
    check(
        "prop_breaker_backs_off_from_first_to_max",
        (
            1u32..4,
            1u32..3,
            1u64..2_000,
            1u64..20_000,
            vec((event, 0u64..3_000), 0..64),
        ),
        |(threshold, probes, first_ms, max_ms, events)| {
            let first = Duration::from_millis(first_ms);
            let max = Duration::from_millis(max_ms).max(first);
            let mut b = Breaker::new(BreakerConfig {
                threshold,
                cooldown: first,
                cooldown_max: max,
                probes,
            });
            let mut now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
            // Calls in flight: whether each is a probe.
            let mut in_flight: std::collections::VecDeque<bool> = Default::default();
            // The cool-down of the current opening.
            let mut cooldown: Option<Duration> = None;
            for (event, step_ms) in events {
                now += Duration::from_millis(step_ms);
                let transition = match event {
                    BreakerEvent::Request => {
                        let open = b.is_open(now);
                        match b.admit(now, Duration::from_millis(500)) {
                            Admit::Call => {
                                prop_assert!(!open, "a call while open");
                                in_flight.push_back(false);
                            }
                            Admit::Probe => {
                                prop_assert!(!open, "a probe while open");
                                in_flight.push_back(true);
                            }
                            Admit::Reject => {}
                        }
                        None
                    }
                    BreakerEvent::Failure => {
                        in_flight.pop_front();
                        b.on_failure(now)
                    }
                    BreakerEvent::Success => {
                        in_flight.pop_front();
                        b.on_success()
                    }
                    BreakerEvent::Cancel => {
                        if in_flight.pop_front() == Some(true) {
                            b.release_probe();
                        }
                        None
                    }
                };
                match transition {
                    Some(Transition::Opened) => {
                        prop_assert_eq!(b.open_for(now), Some(first), "an opening is short");
                        cooldown = Some(first);
                    }
                    Some(Transition::Reopened) => {
                        let previous = cooldown.unwrap_or(first);
                        let expected = previous.saturating_mul(2).min(max);
                        prop_assert_eq!(b.open_for(now), Some(expected), "doubled, capped");
                        cooldown = Some(expected);
                    }
                    Some(Transition::Closed) => cooldown = None,
                    None => {}
                }
                if let Some(left) = b.open_for(now) {
                    prop_assert!(left <= max);
                }
            }
            Ok(())
        },
    );
}
