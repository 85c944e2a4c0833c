//! `arbiter-mock-llm`: a standalone mock OpenAI-compatible provider for demos and manual
//! testing. Control it with `POST /__mock/mode` (`{"mode":"ok"|"status"|"slow"|"refuse"|"reset",
//! "status":503,"delay_ms":500}`) and `GET /__mock/requests`, on the main port or on the
//! control port (which stays open in `refuse` mode).

use std::net::SocketAddr;

use anyhow::Result;
use arbiter_e2e::MockLlm;
use clap::Parser;

/// Mock OpenAI-compatible LLM provider.
#[derive(Debug, Parser)]
#[command(name = "arbiter-mock-llm", version)]
struct Args {
    /// Address to serve the provider API on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Name reported in `x-mock-provider` and the JSON `provider` field.
    #[arg(long, default_value = "primary")]
    name: String,
    /// Address of the control-only listener (default: a free port on the listen IP).
    #[arg(long)]
    control: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mock = MockLlm::start_on(&args.name, args.listen, args.control).await?;
    println!(
        "mock LLM `{}` listening on {} (control on {})",
        mock.name(),
        mock.addr(),
        mock.control_addr()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
