//! The audit trail: the real writer, the built server over real gRPC and the `arbiter` CLI.
// Test code: helpers outside `#[test]` functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter_policy_server::audit::record::{AuditEvent, Reason, Verdict};
use arbiter_policy_server::audit::verify::verify;
use arbiter_policy_server::audit::writer::rotated_files;
use arbiter_policy_server::{AuditConfig, AuditLog, AuditMetrics, AuditSync};
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, CheckRequest,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    logs_service_server::{LogsService, LogsServiceServer},
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use common::{audit_id, audit_lines, check_request, Server};

const CLI: &str = env!("CARGO_BIN_EXE_arbiter");

fn cli<P: AsRef<std::ffi::OsStr>>(
    args: &[&str],
    files: impl IntoIterator<Item = P>,
) -> (i32, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = std::process::Command::new(CLI)
        .args(args)
        .args(files)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code().unwrap(), out)
}

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        ts: "2026-11-22T02:00:00.000000Z".into(),
        request_time: None,
        id: format!("id-{i}"),
        request_id: format!("r-{i}"),
        decision: Verdict::Allow,
        dry_run: false,
        reason: Reason::Permit,
        policy_version: "sha256:0123456789abcdef".into(),
        policy_ids: vec!["routine-chat".into()],
        shadow_decision: None,
        principal: "anonymous".into(),
        action: "chat.completions".into(),
        route: "chat".into(),
        route_context: BTreeMap::new(),
        method: "POST".into(),
        scheme: "http".into(),
        host: "gw".into(),
        path: "/v1/chat/completions".into(),
        source: Some("127.0.0.1:5000".into()),
        identity: None,
        headers: BTreeMap::from([("user-agent".into(), "test".into())]),
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
        latency_us: 10,
        cut: Default::default(),
    }
}

async fn write_events(config: &AuditConfig, range: std::ops::Range<usize>) -> AuditMetrics {
    let metrics = AuditMetrics::default();
    let log = AuditLog::open(config, metrics.clone()).unwrap();
    for i in range {
        log.append(event(i)).await.unwrap();
    }
    metrics
}

fn all_files(path: &Path) -> Vec<PathBuf> {
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

async fn health(server: &Server) -> i32 {
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Allowed, forbidden, default-denied and invalid requests, 64 at a time: every answered
/// Check is in the log exactly once, in a gapless verified chain, and nothing else is.
#[tokio::test]
async fn every_answered_check_has_exactly_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--log", "warn,arbiter_policy_server=info"]).await;
    let channel = server.channel().await;
    let mut tasks = Vec::new();
    for task in 0..64 {
        let mut client = AuthorizationClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            for i in 0..4 {
                let (request, expected) = match (task + i) % 4 {
                    0 => (
                        check_request("", "POST", "/v1/chat/completions", &[("route", "chat")]),
                        Some("allow"),
                    ),
                    1 => (
                        check_request(
                            "",
                            "POST",
                            "/regulated/v1/chat/completions",
                            &[("route", "regulated_chat"), ("classification", "regulated")],
                        ),
                        Some("deny"),
                    ),
                    2 => (
                        check_request("", "DELETE", "/v1/files/1", &[("route", "files")]),
                        Some("deny"),
                    ),
                    _ => (CheckRequest::default(), None),
                };
                match (client.check(request).await, expected) {
                    (Ok(response), Some(expected)) => {
                        answered.push((audit_id(response.get_ref()), expected));
                    }
                    (Err(status), None) => {
                        assert_eq!(status.code(), tonic::Code::InvalidArgument);
                    }
                    (other, expected) => panic!("{other:?} for {expected:?}"),
                }
            }
            answered
        }));
    }
    let mut answered = HashMap::new();
    for task in tasks {
        for (id, decision) in task.await.unwrap() {
            assert!(answered.insert(id, decision).is_none());
        }
    }
    assert_eq!(answered.len(), 64 * 3);

    let records = audit_lines(&server.audit);
    assert_eq!(records.len(), answered.len());
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record["seq"], index as u64 + 1);
        let id = record["id"].as_str().unwrap();
        assert_eq!(record["decision"], answered[id], "{record}");
        assert!(record["latency_us"].is_u64());
        assert!(record["policy_version"]
            .as_str()
            .unwrap()
            .contains("sha256:"));
    }
    let ids: HashSet<&str> = records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), records.len());
    let deny = records
        .iter()
        .find(|r| r["route"] == "regulated_chat")
        .unwrap();
    assert_eq!(deny["reason"], "forbid");
    assert_eq!(deny["route_context"]["classification"], "regulated");
    assert_eq!(
        deny["policy_ids"],
        serde_json::json!(["regulated-requires-identity"])
    );

    let (code, out) = cli(&["audit", "verify"], [&server.audit]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "ok: {} records in 1 file(s), seq 1..={}",
            records.len(),
            records.len()
        )),
        "{out}"
    );
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

/// Rewrites a line's hash so that it is self-consistent again (a careful forger).
fn rehash(line: &str) -> String {
    let content = &line[..line.rfind(",\"hash\":\"").unwrap()];
    let hash = hex::encode(Sha256::digest(format!("{content}}}")));
    format!("{content},\"hash\":\"{hash}\"}}")
}

#[tokio::test]
async fn verify_names_the_tampered_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    write_events(&AuditConfig::new(&path), 0..8).await;
    let original = lines_of(&path);
    let target = dir.path().join("tampered.jsonl");
    let run = |lines: Vec<String>| {
        write_lines(&target, &lines);
        cli(&["audit", "verify"], [&target])
    };
    let (code, out) = run(original.clone());
    assert_eq!(code, 0, "{out}");

    // Edit one record.
    let mut lines = original.clone();
    lines[3] = lines[3].replace("\"id\":\"id-3\"", "\"id\":\"id-X\"");
    let (code, out) = run(lines.clone());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tampered.jsonl:4: hash mismatch"), "{out}");

    // Edit one record and fix its hash: the next record's link breaks.
    lines[3] = rehash(&lines[3]);
    let (code, out) = run(lines);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "tampered.jsonl:5 (seq 5): prev_hash does not match the hash of the record before"
        ),
        "{out}"
    );
    assert!(out.contains("4 records verified before it"), "{out}");

    // Delete one record.
    let mut lines = original.clone();
    lines.remove(3);
    let (code, out) = run(lines);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("tampered.jsonl:4 (seq 5): expected seq 4, found 5"),
        "{out}"
    );

    // Swap two records.
    let mut lines = original.clone();
    lines.swap(5, 6);
    let (code, out) = run(lines);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("tampered.jsonl:6 (seq 7): expected seq 6, found 7"),
        "{out}"
    );

    // Not JSON at all.
    let mut lines = original.clone();
    lines[0] = "garbage".into();
    let (code, out) = run(lines);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("tampered.jsonl:1: line does not end with a `hash` member"),
        "{out}"
    );

    // JSON report, and a missing file is an error (exit 2), not a verdict.
    let (code, out) = cli(&["audit", "verify", "--json"], [&path]);
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["records"], 8);
    assert_eq!(report["broken"], Value::Null);
    let (code, out) = cli(&["audit", "verify"], [dir.path().join("missing")]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("error: cannot read"), "{out}");
}

#[tokio::test]
async fn torn_tail_is_kept_reported_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let config = AuditConfig::new(&path);
    write_events(&config, 0..3).await;
    // A crash inside a write: part of a line, no newline.
    let torn = b"{\"v\":1,\"seq\":4,\"ts\":\"2026-11-22T02:";
    let mut bytes = std::fs::read(&path).unwrap();
    let complete = bytes.len();
    bytes.extend_from_slice(torn);
    std::fs::write(&path, &bytes).unwrap();

    let metrics = write_events(&config, 3..5).await;
    assert_eq!(metrics.torn_tails.get(), 1);
    // The torn file is kept as it was, never repaired; the chain goes on in a new file.
    let files = rotated_files(&path).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].0, 1);
    assert_eq!(std::fs::read(&files[0].1).unwrap(), bytes);
    let new = audit_lines(&path);
    assert_eq!(new[0]["seq"], 4);
    let old = &std::fs::read_to_string(&files[0].1).unwrap()[..complete];
    let last_old: Value = serde_json::from_str(old.lines().last().unwrap()).unwrap();
    assert_eq!(new[0]["prev_hash"], last_old["hash"]);

    let report = verify(&all_files(&path)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 5);
    assert!(
        report.warnings.iter().any(|w| w.contains("torn last line")),
        "{report:?}"
    );
    let (code, out) = cli(&["audit", "verify"], all_files(&path));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: ") && out.contains(":4: torn last line"),
        "{out}"
    );

    // A crash right after a rotation: the new file is nothing but a torn line. It is kept
    // too, and the chain continues from the rotated file.
    std::fs::rename(
        &path,
        arbiter_policy_server::audit::writer::rotated_name(&path, 4),
    )
    .unwrap();
    std::fs::write(&path, torn).unwrap();
    let metrics = write_events(&config, 5..7).await;
    assert_eq!(metrics.torn_tails.get(), 1);
    let kept = dir.path().join("audit.jsonl.00000000000000000006.torn");
    assert_eq!(std::fs::read(&kept).unwrap(), torn);
    assert_eq!(audit_lines(&path)[0]["seq"], 6);
    let mut files = all_files(&path);
    files.push(kept);
    let report = verify(&files).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.records, 7);

    // A complete last line that does not verify is not continued: the server refuses to
    // start rather than chain onto a record it cannot trust.
    let mut lines = lines_of(&path);
    let last = lines.len() - 1;
    lines[last] = lines[last].replace("id-6", "id-Y");
    write_lines(&path, &lines);
    let err = AuditLog::open(&config, AuditMetrics::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("line {}", last + 1)) && err.contains("hash mismatch"),
        "{err}"
    );
}

#[tokio::test]
async fn a_second_server_on_the_same_log_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &[]).await;
    // The second process, same log: it must exit with one message naming the file and the
    // holder, having written nothing.
    let before = std::fs::read(&first.audit).unwrap();
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_arbiter-policy-server"))
        .args(["--listen", "127.0.0.1:0", "--policies"])
        .arg(common::example_bundle())
        .arg("--audit-log")
        .arg(&first.audit)
        .env_remove("ARBITER_LISTEN")
        .kill_on_drop(true)
        .output();
    // A safety net so a regression fails instead of hanging, not a synchronisation.
    let output = tokio::time::timeout(Duration::from_secs(120), second)
        .await
        .expect("the second server kept running on a locked audit log")
        .unwrap();
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let message = format!(
        "audit log `{}` is already written by process {}",
        first.audit.display(),
        first.pid()
    );
    assert!(stderr.contains(&message), "{stderr}");
    assert_eq!(std::fs::read(&first.audit).unwrap(), before);

    // The first still decides and records; once it is gone (even killed: the kernel drops
    // the lock), the log can be taken over and the chain continues.
    let mut client = AuthorizationClient::new(first.channel().await);
    client
        .check(check_request("", "GET", "/v1/models", &[]))
        .await
        .unwrap();
    first.kill().await;
    let next = Server::start(dir.path(), &[]).await;
    let mut client = AuthorizationClient::new(next.channel().await);
    client
        .check(check_request("", "GET", "/v1/models", &[]))
        .await
        .unwrap();
    let report = verify(&all_files(&next.audit)).unwrap();
    assert!(report.ok(), "{report:?}");
    assert!(report.records >= 2, "{report:?}");
}

/// Writes a P-256 key pair as PEM (`signing.pem`, `signing.pub.pem`) into `dir`.
fn key_pair(dir: &Path) -> (PathBuf, PathBuf) {
    use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
    let key = p256::ecdsa::SigningKey::from_slice(&[9; 32]).unwrap();
    let private = dir.join("signing.pem");
    let public = dir.join("signing.pub.pem");
    std::fs::write(
        &private,
        key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    std::fs::write(
        &public,
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    (private, public)
}

/// SIGTERM, then waits for the exit: a clean shutdown.
async fn terminate(mut server: Server) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = server.child.wait().await.unwrap();
    assert!(exit.success(), "{exit}\n{}", server.log());
}

#[tokio::test]
async fn signed_checkpoints_prove_the_server_log_complete_and_a_short_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = key_pair(keys.path());
    let private = private.to_str().unwrap().to_owned();
    let public = public.to_str().unwrap().to_owned();
    let args = [
        "--audit-signing-key",
        private.as_str(),
        "--audit-checkpoint-every",
        "2",
    ];
    let server = Server::start(dir.path(), &args).await;
    let audit = server.audit.clone();
    let checkpoints = dir.path().join("audit.jsonl.checkpoints");
    {
        let mut client = AuthorizationClient::new(server.channel().await);
        for _ in 0..3 {
            client
                .check(check_request("", "GET", "/v1/models", &[]))
                .await
                .unwrap();
        }
    }
    // Checkpoints at seq 2 (every 2) and 3 (clean shutdown).
    terminate(server).await;
    let verify_args = ["audit", "verify", "--key", public.as_str()];
    let (code, out) = cli(&verify_args, [&audit, &checkpoints]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("complete: seq 1..=3 proven by 2 signed checkpoint(s)")
            && out.contains("unsigned: none"),
        "{out}"
    );

    // The last record removed: verify names the missing records, the server refuses the log.
    let all = lines_of(&audit);
    write_lines(&audit, &all[..2]);
    let (code, out) = cli(&verify_args, [&audit, &checkpoints]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("records 3..=3 are missing"), "{out}");
    let refused = tokio::process::Command::new(env!("CARGO_BIN_EXE_arbiter-policy-server"))
        .args(["--listen", "127.0.0.1:0", "--policies"])
        .arg(common::example_bundle())
        .arg("--audit-log")
        .arg(&audit)
        .args(args)
        .kill_on_drop(true)
        .output();
    // A safety net so a regression fails instead of hanging, not a synchronisation.
    let output = tokio::time::timeout(Duration::from_secs(120), refused)
        .await
        .expect("the server started on a log shorter than its checkpoint")
        .unwrap();
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ends at seq 2 but") && stderr.contains("signed checkpoint of seq 3"),
        "{stderr}"
    );

    // Restored, continued, then killed between a write and its checkpoint: complete up to
    // the newest checkpoint, the record after it reported unsigned, and the server goes on.
    write_lines(&audit, &all);
    let server = Server::start(dir.path(), &args).await;
    AuthorizationClient::new(server.channel().await)
        .check(check_request("", "GET", "/v1/models", &[]))
        .await
        .unwrap();
    server.kill().await;
    let (code, out) = cli(&verify_args, [&audit, &checkpoints]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("unsigned: seq 4..=4"), "{out}");
    let server = Server::start(dir.path(), &args).await;
    terminate(server).await;
    let (code, out) = cli(&verify_args, [&audit, &checkpoints]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("complete: seq 1..=4"), "{out}");
}

#[tokio::test]
async fn rotation_keeps_one_chain_across_files_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let config = AuditConfig {
        path: path.clone(),
        sync: AuditSync::Write,
        max_bytes: 4096,
        checkpoints: None,
    };
    let metrics = write_events(&config, 0..40).await;
    assert!(metrics.rotations.get() >= 4, "{}", metrics.rotations.get());
    let rotated = rotated_files(&path).unwrap();
    assert_eq!(rotated.len() as u64, metrics.rotations.get());
    assert_eq!(rotated[0].0, 1);
    for (first, file) in &rotated {
        assert!(std::fs::metadata(file).unwrap().len() >= 4096);
        assert_eq!(audit_lines(file)[0]["seq"], *first);
    }
    // Restart: the chain goes on.
    write_events(&config, 40..45).await;
    // Given in any order (as a shell glob puts the active file first).
    let mut files = all_files(&path);
    files.reverse();
    let report = verify(&files).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(
        (report.first_seq, report.last_seq, report.records),
        (Some(1), Some(45), 45)
    );

    // A deleted middle file is a gap at the start of the next one.
    files.retain(|f| *f != rotated[1].1);
    let report = verify(&files).unwrap();
    let broken = report.broken.unwrap();
    assert_eq!(broken.file, rotated[2].1);
    assert_eq!(broken.line, 1);
    assert!(broken.why.contains("missing"), "{broken:?}");
}

/// A file-size limit on the running server makes every write fail like a full disk.
fn set_file_size_limit(pid: u32, soft: Option<u64>) {
    let soft = soft.map_or("unlimited".to_owned(), |n| n.to_string());
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--fsize={soft}:unlimited"))
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn unwritable_log_refuses_decisions_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // Decision events off, so the server's own log stays smaller than the limit below.
    let server = Server::start(dir.path(), &["--log", "info,arbiter::decision=warn"]).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let chat = || check_request("", "POST", "/v1/chat/completions", &[("route", "chat")]);
    for _ in 0..3 {
        client.check(chat()).await.unwrap();
    }
    assert_eq!(health(&server).await, ServingStatus::Serving as i32);
    let size = std::fs::metadata(&server.audit).unwrap().len();
    assert!(size > std::fs::metadata(&server.log).unwrap().len());

    set_file_size_limit(server.pid(), Some(size));
    for _ in 0..3 {
        let status = client.check(chat()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("no decision"), "{status:?}");
    }
    wait_for("health NOT_SERVING", || async {
        health(&server).await == ServingStatus::NotServing as i32
    })
    .await;
    assert_eq!(audit_lines(&server.audit).len(), 3);
    assert_eq!(std::fs::metadata(&server.audit).unwrap().len(), size);

    set_file_size_limit(server.pid(), None);
    wait_for("health SERVING", || async {
        health(&server).await == ServingStatus::Serving as i32
    })
    .await;
    let response = client.check(chat()).await.unwrap();
    let records = audit_lines(&server.audit);
    assert_eq!(records.len(), 4);
    assert_eq!(records[3]["id"], audit_id(response.get_ref()));
    let (code, out) = cli(&["audit", "verify"], [&server.audit]);
    assert_eq!(code, 0, "{out}");
    let log = server.log();
    assert!(log.contains("audit log not writable"), "{log}");
    assert!(log.contains("audit log writable again"), "{log}");
}

#[tokio::test]
async fn secrets_and_prompts_never_reach_the_record_or_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--redact-header", "X-Tenant-Pin"]).await;
    let secrets = [
        "sk-live-AAAA1111",
        "COOKIEVALUE2222",
        "sk-key-BBBB3333",
        "PIN-4242",
        "goog-CCCC5555",
        "TOP-SECRET-PROMPT",
        "query-secret-6666",
    ];
    let body = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        secrets[5]
    );
    let mut request = check_request(
        "",
        "POST",
        &format!("/v1/chat/completions?key={}", secrets[6]),
        &[("route", "chat")],
    );
    let http = common::http_mut(&mut request);
    for (name, value) in [
        ("authorization", format!("Bearer {}", secrets[0])),
        ("cookie", format!("session={}", secrets[1])),
        ("x-api-key", secrets[2].to_owned()),
        ("x-tenant-pin", secrets[3].to_owned()),
        ("x-goog-api-key", secrets[4].to_owned()),
        (":path", format!("/v1/chat/completions?key={}", secrets[6])),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        ),
        ("user-agent", "curl/8".to_owned()),
    ] {
        http.headers.insert(name.into(), value);
    }
    http.raw_body = body.clone().into_bytes();
    http.size = body.len() as i64;
    AuthorizationClient::new(server.channel().await)
        .check(request)
        .await
        .unwrap();

    let text = std::fs::read_to_string(&server.audit).unwrap();
    // The decision's own line included: the secrets must not be in it either.
    let log = server.decisions_logged().await;
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "`{secret}` in the audit log: {text}"
        );
        assert!(!log.contains(secret), "`{secret}` in the server log: {log}");
    }
    let record = &audit_lines(&server.audit)[0];
    for header in [
        "authorization",
        "cookie",
        "x-api-key",
        "x-tenant-pin",
        "x-goog-api-key",
    ] {
        assert_eq!(record["headers"][header], "[redacted]", "{record}");
    }
    assert_eq!(record["headers"]["user-agent"], "curl/8");
    assert_eq!(record["path"], "/v1/chat/completions");
    assert_eq!(record["body_bytes"], body.len());
    assert_eq!(record["body_truncated"], false);
    assert_eq!(
        record["prompt_sha256"],
        hex::encode(Sha256::digest(body.as_bytes()))
    );
    assert_eq!(record["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    // The engine's body attributes name the model; the prompt itself is never recorded.
    assert_eq!(record["model"], "gpt-4o-mini");
}

#[tokio::test]
async fn replay_names_the_requests_policy_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    client
        .check(check_request(
            "",
            "POST",
            "/v1/chat/completions",
            &[("route", "chat")],
        ))
        .await
        .unwrap();
    client
        .check(check_request(
            "",
            "DELETE",
            "/v1/files/1",
            &[("route", "files")],
        ))
        .await
        .unwrap();
    server.kill().await;

    // Envoy-side records of requests nobody decided (the filter's `arbiter_record`), as
    // Envoy's JSON access log prints them, plus a line of a decided request.
    let record = |route: &str, path: &str, outcome: &str, context: &str| {
        let inner = format!(
            r#"{{"v":1,"ts":"2026-11-22T02:00:00Z","outcome":"{outcome}","reason":"unreachable","override":false,"route":"{route}","request_id":"req-{route}","method":"POST","path":"{path}","host":"gw","scheme":"http","source":"127.0.0.1:4000","principal":null,"context":{context},"policy_version":"sha256:0123456789abcdef","api_key_sha256":null}}"#
        );
        serde_json::json!({"route_name": route, "response_code": 200, "arbiter_record": inner})
            .to_string()
    };
    let access = dir.path().join("access.log");
    std::fs::write(
        &access,
        [
            record("embeddings", "/v1/embeddings", "fail_open", "{}"),
            record(
                "regulated_open",
                "/regulated/v1/chat/completions",
                "fail_open",
                r#"{"classification":"regulated"}"#,
            ),
            record("chat", "/v1/chat/completions", "fail_closed", "{}"),
            serde_json::json!({"route_name": "chat", "arbiter_record": "-"}).to_string(),
        ]
        .join("\n"),
    )
    .unwrap();

    let policies = common::example_bundle();
    let policies = policies.to_str().unwrap();
    let (code, out) = cli(
        &["audit", "replay", "--policies", policies],
        [server_audit(&dir), access.clone()],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("server decisions:      2 replayed, 0 decided differently now"),
        "{out}"
    );
    assert!(
        out.contains("fail-open:             2 replayed, 1 would have been denied"),
        "{out}"
    );
    assert!(
        out.contains("fail-closed:           1 replayed, 1 would have been allowed"),
        "{out}"
    );
    assert!(out.contains("access.log:2: would have been denied: request req-regulated_open on route regulated_open by anonymous"), "{out}");
    assert!(out.contains("regulated-requires-identity"), "{out}");

    let (code, out) = cli(
        &["audit", "replay", "--json", "--policies", policies],
        [&access],
    );
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["skipped"], 1);
    let denied: Vec<&Value> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["verdict"] == "would have been denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["request_id"], "req-regulated_open");
    assert_eq!(denied[0]["recorded"]["kind"], "fail_open");

    let (code, out) = cli(&["audit", "replay", "--policies", "/nonexistent"], [access]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot load policy bundle"), "{out}");
}

fn server_audit(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("audit.jsonl")
}

/// An OTLP/gRPC logs receiver that keeps what it is sent.
#[derive(Clone, Default)]
struct Receiver {
    records: Arc<Mutex<Vec<LogRecord>>>,
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let mut records = self.records.lock().unwrap();
        for resource in request.into_inner().resource_logs {
            for scope in resource.scope_logs {
                records.extend(scope.log_records);
            }
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

impl Receiver {
    fn ids(&self) -> HashSet<String> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| {
                r.attributes
                    .iter()
                    .find(|a| a.key == "arbiter.audit.id")
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        any_value::Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
            })
            .collect()
    }

    /// Serves on `listener` until the returned sender is dropped or fired.
    fn serve(
        &self,
        listener: TcpListener,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = LogsServiceServer::new(self.clone());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .unwrap();
        });
        (stop, task)
    }
}

/// The OTLP copy carries the signed checkpoints: the insider who cuts the local log and
/// deletes its checkpoints is caught with the copy alone.
#[tokio::test]
async fn otlp_copy_of_the_checkpoints_vouches_for_the_local_log() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let (stop, task) = receiver.serve(listener);
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = key_pair(keys.path());
    let endpoint = format!("http://{addr}");
    let args = [
        "--otlp-endpoint",
        endpoint.as_str(),
        "--audit-signing-key",
        private.to_str().unwrap(),
        "--audit-checkpoint-every",
        "2",
    ];
    let server = Server::start(dir.path(), &args).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    for _ in 0..4 {
        client
            .check(check_request("", "GET", "/v1/models", &[]))
            .await
            .unwrap();
    }
    let checkpoint_lines = || {
        receiver
            .records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.event_name == "arbiter.audit.checkpoint")
            .filter_map(|r| match r.body.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .collect::<Vec<String>>()
    };
    // Polled with a generous deadline (export runs beside decisions, at its own pace).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !checkpoint_lines().iter().any(|l| l.contains("\"seq\":4,")) {
        assert!(Instant::now() < deadline, "checkpoint 4 not exported");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    server.kill().await;
    let offsite = dir.path().join("offsite.checkpoints");
    write_lines(&offsite, &checkpoint_lines());

    let audit = server_audit(&dir);
    let all = lines_of(&audit);
    write_lines(&audit, &all[..2]);
    std::fs::remove_file(dir.path().join("audit.jsonl.checkpoints")).unwrap();
    let verify_args = [
        "audit",
        "verify",
        "--key",
        public.to_str().unwrap(),
        "--checkpoint",
        offsite.to_str().unwrap(),
    ];
    let (code, out) = cli(&verify_args, [&audit]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("records 3..=4 are missing"), "{out}");
    write_lines(&audit, &all);
    let (code, out) = cli(&verify_args, [&audit]);
    assert_eq!(code, 0, "{out}");
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn otlp_export_survives_receiver_and_server_outages() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::default();
    let (stop, task) = receiver.serve(listener);

    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{addr}");
    let args = [
        "--otlp-endpoint",
        endpoint.as_str(),
        "--audit-sync",
        "write",
    ];
    let server = Server::start(dir.path(), &args).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let mut answered = HashSet::new();
    let mut traced = check_request("", "GET", "/v1/models", &[("route", "models")]);
    common::http_mut(&mut traced).headers.insert(
        "traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    );
    answered.insert(audit_id(client.check(traced).await.unwrap().get_ref()));
    for _ in 0..4 {
        let response = client
            .check(check_request(
                "",
                "POST",
                "/v1/chat/completions",
                &[("route", "chat")],
            ))
            .await
            .unwrap();
        answered.insert(audit_id(response.get_ref()));
    }
    wait_for("5 records at the receiver", || async {
        receiver.ids() == answered
    })
    .await;
    {
        let records = receiver.records.lock().unwrap();
        let traced = records.iter().find(|r| !r.trace_id.is_empty()).unwrap();
        assert_eq!(
            hex::encode(&traced.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let Some(any_value::Value::StringValue(body)) =
            traced.body.as_ref().and_then(|b| b.value.as_ref())
        else {
            panic!("no body");
        };
        // The body is the audit line itself, hash included.
        let line: Value = serde_json::from_str(body).unwrap();
        assert_eq!(line["seq"], 1);
        assert_eq!(traced.event_name, "arbiter.decision");
        assert!(traced.time_unix_nano > 0);
        // Searchable by what happened to the request (`dry_run_deny` for a deny on a dry-run
        // route).
        let outcome = traced
            .attributes
            .iter()
            .find(|a| a.key == "arbiter.outcome")
            .and_then(|a| a.value.as_ref()?.value.as_ref());
        assert_eq!(
            outcome,
            Some(&any_value::Value::StringValue(
                line["decision"].as_str().unwrap().into()
            ))
        );
    }

    // The receiver goes away: decisions go on, nothing is lost.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    for _ in 0..5 {
        let response = client
            .check(check_request(
                "",
                "POST",
                "/v1/chat/completions",
                &[("route", "chat")],
            ))
            .await
            .unwrap();
        answered.insert(audit_id(response.get_ref()));
    }
    // The server crashes too, and comes back.
    server.kill().await;
    let server = Server::start(dir.path(), &args).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    for _ in 0..2 {
        let response = client
            .check(check_request(
                "",
                "POST",
                "/v1/chat/completions",
                &[("route", "chat")],
            ))
            .await
            .unwrap();
        answered.insert(audit_id(response.get_ref()));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.ids().len(), 5);

    // The receiver is back on the same address: everything arrives.
    let listener = TcpListener::bind(addr).await.unwrap();
    let (_stop, _task) = receiver.serve(listener);
    wait_for("all 12 records at the receiver", || async {
        receiver.ids() == answered
    })
    .await;
    wait_for("the saved position", || async {
        std::fs::read_to_string(dir.path().join("audit.jsonl.otlp-position"))
            .is_ok_and(|p| p.trim() == "12")
    })
    .await;
    drop(server);
}

/// The example bundle plus `extra` policies, in `<dir>/bundle`.
fn bundle_with(dir: &Path, extra: &str) -> PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    for entry in std::fs::read_dir(common::example_bundle()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), bundle.join(entry.file_name())).unwrap();
    }
    std::fs::write(bundle.join("replay-test.cedar"), extra).unwrap();
    bundle
}

/// Policies on the facts a replay must bring back: time and the body's `stream` and
/// `max_tokens`.
const REPLAY_POLICIES: &str = r#"
@id("window-open-until-2020")
permit (principal, action, resource)
when { context.route == "window" && context.time < datetime("2020-01-01T00:00:00Z") };

@id("no-streaming-on-batch")
forbid (principal, action, resource)
when { context.route == "batch" && context has stream && context.stream };

@id("max-tokens-cap-on-batch")
forbid (principal, action, resource)
when { context.route == "batch" && context has max_tokens && context.max_tokens > 1000 };
"#;

fn with_body(mut request: CheckRequest, body: Option<&[u8]>, size: i64) -> CheckRequest {
    let http = common::http_mut(&mut request);
    http.raw_body = body.unwrap_or_default().to_vec();
    http.size = size;
    request
}

/// The server records every body fact policy read and the time it decided at; a replay
/// with the same bundle decides every record as it was decided (parse errors and size limits
/// included) and lacks nothing, and a bundle with `stream` / `max_tokens` rules sees them.
#[tokio::test]
async fn replay_decides_with_the_body_facts_and_time_the_server_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let streaming =
        br#"{"model":"gpt-4o-mini","stream":true,"max_tokens":5000,"messages":[{"role":"user","content":"hi"}]}"#;
    let chat = |route: &str| check_request("", "POST", "/v1/chat/completions", &[("route", route)]);
    let bounded = || {
        check_request(
            "",
            "POST",
            "/v1/chat/completions",
            &[("route", "bounded"), ("size_policy", "bounded")],
        )
    };
    // (request, allowed)
    let cases = [
        (
            with_body(chat("batch"), Some(streaming), streaming.len() as i64),
            true,
        ),
        (with_body(chat("chat"), Some(b"not json"), 8), false),
        (with_body(bounded(), None, 2_000_000), false),
        (with_body(bounded(), None, -1), false),
        (with_body(bounded(), None, 100), true),
    ];
    for (request, allowed) in cases {
        let response = client.check(request).await.unwrap().into_inner();
        assert_eq!(response.status.unwrap().code == 0, allowed);
    }
    let audit = server.audit.clone();
    server.kill().await;

    let records = audit_lines(&audit);
    let first = &records[0];
    assert_eq!(first["stream"], true, "{first}");
    assert_eq!(first["max_tokens"], 5000);
    assert_eq!(first["message_count"], 1);
    assert_eq!(first["body_parse_error"], false);
    assert!(
        first["request_time"].as_str().unwrap().ends_with('Z'),
        "{first}"
    );
    assert_eq!(records[1]["body_parse_error"], true);
    assert_eq!(records[1]["stream"], Value::Null);
    assert_eq!(records[3]["body_size_known"], false);

    let example = common::example_bundle();
    let (code, out) = cli(
        &["audit", "replay", "--policies", example.to_str().unwrap()],
        [&audit],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("server decisions:      5 replayed, 0 decided differently now"),
        "{out}"
    );
    assert!(!out.contains("incomplete"), "{out}");

    let bundle = bundle_with(dir.path(), REPLAY_POLICIES);
    let (code, out) = cli(
        &[
            "audit",
            "replay",
            "--json",
            "--policies",
            bundle.to_str().unwrap(),
        ],
        [&audit],
    );
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let differences = report["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 1, "{report}");
    assert_eq!(differences[0]["verdict"], "recorded allow, now deny");
    assert_eq!(
        differences[0]["policy_ids"],
        serde_json::json!(["max-tokens-cap-on-batch", "no-streaming-on-batch"])
    );
    assert_eq!(report["incomplete"], serde_json::json!([]));
}

/// Records written by hand: a time-bounded permit replays at each record's own time (the
/// replay runs long after the window closed), the Envoy-side records of undecided and cached
/// requests carry their body facts, and records of an older format name what they lack.
#[test]
fn replay_decides_at_the_records_time_and_names_missing_facts() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_with(dir.path(), REPLAY_POLICIES);
    let audit = dir.path().join("audit.jsonl");
    let mut lines = Vec::new();
    let mut prev = arbiter_policy_server::audit::record::GENESIS_HASH.to_owned();
    let mut push = |event: &AuditEvent, lines: &mut Vec<u8>| {
        let seq = lines.iter().filter(|b| **b == b'\n').count() as u64 + 1;
        prev = arbiter_policy_server::audit::record::encode(event, seq, &prev, lines).unwrap();
    };
    let window = |i: usize, time: &str| AuditEvent {
        request_time: Some(time.into()),
        ts: time.into(),
        action: "http.request".into(),
        route: "window".into(),
        method: "GET".into(),
        path: "/files".into(),
        policy_ids: vec!["window-open-until-2020".into()],
        identity: Some(serde_json::json!({"source": "none", "jwt": null, "api_key_sha256": null})),
        body_bytes: Some(0),
        body_size_known: Some(true),
        body_truncated: Some(false),
        body_parse_error: Some(false),
        ..event(i)
    };
    // Just before the window closed, and the first millisecond after: the second was
    // allowed then (say, a skewed clock), and replay names it.
    push(&window(1, "2019-12-31T23:59:59.999999Z"), &mut lines);
    push(&window(2, "2020-01-01T00:00:00.000000Z"), &mut lines);
    // An older record: no `request_time`, `identity`, `body_size_known` or parsed body
    // facts, though a complete body (with a model) was sent.
    let mut old = event(3);
    old.model = Some("gpt-4o-mini".into());
    old.body_bytes = Some(120);
    old.body_truncated = Some(false);
    old.prompt_sha256 = Some("ab".repeat(32));
    let mut line = Vec::new();
    arbiter_policy_server::audit::record::encode(&old, 3, &prev, &mut line).unwrap();
    let mut value: serde_json::Map<String, Value> = serde_json::from_slice(&line).unwrap();
    for key in [
        "request_time",
        "identity",
        "body_size_known",
        "body_parse_error",
        "stream",
        "max_tokens",
        "message_count",
    ] {
        value.remove(key).unwrap();
    }
    value.remove("hash").unwrap();
    let content = Value::Object(value).to_string();
    let hash = hex::encode(Sha256::digest(&content));
    lines.extend_from_slice(
        format!("{},\"hash\":\"{hash}\"}}\n", &content[..content.len() - 1]).as_bytes(),
    );
    std::fs::write(&audit, &lines).unwrap();

    // Envoy-side records: a fail-open streaming request on `batch`, a cached one, and a
    // fail-open record of the format before the body facts.
    let envoy = |fields: Value| {
        let mut record = serde_json::json!({
            "v": 1, "ts": "2026-11-22T02:00:00.5Z", "override": false, "route": "batch",
            "method": "POST", "path": "/v1/chat/completions", "host": "gw", "scheme": "http",
            "source": "127.0.0.1:4000", "principal": null, "context": {}, "model": "gpt-4o-mini",
            "body_bytes": 90, "body_size_known": true, "body_truncated": false,
            "body_parse_error": false, "stream": false, "max_tokens": null, "message_count": 1,
        });
        for (k, v) in fields.as_object().unwrap() {
            if v.is_null() && k.starts_with('-') {
                record.as_object_mut().unwrap().remove(&k[1..]);
            } else {
                record[k] = v.clone();
            }
        }
        serde_json::json!({"route_name": "batch", "arbiter_record": record.to_string()}).to_string()
    };
    let access = dir.path().join("access.log");
    std::fs::write(
        &access,
        [
            envoy(serde_json::json!({"outcome": "fail_open", "reason": "timeout", "request_id": "e-stream", "stream": true})),
            envoy(serde_json::json!({"outcome": "cached", "reason": null, "audit_id": "id-0", "request_id": "e-cached", "max_tokens": 4096})),
            envoy(serde_json::json!({"outcome": "cached", "reason": null, "audit_id": "id-0", "request_id": "e-cached-ok"})),
            envoy(serde_json::json!({"outcome": "fail_open", "reason": "timeout", "request_id": "e-unreadable",
                "model": null, "body_parse_error": true, "stream": null, "message_count": null})),
            envoy(serde_json::json!({"outcome": "fail_open", "reason": "timeout", "request_id": "e-unmeasured",
                "context": {"size_policy": "bounded"}, "body_bytes": 1024, "body_size_known": false,
                "body_truncated": true, "model": null, "stream": null, "message_count": null})),
            envoy(serde_json::json!({"outcome": "fail_open", "reason": "timeout", "request_id": "e-old", "model": null,
                "-body_parse_error": null, "-stream": null, "-max_tokens": null, "-message_count": null})),
        ]
        .join("\n"),
    )
    .unwrap();

    let (code, out) = cli(
        &[
            "audit",
            "replay",
            "--json",
            "--policies",
            bundle.to_str().unwrap(),
        ],
        [&audit, &access],
    );
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let verdicts: Vec<(&str, &str)> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["request_id"].as_str().unwrap(),
                d["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("r-2", "recorded allow, now deny"),
            ("e-stream", "would have been denied"),
            ("e-cached", "would have been denied"),
            ("e-unreadable", "would have been denied"),
            ("e-unmeasured", "would have been denied"),
        ],
        "{report}"
    );
    assert_eq!(report["server"]["replayed"], 3);
    assert_eq!(report["cached"]["replayed"], 2);
    assert_eq!(report["cached"]["differ"], 1);
    assert_eq!(report["differences"][2]["recorded"]["kind"], "cached");
    assert_eq!(report["differences"][2]["recorded"]["audit_id"], "id-0");
    assert_eq!(
        report["differences"][3]["policy_ids"],
        serde_json::json!(["body-must-be-readable"])
    );
    assert_eq!(
        report["differences"][4]["policy_ids"],
        serde_json::json!(["body-size-limit"])
    );
    let incomplete: Vec<(&str, Vec<&str>)> = report["incomplete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["request_id"].as_str().unwrap(),
                i["missing"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_str().unwrap())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        incomplete,
        [
            (
                "r-3",
                vec!["time", "identity", "stream", "max_tokens", "message_count"]
            ),
            (
                "e-old",
                vec!["body_parse_error", "stream", "max_tokens", "message_count"]
            ),
        ],
        "{report}"
    );
    assert_eq!(report["missing"]["stream"], 2);
    assert_eq!(report["missing"]["time"], 1);
    assert_eq!(report["server"]["incomplete"], 1);
    assert_eq!(report["fail_open"]["incomplete"], 1);

    // The same for humans.
    let (code, out) = cli(
        &["audit", "replay", "--policies", bundle.to_str().unwrap()],
        [&audit, &access],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cached:                2 replayed, 1 would have been denied"),
        "{out}"
    );
    assert!(out.contains("incomplete:            2 records lack facts the decision had, replayed without them: body_parse_error (1), identity (1), max_tokens (2), message_count (2), stream (2), time (1)"), "{out}");
    assert!(
        out.contains(
            "audit.jsonl:3: request r-3: missing time, identity, stream, max_tokens, message_count"
        ),
        "{out}"
    );
    assert!(
        out.contains("would have been denied: request e-cached on route batch by anonymous: POST /v1/chat/completions (chat.completions): recorded cached (allowed by decision id-0); policies max-tokens-cap-on-batch"),
        "{out}"
    );
}

/// A record as servers before the top-level `dry_run` field wrote a deny on a dry-run route
/// (the marker only in `route_context`), framed and hashed as they did.
fn old_dry_run_deny_line() -> String {
    let content = format!(
        concat!(
            r#"{{"v":1,"seq":1,"ts":"2026-11-29T10:00:00.000001Z","request_time":"2026-11-29T10:00:00.000000Z","#,
            r#""id":"0193a1b2-0000-7000-8000-0000000000aa","request_id":"old-1","decision":"deny","reason":"forbid","#,
            r#""policy_version":"ai-gateway@sha256:0123456789abcdef","policy_ids":["regulated-requires-identity"],"#,
            r#""principal":"anonymous","action":"chat.completions","route":"rollout","#,
            r#""route_context":{{"classification":"regulated","dry_run":"true"}},"method":"POST","scheme":"http","#,
            r#""host":"gw","path":"/v1/chat/completions","source":"127.0.0.1:4000","#,
            r#""identity":{{"source":"none","jwt":null,"api_key_sha256":null}},"headers":{{}},"model":null,"#,
            r#""body_bytes":0,"body_size_known":true,"body_truncated":false,"body_parse_error":false,"#,
            r#""stream":null,"max_tokens":null,"message_count":null,"prompt_sha256":null,"trace_id":null,"#,
            r#""latency_us":40,"prev_hash":"{}"}}"#
        ),
        "0".repeat(64)
    );
    let hash = hex::encode(Sha256::digest(&content));
    format!("{},\"hash\":\"{hash}\"}}", &content[..content.len() - 1])
}

/// The audit record says plainly, at top level, that a deny on a dry-run route was not
/// enforced; the field is covered by the hash; logs written before it existed still verify
/// (and the new server continues their chain); replay decides such a record as policy did
/// and names it dry-run.
#[tokio::test]
async fn a_dry_run_deny_is_recorded_as_not_enforced_and_older_logs_still_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = server_audit(&dir);
    // A log the previous version wrote: it verifies as it is.
    write_lines(&path, &[old_dry_run_deny_line()]);
    let (code, out) = cli(&["audit", "verify"], [&path]);
    assert_eq!(code, 0, "{out}");

    // The new server continues that chain: a deny and an allow on a dry-run route (the
    // filter's `dry_run` context extension), then a deny on an enforcing route.
    let server = Server::start(dir.path(), &[]).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let regulated_dry = [
        ("route", "rollout"),
        ("classification", "regulated"),
        ("dry_run", "true"),
    ];
    for (method, path, extensions) in [
        ("POST", "/v1/chat/completions", &regulated_dry[..]),
        (
            "POST",
            "/v1/chat/completions",
            &[("route", "rollout"), ("dry_run", "true")][..],
        ),
        (
            "POST",
            "/v1/chat/completions",
            &[("route", "regulated"), ("classification", "regulated")][..],
        ),
    ] {
        client
            .check(check_request("", method, path, extensions))
            .await
            .unwrap();
    }
    server.kill().await;

    let lines = lines_of(&path);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0], old_dry_run_deny_line());
    assert!(
        lines[1].contains(r#""decision":"deny","dry_run":true,"reason":"#),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains(r#""decision":"allow","dry_run":true,"#),
        "{}",
        lines[2]
    );
    assert!(
        lines[3].contains(r#""decision":"deny","reason":"#),
        "{}",
        lines[3]
    );
    assert!(!lines[3].contains("dry_run"), "{}", lines[3]);
    let (code, out) = cli(&["audit", "verify"], [&path]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 4 records"), "{out}");

    // The field is covered by the hash: dropping it (a dry-run deny made to look enforced) or
    // adding it (an enforced deny made to look advisory) is caught.
    let target = dir.path().join("tampered.jsonl");
    for (line, from, to) in [
        (1, ",\"dry_run\":true", ""),
        (1, "\"dry_run\":true", "\"dry_run\":false"),
        (
            3,
            "\"decision\":\"deny\"",
            "\"decision\":\"deny\",\"dry_run\":true",
        ),
    ] {
        let mut tampered = lines.clone();
        tampered[line] = tampered[line].replacen(from, to, 1);
        assert_ne!(tampered[line], lines[line]);
        write_lines(&target, &tampered);
        let (code, out) = cli(&["audit", "verify"], [&target]);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!("tampered.jsonl:{}: hash mismatch", line + 1)),
            "{out}"
        );
    }

    // Replay decides a dry-run deny as policy did (deny: no difference) and counts it as
    // not enforced, the older record (marker in `route_context`) included.
    let policies = common::example_bundle();
    let policies = policies.to_str().unwrap();
    let (code, out) = cli(&["audit", "replay", "--policies", policies], [&path]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("server decisions:      4 replayed, 0 decided differently now"),
        "{out}"
    );
    assert!(
        out.contains("of which on dry-run routes: 3 (2 denies, not enforced: let through marked), 0 decided differently now"),
        "{out}"
    );
    let (code, out) = cli(
        &[
            "audit",
            "replay",
            "--dry-run",
            "--json",
            "--policies",
            policies,
        ],
        [&path],
    );
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["server"]["replayed"], 3, "{report}");
    assert_eq!(report["dry_run_denies"], 2, "{report}");
    assert_eq!(report["filtered"], 1, "{report}");

    // A bundle without the regulated rules allows those requests now: the differences name
    // the denies as not enforced.
    let open = bundle_with(dir.path(), "");
    std::fs::remove_file(open.join("regulated.cedar")).unwrap();
    let (code, out) = cli(
        &[
            "audit",
            "replay",
            "--dry-run",
            "--policies",
            open.to_str().unwrap(),
        ],
        [&path],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("recorded deny on a dry-run route, not enforced (audit id 0193a1b2-0000-7000-8000-0000000000aa)"),
        "{out}"
    );
    assert!(
        out.contains("left out:              1 records not made on a dry-run route"),
        "{out}"
    );
}

/// A client chooses its path, `:authority`, `x-request-id` (where Envoy keeps it) and the
/// body's `model`, up to Envoy's 60 KiB header block and the route's `max_body_bytes`. The
/// record (and the decision log line) keep each up to its bound, with the whole value's
/// length and SHA-256 in `cut`, so a request cannot make its record (and the audit disk's
/// share of it) grow with what it sends; policy still decides on the whole values, so the
/// decision is the one the short twin of the request gets. The chain verifies, and replay
/// reports the cut records as not replayable: neither a difference nor a match.
#[tokio::test]
async fn client_chosen_values_are_recorded_bounded_with_evidence_and_decided_whole() {
    use arbiter_policy_server::audit::bound::{
        MAX_RECORDED_HOST, MAX_RECORDED_MODEL, MAX_RECORDED_PATH, MAX_RECORDED_PRINCIPAL,
        MAX_RECORDED_REQUEST_ID,
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let sha = |value: &str| hex::encode(Sha256::digest(value.as_bytes()));

    // The action comes from the path's end, past where the record cuts it.
    let long_path = format!("/{}/v1/chat/completions", "p".repeat(30_000));
    let long_id = format!("rid-{}", "r".repeat(20_000));
    // The userinfo is replaced before the host is bounded and hashed.
    let long_host = format!("user:pw-9@{}.example:8443", "h".repeat(5_000));
    let redacted_host = format!("[redacted]@{}.example:8443", "h".repeat(5_000));
    let long_principal = format!("spiffe://acme.example/{}", "w".repeat(5_000));
    // 500 KB of model name: on the allow-list's terms a model it does not list.
    let long_model = format!("gpt-4o-mini-{}", "m".repeat(500_000));
    struct Case<'a> {
        id: &'a str,
        principal: &'a str,
        path: &'a str,
        host: &'a str,
        model: &'a str,
    }
    let long_allowed = Case {
        id: &long_id,
        principal: &long_principal,
        path: &long_path,
        host: &long_host,
        model: "gpt-4o-mini",
    };
    let long_denied = Case {
        model: &long_model,
        ..long_allowed
    };
    let short_allowed = Case {
        id: "short-1",
        principal: "spiffe://acme.example/w",
        path: "/v1/chat/completions",
        host: "gateway.local",
        model: "gpt-4o-mini",
    };
    let short_denied = Case {
        id: "short-2",
        model: "gpt-4o-mini-m",
        ..short_allowed
    };
    let mut decisions = Vec::new();
    for case in [&long_allowed, &long_denied, &short_allowed, &short_denied] {
        let mut request = check_request(case.principal, "POST", case.path, &[("route", "chat")]);
        let http = common::http_mut(&mut request);
        http.id = case.id.to_owned();
        http.host = case.host.to_owned();
        let body = serde_json::json!({"model": case.model, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
        http.size = body.len() as i64;
        http.raw_body = body.into_bytes();
        let response = client.check(request).await.unwrap().into_inner();
        let code = response.status.as_ref().unwrap().code;
        decisions.push((code, audit_id(&response)));
    }
    // Decided on the whole values: as the short twins are (allow, then the model refused).
    assert_eq!(decisions[0].0, 0, "{decisions:?}");
    assert_eq!(decisions[1].0, tonic::Code::PermissionDenied as i32);
    assert_eq!(decisions[0].0, decisions[2].0);
    assert_eq!(decisions[1].0, decisions[3].0);

    let text = std::fs::read_to_string(&server.audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4);
    let records = audit_lines(&server.audit);
    let budget = MAX_RECORDED_PATH
        + MAX_RECORDED_REQUEST_ID
        + MAX_RECORDED_HOST
        + MAX_RECORDED_MODEL
        + MAX_RECORDED_PRINCIPAL
        + 4096;
    for (i, (line, record)) in lines.iter().zip(&records).enumerate().take(2) {
        assert!(line.len() <= budget, "record {i} is {} bytes", line.len());
        assert_eq!(record["id"], decisions[i].1);
        assert_eq!(record["action"], "chat.completions", "{record}");
        let whole = [
            ("request_id", long_id.as_str()),
            ("path", long_path.as_str()),
            ("host", redacted_host.as_str()),
            ("principal", long_principal.as_str()),
        ];
        for (field, value) in whole {
            let kept = record[field].as_str().unwrap();
            assert!(
                value.starts_with(kept) && !kept.is_empty(),
                "{field}: {kept}"
            );
            assert_eq!(
                record["cut"][field],
                serde_json::json!({"bytes": value.len(), "sha256": sha(value)}),
                "{field}"
            );
        }
        assert_eq!(record["path"].as_str().unwrap().len(), MAX_RECORDED_PATH);
        assert_eq!(
            record["request_id"].as_str().unwrap().len(),
            MAX_RECORDED_REQUEST_ID
        );
        assert!(!line.contains("pw-9"), "{line}");
    }
    assert_eq!(records[0]["model"], "gpt-4o-mini");
    assert!(records[0]["cut"].get("model").is_none());
    assert_eq!(
        records[1]["model"].as_str().unwrap(),
        &long_model[..MAX_RECORDED_MODEL]
    );
    assert_eq!(
        records[1]["cut"]["model"],
        serde_json::json!({"bytes": long_model.len(), "sha256": sha(&long_model)})
    );
    assert_eq!(
        records[1]["policy_ids"],
        serde_json::json!(["model-allow-list"])
    );
    assert_eq!(records[3]["policy_ids"], records[1]["policy_ids"]);
    // Nothing cut: no `cut` member at all, the record as before.
    for record in &records[2..] {
        assert!(record.get("cut").is_none(), "{record}");
    }

    // The decision log line: the same bounds, and which fields were cut.
    let log = server.decisions_logged().await;
    for (i, fields) in [
        (0, "host,path,principal,request_id"),
        (1, "host,model,path,principal,request_id"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(decisions[i].1.as_str()) && l.contains("arbiter::decision"))
            .unwrap();
        assert!(line.len() <= budget, "log line {i} is {} bytes", line.len());
        let event: Value = serde_json::from_str(line).unwrap();
        assert_eq!(event["fields"]["cut"], fields, "{line}");
        assert!(long_path.starts_with(event["fields"]["path"].as_str().unwrap()));
    }
    let short = log
        .lines()
        .find(|l| l.contains(decisions[2].1.as_str()) && l.contains("arbiter::decision"))
        .unwrap();
    assert!(!short.contains("\"cut\""), "{short}");

    // The chain verifies; replay names the cut records rather than deciding them.
    let (code, out) = cli(&["audit", "verify"], [&server.audit]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 4 records"), "{out}");
    let bundle = common::example_bundle();
    let (code, out) = cli(
        &[
            "audit",
            "replay",
            "--json",
            "--policies",
            bundle.to_str().unwrap(),
        ],
        [&server.audit],
    );
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["server"]["replayed"], 2, "{report}");
    assert_eq!(report["server"]["differ"], 0, "{report}");
    assert_eq!(report["server"]["cut"], 2, "{report}");
    assert_eq!(report["differences"], serde_json::json!([]));
    let cut: Vec<(u64, Value, Value)> = report["cut"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["line"].as_u64().unwrap(),
                c["recorded"]["decision"].clone(),
                c["fields"].clone(),
            )
        })
        .collect();
    assert_eq!(
        cut,
        [
            (
                1,
                "allow".into(),
                serde_json::json!(["host", "path", "principal", "request_id"])
            ),
            (
                2,
                "deny".into(),
                serde_json::json!(["host", "model", "path", "principal", "request_id"])
            ),
        ],
        "{report}"
    );
    let (code, out) = cli(
        &["audit", "replay", "--policies", bundle.to_str().unwrap()],
        [&server.audit],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "not replayable:        2 records whose values policy decided on were recorded cut"
        ),
        "{out}"
    );
    assert!(out.contains(":2: request rid-rrr"), "{out}");
    assert!(
        out.contains("recorded deny; cut host, model, path, principal, request_id"),
        "{out}"
    );
}

/// Replay takes the tenant from the recorded `x-tenant-id` header, which the record cuts
/// past 1 KiB: a longer tenant is named under `cut` (whole length and hash), so replay
/// lists the record as not replayable instead of deciding it for the cut tenant.
#[tokio::test]
async fn a_tenant_longer_than_the_recorded_header_is_evidenced_and_not_replayed() {
    use arbiter_policy_server::audit::redact::MAX_RECORDED_HEADER_VALUE;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let long_tenant = format!("acme-{}", "t".repeat(MAX_RECORDED_HEADER_VALUE));
    for tenant in [long_tenant.as_str(), "acme"] {
        let mut request = check_request("", "POST", "/v1/chat/completions", &[("route", "chat")]);
        let http = common::http_mut(&mut request);
        http.headers.insert("x-tenant-id".into(), tenant.into());
        let response = client.check(request).await.unwrap().into_inner();
        // An anonymous caller naming a tenant: refused by tenant isolation, both times.
        assert_eq!(
            response.status.unwrap().code,
            tonic::Code::PermissionDenied as i32
        );
    }
    let records = audit_lines(&server.audit);
    assert_eq!(records.len(), 2);
    assert_eq!(
        records[0]["cut"]["tenant"],
        serde_json::json!({
            "bytes": long_tenant.len(),
            "sha256": hex::encode(Sha256::digest(long_tenant.as_bytes())),
        }),
        "{}",
        records[0]
    );
    assert!(records[1].get("cut").is_none(), "{}", records[1]);

    let bundle = common::example_bundle();
    let (code, out) = cli(
        &[
            "audit",
            "replay",
            "--json",
            "--policies",
            bundle.to_str().unwrap(),
        ],
        [&server.audit],
    );
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["server"]["cut"], 1, "{report}");
    assert_eq!(report["server"]["replayed"], 1, "{report}");
    assert_eq!(report["server"]["differ"], 0, "{report}");
    assert_eq!(
        report["cut"][0]["fields"],
        serde_json::json!(["tenant"]),
        "{report}"
    );
}
