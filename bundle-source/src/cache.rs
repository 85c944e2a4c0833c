//! The last-known-good artifact on local disk: `<dir>/current` names the digest, and
//! `<dir>/sha256-<hex>.tar.gz` (plus `.sig` when signed) hold the artifact exactly as it was
//! downloaded. Each file is written to a temporary name, synced and renamed, the pointer
//! last, so a crash leaves the previous good one or the new one, never a mix. At start the
//! artifact is verified again (digest, pin, signature) before it is used.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use crate::Digest;

const POINTER: &str = "current";

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// An artifact read back from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Their digest (checked against the pointer).
    pub digest: Digest,
    /// Its signature, if it was signed.
    pub signature: Option<Vec<u8>>,
}

impl Cache {
    /// Opens (creates) the cache directory.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn artifact(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("sha256-{}.tar.gz", digest.hex()))
    }

    fn signature(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("sha256-{}.sig", digest.hex()))
    }

    /// Persists `bytes` (and `signature`) as the last-known-good, and removes older ones.
    pub fn store(&self, bytes: &[u8], signature: Option<&[u8]>) -> io::Result<Digest> {
        let digest = Digest::of(bytes);
        write_synced(&self.artifact(&digest), bytes)?;
        match signature {
            Some(signature) => write_synced(&self.signature(&digest), signature)?,
            None => match std::fs::remove_file(self.signature(&digest)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
        }
        write_synced(&self.dir.join(POINTER), format!("{digest}\n").as_bytes())?;
        sync_dir(&self.dir)?;
        let keep = [self.artifact(&digest), self.signature(&digest)];
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name();
            let old =
                name.to_string_lossy().starts_with("sha256-") && !keep.contains(&entry.path());
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(digest)
    }

    /// The last-known-good, if one was stored.
    pub fn load(&self) -> io::Result<Option<Cached>> {
        let pointer = match std::fs::read_to_string(self.dir.join(POINTER)) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let digest: Digest = pointer
            .trim()
            .parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("`current`: {e}")))?;
        let bytes = std::fs::read(self.artifact(&digest))?;
        if Digest::of(&bytes) != digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the cached artifact does not match its digest {digest}"),
            ));
        }
        let signature = match std::fs::read(self.signature(&digest)) {
            Ok(sig) => Some(sig),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Some(Cached {
            bytes,
            digest,
            signature,
        }))
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stores_replaces_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("c")).unwrap();
        assert_eq!(cache.load().unwrap(), None);
        cache.store(b"one", Some(b"sig1")).unwrap();
        let two = cache.store(b"two", None).unwrap();
        let loaded = cache.load().unwrap().unwrap();
        assert_eq!(
            (loaded.bytes.as_slice(), loaded.digest, loaded.signature),
            (&b"two"[..], two, None)
        );
        // Only the current artifact is kept.
        let names: Vec<_> = std::fs::read_dir(cache.dir())
            .unwrap()
            .count()
            .to_string()
            .chars()
            .collect();
        assert_eq!(names, ['2']);
        std::fs::write(cache.artifact(&two), b"tampered").unwrap();
        assert!(cache.load().is_err());
    }
}
