//! Load generation, the same for HTTP (through Envoy) and gRPC (straight to the server).
//!
//! **Open loop** ([`open_loop`]): request *i* is due at `t0 + i / rate`, whatever happened to
//! the requests before it. A pacing thread sleeps until each due time and hands the request
//! to the tokio runtime; its latency is measured from the **due time**, not from when it was
//! actually sent, so a stall on the server (or in the generator) shows up in the percentiles
//! instead of silently slowing the schedule down (no coordinated omission). How late the
//! generator itself was is reported as `send_lag`, so its error is visible.
//!
//! **Closed loop** ([`closed_loop`]): `concurrency` workers each send the next request as soon
//! as the previous one is answered; the answered count over the wall time is the maximum rate.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::latency::{percentile, Summary};

/// One request: `Ok` when answered as expected, else why not.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Something the generator can send requests to.
pub trait Target: Send + Sync + 'static {
    /// Sends one request and checks its answer.
    fn call(&self) -> CallFuture;
}

/// Open-loop settings.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    /// Requests per second.
    pub rate: f64,
    /// How long to send for.
    pub duration: Duration,
    /// A request not answered within this counts as an error.
    pub timeout: Duration,
    /// Requests in flight beyond this are not sent and count as errors (the system under
    /// test has fallen far behind; without a bound the generator would drown its own CPU).
    pub max_in_flight: usize,
}

/// How late the pacing was, from due time to the request's task starting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SendLag {
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Worst, µs.
    pub max_us: f64,
}

/// The outcome of one measured run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Latency percentiles, counts and rate.
    pub summary: Summary,
    /// Generator lateness (open loop only).
    pub send_lag: Option<SendLag>,
    /// The first error seen, for diagnosis.
    pub first_error: Option<String>,
    /// Wall time of the run, s.
    pub wall_s: f64,
}

#[derive(Default)]
struct Recorder {
    latencies: Mutex<Vec<u32>>,
    lags: Mutex<Vec<u32>>,
    errors: AtomicU64,
    in_flight: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

impl Recorder {
    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(message);
        }
    }

    fn push(vec: &Mutex<Vec<u32>>, value: u32) {
        vec.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(value);
    }

    fn take(vec: &Mutex<Vec<u32>>) -> Vec<u32> {
        std::mem::take(&mut *vec.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Sends `config.rate` requests per second for `config.duration`; see the module docs.
pub async fn open_loop(target: Arc<dyn Target>, config: &OpenLoop) -> RunResult {
    let rate = config.rate.max(0.001);
    let count = (rate * config.duration.as_secs_f64()).round().max(1.0) as u64;
    let period_ns = 1e9 / rate;
    let recorder = Arc::new(Recorder::default());
    let handle = Handle::current();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let pacer = {
        let recorder = Arc::clone(&recorder);
        let timeout = config.timeout;
        let max_in_flight = config.max_in_flight;
        // A plain thread, not a tokio timer: tokio's timer wheel ticks in whole
        // milliseconds, which at 1,000 rps would be as large as the latencies measured.
        std::thread::spawn(move || {
            let t0 = Instant::now() + Duration::from_millis(1);
            let _ = started_tx.send(t0);
            for i in 0..count {
                let due = t0 + Duration::from_nanos((i as f64 * period_ns) as u64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if recorder.in_flight.load(Ordering::Relaxed) >= max_in_flight {
                    recorder.error(format!("more than {max_in_flight} requests in flight"));
                    continue;
                }
                recorder.in_flight.fetch_add(1, Ordering::Relaxed);
                let target = Arc::clone(&target);
                let recorder = Arc::clone(&recorder);
                handle.spawn(async move {
                    let started = Instant::now();
                    let result = tokio::time::timeout(timeout, target.call()).await;
                    let done = Instant::now();
                    match result {
                        Ok(Ok(())) => {
                            Recorder::push(&recorder.latencies, micros(done - due));
                            Recorder::push(&recorder.lags, micros(started - due));
                        }
                        Ok(Err(e)) => recorder.error(e),
                        Err(_) => recorder.error(format!("no answer within {timeout:?}")),
                    }
                    recorder.in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        })
    };
    let t0 = started_rx.await.unwrap_or_else(|_| Instant::now());
    // The pacer only sleeps; wait for it without blocking the runtime.
    let pacer_done = tokio::task::spawn_blocking(move || pacer.join().is_ok()).await;
    if !matches!(pacer_done, Ok(true)) {
        recorder.error("the pacing thread failed".to_owned());
    }
    let drain_deadline = Instant::now() + config.timeout + Duration::from_secs(1);
    while recorder.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let wall = t0.elapsed();
    let mut lags = Recorder::take(&recorder.lags);
    lags.sort_unstable();
    let send_lag = SendLag {
        p50_us: percentile(&lags, 50.0) * 1000.0,
        p99_us: percentile(&lags, 99.0) * 1000.0,
        max_us: lags.last().map_or(0.0, |&v| f64::from(v)),
    };
    let errors =
        recorder.errors.load(Ordering::Relaxed) + recorder.in_flight.load(Ordering::Relaxed) as u64;
    // The rate over the scheduled span: the generator offered `rate`, this is how much of
    // it was answered.
    let summary = Summary::from_micros(
        Recorder::take(&recorder.latencies),
        errors,
        config.duration.as_secs_f64(),
    );
    let first_error = recorder
        .first_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    RunResult {
        summary,
        send_lag: Some(send_lag),
        first_error,
        wall_s: wall.as_secs_f64(),
    }
}

/// `concurrency` workers send back to back for `duration`; see the module docs.
pub async fn closed_loop(
    target: Arc<dyn Target>,
    concurrency: usize,
    duration: Duration,
    timeout: Duration,
) -> RunResult {
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let target = Arc::clone(&target);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            while Instant::now() < deadline {
                let sent = Instant::now();
                match tokio::time::timeout(timeout, target.call()).await {
                    Ok(Ok(())) => latencies.push(micros(sent.elapsed())),
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("no answer within {timeout:?}"));
                    }
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for worker in workers {
        match worker.await {
            Ok((l, e, f)) => {
                latencies.extend(l);
                errors += e;
                if first_error.is_none() {
                    first_error = f;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("load worker failed: {e}"));
            }
        }
    }
    let wall = start.elapsed().as_secs_f64();
    RunResult {
        summary: Summary::from_micros(latencies, errors, wall),
        send_lag: None,
        first_error,
        wall_s: wall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers after a fixed delay, or fails every `fail_every`-th call.
    struct Fake {
        delay: Duration,
        calls: AtomicU64,
        fail_every: u64,
    }

    impl Target for Fake {
        fn call(&self) -> CallFuture {
            let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
            let delay = self.delay;
            let fail = self.fail_every > 0 && n.is_multiple_of(self.fail_every);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if fail {
                    Err("fake failure".to_owned())
                } else {
                    Ok(())
                }
            })
        }
    }

    // Counts only, no timing assertions: the test proves the bookkeeping, not the speed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_sends_the_scheduled_count_and_counts_errors() {
        let fake = Arc::new(Fake {
            delay: Duration::from_millis(1),
            calls: AtomicU64::new(0),
            fail_every: 10,
        });
        let config = OpenLoop {
            rate: 200.0,
            duration: Duration::from_millis(250),
            timeout: Duration::from_secs(5),
            max_in_flight: 1000,
        };
        let result = open_loop(fake.clone(), &config).await;
        assert_eq!(fake.calls.load(Ordering::Relaxed), 50);
        assert_eq!(result.summary.ok, 45);
        assert_eq!(result.summary.errors, 5);
        assert_eq!(result.first_error.as_deref(), Some("fake failure"));
        assert!(result.send_lag.is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_counts_timeouts_and_overload_as_errors() {
        let fake = Arc::new(Fake {
            delay: Duration::from_secs(60),
            calls: AtomicU64::new(0),
            fail_every: 0,
        });
        let config = OpenLoop {
            rate: 100.0,
            duration: Duration::from_millis(100),
            timeout: Duration::from_millis(50),
            max_in_flight: 2,
        };
        let result = open_loop(fake, &config).await;
        assert_eq!(result.summary.ok, 0);
        assert_eq!(result.summary.errors, 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_counts_every_answer() {
        let fake = Arc::new(Fake {
            delay: Duration::from_millis(2),
            calls: AtomicU64::new(0),
            fail_every: 0,
        });
        let result = closed_loop(
            fake.clone(),
            4,
            Duration::from_millis(100),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            result.summary.ok,
            fake.calls.load(Ordering::Relaxed),
            "every call finished inside the run is counted"
        );
        assert!(result.summary.ok > 0);
        assert_eq!(result.summary.errors, 0);
    }
}
