//! `arbiter fmt [--check] PATH…`: formats Cedar policy files with Cedar's own formatter
//! (`cedar-policy-formatter`, the crate behind `cedar format`), keeping comments.
//!
//! A file is written only when it parses, its formatted text parses too, and both hold the
//! same policies (the same JSON form, annotations included, in the same order): formatting
//! never changes what a bundle decides. A file that does not parse is left as it is and
//! named with Cedar's error. Files are replaced atomically (a temporary file renamed over
//! them), so a server watching the bundle never reads half a file.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::PolicySet;

/// Cedar's default layout (80 columns, 2-space indent), as `cedar format` writes it.
fn config() -> cedar_policy_formatter::Config {
    cedar_policy_formatter::Config::default()
}

/// Why a file could not be formatted.
#[derive(Debug, thiserror::Error)]
pub enum FmtError {
    /// A path cannot be read or written.
    #[error("cannot {action} `{path}`")]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid Cedar: left untouched.
    #[error("`{path}` is not valid Cedar, left unchanged: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cedar's message.
        message: String,
    },
    /// The formatter's output would mean something else (never expected: a formatter bug).
    #[error("`{path}`: formatting would change its policies, left unchanged: {message}")]
    Meaning {
        /// The file.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    /// No `*.cedar` file among the paths.
    #[error("no `*.cedar` files in {0}")]
    NoFiles(String),
}

/// The formatted text of `text`, checked to hold the same policies.
pub fn format_text(text: &str) -> Result<String, String> {
    let original = policy_json(text)?;
    let mut formatted = text.to_owned();
    // Cedar's formatter is not always idempotent: a comment between two operands can move
    // once more on a second pass. Formatting to a fixed point keeps `fmt --check` green
    // after `fmt`; it settles in two passes in every case the property tests found.
    for _ in 0..MAX_PASSES {
        let next = cedar_policy_formatter::policies_str_to_pretty(&formatted, &config())
            .map_err(|e| format!("{e:?}"))?;
        let after = policy_json(&next).map_err(|e| format!("formatted text: {e}"))?;
        if after != original {
            return Err("the formatted policies differ from the original ones".to_owned());
        }
        if next == formatted {
            break;
        }
        formatted = next;
    }
    Ok(formatted)
}

/// Formatting passes at most (see [`format_text`]).
const MAX_PASSES: usize = 4;

/// Each policy and template of `text` in Cedar's JSON form, by position: the meaning of a
/// policy file without its layout and comments.
pub fn policy_json(text: &str) -> Result<BTreeMap<String, serde_json::Value>, String> {
    let set = PolicySet::from_str(text).map_err(|e| crate::schema::error_chain(&e))?;
    let mut out = BTreeMap::new();
    for policy in set.policies() {
        let json = policy.to_json().map_err(|e| e.to_string())?;
        out.insert(format!("policy {}", policy.id()), json);
    }
    for template in set.templates() {
        let json = template.to_json().map_err(|e| e.to_string())?;
        out.insert(format!("template {}", template.id()), json);
    }
    Ok(out)
}

/// The `*.cedar` files named by `paths`: files as given, directories' own files (not
/// recursive, as a bundle is read), in name order.
pub fn cedar_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, FmtError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|source| FmtError::Io {
                action: "read",
                path: path.clone(),
                source,
            })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "cedar"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    if files.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| format!("`{}`", p.display())).collect();
        return Err(FmtError::NoFiles(names.join(", ")));
    }
    Ok(files)
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Already formatted.
    Unchanged,
    /// Not formatted: rewritten, or (check mode) reported.
    Reformatted,
}

/// Formats `path` (in check mode only compares).
pub fn format_file(path: &Path, check: bool) -> Result<Outcome, FmtError> {
    let text = std::fs::read_to_string(path).map_err(|source| FmtError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    // Parse first, on its own, so a file that is not Cedar gets Cedar's own message.
    policy_json(&text).map_err(|message| FmtError::Parse {
        path: path.to_owned(),
        message,
    })?;
    let formatted = format_text(&text).map_err(|message| FmtError::Meaning {
        path: path.to_owned(),
        message,
    })?;
    if formatted == text {
        return Ok(Outcome::Unchanged);
    }
    if !check {
        write_atomically(path, formatted.as_bytes()).map_err(|source| FmtError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(Outcome::Reformatted)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut temp = tempfile_in(dir)?;
    temp.1.write_all(bytes)?;
    temp.1.sync_all()?;
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(&temp.0, meta.permissions())?;
    }
    std::fs::rename(&temp.0, path)
}

/// A new file beside the target, named so a bundle does not read it (`.` prefix, no
/// `.cedar` extension).
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for attempt in 0..100u32 {
        let path = dir.join(format!(".arbiter-fmt-{}-{attempt}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary file name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_keeps_comments_and_meaning() {
        let text = "// why\n@id(\"a\")   permit(principal,action==Arbiter::Action::\"x\",resource) when {context.a>1 && \n true};\n";
        let formatted = format_text(text).unwrap();
        assert!(formatted.contains("// why"), "{formatted}");
        assert_ne!(formatted, text);
        assert_eq!(policy_json(&formatted).unwrap(), policy_json(text).unwrap());
        // Idempotent.
        assert_eq!(format_text(&formatted).unwrap(), formatted);
    }

    #[test]
    fn a_different_policy_has_a_different_meaning() {
        let a = policy_json("permit(principal, action, resource) when { 1 < 2 };").unwrap();
        let b = policy_json("permit(principal, action, resource) when { 2 < 1 };").unwrap();
        assert_ne!(a, b);
    }
}
