//! Registry authentication, the OCI distribution flow (what `docker`, `oras` and `skopeo`
//! do):
//!
//! - A request goes out with the `Authorization` learned for its registry and scope, if any.
//! - On `401` the registry's `WWW-Authenticate` challenge ([`parse_challenges`]) says how:
//!   `Basic realm=…` gets the configured username and password; `Bearer
//!   realm="…",service="…",scope="…"` gets a token from the realm (`GET
//!   realm?service=…&scope=…`, with the credentials as basic auth when configured,
//!   anonymous otherwise); the answer's `token` (or `access_token`) is sent as `Authorization:
//!   Bearer`, kept until `expires_in` (default 60 s) and fetched again on a `401`.
//! - Credentials come from a Docker `config.json` ([`CredentialsFile`]): `auths` by
//!   registry, each with `auth` (base64 `user:password`) or `username` and `password`. A
//!   Kubernetes `kubernetes.io/dockerconfigjson` Secret mounts exactly this file. It is read
//!   again on every poll, so a rotated file is used without a restart.
//!
//! Secrets stay where they belong: credentials and tokens are never in a `Debug` output or
//! an error message; everything goes over HTTPS (the transport refuses plain HTTP, for the
//! token realm too); a redirect (to blob storage) never carries the `Authorization` header.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::{header, StatusCode};
use serde::Deserialize;

use crate::source::read_limited;
use crate::SourceError;

/// A token's lifetime when the realm does not say (`expires_in`), as the distribution
/// specification defines.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
const MAX_TOKEN_RESPONSE_BYTES: u64 = 64 * 1024;
const MAX_CREDENTIALS_FILE_BYTES: u64 = 1024 * 1024;
const MAX_REDIRECTS: usize = 5;

/// One challenge of a `WWW-Authenticate` header: the scheme (lowercased) and its
/// parameters (names lowercased, values unquoted) or its token68.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `basic`, `bearer`, … (lowercase: schemes are case-insensitive).
    pub scheme: String,
    /// `name=value` parameters, in order.
    pub params: Vec<(String, String)>,
    /// The token68 form (`Negotiate abc==`), instead of parameters.
    pub token68: Option<String>,
}

impl Challenge {
    /// The value of parameter `name` (lowercase).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Challenge {
    /// The header form: parameter values always quoted (`"` and `\` escaped).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.scheme)?;
        if let Some(token68) = &self.token68 {
            return write!(f, " {token68}");
        }
        for (i, (name, value)) in self.params.iter().enumerate() {
            let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
            write!(f, "{}{name}=\"{escaped}\"", if i == 0 { " " } else { ", " })?;
        }
        Ok(())
    }
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn is_token68_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~+/".contains(c)
}

struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<char> {
        self.s[self.at..].chars().next()
    }
    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.at += 1;
        }
    }
    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &str {
        let start = self.at;
        while self.peek().is_some_and(&f) {
            self.bump();
        }
        &self.s[start..self.at]
    }
    fn quoted(&mut self) -> Result<String, String> {
        // At the opening quote.
        self.bump();
        let mut value = String::new();
        loop {
            match self.bump() {
                None => return Err("unterminated quoted string".to_owned()),
                Some('"') => return Ok(value),
                Some('\\') => match self.bump() {
                    None => return Err("unterminated quoted string".to_owned()),
                    Some(c) => value.push(c),
                },
                Some(c) if c.is_control() && c != '\t' => {
                    return Err("control character in a quoted string".to_owned())
                }
                Some(c) => value.push(c),
            }
        }
    }
}

/// Parses a `WWW-Authenticate` header value (RFC 9110 §11.6.1: one or more challenges,
/// comma-separated; parameters as tokens or quoted strings with `\` escapes; schemes and
/// parameter names case-insensitive). Untrusted input: a malformed value is an error,
/// never a panic.
pub fn parse_challenges(value: &str) -> Result<Vec<Challenge>, String> {
    let mut c = Cursor { s: value, at: 0 };
    let mut challenges: Vec<Challenge> = Vec::new();
    loop {
        // Empty list elements are allowed (`, ,`).
        loop {
            c.skip_ws();
            if c.peek() == Some(',') {
                c.bump();
            } else {
                break;
            }
        }
        if c.peek().is_none() {
            break;
        }
        let scheme = c.take_while(is_tchar).to_ascii_lowercase();
        if scheme.is_empty() {
            return Err(format!("expected an auth scheme at byte {}", c.at));
        }
        let mut challenge = Challenge {
            scheme,
            params: Vec::new(),
            token68: None,
        };
        let before_ws = c.at;
        c.skip_ws();
        if c.at == before_ws {
            // A scheme alone, then the end or a comma.
            if !matches!(c.peek(), None | Some(',')) {
                return Err(format!("unexpected character at byte {}", c.at));
            }
            challenges.push(challenge);
            continue;
        }
        // token68 or auth-params.
        let mark = c.at;
        let word = c.take_while(is_token68_char).to_owned();
        c.skip_ws();
        // `name=value` (a value follows the `=`), else token68 (`abc==`).
        let is_param = !word.is_empty() && word.chars().all(is_tchar) && c.peek() == Some('=') && {
            let after = c.at;
            c.bump();
            c.skip_ws();
            let value_follows = !matches!(c.peek(), None | Some(',' | '='));
            c.at = after;
            value_follows
        };
        if !is_param {
            c.at = mark;
            let token = c.take_while(is_token68_char).to_owned();
            let pad = c.take_while(|ch| ch == '=').to_owned();
            if !token.is_empty() {
                challenge.token68 = Some(format!("{token}{pad}"));
                c.skip_ws();
                if !matches!(c.peek(), None | Some(',')) {
                    return Err(format!("unexpected character at byte {}", c.at));
                }
            } else if !pad.is_empty() || !matches!(c.peek(), None | Some(',')) {
                return Err(format!("unexpected character at byte {}", c.at));
            }
            challenges.push(challenge);
            continue;
        }
        c.at = mark;
        // auth-param *( OWS "," OWS auth-param ), until a list element that is a new scheme.
        loop {
            let name = c.take_while(is_tchar).to_ascii_lowercase();
            c.skip_ws();
            if name.is_empty() || c.bump() != Some('=') {
                return Err(format!("expected `name=value` at byte {}", c.at));
            }
            c.skip_ws();
            let value = if c.peek() == Some('"') {
                c.quoted()?
            } else {
                let token = c.take_while(is_tchar).to_owned();
                if token.is_empty() {
                    return Err(format!("parameter `{name}` has no value"));
                }
                token
            };
            if challenge.params.iter().any(|(n, _)| *n == name) {
                return Err(format!("parameter `{name}` appears twice"));
            }
            challenge.params.push((name, value));
            c.skip_ws();
            match c.peek() {
                None => break,
                Some(',') => {}
                Some(_) => return Err(format!("unexpected character at byte {}", c.at)),
            }
            // After the comma(s): another parameter (`name =`) or a new challenge.
            while matches!(c.peek(), Some(',' | ' ' | '\t')) {
                c.bump();
            }
            let mark = c.at;
            let next = c.take_while(is_tchar).to_owned();
            c.skip_ws();
            let another_param = !next.is_empty() && c.peek() == Some('=');
            c.at = mark;
            if !another_param {
                break;
            }
        }
        challenges.push(challenge);
    }
    if challenges.is_empty() {
        return Err("no challenge".to_owned());
    }
    Ok(challenges)
}

/// A secret string: never shown by `Debug`/`Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place it is sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A username and password for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The username (not a secret, but not logged either).
    pub username: String,
    /// The password (or a registry's access token used as a password).
    pub password: Secret,
}

impl Credentials {
    fn basic_header(&self) -> Secret {
        let raw = format!("{}:{}", self.username, self.password.expose());
        Secret(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// The registry key of a `config.json` `auths` entry: `host[:port]`, from `host[:port]`,
/// `https://host[:port]/…` (the old Docker Hub form) or `http://…`.
fn registry_key(key: &str) -> String {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    rest.split('/').next().unwrap_or(rest).to_ascii_lowercase()
}

/// One registry's entry in a credentials file: its credentials, or why it has none usable
/// (naming the entry, never the secret).
pub type Entry = Result<Credentials, String>;

/// Parses a Docker `config.json`: entries by registry (`host[:port]`). A file that is not
/// one is an error; an entry without usable credentials (e.g. the empty ones `docker login`
/// leaves with a `credsStore`) is an error only for its registry, when it is used.
pub fn parse_credentials(json: &[u8]) -> Result<HashMap<String, Entry>, String> {
    // serde_json's messages name a position or a type, not the content.
    let shape = "not a Docker config.json (`{\"auths\": {\"REGISTRY\": {\"auth\": \"…\"}}}`)";
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("{shape}: {e}"))?;
    if !value.is_object() {
        return Err(shape.to_owned());
    }
    // A type error's message would quote the value: not shown.
    let config: DockerConfig = serde_json::from_value(value)
        .map_err(|_| format!("{shape}: `auths` must map registries to objects of strings"))?;
    Ok(config
        .auths
        .into_iter()
        .map(|(key, entry)| (registry_key(&key), parse_entry(&key, &entry)))
        .collect())
}

fn parse_entry(key: &str, entry: &DockerAuth) -> Entry {
    {
        let credentials = match (&entry.auth, &entry.username, &entry.password) {
            (_, Some(username), Some(password)) => Credentials {
                username: username.clone(),
                password: Secret(password.clone()),
            },
            (Some(auth), _, _) => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| format!("`auths.{key}.auth` is not base64"))?;
                let decoded = String::from_utf8(decoded)
                    .map_err(|_| format!("`auths.{key}.auth` is not UTF-8 `user:password`"))?;
                let (username, password) = decoded
                    .split_once(':')
                    .ok_or_else(|| format!("`auths.{key}.auth` is not `user:password`"))?;
                Credentials {
                    username: username.to_owned(),
                    password: Secret(password.to_owned()),
                }
            }
            _ if entry.identitytoken.is_some() => {
                return Err(format!(
                    "`auths.{key}` has only an `identitytoken` (an OAuth2 refresh token from `docker login`), which is not supported: give `auth` or `username` and `password`"
                ))
            }
            _ => {
                return Err(format!(
                    "`auths.{key}` has no credentials: give `auth` (base64 `user:password`) or `username` and `password`"
                ))
            }
        };
        if credentials.username.is_empty() {
            return Err(format!("`auths.{key}`: empty username"));
        }
        Ok(credentials)
    }
}

/// A Docker `config.json` of registry credentials, read again on every use (a rotated file
/// is picked up; a file that became unreadable is an error, never anonymous access).
#[derive(Debug, Clone)]
pub struct CredentialsFile {
    path: PathBuf,
}

impl CredentialsFile {
    /// Checks that `path` is a readable, valid credentials file whose entry for `registry`
    /// (if given and present) is usable.
    pub fn open(path: &Path, registry: Option<&str>) -> Result<Self, SourceError> {
        let file = Self {
            path: path.to_owned(),
        };
        if let Some(registry) = registry {
            file.credentials(registry)?;
        } else {
            file.load()?;
        }
        Ok(file)
    }

    /// The credentials for `registry` in the file now: `None` without an entry.
    pub fn credentials(&self, registry: &str) -> Result<Option<Credentials>, SourceError> {
        match self.load()?.remove(&registry.to_ascii_lowercase()) {
            None => Ok(None),
            Some(Ok(credentials)) => Ok(Some(credentials)),
            Some(Err(why)) => Err(SourceError(format!(
                "registry credentials file `{}`: {why}",
                self.path.display()
            ))),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entries in the file now.
    pub fn load(&self) -> Result<HashMap<String, Entry>, SourceError> {
        let bad = |why: String| {
            SourceError(format!(
                "registry credentials file `{}`: {why}",
                self.path.display()
            ))
        };
        let meta = std::fs::metadata(&self.path).map_err(|e| bad(e.to_string()))?;
        if meta.len() > MAX_CREDENTIALS_FILE_BYTES {
            return Err(bad(format!(
                "larger than {MAX_CREDENTIALS_FILE_BYTES} bytes"
            )));
        }
        let bytes = std::fs::read(&self.path).map_err(|e| bad(e.to_string()))?;
        parse_credentials(&bytes).map_err(bad)
    }
}

/// What a request needs from its registry: `repository:NAME:pull` or `…:pull,push`.
pub fn scope(repository: &str, push: bool) -> String {
    format!(
        "repository:{repository}:{}",
        if push { "pull,push" } else { "pull" }
    )
}

/// What a registry asked for, per registry and scope.
#[derive(Clone)]
enum Cached {
    /// Basic credentials, taken from the file as it is at each request (rotation).
    Basic,
    /// A bearer token, until it expires.
    Bearer(Secret, Instant),
}

/// The authorization state of a [`crate::Transport`]: the credentials file (if any) and the
/// `Authorization` learned per registry and scope (a token until it expires, basic
/// credentials until refused).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    file: Option<CredentialsFile>,
    cache: Arc<Mutex<HashMap<(String, String), Cached>>>,
}

impl fmt::Debug for Cached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A `401`'s status and challenge, for the error message (never a secret: challenges are
/// the registry's public answer, cut short).
fn refused(what: &str, registry: &str, status: StatusCode, detail: &str) -> SourceError {
    SourceError(format!("{what}: {status} from registry {registry}{detail}"))
}

impl Auth {
    /// No credentials: anonymous access only (tokens from a realm still work).
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// Credentials from `file`.
    pub fn with_file(file: CredentialsFile) -> Self {
        Self {
            file: Some(file),
            cache: Arc::default(),
        }
    }

    /// The credentials file, if any.
    pub fn file(&self) -> Option<&CredentialsFile> {
        self.file.as_ref()
    }

    fn credentials(&self, registry: &str) -> Result<Option<Credentials>, SourceError> {
        match &self.file {
            None => Ok(None),
            Some(file) => file.credentials(registry),
        }
    }

    /// The `Authorization` for `key` learned earlier and still valid.
    fn cached(&self, key: &(String, String)) -> Result<Option<Secret>, SourceError> {
        let learned = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(key) {
                Some(Cached::Bearer(_, until)) if Instant::now() >= *until => {
                    cache.remove(key);
                    None
                }
                other => other.cloned(),
            }
        };
        match learned {
            None => Ok(None),
            Some(Cached::Bearer(token, _)) => {
                Ok(Some(Secret(format!("Bearer {}", token.expose()))))
            }
            Some(Cached::Basic) => Ok(self.credentials(&key.0)?.map(|c| c.basic_header())),
        }
    }

    fn remember(&self, key: (String, String), cached: Cached) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, cached);
    }

    fn forget(&self, key: &(String, String)) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Sends a request to `registry` (made by `make`, called once or twice) with the
    /// authorization for `scope`, answering a `401` challenge once. Redirects are followed
    /// here (the client follows none) without the `Authorization` header, HTTPS only.
    pub(crate) async fn send(
        &self,
        client: &reqwest::Client,
        registry: &str,
        scope: &str,
        what: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SourceError> {
        let key = (registry.to_ascii_lowercase(), scope.to_owned());
        let cached = self.cached(&key)?;
        let first = send_following(client, &make, cached.as_ref(), what).await?;
        if first.status() != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        if cached.is_some() {
            // A stale token or rotated credentials: learn again.
            self.forget(&key);
        }
        let challenges: Vec<Challenge> = first
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| parse_challenges(v).ok())
            .flatten()
            .collect();
        let credentials = self.credentials(registry)?;
        let no_credentials = || match &self.file {
            None => " (no registry credentials configured)".to_owned(),
            Some(file) => format!(
                " (no credentials for `{registry}` in `{}`)",
                file.path.display()
            ),
        };
        let (learned, authorization) =
            if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
                let (token, lifetime) = self
                    .token(client, registry, bearer, scope, credentials.as_ref(), what)
                    .await?;
                let header = Secret(format!("Bearer {}", token.expose()));
                (Cached::Bearer(token, Instant::now() + lifetime), header)
            } else if challenges.iter().any(|c| c.scheme == "basic") {
                let Some(credentials) = credentials else {
                    return Err(refused(
                        what,
                        registry,
                        first.status(),
                        &format!(
                            ": the registry asks for a username and password{}",
                            no_credentials()
                        ),
                    ));
                };
                (Cached::Basic, credentials.basic_header())
            } else {
                return Err(refused(
                    what,
                    registry,
                    first.status(),
                    ": no usable `WWW-Authenticate` challenge (Basic or Bearer)",
                ));
            };
        let second = send_following(client, &make, Some(&authorization), what).await?;
        if second.status() == StatusCode::UNAUTHORIZED || second.status() == StatusCode::FORBIDDEN {
            let insufficient = second
                .headers()
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(|v| parse_challenges(v).ok())
                .flatten()
                .any(|c| c.param("error") == Some("insufficient_scope"));
            let detail = match &self.file {
                _ if insufficient => format!(
                    ": the token does not grant the scope `{scope}` (insufficient_scope; the account lacks that access)"
                ),
                Some(file) if self.credentials(registry).ok().flatten().is_some() => format!(
                    ": the registry refused the credentials for `{registry}` from `{}` (scope `{scope}`)",
                    file.path.display()
                ),
                _ => format!(": access refused (scope `{scope}`){}", no_credentials()),
            };
            return Err(refused(what, registry, second.status(), &detail));
        }
        self.remember(key, learned);
        Ok(second)
    }

    /// A token from the `bearer` challenge's realm, and how long to keep it.
    async fn token(
        &self,
        client: &reqwest::Client,
        registry: &str,
        bearer: &Challenge,
        scope: &str,
        credentials: Option<&Credentials>,
        what: &str,
    ) -> Result<(Secret, Duration), SourceError> {
        let realm = bearer.param("realm").ok_or_else(|| {
            SourceError(format!(
                "{what}: registry {registry} asks for a Bearer token without a realm"
            ))
        })?;
        let mut url = reqwest::Url::parse(realm).map_err(|_| {
            SourceError(format!(
                "{what}: registry {registry}'s token realm is not a URL"
            ))
        })?;
        // The credentials go to the realm only over HTTPS (the client refuses anything else
        // too; this says why).
        if url.scheme() != "https" {
            return Err(SourceError(format!(
                "{what}: registry {registry}'s token realm `{}` is not HTTPS; credentials are never sent over plain HTTP",
                url.origin().ascii_serialization()
            )));
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = bearer.param("service") {
                query.append_pair("service", service);
            }
            // What this request needs, and what the registry named if it differs (a token
            // may carry several scopes).
            query.append_pair("scope", scope);
            if let Some(asked) = bearer.param("scope").filter(|asked| *asked != scope) {
                query.append_pair("scope", asked);
            }
        }
        let realm_name = url.origin().ascii_serialization();
        let mut request = client.get(url);
        if let Some(credentials) = credentials {
            request = request.header(header::AUTHORIZATION, credentials.basic_header().expose());
        }
        let response = request.send().await.map_err(|e| {
            SourceError::http(
                &format!("{what}: token from {realm_name}"),
                &e.without_url(),
            )
        })?;
        if !response.status().is_success() {
            let status = response.status();
            return Err(SourceError(format!(
                "{what}: the token realm {realm_name} of registry {registry} answered {status}{}",
                if credentials.is_some() {
                    " (credentials refused?)"
                } else {
                    " (no registry credentials configured)"
                }
            )));
        }
        let body = read_limited(
            response,
            MAX_TOKEN_RESPONSE_BYTES,
            &format!("{what}: token from {realm_name}"),
        )
        .await?;
        let answer: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            SourceError(format!(
                "{what}: the token realm {realm_name} did not answer a JSON token"
            ))
        })?;
        let token = answer
            .token
            .filter(|t| !t.is_empty())
            .or(answer.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| {
                SourceError(format!(
                    "{what}: the token realm {realm_name} answered no `token`"
                ))
            })?;
        if token.chars().any(|c| c.is_control() || c == ' ') {
            return Err(SourceError(format!(
                "{what}: the token realm {realm_name} answered a malformed token"
            )));
        }
        let lifetime = answer
            .expires_in
            .filter(|s| *s > 0)
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        // Renew a little early: the token must still be valid when it arrives.
        let lifetime = lifetime - (lifetime / 10).min(Duration::from_secs(10));
        Ok((Secret(token), lifetime))
    }
}

/// Sends `make()` with `authorization`, then follows up to [`MAX_REDIRECTS`] redirects
/// without it (blob storage never sees the registry's credentials).
async fn send_following(
    client: &reqwest::Client,
    make: &impl Fn() -> reqwest::RequestBuilder,
    authorization: Option<&Secret>,
    what: &str,
) -> Result<reqwest::Response, SourceError> {
    let mut request = make();
    if let Some(authorization) = authorization {
        request = request.header(header::AUTHORIZATION, authorization.expose());
    }
    let request = request
        .build()
        .map_err(|e| SourceError::http(what, &e.without_url()))?;
    let method = request.method().clone();
    let follow = matches!(method, reqwest::Method::GET | reqwest::Method::HEAD);
    let mut response = client
        .execute(request)
        .await
        .map_err(|e| SourceError::http(what, &e.without_url()))?;
    for _ in 0..MAX_REDIRECTS {
        if !follow
            || !response.status().is_redirection()
            || response.status() == StatusCode::NOT_MODIFIED
        {
            return Ok(response);
        }
        let Some(location) = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Ok(response);
        };
        let next = response
            .url()
            .join(location)
            .map_err(|_| SourceError(format!("{what}: redirected to an invalid Location")))?;
        // Only GET and HEAD are redirected (blob downloads); the new request is made from
        // scratch: no Authorization, no other header of the original.
        response = client
            .request(method.clone(), next.clone())
            .send()
            .await
            .map_err(|e| {
                SourceError::http(
                    &format!(
                        "{what}: redirected to {}",
                        next.origin().ascii_serialization()
                    ),
                    &e.without_url(),
                )
            })?;
    }
    if response.status().is_redirection() {
        return Err(SourceError(format!(
            "{what}: more than {MAX_REDIRECTS} redirects"
        )));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn one(value: &str) -> Challenge {
        let mut all = parse_challenges(value).unwrap();
        assert_eq!(all.len(), 1, "{value}: {all:?}");
        all.remove(0)
    }

    #[test]
    fn bearer_challenges() {
        let c = one(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:team/p:pull,push""#,
        );
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.example/token"));
        assert_eq!(c.param("service"), Some("registry.example"));
        assert_eq!(c.param("scope"), Some("repository:team/p:pull,push"));
        // Case-insensitive scheme and names, spaces, token values, escapes.
        let c =
            one(r#"BEARER  Realm = "a\"b\\c" , Service=reg.example,error="insufficient_scope""#);
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some(r#"a"b\c"#));
        assert_eq!(c.param("service"), Some("reg.example"));
        assert_eq!(c.param("error"), Some("insufficient_scope"));
    }

    #[test]
    fn several_challenges_and_token68() {
        let all = parse_challenges(
            r#"Basic realm="r, with comma", Bearer realm="x",scope="a,b", Negotiate abc+/=="#,
        )
        .unwrap();
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(all[0].scheme, "basic");
        assert_eq!(all[0].param("realm"), Some("r, with comma"));
        assert_eq!(all[1].param("scope"), Some("a,b"));
        assert_eq!(all[2].token68.as_deref(), Some("abc+/=="));
        let all = parse_challenges("Basic, Bearer realm=x").unwrap();
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn malformed_challenges_are_errors() {
        for bad in [
            "",
            " , ",
            "=x",
            r#"Bearer realm="unterminated"#,
            r#"Bearer realm="x" junk"#,
            r#"Bearer realm="a", realm="b""#,
            "Bearer realm=\"a\u{1}\"",
            "Bé",
        ] {
            assert!(parse_challenges(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn challenges_round_trip() {
        let c = one(r#"Bearer realm="a\"b",service=s"#);
        assert_eq!(one(&c.to_string()), c);
    }

    #[test]
    fn docker_config_credentials() {
        let auth = base64::engine::general_purpose::STANDARD.encode("ci:pa:ss");
        let json = format!(
            r#"{{"auths":{{"Reg.Example:5000":{{"auth":"{auth}"}},"https://index.docker.io/v1/":{{"username":"u","password":"p"}}}},"credHelpers":{{}}}}"#
        );
        let creds = parse_credentials(json.as_bytes()).unwrap();
        let reg = creds["reg.example:5000"].as_ref().unwrap();
        assert_eq!(reg.username, "ci");
        assert_eq!(reg.password.expose(), "pa:ss");
        assert_eq!(creds["index.docker.io"].as_ref().unwrap().username, "u");
        // Debug never shows a secret.
        let shown = format!("{creds:?}");
        assert!(
            !shown.contains("pa:ss") && !shown.contains(&auth),
            "{shown}"
        );
    }

    #[test]
    fn bad_docker_configs_are_errors_without_the_secret() {
        for (json, needle) in [
            (r#"{"auths":{"r":{}}}"#.to_owned(), "no credentials"),
            (
                r#"{"auths":{"r":{"auth":"%%%secret"}}}"#.to_owned(),
                "not base64",
            ),
            (
                format!(
                    r#"{{"auths":{{"r":{{"auth":"{}"}}}}}}"#,
                    base64::engine::general_purpose::STANDARD.encode("nocolonsecret")
                ),
                "not `user:password`",
            ),
            (
                r#"{"auths":{"r":{"identitytoken":"secret"}}}"#.to_owned(),
                "identitytoken",
            ),
            (
                r#"{"auths":{"r":{"username":"u","password":"secret"}"#.to_owned(),
                "not a Docker config.json",
            ),
            ("[]".to_owned(), "not a Docker config.json"),
            (
                r#"{"auths":"secret"}"#.to_owned(),
                "not a Docker config.json",
            ),
            (
                r#"{"auths":{"r":{"username":"u","password":["secret"]}}}"#.to_owned(),
                "not a Docker config.json",
            ),
        ] {
            let error = match parse_credentials(json.as_bytes()) {
                Err(e) => e,
                Ok(entries) => entries["r"].clone().unwrap_err(),
            };
            assert!(error.contains(needle), "{json}: {error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }

    #[test]
    fn registry_keys() {
        assert_eq!(registry_key("https://ghcr.io"), "ghcr.io");
        assert_eq!(registry_key("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(registry_key("http://r:1/v2/"), "r:1");
    }

    #[tokio::test]
    async fn a_plain_http_realm_never_gets_the_credentials() {
        let auth = Auth::anonymous();
        let client = reqwest::Client::new();
        let bearer = one(r#"Bearer realm="http://127.0.0.1:9/token",service=s"#);
        let credentials = Credentials {
            username: "u".to_owned(),
            password: Secret("secret".to_owned()),
        };
        let error = auth
            .token(
                &client,
                "reg:443",
                &bearer,
                "repository:p:pull",
                Some(&credentials),
                "GET x",
            )
            .await
            .unwrap_err();
        assert!(error.0.contains("not HTTPS"), "{error}");
        assert!(!error.0.contains("secret"));
    }
}
