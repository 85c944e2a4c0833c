//! The adversarial tier, continued: requests that read one way to Envoy's router or to a
//! provider and another way to the filter or to policy. The route table must pick the
//! entry of the route Envoy actually takes, and policy must read the body the way a
//! provider will, or a client chooses weaker settings or shows policy another model than
//! the one it gets. Real Envoy, the real wasm filter and the real policy server; every case
//! settles a [`Ledger`] (see `tests/tests/adversarial.rs`).
#![allow(clippy::unwrap_used)]

use anyhow::Result;
use arbiter_e2e::adversary::{
    patient_stack, send_ok, Answer, H1Conn, H1Request, H2Conn, Head, Ledger, Outcomes, Proto, Req,
    PATIENT_PLUGIN_CONFIG,
};
use arbiter_e2e::stack::{Reply, Stack};
use hyper::Method;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

fn chat(model: &str) -> Vec<u8> {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

#[track_caller]
fn assert_denied(reply: &Reply, policy: &str) {
    assert_eq!(reply.status, 403, "{}", reply.text());
    let body = reply.json().unwrap();
    assert_eq!(body["error"]["type"], "policy_denied", "{body}");
    assert_eq!(body["error"]["policy_ids"], json!([policy]), "{body}");
}

// ---------------------------------------------------------------------------------------
// The route table against Envoy's router

/// A second virtual host in front of the shipped catch-all, as a mesh has one per hostname:
/// `docs.example.com` is served by Envoy itself. `ignore_port_in_host_matching` is what
/// Istio and Envoy Gateway set on every route configuration they generate.
const DOCS_VHOST: (&str, &str) = (
    "            name: llm_routes\n            virtual_hosts:\n",
    "            name: llm_routes\n            ignore_port_in_host_matching: true\n            virtual_hosts:\n            - name: docs\n              domains: [\"docs.example.com\"]\n              routes:\n              - name: docs_site\n                match: { prefix: \"/\" }\n                direct_response: { status: 200, body: { inline_string: \"docs\\n\" } }\n",
);

/// The table a platform team writes for it: the docs site needs no policy, and chat on the
/// route without metadata (`t_nometa`) is regulated.
fn docs_and_chat_table() -> String {
    let mut config: Value = serde_json::from_str(PATIENT_PLUGIN_CONFIG).unwrap();
    config["routes"] = json!([
        {"name": "docs", "match": {"authority": "docs.example.com"},
         "settings": {"disabled": true}},
        {"name": "chat", "match": {"route_name": "t_nometa", "method": "POST"},
         "settings": {"fail_mode": "closed", "context": {"classification": "regulated"}}},
    ]);
    config.to_string()
}

/// An HTTP/1.1 request with its own `Host` (and request target).
fn h1_with_host(method: &str, target: &str, host: &str, body: &[u8]) -> H1Request {
    let mut request = H1Request::post(target, body);
    request.method = method.to_owned();
    request.headers[0].1 = host.as_bytes().to_vec();
    request
}

async fn h2_with_authority(stack: &Stack, method: &[u8], authority: &str) -> Result<Answer> {
    let body = chat("gpt-4o-mini");
    let mut h2 = H2Conn::to(stack).await?.authority(authority);
    let head = Head {
        method: Method::from_bytes(method)?,
        ..Head::post(&format!("/t/nometa{CHAT}"))
    }
    .content_length(body.len());
    let mut stream = h2.open(&head, false).await?;
    // Envoy may answer on the headers alone (the docs host's direct response) and end the
    // stream before the body goes out; a client then reads that answer, as this one does.
    let sent = stream.data(&body, true);
    stream.answer().await.map_err(|answer| match sent {
        Err(sent) => sent.context(format!("and then no answer: {answer:#}")),
        Ok(()) => answer,
    })
}

/// The table picks the entry of the route Envoy takes, not a weaker one: a host with a
/// trailing dot (another virtual host to Envoy's router) never gets the `docs` entry's
/// `disabled`, and a method in lower case (HTTP/2 carries it, Envoy forwards it) gets the
/// `POST` entry's settings, not the plugin defaults. A port, which the meshes' routers
/// ignore, is ignored by the table as well.
#[tokio::test(flavor = "multi_thread")]
async fn the_route_table_reads_the_authority_and_method_as_envoy_routes_them() -> Result<()> {
    let stack = patient_stack()
        .edit_template(DOCS_VHOST.0, DOCS_VHOST.1)
        .plugin_config(docs_and_chat_table())
        .start()
        .await?;
    let body = chat("gpt-4o-mini");
    let target = format!("/t/nometa{CHAT}");

    // The dotted docs host reaches the LLM through the catch-all virtual host: the `chat`
    // entry applies (anonymous callers are refused on regulated routes), never `docs`.
    let ledger = Ledger::take(&stack).await?;
    for host in ["docs.example.com.", "DOCS.example.com.:443"] {
        let reply = H1Conn::to(&stack)
            .await?
            .request(&h1_with_host("POST", &target, host, &body))
            .await?
            .reply()?;
        assert_denied(&reply, "regulated-requires-identity");
        let answer = h2_with_authority(&stack, b"POST", host).await?;
        assert_denied(&answer.reply()?, "regulated-requires-identity");
    }
    // The absolute form's authority is the request's authority, whatever `Host` says.
    let absolute = h1_with_host(
        "POST",
        &format!("http://docs.example.com.{target}"),
        "docs.example.com",
        &body,
    );
    let reply = H1Conn::to(&stack)
        .await?
        .request(&absolute)
        .await?
        .reply()?;
    assert_denied(&reply, "regulated-requires-identity");
    let settled = ledger
        .settle(
            &stack,
            "a dotted host on the catch-all virtual host",
            Outcomes::none().deny(5),
        )
        .await?;
    for record in &settled.audit {
        assert_eq!(record["route"], "chat", "{record}");
    }

    // `post` over HTTP/2 reaches the provider as `post`: the table reads it as POST.
    // HTTP/1.1's parser refuses it before any filter.
    let ledger = Ledger::take(&stack).await?;
    for method in [&b"post"[..], b"Post"] {
        let answer = h2_with_authority(&stack, method, "api.example.com").await?;
        assert_denied(&answer.reply()?, "regulated-requires-identity");
    }
    let answer = H1Conn::to(&stack)
        .await?
        .request(&h1_with_host("post", &target, "api.example.com", &body))
        .await?;
    assert_eq!(answer.status(), Some(400), "{answer:?}");
    let settled = ledger
        .settle(&stack, "a method in lower case", Outcomes::none().deny(2))
        .await?;
    for record in &settled.audit {
        assert_eq!(record["route"], "chat", "{record}");
    }

    // Where Envoy does route to the docs host (any case, any port), the entry applies:
    // Envoy answers itself and nothing reaches a provider.
    let ledger = Ledger::take(&stack).await?;
    for host in ["docs.example.com", "DOCS.Example.com:8443"] {
        let reply = H1Conn::to(&stack)
            .await?
            .request(&h1_with_host("POST", &target, host, &body))
            .await?
            .reply()?;
        assert_eq!(reply.text(), "docs\n", "{host}");
        let reply = h2_with_authority(&stack, b"POST", host).await?.reply()?;
        assert_eq!(reply.text(), "docs\n", "{host}");
    }
    ledger
        .settle(
            &stack,
            "the docs host itself",
            Outcomes::none().disabled(4).upstream(0),
        )
        .await?;

    // And the ordinary request: regulated, decided, nothing let through; an `h2c` upgrade
    // (which Envoy does not perform: it drops the upgrade headers) is one too.
    let ledger = Ledger::take(&stack).await?;
    for proto in Proto::BOTH {
        let reply = send_ok(&stack, proto, &Req::post(&target, &body)).await?;
        assert_denied(&reply, "regulated-requires-identity");
    }
    let h2c = H1Request::post(&target, &body)
        .header("connection", "Upgrade, HTTP2-Settings")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA");
    let reply = H1Conn::to(&stack).await?.request(&h2c).await?.reply()?;
    assert_denied(&reply, "regulated-requires-identity");
    ledger
        .settle(&stack, "plain requests", Outcomes::none().deny(3))
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The body as policy and as a provider read it

/// `{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}`, gzip-compressed.
const GZIPPED_CHAT: &[u8] = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03\xab\x56\xca\xcd\x4f\x49\xcd\x51\xb2\x52\x4a\x2f\x28\xd1\x35\xc9\x57\xd2\x51\xca\x4d\x2d\x2e\x4e\x4c\x4f\x2d\x56\xb2\x8a\xae\x56\x2a\xca\xcf\x49\x05\x4a\x96\x16\xa7\x16\x01\xa5\x92\xf3\xf3\x4a\x52\xf3\x4a\x80\x02\x19\x99\x4a\xb5\xb1\xb5\x00\x58\x65\xf9\xa3\x3e\x00\x00\x00";

/// One body case: what it is, the body, extra request headers.
type Case = (&'static str, Vec<u8>, Vec<(&'static str, &'static str)>);

/// A body route that refuses what it cannot read (`t_body_strict`, max_body_bytes 1024).
const STRICT: &str = "/t/strict-body/v1/chat/completions";

/// Bodies whose model (or other field policy reads) a provider may read differently from
/// policy are refused as unreadable, never decided on the reading policy happens to make:
/// a key that differs from `model` only in case (Go's `encoding/json`, behind Ollama and
/// many gateways, matches keys ignoring case, Unicode folding included, so the last of
/// `model` / `MODEL` wins there), the same key twice, a compressed body, a byte-order
/// mark, a number no integer holds. An escaped key is the key itself (every JSON parser
/// decodes it), and a deeply nested prompt is skipped, not recursed into. Over both
/// protocols.
#[tokio::test(flavor = "multi_thread")]
async fn policy_reads_the_model_the_provider_reads_or_refuses_the_body() -> Result<()> {
    let stack = patient_stack().start().await?;
    let messages = r#""messages":[{"role":"user","content":"hi"}]"#;
    // Skipped, not recursed into: no depth limit to trip, no stack to overflow.
    let deep = format!(
        r#"{{"model":"gpt-4o","messages":[{}{}]}}"#,
        "[".repeat(400),
        "]".repeat(400)
    );
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend(chat("gpt-4o-mini"));
    let unreadable: Vec<Case> = vec![
        (
            "`MODEL` after `model`",
            format!(r#"{{"model":"gpt-4o-mini","MODEL":"gpt-4o",{messages}}}"#).into_bytes(),
            vec![],
        ),
        (
            "`Model` alone",
            format!(r#"{{"Model":"gpt-4o",{messages}}}"#).into_bytes(),
            vec![],
        ),
        (
            "`meſſages` (U+017F folds to `s`)",
            r#"{"model":"gpt-4o-mini","meſſages":[]}"#.as_bytes().to_vec(),
            vec![],
        ),
        (
            "`max_to\u{212a}ens` (the Kelvin sign folds to `k`)",
            format!("{{\"model\":\"gpt-4o-mini\",\"max_to\u{212a}ens\":1,{messages}}}")
                .into_bytes(),
            vec![],
        ),
        (
            "`model` twice",
            format!(r#"{{"model":"gpt-4o-mini","model":"gpt-4o",{messages}}}"#).into_bytes(),
            vec![],
        ),
        (
            "gzip",
            GZIPPED_CHAT.to_vec(),
            vec![("content-encoding", "gzip")],
        ),
        ("a byte-order mark", bom, vec![]),
        (
            "max_tokens 1e309",
            format!(r#"{{"model":"gpt-4o-mini","max_tokens":1e309,{messages}}}"#).into_bytes(),
            vec![],
        ),
    ];
    for proto in Proto::BOTH {
        let ledger = Ledger::take(&stack).await?;
        for (what, body, headers) in &unreadable {
            let req = headers
                .iter()
                .fold(Req::post(STRICT, body), |req, (k, v)| req.header(k, v));
            let reply = send_ok(&stack, proto, &req).await?;
            assert_eq!(reply.status, 403, "{proto:?} {what}: {}", reply.text());
            assert_denied(&reply, "body-must-be-readable");
        }
        // Read as every parser reads them, and refused as a premium model: `m\u006fdel` is
        // `model`, and 400 levels of nesting in `messages` are a valid prompt.
        let read = [
            format!(r#"{{"m\u006fdel":"gpt-4o",{messages}}}"#).into_bytes(),
            deep.clone().into_bytes(),
        ];
        for body in &read {
            let reply = send_ok(&stack, proto, &Req::post(STRICT, body)).await?;
            assert_denied(&reply, "model-allow-list");
        }
        let settled = ledger
            .settle(
                &stack,
                &format!("{proto:?} bodies read two ways"),
                Outcomes::none().deny((unreadable.len() + read.len()) as u64),
            )
            .await?;
        let (refused, read) = settled.audit.split_at(unreadable.len());
        for record in refused {
            assert_eq!(record["body_parse_error"], true, "{record}");
            assert!(record["model"].is_null(), "{record}");
        }
        for record in read {
            assert_eq!(record["model"], "gpt-4o", "{record}");
            assert_eq!(record["body_parse_error"], false, "{record}");
        }
    }
    Ok(())
}
