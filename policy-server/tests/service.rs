//! `AuthorizationService::check` called directly, with the example bundle.
// Test code: helpers outside `#[test]` functions may unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use arbiter_policy_server::{
    AuditConfig, AuditLog, AuditMetrics, AuthorizationService, PolicyEngine, Redactor,
};
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_server::Authorization, check_response::HttpResponse, CheckRequest, CheckResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use serde_json::Value;
use tonic::{Code, Request};

use common::{check_request, example_bundle};

fn service() -> (AuthorizationService, String, tempfile::TempDir) {
    let engine = PolicyEngine::load(&example_bundle()).unwrap();
    let version = engine.bundle().version().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let audit = AuditLog::open(
        &AuditConfig::new(dir.path().join("audit.jsonl")),
        AuditMetrics::default(),
    )
    .unwrap();
    (
        AuthorizationService::new(Arc::new(engine), audit, Redactor::default()),
        version,
        dir,
    )
}

async fn check(request: CheckRequest) -> (CheckResponse, String) {
    let (service, version, _dir) = service();
    let response = service.check(Request::new(request)).await.unwrap();
    (response.into_inner(), version)
}

fn headers(response: &CheckResponse) -> Vec<(String, String)> {
    let headers = match response.http_response.as_ref().unwrap() {
        HttpResponse::OkResponse(ok) => &ok.headers,
        HttpResponse::DeniedResponse(denied) => &denied.headers,
        HttpResponse::ErrorResponse(_) => panic!("unexpected error response"),
    };
    headers
        .iter()
        .map(|h| {
            let h = h.header.as_ref().unwrap();
            (h.key.clone(), h.value.clone())
        })
        .collect()
}

fn metadata(response: &CheckResponse, key: &str) -> String {
    match &response.dynamic_metadata.as_ref().unwrap().fields[key].kind {
        Some(Kind::StringValue(s)) => s.clone(),
        other => panic!("{key} is {other:?}"),
    }
}

fn assert_uuid_v7(id: &str) {
    let id = uuid::Uuid::parse_str(id).unwrap();
    assert_eq!(id.get_version_num(), 7);
}

/// The denied body, checked for its fixed shape.
fn denied_body(response: &CheckResponse, version: &str) -> Value {
    assert_eq!(
        response.status.as_ref().unwrap().code,
        Code::PermissionDenied as i32
    );
    let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
        panic!("not denied: {response:?}");
    };
    assert_eq!(denied.status.as_ref().unwrap().code, 403);
    assert_eq!(
        headers(response),
        [
            ("content-type".to_owned(), "application/json".to_owned()),
            ("x-arbiter-policy-version".to_owned(), version.to_owned()),
        ]
    );
    let body: Value = serde_json::from_str(&denied.body).unwrap();
    assert_eq!(body["error"]["type"], "policy_denied");
    let audit_id = body["error"]["audit_id"].as_str().unwrap();
    assert_uuid_v7(audit_id);
    assert_eq!(metadata(response, "audit_id"), audit_id);
    assert_eq!(metadata(response, "decision"), "deny");
    assert_eq!(metadata(response, "policy_version"), version);
    body
}

#[tokio::test]
async fn allows_routine_chat() {
    let (response, version) = check(check_request(
        "",
        "POST",
        "/v1/chat/completions",
        &[("route", "chat")],
    ))
    .await;
    assert_eq!(response.status.as_ref().unwrap().code, 0);
    assert!(matches!(
        response.http_response,
        Some(HttpResponse::OkResponse(_))
    ));
    let headers = headers(&response);
    assert_eq!(headers.len(), 2);
    assert_eq!(headers[0].0, "x-arbiter-audit-id");
    assert_uuid_v7(&headers[0].1);
    assert_eq!(
        headers[1],
        ("x-arbiter-policy-version".to_owned(), version.clone())
    );
    assert!(version.starts_with("ai-gateway@sha256:"));
    assert_eq!(metadata(&response, "decision"), "allow");
    assert_eq!(metadata(&response, "audit_id"), headers[0].1);
    assert_eq!(metadata(&response, "policy_version"), version);
}

#[tokio::test]
async fn allows_embeddings_and_models_behind_a_prefix() {
    for (method, path) in [
        ("POST", "/team/v1/embeddings"),
        ("GET", "/v1/models/gpt-4o"),
    ] {
        let (response, _) = check(check_request("", method, path, &[("route", "r")])).await;
        assert_eq!(response.status.unwrap().code, 0, "{method} {path}");
    }
}

#[tokio::test]
async fn audit_ids_are_fresh() {
    let (service, _, _dir) = service();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let request = check_request("", "GET", "/v1/models", &[]);
        let response = service
            .check(Request::new(request))
            .await
            .unwrap()
            .into_inner();
        ids.push(metadata(&response, "audit_id"));
    }
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test]
async fn default_deny_for_other_requests() {
    let (response, version) = check(check_request(
        "",
        "DELETE",
        "/v1/files/f1",
        &[("route", "files")],
    ))
    .await;
    let body = denied_body(&response, &version);
    assert_eq!(body["error"]["policy_ids"], serde_json::json!([]));
    assert_eq!(
        body["error"]["message"],
        "no policy permits `http.request` on route `files`"
    );
}

#[tokio::test]
async fn regulated_route_denies_anonymous_callers() {
    let regulated = [("route", "regulated_chat"), ("classification", "regulated")];
    let (response, version) = check(check_request(
        "",
        "POST",
        "/regulated/v1/chat/completions",
        &regulated,
    ))
    .await;
    let body = denied_body(&response, &version);
    assert_eq!(
        body["error"]["policy_ids"],
        serde_json::json!(["regulated-requires-identity"])
    );
    assert_eq!(
        body["error"]["message"],
        "denied by policy `regulated-requires-identity`"
    );
    assert_eq!(
        response.status.unwrap().message,
        "denied by policy `regulated-requires-identity`"
    );

    let (response, _) = check(check_request(
        "spiffe://arbiter.test/ns/apps/sa/billing",
        "POST",
        "/regulated/v1/chat/completions",
        &regulated,
    ))
    .await;
    assert_eq!(response.status.unwrap().code, 0);
}

#[tokio::test]
async fn incomplete_requests_are_invalid_arguments() {
    let (service, _, _dir) = service();
    let status = service
        .check(Request::new(CheckRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "check request has no `attributes`");

    let mut no_http = check_request("", "GET", "/v1/models", &[]);
    no_http.attributes.as_mut().unwrap().request = None;
    let status = service.check(Request::new(no_http)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}
