//! A remote bundle source, the transport it is fetched over, and what a fetched artifact
//! must satisfy.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use p256::ecdsa::VerifyingKey;

use crate::auth::Auth;
use crate::signature::{self, SignatureError};
use crate::{https, oci, Digest};

/// Where bundles come from: `oci://registry[:port]/repository[:tag|@sha256:…]` or an
/// `https://` URL of the artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An OCI registry artifact.
    Oci(oci::Reference),
    /// An artifact served over HTTPS; its signature is at the same URL plus `.sig`.
    Https(reqwest::Url),
}

impl FromStr for Source {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("oci://") {
            return rest.parse().map(Source::Oci);
        }
        if s.starts_with("https://") {
            let url = reqwest::Url::parse(s).map_err(|e| format!("`{s}`: {e}"))?;
            return Ok(Source::Https(url));
        }
        Err(format!(
            "`{s}`: a bundle source is `oci://REGISTRY/REPOSITORY[:TAG|@sha256:DIGEST]` or an `https://` URL"
        ))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Oci(reference) => write!(f, "oci://{reference}"),
            Source::Https(url) => write!(f, "{url}"),
        }
    }
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

impl SourceError {
    pub(crate) fn http(what: &str, error: &reqwest::Error) -> Self {
        let mut message = format!("{what}: {error}");
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        Self(message)
    }
}

/// The HTTPS client sources are fetched with: rustls, the built-in web PKI roots plus an
/// optional operator CA, HTTPS only (redirects too), every request bounded in time.
///
/// Registry requests go through a second client that follows no redirect by itself
/// ([`crate::auth`] follows them without the `Authorization` header) and carry the
/// registry credentials of [`Transport::with_auth`].
#[derive(Debug, Clone)]
pub struct Transport {
    pub(crate) client: reqwest::Client,
    pub(crate) registry: reqwest::Client,
    pub(crate) auth: Auth,
}

impl Transport {
    /// A client trusting `ca_pem` (a PEM file of CA certificates) besides the built-in roots,
    /// and giving up on any request after `timeout`.
    pub fn new(ca_pem: Option<&Path>, timeout: Duration) -> Result<Self, SourceError> {
        let mut roots = Vec::new();
        if let Some(path) = ca_pem {
            let pem = std::fs::read(path).map_err(|e| {
                SourceError(format!("cannot read CA file `{}`: {e}", path.display()))
            })?;
            roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                SourceError(format!(
                    "`{}` holds no PEM certificate: {e}",
                    path.display()
                ))
            })?;
            if roots.is_empty() {
                return Err(SourceError(format!(
                    "`{}` holds no PEM certificate",
                    path.display()
                )));
            }
        }
        let builder = || {
            let mut builder = reqwest::Client::builder()
                .use_rustls_tls()
                .https_only(true)
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(10)))
                .user_agent(concat!("arbiter/", env!("CARGO_PKG_VERSION")));
            for cert in &roots {
                builder = builder.add_root_certificate(cert.clone());
            }
            builder
        };
        let registry = builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SourceError::http("cannot build the HTTPS client", &e))?;
        let client = builder()
            .build()
            .map_err(|e| SourceError::http("cannot build the HTTPS client", &e))?;
        Ok(Self {
            client,
            registry,
            auth: Auth::anonymous(),
        })
    }

    /// The same transport, authenticating to registries with `auth`.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// The registry authentication in use.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }
}

/// A downloaded artifact, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The artifact's bytes.
    pub bytes: Vec<u8>,
    /// Their digest.
    pub digest: Digest,
    /// The detached signature, when one was asked for.
    pub signature: Option<Vec<u8>>,
    /// What to send next time to learn whether anything changed (ETag, manifest digest).
    pub token: Option<String>,
}

/// The outcome of a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetch {
    /// Nothing changed since the token sent.
    Unchanged,
    /// A (possibly) new artifact.
    New(Fetched),
}

impl Source {
    /// Fetches the artifact (and its signature when `signed`), unless it is unchanged since
    /// `token`. Never more than `max_bytes` of artifact.
    pub async fn fetch(
        &self,
        transport: &Transport,
        token: Option<&str>,
        signed: bool,
        max_bytes: u64,
    ) -> Result<Fetch, SourceError> {
        match self {
            Source::Oci(reference) => {
                oci::pull(transport, reference, token, signed, max_bytes).await
            }
            Source::Https(url) => {
                https::fetch(&transport.client, url, token, signed, max_bytes).await
            }
        }
    }
}

/// What an artifact must satisfy: its digest is the pinned one, and/or its signature
/// verifies with the public key. At least one of the two is always set.
#[derive(Debug, Clone)]
pub struct Verifier {
    pin: Option<Digest>,
    key: Option<VerifyingKey>,
}

/// Why an artifact is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The digest is not the pinned one.
    #[error("bundle digest {got} is not the pinned {pinned}")]
    NotPinned {
        /// The artifact's digest.
        got: Digest,
        /// `--bundle-digest`.
        pinned: Digest,
    },
    /// No signature was found beside the artifact.
    #[error("bundle {0} has no signature")]
    Unsigned(Digest),
    /// The signature does not verify.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

impl Verifier {
    /// A verifier; `None` when neither a pin nor a key is given (an unverified remote bundle
    /// is never accepted).
    pub fn new(pin: Option<Digest>, key: Option<VerifyingKey>) -> Option<Self> {
        (pin.is_some() || key.is_some()).then_some(Self { pin, key })
    }

    /// A signature must be fetched.
    pub fn needs_signature(&self) -> bool {
        self.key.is_some()
    }

    /// Checks an artifact of `digest` with `signature`.
    pub fn verify(&self, digest: &Digest, signature: Option<&[u8]>) -> Result<(), VerifyError> {
        if let Some(pinned) = self.pin {
            if pinned != *digest {
                return Err(VerifyError::NotPinned {
                    got: *digest,
                    pinned,
                });
            }
        }
        if let Some(key) = &self.key {
            let signature = signature.ok_or(VerifyError::Unsigned(*digest))?;
            signature::verify(key, digest, signature)?;
        }
        Ok(())
    }
}

/// Reads a response body, refusing more than `max` bytes.
pub(crate) async fn read_limited(
    mut response: reqwest::Response,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, SourceError> {
    if response.content_length().is_some_and(|n| n > max) {
        return Err(SourceError(format!(
            "{what}: larger than the limit of {max} bytes"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| SourceError::http(what, &e))?
    {
        if body.len() as u64 + chunk.len() as u64 > max {
            return Err(SourceError(format!(
                "{what}: larger than the limit of {max} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
