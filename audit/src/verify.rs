//! `arbiter audit verify`: checks hashes, `seq` and `prev_hash` links across files.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::record::{self, GENESIS_HASH};

/// Why verification could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No file was given.
    #[error("no audit file given")]
    NoFiles,
    /// A file cannot be read.
    #[error("cannot read `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The first place where the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// The record's seq, when it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub why: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.why)
    }
}

/// Outcome of a verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Files read, in chain order.
    pub files: Vec<PathBuf>,
    /// Records checked (up to the first break).
    pub records: u64,
    /// Seq of the first record.
    pub first_seq: Option<u64>,
    /// Seq of the last good record.
    pub last_seq: Option<u64>,
    /// Hash of the last good record (note it down to detect a later truncation).
    pub last_hash: Option<String>,
    /// Things to know that do not break the chain (torn tails, a chain starting after 1).
    pub warnings: Vec<String>,
    /// The first break, if any.
    pub broken: Option<Broken>,
}

impl VerifyReport {
    /// Whether the chain is intact.
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }
}

struct Line<'a> {
    number: usize,
    bytes: &'a [u8],
}

struct LoadedFile {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl LoadedFile {
    /// Complete lines, and the torn tail (bytes after the last newline) if any.
    fn lines(&self) -> (Vec<Line<'_>>, Option<&[u8]>) {
        let complete = self
            .bytes
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let lines = if complete == 0 {
            Vec::new()
        } else {
            self.bytes[..complete - 1]
                .split(|b| *b == b'\n')
                .enumerate()
                .map(|(i, bytes)| Line {
                    number: i + 1,
                    bytes,
                })
                .collect()
        };
        let torn = Some(&self.bytes[complete..]).filter(|t| !t.is_empty());
        (lines, torn)
    }

    /// Seq of the first line, for ordering files.
    fn first_seq(&self) -> Option<u64> {
        let (lines, _) = self.lines();
        lines
            .first()
            .and_then(|line| record::check_line(line.bytes).ok())
            .map(|link| link.seq)
    }
}

/// Verifies `files` as one chain. Files are put in chain order by their first record's seq
/// (so `audit.jsonl*` in any order works); files whose first record is unreadable come last.
pub fn verify(files: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    if files.is_empty() {
        return Err(VerifyError::NoFiles);
    }
    let mut loaded = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|source| VerifyError::Read {
            path: path.clone(),
            source,
        })?;
        loaded.push(LoadedFile {
            path: path.clone(),
            bytes,
        });
    }
    loaded.sort_by_key(|f| f.first_seq().unwrap_or(u64::MAX));

    let mut report = VerifyReport {
        files: loaded.iter().map(|f| f.path.clone()).collect(),
        ..VerifyReport::default()
    };
    // (seq, hash, where) of the last good record.
    let mut last: Option<(u64, String, String)> = None;
    for file in &loaded {
        let (lines, torn) = file.lines();
        if lines.is_empty() && torn.is_none() {
            report
                .warnings
                .push(format!("{}: empty file", file.path.display()));
        }
        for line in &lines {
            if let Err(broken) = check(&file.path, line, &mut last, &mut report) {
                report.broken = Some(broken);
                return Ok(report);
            }
        }
        if let Some(torn) = torn {
            report.warnings.push(format!(
                "{}:{}: torn last line ({} bytes without a newline): a crash while writing, never acknowledged; skipped",
                file.path.display(),
                lines.len() + 1,
                torn.len()
            ));
        }
    }
    Ok(report)
}

fn check(
    path: &Path,
    line: &Line<'_>,
    last: &mut Option<(u64, String, String)>,
    report: &mut VerifyReport,
) -> Result<(), Broken> {
    let broken = |seq, why: String| Broken {
        file: path.to_owned(),
        line: line.number,
        seq,
        why,
    };
    let link = record::check_line(line.bytes).map_err(|e| broken(None, e.to_string()))?;
    let seq = Some(link.seq);
    match last {
        None if link.seq == 1 && link.prev_hash != GENESIS_HASH => {
            return Err(broken(
                seq,
                "the first record of a chain must have the all-zero prev_hash".into(),
            ));
        }
        None if link.seq != 1 => report.warnings.push(format!(
            "chain starts at seq {} ({}:{}): files with earlier records were not given, the link to them is not checked",
            link.seq,
            path.display(),
            line.number
        )),
        None => {}
        Some((last_seq, last_hash, at)) => {
            let expected = *last_seq + 1;
            if link.seq != expected {
                let why = if link.seq > expected {
                    format!(
                        "expected seq {expected}, found {}: record(s) missing or out of order after {at}",
                        link.seq
                    )
                } else {
                    format!(
                        "expected seq {expected}, found {}: record repeated or out of order after {at}",
                        link.seq
                    )
                };
                return Err(broken(seq, why));
            }
            if link.prev_hash != last_hash.as_str() {
                return Err(broken(
                    seq,
                    format!("prev_hash does not match the hash of the record before ({at}): that record was changed, or this one was"),
                ));
            }
        }
    }
    report.records += 1;
    report.first_seq.get_or_insert(link.seq);
    report.last_seq = Some(link.seq);
    report.last_hash = Some(link.hash.to_owned());
    *last = Some((
        link.seq,
        link.hash.to_owned(),
        format!("{}:{}", path.display(), line.number),
    ));
    Ok(())
}
