//! What the kernel knows about a process: CPU time (`/proc/<pid>/stat`), resident memory
//! (`/proc/<pid>/status`), and CPU pinning (`taskset`, util-linux).

use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds used so far by every thread of `pid`.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks())
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field
/// 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Result<u64> {
    let Some(close) = stat.rfind(')') else {
        bail!("unexpected /proc stat line: {stat}");
    };
    // After ")": field 3 (state) is the first.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no field {n} in /proc stat line: {stat}"))
    };
    Ok(field(14)? + field(15)?)
}

/// Resident memory of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// Resident set size now, MiB (`VmRSS`).
    pub rss_mib: f64,
    /// Peak resident set size, MiB (`VmHWM`).
    pub peak_rss_mib: f64,
}

/// `VmRSS` and `VmHWM` of `pid`.
pub fn memory(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_memory(&status)
}

fn parse_memory(status: &str) -> Result<Memory> {
    let kib = |key: &str| -> Result<f64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .with_context(|| format!("no `{key}` in /proc status"))
    };
    Ok(Memory {
        rss_mib: kib("VmRSS:")? / 1024.0,
        peak_rss_mib: kib("VmHWM:")? / 1024.0,
    })
}

/// Pins every thread of `pid` to `cpus` (a list like `1` or `0-1`); threads started later
/// inherit the pinning of the thread that starts them.
pub fn pin(pid: u32, cpus: &str) -> Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running taskset (util-linux)")?;
    if !status.status.success() {
        bail!(
            "taskset -a -p -c {cpus} {pid} failed: {}",
            String::from_utf8_lossy(&status.stderr).trim()
        );
    }
    Ok(())
}

/// The distinct `Cpus_allowed_list` values of `pid`'s threads (one value when pinned).
pub fn allowed_cpus(pid: u32) -> Result<Vec<String>> {
    let mut lists = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("status");
        // A thread may exit between listing and reading.
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        if let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            let list = list.trim().to_owned();
            if !lists.contains(&list) {
                lists.push(list);
            }
        }
    }
    lists.sort();
    Ok(lists)
}

/// Number of CPUs online (the machine's, not this process's affinity mask, which the
/// benchmark narrows to its own CPU).
pub fn cpu_count() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .map(|text| {
            text.lines()
                .filter(|l| l.starts_with("processor") && l.contains(':'))
                .count()
        })
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
}

/// The 1-, 5- and 15-minute load averages (`/proc/loadavg`), if readable.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut parts = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([parts.next()??, parts.next()??, parts.next()??])
}

/// The CPU model from `/proc/cpuinfo`, if readable.
pub fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_ticks_after_the_command_name() {
        let line =
            "4242 (envoy (main) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_cpu_ticks(line).unwrap(), 325);
        assert!(parse_cpu_ticks("garbage").is_err());
        assert!(parse_cpu_ticks("1 (x) S 1").is_err());
    }

    #[test]
    fn parses_memory() {
        let status = "Name:\tenvoy\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
        let m = parse_memory(status).unwrap();
        assert_eq!(m.rss_mib, 100.0);
        assert_eq!(m.peak_rss_mib, 200.0);
        assert!(parse_memory("Name: x\n").is_err());
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(memory(pid).unwrap().peak_rss_mib > 0.0);
        assert!(!allowed_cpus(pid).unwrap().is_empty());
    }
}
