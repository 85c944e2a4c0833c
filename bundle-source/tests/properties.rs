//! Property tests of the bundle unpacker, the parser of untrusted artifacts: any bytes, and
//! hostile archives (paths, links, devices, duplicates, sizes), give a defined outcome, never
//! a panic, and what is accepted is only plain files written inside the target directory.
//!
//! Convention (shared with the server's and filter's property tests): every property is a
//! `#[test]` named `prop_*` running `PROPTEST_CASES` cases (default 256; `make fuzz` runs
//! 1,000,000) and printing `property <crate>::<name>: <N> cases passed` to stderr.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::Cell;
use std::collections::HashSet;
use std::io::Write as _;

use arbiter_bundle_source::artifact::{self, Limits, UnpackError};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(256)
}

fn check<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = Config {
        failure_persistence: None,
        ..Config::with_cases(cases())
    };
    let mut runner = TestRunner::new(config);
    let passed = Cell::new(0u64);
    let result = runner.run(&strategy, |value| {
        test(value)?;
        passed.set(passed.get() + 1);
        Ok(())
    });
    if let Err(e) = result {
        panic!("property {name} failed: {e}");
    }
    eprintln!(
        "property {}::{name}: {} cases passed",
        env!("CARGO_PKG_NAME").replace('-', "_"),
        passed.get()
    );
}

const LIMITS: Limits = Limits {
    max_files: 6,
    max_bytes: 4096,
};

/// What every accepted artifact satisfies.
fn accepted_is_safe(files: &[artifact::File]) -> Result<(), TestCaseError> {
    let mut names = HashSet::new();
    let mut total = 0;
    prop_assert!(!files.is_empty() && files.len() <= LIMITS.max_files);
    for (name, data) in files {
        prop_assert!(!name.is_empty() && name != "." && name != "..");
        prop_assert!(!name.contains('/') && !name.contains('\\'), "{name:?}");
        prop_assert!(!name.chars().any(char::is_control), "{name:?}");
        prop_assert!(names.insert(name.clone()), "duplicate {name:?}");
        total += data.len() as u64;
    }
    prop_assert!(total <= LIMITS.max_bytes);
    Ok(())
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

#[test]
fn prop_unpacker_takes_any_bytes() {
    check(
        "prop_unpacker_takes_any_bytes",
        (
            proptest::collection::vec(any::<u8>(), 0..4096),
            any::<bool>(),
        ),
        |(bytes, compress)| {
            let bytes = if compress { gzip(&bytes) } else { bytes };
            if let Ok(files) = artifact::read(&bytes, LIMITS) {
                accepted_is_safe(&files)?;
            }
            Ok(())
        },
    );
}

/// One raw tar entry, as an attacker would write it.
#[derive(Debug, Clone)]
struct Entry {
    name: Vec<u8>,
    kind: u8,
    link: Vec<u8>,
    size: usize,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"p.cedar".to_vec()),
        Just(b"./p.cedar".to_vec()),
        Just(b"../p.cedar".to_vec()),
        Just(b"../../etc/cron.d/x".to_vec()),
        Just(b"/etc/passwd".to_vec()),
        Just(b"sub/p.cedar".to_vec()),
        Just(b"./".to_vec()),
        Just(b".".to_vec()),
        Just(b"..".to_vec()),
        Just(b"a\\..\\b".to_vec()),
        Just(b"entities.json".to_vec()),
        "[a-z.]{1,12}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 1..100),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        name(),
        prop_oneof![
            Just(b'0'),
            Just(b'0'),
            Just(0u8),
            Just(b'1'),
            Just(b'2'),
            Just(b'3'),
            Just(b'4'),
            Just(b'5'),
            Just(b'6'),
            Just(b'7'),
            Just(b'g'),
            Just(b'x'),
            Just(b'L'),
            Just(b'S'),
            any::<u8>(),
        ],
        prop_oneof![
            Just(b"/etc/passwd".to_vec()),
            Just(b"../x".to_vec()),
            Just(Vec::new())
        ],
        0usize..1500,
    )
        .prop_map(|(name, kind, link, size)| Entry {
            name,
            kind,
            link,
            size,
        })
}

fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut tar = Vec::new();
    for e in entries {
        let mut header = tar::Header::new_old();
        let n = e.name.len().min(100);
        header.as_old_mut().name[..n].copy_from_slice(&e.name[..n]);
        let l = e.link.len().min(100);
        header.as_old_mut().linkname[..l].copy_from_slice(&e.link[..l]);
        header.set_entry_type(tar::EntryType::new(e.kind));
        header.set_size(e.size as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.extend_from_slice(header.as_bytes());
        tar.extend(std::iter::repeat_n(b'x', e.size));
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }
    tar.extend_from_slice(&[0; 1024]);
    tar
}

#[test]
fn prop_unpacker_refuses_hostile_archives() {
    check(
        "prop_unpacker_refuses_hostile_archives",
        (
            proptest::collection::vec(entry(), 0..8),
            any::<bool>(),
            any::<u16>(),
        ),
        |(entries, compress, cut)| {
            let mut bytes = archive(&entries);
            // Sometimes cut short.
            if cut % 4 == 0 {
                bytes.truncate(usize::from(cut) % (bytes.len() + 1));
            }
            let bytes = if compress { gzip(&bytes) } else { bytes };
            match artifact::read(&bytes, LIMITS) {
                Ok(files) => {
                    accepted_is_safe(&files)?;
                    // Written where they belong, and nowhere else.
                    let dir = tempfile::tempdir().unwrap();
                    let target = dir.path().join("bundle");
                    artifact::write(&files, &target).unwrap();
                    let outside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
                    prop_assert_eq!(outside.len(), 1);
                    for entry in std::fs::read_dir(&target).unwrap() {
                        let meta = entry.unwrap().path().symlink_metadata().unwrap();
                        prop_assert!(meta.is_file());
                    }
                    // Only regular entries with a plain name could have been accepted.
                    for e in &entries {
                        let plain = e.name.strip_prefix(b"./").unwrap_or(&e.name);
                        if matches!(e.kind, b'1' | b'2' | b'3' | b'4' | b'6') && !plain.is_empty() {
                            let shown = String::from_utf8_lossy(plain).into_owned();
                            prop_assert!(!files.iter().any(|(n, _)| *n == shown));
                        }
                    }
                }
                Err(UnpackError::Write { .. }) => prop_assert!(false, "read never writes"),
                Err(_) => {}
            }
            Ok(())
        },
    );
}

#[test]
fn prop_unpacker_round_trips_built_bundles() {
    let file = (
        "[a-z][a-z0-9_.-]{0,20}",
        proptest::collection::vec(any::<u8>(), 0..300),
    );
    check(
        "prop_unpacker_round_trips_built_bundles",
        proptest::collection::btree_map(file.0, file.1, 1..6),
        |files| {
            let files: Vec<artifact::File> = files.into_iter().collect();
            let built = artifact::build_from(files.clone()).unwrap();
            prop_assert_eq!(&artifact::build_from(files.clone()).unwrap(), &built);
            prop_assert_eq!(artifact::read(&built, LIMITS).unwrap(), files);
            Ok(())
        },
    );
}

/// A `WWW-Authenticate` header value: challenge-like pieces and arbitrary characters.
fn challenge_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("Bearer".to_owned()),
        Just("basic".to_owned()),
        Just(" ".to_owned()),
        Just(",".to_owned()),
        Just("=".to_owned()),
        Just("\"".to_owned()),
        Just("\\".to_owned()),
        Just("realm".to_owned()),
        Just("scope=\"repository:a/b:pull,push\"".to_owned()),
        "[a-z0-9=+/._-]{0,6}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..16).prop_map(|p| p.concat())
}

#[test]
fn prop_www_authenticate_parser_never_panics_and_round_trips() {
    use arbiter_bundle_source::auth::parse_challenges;
    check(
        "prop_www_authenticate_parser_never_panics_and_round_trips",
        challenge_text(),
        |text| {
            if let Ok(challenges) = parse_challenges(&text) {
                // What is accepted renders back to a header that parses to the same.
                let rendered = challenges
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                let again = parse_challenges(&rendered);
                prop_assert_eq!(
                    again.as_ref(),
                    Ok(&challenges),
                    "{:?} -> {:?}",
                    text,
                    rendered
                );
                for c in &challenges {
                    prop_assert!(!c.scheme.is_empty());
                    prop_assert_eq!(c.scheme.to_ascii_lowercase(), c.scheme.clone());
                }
            }
            Ok(())
        },
    );
}

#[test]
fn prop_rendered_challenges_parse_back() {
    use arbiter_bundle_source::auth::{parse_challenges, Challenge};
    let challenge = (
        "[a-z][a-z0-9-]{0,8}",
        prop::collection::vec(
            (
                "[a-z][a-z0-9_]{0,6}",
                "[^\\x00-\\x08\\x0a-\\x1f\\x7f-\\u{9f}]{0,12}",
            ),
            1..4,
        ),
    )
        .prop_map(|(scheme, params)| {
            let mut seen = HashSet::new();
            Challenge {
                scheme,
                params: params
                    .into_iter()
                    .filter(|(n, _)| seen.insert(n.clone()))
                    .collect(),
                token68: None,
            }
        });
    check(
        "prop_rendered_challenges_parse_back",
        prop::collection::vec(challenge, 1..4),
        |challenges| {
            let rendered = challenges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            prop_assert_eq!(parse_challenges(&rendered), Ok(challenges), "{}", rendered);
            Ok(())
        },
    );
}

#[test]
fn prop_docker_config_parser_never_panics_nor_echoes_secrets() {
    use arbiter_bundle_source::auth::parse_credentials;
    let secret = "s3cr3t-PASSWORD";
    let json = prop_oneof![
        any::<Vec<u8>>(),
        ("[a-z0-9.:]{0,12}", "[A-Za-z0-9+/=%]{0,24}", any::<bool>(),).prop_map(
            move |(registry, auth, with_password)| {
                let entry = if with_password {
                    format!(r#"{{"username":"u","password":"{secret}","auth":"{auth}"}}"#)
                } else {
                    format!(r#"{{"auth":"{auth}{secret}"}}"#)
                };
                format!(r#"{{"auths":{{"{registry}":{entry}}}}}"#).into_bytes()
            }
        ),
    ];
    check(
        "prop_docker_config_parser_never_panics_nor_echoes_secrets",
        json,
        |bytes| {
            match parse_credentials(&bytes) {
                Ok(entries) => {
                    let shown = format!("{entries:?}");
                    prop_assert!(!shown.contains(secret), "{}", shown);
                }
                Err(e) => prop_assert!(!e.contains(secret), "{}", e),
            }
            Ok(())
        },
    );
}
