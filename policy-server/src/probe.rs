//! `arbiter probe`: the incident runbook command. It answers "what is Arbiter doing to this
//! route right now?" from the running system: the route's effective fail mode (read from
//! Envoy's config dump and resolved with the filter's own code, so the answer cannot drift
//! from what the filter does), whether an override is in force, whether breakers are open,
//! and what a synthetic request gets, through Envoy and/or straight from the policy server.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use arbiter_filter::check::{build_check_request, RequestInfo};
use arbiter_filter::config::FilterConfig;
use arbiter_filter::route::RouteSettings;
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, check_response::HttpResponse, CheckRequest,
};
use prost::Message;
use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Why a probe could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Envoy's admin API could not be read.
    #[error("cannot read Envoy admin `{url}`: {reason}")]
    Admin {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The route is not in Envoy's configuration.
    #[error("route `{0}` is not in Envoy's route configuration")]
    UnknownRoute(String),
    /// Envoy runs no Arbiter wasm filter.
    #[error("no Arbiter wasm filter with a valid configuration found in Envoy's listeners: {0}")]
    NoFilter(String),
    /// The policy server could not be asked.
    #[error("cannot call the policy server at `{addr}`: {reason}")]
    Server {
        /// The address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
}

/// What to probe.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Envoy admin base URL, e.g. `http://127.0.0.1:9901`.
    pub envoy_admin: Option<String>,
    /// Envoy listener base URL for a synthetic request, e.g. `http://127.0.0.1:10000`.
    pub envoy_url: Option<String>,
    /// Policy server gRPC address for a direct Check, e.g. `127.0.0.1:50051`.
    pub server: Option<String>,
    /// Route name (as in Envoy's route configuration).
    pub route: String,
    /// Method of the synthetic request.
    pub method: String,
    /// Path of the synthetic request.
    pub path: String,
    /// Extra headers of the synthetic request.
    pub headers: Vec<(String, String)>,
    /// Bound on every network call.
    pub timeout: Duration,
}

/// The route as the filter would handle it now.
#[derive(Debug, Clone, Serialize)]
pub struct RouteReport {
    /// Route name.
    pub route: String,
    /// `closed` or `open`, as applied to failures right now.
    pub fail_mode: &'static str,
    /// Policy-call timeout.
    pub timeout_ms: u64,
    /// An incident override is in force, until this time.
    pub override_until: Option<String>,
    /// The check is skipped on this route.
    pub disabled: bool,
    /// Problems that make the filter treat the route as invalid (closed).
    pub problems: Vec<String>,
    /// Workers whose breaker is open (from Envoy stats).
    pub breaker_open_workers: u64,
    /// The route's `context` (sent to policy as `context_extensions`).
    pub context: Vec<(String, String)>,
}

/// One synthetic request's result.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// `allow`, `deny`, `fail_open`, `fail_closed` or `error`.
    pub outcome: String,
    /// HTTP status (through Envoy) or gRPC code (direct).
    pub status: i64,
    /// Reason (fail modes), determining policies or an error text.
    pub detail: String,
    /// Round trip.
    pub latency_ms: f64,
}

/// Everything the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Route state, when Envoy's admin was given.
    pub route: Option<RouteReport>,
    /// Synthetic request through Envoy.
    pub through_envoy: Option<Answer>,
    /// Check straight to the policy server.
    pub direct: Option<Answer>,
}

/// Runs the probe.
pub async fn probe(opts: &ProbeOptions) -> Result<ProbeReport, ProbeError> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(opts.timeout)
        .build()
        .map_err(|e| ProbeError::Admin {
            url: String::new(),
            reason: e.to_string(),
        })?;
    let route = match &opts.envoy_admin {
        Some(admin) => Some(route_report(&http, admin, &opts.route).await?),
        None => None,
    };
    let through_envoy = match &opts.envoy_url {
        Some(url) => Some(through_envoy(&http, url, opts).await),
        None => None,
    };
    // With the route known, the direct Check carries its context, as the filter would.
    let context = route
        .as_ref()
        .map(|r| r.context.clone())
        .unwrap_or_default();
    let direct = match &opts.server {
        Some(addr) => Some(direct_check(addr, opts, &context).await?),
        None => None,
    };
    Ok(ProbeReport {
        route,
        through_envoy,
        direct,
    })
}

async fn admin_json(http: &reqwest::Client, url: String) -> Result<Value, ProbeError> {
    let err = |reason: String| ProbeError::Admin {
        url: url.clone(),
        reason,
    };
    let resp = http
        .get(&url)
        .send()
        .await
        .map_err(|e| err(e.to_string()))?;
    resp.json().await.map_err(|e| err(e.to_string()))
}

/// Resolves the route from Envoy's live config with the filter's own logic.
async fn route_report(
    http: &reqwest::Client,
    admin: &str,
    route: &str,
) -> Result<RouteReport, ProbeError> {
    let admin = admin.trim_end_matches('/');
    let listeners = admin_json(
        http,
        format!("{admin}/config_dump?resource=static_listeners"),
    )
    .await?;
    let plugin = find_plugin_config(&listeners).ok_or_else(|| {
        ProbeError::NoFilter("no envoy.filters.http.wasm with root_id `arbiter`".into())
    })?;
    let config =
        FilterConfig::parse(plugin.as_bytes()).map_err(|e| ProbeError::NoFilter(e.to_string()))?;
    let routes = admin_json(
        http,
        format!("{admin}/config_dump?resource=static_route_configs"),
    )
    .await?;
    let entry =
        find_route(&routes, route).ok_or_else(|| ProbeError::UnknownRoute(route.to_owned()))?;
    let settings = match entry
        .pointer(&format!(
            "/metadata/filter_metadata/{}",
            config.metadata_namespace
        ))
        .and_then(Value::as_object)
    {
        Some(map) => RouteSettings::from_json(map),
        None => RouteSettings::default(),
    };
    let now = SystemTime::now();
    // The filter judges an override when a worker first handles the route; the probe
    // judges it now, which agrees unless the setting was loaded more than a day ago.
    let settings = settings.judge_at_load(now);
    let resolved = settings.resolve(&config, now);
    let problems = settings.problems.clone();

    let stats = admin_json(
        http,
        format!("{admin}/stats?format=json&filter=arbiter%5C.breaker"),
    )
    .await?;
    let stat = |name: &str| {
        stats["stats"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .and_then(|s| s["value"].as_u64())
            .unwrap_or(0)
    };
    let open = stat("wasmcustom.arbiter.breaker.opened")
        .saturating_sub(stat("wasmcustom.arbiter.breaker.closed"));

    Ok(RouteReport {
        route: route.to_owned(),
        fail_mode: resolved.fail_mode.as_str(),
        timeout_ms: u64::try_from(resolved.timeout.as_millis()).unwrap_or(u64::MAX),
        override_until: resolved
            .override_active
            .then(|| settings.fail_open_until.and_then(rfc3339))
            .flatten(),
        disabled: resolved.disabled,
        problems,
        breaker_open_workers: open,
        context: settings.context.clone(),
    })
}

fn rfc3339(t: SystemTime) -> Option<String> {
    OffsetDateTime::from(t).format(&Rfc3339).ok()
}

/// The `configuration` string of the Arbiter wasm filter in a listeners config dump.
fn find_plugin_config(v: &Value) -> Option<String> {
    match v {
        Value::Object(map) => {
            if map.get("root_id").and_then(Value::as_str) == Some("arbiter") {
                if let Some(cfg) = v.pointer("/configuration/value").and_then(Value::as_str) {
                    return Some(cfg.to_owned());
                }
            }
            map.values().find_map(find_plugin_config)
        }
        Value::Array(items) => items.iter().find_map(find_plugin_config),
        _ => None,
    }
}

/// The route named `name` in a route config dump.
fn find_route<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match v {
        Value::Object(map) => {
            if map.get("name").and_then(Value::as_str) == Some(name) && map.contains_key("match") {
                return Some(v);
            }
            map.values().find_map(|v| find_route(v, name))
        }
        Value::Array(items) => items.iter().find_map(|v| find_route(v, name)),
        _ => None,
    }
}

async fn through_envoy(http: &reqwest::Client, base: &str, opts: &ProbeOptions) -> Answer {
    let method =
        reqwest::Method::from_bytes(opts.method.as_bytes()).unwrap_or(reqwest::Method::GET);
    let mut req = http.request(
        method,
        format!("{}{}", base.trim_end_matches('/'), opts.path),
    );
    for (k, v) in &opts.headers {
        req = req.header(k, v);
    }
    if opts.method.eq_ignore_ascii_case("POST") {
        req = req
            .header("content-type", "application/json")
            .body(r#"{"model":"arbiter-probe","messages":[{"role":"user","content":"probe"}]}"#);
    }
    let started = Instant::now();
    let result = req.send().await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            return Answer {
                outcome: "error".into(),
                status: 0,
                detail: e.to_string(),
                latency_ms,
            }
        }
    };
    let status = i64::from(resp.status().as_u16());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let (outcome, detail) = match body["error"]["type"].as_str() {
        Some("policy_denied") => ("deny", body["error"]["policy_ids"].to_string()),
        Some("policy_unavailable") => (
            "fail_closed",
            body["error"]["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        _ => match body["arbiter_headers"]["x-arbiter-fail-open"].as_str() {
            // The demo's mock provider echoes the markers it received.
            Some(reason) => ("fail_open", reason.to_owned()),
            None => ("passed", String::new()),
        },
    };
    Answer {
        outcome: outcome.into(),
        status,
        detail,
        latency_ms,
    }
}

async fn direct_check(
    addr: &str,
    opts: &ProbeOptions,
    context: &[(String, String)],
) -> Result<Answer, ProbeError> {
    let err = |reason: String| ProbeError::Server {
        addr: addr.to_owned(),
        reason,
    };
    let mut headers = vec![
        (":method".to_owned(), opts.method.clone()),
        (":path".to_owned(), opts.path.clone()),
        (":authority".to_owned(), "arbiter-probe".to_owned()),
        (":scheme".to_owned(), "http".to_owned()),
        (
            "x-request-id".to_owned(),
            format!("arbiter-probe-{}", uuid::Uuid::now_v7()),
        ),
    ];
    headers.extend(opts.headers.iter().cloned());
    let info = RequestInfo {
        headers,
        route_name: opts.route.clone(),
        ..RequestInfo::default()
    };
    // The filter's own request mapping, re-read as envoy-types: the probe asks exactly what
    // the filter would ask.
    let bytes = build_check_request(&info, context, SystemTime::now()).encode_to_vec();
    let request = CheckRequest::decode(bytes.as_slice()).map_err(|e| err(e.to_string()))?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| err(e.to_string()))?
        .timeout(opts.timeout)
        .connect_timeout(opts.timeout);
    let started = Instant::now();
    let channel = endpoint.connect().await.map_err(|e| err(e.to_string()))?;
    let answer = match AuthorizationClient::new(channel).check(request).await {
        Ok(resp) => {
            let resp = resp.into_inner();
            let code = resp.status.as_ref().map_or(0, |s| s.code);
            let detail = match &resp.http_response {
                Some(HttpResponse::DeniedResponse(d)) => serde_json::from_str::<Value>(&d.body)
                    .map(|b| b["error"]["policy_ids"].to_string())
                    .unwrap_or_default(),
                _ => String::new(),
            };
            Answer {
                outcome: if code == 0 { "allow" } else { "deny" }.into(),
                status: i64::from(code),
                detail,
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            }
        }
        Err(status) => Answer {
            outcome: "error".into(),
            status: i64::from(i32::from(status.code())),
            detail: status.message().to_owned(),
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        },
    };
    Ok(answer)
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.route {
            let mode = if r.disabled {
                "disabled (no check)"
            } else {
                r.fail_mode
            };
            writeln!(
                f,
                "route `{}`: on failure {mode}, timeout {} ms",
                r.route, r.timeout_ms
            )?;
            match &r.override_until {
                Some(until) => writeln!(
                    f,
                    "  override: ACTIVE until {until} (failures pass, marked)"
                )?,
                None => writeln!(f, "  override: none")?,
            }
            for p in &r.problems {
                writeln!(f, "  INVALID: {p} (handled as closed)")?;
            }
            match r.breaker_open_workers {
                0 => writeln!(f, "  breaker: closed on every worker")?,
                n => writeln!(f, "  breaker: OPEN on {n} worker(s): failures answered at once with `breaker_open`")?,
            }
        }
        for (label, answer) in [
            ("through Envoy", &self.through_envoy),
            ("policy server", &self.direct),
        ] {
            if let Some(a) = answer {
                writeln!(
                    f,
                    "{label}: {} (status {}{}) in {:.1} ms",
                    a.outcome,
                    a.status,
                    if a.detail.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", a.detail)
                    },
                    a.latency_ms
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_plugin_config_and_routes_in_config_dumps() {
        let listeners = json!({"configs": [{"active_state": {"listener": {"filter_chains": [{"filters": [{"typed_config": {
            "http_filters": [{"name": "envoy.filters.http.wasm", "typed_config": {"config": {
                "root_id": "arbiter",
                "configuration": {"value": "{\"policy_cluster\":\"p\"}"}}}}]}}]}]}}}]});
        assert_eq!(
            find_plugin_config(&listeners).as_deref(),
            Some(r#"{"policy_cluster":"p"}"#)
        );
        assert!(find_plugin_config(&json!({"configs": []})).is_none());

        let routes = json!({"configs": [{"route_config": {"virtual_hosts": [{"name": "chat", "routes": [
            {"name": "chat", "match": {"prefix": "/v1"}, "metadata": {"filter_metadata": {"arbiter": {"fail_mode": "open"}}}}]}]}}]});
        let route = find_route(&routes, "chat").unwrap();
        assert_eq!(
            route["metadata"]["filter_metadata"]["arbiter"]["fail_mode"],
            "open"
        );
        assert!(find_route(&routes, "nope").is_none());
    }
}
