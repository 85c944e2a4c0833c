//! Breaker toward the policy server, one per worker VM.
//!
//! Per VM rather than in shared data: each worker decides from its own calls, with no
//! cross-thread compare-and-swap on the request path. The cost is that with N workers up to
//! N × `threshold` requests wait for the timeout before every worker has opened; a brownout
//! is still cut off within a handful of requests per worker.
//!
//! A probe holds a slot until its call is answered. A request can end without an answer
//! (its client reset the stream: the filter's context is gone and the answer goes nowhere),
//! so the filter releases the slot when such a request ends ([`Breaker::release_probe`]),
//! and every probe also has its own deadline: slots still held past it are taken as lost
//! and handed to new probes. Either alone keeps one cancelled probe from wedging the
//! worker; together they also cover an answer the host never delivers.

use std::time::{Duration, SystemTime};

use crate::config::BreakerConfig;

/// What the breaker lets a request do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Call the policy server normally.
    Call,
    /// Call it as a probe of a server that was failing.
    Probe,
    /// Do not call: apply the route's fail mode with reason `breaker_open`.
    Reject,
}

/// A change the caller should count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The breaker opened (threshold reached, or a probe failed).
    Opened,
    /// A probe succeeded: calls flow again.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: SystemTime,
    },
    HalfOpen {
        in_flight: u32,
        /// When the newest probe should have had its answer.
        deadline: SystemTime,
    },
}

/// The breaker state machine.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed { failures: 0 },
        }
    }

    /// Whether the breaker currently refuses calls (for `arbiter probe`-style reporting).
    pub fn is_open(&self, now: SystemTime) -> bool {
        matches!(self.state, State::Open { until } if now < until)
    }

    /// Decides whether a request may call the policy server at `now`; `bound` is how long
    /// its call may take (the route's timeout plus a grace), the probe's deadline.
    pub fn admit(&mut self, now: SystemTime, bound: Duration) -> Admit {
        if self.config.threshold == 0 {
            return Admit::Call;
        }
        let deadline = now.checked_add(bound).unwrap_or(now);
        match self.state {
            State::Closed { .. } => Admit::Call,
            State::Open { until } if now < until => Admit::Reject,
            State::Open { .. } => {
                self.state = State::HalfOpen {
                    in_flight: 1,
                    deadline,
                };
                Admit::Probe
            }
            State::HalfOpen {
                in_flight,
                deadline: previous,
            } if in_flight < self.config.probes => {
                self.state = State::HalfOpen {
                    in_flight: in_flight + 1,
                    deadline: deadline.max(previous),
                };
                Admit::Probe
            }
            // Every slot is held past its deadline: those answers are lost, start over.
            State::HalfOpen {
                deadline: previous, ..
            } if now >= previous => {
                self.state = State::HalfOpen {
                    in_flight: 1,
                    deadline,
                };
                Admit::Probe
            }
            State::HalfOpen { .. } => Admit::Reject,
        }
    }

    /// A probe's request ended without an answer (cancelled by its client): its slot is free.
    pub fn release_probe(&mut self) {
        if let State::HalfOpen {
            in_flight,
            deadline,
        } = self.state
        {
            self.state = State::HalfOpen {
                in_flight: in_flight.saturating_sub(1),
                deadline,
            };
        }
    }

    /// A call (or probe) got an answer from the server.
    pub fn on_success(&mut self) -> Option<Transition> {
        let was_half_open = matches!(self.state, State::HalfOpen { .. });
        if matches!(self.state, State::Open { .. }) {
            // A late answer to a call made before the breaker opened says nothing new.
            return None;
        }
        self.state = State::Closed { failures: 0 };
        was_half_open.then_some(Transition::Closed)
    }

    /// A call (or probe) got no decision (timeout, unreachable, error, bad response).
    pub fn on_failure(&mut self, now: SystemTime) -> Option<Transition> {
        if self.config.threshold == 0 {
            return None;
        }
        match self.state {
            State::Closed { failures } if failures + 1 >= self.config.threshold => {
                self.open(now);
                Some(Transition::Opened)
            }
            State::Closed { failures } => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
                None
            }
            State::HalfOpen { .. } => {
                self.open(now);
                Some(Transition::Opened)
            }
            State::Open { .. } => None,
        }
    }

    fn open(&mut self, now: SystemTime) {
        self.state = State::Open {
            until: now.checked_add(self.config.cooldown).unwrap_or(now),
        };
    }

    /// Remaining cool-down at `now`, when open.
    pub fn open_for(&self, now: SystemTime) -> Option<Duration> {
        match self.state {
            State::Open { until } => until.duration_since(now).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threshold: u32, probes: u32) -> BreakerConfig {
        BreakerConfig {
            threshold,
            cooldown: Duration::from_secs(1),
            probes,
        }
    }

    const BOUND: Duration = Duration::from_millis(300);

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let mut b = Breaker::new(cfg(3, 1));
        for _ in 0..2 {
            assert_eq!(b.admit(t(0), BOUND), Admit::Call);
            assert_eq!(b.on_failure(t(0)), None);
        }
        // A success in between resets the count.
        assert_eq!(b.on_success(), None);
        for _ in 0..2 {
            b.on_failure(t(0));
        }
        assert_eq!(b.on_failure(t(0)), Some(Transition::Opened));
        assert_eq!(b.admit(t(10), BOUND), Admit::Reject);
        assert!(b.is_open(t(10)));
        assert_eq!(b.open_for(t(10)), Some(Duration::from_millis(990)));
    }

    #[test]
    fn half_open_probes_then_closes_or_reopens() {
        let mut b = Breaker::new(cfg(1, 2));
        assert_eq!(b.on_failure(t(0)), Some(Transition::Opened));
        assert_eq!(b.admit(t(999), BOUND), Admit::Reject);
        assert_eq!(b.admit(t(1000), BOUND), Admit::Probe);
        assert_eq!(b.admit(t(1000), BOUND), Admit::Probe);
        assert_eq!(
            b.admit(t(1000), BOUND),
            Admit::Reject,
            "only `probes` calls at once"
        );
        assert_eq!(b.on_failure(t(1100)), Some(Transition::Opened));
        assert_eq!(b.admit(t(1500), BOUND), Admit::Reject);
        assert_eq!(b.admit(t(2100), BOUND), Admit::Probe);
        assert_eq!(b.on_success(), Some(Transition::Closed));
        assert_eq!(b.admit(t(2100), BOUND), Admit::Call);
    }

    #[test]
    fn a_cancelled_probe_frees_its_slot() {
        let mut b = Breaker::new(cfg(1, 1));
        b.on_failure(t(0));
        assert_eq!(b.admit(t(1000), BOUND), Admit::Probe);
        assert_eq!(b.admit(t(1001), BOUND), Admit::Reject);
        // The probe's client went away: no answer will ever come for it.
        b.release_probe();
        assert_eq!(b.admit(t(1002), BOUND), Admit::Probe);
        assert_eq!(b.on_success(), Some(Transition::Closed));
        assert_eq!(b.admit(t(1003), BOUND), Admit::Call);
        // Releasing outside half-open changes nothing.
        b.release_probe();
        assert_eq!(b.admit(t(1004), BOUND), Admit::Call);
    }

    #[test]
    fn a_probe_whose_answer_never_comes_is_replaced_after_its_deadline() {
        let mut b = Breaker::new(cfg(1, 1));
        b.on_failure(t(0));
        assert_eq!(b.admit(t(1000), BOUND), Admit::Probe);
        assert_eq!(b.admit(t(1299), BOUND), Admit::Reject);
        assert_eq!(
            b.admit(t(1300), BOUND),
            Admit::Probe,
            "slot lost at its deadline"
        );
        assert_eq!(b.admit(t(1301), BOUND), Admit::Reject);
        assert_eq!(b.on_success(), Some(Transition::Closed));
    }

    #[test]
    fn probe_deadline_follows_the_newest_probe() {
        let mut b = Breaker::new(cfg(1, 2));
        b.on_failure(t(0));
        assert_eq!(b.admit(t(1000), BOUND), Admit::Probe);
        assert_eq!(b.admit(t(1200), BOUND), Admit::Probe);
        assert_eq!(
            b.admit(t(1400), BOUND),
            Admit::Reject,
            "second probe due at 1500"
        );
        assert_eq!(b.admit(t(1500), BOUND), Admit::Probe);
    }

    #[test]
    fn far_times_do_not_overflow() {
        let mut b = Breaker::new(BreakerConfig {
            threshold: 1,
            cooldown: Duration::MAX,
            probes: 1,
        });
        assert_eq!(b.on_failure(t(0)), Some(Transition::Opened));
        assert_eq!(b.admit(t(5), Duration::MAX), Admit::Probe);
    }

    #[test]
    fn late_success_does_not_close_an_open_breaker() {
        let mut b = Breaker::new(cfg(1, 1));
        b.on_failure(t(0));
        assert_eq!(b.on_success(), None);
        assert_eq!(b.admit(t(1), BOUND), Admit::Reject);
    }

    #[test]
    fn threshold_zero_disables() {
        let mut b = Breaker::new(cfg(0, 1));
        for _ in 0..100 {
            assert_eq!(b.on_failure(t(0)), None);
        }
        assert_eq!(b.admit(t(0), BOUND), Admit::Call);
    }
}
