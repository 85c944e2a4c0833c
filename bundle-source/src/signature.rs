//! Bundle signatures: ECDSA P-256 with SHA-256, detached, over the bundle digest.
//!
//! Signing the SHA-256 of the artifact is the same operation as ECDSA-SHA256 over the
//! artifact's bytes, so a signature made here verifies with `openssl dgst -sha256 -verify
//! pub.pem -signature bundle.sig bundle.tar.gz`, and one made by `openssl dgst -sha256
//! -sign key.pem -out bundle.sig bundle.tar.gz` verifies here. The signature file holds
//! the ASN.1 DER signature, as openssl writes it (its base64 text is accepted too). Keys
//! are PEM files: a PKCS#8 P-256 private key and its SubjectPublicKeyInfo public key, the
//! formats of the audit checkpoint keys.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use p256::ecdsa::signature::hazmat::{PrehashSigner as _, PrehashVerifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};

use crate::Digest;

/// Largest signature file read (a DER P-256 signature is at most 72 bytes).
pub const MAX_SIGNATURE_BYTES: usize = 4096;

/// A key that cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("cannot load key `{path}`: {reason}")]
pub struct KeyError {
    /// The key file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Loads a PKCS#8 PEM P-256 private key (`openssl genpkey -algorithm EC -pkeyopt
/// ec_paramgen_curve:P-256 -out bundle-signing.pem`).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let error = |reason: String| KeyError {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| error(format!("not a PKCS#8 PEM P-256 private key: {e}")))
}

/// Loads a SubjectPublicKeyInfo PEM P-256 public key (`openssl pkey -in
/// bundle-signing.pem -pubout -out bundle-signing.pub`).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let error = |reason: String| KeyError {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    VerifyingKey::from_public_key_pem(&pem)
        .map_err(|e| error(format!("not a PEM P-256 public key: {e}")))
}

/// Signs `digest`: the DER signature.
pub fn sign(key: &SigningKey, digest: &Digest) -> Result<Vec<u8>, p256::ecdsa::Error> {
    let signature: Signature = key.sign_prehash(digest.bytes())?;
    Ok(signature.to_der().as_bytes().to_vec())
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Not a DER (or base64 DER) ECDSA signature.
    #[error("the signature is not a DER ECDSA P-256 signature")]
    Malformed,
    /// A well-formed signature that the key does not verify for this digest.
    #[error("the signature does not verify for {0} with the configured public key")]
    Invalid(Digest),
}

/// Checks `signature` (DER, or its base64 text) over `digest` with `key`.
pub fn verify(key: &VerifyingKey, digest: &Digest, signature: &[u8]) -> Result<(), SignatureError> {
    if signature.len() > MAX_SIGNATURE_BYTES {
        return Err(SignatureError::Malformed);
    }
    let parsed = Signature::from_der(signature).or_else(|_| {
        let text = std::str::from_utf8(signature).map_err(|_| SignatureError::Malformed)?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| SignatureError::Malformed)?;
        Signature::from_der(&der).map_err(|_| SignatureError::Malformed)
    })?;
    key.verify_prehash(digest.bytes(), &parsed)
        .map_err(|_| SignatureError::Invalid(*digest))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signs_and_verifies_only_the_same_digest_with_the_same_key() {
        let key = SigningKey::from_slice(&[7; 32]).unwrap();
        let other = SigningKey::from_slice(&[8; 32]).unwrap();
        let digest = Digest::of(b"bundle");
        let sig = sign(&key, &digest).unwrap();
        verify(key.verifying_key(), &digest, &sig).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&sig);
        verify(key.verifying_key(), &digest, format!("{b64}\n").as_bytes()).unwrap();
        assert_eq!(
            verify(key.verifying_key(), &Digest::of(b"bundle2"), &sig),
            Err(SignatureError::Invalid(Digest::of(b"bundle2")))
        );
        assert!(matches!(
            verify(other.verifying_key(), &digest, &sig),
            Err(SignatureError::Invalid(_))
        ));
        assert_eq!(
            verify(key.verifying_key(), &digest, b"garbage"),
            Err(SignatureError::Malformed)
        );
    }
}
