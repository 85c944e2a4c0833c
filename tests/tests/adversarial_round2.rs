//! The adversarial tier, round 2: what a client can do to the *policy call* rather than to
//! the request. A failure the client caused must never open a route nor count against the
//! policy server, and a failure of the policy path that is not the server's (Envoy shedding
//! calls) must be named for what it is. Real Envoy, the real wasm filter and the real
//! policy server; every case settles a [`Ledger`] (see `tests/tests/adversarial.rs`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Context, Result};
use arbiter_e2e::adversary::{
    filter_stat, patient_stack, policy_calls, send_ok, wait_policy_call, H1Conn, H1Request, Ledger,
    Outcomes, Proto, Req,
};
use arbiter_e2e::fault::Fault;
use arbiter_e2e::stack::Reply;
use arbiter_e2e::util::eventually;
use arbiter_policy_server::audit::bound::{
    MAX_RECORDED_MODEL, MAX_RECORDED_PATH, MAX_RECORDED_REQUEST_ID,
};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

fn chat(model: &str) -> Vec<u8> {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

fn path(route: &str) -> String {
    format!("{route}{CHAT}")
}

/// The patient plugin configuration with the filter's breaker on: it opens after three
/// consecutive calls without a decision.
const BREAKER_ON: &str = r#"{"policy_cluster":"arbiter_policy","timeout_ms":3000,"breaker_threshold":3,"breaker_cooldown_ms":60000}"#;

/// The template edit that makes Envoy keep the client's `x-request-id`. The shipped config
/// replaces it on every request from outside (`use_remote_address: true`, no internal
/// addresses); a mesh sidecar keeps the caller's id (that is how Istio joins a trace), so
/// there any workload in the mesh chooses the id the filter and the server see.
const KEEP_CLIENT_REQUEST_ID: (&str, &str) = (
    "          use_remote_address: true\n",
    "          use_remote_address: true\n          preserve_external_request_id: true\n",
);

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[track_caller]
fn assert_allowed(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 200, "{what}: {}", reply.text());
    assert!(reply.provider().is_some(), "{what}: {}", reply.text());
}

// ---------------------------------------------------------------------------------------
// The request id travels to the policy server as gRPC metadata

/// The filter passes the client's `x-request-id` to the policy server as gRPC metadata,
/// and the server's HTTP/2 stack refuses a header block over 16 KiB. Where Envoy keeps the
/// client's id (a mesh sidecar; see [`KEEP_CLIENT_REQUEST_ID`]) a client that sent a
/// 20,000-byte id made the *server* refuse the call, which an `open` route answered by
/// letting the request through undecided, and which counted toward the breaker (three such
/// requests opened it for everyone on the worker). The id must reach policy (and the audit
/// record: whole up to its bound, else its first 256 bytes with the whole id's length and
/// SHA-256) in the CheckRequest, and the request must be decided like any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_id_the_policy_server_cannot_take_never_opens_a_route() -> Result<()> {
    // One worker, so one breaker sees every call.
    let stack = patient_stack()
        .plugin_config(BREAKER_ON)
        .edit_template(KEEP_CLIENT_REQUEST_ID.0, KEEP_CLIENT_REQUEST_ID.1)
        .concurrency(1)
        .start()
        .await?;
    let long_id = "r".repeat(20_000);
    // Envoy itself refuses an id with control bytes (400, before any filter).
    for id in [b"rid\x01ctl".as_slice(), b"rid\x7fdel".as_slice()] {
        let ledger = Ledger::take(&stack).await?;
        let reply = send_ok(
            &stack,
            Proto::H1,
            &Req::post(&path("/t/open"), chat("gpt-4o-mini")).header("x-request-id", id),
        )
        .await?;
        assert_eq!(reply.status, 400, "{id:?}: {}", reply.text());
        ledger
            .settle(&stack, &format!("{id:?}"), Outcomes::none())
            .await?;
    }
    // (protocol, id, what it is): over the server's 16 KiB header block, and invalid UTF-8
    // (Envoy passes it; the filter reads it as U+FFFD, which is not ASCII).
    let cases: Vec<(Proto, Vec<u8>, &str)> = vec![
        (Proto::H1, long_id.clone().into_bytes(), "20,000-byte id"),
        (Proto::H2, long_id.clone().into_bytes(), "20,000-byte id"),
        (Proto::H1, b"rid-\xff\xfe".to_vec(), "id with invalid UTF-8"),
    ];
    for round in 0..2 {
        for (proto, id, what) in &cases {
            let what = format!("{proto:?} {what}, round {round}");
            let ledger = Ledger::take(&stack).await?;
            // Open route, allowed model: a refused call would let it through marked.
            let reply = send_ok(
                &stack,
                *proto,
                &Req::post(&path("/t/open"), chat("gpt-4o-mini")).header("x-request-id", id),
            )
            .await?;
            assert_allowed(&reply, &what);
            let settled = ledger
                .settle(&stack, &what, Outcomes::none().allow(1))
                .await?;
            // Decided by policy, not let through by the fail mode.
            assert!(
                !settled.upstream[0].has_header("x-arbiter-fail-open"),
                "{what}: went upstream undecided"
            );
            // The record names the request by the id the client sent (as Envoy read it):
            // whole, or its first bytes and the evidence of the whole id.
            let sent = String::from_utf8_lossy(id);
            let recorded = settled.audit[0]["request_id"].as_str().unwrap_or_default();
            if sent.len() <= MAX_RECORDED_REQUEST_ID {
                assert_eq!(recorded, sent, "{what}");
                assert!(settled.audit[0].get("cut").is_none(), "{what}");
            } else {
                assert_eq!(recorded, &sent[..MAX_RECORDED_REQUEST_ID], "{what}");
                assert_eq!(
                    settled.audit[0]["cut"]["request_id"],
                    json!({"bytes": sent.len(), "sha256": sha256_hex(sent.as_bytes())}),
                    "{what}"
                );
            }
        }
    }
    // Six such requests, none a failure of the server: the breaker never opened.
    assert_eq!(filter_stat(&stack, "breaker.opened").await?, 0);
    assert_eq!(filter_stat(&stack, "no_decision.error").await?, 0);
    assert_eq!(filter_stat(&stack, "no_decision.bad_response").await?, 0);
    assert_eq!(filter_stat(&stack, "no_decision.unreachable").await?, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Envoy's own circuit breaker toward the policy cluster

/// What README.md ("Under load") tells operators: Envoy sheds a policy call beyond the
/// policy cluster's `max_requests` at once, and Envoy's wasm host reports it to the filter
/// as a call that could not start (`InternalFailure`, no status message), the way it
/// reports a cluster without healthy hosts: reason `unreachable`. So whoever fills the
/// policy path makes an `open` route let requests through, marked, while a `closed` route
/// refuses them. Here `max_requests: 1` and a policy connection that swallows everything
/// hold the one slot while two more requests arrive.
#[tokio::test(flavor = "multi_thread")]
async fn an_open_route_fails_open_when_envoy_sheds_the_policy_call() -> Result<()> {
    // One worker with the filter's breaker on (three failures open it), so the one breaker
    // sees every shed call: shed calls made no request wait and must not count.
    let stack = patient_stack()
        .plugin_config(BREAKER_ON)
        .concurrency(1)
        // The held call must outlast the requests sent behind it on a loaded box.
        .var("TIMEOUT_MS", "8000")
        .edit_template("max_requests: 4096", "max_requests: 1")
        .start()
        .await?;
    // Warm the policy connection, so the held call sits on a live HTTP/2 connection.
    let reply = send_ok(
        &stack,
        Proto::H1,
        &Req::post(&path("/t/closed"), chat("gpt-4o-mini")),
    )
    .await?;
    assert_allowed(&reply, "warm-up");

    let ledger = Ledger::take(&stack).await?;
    let overflow = || async {
        stack
            .envoy
            .stat("cluster.arbiter_policy.upstream_rq_active_overflow")
            .await
    };
    let overflow_before = overflow().await?;
    stack.fault.set(Fault::Blackhole).await?;
    let calls = policy_calls(&stack).await?;
    let held_addr = std::net::SocketAddr::from(([127, 0, 0, 1], stack.envoy.port()?));
    let held = tokio::spawn(async move {
        H1Conn::connect(held_addr)
            .await?
            .request(&H1Request::post(&path("/t/closed"), chat("gpt-4o-mini")))
            .await
    });
    wait_policy_call(&stack, calls).await?;
    eventually(
        Duration::from_secs(10),
        "the held call to occupy the policy cluster",
        || async {
            let active = stack
                .envoy
                .stat("cluster.arbiter_policy.upstream_rq_active")
                .await
                .ok()?;
            (active >= 1).then_some(())
        },
    )
    .await?;

    // More shed calls than the breaker's threshold.
    for i in 0..4 {
        let open = send_ok(
            &stack,
            Proto::H1,
            &Req::post(&path("/t/open"), chat("gpt-4o-mini")),
        )
        .await?;
        assert_allowed(&open, &format!("open route, call {i} shed"));
    }
    let closed = send_ok(
        &stack,
        Proto::H1,
        &Req::post(&path("/t/regulated"), chat("gpt-4o-mini")),
    )
    .await?;
    assert_eq!(closed.status, 503, "{}", closed.text());
    let body = closed.json()?;
    assert_eq!(body["error"]["type"], "policy_unavailable", "{body}");
    assert_eq!(body["error"]["reason"], "unreachable", "{body}");
    assert_eq!(
        overflow().await? - overflow_before,
        5,
        "every call behind the held one was shed by Envoy's circuit breaker"
    );
    assert_eq!(
        filter_stat(&stack, "breaker.opened").await?,
        0,
        "shed calls are no mark against the server"
    );
    // The held request times out: a call the server got and never answered.
    let held = held.await?.context("held request")?.reply()?;
    assert_eq!(held.status, 503, "{}", held.text());
    let settled = ledger
        .settle(
            &stack,
            "overflow",
            Outcomes::none().fail_open(4).fail_closed(2),
        )
        .await?;
    assert_eq!(
        settled.upstream[0].header("x-arbiter-fail-open"),
        Some("unreachable"),
        "let through marked, never silently"
    );
    let reasons: Vec<&Value> = settled
        .access_log
        .iter()
        .map(|l| &l["arbiter_reason"])
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "unreachable").count(),
        5,
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "timeout").count(),
        1,
        "{reasons:?}"
    );
    // One timeout, four shed calls and one more shed on the closed route: below the
    // threshold of three *failures*, so the breaker is still closed.
    assert_eq!(filter_stat(&stack, "breaker.opened").await?, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// What a client writes into the server's decision log

/// The server logs one line per decision. In the plain (default) format a value logged
/// as-is lets a client write fields of its own: an `x-request-id` of `rid decision=allow
/// policy_ids=...` put a second `decision=allow` before the real `decision="deny"` of a
/// denied request. Client-chosen values must come out quoted and escaped, and the audit
/// record keeps the id exactly as sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_id_cannot_forge_fields_of_the_decision_log() -> Result<()> {
    let mut stack = patient_stack()
        .edit_template(KEEP_CLIENT_REQUEST_ID.0, KEEP_CLIENT_REQUEST_ID.1)
        .start()
        .await?;
    let forged = "rid-7 decision=allow policy_ids=forged-permit \"x\"=1";
    let ledger = Ledger::take(&stack).await?;
    let reply = send_ok(
        &stack,
        Proto::H1,
        &Req::post(&path("/t/regulated"), chat("gpt-4o-mini")).header("x-request-id", forged),
    )
    .await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    let settled = ledger
        .settle(&stack, "forged request id", Outcomes::none().deny(1))
        .await?;
    assert_eq!(settled.audit[0]["request_id"], forged);
    let id = settled.audit[0]["id"].as_str().unwrap().to_owned();
    let log = stack.policy()?.decisions_logged().await?;
    let line = log
        .lines()
        .find(|l| l.contains(&id) && l.contains("rid-7"))
        .with_context(|| format!("no decision line for {id} in\n{log}"))?;
    let quoted = r#"request_id="rid-7 decision=allow policy_ids=forged-permit \"x\"=1""#;
    assert!(line.contains(quoted), "the id is not quoted: {line}");
    let rest = line.replacen(quoted, "", 1);
    assert!(
        !rest.contains("decision=allow") && !rest.contains("forged-permit"),
        "a forged field reads as the line's own: {line}"
    );
    assert!(rest.contains(r#"decision="deny""#), "{line}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Identity

/// Two `x-api-key` headers, one of them an approved caller's: policy sees both values
/// joined (as Envoy's ext_authz does), which identifies nobody, so the regulated route
/// (identified callers only) denies in either order; and no key reaches the upstream of an
/// allowed request either. A second key never borrows the first one's identity.
#[tokio::test(flavor = "multi_thread")]
async fn two_api_keys_identify_nobody() -> Result<()> {
    const APPROVED_KEY: &str = "demo-key-acme-batch";
    let stack = patient_stack().start().await?;
    for proto in Proto::BOTH {
        let ledger = Ledger::take(&stack).await?;
        for keys in [[APPROVED_KEY, "junk"], ["junk", APPROVED_KEY]] {
            let reply = send_ok(
                &stack,
                proto,
                &Req::post(&path("/t/regulated"), chat("gpt-4o-mini"))
                    .header("x-api-key", keys[0])
                    .header("x-api-key", keys[1]),
            )
            .await?;
            assert_eq!(reply.status, 403, "{proto:?} {keys:?}: {}", reply.text());
        }
        let reply = send_ok(
            &stack,
            proto,
            &Req::post(&path("/t/open"), chat("gpt-4o-mini"))
                .header("x-api-key", APPROVED_KEY)
                .header("x-api-key", "junk"),
        )
        .await?;
        assert_allowed(&reply, "two keys on an open route");
        let settled = ledger
            .settle(
                &stack,
                &format!("{proto:?} two keys"),
                Outcomes::none().deny(2).allow(1),
            )
            .await?;
        for record in &settled.audit {
            assert_ne!(record["principal"], "acme-batch", "{record}");
        }
        assert!(!settled.upstream[0].has_header("x-api-key"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// HTTP/1 request forms round 1 did not try

/// HTTP/1.0 without `Host`, `OPTIONS *`, and an `OPTIONS *` with a body: Envoy refuses each
/// before the filter counts anything (HTTP/1.0 is not accepted by the shipped listener:
/// 426; `*` is no path a route matches: 404), so nothing is counted, recorded or sent
/// upstream.
#[tokio::test(flavor = "multi_thread")]
async fn odd_http1_request_forms_never_pass_undecided() -> Result<()> {
    let stack = patient_stack().start().await?;
    let body = chat("gpt-4o-mini");
    // (what, bytes, Envoy's answer)
    let forms: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "HTTP/1.0 without Host",
            [
                format!(
                    "POST {} HTTP/1.0\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    path("/t/open"),
                    body.len()
                )
                .into_bytes(),
                body.clone(),
            ]
            .concat(),
            426,
        ),
        (
            "OPTIONS *",
            b"OPTIONS * HTTP/1.1\r\nhost: gateway\r\n\r\n".to_vec(),
            404,
        ),
        (
            "OPTIONS * with a body",
            [
                format!(
                    "OPTIONS * HTTP/1.1\r\nhost: gateway\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes(),
                body.clone(),
            ]
            .concat(),
            404,
        ),
    ];
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], stack.envoy.port()?));
    for (what, bytes, status) in forms {
        let ledger = Ledger::take(&stack).await?;
        let mut conn = H1Conn::connect(addr).await?;
        conn.write(&bytes).await?;
        let answer = conn.answer().await?;
        assert_eq!(answer.status(), Some(status), "{what}");
        ledger.settle(&stack, what, Outcomes::none()).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The audit log under the server's feet

/// Someone (a careless cleanup, a log shipper) deletes the active audit log while the
/// server runs. The server held it open and went on appending to the deleted file:
/// decisions were answered and enforced while their records went into a file no one can
/// read, lost for good when the process ends. Now the next batch starts a new file at the
/// configured path and continues the chain: every decision answered after the deletion is
/// in it, and `arbiter audit verify` says where the chain now starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_audit_log_loses_no_later_decision() -> Result<()> {
    let mut stack = patient_stack().start().await?;
    let req = || Req::post(&path("/t/closed"), chat("gpt-4o-mini"));
    let reply = send_ok(&stack, Proto::H1, &req()).await?;
    assert_allowed(&reply, "before the deletion");
    let policy = stack.policy()?;
    let audit_path = policy.audit_log_path().context("no audit log")?.to_owned();
    let before = policy.audit_log()?;
    let last_seq = before
        .last()
        .and_then(|r| r["seq"].as_u64())
        .context("no record")?;
    std::fs::remove_file(&audit_path)?;

    for proto in [Proto::H1, Proto::H2, Proto::H1] {
        let reply = send_ok(&stack, proto, &req()).await?;
        assert_allowed(&reply, "after the deletion");
    }
    // Each answered decision names its record; each record is in the file at the path.
    let ids: Vec<String> = stack
        .primary
        .requests()
        .iter()
        .rev()
        .take(3)
        .map(|r| {
            r.header("x-arbiter-audit-id")
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let records = eventually(
        Duration::from_secs(15),
        "the decisions after the deletion in the new audit file",
        || async {
            let records = stack.policy.as_ref()?.audit_log().ok()?;
            (records.len() >= 3).then_some(records)
        },
    )
    .await?;
    assert_eq!(records.len(), 3, "{records:?}");
    let seqs: Vec<u64> = records.iter().filter_map(|r| r["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![last_seq + 1, last_seq + 2, last_seq + 3]);
    for id in &ids {
        assert!(
            records.iter().any(|r| r["id"] == id.as_str()),
            "answered decision {id} has no record: {records:?}"
        );
    }
    // The chain after the deletion verifies, and the verifier names where it starts: the
    // records before it are missing.
    let (code, out) = stack.policy()?.verify_audit()?;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("chain starts at seq {}", last_seq + 1)),
        "{out}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// What a request makes the audit log carry

/// Every decision is written to the audit log before it is answered, and a full audit disk
/// means no decisions: `open` routes fail open for everyone, closed routes refuse
/// everyone. A client chooses its path (Envoy admits 60 KiB of headers), its `x-request-id`
/// (where Envoy keeps it, as a mesh sidecar does) and the body's `model` (up to the route's
/// `max_body_bytes`, 8 MB here); each used to be recorded whole, so every request of
/// hundreds of KiB made a record (and a log line) as large. The record keeps each up to its
/// bound, with the whole value's length and SHA-256 in `cut`; policy still decides on the
/// whole values, so the request is decided (and reaches the upstream, or not) as its short
/// twin is, and the chain verifies.
#[tokio::test(flavor = "multi_thread")]
async fn long_client_values_are_decided_whole_and_recorded_bounded() -> Result<()> {
    let stack = patient_stack()
        .edit_template(KEEP_CLIENT_REQUEST_ID.0, KEEP_CLIENT_REQUEST_ID.1)
        .start()
        .await?;
    // The action comes from the path's end (`/v1/chat/completions`), past where the record
    // cuts it; the route sends bodies up to 8,000,000 bytes.
    let long_path = format!("/t/big-body/{}{CHAT}", "p".repeat(30_000));
    let long_id = format!("rid-{}", "r".repeat(8_000));
    let long_model = format!("gpt-4o-mini-{}", "m".repeat(600_000));
    // (what, path, id, model, allowed): each long case has a short twin.
    let cases = [
        (
            "long path and id, listed model",
            long_path.as_str(),
            long_id.as_str(),
            "gpt-4o-mini",
            true,
        ),
        (
            "short twin, listed model",
            "/t/big-body/v1/chat/completions",
            "rid-short-1",
            "gpt-4o-mini",
            true,
        ),
        (
            "long path, id and model",
            long_path.as_str(),
            long_id.as_str(),
            long_model.as_str(),
            false,
        ),
        (
            "short twin, unlisted model",
            "/t/big-body/v1/chat/completions",
            "rid-short-2",
            "gpt-4o-mini-m",
            false,
        ),
    ];
    let budget = MAX_RECORDED_PATH + MAX_RECORDED_REQUEST_ID + MAX_RECORDED_MODEL + 8 * 1024;
    let mut recorded = Vec::new();
    for proto in Proto::BOTH {
        for (what, path, id, model, allowed) in cases {
            let what = format!("{proto:?} {what}");
            let ledger = Ledger::take(&stack).await?;
            let body = chat(model);
            let reply = send_ok(
                &stack,
                proto,
                &Req::post(path, &body).header("x-request-id", id),
            )
            .await?;
            let expected = if allowed {
                assert_allowed(&reply, &what);
                Outcomes::none().allow(1)
            } else {
                assert_eq!(reply.status, 403, "{what}: {}", reply.text());
                let denial = reply.json()?;
                assert_eq!(
                    denial["error"]["policy_ids"],
                    json!(["model-allow-list"]),
                    "{what}"
                );
                Outcomes::none().deny(1)
            };
            let settled = ledger.settle(&stack, &what, expected).await?;
            if allowed {
                // The upstream got the request as sent: the whole path and body.
                assert_eq!(settled.upstream[0].path, path, "{what}");
                assert_eq!(settled.upstream[0].body_len, body.len(), "{what}");
            }
            let record = &settled.audit[0];
            assert_eq!(record["action"], "chat.completions", "{what}: {record}");
            assert_eq!(
                record["decision"],
                if allowed { "allow" } else { "deny" },
                "{what}"
            );
            // Every field whole, or its first bytes with the whole value's evidence.
            for (field, sent, max) in [
                ("path", path, MAX_RECORDED_PATH),
                ("request_id", id, MAX_RECORDED_REQUEST_ID),
                ("model", model, MAX_RECORDED_MODEL),
            ] {
                let kept = record[field].as_str().unwrap_or_default();
                if sent.len() <= max {
                    assert_eq!(kept, sent, "{what}: {field}");
                    assert!(record["cut"].get(field).is_none(), "{what}: {field}");
                } else {
                    assert_eq!(kept, &sent[..max], "{what}: {field}");
                    assert_eq!(
                        record["cut"][field],
                        json!({"bytes": sent.len(), "sha256": sha256_hex(sent.as_bytes())}),
                        "{what}: {field}"
                    );
                }
            }
            recorded.push((what, record["id"].as_str().unwrap_or_default().to_owned()));
        }
    }
    // The record lines on disk, and the decision log lines, are bounded whatever was sent.
    let server = stack.policy.as_ref().context("no policy server")?;
    let mut lines = Vec::new();
    for file in server.audit_files()? {
        lines.extend(
            std::fs::read_to_string(&file)?
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        );
    }
    let log = server.decisions_logged().await?;
    for (what, id) in &recorded {
        let line = lines
            .iter()
            .find(|l| l.contains(id.as_str()))
            .with_context(|| format!("{what}: no record {id}"))?;
        assert!(
            line.len() <= budget,
            "{what}: the record is {} bytes",
            line.len()
        );
        let logged = log
            .lines()
            .find(|l| l.contains(id.as_str()) && l.contains("arbiter::decision"))
            .with_context(|| format!("{what}: no decision line for {id}"))?;
        assert!(
            logged.len() <= budget,
            "{what}: the log line is {} bytes",
            logged.len()
        );
        let cut = if what.contains("long path, id and model") {
            Some(r#"cut="model,path,request_id""#)
        } else if what.contains("long path and id") {
            Some(r#"cut="path,request_id""#)
        } else {
            None
        };
        match cut {
            Some(cut) => assert!(logged.contains(cut), "{what}: {logged}"),
            None => assert!(!logged.contains("cut="), "{what}: {logged}"),
        }
    }
    let (code, out) = server.verify_audit()?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}

/// The Envoy-side record (`arbiter_record` in Envoy's access log) is the only evidence of a
/// request the server never decided: on an `open` route in an outage, exactly the requests
/// a flood would send. It recorded the client's path, id, tenant, model and `Host` whole (a
/// 30 KiB path made a 30 KiB log line), and the `Host`'s userinfo (`user:password@`) in
/// clear. Now each is bounded as in the server's records, with the whole value's length and
/// SHA-256 under `cut`, the userinfo is replaced, and `audit replay` lists such a line as
/// not replayable instead of re-deciding a cut request.
#[tokio::test(flavor = "multi_thread")]
async fn an_undecided_requests_envoy_side_record_is_bounded_and_keeps_no_userinfo() -> Result<()> {
    let stack = patient_stack()
        .edit_template(KEEP_CLIENT_REQUEST_ID.0, KEEP_CLIENT_REQUEST_ID.1)
        .policy_server(false)
        .start()
        .await?;
    let long_path = format!("/t/lenient-body/{}{CHAT}", "p".repeat(30_000));
    let long_id = format!("rid-{}", "r".repeat(8_000));
    let long_tenant = format!("acme-{}", "t".repeat(3_000));
    let long_model = format!("gpt-4o-mini-{}", "m".repeat(700));
    let host = format!("user:s3cret-pw@{}.example", "h".repeat(600));
    let body = chat(&long_model);
    assert!(body.len() < 1024, "within the route's max_body_bytes");
    let mut request = H1Request::post(&long_path, &body)
        .header("x-request-id", &long_id)
        .header("x-tenant-id", &long_tenant);
    request.headers.retain(|(name, _)| name != "host");
    request
        .headers
        .push(("host".into(), host.clone().into_bytes()));
    let ledger = Ledger::take(&stack).await?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], stack.envoy.port()?));
    let reply = H1Conn::connect(addr)
        .await?
        .request(&request)
        .await?
        .reply()?;
    // The policy server is down: the open route lets the request through, marked.
    assert_allowed(&reply, "open route, no policy server");
    let settled = ledger
        .settle(&stack, "undecided", Outcomes::none().fail_open(1))
        .await?;
    assert_eq!(
        settled.upstream[0].path, long_path,
        "the upstream got it as sent"
    );
    assert_eq!(settled.access_log.len(), 1);
    let line = serde_json::to_string(&settled.access_log[0])?;
    assert!(
        !line.contains("s3cret-pw"),
        "userinfo in the access log: {line}"
    );
    let record: Value = serde_json::from_str(
        settled.access_log[0]["arbiter_record"]
            .as_str()
            .context("no arbiter_record")?,
    )?;
    let record_text = settled.access_log[0]["arbiter_record"].to_string();
    assert!(
        record_text.len() < 8 * 1024,
        "the record is {} bytes",
        record_text.len()
    );
    assert_eq!(record["outcome"], "fail_open", "{record}");
    let redacted_host = format!("[redacted]@{}.example", "h".repeat(600));
    for (field, whole) in [
        ("path", long_path.as_str()),
        ("request_id", long_id.as_str()),
        ("tenant", long_tenant.as_str()),
        ("model", long_model.as_str()),
        ("host", redacted_host.as_str()),
    ] {
        let kept = record[field].as_str().unwrap_or_default();
        assert!(
            !kept.is_empty() && kept.len() < whole.len() && whole.starts_with(kept),
            "{field}: {kept}"
        );
        assert_eq!(
            record["cut"][field],
            json!({"bytes": whole.len(), "sha256": sha256_hex(whole.as_bytes())}),
            "{field}"
        );
    }

    // Replay names the line instead of deciding the cut request.
    let policies = stack.workspace().join("examples/ai-gateway/policies");
    let (code, out) = arbiter_e2e::stack::arbiter_cli([
        "audit".as_ref(),
        "replay".as_ref(),
        "--json".as_ref(),
        "--policies".as_ref(),
        policies.as_os_str(),
        stack.envoy.access_log_path().as_os_str(),
    ])?;
    assert_eq!(code, 0, "{out}");
    let report: Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    assert_eq!(report["fail_open"]["cut"], 1, "{report}");
    assert_eq!(report["fail_open"]["replayed"], 0, "{report}");
    assert_eq!(report["differences"], json!([]), "{report}");
    Ok(())
}
