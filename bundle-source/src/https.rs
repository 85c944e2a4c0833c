//! An artifact served over HTTPS: `GET URL` with `If-None-Match` (the last ETag), and
//! `GET URL.sig` for its signature.

use reqwest::{header, StatusCode, Url};

use crate::signature::MAX_SIGNATURE_BYTES;
use crate::source::read_limited;
use crate::{Digest, Fetch, Fetched, SourceError};

/// `url` with `.sig` added to its path (a query stays as it is).
pub fn signature_url(url: &Url) -> Url {
    let mut sig = url.clone();
    sig.set_path(&format!("{}.sig", url.path()));
    sig
}

pub(crate) async fn fetch(
    client: &reqwest::Client,
    url: &Url,
    etag: Option<&str>,
    signed: bool,
    max_bytes: u64,
) -> Result<Fetch, SourceError> {
    let mut request = client.get(url.clone());
    if let Some(etag) = etag {
        request = request.header(header::IF_NONE_MATCH, etag);
    }
    let response = request
        .send()
        .await
        .map_err(|e| SourceError::http(&format!("GET {url}"), &e))?;
    if response.status() == StatusCode::NOT_MODIFIED && etag.is_some() {
        return Ok(Fetch::Unchanged);
    }
    if !response.status().is_success() {
        return Err(SourceError(format!("GET {url}: {}", response.status())));
    }
    let token = response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = read_limited(response, max_bytes, &format!("GET {url}")).await?;
    let signature = if signed {
        let sig_url = signature_url(url);
        let response = client
            .get(sig_url.clone())
            .send()
            .await
            .map_err(|e| SourceError::http(&format!("GET {sig_url}"), &e))?;
        if !response.status().is_success() {
            return Err(SourceError(format!(
                "GET {sig_url}: {} (the bundle's signature)",
                response.status()
            )));
        }
        Some(
            read_limited(
                response,
                MAX_SIGNATURE_BYTES as u64,
                &format!("GET {sig_url}"),
            )
            .await?,
        )
    } else {
        None
    };
    Ok(Fetch::New(Fetched {
        digest: Digest::of(&bytes),
        bytes,
        signature,
        token,
    }))
}
