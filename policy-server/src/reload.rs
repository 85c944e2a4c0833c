//! Hot reload with last-known-good.
//!
//! Each bundle directory (active, and shadow if any) is polled every interval. Polling,
//! rather than file-system notifications, sees every way a bundle changes — editors that
//! write a temporary file and rename it, `git checkout`, Kubernetes ConfigMap symlink swaps,
//! network file systems — and costs one `stat` per bundle file per interval.
//!
//! A change is loaded once the directory has stayed the same for one more interval
//! (debounce: a burst of writes is loaded once, at its end). The whole bundle is then parsed
//! and validated off the async runtime; only a valid bundle is swapped in (atomically, see
//! [`crate::engine`]). An invalid, half-written or empty bundle is rejected: the
//! last-known-good bundle keeps deciding, and the rejection is logged with the exact error,
//! counted (`arbiter_bundle_reloads_total{result="rejected"}`), shown as
//! `arbiter_bundle_rejected 1`, in `GET /status` and as `NOT_SERVING` of the health service
//! [`BUNDLE_HEALTH_SERVICE`], until a valid bundle is loaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::bundle::{is_bundle_file, Bundle};
use crate::engine::{cedar_datetime, PolicyEngine};
use crate::metrics::BundleRole;

/// gRPC health service name that is `SERVING` while the active bundle on disk is the one in
/// use, and `NOT_SERVING` while a newer one on disk is rejected.
pub const BUNDLE_HEALTH_SERVICE: &str = "arbiter.PolicyBundle";

/// One bundle file as a reload sees it: name, size, modification time, inode.
type FileStamp = (String, u64, Option<SystemTime>, u64);

/// What a reload saw of a bundle directory: each bundle file's name, size, modification
/// time and inode (symlinks followed). Any write changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(Result<Vec<FileStamp>, String>);

impl Fingerprint {
    /// The fingerprint of `dir` now. A directory that cannot be read has a fingerprint too
    /// (its error), so its disappearance is a change that gets loaded and rejected.
    pub fn of(dir: &Path) -> Self {
        let read = || -> std::io::Result<Vec<FileStamp>> {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if !is_bundle_file(&path) {
                    continue;
                }
                let Ok(meta) = path.metadata() else {
                    continue;
                };
                #[cfg(unix)]
                let inode = std::os::unix::fs::MetadataExt::ino(&meta);
                #[cfg(not(unix))]
                let inode = 0;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                files.push((name, meta.len(), meta.modified().ok(), inode));
            }
            files.sort();
            Ok(files)
        };
        Self(read().map_err(|e| e.to_string()))
    }
}

/// Reload state of one bundle, for `/status`.
#[derive(Debug, Clone)]
struct BundleStatus {
    dir: PathBuf,
    version: String,
    policies: usize,
    loaded_at: SystemTime,
    reloads: u64,
    rejections: u64,
    rejected: Option<(SystemTime, String)>,
}

/// The reload state of every bundle, shared with `/status`.
#[derive(Debug, Default)]
pub struct StatusBoard {
    bundles: Mutex<HashMap<BundleRole, BundleStatus>>,
}

impl StatusBoard {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<BundleRole, BundleStatus>) -> R) -> R {
        f(&mut self.bundles.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// `bundle` from `dir` is in use as `role`.
    pub fn loaded(&self, role: BundleRole, dir: &Path, bundle: &Bundle) {
        self.with(|bundles| {
            let entry = bundles.entry(role).or_insert_with(|| BundleStatus {
                dir: dir.to_owned(),
                version: String::new(),
                policies: 0,
                loaded_at: SystemTime::now(),
                reloads: 0,
                rejections: 0,
                rejected: None,
            });
            if !entry.version.is_empty() {
                entry.reloads += 1;
            }
            entry.version = bundle.version().to_owned();
            entry.policies = bundle.policy_count();
            entry.loaded_at = SystemTime::now();
            entry.rejected = None;
        });
    }

    /// The bundle on disk for `role` was rejected with `error`.
    pub fn rejected(&self, role: BundleRole, error: &str) {
        self.with(|bundles| {
            if let Some(entry) = bundles.get_mut(&role) {
                entry.rejections += 1;
                entry.rejected = Some((SystemTime::now(), error.to_owned()));
            }
        });
    }

    /// The bundle on disk for `role` is again the one in use (a change back to it).
    pub fn current(&self, role: BundleRole) {
        self.with(|bundles| {
            if let Some(entry) = bundles.get_mut(&role) {
                entry.rejected = None;
            }
        });
    }

    /// The last rejection error of `role`, while its bundle on disk is rejected.
    pub fn rejection(&self, role: BundleRole) -> Option<String> {
        self.with(|bundles| {
            bundles
                .get(&role)
                .and_then(|b| b.rejected.as_ref().map(|(_, e)| e.clone()))
        })
    }

    /// The board as JSON: `{"active": {...}, "shadow": {...} | null}`.
    pub fn to_json(&self) -> Value {
        self.with(|bundles| {
            let one = |role| {
                bundles.get(&role).map_or(Value::Null, |b: &BundleStatus| {
                    json!({
                        "dir": b.dir.display().to_string(),
                        "version": b.version,
                        "policies": b.policies,
                        "loaded_at": cedar_datetime(b.loaded_at),
                        "reloads": b.reloads,
                        "rejections": b.rejections,
                        "state": if b.rejected.is_some() { "rejected" } else { "current" },
                        "rejected": b.rejected.as_ref().map(|(at, error)| json!({
                            "at": cedar_datetime(*at),
                            "error": error,
                        })),
                    })
                })
            };
            json!({
                "active": one(BundleRole::Active),
                "shadow": one(BundleRole::Shadow),
            })
        })
    }
}

/// Watches one bundle directory and swaps valid changes into the engine.
#[derive(Debug)]
pub struct Watch {
    role: BundleRole,
    dir: PathBuf,
    seen: Fingerprint,
}

impl Watch {
    /// Fingerprints `dir` now: take it before loading the bundle, so that a change made
    /// while the first load runs is seen as a change.
    pub fn new(role: BundleRole, dir: &Path) -> Self {
        Self {
            role,
            dir: dir.to_owned(),
            seen: Fingerprint::of(dir),
        }
    }

    /// Polls every `interval` until the task is dropped.
    pub async fn run(
        mut self,
        interval: Duration,
        engine: Arc<PolicyEngine>,
        status: Arc<StatusBoard>,
        health: Option<HealthReporter>,
    ) {
        let mut pending: Option<Fingerprint> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let dir = self.dir.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || Fingerprint::of(&dir)).await else {
                continue;
            };
            if now == self.seen {
                pending = None;
                continue;
            }
            // Debounce: load once the directory stood still for one interval.
            if pending.as_ref() != Some(&now) {
                pending = Some(now);
                continue;
            }
            pending = None;
            self.seen = now;
            self.reload(&engine, &status, health.as_ref()).await;
        }
    }

    async fn reload(
        &self,
        engine: &PolicyEngine,
        status: &StatusBoard,
        health: Option<&HealthReporter>,
    ) {
        let dir = self.dir.clone();
        let loaded = match tokio::task::spawn_blocking(move || Bundle::load(&dir)).await {
            Ok(Ok(bundle)) => Ok(bundle),
            Ok(Err(error)) => Err(crate::schema::error_chain(&error)),
            // The load task panicked (a bug in a dependency): same as a rejection.
            Err(join) => Err(format!("bundle load failed: {join}")),
        };
        apply(self.role, &self.dir, loaded, engine, status, health).await;
    }
}

/// Swaps a newly loaded bundle of `role` from `origin` (a directory, or a remote source)
/// into the engine, or, for a rejection (`Err` with the exact error), keeps the
/// last-known-good; either way logged, counted, shown in `/status` and in health.
pub async fn apply(
    role: BundleRole,
    origin: &Path,
    loaded: Result<Bundle, String>,
    engine: &PolicyEngine,
    status: &StatusBoard,
    health: Option<&HealthReporter>,
) {
    let metrics = engine.metrics();
    let current = match role {
        BundleRole::Active => Some(engine.bundle()),
        BundleRole::Shadow => engine.shadow(),
    };
    match loaded {
        Ok(bundle) => {
            if current.is_some_and(|c| c.version() == bundle.version()) {
                // Same content (a touch, or a change reverted): nothing to swap.
                status.current(role);
            } else {
                let bundle = Arc::new(bundle);
                status.loaded(role, origin, &bundle);
                tracing::info!(
                    bundle = role.as_str(),
                    policy_version = bundle.version(),
                    policies = bundle.policy_count(),
                    dir = %origin.display(),
                    "policy bundle reloaded"
                );
                match role {
                    BundleRole::Active => {
                        engine.replace(bundle);
                    }
                    BundleRole::Shadow => engine.set_shadow(Some(bundle)),
                }
            }
            metrics.reload(role, true);
            set_health(health, role, ServingStatus::Serving).await;
        }
        Err(message) => {
            let kept = current.map(|c| c.version().to_owned()).unwrap_or_default();
            tracing::error!(
                bundle = role.as_str(),
                dir = %origin.display(),
                kept_version = %kept,
                "policy bundle rejected, keeping the last good one: {message}"
            );
            status.rejected(role, &message);
            metrics.reload(role, false);
            set_health(health, role, ServingStatus::NotServing).await;
        }
    }
}

async fn set_health(health: Option<&HealthReporter>, role: BundleRole, status: ServingStatus) {
    if let (Some(health), BundleRole::Active) = (health, role) {
        health
            .set_service_status(BUNDLE_HEALTH_SERVICE, status)
            .await;
    }
}
