//! Decision latency by bundle size, and under a concurrent reload of a 10k-policy bundle.
//!
//! `cargo bench -p arbiter-policy-server --bench decide` (or `make bench-decide`). Besides
//! criterion's mean, prints p50/p99 over 50k single decisions per case, since the target
//! is a tail latency (p99 <= 50 µs at 1,000 policies, flat to 10,000).
//!
//! Bundles: `n` per-route permits in the shape teams write them (group, action and route in
//! the scope; model list in the condition), plus the example bundle's global forbids. The
//! `unscoped` variant puts the route test in the condition instead of the scope, so nothing
//! can be indexed and Cedar evaluates every policy: what the index saves.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter_policy_server::cli::policy::RequestSpec;
use arbiter_policy_server::{AuthzRequest, Bundle, PolicyEngine};
use criterion::{criterion_group, Criterion};
use serde_json::json;

const GLOBAL: &str = r#"
@id("tenant-isolation")
forbid (principal, action, resource) when { context has requested_tenant }
unless { principal is Arbiter::Caller && principal has tenant && principal.tenant == context.requested_tenant };
@id("body-must-be-readable")
forbid (principal, action, resource) when { context.body_truncated || context.body_parse_error };
"#;

fn write_bundle(dir: &Path, n: usize, scoped: bool) {
    let mut text = String::from(GLOBAL);
    for i in 0..n {
        let models = format!("[\"m-{}\", \"m-{}\"]", i % 7, (i + 3) % 7);
        if scoped {
            text.push_str(&format!(
                "@id(\"p{i}\") permit (principal in Arbiter::Group::\"team-{}\", action == Arbiter::Action::\"chat.completions\", resource == Arbiter::Route::\"route-{i}\") when {{ context has model && {models}.contains(context.model) }};\n",
                i % 100
            ));
        } else {
            text.push_str(&format!(
                "@id(\"p{i}\") permit (principal, action, resource) when {{ principal in Arbiter::Group::\"team-{}\" && action == Arbiter::Action::\"chat.completions\" && resource == Arbiter::Route::\"route-{i}\" && context has model && {models}.contains(context.model) }};\n",
                i % 100
            ));
        }
    }
    std::fs::write(dir.join("policies.cedar"), text).unwrap();
    let mut entities = vec![];
    for g in 0..100 {
        entities.push(json!({"uid": {"type": "Arbiter::Group", "id": format!("team-{g}")}, "attrs": {}, "parents": []}));
    }
    entities.push(json!({
        "uid": {"type": "Arbiter::Caller", "id": "svc-5"},
        "attrs": {"tenant": "acme", "api_key_sha256": [arbiter_policy_server::identity::api_key_sha256(b"bench-key")]},
        "parents": [{"type": "Arbiter::Group", "id": "team-5"}]
    }));
    std::fs::write(
        dir.join("entities.json"),
        serde_json::to_string(&entities).unwrap(),
    )
    .unwrap();
}

fn request(route: usize) -> AuthzRequest {
    let spec = RequestSpec {
        path: "/v1/chat/completions".into(),
        route: Some(format!("route-{route}")),
        api_key: Some("bench-key".into()),
        headers: [("x-tenant-id".to_owned(), "acme".to_owned())].into(),
        body: Some(
            json!({"model": "m-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}]}),
        ),
        ..RequestSpec::default()
    };
    AuthzRequest::try_from(spec.to_check_request().unwrap()).unwrap()
}

fn engine(n: usize, scoped: bool) -> (tempfile::TempDir, PolicyEngine, AuthzRequest) {
    let dir = tempfile::tempdir().unwrap();
    write_bundle(dir.path(), n, scoped);
    let engine = PolicyEngine::load(dir.path()).unwrap();
    // route-5 permits team-5 with m-5: an allow that has to find its one permit.
    let req = request(5);
    assert!(engine.decide(&req).unwrap().allowed);
    (dir, engine, req)
}

fn percentiles(engine: &PolicyEngine, req: &AuthzRequest, samples: usize) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        let decision = engine.decide(req).unwrap();
        times.push(started.elapsed());
        std::hint::black_box(decision);
    }
    times.sort();
    (times[samples / 2], times[samples * 99 / 100])
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for (n, scoped) in [(10, true), (1_000, true), (10_000, true), (1_000, false)] {
        let (_dir, engine, req) = engine(n, scoped);
        let name = format!("{n}{}", if scoped { "" } else { "-unscoped" });
        group.bench_function(&name, |b| b.iter(|| engine.decide(&req).unwrap()));
        let (p50, p99) = percentiles(&engine, &req, 50_000);
        println!("decide/{name}: p50 {p50:?} p99 {p99:?}");
    }
    group.finish();
}

/// p99 while another thread loads the 10k bundle from disk and swaps it in, again and again.
fn reload_impact() {
    let (dir, engine, req) = engine(10_000, true);
    let engine = Arc::new(engine);
    let (_, idle) = percentiles(&engine, &req, 50_000);
    let stop = Arc::new(AtomicBool::new(false));
    let reloads = {
        let engine = Arc::clone(&engine);
        let stop = Arc::clone(&stop);
        let dir = dir.path().to_owned();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                engine.replace(Arc::new(Bundle::load(&dir).unwrap()));
                n += 1;
            }
            n
        })
    };
    let started = Instant::now();
    let (_, busy) = percentiles(&engine, &req, 50_000);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let n = reloads.join().unwrap();
    println!(
        "reload/10000: p99 idle {idle:?}, during reloads {busy:?} ({n} reloads in {elapsed:?}, {:+.1} %)",
        (busy.as_secs_f64() / idle.as_secs_f64() - 1.0) * 100.0
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}

fn main() {
    benches();
    reload_impact();
    Criterion::default().final_summary();
}
