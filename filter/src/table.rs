//! The route table: per-route settings in the plugin configuration, for meshes that cannot
//! set Envoy route metadata (Istio's VirtualService, Gateway API's HTTPRoute).
//!
//! An ordered list of entries, each a name, a match and the same settings object as route
//! metadata. The first entry whose every present match field holds applies; route metadata,
//! where present, wins over the table as a whole. The table is validated once, when the
//! plugin configuration is loaded: one bad entry refuses the whole configuration, naming the
//! entry, so a mistake never leaves a route weaker than the operator wrote it.

use std::time::SystemTime;

use serde_json::{Map, Value};

use crate::route::RouteSettings;

/// Most entries a table may hold (every request walks the table until a match).
pub const MAX_ROUTES: usize = 1_000;
/// Longest entry name accepted.
pub const MAX_NAME_LEN: usize = 256;

const ENTRY_FIELDS: &[&str] = &["name", "match", "settings"];
const MATCH_FIELDS: &[&str] = &["route_name", "authority", "path_prefix", "method"];

/// The parsed, validated route table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    /// Entries in the order they are tried.
    pub entries: Vec<TableEntry>,
}

/// One entry of the route table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    /// Unique name: the route policies see (`context_extensions.route`), in logs and records.
    pub name: String,
    /// Which requests it applies to.
    pub matcher: RouteMatch,
    /// The same settings route metadata carries, valid when loaded.
    pub settings: RouteSettings,
}

/// Every present field must hold; an empty match is a catch-all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    /// Envoy route name: exact, or a prefix when it ends in `*`.
    pub route_name: Option<NamePattern>,
    /// Request authority (`:authority` / `Host`).
    pub authority: Option<AuthorityPattern>,
    /// Prefix of the request path, without its query.
    pub path_prefix: Option<String>,
    /// HTTP method, upper case; a request's method is compared ignoring case.
    pub method: Option<String>,
}

/// An Envoy route name pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    /// The whole name.
    Exact(String),
    /// Names starting with this (written with a trailing `*`).
    Prefix(String),
}

/// An authority pattern: a host (exact, `*.suffix` or `*`) and an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityPattern {
    host: HostPattern,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: one or more labels before it.
    Suffix(String),
}

/// What the table matches a request on.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestKey<'a> {
    /// Envoy route name (`xds.route_name`), empty when unnamed.
    pub route_name: &'a str,
    /// `:authority`.
    pub authority: &'a str,
    /// `:path`, query included (cut here).
    pub path: &'a str,
    /// `:method`.
    pub method: &'a str,
}

impl RouteTable {
    /// Parses the plugin configuration's `routes` value. Settings are judged at `now`, the
    /// moment the configuration is loaded (an override more than 24 h ahead is refused).
    /// Every problem is returned, each naming its entry.
    pub fn parse(value: &Value, now: SystemTime) -> Result<Self, Vec<String>> {
        let Value::Array(items) = value else {
            return Err(vec![format!(
                "`routes` must be a list of {{\"name\", \"match\", \"settings\"}} entries, got `{value}`"
            )]);
        };
        let mut problems = Vec::new();
        if items.len() > MAX_ROUTES {
            problems.push(format!(
                "`routes` has {} entries, at most {MAX_ROUTES} are allowed",
                items.len()
            ));
        }
        let mut entries: Vec<TableEntry> = Vec::with_capacity(items.len());
        let mut catch_all: Option<String> = None;
        for (i, item) in items.iter().enumerate() {
            let label = entry_label(i, item);
            match TableEntry::parse(item, now) {
                Ok(entry) => {
                    if entries.iter().any(|e| e.name == entry.name) {
                        problems.push(format!(
                            "{label}: duplicate name (names identify routes to policy and in logs, so each must be unique)"
                        ));
                    }
                    if let Some(all) = &catch_all {
                        problems.push(format!(
                            "{label}: never matches, {all} before it matches every request"
                        ));
                    }
                    if entry.matcher.is_catch_all() && catch_all.is_none() {
                        catch_all = Some(label.clone());
                    }
                    entries.push(entry);
                }
                Err(errors) => {
                    problems.extend(errors.into_iter().map(|e| format!("{label}: {e}")));
                }
            }
        }
        if problems.is_empty() {
            Ok(Self { entries })
        } else {
            Err(problems)
        }
    }

    /// The first entry matching the request, with its index.
    pub fn find(&self, request: &RequestKey<'_>) -> Option<(usize, &TableEntry)> {
        self.entries
            .iter()
            .enumerate()
            .find(|(_, e)| e.matcher.matches(request))
    }
}

/// `routes[2] (`chat`)`, or `routes[2]` when the entry has no usable name.
fn entry_label(i: usize, item: &Value) -> String {
    match item.get("name").and_then(Value::as_str) {
        Some(name) if !name.is_empty() => format!("`routes[{i}]` (`{name}`)"),
        _ => format!("`routes[{i}]`"),
    }
}

impl TableEntry {
    fn parse(item: &Value, now: SystemTime) -> Result<Self, Vec<String>> {
        let Value::Object(map) = item else {
            return Err(vec![format!(
                "must be an object like {{\"name\": \"chat\", \"match\": {{...}}, \"settings\": {{...}}}}, got `{item}`"
            )]);
        };
        let mut problems = unknown_fields(map, ENTRY_FIELDS);
        let name = match map.get("name") {
            Some(Value::String(s)) => match route_name(s) {
                Ok(()) => s.clone(),
                Err(e) => {
                    problems.push(e);
                    String::new()
                }
            },
            Some(other) => {
                problems.push(format!("`name` must be a string, got `{other}`"));
                String::new()
            }
            None => {
                problems.push("missing required field `name`".to_owned());
                String::new()
            }
        };
        let matcher = match map.get("match") {
            None => RouteMatch::default(),
            Some(Value::Object(m)) => RouteMatch::parse(m).unwrap_or_else(|e| {
                problems.extend(e.into_iter().map(|e| format!("`match`: {e}")));
                RouteMatch::default()
            }),
            Some(other) => {
                problems.push(format!("`match` must be an object, got `{other}`"));
                RouteMatch::default()
            }
        };
        let settings = match map.get("settings") {
            None => RouteSettings::default(),
            Some(Value::Object(s)) => RouteSettings::from_json(s).judge_at_load(now),
            Some(other) => {
                problems.push(format!("`settings` must be an object, got `{other}`"));
                RouteSettings::default()
            }
        };
        problems.extend(settings.problems.iter().map(|e| format!("`settings`: {e}")));
        if problems.is_empty() {
            Ok(Self {
                name,
                matcher,
                settings,
            })
        } else {
            Err(problems)
        }
    }
}

fn unknown_fields(map: &Map<String, Value>, known: &[&str]) -> Vec<String> {
    map.keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| format!("unknown field `{k}` (expected one of {})", known.join(", ")))
        .collect()
}

/// A route name policies can rely on: non-empty, bounded, printable.
fn route_name(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("`name` must not be empty".to_owned());
    }
    if s.len() > MAX_NAME_LEN {
        return Err(format!("`name` is longer than {MAX_NAME_LEN} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!(
            "`name` must not contain control characters, got {s:?}"
        ));
    }
    Ok(())
}

impl RouteMatch {
    fn parse(map: &Map<String, Value>) -> Result<Self, Vec<String>> {
        let mut problems = unknown_fields(map, MATCH_FIELDS);
        let mut out = Self::default();
        let mut string = |field: &str| -> Option<String> {
            match map.get(field)? {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                other => {
                    problems.push(format!(
                        "`{field}` must be a non-empty string, got `{other}`"
                    ));
                    None
                }
            }
        };
        let route_name = string("route_name");
        let authority = string("authority");
        let path_prefix = string("path_prefix");
        let method = string("method");
        if let Some(s) = route_name {
            out.route_name = Some(match s.strip_suffix('*') {
                Some(prefix) => NamePattern::Prefix(prefix.to_owned()),
                None => NamePattern::Exact(s),
            });
        }
        if let Some(s) = authority {
            match AuthorityPattern::parse(&s) {
                Ok(a) => out.authority = Some(a),
                Err(e) => problems.push(e),
            }
        }
        if let Some(s) = path_prefix {
            if !s.starts_with('/') || s.contains(['?', '#']) {
                problems.push(format!(
                    "`path_prefix` must start with `/` and hold no query or fragment, got `{s}`"
                ));
            } else {
                out.path_prefix = Some(s);
            }
        }
        if let Some(s) = method {
            let token =
                |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
            if s.bytes().all(token) {
                out.method = Some(s);
            } else {
                problems.push(format!(
                    "`method` must be an upper-case HTTP method like `POST` (methods are case-sensitive), got `{s}`"
                ));
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }

    /// No field set: matches every request.
    pub fn is_catch_all(&self) -> bool {
        self.route_name.is_none()
            && self.authority.is_none()
            && self.path_prefix.is_none()
            && self.method.is_none()
    }

    /// Every present field holds for the request.
    pub fn matches(&self, r: &RequestKey<'_>) -> bool {
        let route_name = match &self.route_name {
            None => true,
            Some(NamePattern::Exact(n)) => r.route_name == n,
            Some(NamePattern::Prefix(p)) => r.route_name.starts_with(p.as_str()),
        };
        route_name
            // Ignoring case: HTTP/2 lets a client send `post`, which Envoy routes and
            // forwards as it is; it gets the `POST` entry's settings, not the next entry's.
            && self
                .method
                .as_deref()
                .is_none_or(|m| r.method.eq_ignore_ascii_case(m))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path_without_query(r.path).starts_with(p))
            && self
                .authority
                .as_ref()
                .is_none_or(|a| a.matches(r.authority))
    }
}

/// The path the router matches on: without `?query` (and a stray `#fragment`).
fn path_without_query(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    path.get(..end).unwrap_or(path)
}

/// Splits `host[:port]` / `[v6][:port]`; `None` for a port that is not a number.
fn split_authority(s: &str) -> Option<(&str, Option<&str>)> {
    if s.starts_with('[') {
        let end = s.find(']')?;
        let (host, rest) = s.split_at(end + 1);
        return match rest.strip_prefix(':') {
            Some(port) => Some((host, Some(port))),
            None if rest.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port))),
        None => Some((s, None)),
    }
}

fn port(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|p| *p != 0)
}

impl AuthorityPattern {
    /// `api.example.com`, `api.example.com:8443`, `*.example.com`, `*`, `[::1]:8080`.
    fn parse(s: &str) -> Result<Self, String> {
        let invalid = || {
            format!(
                "`authority` must be a host like `api.example.com`, `*.example.com` or `*`, with an optional `:port`, got `{s}`"
            )
        };
        let (host, port_str) = split_authority(s).ok_or_else(invalid)?;
        let port = match port_str {
            Some(p) => Some(port(p).ok_or_else(invalid)?),
            None => None,
        };
        // Literal, as Envoy's virtual host `domains` are: `api.example.com.` is another
        // name to Envoy's router (unless the connection manager strips the dot, and then
        // the filter sees the request's host without it too).
        let host = host.to_ascii_lowercase();
        let dns_char = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.';
        let dns = |h: &str| {
            !h.is_empty() && h.bytes().all(dns_char) && !h.starts_with('.') && !h.contains("..")
        };
        let pattern = if host == "*" {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            if !dns(suffix) {
                return Err(invalid());
            }
            HostPattern::Suffix(format!(".{suffix}"))
        } else if host.starts_with('[') {
            let inner = host.trim_start_matches('[').trim_end_matches(']');
            if inner.is_empty()
                || !inner
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            {
                return Err(invalid());
            }
            HostPattern::Exact(host.clone())
        } else if dns(&host) {
            HostPattern::Exact(host.clone())
        } else {
            return Err(invalid());
        };
        Ok(Self {
            host: pattern,
            port,
        })
    }

    /// The host as Envoy's router picks a virtual host with `ignore_port_in_host_matching`
    /// (set by Istio and Envoy Gateway): case-insensitive, everything after the last `:`
    /// (outside `[…]`) is the port, and a trailing dot is part of the name, so a table entry
    /// never applies to a request the router sent to another virtual host. A pattern without
    /// a port matches any port, one with a port only that port.
    fn matches(&self, authority: &str) -> bool {
        let Some((host, port_str)) = split_authority(authority) else {
            return false;
        };
        if let Some(want) = self.port {
            if port_str.and_then(port) != Some(want) {
                return false;
            }
        }
        match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(h) => host.eq_ignore_ascii_case(h),
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host
                        .get(host.len() - suffix.len()..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000)
    }

    fn table(v: Value) -> RouteTable {
        RouteTable::parse(&v, now()).unwrap()
    }

    fn errors(v: Value) -> String {
        RouteTable::parse(&v, now()).unwrap_err().join("; ")
    }

    fn key<'a>(
        route_name: &'a str,
        authority: &'a str,
        path: &'a str,
        method: &'a str,
    ) -> RequestKey<'a> {
        RequestKey {
            route_name,
            authority,
            path,
            method,
        }
    }

    fn found(t: &RouteTable, k: RequestKey<'_>) -> Option<String> {
        t.find(&k).map(|(_, e)| e.name.clone())
    }

    #[test]
    fn first_matching_entry_wins_and_every_present_field_must_hold() {
        let t = table(json!([
            {"name": "chat-post", "match": {"authority": "api.example.com", "path_prefix": "/v1/chat/", "method": "POST"},
             "settings": {"fail_mode": "open"}},
            {"name": "chat", "match": {"path_prefix": "/v1/chat/"}},
            {"name": "eg", "match": {"route_name": "httproute/default/llm/*"}},
            {"name": "istio", "match": {"route_name": "chat.completions"}},
        ]));
        assert_eq!(
            found(
                &t,
                key("", "api.example.com", "/v1/chat/completions", "POST")
            )
            .as_deref(),
            Some("chat-post")
        );
        assert_eq!(
            found(
                &t,
                key("", "api.example.com", "/v1/chat/completions", "GET")
            )
            .as_deref(),
            Some("chat")
        );
        assert_eq!(
            found(&t, key("", "other.example.com", "/v1/chat/x", "POST")).as_deref(),
            Some("chat")
        );
        assert_eq!(
            found(
                &t,
                key(
                    "httproute/default/llm/rule/0/match/0/api_example_com",
                    "x",
                    "/v1/embeddings",
                    "POST"
                )
            )
            .as_deref(),
            Some("eg")
        );
        assert_eq!(
            found(&t, key("chat.completions", "x", "/", "GET")).as_deref(),
            Some("istio")
        );
        assert_eq!(
            found(&t, key("chat.completions.v2", "x", "/", "GET")),
            None,
            "exact unless `*`"
        );
        assert_eq!(found(&t, key("", "x", "/v1/embeddings", "POST")), None);
        assert_eq!(
            t.entries[0].settings.fail_mode,
            Some(crate::config::FailMode::Open)
        );
    }

    #[test]
    fn path_prefix_ignores_the_query_and_is_a_plain_prefix() {
        let t = table(json!([{"name": "a", "match": {"path_prefix": "/v1/chat/"}}]));
        assert!(found(&t, key("", "h", "/v1/chat/?x=1", "GET")).is_some());
        assert!(
            found(&t, key("", "h", "/v1/chat?/v1/chat/", "GET")).is_none(),
            "the query is not the path"
        );
        assert!(found(&t, key("", "h", "/v1/chatty", "GET")).is_none());
        assert!(
            found(&t, key("", "h", "/V1/chat/", "GET")).is_none(),
            "case-sensitive like Envoy's prefix"
        );
    }

    #[test]
    fn authority_case_port_and_wildcards() {
        let t = table(json!([
            {"name": "exact", "match": {"authority": "API.example.com"}},
            {"name": "port", "match": {"authority": "admin.example.com:8443"}},
            {"name": "wild", "match": {"authority": "*.example.com"}},
            {"name": "v6", "match": {"authority": "[::1]:8080"}},
        ]));
        for (authority, want) in [
            ("api.example.com", Some("exact")),
            ("Api.Example.Com:443", Some("exact")),
            // Envoy's router does not take `api.example.com.` for `api.example.com`.
            ("api.example.com.", None),
            ("a.example.com.", None),
            ("API.example.com:", Some("exact")),
            ("admin.example.com:8443", Some("port")),
            ("admin.example.com", Some("wild")),
            ("admin.example.com:9000", Some("wild")),
            ("a.b.example.com", Some("wild")),
            ("example.com", None),
            ("notexample.com", None),
            ("[::1]:8080", Some("v6")),
            ("[::1]", None),
            ("", None),
        ] {
            assert_eq!(
                found(&t, key("", authority, "/", "GET")).as_deref(),
                want,
                "{authority}"
            );
        }
        let any = table(json!([{"name": "any", "match": {"authority": "*"}}]));
        assert!(found(&any, key("", "whatever:1", "/", "GET")).is_some());
    }

    #[test]
    fn the_table_reads_a_request_as_envoys_router_does() {
        let t = table(json!([
            {"name": "docs", "match": {"authority": "docs.example.com"}, "settings": {"disabled": true}},
            {"name": "dotted", "match": {"authority": "Dotted.example.com."}},
            {"name": "chat", "match": {"path_prefix": "/v1/chat/", "method": "POST"}},
        ]));
        for (authority, method, want) in [
            ("docs.example.com", "GET", Some("docs")),
            // Another virtual host to Envoy (without `strip_trailing_host_dot`, which the
            // filter would see applied): never the `docs` entry.
            ("docs.example.com.", "POST", Some("chat")),
            ("docs.example.com.:443", "POST", Some("chat")),
            // Envoy ignores the port (Istio, Envoy Gateway), whatever it is.
            ("DOCS.example.com:8443", "POST", Some("docs")),
            ("docs.example.com:x", "POST", Some("docs")),
            ("dotted.example.com.", "GET", Some("dotted")),
            ("dotted.example.com", "GET", None),
            // HTTP/2 carries `post` as it is, and Envoy forwards it.
            ("api.example.com", "post", Some("chat")),
            ("api.example.com", "Post", Some("chat")),
            ("api.example.com", "GET", None),
            ("api.example.com", "POSTX", None),
        ] {
            assert_eq!(
                found(&t, key("", authority, "/v1/chat/completions", method)).as_deref(),
                want,
                "{method} {authority}"
            );
        }
    }

    #[test]
    fn empty_or_absent_match_is_a_catch_all_and_nothing_may_follow_it() {
        let t = table(json!([{"name": "all"}]));
        assert!(found(&t, key("", "", "", "")).is_some());
        let t = table(json!([{"name": "all", "match": {}}]));
        assert!(t.entries[0].matcher.is_catch_all());
        let msg = errors(json!([{"name": "all"}, {"name": "late", "match": {"method": "GET"}}]));
        assert!(
            msg.contains("`routes[1]` (`late`): never matches, `routes[0]` (`all`)"),
            "{msg}"
        );
        assert_eq!(table(json!([])).entries.len(), 0);
    }

    #[test]
    fn every_bad_entry_is_named() {
        let msg = errors(json!([
            {"name": "ok"},
            {"name": "ok", "match": {"method": "GET"}},
            {"match": {"method": "GET"}},
            {"name": "typo", "mtach": {}},
            {"name": "badmatch", "match": {"path": "/x", "method": "post", "authority": "a b", "path_prefix": "v1"}},
            {"name": "badsettings", "settings": {"fail_mode": "sometimes", "timeout_ms": 0}},
            {"name": "far", "settings": {"fail_open_until": "2026-11-20T11:06:41Z"}},
            {"name": "ctx", "settings": {"context": {"route": "x"}}},
            "chat",
            {"name": ""},
            {"name": 5, "settings": []},
        ]));
        for needle in [
            "`routes[1]` (`ok`): duplicate name",
            "`routes[2]`: missing required field `name`",
            "`routes[3]` (`typo`): unknown field `mtach`",
            "`routes[4]` (`badmatch`): `match`: unknown field `path`",
            "`routes[4]` (`badmatch`): `match`: `method` must be an upper-case HTTP method",
            "`routes[4]` (`badmatch`): `match`: `authority` must be a host",
            "`routes[4]` (`badmatch`): `match`: `path_prefix` must start with `/`",
            "`routes[5]` (`badsettings`): `settings`: `fail_mode` must be `closed` or `open`",
            "`routes[5]` (`badsettings`): `settings`: `timeout_ms` must be between",
            "`routes[6]` (`far`): `settings`: `fail_open_until` is 48 h ahead",
            "`routes[7]` (`ctx`): `settings`: `context.route` is reserved",
            "`routes[8]`: must be an object",
            "`routes[9]`: `name` must not be empty",
            "`routes[10]`: `name` must be a string",
            "`routes[10]`: `settings` must be an object",
        ] {
            assert!(msg.contains(needle), "{msg}\n  lacks {needle}");
        }
        assert!(errors(json!({"name": "x"})).contains("`routes` must be a list"));
    }

    #[test]
    fn bad_match_values() {
        for m in [
            json!({"route_name": ""}),
            json!({"route_name": 5}),
            json!({"authority": "*example.com"}),
            json!({"authority": "a.*.com"}),
            json!({"authority": "api.example.com:0"}),
            json!({"authority": "api.example.com:99999"}),
            json!({"authority": "api.example.com:"}),
            json!({"authority": "[zz]"}),
            json!({"authority": ".example.com"}),
            json!({"path_prefix": "/a?b"}),
            json!({"method": "GET "}),
            json!({"method": null}),
        ] {
            let v = json!([{"name": "x", "match": m.clone()}]);
            assert!(RouteTable::parse(&v, now()).is_err(), "{m}");
        }
    }

    #[test]
    fn an_override_within_24_h_is_accepted_and_kept() {
        let t =
            table(json!([{"name": "o", "settings": {"fail_open_until": "2026-11-18T13:00:00Z"}}]));
        assert!(t.entries[0].settings.fail_open_until.is_some());
        assert!(t.entries[0].settings.problems.is_empty());
    }
}
