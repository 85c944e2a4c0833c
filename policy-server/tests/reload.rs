//! Hot reload over real gRPC: valid changes take effect, invalid ones are rejected while the
//! last-known-good bundle keeps deciding, and a storm of changes under load fails no Check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::{
    authorization_client::AuthorizationClient, CheckResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use common::{check_request, eventually, Running};

const ALLOW_CHAT: &str = "@id(\"chat\")\npermit(principal, action == Arbiter::Action::\"chat.completions\", resource);\n";
const DENY_ALL: &str = "@id(\"nothing\")\nforbid(principal, action, resource);\npermit(principal, action, resource);\n";

/// Writes `text` to `dir/name` atomically (temp file + rename), as deploy tools should.
fn write_atomic(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn version(response: &CheckResponse) -> String {
    match &response.dynamic_metadata.as_ref().unwrap().fields["policy_version"].kind {
        Some(Kind::StringValue(v)) => v.clone(),
        other => panic!("policy_version {other:?}"),
    }
}

async fn chat(client: &mut AuthorizationClient<tonic::transport::Channel>) -> CheckResponse {
    client
        .check(check_request(
            "",
            "POST",
            "/v1/chat/completions",
            &[("route", "chat")],
        ))
        .await
        .unwrap()
        .into_inner()
}

fn allowed(response: &CheckResponse) -> bool {
    response.status.as_ref().unwrap().code == 0
}

async fn bundle_health(server: &Running) -> i32 {
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: arbiter_policy_server::reload::BUNDLE_HEALTH_SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

const REJECTED: &str = "arbiter_bundle_reloads_total{bundle=\"active\",result=\"rejected\"}";
const SUCCEEDED: &str = "arbiter_bundle_reloads_total{bundle=\"active\",result=\"success\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_change_takes_effect_within_two_seconds() {
    let dir = tempfile::tempdir().unwrap();
    write_atomic(dir.path(), "p.cedar", ALLOW_CHAT);
    // The default poll interval.
    let server = Running::start(dir.path(), None, Duration::from_millis(250)).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let before = chat(&mut client).await;
    assert!(allowed(&before));

    write_atomic(dir.path(), "p.cedar", DENY_ALL);
    let changed = Instant::now();
    let after = eventually(Duration::from_secs(2), "the new bundle to decide", || {
        let mut client = client.clone();
        async move {
            let response = chat(&mut client).await;
            (!allowed(&response)).then_some(response)
        }
    })
    .await;
    assert!(changed.elapsed() < Duration::from_secs(2));
    assert_ne!(version(&before), version(&after));
    assert_eq!(server.metric(SUCCEEDED).await, 1.0);
    let status: serde_json::Value =
        serde_json::from_str(&server.http_get("/status").await).unwrap();
    assert_eq!(status["active"]["version"], version(&after));
    assert_eq!(status["active"]["state"], "current");
    assert_eq!(status["active"]["reloads"], 1);
    assert_eq!(status["shadow"], serde_json::Value::Null);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bundles_are_rejected_and_the_last_good_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    write_atomic(dir.path(), "p.cedar", ALLOW_CHAT);
    let server = Running::start(dir.path(), None, Duration::from_millis(50)).await;
    let mut client = AuthorizationClient::new(server.channel().await);
    let good = version(&chat(&mut client).await);

    let oversized = |dir: &Path| {
        let file = std::fs::File::create(dir.join("entities.json")).unwrap();
        file.set_len(arbiter_policy_server::bundle::MAX_BUNDLE_BYTES + 1)
            .unwrap();
    };
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "syntax error",
            Box::new(|d| write_atomic(d, "p.cedar", "permit(principal, action resource);")),
            "cannot parse policies: `p.cedar:1:",
        ),
        (
            "schema violation",
            Box::new(|d| {
                write_atomic(
                    d,
                    "p.cedar",
                    "permit(principal, action, resource) when { context.modle == \"x\" };",
                )
            }),
            "policies do not match the schema: `p.cedar:1:",
        ),
        (
            "half-written file",
            // What a reader sees mid-write when a tool writes in place.
            Box::new(|d| std::fs::write(d.join("p.cedar"), &ALLOW_CHAT[..40]).unwrap()),
            "cannot parse policies",
        ),
        (
            "empty directory",
            Box::new(|d| std::fs::remove_file(d.join("p.cedar")).unwrap()),
            "no `*.cedar` policy file",
        ),
        (
            "enormous entities file",
            Box::new(move |d| {
                write_atomic(d, "p.cedar", ALLOW_CHAT);
                oversized(d);
            }),
            "bundle is too large: with `entities.json`",
        ),
    ];
    for (n, (what, breaker, error)) in cases.iter().enumerate() {
        breaker(dir.path());
        let rejected = (n + 1) as f64;
        eventually(
            Duration::from_secs(30),
            &format!("{what} to be rejected"),
            || async { (server.metric(REJECTED).await >= rejected).then_some(()) },
        )
        .await;
        // Still decided by the last good bundle.
        let response = chat(&mut client).await;
        assert!(allowed(&response), "{what}");
        assert_eq!(version(&response), good, "{what}");
        let status: serde_json::Value =
            serde_json::from_str(&server.http_get("/status").await).unwrap();
        assert_eq!(status["active"]["state"], "rejected", "{what}");
        assert_eq!(status["active"]["version"], good.as_str());
        let message = status["active"]["rejected"]["error"].as_str().unwrap();
        assert!(message.contains(error), "{what}: {message}");
        assert_eq!(
            server
                .metric("arbiter_bundle_rejected{bundle=\"active\"}")
                .await,
            1.0
        );
        assert_eq!(
            bundle_health(&server).await,
            ServingStatus::NotServing as i32,
            "{what}"
        );
        // Overall health stays SERVING: the server decides with the last good bundle.
        let overall = HealthClient::new(server.channel().await)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(overall, ServingStatus::Serving as i32);
    }
    assert!(
        server
            .metric(&format!(
                "arbiter_bundle_info{{bundle=\"active\",version=\"{good}\"}}"
            ))
            .await
            == 1.0
    );

    // Fixed: the new bundle goes into use and the rejection clears.
    std::fs::remove_file(dir.path().join("entities.json")).unwrap();
    write_atomic(dir.path(), "p.cedar", DENY_ALL);
    eventually(Duration::from_secs(30), "the fixed bundle", || {
        let mut client = client.clone();
        async move { (!allowed(&chat(&mut client).await)).then_some(()) }
    })
    .await;
    assert_eq!(
        server
            .metric("arbiter_bundle_rejected{bundle=\"active\"}")
            .await,
        0.0
    );
    assert_eq!(bundle_health(&server).await, ServingStatus::Serving as i32);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_changes_under_load_fails_no_check() {
    let dir = tempfile::tempdir().unwrap();
    write_atomic(dir.path(), "p.cedar", ALLOW_CHAT);
    let server = Running::start(dir.path(), None, Duration::from_millis(20)).await;
    let channel = server.channel().await;

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut client = AuthorizationClient::new(channel.clone());
        let stop = Arc::clone(&stop);
        let answered = Arc::clone(&answered);
        clients.push(tokio::spawn(async move {
            let mut versions = std::collections::HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                // Any error fails the test: no Check may fail during reloads.
                let response = client
                    .check(check_request(
                        "",
                        "POST",
                        "/v1/chat/completions",
                        &[("route", "chat")],
                    ))
                    .await
                    .expect("check failed during the reload storm")
                    .into_inner();
                versions.insert(version(&response));
                answered.fetch_add(1, Ordering::Relaxed);
            }
            versions
        }));
    }

    // 100 changes a few milliseconds apart: valid variants, and broken ones among them.
    let mut valid_texts = Vec::new();
    for i in 0..100 {
        let text = match i % 4 {
            3 => "permit(principal, action".to_owned(),
            _ => {
                let text = format!("{ALLOW_CHAT}// change {i}\n");
                valid_texts.push(text.clone());
                text
            }
        };
        if i % 10 == 9 {
            // Some in-place writes too (readers may see them half-written).
            std::fs::write(dir.path().join("p.cedar"), &text).unwrap();
        } else {
            write_atomic(dir.path(), "p.cedar", &text);
        }
        // Let the clients answer between changes, however loaded the machine is: the storm
        // is paced by answered checks, not by the clock (a fixed sleep made "too little
        // load" a function of the machine's load).
        let before = answered.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while answered.load(Ordering::Relaxed) < before + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "no check answered within 30 s of change {i}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let last = format!("{ALLOW_CHAT}// final\n");
    write_atomic(dir.path(), "p.cedar", &last);
    let final_dir = tempfile::tempdir().unwrap();
    std::fs::write(final_dir.path().join("p.cedar"), &last).unwrap();
    let final_version = arbiter_policy_server::Bundle::load(final_dir.path())
        .unwrap()
        .version()
        .to_owned();
    eventually(Duration::from_secs(30), "the final bundle", || {
        let mut client = AuthorizationClient::new(channel.clone());
        let expected = final_version.clone();
        async move { (version(&chat(&mut client).await) == expected).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::HashSet::new();
    for client in clients {
        seen.extend(client.await.unwrap());
    }
    assert!(answered.load(Ordering::Relaxed) > 100, "too little load");
    // Every answer came from a valid bundle: the first, one of the valid variants, the last.
    let mut valid_versions = std::collections::HashSet::new();
    for text in valid_texts.iter().chain([&last, &ALLOW_CHAT.to_owned()]) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("p.cedar"), text).unwrap();
        valid_versions.insert(
            arbiter_policy_server::Bundle::load(d.path())
                .unwrap()
                .version()
                .to_owned(),
        );
    }
    assert!(seen.is_subset(&valid_versions), "{seen:?}");
    server.stop().await;
}
