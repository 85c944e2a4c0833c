//! Policy supply chain with real parts on 127.0.0.1 (see `common/supply.rs`): Debian's
//! registry over TLS with a test CA, an HTTPS server (hyper + rustls), the real server
//! binary deciding over real gRPC, keys made with openssl, artifacts made, signed and pushed
//! with the `arbiter` binary. Each scenario checks what the server decides meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::google::protobuf::value::Kind;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use arbiter_e2e::registry::{openssl, openssl_key_pair, Registry, TestPki};
use common::supply::{arbiter, HttpsServer, StallProxy};
use common::{check_request, eventually, http_get, metric, Server};

const ALLOW_CHAT: &str = "@id(\"chat\")\npermit(principal, action == Arbiter::Action::\"chat.completions\", resource);\n";
const DENY_ALL: &str = "@id(\"nothing\")\nforbid(principal, action, resource);\npermit(principal, action, resource);\n";
const INVALID: &str =
    "permit(principal, action == Arbiter::Action::\"no such action\", resource);\n";
const REJECTED: &str = "arbiter_bundle_reloads_total{bundle=\"active\",result=\"rejected\"}";
const SUCCEEDED: &str = "arbiter_bundle_reloads_total{bundle=\"active\",result=\"success\"}";
/// Bound on anything that needs a few polls, on a loaded machine.
const WAIT: Duration = Duration::from_secs(60);

/// Test keys, bundles and artifacts in one directory.
struct Kit {
    dir: PathBuf,
    key: PathBuf,
    public: PathBuf,
    other_public: PathBuf,
    other_key: PathBuf,
}

impl Kit {
    fn new(dir: &Path) -> Kit {
        let (key, public) = openssl_key_pair(dir, "bundle-signing");
        let (other_key, other_public) = openssl_key_pair(dir, "other");
        Kit {
            dir: dir.to_owned(),
            key,
            public,
            other_public,
            other_key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `arbiter bundle build` of a one-policy bundle: the artifact's path and digest.
    fn build(&self, name: &str, policy: &str) -> (PathBuf, String) {
        let src = self.path(&format!("{name}.d"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("p.cedar"), policy).unwrap();
        let artifact = self.path(&format!("{name}.tar.gz"));
        let out = arbiter(&["bundle", "build", s(&src), "-o", s(&artifact)]);
        let digest = out.split_whitespace().next().unwrap().to_owned();
        assert!(digest.starts_with("sha256:"), "{out}");
        (artifact, digest)
    }

    /// A bundle packed with the `tar` command, unvalidated: the artifact's path and digest.
    fn build_unchecked(&self, name: &str, policy: &str) -> (PathBuf, String) {
        let src = self.path(&format!("{name}.d"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("p.cedar"), policy).unwrap();
        let artifact = self.path(&format!("{name}.tar.gz"));
        let status = std::process::Command::new("tar")
            .args(["-C", s(&src), "-czf", s(&artifact), "."])
            .status()
            .unwrap();
        assert!(status.success());
        let digest = arbiter_bundle_source::Digest::of(&std::fs::read(&artifact).unwrap());
        (artifact, digest.to_string())
    }

    /// `arbiter bundle sign` with `key`: the signature's path.
    fn sign(&self, artifact: &Path, key: &Path) -> PathBuf {
        let sig = PathBuf::from(format!("{}.sig", artifact.display()));
        arbiter(&[
            "bundle",
            "sign",
            s(artifact),
            "--key",
            s(key),
            "-o",
            s(&sig),
        ]);
        sig
    }
}

/// A new directory `name` in `dir` (one server's audit log and log each).
fn sub(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(&path).unwrap();
    path
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn push(pki: &TestPki, artifact: &Path, destination: &str, sig: Option<&Path>) {
    let mut args = vec![
        "bundle",
        "push",
        s(artifact),
        destination,
        "--ca-cert",
        s(&pki.ca),
    ];
    if let Some(sig) = sig {
        args.extend(["--signature", s(sig)]);
    }
    arbiter(&args);
}

/// Server flags for a remote source, polled fast, backing off to 1 s at most.
fn remote_args<'a>(
    url: &'a str,
    cache: &'a Path,
    pki: &'a TestPki,
    verify: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "--bundle-url",
        url,
        "--bundle-cache",
        s(cache),
        "--bundle-ca-cert",
        s(&pki.ca),
        "--bundle-poll-interval",
        "200ms",
        "--bundle-max-backoff",
        "1s",
        "--bundle-timeout",
        "2s",
        "--metrics-listen",
        "127.0.0.1:0",
        "--health-interval",
        "1s",
    ];
    args.extend_from_slice(verify);
    args
}

async fn chat(server: &Server) -> CheckResponse {
    let mut client = AuthorizationClient::new(server.channel().await);
    tokio::time::timeout(
        Duration::from_secs(10),
        client.check(check_request(
            "",
            "POST",
            "/v1/chat/completions",
            &[("route", "chat")],
        )),
    )
    .await
    .expect("a decision within 10 s")
    .unwrap()
    .into_inner()
}

fn allowed(response: &CheckResponse) -> bool {
    response.status.as_ref().unwrap().code == 0
}

fn version(response: &CheckResponse) -> String {
    match &response.dynamic_metadata.as_ref().unwrap().fields["policy_version"].kind {
        Some(Kind::StringValue(v)) => v.clone(),
        other => panic!("policy_version {other:?}"),
    }
}

async fn rejected(server: &Server) -> f64 {
    metric(&http_get(server.metrics_addr(), "/metrics").await, REJECTED)
}

async fn status_error(server: &Server) -> Option<String> {
    let status: serde_json::Value =
        serde_json::from_str(&http_get(server.metrics_addr(), "/status").await).unwrap();
    status["active"]["rejected"]["error"]
        .as_str()
        .map(str::to_owned)
}

async fn bundle_health(server: &Server) -> i32 {
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: arbiter_policy_server::reload::BUNDLE_HEALTH_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits until a rejection after `before` names `needle`; meanwhile, and after, the
/// server keeps deciding with the last-known-good (chat stays allowed).
async fn expect_rejection(server: &Server, before: f64, needle: &str) {
    let error = eventually(WAIT, &format!("a rejection naming `{needle}`"), || async {
        assert!(
            allowed(&chat(server).await),
            "the last-known-good keeps deciding"
        );
        if rejected(server).await <= before {
            return None;
        }
        status_error(server).await.filter(|e| e.contains(needle))
    })
    .await;
    assert!(allowed(&chat(server).await), "after: {error}");
    // NOT_SERVING (2) while the source's bundle is rejected, exactly like a bad local push.
    assert_eq!(bundle_health(server).await, 2);
    assert!(server
        .log()
        .contains("policy bundle rejected, keeping the last good one"));
}

fn cached_digest(cache: &Path) -> String {
    std::fs::read_to_string(cache.join("current"))
        .unwrap()
        .trim()
        .to_owned()
}

/// A raw tar with one hostile entry, gzip-compressed.
fn hostile_artifact(name: &str, kind: u8, link: &str) -> Vec<u8> {
    let mut tar = Vec::new();
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_entry_type(tar::EntryType::new(kind));
    let body = ALLOW_CHAT.as_bytes();
    header.set_size(if kind == b'0' { body.len() as u64 } else { 0 });
    header.set_mode(0o644);
    header.set_cksum();
    tar.extend_from_slice(header.as_bytes());
    if kind == b'0' {
        tar.extend_from_slice(body);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }
    tar.extend_from_slice(&[0; 1024]);
    flate2_gzip(&tar)
}

fn flate2_gzip(bytes: &[u8]) -> Vec<u8> {
    // The `gzip` command: the artifact need not come from `arbiter bundle build`.
    let mut child = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), bytes).unwrap();
    child.wait_with_output().unwrap().stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_signed_bundles_are_verified_unpacked_validated_and_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let kit = Kit::new(dir.path());
    let registry = Registry::start(dir.path(), &pki).await;
    let url = format!("oci://{}/team/policies:prod", registry.addr);

    let (allow, allow_digest) = kit.build("allow", ALLOW_CHAT);
    let sig = kit.sign(&allow, &kit.key);
    // The signature is the openssl one: `openssl dgst -sha256 -verify` accepts it.
    openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        s(&kit.public),
        "-signature",
        s(&sig),
        s(&allow),
    ]);
    push(&pki, &allow, &url, Some(&sig));

    let cache = dir.path().join("cache");
    let args = remote_args(&url, &cache, &pki, &["--bundle-public-key", s(&kit.public)]);
    let server = Server::launch(&sub(dir.path(), "s0"), &args).await.unwrap();
    let first = chat(&server).await;
    assert!(allowed(&first));
    assert_eq!(cached_digest(&cache), allow_digest);
    assert_eq!(bundle_health(&server).await, 1);

    // Wrong key: a bundle signed by another key.
    let (deny, deny_digest) = kit.build("deny", DENY_ALL);
    let wrong = kit.sign(&deny, &kit.other_key);
    let before = rejected(&server).await;
    push(&pki, &deny, &url, Some(&wrong));
    expect_rejection(&server, before, "does not verify").await;

    // Tampered: the artifact changed after signing (the signature of the allow bundle is
    // pushed as the deny bundle's).
    let before = rejected(&server).await;
    push(&pki, &deny, &url, Some(&sig));
    expect_rejection(&server, before, "does not verify").await;

    // Unsigned.
    let unsigned_dir = dir.path().join("unsigned");
    std::fs::create_dir(&unsigned_dir).unwrap();
    let unsigned = unsigned_dir.join("deny.tar.gz");
    std::fs::copy(&deny, &unsigned).unwrap();
    let unsigned_ref = format!("oci://{}/team/unsigned:prod", registry.addr);
    push(&pki, &unsigned, &unsigned_ref, None);
    // (pushed to another repository: the deny artifact's signature tag in `team/policies`
    // already exists from the steps above)

    // Signed with the right key but hostile: a path traversal, a symlink.
    for (name, kind, link) in [
        ("../../p.cedar", b'0', ""),
        ("p.cedar", b'2', "/etc/passwd"),
    ] {
        let hostile = dir.path().join(format!("hostile-{}.tar.gz", kind as char));
        std::fs::write(&hostile, hostile_artifact(name, kind, link)).unwrap();
        let hostile_sig = kit.sign(&hostile, &kit.key);
        let before = rejected(&server).await;
        push(&pki, &hostile, &url, Some(&hostile_sig));
        expect_rejection(&server, before, "refused").await;
        assert!(!dir.path().join("p.cedar").exists() && !cache.join("p.cedar").exists());
    }

    // Signed, safe, but an invalid bundle: validation rejects it, and it is not persisted.
    let (invalid, _) = kit.build_unchecked("invalid", INVALID);
    let invalid_sig = kit.sign(&invalid, &kit.key);
    let before = rejected(&server).await;
    push(&pki, &invalid, &url, Some(&invalid_sig));
    expect_rejection(&server, before, "no such action").await;
    assert_eq!(cached_digest(&cache), allow_digest);

    // A good signed push takes effect, and becomes the persisted last-known-good.
    let deny_sig = kit.sign(&deny, &kit.key);
    let succeeded = metric(
        &http_get(server.metrics_addr(), "/metrics").await,
        SUCCEEDED,
    );
    push(&pki, &deny, &url, Some(&deny_sig));
    let denied = eventually(WAIT, "the new bundle deciding", || async {
        let response = chat(&server).await;
        (!allowed(&response)).then_some(response)
    })
    .await;
    assert_ne!(version(&denied), version(&first));
    assert_eq!(cached_digest(&cache), deny_digest);
    assert!(
        metric(
            &http_get(server.metrics_addr(), "/metrics").await,
            SUCCEEDED
        ) > succeeded
    );
    eventually(WAIT, "bundle health SERVING", || async {
        (bundle_health(&server).await == 1).then_some(())
    })
    .await;
    server.kill().await;

    // An unsigned bundle with a key configured: never started with.
    let fresh = dir.path().join("fresh-cache");
    let args = remote_args(
        &unsigned_ref,
        &fresh,
        &pki,
        &["--bundle-public-key", s(&kit.public)],
    );
    let error = Server::launch(&sub(dir.path(), "s1"), &args)
        .await
        .err()
        .unwrap();
    assert!(
        error.contains("signature") && error.contains("no policy bundle to start with"),
        "{error}"
    );
    // Pinned by digest instead of signed: the pin is the artifact digest `build` printed.
    let args = remote_args(
        &unsigned_ref,
        &fresh,
        &pki,
        &["--bundle-digest", &deny_digest],
    );
    let server = Server::launch(&sub(dir.path(), "s2"), &args).await.unwrap();
    assert!(!allowed(&chat(&server).await));
    // A pin that does not match: refused at start (nothing persisted for it either).
    let other = dir.path().join("other-cache");
    let args = remote_args(
        &unsigned_ref,
        &other,
        &pki,
        &["--bundle-digest", &allow_digest],
    );
    let error = Server::launch(&sub(dir.path(), "s3"), &args)
        .await
        .err()
        .unwrap();
    assert!(error.contains("is not the pinned"), "{error}");
    // The other key does not verify the persisted signature either: refused at start even
    // though the cache holds a bundle.
    drop(registry);
    let args = remote_args(
        &url,
        &cache,
        &pki,
        &["--bundle-public-key", s(&kit.other_public)],
    );
    let error = Server::launch(&sub(dir.path(), "s4"), &args)
        .await
        .err()
        .unwrap();
    assert!(error.contains("does not verify"), "{error}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_outages_and_restarts_keep_the_last_known_good() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let kit = Kit::new(dir.path());
    let mut registry = Registry::start(dir.path(), &pki).await;
    let url = format!("oci://{}/team/policies:prod", registry.addr);
    let (allow, allow_digest) = kit.build("allow", ALLOW_CHAT);
    push(&pki, &allow, &url, Some(&kit.sign(&allow, &kit.key)));
    let cache = dir.path().join("cache");
    let verify = ["--bundle-public-key", s(&kit.public)];

    // Registry down at start, nothing persisted: the server does not start, and says why.
    registry.stop();
    let args = remote_args(&url, &cache, &pki, &verify);
    let started = Instant::now();
    let error = Server::launch(&sub(dir.path(), "s0"), &args)
        .await
        .err()
        .unwrap();
    assert!(
        error.contains("no policy bundle to start with") && error.contains("none persisted yet"),
        "{error}"
    );
    assert!(started.elapsed() < WAIT);

    // Up: the server starts and persists the bundle.
    registry.resume().await;
    let server = Server::launch(&sub(dir.path(), "s1"), &args).await.unwrap();
    assert!(allowed(&chat(&server).await));
    assert_eq!(cached_digest(&cache), allow_digest);

    // Down after start: every poll fails, decisions keep flowing with the last-known-good.
    registry.stop();
    let before = rejected(&server).await;
    expect_rejection(&server, before, "cannot fetch").await;
    server.kill().await;

    // A restart during the outage starts with the persisted bundle (verified again).
    let server = Server::launch(&sub(dir.path(), "s2"), &args).await.unwrap();
    assert!(allowed(&chat(&server).await));
    assert!(server
        .log()
        .contains("starting with the persisted last-known-good"));

    // The registry comes back with a new bundle: it is taken.
    registry.resume().await;
    let (deny, deny_digest) = kit.build("deny", DENY_ALL);
    push(&pki, &deny, &url, Some(&kit.sign(&deny, &kit.key)));
    eventually(WAIT, "the new bundle deciding", || async {
        (!allowed(&chat(&server).await)).then_some(())
    })
    .await;
    eventually(WAIT, "the new bundle persisted", || async {
        (cached_digest(&cache) == deny_digest).then_some(())
    })
    .await;
    server.kill().await;

    // A damaged persisted bundle is not used: with the registry down, no start.
    registry.stop();
    let artifact = cache.join(format!(
        "sha256-{}.tar.gz",
        deny_digest.trim_start_matches("sha256:")
    ));
    let mut bytes = std::fs::read(&artifact).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&artifact, bytes).unwrap();
    let error = Server::launch(&sub(dir.path(), "s3"), &args)
        .await
        .err()
        .unwrap();
    assert!(error.contains("does not match its digest"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_registry_is_bounded_and_decisions_keep_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let kit = Kit::new(dir.path());
    let registry = Registry::start(dir.path(), &pki).await;
    let proxy = StallProxy::start(registry.addr).await;
    let direct = format!("oci://{}/team/policies:prod", registry.addr);
    let slow = format!("oci://{}/team/policies:prod", proxy.addr);
    let (allow, _) = kit.build("allow", ALLOW_CHAT);
    push(&pki, &allow, &direct, Some(&kit.sign(&allow, &kit.key)));
    let verify = ["--bundle-public-key", s(&kit.public)];

    // Hanging at start with nothing persisted: the start gives up after the timeout (2 s).
    proxy.stall(true);
    let empty = dir.path().join("empty");
    let args = remote_args(&slow, &empty, &pki, &verify);
    let started = Instant::now();
    let error = Server::launch(&sub(dir.path(), "s0"), &args)
        .await
        .err()
        .unwrap();
    assert!(
        error.contains("timed out") || error.contains("timeout"),
        "{error}"
    );
    assert!(started.elapsed() < WAIT);

    proxy.stall(false);
    let cache = dir.path().join("cache");
    let args = remote_args(&slow, &cache, &pki, &verify);
    let server = Server::launch(&sub(dir.path(), "s1"), &args).await.unwrap();
    assert!(allowed(&chat(&server).await));

    // The registry hangs, and a new bundle is pushed behind it: polls time out, decisions
    // keep coming from the last-known-good meanwhile (each within `chat`'s 10 s bound).
    proxy.stall(true);
    let (deny, _) = kit.build("deny", DENY_ALL);
    push(&pki, &deny, &direct, Some(&kit.sign(&deny, &kit.key)));
    let before = rejected(&server).await;
    expect_rejection(&server, before, "timed out").await;
    for _ in 0..20 {
        assert!(allowed(&chat(&server).await));
    }

    // It recovers: the new bundle is taken.
    proxy.stall(false);
    eventually(WAIT, "the new bundle deciding", || async {
        (!allowed(&chat(&server).await)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_source_polls_with_etag_and_trusts_only_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let kit = Kit::new(dir.path());
    let web = HttpsServer::start(&pki).await;
    let url = format!("https://127.0.0.1:{}/bundles/prod.tar.gz", web.addr.port());
    let (allow, _) = kit.build("allow", ALLOW_CHAT);
    let allow_bytes = std::fs::read(&allow).unwrap();
    let allow_sig = std::fs::read(kit.sign(&allow, &kit.key)).unwrap();
    web.put("/bundles/prod.tar.gz", Some(allow_bytes.clone()));
    web.put("/bundles/prod.tar.gz.sig", Some(allow_sig.clone()));
    let verify = ["--bundle-public-key", s(&kit.public)];

    // Without the test CA the certificate is not trusted: no start (verification is never
    // turned off, only a CA added).
    let cache = dir.path().join("cache");
    let mut args = remote_args(&url, &cache, &pki, &verify);
    let ca = args.iter().position(|a| *a == "--bundle-ca-cert").unwrap();
    args.drain(ca..ca + 2);
    let error = Server::launch(&sub(dir.path(), "s0"), &args)
        .await
        .err()
        .unwrap();
    assert!(error.to_lowercase().contains("certificate"), "{error}");

    let args = remote_args(&url, &cache, &pki, &verify);
    let server = Server::launch(&sub(dir.path(), "s1"), &args).await.unwrap();
    assert!(allowed(&chat(&server).await));
    // Polls ask with the ETag and get 304: the bundle was downloaded once.
    eventually(WAIT, "three 304 answers", || async {
        let hits = web.hits();
        let not_modified = hits
            .iter()
            .filter(|(path, since, status)| {
                path == "/bundles/prod.tar.gz" && since.is_some() && *status == 304
            })
            .count();
        (not_modified >= 3).then_some(())
    })
    .await;
    let downloads = web
        .hits()
        .iter()
        .filter(|(path, _, status)| path == "/bundles/prod.tar.gz" && *status == 200)
        .count();
    assert_eq!(downloads, 1);

    // Tampered in transit or at rest: one byte of the artifact changed.
    let mut tampered = allow_bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let before = rejected(&server).await;
    web.put("/bundles/prod.tar.gz", Some(tampered));
    expect_rejection(&server, before, "does not verify").await;

    // Signature missing.
    let (deny, _) = kit.build("deny", DENY_ALL);
    web.put("/bundles/prod.tar.gz.sig", None);
    let before = rejected(&server).await;
    web.put("/bundles/prod.tar.gz", Some(std::fs::read(&deny).unwrap()));
    expect_rejection(&server, before, "404").await;

    // Down (stalled) and back: bounded, then the signed new bundle is taken.
    web.stall(true);
    let before = rejected(&server).await;
    expect_rejection(&server, before, "timed out").await;
    web.put(
        "/bundles/prod.tar.gz.sig",
        Some(std::fs::read(kit.sign(&deny, &kit.key)).unwrap()),
    );
    web.stall(false);
    eventually(WAIT, "the new bundle deciding", || async {
        (!allowed(&chat(&server).await)).then_some(())
    })
    .await;
}
