//! `make images` end to end, with real tools: `images/build.sh` builds the filter and the
//! policy server images; the layouts pass the OCI schemas (`oci-image-tool`) and the Wasm
//! image format Istio and Envoy Gateway pull (compat variant); a second build gives the same
//! digests; both images go through a real registry on 127.0.0.1 (Debian's `docker-registry`)
//! and back (`skopeo`) with digests and media types intact; the filter's layer is the built
//! module byte for byte; and the server image, unpacked by `umoci`, runs from its rootfs
//! chrooted as its non-root user: version, gRPC health SERVING, an allow and a deny decided
//! and audited, the audit chain verified with the image's own `arbiter` CLI, and the image
//! without a bundle refusing to start.
//!
//! Needs `make image-tools` (Debian packages), `make server-static` (the static binaries)
//! and `make wasm`; `make test` runs all three first. Runs as root (chroot, and `umoci
//! unpack` keeping the image's file owners), as `make test` does.
// Test code: helpers outside `#[test]` functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use arbiter_e2e::oci::{add_default_devices, Contained, Registry, RunConfig};
use arbiter_e2e::stack::wasm_path;
use arbiter_e2e::util::{eventually, free_port, loopback, target_dir, workspace_root};
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    AttributeContext, CheckRequest,
};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const FILTER: &str = "arbiter-filter";
const SERVER: &str = "arbiter-policy-server";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The server image's user and group.
const UID: u32 = 65532;
/// Any single wait (registry start, server start, health, exit).
const WAIT: Duration = Duration::from_secs(30);

// --- the build --------------------------------------------------------------------------

/// The static binaries `make server-static` builds (`ARBITER_IMAGE_BIN_DIR` overrides).
fn static_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("ARBITER_IMAGE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("x86_64-unknown-linux-gnu/release"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `make server-static` first",
        path.display()
    );
    path
}

/// What `images/build.sh` printed.
#[derive(Debug, PartialEq, Eq)]
struct Printed {
    filter: String,
    wasm_sha256: String,
    server: String,
    example: String,
    /// The value it says goes into WasmPlugin / EnvoyExtensionPolicy `sha256`.
    plugin_sha256: String,
}

/// Runs `images/build.sh` into `out` (fixed SOURCE_DATE_EPOCH) and parses what it printed.
fn build(out: &Path) -> Printed {
    let stdout = run(Command::new(workspace_root().join("images/build.sh"))
        .arg("--out")
        .arg(out)
        .args(["--version", VERSION, "--wasm"])
        .arg(wasm_path().unwrap())
        .arg("--server")
        .arg(static_bin("arbiter-policy-server"))
        .arg("--cli")
        .arg(static_bin("arbiter"))
        .arg("--policies")
        .arg(bundle_dir())
        .env("SOURCE_DATE_EPOCH", "1764460800"))
    .unwrap();
    let field = |prefix: &str| -> String {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line `{prefix}…` in:\n{stdout}"))
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let printed = Printed {
        filter: field(&format!("{FILTER}:{VERSION} manifest ")),
        wasm_sha256: field(&format!("{FILTER}:{VERSION} plugin.wasm ")),
        server: field(&format!("{SERVER}:{VERSION} manifest ")),
        example: field(&format!("{SERVER}:{VERSION}-example manifest ")),
        plugin_sha256: stdout
            .lines()
            .find(|line| line.starts_with("Istio WasmPlugin"))
            .and_then(|line| line.rsplit_once("sha256: "))
            .map(|(_, hex)| hex.trim().to_owned())
            .unwrap_or_else(|| panic!("no WasmPlugin sha256 line in:\n{stdout}")),
    };
    let digests = std::fs::read_to_string(out.join("digests.txt")).unwrap();
    assert!(
        stdout.starts_with(&digests),
        "digests.txt is not what was printed:\n{digests}\n---\n{stdout}"
    );
    printed
}

fn bundle_dir() -> PathBuf {
    workspace_root().join("examples/ai-gateway/policies")
}

/// Runs a command to completion; its stdout, or an error with all it printed.
fn run(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}):\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

// --- OCI image layouts --------------------------------------------------------------------

/// An OCI image layout directory.
struct Layout(PathBuf);

impl Layout {
    fn blob(&self, digest: &str) -> Vec<u8> {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let bytes = std::fs::read(self.0.join("blobs/sha256").join(hex)).unwrap();
        assert_eq!(
            sha256(&bytes),
            digest,
            "blob content does not match its name"
        );
        bytes
    }

    fn json(&self, digest: &str) -> Value {
        serde_json::from_slice(&self.blob(digest)).unwrap()
    }

    fn index(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.0.join("index.json")).unwrap()).unwrap()
    }

    /// Tag → manifest digest, from index.json (every entry an image manifest).
    fn tags(&self) -> Vec<(String, String)> {
        let index = self.index();
        assert_eq!(index["schemaVersion"], 2);
        // Optional in the spec (skopeo leaves it out); ours have it (checked below).
        if let Some(media_type) = index.get("mediaType") {
            assert_eq!(media_type, OCI_INDEX);
        }
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["mediaType"], OCI_MANIFEST);
                (
                    m["annotations"]["org.opencontainers.image.ref.name"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    m["digest"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    fn digest_of(&self, tag: &str) -> String {
        self.tags()
            .into_iter()
            .find(|(t, _)| t == tag)
            .unwrap_or_else(|| panic!("no tag {tag} in {}", self.0.display()))
            .1
    }

    /// The manifest of `tag`, checked: OCI media types, config and layer digests whose
    /// blobs match, each layer's diff_id the digest of its uncompressed tar.
    fn manifest(&self, tag: &str) -> Image {
        let manifest = self.json(&self.digest_of(tag));
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], OCI_MANIFEST);
        assert_eq!(manifest["config"]["mediaType"], OCI_CONFIG);
        let config = self.json(manifest["config"]["digest"].as_str().unwrap());
        let layers: Vec<String> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                assert_eq!(l["mediaType"], OCI_LAYER_GZIP);
                let digest = l["digest"].as_str().unwrap().to_owned();
                assert_eq!(l["size"], self.blob(&digest).len());
                digest
            })
            .collect();
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|d| sha256(&gunzip(&self.blob(d))))
            .collect();
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(
            config["rootfs"]["diff_ids"],
            serde_json::json!(diff_ids),
            "diff_ids of {tag}"
        );
        Image {
            manifest,
            config,
            layers,
        }
    }

    /// `oci-image-tool validate` (the OCI image-spec schemas, digests and sizes) of `tag`.
    fn validate(&self, tag: &str) {
        run(Command::new("oci-image-tool")
            .args(["validate", "--type", "image", "--ref"])
            .arg(format!("name={tag}"))
            .arg(&self.0))
        .unwrap();
    }

    /// Extracts layer `digest` (tar+gzip) into a new directory under `into`.
    fn extract(&self, digest: &str, into: &Path) -> PathBuf {
        let dir = into.join(digest.replace(':', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        let tarball = dir.with_extension("tar.gz");
        std::fs::write(&tarball, self.blob(digest)).unwrap();
        run(Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dir))
        .unwrap();
        dir
    }
}

struct Image {
    manifest: Value,
    config: Value,
    layers: Vec<String>,
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.gz");
    std::fs::write(&path, bytes).unwrap();
    let output = Command::new("gzip").arg("-dc").arg(&path).output().unwrap();
    assert!(output.status.success(), "gzip -dc failed");
    output.stdout
}

/// Relative paths of everything under `dir` (directories with a trailing `/`), sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if path.is_dir() && !path.is_symlink() {
                out.push(format!("{rel}/"));
                walk(root, &path, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

// --- tests --------------------------------------------------------------------------------

#[test]
fn images_are_reproducible_and_follow_the_oci_and_wasm_image_formats() {
    let temp = tempfile::tempdir().unwrap();
    let (a, b) = (temp.path().join("a"), temp.path().join("b"));
    let printed = build(&a);
    // The same inputs give the same images, archives included.
    assert_eq!(build(&b), printed, "a second build gave other digests");
    for archive in [
        format!("{FILTER}-{VERSION}.oci.tar"),
        format!("{SERVER}-{VERSION}.oci.tar"),
    ] {
        let (x, y) = (
            std::fs::read(a.join(&archive)).unwrap(),
            std::fs::read(b.join(&archive)).unwrap(),
        );
        assert!(x == y, "{archive} differs between two builds");
    }

    let module = std::fs::read(wasm_path().unwrap()).unwrap();
    assert_eq!(printed.wasm_sha256, sha256(&module));
    // Istio's WasmPlugin and Envoy Gateway compare `sha256` with the digest of the image
    // manifest when the url is an OCI image (the module's own hash only for http urls).
    assert_eq!(format!("sha256:{}", printed.plugin_sha256), printed.filter);

    // --- arbiter-filter: the Wasm image "compat" variant -----------------------------------
    let filter = Layout(a.join(FILTER));
    assert_eq!(
        std::fs::read_to_string(filter.0.join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    assert_eq!(
        filter.tags(),
        vec![(VERSION.to_owned(), printed.filter.clone())]
    );
    assert_eq!(filter.index()["mediaType"], OCI_INDEX);
    filter.validate(VERSION);
    let image = filter.manifest(VERSION);
    assert_eq!(
        image.layers.len(),
        1,
        "the compat variant has exactly one layer"
    );
    assert_eq!(
        image.manifest["annotations"]["module.wasm.image/variant"], "compat",
        "an OCI-typed compat layer needs the variant annotation"
    );
    assert_eq!(
        image.manifest["annotations"]["org.opencontainers.image.version"],
        VERSION
    );
    assert_eq!(image.config["architecture"], "wasm");
    assert_eq!(image.config["os"], "wasip1");
    let extracted = filter.extract(&image.layers[0], temp.path());
    assert_eq!(
        tree(&extracted),
        vec!["plugin.wasm"],
        "the layer holds plugin.wasm only"
    );
    assert!(
        std::fs::read(extracted.join("plugin.wasm")).unwrap() == module,
        "plugin.wasm is not the built module"
    );

    // --- arbiter-policy-server and its -example variant -------------------------------------
    let server = Layout(a.join(SERVER));
    let example_tag = format!("{VERSION}-example");
    assert_eq!(
        server.tags(),
        vec![
            (VERSION.to_owned(), printed.server.clone()),
            (example_tag.clone(), printed.example.clone()),
        ]
    );
    server.validate(VERSION);
    server.validate(&example_tag);
    let base = server.manifest(VERSION);
    let example = server.manifest(&example_tag);
    assert_eq!(base.layers.len(), 1);
    assert_eq!(
        example.layers[..1],
        base.layers[..],
        "the example image is the base image plus a layer"
    );
    assert_eq!(example.layers.len(), 2);
    for config in [&base.config, &example.config] {
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        let run = RunConfig::from_image_config(config).unwrap();
        // Numeric, so Kubernetes' runAsNonRoot can check it.
        assert_eq!(run.user, format!("{UID}:{UID}"));
        assert_eq!(run.entrypoint, vec!["/usr/local/bin/arbiter-policy-server"]);
        assert!(run
            .env
            .contains(&"ARBITER_POLICIES=/etc/arbiter/policies".to_owned()));
        assert!(run.env.contains(&"ARBITER_LISTEN=0.0.0.0:50051".to_owned()));
    }
    let base_files = tree(&server.extract(&base.layers[0], temp.path()));
    assert_eq!(
        base_files,
        [
            "etc/",
            "etc/arbiter/",
            "etc/group",
            "etc/nsswitch.conf",
            "etc/passwd",
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/arbiter",
            "usr/local/bin/arbiter-policy-server",
            "var/",
            "var/lib/",
            "var/lib/arbiter/",
        ],
        "the base layer: two static binaries, the user, no shell, no libraries, no bundle"
    );
    let policies = server.extract(&example.layers[1], temp.path());
    let mut bundle: Vec<String> = std::fs::read_dir(bundle_dir())
        .unwrap()
        .map(|e| {
            format!(
                "etc/arbiter/policies/{}",
                e.unwrap().file_name().to_string_lossy()
            )
        })
        .chain(["etc/", "etc/arbiter/", "etc/arbiter/policies/"].map(String::from))
        .collect();
    bundle.sort();
    assert_eq!(
        tree(&policies),
        bundle,
        "the example layer is the example bundle"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn images_round_trip_through_a_local_registry_and_the_server_image_runs() {
    let temp = tempfile::tempdir().unwrap();
    let built = temp.path().join("built");
    let printed = build(&built);
    let registry = Registry::start().await.unwrap();
    let host = registry.host();
    let example_tag = format!("{VERSION}-example");

    // Push: the filter from its layout, the server's two tags from its archive.
    let pushes = [
        (
            FILTER,
            VERSION,
            format!("oci:{}/{FILTER}:{VERSION}", built.display()),
            &printed.filter,
        ),
        (
            SERVER,
            VERSION,
            format!(
                "oci-archive:{}/{SERVER}-{VERSION}.oci.tar:{VERSION}",
                built.display()
            ),
            &printed.server,
        ),
        (
            SERVER,
            example_tag.as_str(),
            format!(
                "oci-archive:{}/{SERVER}-{VERSION}.oci.tar:{example_tag}",
                built.display()
            ),
            &printed.example,
        ),
    ];
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    for (name, tag, source, digest) in &pushes {
        run(Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(source)
            .arg(format!("docker://{host}/{name}:{tag}")))
        .unwrap();
        // What a puller (Istio's and Envoy Gateway's go-containerregistry) gets for the tag:
        // the same manifest, byte for byte, with its media type.
        let response = http
            .get(format!("{}/v2/{name}/manifests/{tag}", registry.url()))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{name}:{tag}");
        let header = |h: &str| response.headers()[h].to_str().unwrap().to_owned();
        assert_eq!(header("content-type"), OCI_MANIFEST, "{name}:{tag}");
        assert_eq!(&header("docker-content-digest"), *digest, "{name}:{tag}");
        let body = response.bytes().await.unwrap();
        assert_eq!(&sha256(&body), *digest, "{name}:{tag}");
    }

    // Pull back into fresh layouts; the digests survive the round trip.
    let pulled = temp.path().join("pulled");
    std::fs::create_dir(&pulled).unwrap();
    for (name, tag, _, digest) in &pushes {
        run(Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{host}/{name}:{tag}"))
            .arg(format!("oci:{}/{name}:{tag}", pulled.display())))
        .unwrap();
        let layout = Layout(pulled.join(name));
        assert_eq!(&layout.digest_of(tag), *digest, "{name}:{tag} pulled");
        layout.validate(tag);
    }

    // The filter as Istio extracts it: the module, byte for byte.
    let filter = Layout(pulled.join(FILTER));
    let image = filter.manifest(VERSION);
    let module = std::fs::read(wasm_path().unwrap()).unwrap();
    let plugin = std::fs::read(
        filter
            .extract(&image.layers[0], temp.path())
            .join("plugin.wasm"),
    )
    .unwrap();
    assert!(
        plugin == module,
        "pulled plugin.wasm is not the built module"
    );
    assert_eq!(sha256(&plugin), printed.wasm_sha256);

    // The server: unpacked as a runtime would, files owned as the image says.
    let server = Layout(pulled.join(SERVER));
    let rootfs = unpack(&server, &example_tag, &temp.path().join("example"));
    let top: BTreeSet<String> = std::fs::read_dir(&rootfs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        top,
        BTreeSet::from(["etc", "usr", "var"].map(String::from)),
        "no /bin, no /lib"
    );
    for bin in ["arbiter-policy-server", "arbiter"] {
        assert!(
            std::fs::read(rootfs.join("usr/local/bin").join(bin)).unwrap()
                == std::fs::read(static_bin(bin)).unwrap(),
            "{bin} in the image is not the built one"
        );
    }
    // What a runtime adds before it starts the image.
    add_default_devices(&rootfs).unwrap();
    let state = std::fs::metadata(rootfs.join("var/lib/arbiter")).unwrap();
    assert_eq!((state.uid(), state.gid()), (UID, UID));
    assert_eq!(state.permissions().mode() & 0o7777, 0o700);
    let config = RunConfig::from_image_config(&server.manifest(&example_tag).config).unwrap();

    // Static binaries: they run in a rootfs without a loader or libraries.
    let version = run(&mut config.command(&rootfs, ["--version"]).unwrap()).unwrap();
    assert_eq!(version.trim(), format!("arbiter-policy-server {VERSION}"));
    let cli = |args: &[&str]| {
        config
            .command_for(&rootfs, "/usr/local/bin/arbiter", args)
            .unwrap()
    };
    assert_eq!(
        run(&mut cli(&["--version"])).unwrap().trim(),
        format!("arbiter {VERSION}")
    );
    run(&mut cli(&["validate", "/etc/arbiter/policies"])).unwrap();

    // The server, as the image's user, with the bundle of the example layer.
    let audit = "/var/lib/arbiter/audit.jsonl";
    let (mut server_proc, addr) = start_server(&config, &rootfs, audit).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    // SERVING needs a valid bundle, a synthetic decision and a writable audit log.
    let serving = eventually(WAIT, "gRPC health SERVING", || {
        let mut health = HealthClient::new(channel.clone());
        async move {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .status;
            (status == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
    if let Err(e) = serving {
        panic!("{e:#}\n{}", server_proc.log_tail(60));
    }
    let mut authz = AuthorizationClient::new(channel.clone());
    let allow = authz
        .check(check_request(
            "image-allow",
            "GET",
            "/v1/models",
            &[("route", "models")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allow.status.unwrap().code, 0, "GET /v1/models is allowed");
    let deny = authz
        .check(check_request(
            "image-deny",
            "POST",
            "/regulated/v1/chat/completions",
            &[("route", "regulated_chat"), ("classification", "regulated")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        deny.status.unwrap().code,
        7,
        "anonymous on a regulated route: PERMISSION_DENIED"
    );
    server_proc.kill();

    // Both decisions are in the audit log the server's user wrote, and the image's CLI
    // verifies its chain.
    let log_path = rootfs.join(audit.trim_start_matches('/'));
    let meta = std::fs::metadata(&log_path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (UID, UID));
    let records: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decision = |id: &str| {
        records
            .iter()
            .find(|r| r["request_id"] == id)
            .map(|r| r["decision"].clone())
    };
    assert_eq!(decision("image-allow"), Some("allow".into()), "{records:?}");
    assert_eq!(decision("image-deny"), Some("deny".into()), "{records:?}");
    run(&mut cli(&["audit", "verify", audit])).unwrap();

    // The base image has no bundle: the server refuses to start, naming the directory.
    let bare = unpack(&server, VERSION, &temp.path().join("bare"));
    assert!(!bare.join("etc/arbiter/policies").exists());
    add_default_devices(&bare).unwrap();
    let mut refused = Contained::spawn(
        "policy-server-bare",
        config
            .command(
                &bare,
                [
                    "--listen",
                    &loopback(free_port().unwrap()).to_string(),
                    "--audit-log",
                    audit,
                ],
            )
            .unwrap(),
    )
    .unwrap();
    let status = refused.wait_exit(WAIT).await.unwrap();
    let log = refused.log_tail(20);
    assert!(!status.success(), "started without a bundle:\n{log}");
    assert!(log.contains("/etc/arbiter/policies"), "{log}");
}

/// `umoci unpack` of `tag` into `bundle` (as root: the image's owners are kept); the rootfs.
fn unpack(layout: &Layout, tag: &str, bundle: &Path) -> PathBuf {
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.0.display()))
        .arg(bundle))
    .unwrap();
    bundle.join("rootfs")
}

/// Starts the image's entrypoint in `rootfs` on a free loopback port; waits until it accepts
/// connections.
async fn start_server(
    config: &RunConfig,
    rootfs: &Path,
    audit: &str,
) -> (Contained, std::net::SocketAddr) {
    let mut attempt = 1;
    loop {
        let addr = loopback(free_port().unwrap());
        let command = config
            .command(
                rootfs,
                ["--listen", &addr.to_string(), "--audit-log", audit],
            )
            .unwrap();
        let mut server = Contained::spawn("policy-server", command).unwrap();
        let ready = eventually(WAIT, &format!("the server to listen on {addr}"), || {
            let exited = server.exited();
            async move {
                if exited.is_some() {
                    return Some(false);
                }
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100))
                    .ok()
                    .map(|_| true)
            }
        })
        .await;
        match ready {
            Ok(true) => return (server, addr),
            // Another test took the port between pick and bind.
            Ok(false) if attempt < 5 && server.log_tail(20).contains("Address already in use") => {
                attempt += 1;
            }
            other => panic!("server did not start: {other:?}\n{}", server.log_tail(60)),
        }
    }
}

/// A CheckRequest as the filter sends it, from an anonymous caller.
fn check_request(id: &str, method: &str, path: &str, extensions: &[(&str, &str)]) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: "127.0.0.1".into(),
                        port_specifier: Some(PortSpecifier::PortValue(40000)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: id.into(),
                    method: method.into(),
                    path: path.into(),
                    host: "gateway.local".into(),
                    scheme: "http".into(),
                    ..Default::default()
                }),
            }),
            context_extensions: extensions
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    }
}
