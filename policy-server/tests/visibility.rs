//! What an operator sees of the built server: gRPC reflection (read by tonic-reflection's
//! own client over real gRPC, as `grpcurl` reads it) and decisions by route in the metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashMap};

use arbiter_policy_server::cli::policy::RequestSpec;
use common::{example_bundle, http_get, metric, Server};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use prost::Message as _;
use prost_types::FileDescriptorProto;
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

/// Asks one reflection question over the bidirectional stream, as grpcurl does.
async fn ask(
    client: &mut ServerReflectionClient<tonic::transport::Channel>,
    request: MessageRequest,
) -> MessageResponse {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    responses
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap()
}

fn files(response: MessageResponse) -> Vec<FileDescriptorProto> {
    match response {
        MessageResponse::FileDescriptorResponse(files) => files
            .file_descriptor_proto
            .iter()
            .map(|bytes| FileDescriptorProto::decode(bytes.as_slice()).unwrap())
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn reflection_lists_and_describes_every_service_without_proto_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let mut client = ServerReflectionClient::new(server.channel().await);

    let MessageResponse::ListServicesResponse(list) =
        ask(&mut client, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list");
    };
    let services: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(services.contains(service), "{service} not in {services:?}");
    }

    // `grpcurl describe envoy.service.auth.v3.Authorization`: the file defining the service,
    // then every file it imports, by name, until nothing is missing.
    let mut known: HashMap<String, FileDescriptorProto> = HashMap::new();
    let mut wanted: Vec<String> = Vec::new();
    for file in files(
        ask(
            &mut client,
            MessageRequest::FileContainingSymbol("envoy.service.auth.v3.Authorization".into()),
        )
        .await,
    ) {
        wanted.extend(file.dependency.clone());
        known.insert(file.name().to_owned(), file);
    }
    while let Some(name) = wanted.pop() {
        if known.contains_key(&name) {
            continue;
        }
        let got = files(ask(&mut client, MessageRequest::FileByFilename(name.clone())).await);
        let file = got
            .into_iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("`{name}` not served"));
        wanted.extend(file.dependency.clone());
        known.insert(name, file);
    }
    let service = known
        .values()
        .flat_map(|f| f.service.iter().map(move |s| (f.package(), s)))
        .find(|(package, s)| *package == "envoy.service.auth.v3" && s.name() == "Authorization")
        .unwrap()
        .1;
    let check = service.method.iter().find(|m| m.name() == "Check").unwrap();
    assert_eq!(check.input_type(), ".envoy.service.auth.v3.CheckRequest");
    assert_eq!(check.output_type(), ".envoy.service.auth.v3.CheckResponse");
    // The message the server decodes has the fields reflection describes: the served
    // descriptor is the wire contract, not a copy that drifted.
    let attribute_context = known
        .values()
        .flat_map(|f| f.message_type.iter())
        .find(|m| m.name() == "AttributeContext")
        .unwrap();
    let numbers: BTreeSet<i32> = attribute_context.field.iter().map(|f| f.number()).collect();
    for number in [1, 2, 4, 10, 11, 12, 13] {
        assert!(
            numbers.contains(&number),
            "AttributeContext field {number}: {numbers:?}"
        );
    }
}

fn check(route: &str, path: &str) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    RequestSpec {
        method: Some("GET".into()),
        path: path.into(),
        route: Some(route.into()).filter(|r: &String| !r.is_empty()),
        ..RequestSpec::default()
    }
    .to_check_request()
    .unwrap()
}

#[tokio::test]
async fn decisions_are_counted_by_route_only_for_routes_the_bundle_or_config_names() {
    // The example bundle plus a policy naming a route of its own.
    let bundle = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(example_bundle()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, bundle.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        bundle.path().join("batch.cedar"),
        "@id(\"batch-closed\")\nforbid (principal, action, resource == Arbiter::Route::\"batch\");\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        bundle.path(),
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-route",
            "from_config",
            "--audit-sync",
            "write",
        ],
    )
    .await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let requests = [
        ("models", "/v1/models"),      // entities.json: allow
        ("regulated_chat", "/admin"),  // entities.json: deny (no permit)
        ("batch", "/v1/models"),       // named in a policy: deny
        ("from_config", "/v1/models"), // --metrics-route: allow
        ("made-up-1", "/v1/models"),   // unknown: folded
        ("made-up-2", "/admin"),       // unknown: folded
        ("", "/v1/models"),            // no route name: folded
    ];
    for (route, path) in requests {
        client.check(check(route, path)).await.unwrap();
    }
    let text = http_get(server.metrics_addr(), "/metrics").await;
    let series = |route: &str, decision: &str| {
        metric(
            &text,
            &format!("arbiter_route_decisions_total{{route=\"{route}\",decision=\"{decision}\"}}"),
        )
    };
    assert_eq!(series("models", "allow"), 1.0, "{text}");
    assert_eq!(series("regulated_chat", "deny"), 1.0, "{text}");
    assert_eq!(series("batch", "deny"), 1.0, "{text}");
    assert_eq!(series("from_config", "allow"), 1.0, "{text}");
    assert_eq!(series("_other", "allow"), 2.0, "{text}");
    assert_eq!(series("_other", "deny"), 1.0, "{text}");
    assert!(!text.contains("made-up"), "{text}");
    // A known route is exported before its first decision, so a first deny is an increase.
    assert!(
        text.contains("arbiter_route_decisions_total{route=\"embeddings\",decision=\"deny\"} 0"),
        "{text}"
    );
    // The server's own count agrees: every decision is in exactly one route series.
    let per_route: f64 = text
        .lines()
        .filter(|l| l.starts_with("arbiter_route_decisions_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(per_route, requests.len() as f64);
}

#[tokio::test]
async fn an_invalid_metrics_route_or_claim_list_refuses_to_start() {
    for (args, message) in [
        (&["--metrics-route", "two words"][..], "is not a route name"),
        (
            &["--audit-jwt-claims", "*,email"][..],
            "`*` (every claim) cannot be combined",
        ),
        (
            &["--audit-jwt-claims", "bad\u{7}claim"][..],
            "is not a claim name",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_arbiter-policy-server"))
            .args(["--listen", "127.0.0.1:0", "--policies"])
            .arg(example_bundle())
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
