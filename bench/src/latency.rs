//! Latency samples and their summary (percentiles by nearest rank, in milliseconds).

use serde::{Deserialize, Serialize};

/// Percentiles and counts of one measured run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Requests answered as expected (they make up the percentiles).
    pub ok: u64,
    /// Requests that failed, timed out, got an unexpected answer or could not be sent.
    pub errors: u64,
    /// Answered requests per second of wall time.
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Slowest request, ms.
    pub max_ms: f64,
    /// Mean latency, ms.
    pub mean_ms: f64,
}

impl Summary {
    /// Summarises latencies in microseconds (`ok` = their count) over `wall_s` seconds.
    pub fn from_micros(mut micros: Vec<u32>, errors: u64, wall_s: f64) -> Summary {
        micros.sort_unstable();
        let ok = micros.len() as u64;
        let mean = if micros.is_empty() {
            0.0
        } else {
            micros.iter().map(|&v| f64::from(v)).sum::<f64>() / micros.len() as f64 / 1000.0
        };
        Summary {
            ok,
            errors,
            rps: if wall_s > 0.0 {
                ok as f64 / wall_s
            } else {
                0.0
            },
            p50_ms: percentile(&micros, 50.0),
            p90_ms: percentile(&micros, 90.0),
            p99_ms: percentile(&micros, 99.0),
            p999_ms: percentile(&micros, 99.9),
            max_ms: micros.last().map_or(0.0, |&v| f64::from(v) / 1000.0),
            mean_ms: mean,
        }
    }

    /// The latency at percentile `p` (one of 50, 90, 99, 99.9).
    pub fn at(&self, p: Percentile) -> f64 {
        match p {
            Percentile::P50 => self.p50_ms,
            Percentile::P90 => self.p90_ms,
            Percentile::P99 => self.p99_ms,
            Percentile::P999 => self.p999_ms,
        }
    }

    /// Per field, the median over `runs` (each percentile on its own, as the method says).
    pub fn median_of(runs: &[Summary]) -> Summary {
        let pick = |f: fn(&Summary) -> f64| median(runs.iter().map(f).collect());
        Summary {
            ok: median(runs.iter().map(|r| r.ok as f64).collect()).round() as u64,
            errors: median(runs.iter().map(|r| r.errors as f64).collect()).round() as u64,
            rps: pick(|r| r.rps),
            p50_ms: pick(|r| r.p50_ms),
            p90_ms: pick(|r| r.p90_ms),
            p99_ms: pick(|r| r.p99_ms),
            p999_ms: pick(|r| r.p999_ms),
            max_ms: pick(|r| r.max_ms),
            mean_ms: pick(|r| r.mean_ms),
        }
    }
}

/// The reported percentiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Percentile {
    /// 50th.
    P50,
    /// 90th.
    P90,
    /// 99th.
    P99,
    /// 99.9th.
    P999,
}

impl Percentile {
    /// All of them, in order.
    pub const ALL: [Percentile; 4] = [
        Percentile::P50,
        Percentile::P90,
        Percentile::P99,
        Percentile::P999,
    ];

    /// `p50`, `p90`, `p99`, `p99.9`.
    pub fn label(self) -> &'static str {
        match self {
            Percentile::P50 => "p50",
            Percentile::P90 => "p90",
            Percentile::P99 => "p99",
            Percentile::P999 => "p99.9",
        }
    }
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds (0 when empty).
pub fn percentile(sorted_micros: &[u32], p: f64) -> f64 {
    if sorted_micros.is_empty() {
        return 0.0;
    }
    let n = sorted_micros.len();
    // The epsilon keeps float error (0.999 * 1000 = 999.0000000000001) from moving the
    // rank up by one.
    let rank = ((p / 100.0) * n as f64 - 1e-9).ceil() as usize;
    let index = rank.clamp(1, n) - 1;
    f64::from(sorted_micros[index]) / 1000.0
}

/// Median of `values` (mean of the middle two for an even count; 0 when empty).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let micros: Vec<u32> = (1..=1000).map(|v| v * 1000).collect();
        let s = Summary::from_micros(micros, 2, 2.0);
        assert_eq!(s.ok, 1000);
        assert_eq!(s.errors, 2);
        assert_eq!(s.rps, 500.0);
        assert_eq!(s.p50_ms, 500.0);
        assert_eq!(s.p90_ms, 900.0);
        assert_eq!(s.p99_ms, 990.0);
        assert_eq!(s.p999_ms, 999.0);
        assert_eq!(s.max_ms, 1000.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7000], 99.9), 7.0);
    }

    #[test]
    fn medians_per_field() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
        let a = Summary {
            p50_ms: 1.0,
            p99_ms: 9.0,
            ..Summary::default()
        };
        let b = Summary {
            p50_ms: 3.0,
            p99_ms: 5.0,
            ..Summary::default()
        };
        let c = Summary {
            p50_ms: 2.0,
            p99_ms: 7.0,
            ..Summary::default()
        };
        let m = Summary::median_of(&[a, b, c]);
        assert_eq!((m.p50_ms, m.p99_ms), (2.0, 7.0));
    }
}
