//! The active bundle from a remote source: an OCI registry or an HTTPS URL
//! (`--bundle-url`), see [`arbiter_bundle_source`].
//!
//! Every poll interval the source is asked whether anything changed (the HTTPS ETag, the OCI
//! manifest digest), and only a changed artifact is downloaded. A new artifact is verified
//! (pinned digest and/or signature) before it is unpacked (a hostile archive is refused),
//! then validated like a local bundle, and only then swapped in and persisted to the cache
//! directory as the new last-known-good. A failed download, verification, unpacking or
//! validation is a rejection exactly like a bad local push ([`crate::reload::apply`]): the
//! last-known-good keeps deciding, and the rejection is logged, counted, shown in `/status`
//! and in health. Consecutive failures back off: the next poll waits twice as long each
//! time, up to `--bundle-max-backoff`.
//!
//! At start the source is fetched once; if that fails (outage, rejection) the persisted
//! last-known-good is verified again and used. With neither, the server does not start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbiter_bundle_source::artifact::{self, DEFAULT_LIMITS};
use arbiter_bundle_source::cache::Cache;
use arbiter_bundle_source::{Digest, Fetch, Fetched, Source, Transport, Verifier};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::bundle::Bundle;
use crate::engine::PolicyEngine;
use crate::metrics::BundleRole;
use crate::reload::{self, StatusBoard, BUNDLE_HEALTH_SERVICE};

/// How a remote bundle is fetched and trusted.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Where from.
    pub source: Source,
    /// What it must satisfy.
    pub verifier: Verifier,
    /// The HTTPS client (CA, timeouts).
    pub transport: Transport,
    /// Where the last-known-good is persisted.
    pub cache: Cache,
    /// Poll interval.
    pub interval: Duration,
    /// Longest wait between polls after consecutive failures.
    pub max_backoff: Duration,
}

/// Polls the remote source and swaps verified, valid bundles in.
#[derive(Debug)]
pub struct Puller {
    config: RemoteConfig,
    origin: PathBuf,
    /// The source's change token of the bundle in use.
    token: Option<String>,
    /// The digest of the bundle in use.
    digest: Digest,
}

static UNPACKS: AtomicU64 = AtomicU64::new(0);

/// Verifies an artifact, unpacks it into a scratch directory in the cache and loads it as a
/// bundle. Blocking.
fn open(
    config: &RemoteConfig,
    bytes: &[u8],
    digest: &Digest,
    signature: Option<&[u8]>,
) -> Result<Bundle, String> {
    config
        .verifier
        .verify(digest, signature)
        .map_err(|e| e.to_string())?;
    let scratch = config.cache.dir().join(format!(
        ".unpack-{}-{}",
        std::process::id(),
        UNPACKS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    let loaded = artifact::unpack(bytes, &scratch, DEFAULT_LIMITS)
        .map_err(|e| format!("bundle {digest}: {e}"))
        .and_then(|_| {
            Bundle::load(&scratch)
                .map_err(|e| format!("bundle {digest}: {}", crate::schema::error_chain(&e)))
        });
    let _ = std::fs::remove_dir_all(&scratch);
    loaded
}

async fn open_async(config: &RemoteConfig, fetched: &Fetched) -> Result<Bundle, String> {
    let config = config.clone();
    let fetched = fetched.clone();
    tokio::task::spawn_blocking(move || {
        open(
            &config,
            &fetched.bytes,
            &fetched.digest,
            fetched.signature.as_deref(),
        )
    })
    .await
    .unwrap_or_else(|join| Err(format!("bundle load failed: {join}")))
}

fn persist(cache: &Cache, fetched: &Fetched) {
    match cache.store(&fetched.bytes, fetched.signature.as_deref()) {
        Ok(digest) => tracing::info!(
            %digest,
            cache = %cache.dir().display(),
            "persisted the policy bundle as last-known-good"
        ),
        Err(e) => tracing::error!(
            cache = %cache.dir().display(),
            "cannot persist the policy bundle as last-known-good (a restart during an outage would not find it): {e}"
        ),
    }
}

impl Puller {
    /// The first bundle: fetched from the source, else the persisted last-known-good
    /// (verified again); an error naming both failures when neither is usable.
    pub async fn start(config: RemoteConfig) -> Result<(Bundle, Self), String> {
        let origin = PathBuf::from(config.source.to_string());
        let fetched = config
            .source
            .fetch(
                &config.transport,
                None,
                config.verifier.needs_signature(),
                DEFAULT_LIMITS.max_bytes,
            )
            .await;
        let fetch_error = match fetched {
            Ok(Fetch::New(fetched)) => match open_async(&config, &fetched).await {
                Ok(bundle) => {
                    tracing::info!(source = %config.source, digest = %fetched.digest, "policy bundle fetched");
                    persist(&config.cache, &fetched);
                    let puller = Self {
                        origin,
                        token: fetched.token.clone(),
                        digest: fetched.digest,
                        config,
                    };
                    return Ok((bundle, puller));
                }
                Err(e) => e,
            },
            Ok(Fetch::Unchanged) => {
                "the source answered `not modified` to a first fetch".to_owned()
            }
            Err(e) => e.to_string(),
        };
        tracing::warn!(
            source = %config.source,
            "cannot use the policy bundle from the source, trying the persisted last-known-good: {fetch_error}"
        );
        let cache_error = match config.cache.load() {
            Ok(Some(cached)) => {
                let loaded = {
                    let config = config.clone();
                    let cached = cached.clone();
                    tokio::task::spawn_blocking(move || {
                        open(
                            &config,
                            &cached.bytes,
                            &cached.digest,
                            cached.signature.as_deref(),
                        )
                    })
                    .await
                    .unwrap_or_else(|join| Err(format!("bundle load failed: {join}")))
                };
                match loaded {
                    Ok(bundle) => {
                        tracing::warn!(
                            digest = %cached.digest,
                            cache = %config.cache.dir().display(),
                            "starting with the persisted last-known-good policy bundle"
                        );
                        let puller = Self {
                            origin,
                            token: None,
                            digest: cached.digest,
                            config,
                        };
                        return Ok((bundle, puller));
                    }
                    Err(e) => e,
                }
            }
            Ok(None) => "none persisted yet".to_owned(),
            Err(e) => e.to_string(),
        };
        Err(format!(
            "no policy bundle to start with: from `{}`: {fetch_error}; persisted last-known-good in `{}`: {cache_error}",
            config.source,
            config.cache.dir().display()
        ))
    }

    /// What `/status` and the logs name as the bundle's origin: the source.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// How long to wait before the next poll after `failures` consecutive failures.
    fn delay(&self, failures: u32) -> Duration {
        let interval = self.config.interval;
        let backed_off = interval.saturating_mul(1u32 << failures.min(16));
        backed_off.min(self.config.max_backoff.max(interval))
    }

    /// Polls until the task is dropped.
    pub async fn run(
        mut self,
        engine: Arc<PolicyEngine>,
        status: Arc<StatusBoard>,
        health: Option<HealthReporter>,
    ) {
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(self.delay(failures)).await;
            let fetched = self
                .config
                .source
                .fetch(
                    &self.config.transport,
                    self.token.as_deref(),
                    self.config.verifier.needs_signature(),
                    DEFAULT_LIMITS.max_bytes,
                )
                .await;
            let loaded = match fetched {
                Ok(Fetch::Unchanged) => {
                    if failures > 0 {
                        // The source is back with the bundle in use.
                        failures = 0;
                        status.current(BundleRole::Active);
                        if let Some(health) = &health {
                            health
                                .set_service_status(BUNDLE_HEALTH_SERVICE, ServingStatus::Serving)
                                .await;
                        }
                    }
                    continue;
                }
                Ok(Fetch::New(fetched)) => match open_async(&self.config, &fetched).await {
                    Ok(bundle) => {
                        if fetched.digest != self.digest {
                            persist(&self.config.cache, &fetched);
                            self.digest = fetched.digest;
                        }
                        self.token = fetched.token;
                        Ok(bundle)
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(format!("cannot fetch the policy bundle: {e}")),
            };
            failures = if loaded.is_ok() {
                0
            } else {
                failures.saturating_add(1)
            };
            reload::apply(
                BundleRole::Active,
                &self.origin,
                loaded,
                &engine,
                &status,
                health.as_ref(),
            )
            .await;
        }
    }
}
