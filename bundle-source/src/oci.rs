//! Bundles in an OCI registry, over the distribution HTTP API (`/v2/…`), HTTPS only.
//!
//! A bundle is an OCI image manifest with `artifactType` [`ARTIFACT_TYPE`], the empty config
//! and one layer of [`LAYER_MEDIA_TYPE`]: the artifact (gzip-compressed tar). Its signature
//! is a second artifact tagged `sha256-<bundle digest hex>.sig` (the cosign tag convention,
//! which works on every registry, with or without the referrers API) whose one layer of
//! [`SIGNATURE_MEDIA_TYPE`] holds the DER signature. Every request authenticates as the
//! registry asks ([`crate::auth`]: basic credentials or a bearer token for the scope
//! `repository:NAME:pull`, or `pull,push` to push).

use std::fmt;
use std::str::FromStr;

use reqwest::{header, StatusCode};
use serde::{Deserialize, Serialize};

use crate::signature::MAX_SIGNATURE_BYTES;
use crate::source::read_limited;
use crate::{auth, Digest, Fetch, Fetched, SourceError, Transport};

/// `artifactType` of a bundle manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.arbiter.bundle.v1";
/// Media type of the bundle layer.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.arbiter.bundle.layer.v1.tar+gzip";
/// `artifactType` of a signature manifest.
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.arbiter.bundle.signature.v1";
/// Media type of the signature layer.
pub const SIGNATURE_MEDIA_TYPE: &str = "application/vnd.arbiter.bundle.signature.v1+der";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";
const MAX_MANIFEST_BYTES: u64 = 256 * 1024;

/// `registry[:port]/repository[:tag|@sha256:…]` (after `oci://`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// Repository path.
    pub repository: String,
    /// Tag or `sha256:` manifest digest.
    pub reference: String,
}

impl FromStr for Reference {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("`oci://{s}`: {why}");
        let (registry, rest) = s
            .split_once('/')
            .ok_or_else(|| bad("no repository after the registry"))?;
        if registry.is_empty() || registry.contains(['@', '?', '#']) {
            return Err(bad("invalid registry"));
        }
        let (repository, reference) = if let Some((repo, digest)) = rest.split_once('@') {
            digest.parse::<Digest>().map_err(|e| bad(&e.to_string()))?;
            (repo, digest.to_owned())
        } else {
            match rest.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => (repo, tag.to_owned()),
                _ => (rest, "latest".to_owned()),
            }
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad(
                "invalid repository name (lowercase letters, digits, `._-/`)",
            ));
        }
        let tag_ok = |t: &str| {
            !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !reference.starts_with("sha256:") && !tag_ok(&reference) {
            return Err(bad("invalid tag"));
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            reference,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        write!(
            f,
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

impl Reference {
    fn url(&self, kind: &str, reference: &str) -> String {
        format!(
            "https://{}/v2/{}/{kind}/{reference}",
            self.registry, self.repository
        )
    }

    /// The tag of the signature of the bundle `digest`.
    pub fn signature_tag(digest: &Digest) -> String {
        format!("sha256-{}.sig", digest.hex())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest: Digest::of(bytes).to_string(),
        size: bytes.len() as u64,
    }
}

/// Sends a request to `at`'s registry, authenticated for pulling (or pushing) its
/// repository.
async fn send(
    transport: &Transport,
    at: &Reference,
    push: bool,
    what: &str,
    make: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, SourceError> {
    transport
        .auth
        .send(
            &transport.registry,
            &at.registry,
            &auth::scope(&at.repository, push),
            what,
            make,
        )
        .await
}

/// Fetches `reference`'s manifest (unless its digest is still `token`), then its one layer
/// of `layer_type`.
async fn pull_layer(
    transport: &Transport,
    at: &Reference,
    reference: &str,
    token: Option<&str>,
    layer_type: &str,
    max_bytes: u64,
) -> Result<Option<(Vec<u8>, Digest, Digest)>, SourceError> {
    let url = at.url("manifests", reference);
    let client = &transport.registry;
    let response = send(transport, at, false, &format!("GET {url}"), || {
        let mut request = client.get(&url).header(header::ACCEPT, MANIFEST_MEDIA_TYPE);
        if let Some(token) = token {
            request = request.header(header::IF_NONE_MATCH, format!("\"{token}\""));
        }
        request
    })
    .await?;
    if response.status() == StatusCode::NOT_MODIFIED && token.is_some() {
        return Ok(None);
    }
    if !response.status().is_success() {
        return Err(SourceError(format!("GET {url}: {}", response.status())));
    }
    let body = read_limited(response, MAX_MANIFEST_BYTES, &format!("GET {url}")).await?;
    let manifest_digest = Digest::of(&body);
    if reference.starts_with("sha256:") && reference != manifest_digest.to_string() {
        return Err(SourceError(format!(
            "GET {url}: the registry answered a manifest of digest {manifest_digest}"
        )));
    }
    if token == Some(manifest_digest.to_string().as_str()) {
        return Ok(None);
    }
    let manifest: Manifest = serde_json::from_slice(&body)
        .map_err(|e| SourceError(format!("GET {url}: not an OCI image manifest: {e}")))?;
    let mut layers = manifest
        .layers
        .iter()
        .filter(|l| l.media_type == layer_type);
    let (Some(layer), None) = (layers.next(), layers.next()) else {
        return Err(SourceError(format!(
            "GET {url}: the manifest does not have exactly one `{layer_type}` layer"
        )));
    };
    let layer_digest: Digest = layer
        .digest
        .parse()
        .map_err(|e| SourceError(format!("GET {url}: layer: {e}")))?;
    if layer.size > max_bytes {
        return Err(SourceError(format!(
            "GET {url}: the layer has {} bytes, the limit is {max_bytes}",
            layer.size
        )));
    }
    let blob_url = at.url("blobs", &layer.digest);
    let response = send(transport, at, false, &format!("GET {blob_url}"), || {
        client.get(&blob_url)
    })
    .await?;
    if !response.status().is_success() {
        return Err(SourceError(format!(
            "GET {blob_url}: {}",
            response.status()
        )));
    }
    let bytes = read_limited(response, layer.size, &format!("GET {blob_url}")).await?;
    if Digest::of(&bytes) != layer_digest {
        return Err(SourceError(format!(
            "GET {blob_url}: the blob's content does not match its digest"
        )));
    }
    Ok(Some((bytes, layer_digest, manifest_digest)))
}

pub(crate) async fn pull(
    transport: &Transport,
    at: &Reference,
    token: Option<&str>,
    signed: bool,
    max_bytes: u64,
) -> Result<Fetch, SourceError> {
    let Some((bytes, digest, manifest)) = pull_layer(
        transport,
        at,
        &at.reference,
        token,
        LAYER_MEDIA_TYPE,
        max_bytes,
    )
    .await?
    else {
        return Ok(Fetch::Unchanged);
    };
    let signature = if signed {
        let tag = Reference::signature_tag(&digest);
        let found = pull_layer(
            transport,
            at,
            &tag,
            None,
            SIGNATURE_MEDIA_TYPE,
            MAX_SIGNATURE_BYTES as u64,
        )
        .await
        .map_err(|e| SourceError(format!("the bundle's signature: {e}")))?;
        found.map(|(sig, _, _)| sig)
    } else {
        None
    };
    Ok(Fetch::New(Fetched {
        bytes,
        digest,
        signature,
        token: Some(manifest.to_string()),
    }))
}

async fn push_blob(transport: &Transport, at: &Reference, bytes: &[u8]) -> Result<(), SourceError> {
    let digest = Digest::of(bytes);
    let head = at.url("blobs", &digest.to_string());
    let client = &transport.registry;
    let exists = send(transport, at, true, &format!("HEAD {head}"), || {
        client.head(&head)
    })
    .await?;
    if exists.status().is_success() {
        return Ok(());
    }
    let start = format!(
        "https://{}/v2/{}/blobs/uploads/",
        at.registry, at.repository
    );
    let response = send(transport, at, true, &format!("POST {start}"), || {
        client.post(&start)
    })
    .await?;
    if response.status() != StatusCode::ACCEPTED {
        return Err(SourceError(format!("POST {start}: {}", response.status())));
    }
    let location = response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| SourceError(format!("POST {start}: no Location")))?;
    let mut upload = reqwest::Url::parse(&start)
        .and_then(|base| base.join(location))
        .map_err(|e| SourceError(format!("POST {start}: Location `{location}`: {e}")))?;
    upload
        .query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    // The upload URL may carry an upload state token: errors name only its path.
    let put = format!("PUT {}", upload.path());
    if upload.origin()
        != reqwest::Url::parse(&start)
            .map_err(|e| SourceError(e.to_string()))?
            .origin()
    {
        return Err(SourceError(format!(
            "POST {start}: the upload Location is on another host; not sending the registry's credentials there"
        )));
    }
    let response = send(transport, at, true, &put, || {
        client
            .put(upload.clone())
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec())
    })
    .await?;
    if response.status() != StatusCode::CREATED {
        return Err(SourceError(format!("{put}: {}", response.status())));
    }
    Ok(())
}

async fn push_artifact(
    transport: &Transport,
    at: &Reference,
    tag: &str,
    artifact_type: &str,
    layer_type: &str,
    bytes: &[u8],
) -> Result<Digest, SourceError> {
    push_blob(transport, at, EMPTY_CONFIG).await?;
    push_blob(transport, at, bytes).await?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE.to_owned(),
        artifact_type: Some(artifact_type.to_owned()),
        config: descriptor(EMPTY_MEDIA_TYPE, EMPTY_CONFIG),
        layers: vec![descriptor(layer_type, bytes)],
    };
    let body = serde_json::to_vec(&manifest)
        .map_err(|e| SourceError(format!("cannot encode the manifest: {e}")))?;
    let url = at.url("manifests", tag);
    let client = &transport.registry;
    let response = send(transport, at, true, &format!("PUT {url}"), || {
        client
            .put(&url)
            .header(header::CONTENT_TYPE, MANIFEST_MEDIA_TYPE)
            .body(body.clone())
    })
    .await?;
    if response.status() != StatusCode::CREATED {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        return Err(SourceError(format!(
            "PUT {url}: {status} {}",
            text.chars().take(300).collect::<String>()
        )));
    }
    Ok(Digest::of(&body))
}

/// Pushes `artifact` as the bundle tagged by `at` (which must name a tag), and `signature`
/// (if any) as its signature artifact. Returns the bundle manifest's digest.
pub async fn push(
    transport: &Transport,
    at: &Reference,
    artifact: &[u8],
    signature: Option<&[u8]>,
) -> Result<Digest, SourceError> {
    if at.reference.starts_with("sha256:") {
        return Err(SourceError(format!(
            "`oci://{at}`: push to a tag, not a digest"
        )));
    }
    // The signature first: a server polling the tag never sees the bundle without it.
    if let Some(signature) = signature {
        let tag = Reference::signature_tag(&Digest::of(artifact));
        push_artifact(
            transport,
            at,
            &tag,
            SIGNATURE_ARTIFACT_TYPE,
            SIGNATURE_MEDIA_TYPE,
            signature,
        )
        .await?;
    }
    push_artifact(
        transport,
        at,
        &at.reference,
        ARTIFACT_TYPE,
        LAYER_MEDIA_TYPE,
        artifact,
    )
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn references() {
        let r: Reference = "127.0.0.1:5000/team/policies:v1".parse().unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/policies");
        assert_eq!(r.reference, "v1");
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/policies:v1");
        let r: Reference = "reg.example/p".parse().unwrap();
        assert_eq!(r.reference, "latest");
        let d = Digest::of(b"m").to_string();
        let r: Reference = format!("reg.example/p@{d}").parse().unwrap();
        assert_eq!(r.reference, d);
        assert_eq!(r.to_string(), format!("reg.example/p@{d}"));
        for bad in [
            "reg",
            "reg/",
            "reg/P",
            "reg/p:",
            "reg/p@sha256:00",
            "/p",
            "reg/p:a b",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad}");
        }
    }
}
