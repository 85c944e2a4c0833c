//! `arbiter bundle build|sign|verify|push`: the security team's side of the supply chain
//! (see [`arbiter_bundle_source`] for the formats).

use std::path::{Path, PathBuf};
use std::time::Duration;

use arbiter_bundle_source::artifact::{self, DEFAULT_LIMITS};
use arbiter_bundle_source::auth::{Auth, CredentialsFile};
use arbiter_bundle_source::{oci, signature, Digest, Source, Transport, Verifier};

use crate::bundle::Bundle;

/// A `arbiter bundle` subcommand.
#[derive(Debug, clap::Subcommand)]
pub enum BundleCommand {
    /// Validate a bundle directory and pack the files the server reads (`*.cedar`,
    /// `*.cedarschema`, `entities.json`, `bundle.toml`) into a reproducible artifact
    /// (tar+gzip); prints its digest.
    Build {
        /// Bundle directory.
        dir: PathBuf,
        /// Artifact file to write.
        #[arg(short, long, default_value = "bundle.tar.gz")]
        output: PathBuf,
    },
    /// Sign an artifact's digest with a PKCS#8 PEM P-256 private key; writes the DER
    /// signature (same as `openssl dgst -sha256 -sign KEY -out SIG ARTIFACT`).
    Sign {
        /// Artifact file.
        artifact: PathBuf,
        /// Private key (`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`).
        #[arg(long)]
        key: PathBuf,
        /// Signature file to write (default: ARTIFACT.sig).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Check an artifact as the server would: digest and/or signature, unpacking, validation.
    Verify {
        /// Artifact file.
        artifact: PathBuf,
        /// Public key (`openssl pkey -pubout`).
        #[arg(long, required_unless_present = "digest")]
        public_key: Option<PathBuf>,
        /// Signature file (default: ARTIFACT.sig).
        #[arg(long)]
        signature: Option<PathBuf>,
        /// Pinned digest.
        #[arg(long)]
        digest: Option<Digest>,
    },
    /// Push an artifact (and its signature) to an OCI registry as `oci://REGISTRY/REPO:TAG`.
    Push {
        /// Artifact file.
        artifact: PathBuf,
        /// Destination, `oci://REGISTRY/REPOSITORY:TAG`.
        destination: Source,
        /// Signature file to push with it (pushed first, tagged `sha256-<digest>.sig`).
        #[arg(long)]
        signature: Option<PathBuf>,
        /// PEM CA certificates trusted besides the built-in roots.
        #[arg(long)]
        ca_cert: Option<PathBuf>,
        /// Registry credentials: a Docker `config.json` (`auths` by registry, `auth` or
        /// `username` and `password`), e.g. `~/.docker/config.json` after `docker login`.
        #[arg(long, env = "ARBITER_BUNDLE_AUTH_FILE", value_name = "PATH")]
        auth_file: Option<PathBuf>,
        /// Bound on each request, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("cannot write `{}`: {e}", path.display()))
}

fn sig_path(artifact: &Path) -> PathBuf {
    let mut name = artifact.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// Runs `command`; the lines to print on success, or the error.
pub fn run(command: BundleCommand) -> Result<String, String> {
    match command {
        BundleCommand::Build { dir, output } => {
            let bundle = Bundle::load(&dir).map_err(|e| {
                let mut text = e.problems().join("\n");
                text.push_str(&format!("\n`{}` is not a valid bundle", dir.display()));
                text
            })?;
            let bytes = artifact::build(&dir, crate::bundle::is_bundle_file)
                .map_err(|e| format!("cannot pack `{}`: {e}", dir.display()))?;
            write(&output, &bytes)?;
            Ok(format!(
                "{}  {}  ({} policies, version {})",
                Digest::of(&bytes),
                output.display(),
                bundle.policy_count(),
                bundle.version()
            ))
        }
        BundleCommand::Sign {
            artifact,
            key,
            output,
        } => {
            let key = signature::load_signing_key(&key).map_err(|e| e.to_string())?;
            let digest = Digest::of(&read(&artifact)?);
            let sig = signature::sign(&key, &digest).map_err(|e| format!("cannot sign: {e}"))?;
            let output = output.unwrap_or_else(|| sig_path(&artifact));
            write(&output, &sig)?;
            Ok(format!("signed {digest}: {}", output.display()))
        }
        BundleCommand::Verify {
            artifact,
            public_key,
            signature: sig,
            digest: pin,
        } => {
            let bytes = read(&artifact)?;
            let digest = Digest::of(&bytes);
            let key = match &public_key {
                Some(path) => Some(signature::load_verifying_key(path).map_err(|e| e.to_string())?),
                None => None,
            };
            let sig = match (&key, sig) {
                (Some(_), Some(path)) => Some(read(&path)?),
                (Some(_), None) => Some(read(&sig_path(&artifact))?),
                (None, _) => None,
            };
            let verifier = Verifier::new(pin, key).ok_or("give --public-key or --digest")?;
            verifier
                .verify(&digest, sig.as_deref())
                .map_err(|e| e.to_string())?;
            let scratch = std::env::temp_dir().join(format!(
                "arbiter-verify-{}-{}",
                std::process::id(),
                digest.hex()
            ));
            let _ = std::fs::remove_dir_all(&scratch);
            let loaded = artifact::unpack(&bytes, &scratch, DEFAULT_LIMITS)
                .map_err(|e| e.to_string())
                .and_then(|_| Bundle::load(&scratch).map_err(|e| e.problems().join("\n")));
            let _ = std::fs::remove_dir_all(&scratch);
            let bundle = loaded?;
            Ok(format!(
                "ok: {digest} verified, {} policies, version {}",
                bundle.policy_count(),
                bundle.version()
            ))
        }
        BundleCommand::Push {
            artifact,
            destination,
            signature: sig,
            ca_cert,
            auth_file,
            timeout_secs,
        } => {
            let Source::Oci(reference) = destination else {
                return Err("push goes to `oci://REGISTRY/REPOSITORY:TAG`; for HTTPS, copy the artifact and ARTIFACT.sig to the web server".to_owned());
            };
            let bytes = read(&artifact)?;
            let sig = sig.map(|path| read(&path)).transpose()?;
            let mut transport =
                Transport::new(ca_cert.as_deref(), Duration::from_secs(timeout_secs.max(1)))
                    .map_err(|e| e.to_string())?;
            if let Some(path) = &auth_file {
                let file = CredentialsFile::open(path, Some(&reference.registry))
                    .map_err(|e| e.to_string())?;
                transport = transport.with_auth(Auth::with_file(file));
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            let manifest = runtime
                .block_on(oci::push(&transport, &reference, &bytes, sig.as_deref()))
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "pushed {} to oci://{reference} (manifest {manifest}){}",
                Digest::of(&bytes),
                if sig.is_some() {
                    " with its signature"
                } else {
                    ""
                }
            ))
        }
    }
}
