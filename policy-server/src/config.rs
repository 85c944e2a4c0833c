//! Command-line flags; each one can also be set with an `ARBITER_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::audit::checkpoint::{self, CheckpointError};
use crate::audit::{
    AuditConfig, AuditSync, Checkpointing, DEFAULT_CHECKPOINT_EVERY, DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_MAX_BYTES,
};
use arbiter_bundle_source::auth::{Auth, CredentialsFile};
use arbiter_bundle_source::cache::Cache;
use arbiter_bundle_source::{signature, Digest, Source, Transport, Verifier};

use crate::health::{self, HealthConfig};
use crate::pull::RemoteConfig;

/// Default `--bundle-poll-interval`.
pub const DEFAULT_BUNDLE_POLL_INTERVAL: Duration = Duration::from_secs(30);
/// Default `--bundle-max-backoff`.
pub const DEFAULT_BUNDLE_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Default `--bundle-timeout`.
pub const DEFAULT_BUNDLE_TIMEOUT: Duration = Duration::from_secs(30);
use crate::trace::TraceConfig;

/// Server configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "arbiter-policy-server", version, about)]
pub struct Config {
    /// Address to serve gRPC (ext_authz and health) on.
    #[arg(long, env = "ARBITER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Policy bundle directory (`*.cedar`, optional `*.cedarschema`, `entities.json` and
    /// `bundle.toml`). Reloaded when it changes; an invalid change is rejected and the last
    /// good bundle keeps deciding. Either this or `--bundle-url`.
    #[arg(
        long,
        env = "ARBITER_POLICIES",
        required_unless_present = "bundle_url",
        conflicts_with = "bundle_url"
    )]
    pub policies: Option<PathBuf>,
    /// Pull the policy bundle from a remote source instead of a directory:
    /// `oci://REGISTRY/REPOSITORY[:TAG|@sha256:DIGEST]` (an OCI artifact pushed by `arbiter
    /// bundle push`) or an `https://` URL of a bundle artifact (signature at URL`.sig`).
    /// Needs `--bundle-cache` and `--bundle-public-key` and/or `--bundle-digest`.
    #[arg(long, env = "ARBITER_BUNDLE_URL", value_parser = clap::value_parser!(Source), requires = "bundle_cache")]
    pub bundle_url: Option<Source>,
    /// Only the bundle artifact of this digest (`sha256:…`, printed by `arbiter bundle
    /// build`) is accepted from `--bundle-url`.
    #[arg(long, env = "ARBITER_BUNDLE_DIGEST", value_parser = clap::value_parser!(Digest), requires = "bundle_url")]
    pub bundle_digest: Option<Digest>,
    /// PEM P-256 public key (`openssl pkey -pubout`): a bundle from `--bundle-url` is
    /// accepted only with a valid signature by its private key (`arbiter bundle sign`).
    #[arg(
        long,
        env = "ARBITER_BUNDLE_PUBLIC_KEY",
        value_name = "PATH",
        requires = "bundle_url"
    )]
    pub bundle_public_key: Option<PathBuf>,
    /// Directory where the last verified bundle from `--bundle-url` is kept (with its
    /// signature), so a restart during an outage of the source starts with it.
    #[arg(
        long,
        env = "ARBITER_BUNDLE_CACHE",
        value_name = "DIR",
        requires = "bundle_url"
    )]
    pub bundle_cache: Option<PathBuf>,
    /// PEM file of CA certificates trusted for `--bundle-url`, besides the built-in web PKI
    /// roots (a private registry's CA).
    #[arg(
        long,
        env = "ARBITER_BUNDLE_CA_CERT",
        value_name = "PATH",
        requires = "bundle_url"
    )]
    pub bundle_ca_cert: Option<PathBuf>,
    /// Registry credentials for an `oci://` `--bundle-url`: a Docker `config.json`
    /// (`{"auths": {"REGISTRY[:PORT]": {"auth": "BASE64(user:password)"}}}` or `username` and
    /// `password`), e.g. a mounted `kubernetes.io/dockerconfigjson` Secret. Read again on every
    /// poll (rotation); unreadable or invalid at start: the server does not start.
    #[arg(
        long,
        env = "ARBITER_BUNDLE_AUTH_FILE",
        value_name = "PATH",
        requires = "bundle_url"
    )]
    pub bundle_auth_file: Option<PathBuf>,
    /// How often `--bundle-url` is polled for a change (ETag / manifest digest).
    #[arg(long, env = "ARBITER_BUNDLE_POLL_INTERVAL", default_value = "30s", value_parser = health::parse_duration)]
    pub bundle_poll_interval: Duration,
    /// Longest wait between polls after consecutive failures (the wait doubles per failure).
    #[arg(long, env = "ARBITER_BUNDLE_MAX_BACKOFF", default_value = "300s", value_parser = health::parse_duration)]
    pub bundle_max_backoff: Duration,
    /// Bound on each request to `--bundle-url` (connect, download).
    #[arg(long, env = "ARBITER_BUNDLE_TIMEOUT", default_value = "30s", value_parser = health::parse_duration)]
    pub bundle_timeout: Duration,
    /// Candidate bundle evaluated beside the active one on every request, in shadow: it never
    /// changes the answer; disagreements are counted and recorded on the decision.
    #[arg(long, env = "ARBITER_SHADOW_POLICIES")]
    pub shadow_policies: Option<PathBuf>,
    /// Address to serve Prometheus metrics (`GET /metrics`) and reload status (`GET
    /// /status`) on, over HTTP.
    #[arg(long, env = "ARBITER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// How often to check the bundle directories for changes, in milliseconds (0: never).
    #[arg(long, env = "ARBITER_RELOAD_INTERVAL_MS", default_value_t = 250)]
    pub reload_interval_ms: u64,
    /// Log line format (logs go to stderr).
    #[arg(long, env = "ARBITER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` env-filter syntax (e.g. `info,arbiter::decision=debug`).
    #[arg(long, env = "ARBITER_LOG", default_value = "info")]
    pub log: String,
    /// Audit log file: one hash-chained JSON record per decision, written before the answer.
    /// Rotated files sit beside it as `<PATH>.<first seq>`.
    #[arg(long, env = "ARBITER_AUDIT_LOG")]
    pub audit_log: PathBuf,
    /// When a record counts as written: `fsync` (survives power loss) or `write` (survives
    /// a crash of the server only).
    #[arg(long, env = "ARBITER_AUDIT_SYNC", value_enum, default_value_t = AuditSync::Fsync)]
    pub audit_sync: AuditSync,
    /// Rotate the audit log once it reaches this many bytes.
    #[arg(long, env = "ARBITER_AUDIT_MAX_BYTES", default_value_t = DEFAULT_MAX_BYTES, value_parser = clap::value_parser!(u64).range(4096..))]
    pub audit_max_bytes: u64,
    /// PKCS#8 PEM P-256 private key that signs audit checkpoints into
    /// `<audit log>.checkpoints` (what `arbiter audit verify --key` proves completeness with).
    /// Without it no checkpoints are written.
    #[arg(long, env = "ARBITER_AUDIT_SIGNING_KEY", value_name = "PATH")]
    pub audit_signing_key: Option<PathBuf>,
    /// A signed checkpoint after this many records (also at rotation and shutdown).
    #[arg(long, env = "ARBITER_AUDIT_CHECKPOINT_EVERY", default_value_t = DEFAULT_CHECKPOINT_EVERY, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_checkpoint_every: u64,
    /// A signed checkpoint at the latest this many seconds after the oldest unsigned record.
    #[arg(long, env = "ARBITER_AUDIT_CHECKPOINT_INTERVAL_SECS", default_value_t = DEFAULT_CHECKPOINT_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_checkpoint_interval_secs: u64,
    /// Extra header whose value is never recorded (repeatable; comma-separated in the
    /// environment variable). `authorization`, `cookie`, `x-api-key` and names containing
    /// `auth`, `key`, `token`, `secret`, … are always redacted.
    #[arg(
        long = "redact-header",
        env = "ARBITER_REDACT_HEADERS",
        value_delimiter = ','
    )]
    pub redact_headers: Vec<String>,
    /// JWT claims recorded in audit records (repeatable; comma-separated in the environment
    /// variable). Default: `iss`, `sub` and the bundle's tenant and groups claims, the ones
    /// policy decides on; `*` records every claim. `iss` and `sub` are always recorded.
    #[arg(
        long = "audit-jwt-claims",
        env = "ARBITER_AUDIT_JWT_CLAIMS",
        value_delimiter = ',',
        value_name = "CLAIM"
    )]
    pub audit_jwt_claims: Vec<String>,
    /// Route name that gets its own `route` label in metrics, beside the routes the bundle
    /// names (repeatable; comma-separated in the environment variable). Other routes are
    /// counted as `_other`.
    #[arg(
        long = "metrics-route",
        env = "ARBITER_METRICS_ROUTES",
        value_delimiter = ',',
        value_name = "ROUTE",
        value_parser = route_name
    )]
    pub metrics_routes: Vec<String>,
    /// OTLP/gRPC logs receiver to ship audit records to, e.g. `http://127.0.0.1:4317`.
    #[arg(long, env = "ARBITER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How often health decides a synthetic request through the engine (`1s`, `500ms`).
    #[arg(long, env = "ARBITER_HEALTH_INTERVAL", default_value = "1s", value_parser = health::parse_duration)]
    pub health_interval: Duration,
    /// Bound on one synthetic decision; a slower one turns health NOT_SERVING (`250ms`).
    #[arg(long, env = "ARBITER_HEALTH_DECISION_TIMEOUT", default_value = "250ms", value_parser = health::parse_duration)]
    pub health_decision_timeout: Duration,
    /// OTLP/gRPC traces receiver for one span per decision, e.g. `http://127.0.0.1:4317`
    /// (off by default; `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is used when this is not set).
    #[arg(long, env = "ARBITER_OTLP_TRACES_ENDPOINT")]
    pub otlp_traces_endpoint: Option<String>,
    /// Share of new traces (requests without a valid `traceparent`) that are sampled, 0–1.
    /// Requests with a `traceparent` follow its sampled flag.
    #[arg(long, env = "ARBITER_OTLP_TRACES_SAMPLE_RATIO", default_value_t = 1.0, value_parser = sample_ratio)]
    pub otlp_traces_sample_ratio: f64,
}

/// A route name for `--metrics-route`: 1-256 characters, no whitespace or control
/// characters (as Envoy route names are written).
fn route_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    if name.is_empty()
        || name.len() > 256
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`{}` is not a route name (1-256 characters, no whitespace or control characters)",
            text.escape_debug()
        ));
    }
    Ok(name.to_owned())
}

impl Config {
    /// A configuration with the defaults, serving `policies` and auditing to `audit_log`.
    pub fn new(
        listen: SocketAddr,
        policies: impl Into<PathBuf>,
        audit_log: impl Into<PathBuf>,
    ) -> Self {
        Self {
            listen,
            policies: Some(policies.into()),
            bundle_url: None,
            bundle_digest: None,
            bundle_public_key: None,
            bundle_cache: None,
            bundle_ca_cert: None,
            bundle_auth_file: None,
            bundle_poll_interval: DEFAULT_BUNDLE_POLL_INTERVAL,
            bundle_max_backoff: DEFAULT_BUNDLE_MAX_BACKOFF,
            bundle_timeout: DEFAULT_BUNDLE_TIMEOUT,
            shadow_policies: None,
            metrics_listen: None,
            reload_interval_ms: 250,
            log_format: LogFormat::Plain,
            log: "info".to_owned(),
            audit_log: audit_log.into(),
            audit_sync: AuditSync::Fsync,
            audit_max_bytes: DEFAULT_MAX_BYTES,
            audit_signing_key: None,
            audit_checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            audit_checkpoint_interval_secs: DEFAULT_CHECKPOINT_INTERVAL.as_secs(),
            redact_headers: Vec::new(),
            audit_jwt_claims: Vec::new(),
            metrics_routes: Vec::new(),
            otlp_endpoint: None,
            health_interval: health::DEFAULT_INTERVAL,
            health_decision_timeout: health::DEFAULT_DECISION_TIMEOUT,
            otlp_traces_endpoint: None,
            otlp_traces_sample_ratio: 1.0,
        }
    }

    /// The audit record's JWT claims allow-list.
    pub fn audit_claims(&self) -> Result<crate::audit::ClaimAllowList, String> {
        crate::audit::ClaimAllowList::parse(&self.audit_jwt_claims)
    }

    /// The remote bundle source's part of the configuration (keys and CA loaded), if
    /// `--bundle-url` is set.
    pub fn remote(&self) -> Result<Option<RemoteConfig>, String> {
        let Some(source) = &self.bundle_url else {
            return Ok(None);
        };
        let key = match &self.bundle_public_key {
            Some(path) => Some(signature::load_verifying_key(path).map_err(|e| e.to_string())?),
            None => None,
        };
        let verifier = Verifier::new(self.bundle_digest, key).ok_or_else(|| {
            format!("`--bundle-url {source}` needs `--bundle-public-key` or `--bundle-digest`: an unverified bundle is never used")
        })?;
        let cache_dir = self
            .bundle_cache
            .as_ref()
            .ok_or("`--bundle-url` needs `--bundle-cache`")?;
        let cache = Cache::open(cache_dir).map_err(|e| {
            format!(
                "cannot open the bundle cache `{}`: {e}",
                cache_dir.display()
            )
        })?;
        let mut transport = Transport::new(self.bundle_ca_cert.as_deref(), self.bundle_timeout)
            .map_err(|e| e.to_string())?;
        if let Some(path) = &self.bundle_auth_file {
            let registry = match source {
                Source::Oci(reference) => Some(reference.registry.as_str()),
                Source::Https(_) => None,
            };
            let file = CredentialsFile::open(path, registry).map_err(|e| e.to_string())?;
            transport = transport.with_auth(Auth::with_file(file));
        }
        Ok(Some(RemoteConfig {
            source: source.clone(),
            verifier,
            transport,
            cache,
            interval: self.bundle_poll_interval,
            max_backoff: self.bundle_max_backoff,
        }))
    }

    /// The health monitor's part of the configuration.
    pub fn health(&self) -> HealthConfig {
        HealthConfig {
            interval: self.health_interval,
            decision_timeout: self.health_decision_timeout,
        }
    }

    /// Where to export traces: `--otlp-traces-endpoint`, else a non-empty
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `None`: tracing is off.
    pub fn traces(&self) -> Option<TraceConfig> {
        let endpoint = self.otlp_traces_endpoint.clone().or_else(|| {
            std::env::var(crate::trace::OTEL_TRACES_ENDPOINT_ENV)
                .ok()
                .filter(|e| !e.trim().is_empty())
        })?;
        let mut config = TraceConfig::new(endpoint);
        config.root_sample_ratio = self.otlp_traces_sample_ratio;
        Some(config)
    }

    /// The audit writer's part of the configuration (the signing key loaded).
    pub fn audit(&self) -> Result<AuditConfig, CheckpointError> {
        let checkpoints = match &self.audit_signing_key {
            Some(path) => Some(Checkpointing {
                key: checkpoint::load_signing_key(path)?,
                every: self.audit_checkpoint_every,
                interval: Duration::from_secs(self.audit_checkpoint_interval_secs),
            }),
            None => None,
        };
        Ok(AuditConfig {
            path: self.audit_log.clone(),
            sync: self.audit_sync,
            max_bytes: self.audit_max_bytes,
            checkpoints,
        })
    }
}

fn sample_ratio(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("`{value}` is not a ratio between 0 and 1")),
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_and_defaults() {
        let config = Config::try_parse_from([
            "arbiter-policy-server",
            "--policies",
            "p",
            "--audit-log",
            "a.jsonl",
        ])
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(config.audit_sync, AuditSync::Fsync);
        assert_eq!(config.audit_max_bytes, DEFAULT_MAX_BYTES);
        assert_eq!(config.policies, Some(PathBuf::from("p")));
        assert_eq!(config.bundle_poll_interval, DEFAULT_BUNDLE_POLL_INTERVAL);
        assert_eq!(config.bundle_max_backoff, DEFAULT_BUNDLE_MAX_BACKOFF);
        assert_eq!(config.bundle_timeout, DEFAULT_BUNDLE_TIMEOUT);
        assert!(config.remote().unwrap().is_none());
        assert_eq!(config.log_format, LogFormat::Plain);
        assert_eq!(config.shadow_policies, None);
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.reload_interval_ms, 250);
        assert_eq!(config.health(), HealthConfig::default());
        assert_eq!(
            Config::new(config.listen, "p", "a.jsonl").health(),
            HealthConfig::default()
        );
        let config = Config::try_parse_from([
            "arbiter-policy-server",
            "--policies",
            "p",
            "--listen",
            "0.0.0.0:9000",
            "--log-format",
            "json",
            "--audit-log",
            "a.jsonl",
            "--audit-sync",
            "write",
            "--redact-header",
            "X-Pin",
            "--redact-header",
            "x-other",
            "--health-interval",
            "200ms",
            "--health-decision-timeout",
            "50ms",
        ])
        .unwrap();
        assert_eq!(config.health_interval, Duration::from_millis(200));
        assert_eq!(config.health_decision_timeout, Duration::from_millis(50));
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.audit_sync, AuditSync::Write);
        assert_eq!(config.redact_headers, ["X-Pin", "x-other"]);
        assert_eq!(config.otlp_traces_endpoint, None);
        assert_eq!(config.otlp_traces_sample_ratio, 1.0);
        let traced = |extra: &[&str]| {
            let base = [
                "arbiter-policy-server",
                "--policies",
                "p",
                "--audit-log",
                "a",
            ];
            Config::try_parse_from(base.iter().chain(extra))
        };
        let config = traced(&[
            "--otlp-traces-endpoint",
            "http://collector:4317",
            "--otlp-traces-sample-ratio",
            "0.25",
        ])
        .unwrap();
        let traces = config.traces().unwrap();
        assert_eq!(traces.endpoint, "http://collector:4317");
        assert_eq!(traces.root_sample_ratio, 0.25);
        assert!(traced(&["--otlp-traces-sample-ratio", "1.5"]).is_err());
        assert!(traced(&["--otlp-traces-sample-ratio", "-0.1"]).is_err());
        assert!(Config::try_parse_from(["arbiter-policy-server"]).is_err());
        // A remote source instead of a directory, never both, and never without a cache.
        let remote = |extra: &[&str]| {
            let base = ["arbiter-policy-server", "--audit-log", "a"];
            Config::try_parse_from(base.iter().chain(extra))
        };
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let cache = cache.to_str().unwrap();
        let url = "oci://registry.example/team/policies:prod";
        let pin = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let config = remote(&[
            "--bundle-url",
            url,
            "--bundle-cache",
            cache,
            "--bundle-digest",
            pin,
        ])
        .unwrap();
        assert_eq!(config.policies, None);
        let remote_config = config.remote().unwrap().unwrap();
        assert_eq!(remote_config.source.to_string(), url);
        assert!(!remote_config.verifier.needs_signature());
        assert!(remote(&[
            "--bundle-url",
            url,
            "--bundle-cache",
            cache,
            "--policies",
            "p"
        ])
        .is_err());
        assert!(remote(&["--bundle-url", url]).is_err());
        assert!(remote(&[
            "--bundle-url",
            "http://insecure.example/b.tar.gz",
            "--bundle-cache",
            cache
        ])
        .is_err());
        assert!(remote(&[
            "--bundle-url",
            url,
            "--bundle-cache",
            cache,
            "--bundle-digest",
            "sha256:00"
        ])
        .is_err());
        // Neither a pin nor a key: refused (clear error at start).
        let unverified = remote(&["--bundle-url", url, "--bundle-cache", cache]).unwrap();
        assert!(unverified.remote().unwrap_err().contains("unverified"));
        // Every decision is recorded: there is no running without an audit log.
        assert!(Config::try_parse_from(["arbiter-policy-server", "--policies", "p"]).is_err());
    }
}
