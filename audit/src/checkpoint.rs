//! Signed checkpoints: the anchor that turns the hash chain's "in order" into "complete".
//!
//! A checkpoint says "the log's record `seq` has hash `hash`", signed with the operator's
//! key. The writer appends one to `<log>.checkpoints` (see [`checkpoints_path`]) every
//! `--audit-checkpoint-every` records, at rotation and at a clean shutdown, after the records
//! it covers are on disk. A side file, not a line of the log: the log stays exactly one
//! record per decision for every reader (replay, export, counts), checkpoints do not move at
//! rotation, and the file is small enough to copy off the host on every change (CloudTrail's
//! digest files are kept apart from the log files for the same reasons).
//!
//! Scheme: ECDSA P-256 with SHA-256 (RFC 6979 deterministic nonces), keys as PKCS#8 /
//! SubjectPublicKeyInfo PEM. Chosen over Ed25519 because it is already this workspace's
//! vetted signature crate (`p256`), it is FIPS 186 approved (regulated buyers ask), and
//! `openssl` or `cosign generate-key-pair` make such keys with no extra tool.
//!
//! Line format, like a record's: the compact JSON of the checkpoint with `sig` as its last
//! member, the lowercase hex of the 64-byte `r‖s` signature over the line's bytes with that
//! member removed (`{…,"key_id":"…"}`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The `type` member of a checkpoint line.
pub const CHECKPOINT_TYPE: &str = "arbiter.audit.checkpoint";
/// `,"sig":"` + 128 hex digits + `"}`: how every checkpoint line ends.
const SIG_SUFFIX_LEN: usize = 8 + 128 + 2;

/// Why a key cannot be loaded or a checkpoint line is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The key file cannot be read or is not a P-256 key in PEM.
    #[error("cannot load key `{path}`: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The line does not end with a `sig` member.
    #[error("line does not end with a `sig` member")]
    NoSignature,
    /// The line is not a checkpoint.
    #[error("not a checkpoint: {0}")]
    Json(String),
    /// Signed with another key than the one given.
    #[error("signed with another key (key id `{found}`, the given key is `{expected}`)")]
    OtherKey {
        /// `key_id` of the line.
        found: String,
        /// Id of the verifying key.
        expected: String,
    },
    /// The signature does not verify: the line was forged or edited.
    #[error("signature does not verify: forged or edited")]
    BadSignature,
}

/// Why a checkpoint was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointReason {
    /// Every N records.
    Periodic,
    /// Before the active file was rotated.
    Rotation,
    /// At a clean shutdown.
    Shutdown,
}

/// A signed statement of the log's head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Always [`CHECKPOINT_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Seq of the newest record covered.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// When it was signed, RFC 3339 UTC.
    pub ts: String,
    /// Why it was written.
    pub reason: CheckpointReason,
    /// Id of the signing key ([`key_id`]).
    pub key_id: String,
}

/// The first 16 hex digits of the SHA-256 of the uncompressed public key point.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.to_encoded_point(false).as_bytes());
    hex::encode(&digest[..8])
}

/// Loads a PKCS#8 PEM P-256 private key (`openssl genpkey -algorithm EC -pkeyopt
/// ec_paramgen_curve:P-256`).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, CheckpointError> {
    let error = |reason: String| CheckpointError::Key {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| error(format!("not a PKCS#8 PEM P-256 private key: {e}")))
}

/// Loads a SubjectPublicKeyInfo PEM P-256 public key (`openssl pkey -pubout`).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, CheckpointError> {
    let error = |reason: String| CheckpointError::Key {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    VerifyingKey::from_public_key_pem(&pem)
        .map_err(|e| error(format!("not a PEM P-256 public key: {e}")))
}

/// `<log>.checkpoints`: where the writer of `log` appends its checkpoints.
pub fn checkpoints_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".checkpoints");
    log.with_file_name(name)
}

impl Checkpoint {
    /// A checkpoint of record `seq` with `hash`, signed now by `key`: its line, with `\n`.
    pub fn sign(
        seq: u64,
        hash: &str,
        reason: CheckpointReason,
        key: &SigningKey,
    ) -> Result<Vec<u8>, serde_json::Error> {
        let checkpoint = Self {
            kind: CHECKPOINT_TYPE.to_owned(),
            seq,
            hash: hash.to_owned(),
            ts: crate::timestamp(time::OffsetDateTime::now_utc()),
            reason,
            key_id: key_id(key.verifying_key()),
        };
        let mut line = serde_json::to_vec(&checkpoint)?;
        let signature: Signature = key.sign(&line);
        line.pop();
        line.extend_from_slice(b",\"sig\":\"");
        line.extend_from_slice(hex::encode(signature.to_bytes()).as_bytes());
        line.extend_from_slice(b"\"}\n");
        Ok(line)
    }

    /// Parses a checkpoint line (without `\n`) without checking its signature.
    pub fn parse(line: &[u8]) -> Result<Self, CheckpointError> {
        let checkpoint: Self =
            serde_json::from_slice(line).map_err(|e| CheckpointError::Json(e.to_string()))?;
        if checkpoint.kind != CHECKPOINT_TYPE {
            return Err(CheckpointError::Json(format!(
                "`type` is `{}`, not `{CHECKPOINT_TYPE}`",
                checkpoint.kind
            )));
        }
        Ok(checkpoint)
    }

    /// Parses a checkpoint line (without `\n`) and checks it was signed by `key`.
    pub fn verify(line: &[u8], key: &VerifyingKey) -> Result<Self, CheckpointError> {
        let split = line
            .len()
            .checked_sub(SIG_SUFFIX_LEN)
            .ok_or(CheckpointError::NoSignature)?;
        let (content, suffix) = line.split_at(split);
        let sig = suffix
            .strip_prefix(b",\"sig\":\"")
            .and_then(|rest| rest.strip_suffix(b"\"}"))
            .and_then(|hex| hex::decode(hex).ok())
            .ok_or(CheckpointError::NoSignature)?;
        let checkpoint = Self::parse(line)?;
        let expected = key_id(key);
        if checkpoint.key_id != expected {
            return Err(CheckpointError::OtherKey {
                found: checkpoint.key_id,
                expected,
            });
        }
        let signature = Signature::from_slice(&sig).map_err(|_| CheckpointError::BadSignature)?;
        let mut signed = content.to_vec();
        signed.push(b'}');
        key.verify(&signed, &signature)
            .map_err(|_| CheckpointError::BadSignature)?;
        Ok(checkpoint)
    }
}

/// Whether `bytes` (a file's content) holds checkpoints rather than records.
pub fn is_checkpoint_file(bytes: &[u8]) -> bool {
    let first = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    Checkpoint::parse(first).is_ok()
}

/// The last complete checkpoint of `path` (signature not checked: the writer trusts its own
/// file for the start-up check), or `None` when there is no file or no complete line.
pub fn last_checkpoint(path: &Path) -> io::Result<Option<Checkpoint>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let complete = bytes.iter().rposition(|b| *b == b'\n').unwrap_or(0);
    let line = bytes[..complete]
        .rsplit(|b| *b == b'\n')
        .next()
        .unwrap_or_default();
    if line.is_empty() {
        return Ok(None);
    }
    Checkpoint::parse(line)
        .map(Some)
        .map_err(|e| io::Error::other(format!("last line of `{}`: {e}", path.display())))
}

/// Appends checkpoint lines to `<log>.checkpoints`, each synced before it counts.
pub(crate) struct CheckpointFile {
    path: PathBuf,
    key: SigningKey,
    file: Option<File>,
}

impl CheckpointFile {
    pub(crate) fn new(log: &Path, key: SigningKey) -> Self {
        Self {
            path: checkpoints_path(log),
            key,
            file: None,
        }
    }

    /// Signs and appends a checkpoint of `seq`/`hash`. The records it covers must already
    /// be durable (the writer syncs the log first).
    pub(crate) fn append(
        &mut self,
        seq: u64,
        hash: &str,
        reason: CheckpointReason,
    ) -> io::Result<()> {
        let line = Checkpoint::sign(seq, hash, reason, &self.key).map_err(io::Error::other)?;
        if self.file.is_none() {
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no checkpoint file"))?;
        file.write_all(&line)?;
        file.sync_data()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}
