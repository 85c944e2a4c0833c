//! `arbiter-demo` (`make run`): the policy server, two mock LLM providers and Envoy with the
//! Arbiter filter on fixed local ports, then three curl commands to try. Ctrl-C stops
//! everything.
//!
//! Ports: listener 10000 (`ARBITER_DEMO_PORT`), admin 9901 (`ARBITER_DEMO_ADMIN_PORT`),
//! policy server 50051 (`ARBITER_DEMO_POLICY_PORT`), providers 8081/8082
//! (`ARBITER_DEMO_PRIMARY_PORT`, `ARBITER_DEMO_BACKUP_PORT`). Logs, access log, audit log
//! and the policy server's PID go to `.run/`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use arbiter_e2e::stack::{default_vars, DEFAULT_POLICIES, DEMO_TEMPLATE};
use arbiter_e2e::util::loopback;
use arbiter_e2e::{workspace_root, Envoy, EnvoyOptions, MockLlm, PolicyServer};

const CHAT_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const EMBEDDINGS_BODY: &str = r#"{"model":"text-embedding-3-small","input":"hi"}"#;

fn port(var: &str, default: u16) -> Result<u16> {
    match std::env::var(var) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("{var}=`{value}` is not a port")),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let listen_port = port("ARBITER_DEMO_PORT", 10000)?;
    let admin_port = port("ARBITER_DEMO_ADMIN_PORT", 9901)?;
    let policy_port = port("ARBITER_DEMO_POLICY_PORT", 50051)?;
    let primary_port = port("ARBITER_DEMO_PRIMARY_PORT", 8081)?;
    let backup_port = port("ARBITER_DEMO_BACKUP_PORT", 8082)?;

    let root = workspace_root();
    let run = root.join(".run");
    std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
    let pid_file = run.join("policy-server.pid");

    let policy = PolicyServer::start_in(
        loopback(policy_port),
        root.join(DEFAULT_POLICIES),
        &[],
        Some(&run),
    )
    .await?;
    let pid = policy.pid().context("policy server is not running")?;
    std::fs::write(&pid_file, format!("{pid}\n"))
        .with_context(|| format!("writing {}", pid_file.display()))?;

    let primary = MockLlm::start_on("primary", loopback(primary_port), None).await?;
    let backup = MockLlm::start_on("backup", loopback(backup_port), None).await?;

    let template = root.join(DEMO_TEMPLATE);
    let text = std::fs::read_to_string(&template)
        .with_context(|| format!("reading {}", template.display()))?;
    let mut vars: HashMap<String, String> = default_vars(&text)?;
    for (name, value) in [
        ("ADMIN_PORT", admin_port),
        ("LISTEN_PORT", listen_port),
        ("POLICY_PORT", policy_port),
        ("PRIMARY_PORT", primary_port),
        ("BACKUP_PORT", backup_port),
    ] {
        vars.insert(name.into(), value.to_string());
    }
    vars.insert("POLICY_HC_INTERVAL".into(), "2s".into());
    vars.insert(
        "ACCESS_LOG".into(),
        run.join("access.log").display().to_string(),
    );
    let options = EnvoyOptions {
        dir: Some(run.join("envoy")),
        ..EnvoyOptions::default()
    };
    let envoy = Envoy::start_with(&template, &vars, options).await?;

    print_banner(&Banner {
        run: &run,
        listen_port,
        admin_port,
        policy: &policy,
        pid,
        primary: &primary,
        backup: &backup,
        envoy: &envoy,
    });

    wait_for_shutdown().await?;
    println!("\nstopping Envoy, mock providers and the policy server");
    drop(envoy);
    drop(primary);
    drop(backup);
    drop(policy);
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

struct Banner<'a> {
    run: &'a Path,
    listen_port: u16,
    admin_port: u16,
    policy: &'a PolicyServer,
    pid: u32,
    primary: &'a MockLlm,
    backup: &'a MockLlm,
    envoy: &'a Envoy,
}

fn print_banner(b: &Banner<'_>) {
    let url = format!("localhost:{}", b.listen_port);
    let post = |path: &str, body: &str| {
        format!("curl -s -i -X POST {url}{path} -H 'content-type: application/json' -d '{body}'")
    };
    println!(
        "\
Arbiter demo is running (Ctrl-C stops it)
  Envoy          http://{url}  (admin http://localhost:{admin})
  policy server  {policy}  (pid {pid}{audit})
  LLM primary    {primary}  (control http://{primary_ctl}/__mock/mode)
  LLM backup     {backup}  (control http://{backup_ctl}/__mock/mode)
  logs           {run}/  (Envoy: {envoy_dir}/envoy.stderr, access log {run}/access.log)

1. Allowed: 200 from the primary provider (\"provider\":\"primary\")
   {allow}

2. Denied by policy: 403 {{\"error\":{{\"type\":\"policy_denied\",...,\"audit_id\":...}}}}
   {deny}

3. Fail modes: stop the policy server, then the chat route (fail_mode closed) answers
   503 {{\"error\":{{\"type\":\"policy_unavailable\",\"reason\":\"unreachable\",...}}}} while the
   embeddings route (fail_mode open) answers 200 and the provider sees
   x-arbiter-fail-open (echoed in the answer as \"arbiter_headers\"):
   kill $(cat .run/policy-server.pid); {chat}; echo; {embeddings}
",
        admin = b.admin_port,
        policy = b.policy.addr(),
        pid = b.pid,
        audit = b
            .policy
            .audit_log_path()
            .map(|p| format!(", audit log {}", p.display()))
            .unwrap_or_default(),
        run = b.run.display(),
        primary = b.primary.addr(),
        primary_ctl = b.primary.control_addr(),
        backup = b.backup.addr(),
        backup_ctl = b.backup.control_addr(),
        envoy_dir = b.envoy.dir().display(),
        allow = post("/v1/chat/completions", CHAT_BODY),
        deny = post("/regulated/v1/chat/completions", CHAT_BODY),
        chat = post("/v1/chat/completions", CHAT_BODY),
        embeddings = post("/v1/embeddings", EMBEDDINGS_BODY),
    );
}

async fn wait_for_shutdown() -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
