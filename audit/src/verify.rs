//! `arbiter audit verify`: checks hashes, `seq` and `prev_hash` links across files and,
//! given the public key, proves the chain complete up to its newest signed checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use p256::ecdsa::VerifyingKey;
use serde::Serialize;

use super::checkpoint::{self, Checkpoint};
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
    /// Things to know that do not break the chain (torn tails, a chain starting after 1,
    /// records after the newest checkpoint).
    pub warnings: Vec<String>,
    /// With a key: valid signed checkpoints read.
    pub checkpoints: u64,
    /// With a key: the newest valid checkpoint, up to which the chain is proven complete.
    pub checkpoint: Option<Checkpoint>,
    /// With a key: the first and last seq of the records after the newest checkpoint (no
    /// signature covers them yet).
    pub unsigned: Option<(u64, u64)>,
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
/// Proves order, not completeness: see [`verify_complete`].
pub fn verify(files: &[PathBuf]) -> Result<VerifyReport, VerifyError> {
    verify_complete(files, None, &[])
}

/// A signed checkpoint and where it was read.
struct Anchor {
    hash: String,
    at: String,
}

/// [`verify`], and with `key`: every checkpoint line (in `files` — a `<log>.checkpoints`
/// file is recognised by its content — and in `checkpoints`, e.g. a copy kept off the host)
/// must be signed by `key`; the chain must start at seq 1, match every checkpoint it
/// reaches and reach the newest one. Records after the newest checkpoint are reported in
/// [`VerifyReport::unsigned`], not as a break.
pub fn verify_complete(
    files: &[PathBuf],
    key: Option<&VerifyingKey>,
    checkpoints: &[PathBuf],
) -> Result<VerifyReport, VerifyError> {
    if files.is_empty() {
        return Err(VerifyError::NoFiles);
    }
    let read = |path: &PathBuf| {
        std::fs::read(path)
            .map(|bytes| LoadedFile {
                path: path.clone(),
                bytes,
            })
            .map_err(|source| VerifyError::Read {
                path: path.clone(),
                source,
            })
    };
    let mut loaded = Vec::new();
    let mut anchor_files = Vec::new();
    for path in files {
        let file = read(path)?;
        if checkpoint::is_checkpoint_file(&file.bytes) {
            anchor_files.push(file);
        } else {
            loaded.push(file);
        }
    }
    for path in checkpoints {
        anchor_files.push(read(path)?);
    }
    loaded.sort_by_key(|f| f.first_seq().unwrap_or(u64::MAX));

    let mut report = VerifyReport {
        files: loaded.iter().map(|f| f.path.clone()).collect(),
        ..VerifyReport::default()
    };
    // seq -> the signed hash, and the newest checkpoint.
    let mut anchors: BTreeMap<u64, Anchor> = BTreeMap::new();
    if let Some(key) = key {
        if let Err(broken) = read_anchors(&anchor_files, key, &mut anchors, &mut report) {
            report.broken = Some(broken);
            return Ok(report);
        }
    } else if !anchor_files.is_empty() {
        report.warnings.push(
            "checkpoint files given without --key: their signatures are not checked and completeness is not proven".into(),
        );
    }
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
            let checked = check(&file.path, line, &mut last, &mut report, key.is_some())
                .and_then(|()| match_anchor(&file.path, line, &last, &anchors));
            if let Err(broken) = checked {
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
    if key.is_some() {
        complete(&anchors, &mut report);
    }
    Ok(report)
}

/// Reads and checks every checkpoint line; two valid checkpoints of one seq must agree.
fn read_anchors(
    files: &[LoadedFile],
    key: &VerifyingKey,
    anchors: &mut BTreeMap<u64, Anchor>,
    report: &mut VerifyReport,
) -> Result<(), Broken> {
    for file in files {
        let (lines, torn) = file.lines();
        for line in &lines {
            let broken = |seq, why: String| Broken {
                file: file.path.clone(),
                line: line.number,
                seq,
                why,
            };
            let cp = Checkpoint::verify(line.bytes, key).map_err(|e| {
                let seq = Checkpoint::parse(line.bytes).ok().map(|c| c.seq);
                broken(seq, format!("checkpoint: {e}"))
            })?;
            let at = format!("{}:{}", file.path.display(), line.number);
            if let Some(other) = anchors.get(&cp.seq) {
                if other.hash != cp.hash {
                    return Err(broken(
                        Some(cp.seq),
                        format!(
                            "checkpoint: two signed checkpoints of seq {} name different records (the other is {}): the chain was forked or rewritten",
                            cp.seq, other.at
                        ),
                    ));
                }
            }
            report.checkpoints += 1;
            if report
                .checkpoint
                .as_ref()
                .is_none_or(|newest| cp.seq > newest.seq)
            {
                report.checkpoint = Some(cp.clone());
            }
            anchors.insert(cp.seq, Anchor { hash: cp.hash, at });
        }
        if let Some(torn) = torn {
            report.warnings.push(format!(
                "{}:{}: torn last checkpoint line ({} bytes without a newline); skipped",
                file.path.display(),
                lines.len() + 1,
                torn.len()
            ));
        }
    }
    Ok(())
}

/// The record just checked (`last`) must have the hash its checkpoint signed, if any.
fn match_anchor(
    path: &Path,
    line: &Line<'_>,
    last: &Option<(u64, String, String)>,
    anchors: &BTreeMap<u64, Anchor>,
) -> Result<(), Broken> {
    let Some((seq, hash, _)) = last else {
        return Ok(());
    };
    match anchors.get(seq) {
        Some(anchor) if anchor.hash != *hash => Err(Broken {
            file: path.to_owned(),
            line: line.number,
            seq: Some(*seq),
            why: format!(
                "this record is not the one the signed checkpoint {} names: the log was rewritten from here or before",
                anchor.at
            ),
        }),
        _ => Ok(()),
    }
}

/// After an intact pass: the chain must reach the newest checkpoint.
fn complete(anchors: &BTreeMap<u64, Anchor>, report: &mut VerifyReport) {
    let Some((&newest, anchor)) = anchors.last_key_value() else {
        report.broken = Some(Broken {
            file: report.files.first().cloned().unwrap_or_default(),
            line: 0,
            seq: None,
            why: "no signed checkpoint: the chain's order is checked, its completeness cannot be proven (give the checkpoints file or --checkpoint)".into(),
        });
        return;
    };
    let ts = report
        .checkpoint
        .as_ref()
        .map(|c| c.ts.clone())
        .unwrap_or_default();
    let last = report.last_seq.unwrap_or(0);
    if last < newest {
        let (file, line) = anchor.at.rsplit_once(':').map_or_else(
            || (PathBuf::from(&anchor.at), 0),
            |(file, line)| (PathBuf::from(file), line.parse().unwrap_or(0)),
        );
        report.broken = Some(Broken {
            file,
            line,
            seq: Some(newest),
            why: format!(
                "records {}..={newest} are missing: the log ends at seq {last}, but a checkpoint signed at {ts} covers up to seq {newest} (tail or whole files removed, or the log restored from an older backup)",
                last + 1
            ),
        });
        return;
    }
    if last > newest {
        report.unsigned = Some((newest + 1, last));
        report.warnings.push(format!(
            "records {}..={last} ({}) come after the newest checkpoint (seq {newest}, {ts}): intact, but no signature covers them yet",
            newest + 1,
            last - newest
        ));
    }
}

fn check(
    path: &Path,
    line: &Line<'_>,
    last: &mut Option<(u64, String, String)>,
    report: &mut VerifyReport,
    anchored: bool,
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
        // Proving completeness, records before the first one given are missing records.
        None if link.seq != 1 && anchored => {
            return Err(broken(
                seq,
                format!(
                    "the chain starts at seq {}: records 1..={} are missing (head truncated, or their files not given)",
                    link.seq,
                    link.seq - 1
                ),
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
