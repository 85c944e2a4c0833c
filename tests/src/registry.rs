//! A TLS OCI registry for the bundle supply-chain tests (the policy server's and the
//! end-to-end walkthrough's): a test CA and a server certificate for 127.0.0.1 (generated per
//! test), Debian's `docker-registry` (the CNCF distribution registry) serving TLS with it,
//! stopped and resumed on the same port and storage, killed on drop; and P-256 signing keys
//! made with openssl as the README says. Test helpers: they panic on failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Debian's registry binary (`make registry` installs it).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files in a directory.
pub struct TestPki {
    /// The CA certificate (what `--bundle-ca-cert` trusts).
    pub ca: PathBuf,
    /// The server certificate chain.
    pub cert: PathBuf,
    /// The server key.
    pub key: PathBuf,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl TestPki {
    /// Generates the CA and the certificate into `dir`.
    pub fn new(dir: &Path) -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "arbiter test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into().unwrap()),
        ];
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        };
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        pki
    }

    /// A rustls server configuration with the certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(self.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
        )
        .unwrap();
        Arc::new(config)
    }

    /// A client trusting the CA.
    pub fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap();
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's `docker-registry` serving TLS on a fixed 127.0.0.1 port, storage in a temporary
/// directory; stopped and restarted on the same port and storage; killed on drop.
pub struct Registry {
    /// Its address.
    pub addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    client: reqwest::Client,
}

impl Registry {
    /// Writes the configuration into `dir` and starts the registry (anonymous access).
    pub async fn start(dir: &Path, pki: &TestPki) -> Registry {
        Self::start_with_auth(dir, pki, "").await
    }

    /// [`Registry::start`] with `auth`, the configuration's `auth:` section (an htpasswd or
    /// token section, as the policy server's registry-authentication tests write them).
    pub async fn start_with_auth(dir: &Path, pki: &TestPki, auth: &str) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: `make registry` installs Debian's docker-registry"
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n  tls:\n    certificate: {}\n    key: {}\n{auth}",
                dir.join("storage").display(),
                pki.cert.display(),
                pki.key.display()
            ),
        )
        .unwrap();
        let mut registry = Registry {
            addr,
            config,
            log: dir.join("registry.log"),
            child: None,
            client: pki.client(),
        };
        registry.resume().await;
        registry
    }

    /// Starts the (stopped) registry again and waits until `/v2/` answers.
    pub async fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("https://{}/v2/", self.addr);
        loop {
            if let Ok(response) = self.client.get(&url).send().await {
                // 401: up, and asking for credentials.
                if response.status().is_success() || response.status() == 401 {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "registry exited ({status}):\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "registry did not answer {url}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the registry: connections are refused until [`Registry::resume`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `openssl` with `args` (the commands the README documents); panics on failure.
pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A P-256 key pair made with openssl as the README says: `(private, public)` in `dir`.
pub fn openssl_key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub"));
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (key, public)
}
