//! Signed checkpoints: what the writer signs, and every way of removing, reordering or
//! forging evidence that `verify_complete` must name.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arbiter_audit::checkpoint::{checkpoints_path, Checkpoint, CheckpointReason};
use arbiter_audit::record::{AuditEvent, Reason, Verdict};
use arbiter_audit::verify::{verify_complete, VerifyReport};
use arbiter_audit::writer::rotated_files;
use arbiter_audit::{AuditConfig, AuditError, AuditLog, AuditMetrics, AuditSync, Checkpointing};
use p256::ecdsa::SigningKey;
use proptest::prelude::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_slice(&[seed; 32]).unwrap()
}

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        ts: "2026-11-22T02:00:00.000001Z".into(),
        request_time: None,
        id: format!("id-{i}"),
        request_id: format!("r-{i}"),
        decision: Verdict::Allow,
        dry_run: false,
        reason: Reason::Permit,
        policy_version: "sha256:0".into(),
        policy_ids: vec!["p".into()],
        shadow_decision: None,
        principal: "anonymous".into(),
        action: "chat.completions".into(),
        route: "chat".into(),
        route_context: BTreeMap::new(),
        method: "POST".into(),
        scheme: "http".into(),
        host: "gw".into(),
        path: "/v1/chat/completions".into(),
        source: None,
        identity: None,
        headers: BTreeMap::new(),
        headers_omitted: None,
        model: None,
        body_bytes: None,
        body_size_known: None,
        body_truncated: None,
        body_parse_error: None,
        stream: None,
        max_tokens: None,
        message_count: None,
        prompt_sha256: None,
        trace_id: None,
        latency_us: 1,
        cut: Default::default(),
    }
}

fn config(path: &Path, every: u64, max_bytes: u64) -> AuditConfig {
    AuditConfig {
        path: path.to_owned(),
        sync: AuditSync::Write,
        max_bytes,
        checkpoints: Some(Checkpointing {
            key: key(1),
            every,
            // Never due by time in these tests: only counts, rotation and shutdown.
            interval: Duration::from_secs(3600),
        }),
    }
}

/// Writes `range` and closes the log (dropping the last handle waits for the writer).
async fn write(config: &AuditConfig, range: std::ops::Range<usize>) -> AuditMetrics {
    let metrics = AuditMetrics::default();
    let log = AuditLog::open(config, metrics.clone()).unwrap();
    for i in range {
        log.append(event(i)).await.unwrap();
    }
    drop(log);
    metrics
}

fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = rotated_files(path)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    if path.exists() {
        files.push(path.to_owned());
    }
    files
}

fn with_checkpoints(path: &Path) -> Vec<PathBuf> {
    let mut files = log_files(path);
    files.push(checkpoints_path(path));
    files
}

fn verify_with(files: &[PathBuf], seed: u8, extra: &[PathBuf]) -> VerifyReport {
    verify_complete(files, Some(key(seed).verifying_key()), extra).unwrap()
}

fn why(report: &VerifyReport) -> String {
    report
        .broken
        .as_ref()
        .map(|b| b.to_string())
        .unwrap_or_else(|| panic!("not broken: {report:?}"))
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn the_writer_signs_every_n_records_and_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let metrics = write(&config(&path, 4, 1 << 30), 0..10).await;
    // 4, 8, then 10 at shutdown.
    assert_eq!(metrics.checkpoints.get(), 3);
    let cps: Vec<Checkpoint> = lines(&checkpoints_path(&path))
        .iter()
        .map(|l| Checkpoint::verify(l.as_bytes(), key(1).verifying_key()).unwrap())
        .collect();
    assert_eq!(
        cps.iter().map(|c| (c.seq, c.reason)).collect::<Vec<_>>(),
        [
            (4, CheckpointReason::Periodic),
            (8, CheckpointReason::Periodic),
            (10, CheckpointReason::Shutdown)
        ]
    );
    let report = verify_with(&with_checkpoints(&path), 1, &[]);
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.checkpoints, report.unsigned), (3, None));
    assert_eq!(report.checkpoint.unwrap().seq, 10);

    // Records after the newest checkpoint are intact but reported as unsigned, exactly.
    let mut lines_now = lines(&checkpoints_path(&path));
    lines_now.pop();
    write_lines(&checkpoints_path(&path), &lines_now);
    let report = verify_with(&with_checkpoints(&path), 1, &[]);
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.unsigned, Some((9, 10)));
}

/// An idle server signs its last records once the interval has passed, without waiting for
/// more records or a shutdown.
#[tokio::test]
async fn an_idle_writer_signs_after_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut config = config(&path, 1000, 1 << 30);
    if let Some(c) = config.checkpoints.as_mut() {
        c.interval = Duration::from_millis(10);
    }
    let metrics = AuditMetrics::default();
    let log = AuditLog::open(&config, metrics.clone()).unwrap();
    log.append(event(0)).await.unwrap();
    // Polled, with a deadline far beyond the interval so a loaded machine cannot fail it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metrics.checkpoints.get() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint after the interval"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cp = lines(&checkpoints_path(&path)).pop().unwrap();
    let cp = Checkpoint::verify(cp.as_bytes(), key(1).verifying_key()).unwrap();
    assert_eq!((cp.seq, cp.reason), (1, CheckpointReason::Periodic));
    drop(log);
    // Nothing unsigned left: no shutdown checkpoint.
    assert_eq!(metrics.checkpoints.get(), 1);
}

#[tokio::test]
async fn truncation_at_the_tail_head_middle_and_of_the_whole_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write(&config(&path, 5, 1 << 30), 0..20).await;
    let original = lines(&path);
    let files = with_checkpoints(&path);

    // Tail: the last 5 records dropped.
    write_lines(&path, &original[..15]);
    let report = verify_with(&files, 1, &[]);
    assert!(
        why(&report).contains("records 16..=20 are missing"),
        "{}",
        why(&report)
    );

    // Head: the first record dropped.
    write_lines(&path, &original[1..]);
    let report = verify_with(&files, 1, &[]);
    assert!(
        why(&report).contains("records 1..=1 are missing"),
        "{}",
        why(&report)
    );

    // Middle: seq 7 dropped.
    let mut middle = original.clone();
    middle.remove(6);
    write_lines(&path, &middle);
    let report = verify_with(&files, 1, &[]);
    assert!(
        why(&report).contains("expected seq 7, found 8"),
        "{}",
        why(&report)
    );

    // Whole file: only the checkpoints are left.
    std::fs::remove_file(&path).unwrap();
    let report = verify_with(&[checkpoints_path(&path)], 1, &[]);
    assert!(
        why(&report).contains("records 1..=20 are missing"),
        "{}",
        why(&report)
    );

    // Reordered: two records swapped.
    let mut swapped = original.clone();
    swapped.swap(3, 4);
    write_lines(&path, &swapped);
    let report = verify_with(&files, 1, &[]);
    assert!(
        why(&report).contains("expected seq 4, found 5"),
        "{}",
        why(&report)
    );

    // Intact again.
    write_lines(&path, &original);
    assert!(verify_with(&files, 1, &[]).ok());
}

#[tokio::test]
async fn truncation_across_rotation_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let metrics = write(&config(&path, 1000, 4096), 0..40).await;
    assert!(metrics.rotations.get() >= 3);
    // A checkpoint at every rotation and one at shutdown.
    assert_eq!(metrics.checkpoints.get(), metrics.rotations.get() + 1);
    let rotated = rotated_files(&path).unwrap();
    assert!(verify_with(&with_checkpoints(&path), 1, &[]).ok());

    // The newest rotated file and the active one removed: the tail of the chain is gone.
    let mut files = with_checkpoints(&path);
    files.retain(|f| *f != path && *f != rotated.last().unwrap().1);
    let report = verify_with(&files, 1, &[]);
    assert!(why(&report).contains("are missing"), "{}", why(&report));
    // The oldest rotated file removed: the head is gone.
    let mut files = with_checkpoints(&path);
    files.retain(|f| *f != rotated[0].1);
    let report = verify_with(&files, 1, &[]);
    assert!(why(&report).contains("records 1..="), "{}", why(&report));
}

#[tokio::test]
async fn forged_and_foreign_checkpoints_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write(&config(&path, 5, 1 << 30), 0..10).await;
    let cp_path = checkpoints_path(&path);
    let files = with_checkpoints(&path);
    let original = lines(&cp_path);

    // Forged: the insider truncates the log to 7 and edits the newest checkpoint to match.
    let log = lines(&path);
    write_lines(&path, &log[..7]);
    let record7: serde_json::Value = serde_json::from_str(&log[6]).unwrap();
    let hash10: serde_json::Value = serde_json::from_str(&log[9]).unwrap();
    let forged = original[1].replace("\"seq\":10", "\"seq\":7").replace(
        hash10["hash"].as_str().unwrap(),
        record7["hash"].as_str().unwrap(),
    );
    write_lines(&cp_path, &[original[0].clone(), forged]);
    let report = verify_with(&files, 1, &[]);
    assert!(
        why(&report).contains("signature does not verify: forged or edited"),
        "{}",
        why(&report)
    );
    // ... or signs it with a key of their own.
    let own = Checkpoint::sign(
        7,
        record7["hash"].as_str().unwrap(),
        CheckpointReason::Shutdown,
        &key(2),
    )
    .unwrap();
    let own = String::from_utf8(own).unwrap().trim_end().to_owned();
    write_lines(&cp_path, &[original[0].clone(), own]);
    let report = verify_with(&files, 1, &[]);
    assert!(
        why(&report).contains("signed with another key"),
        "{}",
        why(&report)
    );

    // Verified with the wrong public key: every checkpoint is foreign.
    write_lines(&path, &log);
    write_lines(&cp_path, &original);
    let report = verify_with(&files, 3, &[]);
    assert!(
        why(&report).contains("signed with another key"),
        "{}",
        why(&report)
    );

    // No checkpoint at all: order only, completeness not proven.
    let report = verify_with(&log_files(&path), 1, &[]);
    assert!(
        why(&report).contains("no signed checkpoint"),
        "{}",
        why(&report)
    );

    assert!(verify_with(&files, 1, &[]).ok());
}

/// The insider rewrites a record and recomputes every hash after it: the chain is intact
/// again, but it is not the chain that was signed.
#[tokio::test]
async fn a_rewritten_and_rehashed_history_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write(&config(&path, 5, 1 << 30), 0..10).await;
    let mut prev = arbiter_audit::record::GENESIS_HASH.to_owned();
    let mut out = Vec::new();
    for (i, line) in lines(&path).iter().enumerate() {
        let mut record = arbiter_audit::record::parse_line(line.as_bytes()).unwrap();
        if i == 2 {
            record.event.decision = Verdict::Deny;
        }
        prev = arbiter_audit::record::encode(&record.event, record.seq, &prev, &mut out).unwrap();
    }
    std::fs::write(&path, &out).unwrap();
    assert!(arbiter_audit::verify::verify(&log_files(&path))
        .unwrap()
        .ok());
    let report = verify_with(&with_checkpoints(&path), 1, &[]);
    let broken = report.broken.clone().unwrap();
    assert_eq!((broken.line, broken.seq), (5, Some(5)));
    assert!(
        why(&report).contains("not the one the signed checkpoint"),
        "{}",
        why(&report)
    );
}

/// Power loss in `fsync` mode, modelled by cutting the log back to what was synced: a
/// checkpoint is signed only after the records it covers were synced, so the cut can only
/// take records after it (reported unsigned, not missing); anything more is missing.
#[tokio::test]
async fn power_loss_takes_only_unsigned_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let mut config = config(&path, 4, 1 << 30);
    config.sync = AuditSync::Fsync;
    let metrics = AuditMetrics::default();
    let log = AuditLog::open(&config, metrics.clone()).unwrap();
    for i in 0..6 {
        log.append(event(i)).await.unwrap();
    }
    // The process dies before its shutdown checkpoint: the newest checkpoint is seq 4.
    std::mem::forget(log);
    assert_eq!(metrics.checkpoints.get(), 1);
    let all = lines(&path);
    let files = with_checkpoints(&path);
    // Synced up to seq 5 only (a torn half of seq 6 after it).
    let mut cut = all[..5].join("\n");
    cut.push('\n');
    cut.push_str(&all[5][..20]);
    std::fs::write(&path, cut).unwrap();
    let report = verify_with(&files, 1, &[]);
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.unsigned, Some((5, 5)));
    // Cut into the signed records: missing.
    write_lines(&path, &all[..3]);
    let report = verify_with(&files, 1, &[]);
    assert!(
        why(&report).contains("records 4..=4 are missing"),
        "{}",
        why(&report)
    );
}

#[tokio::test]
async fn a_log_restored_from_an_older_backup_fails_against_a_newer_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write(&config(&path, 1000, 1 << 30), 0..5).await;
    let backup_log = std::fs::read(&path).unwrap();
    let backup_cps = std::fs::read(checkpoints_path(&path)).unwrap();
    write(&config(&path, 1000, 1 << 30), 5..12).await;
    // The auditor's copy of the newest checkpoints, kept off the host.
    let offsite = dir.path().join("offsite.checkpoints");
    std::fs::copy(checkpoints_path(&path), &offsite).unwrap();

    // The insider restores both files from the backup: consistent with each other...
    std::fs::write(&path, &backup_log).unwrap();
    std::fs::write(checkpoints_path(&path), &backup_cps).unwrap();
    assert!(verify_with(&with_checkpoints(&path), 1, &[]).ok());
    // ...but not with the checkpoint known from elsewhere.
    let report = verify_with(&with_checkpoints(&path), 1, &[offsite]);
    assert!(
        why(&report).contains("records 6..=12 are missing"),
        "{}",
        why(&report)
    );
}

#[tokio::test]
async fn the_writer_refuses_a_log_shorter_than_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let config = config(&path, 1000, 1 << 30);
    write(&config, 0..6).await;
    let all = lines(&path);
    write_lines(&path, &all[..4]);
    let err = AuditLog::open(&config, AuditMetrics::default()).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::BehindCheckpoint {
                head: 4,
                seq: 6,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("ends at seq 4"), "{err}");
    // Refused even without a key configured: the checkpoint file alone is enough.
    let unsigned = AuditConfig::new(&path);
    assert!(matches!(
        AuditLog::open(&unsigned, AuditMetrics::default()),
        Err(AuditError::BehindCheckpoint { .. })
    ));
    // A rewritten head at the checkpoint's seq is refused too.
    let mut edited = all.clone();
    edited[5] = edited[5].replace("id-5", "id-X");
    write_lines(&path, &edited);
    let err = AuditLog::open(&config, AuditMetrics::default()).unwrap_err();
    assert!(
        matches!(
            err,
            AuditError::Corrupt { .. } | AuditError::Rewritten { .. }
        ),
        "{err}"
    );
    // Restored: continues.
    write_lines(&path, &all);
    write(&config, 6..7).await;
    assert!(verify_with(&with_checkpoints(&path), 1, &[]).ok());
}

/// A log of `n` records and a checkpoint of its head, as bytes.
fn chain(n: usize) -> (Vec<u8>, Vec<u8>) {
    let mut log = Vec::new();
    let mut prev = arbiter_audit::record::GENESIS_HASH.to_owned();
    for i in 0..n {
        prev = arbiter_audit::record::encode(&event(i), i as u64 + 1, &prev, &mut log).unwrap();
    }
    let cp = Checkpoint::sign(n as u64, &prev, CheckpointReason::Shutdown, &key(1)).unwrap();
    (log, cp)
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    Delete(usize),
    Swap(usize, usize),
    Flip(usize, u8),
    Cut(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::None),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (any::<usize>(), 1..=255u8).prop_map(|(at, x)| Mutation::Flip(at, x)),
        any::<usize>().prop_map(Mutation::Cut),
    ]
}

/// Applies `m`; returns whether the bytes changed.
fn apply(log: &mut Vec<u8>, m: &Mutation) -> bool {
    let mut lines: Vec<Vec<u8>> = log
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let n = lines.len();
    let before = log.clone();
    match *m {
        Mutation::None => {}
        Mutation::Delete(i) => {
            lines.remove(i % n);
        }
        Mutation::Swap(a, b) => lines.swap(a % n, b % n),
        Mutation::Flip(at, x) => {
            let at = at % log.len();
            log[at] ^= x;
            return *log != before;
        }
        Mutation::Cut(at) => {
            log.truncate(at % log.len());
            return *log != before;
        }
    }
    *log = lines
        .iter()
        .flat_map(|l| l.iter().copied().chain([b'\n']))
        .collect();
    *log != before
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Never panics on any bytes, as records or as checkpoints.
    #[test]
    fn verify_never_panics(log in prop::collection::vec(any::<u8>(), 0..600), cps in prop::collection::vec(any::<u8>(), 0..300)) {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, &log).unwrap();
        std::fs::write(&b, &cps).unwrap();
        let _ = verify_complete(&[a.clone(), b.clone()], Some(key(1).verifying_key()), &[]);
        let _ = verify_complete(std::slice::from_ref(&a), Some(key(1).verifying_key()), std::slice::from_ref(&b));
        let _ = verify_complete(&[a, b], None, &[]);
    }

    /// With a checkpoint of the head, verify succeeds iff the log is the one signed.
    #[test]
    fn verify_succeeds_iff_the_chain_is_intact(n in 1..8usize, m in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, cp) = chain(n);
        let changed = apply(&mut log, &m);
        let (a, b) = (dir.path().join("audit.jsonl"), dir.path().join("audit.jsonl.checkpoints"));
        std::fs::write(&a, &log).unwrap();
        std::fs::write(&b, &cp).unwrap();
        let report = verify_complete(&[a, b], Some(key(1).verifying_key()), &[]).unwrap();
        prop_assert_eq!(report.ok(), !changed, "{:?} {:?}", m, report);
    }
}
