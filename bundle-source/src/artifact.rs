//! The bundle artifact: a gzip-compressed tar of the bundle directory's files, flat (no
//! sub-directories).
//!
//! [`build`] is reproducible: files in name order, mode 0644, owner 0, time 0, gzip header
//! without a name or time, so building the same files twice gives the same bytes and the
//! same digest. A plain tar (`tar -C dir -cf - .`), with or without gzip, is accepted too.
//!
//! [`read`] is the parser of untrusted input. Only regular files directly in the bundle are
//! taken (an optional leading `./` is dropped, the `.` directory itself is skipped); a path
//! with a `/`, `..`, an absolute path, a link of either kind, a device, a FIFO, a duplicate
//! name, more than [`Limits::max_files`] files, or more than [`Limits::max_bytes`] bytes of
//! content or of decompressed stream is refused with [`UnpackError`] before anything is
//! written. [`unpack`] then writes the files into a new directory.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::Path;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};

/// Limits on an artifact's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most files.
    pub max_files: usize,
    /// Most bytes of all files together (also bounds the decompressed stream, headers
    /// included, at twice this plus one block per file).
    pub max_bytes: u64,
}

/// The bundle server's own limit: 64 MiB of files (the size a local bundle may have), at
/// most 1,024 of them.
pub const DEFAULT_LIMITS: Limits = Limits {
    max_files: 1024,
    max_bytes: 64 * 1024 * 1024,
};

/// Why an artifact is refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The stream is not a valid (gzip-compressed) tar.
    #[error("not a valid bundle archive: {0}")]
    Corrupt(String),
    /// An entry is not a regular file directly in the bundle.
    #[error("bundle archive entry `{name}` refused: {reason}")]
    Entry {
        /// The entry's path as written in the archive (lossy, shortened).
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Too many files, or too many bytes.
    #[error("bundle archive too large: {0}")]
    TooLarge(String),
    /// The archive holds no file.
    #[error("bundle archive holds no file")]
    Empty,
    /// Writing the files failed.
    #[error("cannot write the unpacked bundle to `{dir}`: {source}")]
    Write {
        /// The directory.
        dir: String,
        /// The I/O error.
        source: io::Error,
    },
}

/// A file of the bundle: name and content.
pub type File = (String, Vec<u8>);

/// The artifact of the bundle in `dir`: its regular files (symlinks followed) for which
/// `keep` holds (the server passes the files a bundle is made of), reproducibly.
pub fn build(dir: &Path, keep: impl Fn(&Path) -> bool) -> io::Result<Vec<u8>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("file name {:?} is not UTF-8", entry.file_name()),
            ));
        };
        if !keep(&entry.path()) || !entry.path().metadata()?.is_file() {
            continue;
        }
        files.push((name, std::fs::read(entry.path())?));
    }
    if files.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no file in `{}`", dir.display()),
        ));
    }
    build_from(files)
}

/// The artifact of `files` (sorted by name here).
pub fn build_from(mut files: Vec<File>) -> io::Result<Vec<u8>> {
    files.sort();
    let gz: GzEncoder<Vec<u8>> = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for (name, data) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, name, data.as_slice())?;
    }
    tar.into_inner()?.finish()
}

/// The files of an artifact, checked (see the module documentation), in archive order.
pub fn read(bytes: &[u8], limits: Limits) -> Result<Vec<File>, UnpackError> {
    // Decompressed stream: content, one header and at most one block of padding per file,
    // a few extension headers, the end blocks.
    let stream_limit = limits
        .max_bytes
        .saturating_mul(2)
        .saturating_add((limits.max_files as u64 + 8).saturating_mul(2048));
    let stream: Box<dyn Read + '_> = if bytes.starts_with(&[0x1f, 0x8b]) {
        Box::new(GzDecoder::new(bytes))
    } else {
        Box::new(bytes)
    };
    let mut archive = tar::Archive::new(Bounded {
        inner: stream,
        left: stream_limit,
    });
    let entries = archive.entries().map_err(corrupt)?;
    let mut files: Vec<File> = Vec::new();
    let mut names = HashSet::new();
    let mut total: u64 = 0;
    for entry in entries {
        let mut entry = entry.map_err(corrupt)?;
        let raw = entry.path_bytes().into_owned();
        let shown = || {
            String::from_utf8_lossy(&raw)
                .chars()
                .take(120)
                .collect::<String>()
        };
        let refuse = |reason| UnpackError::Entry {
            name: shown(),
            reason,
        };
        let kind = entry.header().entry_type();
        let name = match kind {
            tar::EntryType::XGlobalHeader => None,
            _ => bundle_name(&raw).map_err(refuse)?,
        };
        match (kind, name) {
            // Archive-wide metadata (`git archive` writes the commit id there).
            (tar::EntryType::XGlobalHeader, _) | (tar::EntryType::Directory, None) => continue,
            (tar::EntryType::Directory, Some(_)) => {
                return Err(refuse("sub-directories are not part of a bundle"))
            }
            (tar::EntryType::Regular | tar::EntryType::Continuous, Some(name)) => {
                if files.len() >= limits.max_files {
                    return Err(UnpackError::TooLarge(format!(
                        "more than {} files",
                        limits.max_files
                    )));
                }
                let size = entry.header().size().map_err(corrupt)?;
                total = total.saturating_add(size);
                if total > limits.max_bytes {
                    return Err(UnpackError::TooLarge(format!(
                        "more than {} bytes of files",
                        limits.max_bytes
                    )));
                }
                if !names.insert(name.clone()) {
                    return Err(refuse("a second file of the same name"));
                }
                let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 20));
                (&mut entry)
                    .take(size)
                    .read_to_end(&mut data)
                    .map_err(corrupt)?;
                if data.len() as u64 != size {
                    return Err(UnpackError::Corrupt(format!("`{name}` is cut short")));
                }
                files.push((name, data));
            }
            (_, None) => return Err(refuse("not a regular file")),
            (tar::EntryType::Symlink | tar::EntryType::Link, Some(_)) => {
                return Err(refuse("links are not part of a bundle"))
            }
            (_, Some(_)) => return Err(refuse("not a regular file")),
        }
    }
    if files.is_empty() {
        return Err(UnpackError::Empty);
    }
    Ok(files)
}

/// Writes `files` into the new directory `dir` (its parent must exist; `dir` must not).
pub fn write(files: &[File], dir: &Path) -> Result<(), UnpackError> {
    let error = |source| UnpackError::Write {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::create_dir(dir).map_err(error)?;
    for (name, data) in files {
        // `name` is one normal path component (checked by `read`): it stays in `dir`.
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        let mut file = options.open(dir.join(name)).map_err(error)?;
        io::Write::write_all(&mut file, data).map_err(error)?;
    }
    Ok(())
}

/// [`read`], then [`write`].
pub fn unpack(bytes: &[u8], dir: &Path, limits: Limits) -> Result<Vec<String>, UnpackError> {
    let files = read(bytes, limits)?;
    write(&files, dir)?;
    Ok(files.into_iter().map(|(name, _)| name).collect())
}

/// The file name an archive path stands for: `None` for the bundle directory itself (`.`,
/// `./`), `Some` for one plain file name (after an optional `./`), an error for anything else.
fn bundle_name(raw: &[u8]) -> Result<Option<String>, &'static str> {
    let name = std::str::from_utf8(raw).map_err(|_| "the path is not UTF-8")?;
    let name = name.strip_prefix("./").unwrap_or(name);
    let name = name.strip_suffix('/').unwrap_or(name);
    if name.is_empty() || name == "." {
        return Ok(None);
    }
    if name.starts_with('/') {
        return Err("absolute path");
    }
    if name == ".." || name.contains('/') || name.contains('\\') {
        return Err("a path, not a file name in the bundle");
    }
    if name.chars().any(char::is_control) {
        return Err("control character in the name");
    }
    if name.len() > 255 {
        return Err("name longer than 255 bytes");
    }
    Ok(Some(name.to_owned()))
}

fn corrupt(e: io::Error) -> UnpackError {
    UnpackError::Corrupt(e.to_string())
}

/// A reader that fails once more than `left` bytes were asked for.
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "decompressed archive exceeds the size limit",
            )
        })?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn files() -> Vec<File> {
        vec![
            (
                "b.cedar".into(),
                b"permit(principal, action, resource);".to_vec(),
            ),
            (
                "a.cedar".into(),
                b"forbid(principal, action, resource);".to_vec(),
            ),
            ("entities.json".into(), b"[]".to_vec()),
        ]
    }

    #[test]
    fn build_is_reproducible_and_reads_back_sorted() {
        let one = build_from(files()).unwrap();
        let mut reversed = files();
        reversed.reverse();
        assert_eq!(one, build_from(reversed).unwrap());
        let mut want = files();
        want.sort();
        assert_eq!(read(&one, DEFAULT_LIMITS).unwrap(), want);
    }

    /// A raw tar entry with any name and type, as an attacker would write it.
    pub(crate) fn raw_entry(tar: &mut Vec<u8>, name: &[u8], kind: u8, link: &[u8], data: &[u8]) {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len().min(100)]
            .copy_from_slice(&name[..name.len().min(100)]);
        header.as_old_mut().linkname[..link.len().min(100)]
            .copy_from_slice(&link[..link.len().min(100)]);
        header.set_entry_type(tar::EntryType::new(kind));
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }

    fn one(name: &[u8], kind: u8, link: &[u8]) -> Result<Vec<File>, UnpackError> {
        let mut tar = Vec::new();
        raw_entry(&mut tar, name, kind, link, b"x");
        tar.extend_from_slice(&[0; 1024]);
        read(&tar, DEFAULT_LIMITS)
    }

    #[test]
    fn traversal_links_and_devices_are_refused() {
        for name in [
            &b"../evil.cedar"[..],
            b"/etc/passwd",
            b"sub/p.cedar",
            b"./../p.cedar",
            b"..",
            b"a\\b",
            b"p\n.cedar",
        ] {
            let e = one(name, b'0', b"").unwrap_err();
            assert!(matches!(e, UnpackError::Entry { .. }), "{name:?}: {e}");
        }
        for kind in [b'1', b'2', b'3', b'4', b'6'] {
            let e = one(b"p.cedar", kind, b"/etc/passwd").unwrap_err();
            assert!(matches!(e, UnpackError::Entry { .. }), "{kind}: {e}");
        }
        assert!(matches!(
            one(b"sub/", b'5', b""),
            Err(UnpackError::Entry { .. })
        ));
        assert_eq!(one(b"./p.cedar", b'0', b"").unwrap()[0].0, "p.cedar");
    }

    #[test]
    fn sizes_counts_and_duplicates_are_bounded() {
        let small = Limits {
            max_files: 2,
            max_bytes: 10,
        };
        let many = build_from(files()).unwrap();
        assert!(matches!(read(&many, small), Err(UnpackError::TooLarge(_))));
        let big = build_from(vec![("p.cedar".into(), vec![b' '; 11])]).unwrap();
        assert!(matches!(read(&big, small), Err(UnpackError::TooLarge(_))));
        // A gzip bomb: a small artifact that inflates past the limit is stopped early.
        let bomb = build_from(vec![("p.cedar".into(), vec![0; 4 << 20])]).unwrap();
        assert!(bomb.len() < 64 << 10);
        let limits = Limits {
            max_files: 4,
            max_bytes: 1 << 20,
        };
        assert!(matches!(read(&bomb, limits), Err(UnpackError::TooLarge(_))));
        let mut tar = Vec::new();
        raw_entry(&mut tar, b"p.cedar", b'0', b"", b"a");
        raw_entry(&mut tar, b"./p.cedar", b'0', b"", b"b");
        tar.extend_from_slice(&[0; 1024]);
        assert!(matches!(
            read(&tar, DEFAULT_LIMITS),
            Err(UnpackError::Entry { .. })
        ));
        assert!(matches!(
            read(&[0; 1024], DEFAULT_LIMITS),
            Err(UnpackError::Empty)
        ));
        assert!(read(b"\x1f\x8bnot gzip", DEFAULT_LIMITS).is_err());
    }

    #[test]
    fn unpack_writes_into_a_new_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("bundle");
        let names = unpack(&build_from(files()).unwrap(), &target, DEFAULT_LIMITS).unwrap();
        assert_eq!(names, ["a.cedar", "b.cedar", "entities.json"]);
        assert_eq!(std::fs::read(target.join("entities.json")).unwrap(), b"[]");
        // Never into an existing directory (an older bundle's files would mix in).
        assert!(unpack(&build_from(files()).unwrap(), &target, DEFAULT_LIMITS).is_err());
    }
}
