//! Cross-check of the server-alone figure with a standard HTTP/2 load tool: `h2load`
//! (Debian `nghttp2-client`, installed by `make bench-tools`), sending the same gRPC-framed
//! CheckRequest bytes as the benchmark's own client, on one connection with the same number
//! of concurrent streams.
//!
//! `h2load` counts an HTTP 200 as success and does not read gRPC trailers, so a server
//! answering `grpc-status: 13` would look successful to it. The run therefore sends a fixed
//! number of requests (`-n`, sized from the own client's rate to last about as long as its
//! run) and reads the server's own `arbiter_decisions_total{decision="allow"}` counter
//! before and after: the cross-check is only reported as agreeing when the server counted
//! exactly one allow per request `h2load` saw succeed. The server is already warm (the own
//! client's runs come first), so `h2load` needs no warm-up of its own.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// The gRPC method every Check goes to.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// One `h2load` run against the policy server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct H2loadResult {
    /// `h2load --version`.
    pub tool: String,
    /// Concurrent streams on the one connection (`-m`).
    pub streams: usize,
    /// Requests sent (`-n`).
    pub requests: u64,
    /// Wall seconds `h2load` took for them.
    pub wall_s: f64,
    /// Requests `h2load` finished.
    pub done: u64,
    /// Requests answered with HTTP 2xx.
    pub succeeded: u64,
    /// Requests failed or errored.
    pub failed: u64,
    /// Requests per second, as `h2load` reports it.
    pub rps: f64,
    /// Mean time per request, ms, as `h2load` reports it (it has no percentiles).
    pub mean_ms: Option<f64>,
    /// Allow decisions the server counted over the same run (its metrics endpoint).
    pub server_allows: Option<u64>,
    /// Policy server CPU seconds per 1,000 succeeded requests.
    pub server_cpu_s_per_1k: Option<f64>,
}

impl H2loadResult {
    /// `true` when the server counted an allow for every request `h2load` saw succeed (and
    /// nothing failed): the requests/s is then decisions/s.
    pub fn agrees(&self) -> bool {
        self.failed == 0 && self.succeeded > 0 && self.server_allows == Some(self.succeeded)
    }
}

/// `h2load --version`, or `None` when it is not installed.
pub fn version() -> Option<String> {
    let output = Command::new("h2load").arg("--version").output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The chat CheckRequest as a gRPC message frame: uncompressed flag, 4-byte big-endian
/// length, the protobuf bytes.
pub fn grpc_frame() -> Result<Vec<u8>> {
    let message = crate::grpc::chat_check_request()?.encode_to_vec();
    let len = u32::try_from(message.len()).context("CheckRequest larger than 4 GiB")?;
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&message);
    Ok(frame)
}

/// Sends `requests` Checks with `h2load` to the server at `addr`, `streams` concurrent
/// streams on one connection, reading the server's allow counter at `metrics` around it.
/// `h2load` inherits this process's CPU pinning.
pub async fn run(
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    server_pid: Option<u32>,
    streams: usize,
    requests: u64,
    dir: &Path,
) -> Result<H2loadResult> {
    let tool = version().context("h2load is not installed (make bench-tools)")?;
    let body = dir.join("check-request.grpc");
    std::fs::write(&body, grpc_frame()?).with_context(|| format!("writing {}", body.display()))?;
    let allows_before = match metrics {
        Some(m) => Some(allow_count(m).await?),
        None => None,
    };
    let cpu = || server_pid.and_then(|p| crate::procfs::cpu_seconds(p).ok());
    let cpu_before = cpu();
    let mut command = tokio::process::Command::new("h2load");
    command
        .arg("--clients=1")
        .arg("--threads=1")
        .arg(format!("--max-concurrent-streams={}", streams.max(1)))
        .arg(format!("--requests={}", requests.max(1)))
        .arg(format!("--data={}", body.display()))
        .arg("--header=content-type: application/grpc")
        .arg("--header=te: trailers")
        .arg(format!("http://{addr}{CHECK_PATH}"))
        .kill_on_drop(true);
    // Generous: even at 1,000/s the largest run finishes in well under this.
    let output = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .context("h2load did not finish")?
        .context("running h2load")?;
    let cpu_after = cpu();
    let allows_after = match metrics {
        Some(m) => Some(allow_count(m).await?),
        None => None,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "h2load failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut result =
        parse(&stdout).with_context(|| format!("reading h2load's output:\n{stdout}"))?;
    result.tool = tool;
    result.streams = streams;
    result.requests = requests.max(1);
    result.server_allows = allows_before
        .zip(allows_after)
        .map(|(before, after)| after.saturating_sub(before));
    result.server_cpu_s_per_1k = cpu_before
        .zip(cpu_after)
        .filter(|_| result.succeeded > 0)
        .map(|(b, a)| (a - b).max(0.0) / result.succeeded as f64 * 1000.0);
    Ok(result)
}

/// `arbiter_decisions_total{decision="allow"}` from the server's `/metrics`.
async fn allow_count(metrics: SocketAddr) -> Result<u64> {
    let text = crate::http::get_text(&format!("http://{metrics}/metrics")).await?;
    allow_count_in(&text).context("no arbiter_decisions_total{decision=\"allow\"} in /metrics")
}

fn allow_count_in(text: &str) -> Option<u64> {
    text.lines()
        .filter(|l| l.starts_with("arbiter_decisions_total{") && l.contains("decision=\"allow\""))
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// The counts, rate and mean time of an `h2load` report.
fn parse(out: &str) -> Result<H2loadResult> {
    let mut result = H2loadResult::default();
    let mut seen = (false, false);
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // `finished in 5.00s, 12345.60 req/s, 1.23MB/s`
            let mut parts = rest.split(", ");
            result.wall_s = parts
                .next()
                .and_then(duration_ms)
                .map_or(0.0, |ms| ms / 1000.0);
            let rps = parts
                .find_map(|part| part.strip_suffix(" req/s"))
                .context("no req/s")?;
            result.rps = rps.trim().parse().context("req/s")?;
            seen.0 = true;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // `requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout`
            for part in rest.split(", ") {
                let Some((n, what)) = part.split_once(' ') else {
                    continue;
                };
                let n: u64 = n.parse().with_context(|| format!("count `{part}`"))?;
                match what {
                    "done" => result.done = n,
                    "succeeded" => result.succeeded = n,
                    "failed" | "errored" | "timeout" => result.failed += n,
                    _ => {}
                }
            }
            seen.1 = true;
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // `time for request:   123us   5.67ms   1.23ms   456us   78.90%` (min max mean sd)
            result.mean_ms = rest.split_whitespace().nth(2).and_then(duration_ms);
        }
    }
    if !(seen.0 && seen.1) {
        bail!("no `finished in` or `requests:` line");
    }
    Ok(result)
}

/// `123us`, `5.67ms`, `1.2s` → ms.
fn duration_ms(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "starting benchmark...
spawning thread #0: 1 total client(s). Timing-based test with 1s of warm-up time and 5s of main duration for measurements.
Warm-up started for thread #0.
progress: 10% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 5.00s, 12345.60 req/s, 1.23MB/s
requests: 61728 total, 61744 started, 61728 done, 61728 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 61728 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 6.12MB (6417408) total, 123.00KB (125952) headers (space savings 95.12%), 5.00MB (5243904) data
                     min         max         mean         sd        +/- sd
time for request:      123us      5.67ms      1.23ms       456us    78.90%
time for connect:      100us       100us       100us         0us   100.00%
time to 1st byte:      1.00ms      1.00ms      1.00ms         0us   100.00%
req/s           :   12345.60    12345.60    12345.60        0.00   100.00%
";

    #[test]
    fn reads_counts_rate_and_mean_from_an_h2load_report() {
        let r = parse(REPORT).unwrap();
        assert_eq!(r.done, 61728);
        assert_eq!(r.succeeded, 61728);
        assert_eq!(r.failed, 0);
        assert!((r.rps - 12345.60).abs() < 1e-9);
        assert!((r.wall_s - 5.0).abs() < 1e-9);
        assert!((r.mean_ms.unwrap() - 1.23).abs() < 1e-9);
        assert!(parse("nothing useful").is_err());
    }

    #[test]
    fn failures_and_errors_count_against_agreement() {
        let mut r = parse(&REPORT.replace("0 failed, 0 errored", "2 failed, 1 errored")).unwrap();
        assert_eq!(r.failed, 3);
        r.server_allows = Some(r.succeeded);
        assert!(!r.agrees());
        r.failed = 0;
        assert!(r.agrees());
        r.server_allows = Some(r.succeeded - 1);
        assert!(
            !r.agrees(),
            "an allow the server did not count is not a decision"
        );
    }

    #[test]
    fn reads_the_allow_counter_and_frames_the_request() {
        let metrics = "# TYPE arbiter_decisions counter\narbiter_decisions_total{decision=\"deny\"} 3\narbiter_decisions_total{decision=\"allow\"} 41\n";
        assert_eq!(allow_count_in(metrics), Some(41));
        assert_eq!(allow_count_in("arbiter_up 1"), None);
        let frame = grpc_frame().unwrap();
        assert_eq!(frame[0], 0);
        let len = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        assert_eq!(len + 5, frame.len());
    }

    #[test]
    fn durations_in_us_ms_and_s() {
        assert_eq!(duration_ms("250us"), Some(0.25));
        assert_eq!(duration_ms("1.5ms"), Some(1.5));
        assert_eq!(duration_ms("2s"), Some(2000.0));
        assert_eq!(duration_ms("x"), None);
    }
}
