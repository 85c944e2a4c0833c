//! Shadow bundles over real gRPC: the candidate never changes the answer; its disagreements
//! are counted by direction and follow its own reloads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, CheckRequest, CheckResponse,
};
use tonic::transport::Channel;

use common::{check_request, eventually, example_bundle, Running};

fn copy_bundle(to: &Path) {
    for entry in std::fs::read_dir(example_bundle()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

fn requests() -> Vec<CheckRequest> {
    let regulated = [("route", "regulated_chat"), ("classification", "regulated")];
    vec![
        check_request("", "POST", "/v1/chat/completions", &[("route", "chat")]),
        check_request("", "POST", "/v1/embeddings", &[("route", "embeddings")]),
        check_request("", "POST", "/v1/embeddings", &[("route", "embeddings")]),
        check_request("", "GET", "/v1/models", &[("route", "models")]),
        check_request("", "POST", "/regulated/v1/chat/completions", &regulated),
        check_request(
            "spiffe://arbiter.test/ns/apps/sa/billing",
            "POST",
            "/regulated/v1/embeddings",
            &regulated,
        ),
    ]
}

/// The parts of an answer a client sees (audit ids differ per decision).
fn answer(response: &CheckResponse) -> (i32, String) {
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    let status = response.status.as_ref().unwrap().code;
    let detail = match &response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
            body["error"]["policy_ids"].to_string()
        }
        _ => String::new(),
    };
    (status, detail)
}

async fn answers(channel: Channel) -> Vec<(i32, String)> {
    let mut client = AuthorizationClient::new(channel);
    let mut out = Vec::new();
    for request in requests() {
        out.push(answer(&client.check(request).await.unwrap().into_inner()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stricter_candidate_shows_disagreements_and_changes_no_answer() {
    let candidate = tempfile::tempdir().unwrap();
    copy_bundle(candidate.path());
    std::fs::write(
        candidate.path().join("no-embeddings.cedar"),
        "@id(\"no-embeddings\")\nforbid (principal, action == Arbiter::Action::\"embeddings\", resource);\n",
    )
    .unwrap();

    let plain = Running::start(&example_bundle(), None, Duration::ZERO).await;
    let shadowed = Running::start(
        &example_bundle(),
        Some(candidate.path()),
        Duration::from_millis(50),
    )
    .await;
    let expected = answers(plain.channel().await).await;
    let got = answers(shadowed.channel().await).await;
    assert_eq!(got, expected, "the shadow bundle changed an answer");
    // The active bundle allows the three embeddings calls' routes differently: two routine
    // embeddings are allowed and the candidate denies them; the regulated one is allowed too.
    assert_eq!(
        shadowed
            .metric("arbiter_shadow_disagreements_total{direction=\"would_deny\"}")
            .await,
        3.0
    );
    assert_eq!(
        shadowed
            .metric("arbiter_shadow_disagreements_total{direction=\"would_allow\"}")
            .await,
        0.0
    );
    assert_eq!(shadowed.metric("arbiter_shadow_decisions_total").await, 6.0);
    assert_eq!(plain.metric("arbiter_shadow_decisions_total").await, 0.0);
    let metrics = shadowed.http_get("/metrics").await;
    assert!(
        metrics.contains("arbiter_bundle_info{bundle=\"shadow\",version=\"ai-gateway@sha256:"),
        "{metrics}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&shadowed.http_get("/status").await).unwrap();
    assert_eq!(status["shadow"]["state"], "current");
    assert_ne!(status["shadow"]["version"], status["active"]["version"]);

    // The candidate is reloaded like the active bundle: drop the extra forbid, and it agrees.
    std::fs::remove_file(candidate.path().join("no-embeddings.cedar")).unwrap();
    eventually(
        Duration::from_secs(5),
        "the candidate to reload",
        || async {
            (shadowed
                .metric("arbiter_bundle_reloads_total{bundle=\"shadow\",result=\"success\"}")
                .await
                >= 1.0)
                .then_some(())
        },
    )
    .await;
    let got = answers(shadowed.channel().await).await;
    assert_eq!(got, expected);
    assert_eq!(
        shadowed
            .metric("arbiter_shadow_disagreements_total{direction=\"would_deny\"}")
            .await,
        3.0
    );

    // A broken candidate is rejected like an active one; answers are unaffected.
    std::fs::write(candidate.path().join("routine.cedar"), "permit(").unwrap();
    eventually(
        Duration::from_secs(5),
        "the broken candidate to be rejected",
        || async {
            (shadowed
                .metric("arbiter_bundle_rejected{bundle=\"shadow\"}")
                .await
                == 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(answers(shadowed.channel().await).await, expected);
    assert_eq!(
        shadowed
            .metric("arbiter_bundle_rejected{bundle=\"active\"}")
            .await,
        0.0
    );
    plain.stop().await;
    shadowed.stop().await;
}
