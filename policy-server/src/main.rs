//! `arbiter-policy-server`: parses flags, sets up logging, runs the server.

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use arbiter_policy_server::trace::{self, Tracing};
use arbiter_policy_server::{Config, LogFormat};
use clap::Parser;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    let tracing = match init_logging(&config) {
        Ok(tracing) => tracing,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    ignore_file_size_signal();
    let code = match arbiter_policy_server::run(config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    };
    if let Some(tracing) = tracing {
        tracing.shutdown(TRACE_FLUSH_TIMEOUT).await;
    }
    code
}

/// Longest the exit waits for the last spans to reach the collector.
const TRACE_FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Logs to stderr; with a traces endpoint, also exports the decision spans (the returned
/// handle flushes them on exit).
fn init_logging(config: &Config) -> anyhow::Result<Option<Tracing>> {
    let filter = EnvFilter::try_new(&config.log)
        .with_context(|| format!("invalid log filter `{}`", config.log))?
        // The exported spans stay out of the log lines, whatever the filter says.
        .add_directive(format!("{}=off", trace::TARGET).parse()?);
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = match config.log_format {
        LogFormat::Plain => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
    };
    let (tracing, spans) = match config.traces() {
        Some(traces) => {
            let (tracing, layer) = Tracing::start(&traces)?;
            (Some((tracing, traces.endpoint)), Some(layer))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .context("cannot set up logging")?;
    Ok(tracing.map(|(tracing, endpoint)| {
        tracing::info!("exporting decision spans to {endpoint}");
        tracing
    }))
}

/// Past a file-size limit (`ulimit -f`) the kernel sends SIGXFSZ, which kills the process
/// by default. Handled, the write fails with EFBIG instead, and the audit writer treats it
/// like a full disk: decisions are refused until writing works again.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ)) {
        Ok(mut signal) => {
            tokio::spawn(async move {
                while signal.recv().await.is_some() {
                    tracing::debug!("SIGXFSZ: a write went past the file-size limit");
                }
            });
        }
        Err(e) => tracing::warn!("cannot handle SIGXFSZ: {e}"),
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
