//! `arbiter validate DIR` and `arbiter check DIR <request>`: what a security team runs in CI
//! before shipping a bundle.
//!
//! `check` builds a real `CheckRequest` from a [`RequestSpec`] and decides it through the
//! same boundary ([`AuthzRequest::try_from`]) and engine the server uses, so what it prints
//! is what the server would answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cedar_policy::Authorizer;
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, Metadata, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    AttributeContext, CheckRequest,
};
use envoy_types::pb::google::protobuf::Timestamp;
use serde_json::{json, Map, Value};

use crate::bundle::{Bundle, BundleError};
use crate::engine::{cedar_datetime, Decision};
use crate::identity::{json_to_struct, API_KEY_HEADER, JWT_AUTHN_NAMESPACE, JWT_PAYLOAD_KEY};
use crate::request::{AuthzRequest, TimeSource, ROUTE_KEY};

/// Why a command could not run.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The bundle is invalid.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A file given on the command line cannot be read.
    #[error("cannot read `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The request is not valid.
    #[error("invalid request: {0}")]
    Request(String),
    /// The request could not be decided.
    #[error("cannot decide: {0}")]
    Decide(String),
}

/// A request to decide, as `check --request FILE` and the policy fixtures write it (JSON,
/// unknown fields refused). Every field is optional except `path`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// mTLS peer principal (SPIFFE ID).
    #[serde(default)]
    pub principal: Option<String>,
    /// Claims as `jwt_authn` would have verified them.
    #[serde(default)]
    pub jwt_claims: Option<Map<String, Value>>,
    /// API key, sent as `x-api-key`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// HTTP method; default `POST` with a body, else `GET`.
    #[serde(default)]
    pub method: Option<String>,
    /// Request path (with query, if any).
    pub path: String,
    /// Envoy route name.
    #[serde(default)]
    pub route: Option<String>,
    /// Route `context` metadata (`action` overrides the derived action).
    #[serde(default)]
    pub context: BTreeMap<String, String>,
    /// Request headers (e.g. `x-tenant-id`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Host; default `gateway.local`.
    #[serde(default)]
    pub host: Option<String>,
    /// Downstream address `ip:port`; default `127.0.0.1:40000`.
    #[serde(default)]
    pub source: Option<String>,
    /// JSON body (sent serialized).
    #[serde(default)]
    pub body: Option<Value>,
    /// Body as text (for bodies that are not JSON).
    #[serde(default)]
    pub body_text: Option<String>,
    /// The body was cut at the route's `max_body_bytes` (`x-envoy-auth-partial-body`).
    #[serde(default)]
    pub body_truncated: bool,
    /// The CheckRequest's `http.size`: the full body length when larger than what is sent,
    /// `-1` when unknown (a chunked body). Default: the length of the body sent (0 without
    /// one, a request without body).
    #[serde(default)]
    pub body_size: Option<i64>,
    /// Request time (RFC 3339); default now. Policy sees exactly this time, even one the
    /// server would replace by its own clock (more than 5 minutes from it).
    #[serde(default)]
    pub time: Option<String>,
    /// Body bytes as read from a file (`--body FILE`); wins over `body` and `body_text`.
    #[serde(skip)]
    pub raw_body: Option<Vec<u8>>,
}

impl RequestSpec {
    /// The body bytes to send, if any.
    pub fn body_bytes(&self) -> Option<Vec<u8>> {
        if let Some(raw) = &self.raw_body {
            return Some(raw.clone());
        }
        match (&self.body, &self.body_text) {
            (Some(json), _) => Some(json.to_string().into_bytes()),
            (None, Some(text)) => Some(text.clone().into_bytes()),
            (None, None) => None,
        }
    }

    /// `time`, parsed.
    fn stated_time(&self) -> Result<Option<time::OffsetDateTime>, CliError> {
        self.time
            .as_deref()
            .map(|time| {
                time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| CliError::Request(format!("`time` is not RFC 3339: {e}")))
            })
            .transpose()
    }

    /// The `CheckRequest` the Arbiter filter would send for this request.
    pub fn to_check_request(&self) -> Result<CheckRequest, CliError> {
        let body = self.body_bytes().unwrap_or_default();
        let method = self
            .method
            .clone()
            .unwrap_or_else(|| if body.is_empty() { "GET" } else { "POST" }.to_owned());
        let mut headers: std::collections::HashMap<String, String> = self
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        if let Some(key) = &self.api_key {
            headers.insert(API_KEY_HEADER.to_owned(), key.clone());
        }
        if self.body_truncated {
            headers.insert(crate::ai::PARTIAL_BODY_HEADER.to_owned(), "true".to_owned());
        }
        let mut context_extensions: std::collections::HashMap<String, String> = self
            .context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(route) = &self.route {
            context_extensions.insert(ROUTE_KEY.to_owned(), route.clone());
        }
        let source: std::net::SocketAddr = self
            .source
            .as_deref()
            .unwrap_or("127.0.0.1:40000")
            .parse()
            .map_err(|e| CliError::Request(format!("`source` must be `ip:port`: {e}")))?;
        let time = self.stated_time()?.map(|at| Timestamp {
            seconds: at.unix_timestamp(),
            nanos: i32::try_from(at.nanosecond()).unwrap_or(0),
        });
        let metadata_context = self.jwt_claims.as_ref().map(|claims| {
            let namespace = json!({ JWT_PAYLOAD_KEY: Value::Object(claims.clone()) });
            Metadata {
                filter_metadata: [(JWT_AUTHN_NAMESPACE.to_owned(), json_to_struct(&namespace))]
                    .into_iter()
                    .collect(),
                ..Default::default()
            }
        });
        // As the filter reports it: the exact length when known (0 for no body), else -1.
        let size = self
            .body_size
            .unwrap_or_else(|| i64::try_from(body.len()).unwrap_or(i64::MAX));
        Ok(CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: source.ip().to_string(),
                            port_specifier: Some(PortSpecifier::PortValue(u32::from(
                                source.port(),
                            ))),
                            ..Default::default()
                        })),
                    }),
                    principal: self.principal.clone().unwrap_or_default(),
                    ..Default::default()
                }),
                request: Some(Request {
                    time,
                    http: Some(HttpRequest {
                        id: "arbiter-check".to_owned(),
                        method,
                        path: self.path.clone(),
                        host: self
                            .host
                            .clone()
                            .unwrap_or_else(|| "gateway.local".to_owned()),
                        scheme: "http".to_owned(),
                        headers,
                        size,
                        raw_body: body,
                        ..Default::default()
                    }),
                }),
                context_extensions,
                metadata_context,
                ..Default::default()
            }),
        })
    }
}

/// Parses `key=value`.
pub fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected `key=value`, got `{text}`"))
}

/// Reads a request spec from a JSON file.
pub fn read_spec(path: &Path) -> Result<RequestSpec, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| CliError::Request(format!("`{}`: {e}", path.display())))
}

/// Summary of a valid bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// Version.
    pub version: String,
    /// Number of policies.
    pub policies: usize,
    /// Number of entities.
    pub entities: usize,
    /// Policies a request can leave out unevaluated (indexed by scope or condition), and
    /// of those, the ones indexed by condition (see the README's index section).
    pub indexed: (usize, usize),
}

/// `arbiter validate DIR`: loads the bundle as the server would.
pub fn validate(dir: &Path) -> Result<Validated, BundleError> {
    let bundle = Bundle::load(dir)?;
    Ok(Validated {
        version: bundle.version().to_owned(),
        policies: bundle.policy_count(),
        entities: bundle.entity_count(),
        indexed: bundle.policy_index().indexed(),
    })
}

/// What `arbiter check` found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The request as the server sees it.
    pub request: AuthzRequest,
    /// The decision.
    pub decision: Decision,
    /// Where each determining policy is defined (`file:line`).
    pub origins: Vec<(String, String)>,
}

/// `arbiter check DIR`: decides `spec` with the bundle in `dir`.
pub fn check(dir: &Path, spec: &RequestSpec) -> Result<CheckReport, CliError> {
    let bundle = Bundle::load(dir)?;
    check_with(&bundle, spec)
}

/// Decides `spec` with `bundle`.
pub fn check_with(bundle: &Bundle, spec: &RequestSpec) -> Result<CheckReport, CliError> {
    let mut request = AuthzRequest::try_from(spec.to_check_request()?)
        .map_err(|e| CliError::Request(e.to_string()))?;
    // `time` asks what policy decides at that time: it is the time policy sees, even one the
    // server would not take from a CheckRequest (see `request::request_time`).
    if let Some(at) = spec.stated_time()? {
        request.time = std::time::SystemTime::from(at);
        request.time_source = TimeSource::Request;
    }
    let decision = bundle
        .decide(&Authorizer::new(), &request)
        .map_err(|e| CliError::Decide(e.to_string()))?;
    let origins = decision
        .policy_ids
        .iter()
        .map(|id| {
            let at = bundle
                .origin(id)
                .map(ToString::to_string)
                .unwrap_or_default();
            (id.clone(), at)
        })
        .collect();
    Ok(CheckReport {
        request,
        decision,
        origins,
    })
}

impl CheckReport {
    /// Why, in one sentence (the deny message the client would see).
    pub fn reason(&self) -> String {
        if self.decision.allowed {
            let ids: Vec<String> = self
                .decision
                .policy_ids
                .iter()
                .map(|id| format!("`{id}`"))
                .collect();
            format!("allowed by {}", plural("policy", "policies", &ids))
        } else {
            crate::service::deny_message(&self.request, &self.decision)
        }
    }

    /// Human-readable report.
    pub fn to_text(&self) -> String {
        let d = &self.decision;
        let r = &self.request;
        let mut out = format!("{}\n", d.outcome());
        out.push_str(&format!("  reason:          {}\n", self.reason()));
        for (id, at) in &self.origins {
            out.push_str(&format!("  policy:          {id} ({at})\n"));
        }
        out.push_str(&format!(
            "  principal:       {} (identity: {})\n",
            d.principal,
            d.identity_source.as_str()
        ));
        out.push_str(&format!("  action:          {}\n", r.action));
        out.push_str(&format!(
            "  resource:        Arbiter::Route::\"{}\"\n",
            r.route
        ));
        let body = &r.body;
        if body.bytes > 0 || body.model.is_some() || !body.size_known {
            out.push_str(&format!(
                "  body:            {} bytes{}, model {}, truncated {}, parse error {}\n",
                body.bytes,
                if body.size_known {
                    ""
                } else {
                    " (at least: size unknown)"
                },
                body.model.as_deref().unwrap_or("-"),
                body.truncated,
                body.parse_error
            ));
        }
        out.push_str(&format!("  policy version:  {}\n", d.policy_version));
        for error in &d.errors {
            out.push_str(&format!("  skipped (error): {error}\n"));
        }
        out
    }

    /// Machine-readable report (`--json`).
    pub fn to_json(&self) -> Value {
        let d = &self.decision;
        let r = &self.request;
        json!({
            "decision": d.outcome(),
            "reason": self.reason(),
            "policy_ids": d.policy_ids,
            "policies": self.origins.iter().map(|(id, at)| json!({"id": id, "at": at})).collect::<Vec<_>>(),
            "errors": d.errors,
            "principal": d.principal,
            "identity_source": d.identity_source.as_str(),
            "action": r.action,
            "route": r.route,
            "model": r.body.model,
            "body_bytes": r.body.bytes,
            "body_size_known": r.body.size_known,
            "body_truncated": r.body.truncated,
            "body_parse_error": r.body.parse_error,
            "time": cedar_datetime(r.time),
            "policy_version": d.policy_version,
        })
    }
}

fn plural(one: &str, many: &str, items: &[String]) -> String {
    match items {
        [] => format!("no {one}"),
        [item] => format!("{one} {item}"),
        items => format!("{many} {}", items.join(", ")),
    }
}

/// Reads a body file for `--body`.
pub fn read_body(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })
}
