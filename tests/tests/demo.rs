//! The demo config (`envoy/arbiter.yaml.tmpl`, what `make run` starts) does what the
//! README's three curl commands promise: allow, deny, and each route's fail mode once the
//! policy server is gone.

use anyhow::Result;
use arbiter_e2e::stack::{Stack, DEMO_TEMPLATE};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn readme_commands_allow_deny_and_fail_modes() -> Result<()> {
    let mut stack = Stack::builder().template(DEMO_TEMPLATE).start().await?;
    let chat = json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]});

    let reply = stack.post_json("/v1/chat/completions", &chat).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.provider(), Some("primary"));

    let reply = stack
        .post_json("/regulated/v1/chat/completions", &json!({}))
        .await?;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert_eq!(reply.json()?["error"]["type"], "policy_denied");

    let reply = stack.get("/healthz").await?;
    assert_eq!(reply.status, 200);

    stack.policy()?.stop();
    let reply = stack.post_json("/v1/chat/completions", &json!({})).await?;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()?["error"]["type"], "policy_unavailable");
    assert_eq!(reply.json()?["error"]["reason"], "unreachable");

    let reply = stack.post_json("/v1/embeddings", &json!({})).await?;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let last = stack
        .primary
        .requests()
        .pop()
        .expect("the open route reached the primary");
    assert_eq!(last.header("x-arbiter-fail-open"), Some("unreachable"));

    // The health route never asks the policy server, so it stays up.
    assert_eq!(stack.get("/healthz").await?.status, 200);
    Ok(())
}
