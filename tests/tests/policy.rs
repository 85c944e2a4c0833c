//! Policy management end to end: real Envoy, the real wasm filter and the real policy server
//! with the example bundle. Identities (API key; JWT verified by Envoy's `jwt_authn` against
//! a local JWKS with tokens minted here), the regulated route, tenant isolation and the
//! model allow-list on request bodies, all through Envoy.
#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use arbiter_e2e::stack::{chat_body, Reply, Stack};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const APPROVED_KEY: &str = "demo-key-acme-batch";
const INTERN_KEY: &str = "demo-key-globex-intern";
const ISSUER: &str = "https://idp.arbiter.test";

fn policy_ids(reply: &Reply) -> Value {
    reply.json().unwrap()["error"]["policy_ids"].clone()
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "the prompt"}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_identify_callers_on_the_regulated_route() -> Result<()> {
    let mut stack = Stack::builder().start().await?;
    let path = "/regulated/v1/chat/completions";

    let reply = stack
        .post_json_with(path, &[("x-api-key", APPROVED_KEY)], &chat_body())
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));

    let reply = stack
        .post_json_with(path, &[("x-api-key", INTERN_KEY)], &chat_body())
        .await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(policy_ids(&reply), json!(["regulated-requires-approval"]));

    let reply = stack.post_json(path, &chat_body()).await?;
    assert_eq!(reply.status, 403);
    assert_eq!(policy_ids(&reply), json!(["regulated-requires-identity"]));

    let reply = stack
        .post_json_with(path, &[("x-api-key", "made-up")], &chat_body())
        .await?;
    assert_eq!(reply.status, 403);
    assert_eq!(policy_ids(&reply), json!(["regulated-requires-identity"]));

    // Tenant isolation on a routine route.
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &[("x-api-key", APPROVED_KEY), ("x-tenant-id", "acme")],
            &chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &[("x-api-key", APPROVED_KEY), ("x-tenant-id", "globex")],
            &chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 403);
    assert_eq!(policy_ids(&reply), json!(["tenant-isolation"]));

    // Only the two allowed requests reached a provider.
    assert_eq!(stack.upstream_requests(), 2);
    let log = stack.policy()?.decisions_logged().await?;
    assert!(
        log.contains("\"identity_source\":\"api_key\"")
            || log.contains("identity_source=\"api_key\"")
            || log.contains("identity_source=api_key"),
        "{log}"
    );
    assert!(
        !log.contains(APPROVED_KEY) && !log.contains(INTERN_KEY),
        "an API key reached the log"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn request_bodies_reach_policy_through_envoy() -> Result<()> {
    // `t_body_strict`: include_body with max_body_bytes 1024, `body_policy: strict`.
    let mut stack = Stack::builder().start().await?;
    let path = "/t/strict-body/v1/chat/completions";

    let reply = stack.post_json(path, &chat("gpt-4o-mini")).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // The upstream still gets the whole body.
    assert_eq!(
        stack.primary.requests()[0].body_len,
        chat("gpt-4o-mini").to_string().len()
    );

    let reply = stack.post_json(path, &chat("gpt-4o")).await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(policy_ids(&reply), json!(["model-allow-list"]));

    let reply = stack
        .post_json_with(path, &[("x-api-key", APPROVED_KEY)], &chat("gpt-4o"))
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // Over max_body_bytes: cut, marked, and refused by the example bundle.
    let long = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(4000)}]});
    let reply = stack.post_json(path, &long).await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(policy_ids(&reply), json!(["body-must-be-readable"]));

    // Not JSON.
    let reply = stack
        .send(
            stack
                .request(reqwest::Method::POST, path)
                .header("content-type", "text/plain")
                .body("model=gpt-4o"),
        )
        .await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(policy_ids(&reply), json!(["body-must-be-readable"]));

    assert_eq!(stack.upstream_requests(), 2);
    let log = stack.policy()?.decisions_logged().await?;
    assert!(
        !log.contains("the prompt") && !log.contains("xxxxxxxx"),
        "prompt text reached the log"
    );
    assert!(log.contains("gpt-4o"), "the model is logged: {log}");
    Ok(())
}

/// An ES256 signing key and its JWKS.
struct Idp {
    key: SigningKey,
    kid: String,
}

impl Idp {
    fn new(kid: &str) -> Idp {
        // A fresh key per test run, from the OS's randomness via the process's hasher keys
        // and the clock; any 32 bytes below the curve order make a valid key.
        let mut seed = Sha256::new();
        seed.update(format!(
            "{kid}{:?}{}",
            SystemTime::now(),
            std::process::id()
        ));
        seed.update(
            std::collections::hash_map::RandomState::new()
                .hash_one(kid)
                .to_be_bytes(),
        );
        let key = SigningKey::from_slice(&seed.finalize()).unwrap();
        Idp {
            key,
            kid: kid.to_owned(),
        }
    }

    fn jwks(&self) -> String {
        let point = self.key.verifying_key().to_encoded_point(false);
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
            "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
        }]})
        .to_string()
    }

    fn token(&self, claims: Value) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut claims = claims;
        claims["iss"] = json!(ISSUER);
        claims["iat"] = json!(now);
        claims["exp"] = json!(now + 600);
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature: Signature = self.key.sign(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }
}

use std::hash::BuildHasher as _;

#[tokio::test(flavor = "multi_thread")]
async fn jwt_claims_verified_by_jwt_authn_identify_callers() -> Result<()> {
    let idp = Idp::new("test-key-1");
    let mut stack = Stack::builder()
        .template("tests/envoy/jwt.yaml.tmpl")
        .var("JWKS", idp.jwks())
        .var("JWT_ISSUER", ISSUER)
        .start()
        .await?;
    let bearer = |token: &str| format!("Bearer {token}");
    let regulated = "/regulated/v1/chat/completions";

    let approved =
        idp.token(json!({"sub": "alice", "tenant": "acme", "groups": ["regulated-approved"]}));
    let reply = stack
        .post_json_with(
            regulated,
            &[("authorization", &bearer(&approved))],
            &chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());

    let plain = idp.token(json!({"sub": "bob", "tenant": "acme", "groups": ["engineering"]}));
    let reply = stack
        .post_json_with(
            regulated,
            &[("authorization", &bearer(&plain))],
            &chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(policy_ids(&reply), json!(["regulated-requires-approval"]));

    // No token: anonymous to policy.
    let reply = stack.post_json(regulated, &chat_body()).await?;
    assert_eq!(reply.status, 403);
    assert_eq!(policy_ids(&reply), json!(["regulated-requires-identity"]));

    // A token signed by someone else never reaches policy: jwt_authn refuses it.
    let forged =
        Idp::new("test-key-1").token(json!({"sub": "mallory", "groups": ["regulated-approved"]}));
    let reply = stack
        .post_json_with(
            regulated,
            &[("authorization", &bearer(&forged))],
            &chat_body(),
        )
        .await?;
    assert_eq!(reply.status, 401, "{}", reply.text());

    // Claims drive tenant isolation and the model allow-list (the chat route sends bodies).
    let premium =
        idp.token(json!({"sub": "carol", "tenant": "acme", "groups": ["premium-models"]}));
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &[
                ("authorization", &bearer(&premium)),
                ("x-tenant-id", "acme"),
            ],
            &chat("gpt-4o"),
        )
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &[("authorization", &bearer(&plain)), ("x-tenant-id", "acme")],
            &chat("gpt-4o"),
        )
        .await?;
    assert_eq!(reply.status, 403);
    assert_eq!(policy_ids(&reply), json!(["model-allow-list"]));
    let reply = stack
        .post_json_with(
            "/v1/chat/completions",
            &[
                ("authorization", &bearer(&premium)),
                ("x-tenant-id", "globex"),
            ],
            &chat("gpt-4o-mini"),
        )
        .await?;
    assert_eq!(reply.status, 403);
    assert_eq!(policy_ids(&reply), json!(["tenant-isolation"]));

    assert_eq!(stack.upstream_requests(), 2);
    let log = stack.policy()?.decisions_logged().await?;
    assert!(log.contains(&format!("{ISSUER}#alice")), "{log}");
    assert!(
        !log.contains(&approved) && !log.contains(&premium),
        "a token reached the log"
    );
    Ok(())
}
