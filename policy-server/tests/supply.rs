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
use common::supply::{
    arbiter, arbiter_fails, htpasswd_auth, write_docker_config, HttpsRecorder, HttpsServer,
    StallProxy, TokenServer,
};
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
    arbiter(&push_args(pki, artifact, destination, sig, None));
}

/// `arbiter bundle push` arguments, with registry credentials from `auth`.
fn push_args<'a>(
    pki: &'a TestPki,
    artifact: &'a Path,
    destination: &'a str,
    sig: Option<&'a Path>,
    auth: Option<&'a Path>,
) -> Vec<&'a str> {
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
    if let Some(auth) = auth {
        args.extend(["--auth-file", s(auth)]);
    }
    args
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

/// Registry passwords of the authentication tests (never in a log, a record, an error).
const READER_PASSWORD: &str = "rdr-Pw-4f1c9a-never-logged";
const PUSHER_PASSWORD: &str = "psh-Pw-77b2e0-never-logged";
const WRONG_PASSWORD: &str = "wrg-Pw-0d93aa-never-logged";

/// None of `secrets` (nor the base64 `user:password` forms the tests wrote) appears in the
/// server's log, its audit log, `/status` or `/metrics`.
async fn assert_no_secrets(server: &Server, secrets: &[String]) {
    let audit = std::fs::read_to_string(&server.audit).unwrap_or_default();
    let status = http_get(server.metrics_addr(), "/status").await;
    let metrics = http_get(server.metrics_addr(), "/metrics").await;
    for (what, text) in [
        ("server log", server.log()),
        ("audit log", audit),
        ("/status", status),
        ("/metrics", metrics),
    ] {
        for secret in secrets {
            assert!(!text.contains(secret.as_str()), "a secret is in the {what}");
        }
    }
}

/// The base64 `user:password` a config file carries, as a secret to look for.
fn basic_secret(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_registry_pulls_with_the_configured_credentials_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let kit = Kit::new(dir.path());
    let auth = htpasswd_auth(
        dir.path(),
        &[("ci", PUSHER_PASSWORD), ("reader", READER_PASSWORD)],
    );
    let registry = Registry::start_with_auth(dir.path(), &pki, &auth).await;
    let host = registry.addr.to_string();
    let url = format!("oci://{host}/team/policies:prod");
    let (allow, allow_digest) = kit.build("allow", ALLOW_CHAT);
    let sig = kit.sign(&allow, &kit.key);

    // Push without credentials: refused, saying why.
    let error = arbiter_fails(&push_args(&pki, &allow, &url, Some(&sig), None));
    assert!(
        error.contains("401")
            && error.contains(&host)
            && error.contains("no registry credentials configured"),
        "{error}"
    );
    let pusher = dir.path().join("pusher.json");
    write_docker_config(&pusher, &host, "ci", PUSHER_PASSWORD);
    arbiter(&push_args(&pki, &allow, &url, Some(&sig), Some(&pusher)));

    let cache = dir.path().join("cache");
    let verify = ["--bundle-public-key", s(&kit.public)];
    let base = remote_args(&url, &cache, &pki, &verify);

    // No credentials, nothing persisted: the server does not start, and says why.
    let error = Server::launch(&sub(dir.path(), "s0"), &base)
        .await
        .err()
        .unwrap();
    assert!(
        error.contains("401")
            && error.contains(&host)
            && error.contains("no registry credentials configured"),
        "{error}"
    );
    // A missing or invalid credentials file: no start (never silently anonymous).
    let missing = dir.path().join("missing.json");
    let invalid = dir.path().join("invalid.json");
    std::fs::write(
        &invalid,
        format!("{{\"auths\": {{\"{host}\": {{\"auth\": \"{READER_PASSWORD}\""),
    )
    .unwrap();
    let helper_only = dir.path().join("identitytoken.json");
    std::fs::write(
        &helper_only,
        format!("{{\"auths\": {{\"{host}\": {{\"identitytoken\": \"{READER_PASSWORD}\"}}}}}}"),
    )
    .unwrap();
    for (file, needle) in [
        (&missing, "No such file"),
        (&invalid, "not a Docker config.json"),
        (&helper_only, "identitytoken"),
    ] {
        let mut args = base.clone();
        args.extend(["--bundle-auth-file", s(file)]);
        let error = Server::launch(&sub(dir.path(), "s0"), &args)
            .await
            .err()
            .unwrap();
        assert!(
            error.contains("registry credentials file") && error.contains(needle),
            "{error}"
        );
        assert!(!error.contains(READER_PASSWORD), "{error}");
    }

    // The right credentials: pulled, verified, deciding.
    let reader = dir.path().join("reader.json");
    write_docker_config(&reader, &host, "reader", READER_PASSWORD);
    let mut args = base.clone();
    args.extend(["--bundle-auth-file", s(&reader), "--log", "debug"]);
    let server = Server::launch(&sub(dir.path(), "s1"), &args).await.unwrap();
    assert!(allowed(&chat(&server).await));
    assert_eq!(cached_digest(&cache), allow_digest);

    // The file is rotated to a wrong password: the next bundle is rejected with an error
    // naming the registry and the 401; the last-known-good keeps deciding.
    write_docker_config(&reader, &host, "reader", WRONG_PASSWORD);
    let (deny, deny_digest) = kit.build("deny", DENY_ALL);
    arbiter(&push_args(
        &pki,
        &deny,
        &url,
        Some(&kit.sign(&deny, &kit.key)),
        Some(&pusher),
    ));
    let before = rejected(&server).await;
    expect_rejection(&server, before, "401 Unauthorized").await;
    let error = status_error(&server).await.unwrap();
    assert!(
        error.contains(&host) && error.contains("refused the credentials"),
        "{error}"
    );
    // Rotated back to the right one: picked up without a restart.
    write_docker_config(&reader, &host, "reader", READER_PASSWORD);
    eventually(WAIT, "the new bundle deciding", || async {
        (!allowed(&chat(&server).await)).then_some(())
    })
    .await;
    eventually(WAIT, "the new bundle persisted", || async {
        (cached_digest(&cache) == deny_digest).then_some(())
    })
    .await;

    // Emptied (a Secret being rewritten): the poll fails clearly, nothing goes anonymous.
    std::fs::write(&reader, "").unwrap();
    let before = rejected(&server).await;
    eventually(WAIT, "a rejection naming the credentials file", || async {
        if rejected(&server).await <= before {
            return None;
        }
        status_error(&server)
            .await
            .filter(|e| e.contains("registry credentials file"))
    })
    .await;
    assert!(
        !allowed(&chat(&server).await),
        "the last-known-good keeps deciding"
    );

    assert_no_secrets(
        &server,
        &[
            READER_PASSWORD.to_owned(),
            WRONG_PASSWORD.to_owned(),
            PUSHER_PASSWORD.to_owned(),
            basic_secret("reader", READER_PASSWORD),
            basic_secret("reader", WRONG_PASSWORD),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_registry_pulls_and_pushes_with_scoped_refreshed_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let kit = Kit::new(dir.path());
    let tokens = TokenServer::start(
        dir.path(),
        &pki,
        "arbiter-test-registry",
        "ci",
        PUSHER_PASSWORD,
        &[
            ("team/policies", &["pull", "push"]),
            ("team/readonly", &["pull"]),
        ],
    )
    .await;
    let registry = Registry::start_with_auth(dir.path(), &pki, &tokens.registry_auth).await;
    let host = registry.addr.to_string();
    let url = format!("oci://{host}/team/policies:prod");
    let config = dir.path().join("config.json");
    write_docker_config(&config, &host, "ci", PUSHER_PASSWORD);

    // Push: a token for `repository:team/policies:pull,push` from the realm.
    let (allow, allow_digest) = kit.build("allow", ALLOW_CHAT);
    let sig = kit.sign(&allow, &kit.key);
    arbiter(&push_args(&pki, &allow, &url, Some(&sig), Some(&config)));
    assert!(tokens.http.requests().iter().any(|r| r
        .uri
        .contains("scope=repository%3Ateam%2Fpolicies%3Apull%2Cpush")));
    // A token without the push scope: refused, saying so.
    let readonly = format!("oci://{host}/team/readonly:prod");
    let error = arbiter_fails(&push_args(
        &pki,
        &allow,
        &readonly,
        Some(&sig),
        Some(&config),
    ));
    assert!(
        error.contains("insufficient_scope")
            && error.contains("repository:team/readonly:pull,push")
            && error.contains(&host),
        "{error}"
    );
    // Wrong credentials: the realm refuses them.
    let wrong = dir.path().join("wrong.json");
    write_docker_config(&wrong, &host, "ci", WRONG_PASSWORD);
    let error = arbiter_fails(&push_args(&pki, &allow, &url, Some(&sig), Some(&wrong)));
    assert!(
        error.contains("token realm") && error.contains("401"),
        "{error}"
    );
    assert!(!error.contains(WRONG_PASSWORD), "{error}");

    // Pull. The first token the server gets says it lasts 300 s but the registry refuses it
    // after 20 s: the 401 makes the server fetch a new one; the later ones last 1 s
    // (`expires_in`) and are fetched again when they expire. No poll fails meanwhile.
    tokens.lifetimes(Some((20, 300)), 1);
    let issued_before = tokens.issued().len();
    let cache = dir.path().join("cache");
    let verify = ["--bundle-public-key", s(&kit.public)];
    let mut args = remote_args(&url, &cache, &pki, &verify);
    args.extend(["--bundle-auth-file", s(&config), "--log", "debug"]);
    let server = Server::launch(&sub(dir.path(), "s1"), &args).await.unwrap();
    assert!(allowed(&chat(&server).await));
    assert_eq!(cached_digest(&cache), allow_digest);
    eventually(
        WAIT,
        "tokens refreshed after a 401 and on expiry",
        || async { (tokens.issued().len() >= issued_before + 4).then_some(()) },
    )
    .await;
    assert_eq!(
        rejected(&server).await,
        0.0,
        "{:?}",
        status_error(&server).await
    );
    // A new bundle pushed meanwhile is taken.
    let (deny, _) = kit.build("deny", DENY_ALL);
    arbiter(&push_args(
        &pki,
        &deny,
        &url,
        Some(&kit.sign(&deny, &kit.key)),
        Some(&config),
    ));
    eventually(WAIT, "the new bundle deciding", || async {
        (!allowed(&chat(&server).await)).then_some(())
    })
    .await;
    assert_eq!(
        rejected(&server).await,
        0.0,
        "{:?}",
        status_error(&server).await
    );

    // A repository the account may not pull: no start, and the error says why.
    let other = format!("oci://{host}/team/other:prod");
    let other_cache = dir.path().join("other-cache");
    let mut args = remote_args(&other, &other_cache, &pki, &verify);
    args.extend(["--bundle-auth-file", s(&config)]);
    let error = Server::launch(&sub(dir.path(), "s2"), &args)
        .await
        .err()
        .unwrap();
    assert!(
        error.contains("insufficient_scope") && error.contains("repository:team/other:pull"),
        "{error}"
    );

    let mut secrets = tokens.issued();
    secrets.extend([
        PUSHER_PASSWORD.to_owned(),
        basic_secret("ci", PUSHER_PASSWORD),
    ]);
    assert_no_secrets(&server, &secrets).await;
}

/// A registry whose blobs live elsewhere (S3, GCS) answers a blob `GET` with a redirect to
/// storage: the registry gets the credentials, the storage never does. (Debian's registry
/// on a filesystem never redirects, so this registry is a scripted one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_blob_storage_does_not_carry_the_credentials() {
    use arbiter_bundle_source::{oci, Digest};
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(dir.path());
    let kit = Kit::new(dir.path());
    let (allow, allow_digest) = kit.build("allow", ALLOW_CHAT);
    let bytes = std::fs::read(&allow).unwrap();
    let storage_bytes = bytes.clone();
    let storage = HttpsRecorder::start(
        &pki,
        std::sync::Arc::new(move |_| (200, vec![], storage_bytes.clone())),
    )
    .await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": oci::ARTIFACT_TYPE,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": Digest::of(b"{}").to_string(), "size": 2},
        "layers": [{"mediaType": oci::LAYER_MEDIA_TYPE, "digest": allow_digest, "size": bytes.len()}],
    })
    .to_string();
    let expected = format!("Basic {}", basic_secret("reader", READER_PASSWORD));
    let blob_path = format!("/v2/team/policies/blobs/{allow_digest}");
    let location = format!("https://{}/bucket/blob?X-Amz-Signature=abc", storage.addr);
    let registry = HttpsRecorder::start(
        &pki,
        std::sync::Arc::new(move |request| {
            if request.authorization.as_deref() != Some(expected.as_str()) {
                return (
                    401,
                    vec![(
                        "www-authenticate".to_owned(),
                        "Basic realm=\"registry\"".to_owned(),
                    )],
                    vec![],
                );
            }
            if request.uri == "/v2/team/policies/manifests/prod" {
                return (
                    200,
                    vec![(
                        "content-type".to_owned(),
                        "application/vnd.oci.image.manifest.v1+json".to_owned(),
                    )],
                    manifest.clone().into_bytes(),
                );
            }
            if request.uri == blob_path {
                return (307, vec![("location".to_owned(), location.clone())], vec![]);
            }
            (404, vec![], vec![])
        }),
    )
    .await;
    let host = registry.addr.to_string();
    let url = format!("oci://{host}/team/policies:prod");
    let config = dir.path().join("config.json");
    write_docker_config(&config, &host, "reader", READER_PASSWORD);
    let cache = dir.path().join("cache");
    let mut args = remote_args(&url, &cache, &pki, &["--bundle-digest", &allow_digest]);
    args.extend(["--bundle-auth-file", s(&config)]);
    let server = Server::launch(&sub(dir.path(), "s1"), &args).await.unwrap();
    assert!(allowed(&chat(&server).await));
    let seen = registry.requests();
    assert!(seen
        .iter()
        .any(|r| r.uri.contains("/blobs/") && r.authorization.is_some()));
    let fetched = storage.requests();
    assert!(!fetched.is_empty());
    assert!(
        fetched.iter().all(|r| r.authorization.is_none()),
        "{fetched:?}"
    );
}
