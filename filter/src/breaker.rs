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
//!
//! The cool-down backs off, like Envoy's outlier detection (`base_ejection_time` times the
//! consecutive ejections, capped by `max_ejection_time`): the first opening lasts
//! `cooldown`, each probe that fails doubles it up to `cooldown_max`, and a probe that gets
//! an answer closes the breaker and forgets the doubling. A blip costs one short cool-down
//! (an `open` route unchecked, a `closed` one refusing, only that long after the server is
//! back); a server that stays down is probed less and less often, never less than once per
//! `cooldown_max`. No jitter: each worker sends at most `probes` calls per cool-down, too few
//! to synchronise into a load spike, and a fixed schedule keeps recovery predictable.

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
    /// The breaker opened: `threshold` consecutive calls got no decision.
    Opened,
    /// A probe got no decision: the breaker opened again, for a longer cool-down. Counted
    /// apart from [`Transition::Opened`], so openings minus closings is the number of
    /// breakers open (or probing) right now.
    Reopened,
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
        /// Probes that failed since the breaker last closed (the cool-down doubles with each).
        reopened: u32,
    },
    HalfOpen {
        in_flight: u32,
        /// When the newest probe should have had its answer.
        deadline: SystemTime,
        reopened: u32,
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
        matches!(self.state, State::Open { until, .. } if now < until)
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
            State::Open { until, .. } if now < until => Admit::Reject,
            State::Open { reopened, .. } => {
                self.state = State::HalfOpen {
                    in_flight: 1,
                    deadline,
                    reopened,
                };
                Admit::Probe
            }
            State::HalfOpen {
                in_flight,
                deadline: previous,
                reopened,
            } if in_flight < self.config.probes => {
                self.state = State::HalfOpen {
                    in_flight: in_flight + 1,
                    deadline: deadline.max(previous),
                    reopened,
                };
                Admit::Probe
            }
            // Every slot is held past its deadline: those answers are lost, start over. A
            // lost answer is not a failed probe: the cool-down does not grow.
            State::HalfOpen {
                deadline: previous,
                reopened,
                ..
            } if now >= previous => {
                self.state = State::HalfOpen {
                    in_flight: 1,
                    deadline,
                    reopened,
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
            reopened,
        } = self.state
        {
            self.state = State::HalfOpen {
                in_flight: in_flight.saturating_sub(1),
                deadline,
                reopened,
            };
        }
    }

    /// A call (or probe) got an answer from the server. A probe's answer closes the breaker,
    /// and the next opening gets the first, short cool-down again.
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
            State::Closed { failures } if failures.saturating_add(1) >= self.config.threshold => {
                self.open(now, 0);
                Some(Transition::Opened)
            }
            State::Closed { failures } => {
                self.state = State::Closed {
                    failures: failures + 1,
                };
                None
            }
            State::HalfOpen { reopened, .. } => {
                self.open(now, reopened.saturating_add(1));
                Some(Transition::Reopened)
            }
            State::Open { .. } => None,
        }
    }

    fn open(&mut self, now: SystemTime, reopened: u32) {
        self.state = State::Open {
            until: now.checked_add(self.cooldown(reopened)).unwrap_or(now),
            reopened,
        };
    }

    /// The cool-down after `reopened` failed probes: `cooldown` doubled that many times, at
    /// most `cooldown_max` (and never shorter than `cooldown`, whatever the two say).
    fn cooldown(&self, reopened: u32) -> Duration {
        let first = self.config.cooldown;
        let doubled = 1u32
            .checked_shl(reopened)
            .and_then(|factor| first.checked_mul(factor))
            .unwrap_or(Duration::MAX);
        doubled.min(self.config.cooldown_max.max(first))
    }

    /// Remaining cool-down at `now`, when open.
    pub fn open_for(&self, now: SystemTime) -> Option<Duration> {
        match self.state {
            State::Open { until, .. } => until.duration_since(now).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A breaker whose cool-down stays at one second (no backoff).
    fn cfg(threshold: u32, probes: u32) -> BreakerConfig {
        BreakerConfig {
            threshold,
            cooldown: Duration::from_secs(1),
            cooldown_max: Duration::from_secs(1),
            probes,
        }
    }

    /// A breaker that backs off from 250 ms to at most 2 s.
    fn backoff(threshold: u32, probes: u32) -> BreakerConfig {
        BreakerConfig {
            threshold,
            cooldown: Duration::from_millis(250),
            cooldown_max: Duration::from_secs(2),
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
        assert_eq!(b.on_failure(t(1100)), Some(Transition::Reopened));
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
            cooldown_max: Duration::MAX,
            probes: 1,
        });
        assert_eq!(b.on_failure(t(0)), Some(Transition::Opened));
        assert_eq!(b.admit(t(5), Duration::MAX), Admit::Probe);
        assert_eq!(b.on_failure(t(5)), Some(Transition::Reopened));
        // Doubling past what a `Duration` holds, many times over, stays bounded too.
        let mut b = Breaker::new(BreakerConfig {
            threshold: 1,
            cooldown: Duration::from_secs(u64::MAX / 2),
            cooldown_max: Duration::MAX,
            probes: 1,
        });
        b.on_failure(t(0));
        for _ in 0..40 {
            b.state = match b.state {
                State::Open { reopened, .. } => State::HalfOpen {
                    in_flight: 1,
                    deadline: t(0),
                    reopened,
                },
                other => other,
            };
            assert_eq!(b.on_failure(t(0)), Some(Transition::Reopened));
        }
        assert_eq!(b.cooldown(40), Duration::MAX);
        assert_eq!(b.cooldown(u32::MAX), Duration::MAX);
    }

    /// Admits the probe that follows the cool-down ending at `until`, and fails it at
    /// `failed_at`: the breaker opens again. Returns the new cool-down's end.
    fn fail_probe(b: &mut Breaker, until: u64, failed_at: u64) -> Option<Duration> {
        assert_eq!(
            b.admit(t(until - 1), BOUND),
            Admit::Reject,
            "open until {until}"
        );
        assert_eq!(b.admit(t(until), BOUND), Admit::Probe, "probe at {until}");
        assert_eq!(b.on_failure(t(failed_at)), Some(Transition::Reopened));
        b.open_for(t(failed_at))
    }

    #[test]
    fn each_failed_probe_doubles_the_cool_down_up_to_the_maximum() {
        let mut b = Breaker::new(backoff(2, 1));
        b.on_failure(t(0));
        assert_eq!(b.on_failure(t(0)), Some(Transition::Opened));
        // The first opening is short.
        assert_eq!(b.open_for(t(0)), Some(Duration::from_millis(250)));
        // Each probe that fails (here 100 ms after it went out) doubles it ...
        let ms = Duration::from_millis;
        assert_eq!(fail_probe(&mut b, 250, 350), Some(ms(500)));
        assert_eq!(fail_probe(&mut b, 850, 950), Some(ms(1000)));
        assert_eq!(fail_probe(&mut b, 1950, 2050), Some(ms(2000)));
        // ... up to the maximum, where it stays.
        assert_eq!(fail_probe(&mut b, 4050, 4150), Some(ms(2000)));
        assert_eq!(fail_probe(&mut b, 6150, 6250), Some(ms(2000)));
        // A probe answered: closed, and the doubling is forgotten.
        assert_eq!(b.admit(t(8250), BOUND), Admit::Probe);
        assert_eq!(b.on_success(), Some(Transition::Closed));
        assert_eq!(b.admit(t(8251), BOUND), Admit::Call);
        // The next opening is short again, and counts as an opening, not a re-opening.
        b.on_failure(t(9000));
        assert_eq!(b.on_failure(t(9000)), Some(Transition::Opened));
        assert_eq!(b.open_for(t(9000)), Some(ms(250)));
        assert_eq!(fail_probe(&mut b, 9250, 9300), Some(ms(500)));
    }

    #[test]
    fn lost_or_cancelled_probes_do_not_grow_the_cool_down() {
        let mut b = Breaker::new(backoff(1, 1));
        b.on_failure(t(0));
        assert_eq!(
            fail_probe(&mut b, 250, 300),
            Some(Duration::from_millis(500))
        );
        // The next probe's client goes away; the one after it never hears back and its
        // slot is handed on at its deadline. Neither is a failure of the server.
        assert_eq!(b.admit(t(800), BOUND), Admit::Probe);
        b.release_probe();
        assert_eq!(b.admit(t(801), BOUND), Admit::Probe);
        assert_eq!(
            b.admit(t(1101), BOUND),
            Admit::Probe,
            "slot lost at its deadline"
        );
        // The probe that does fail doubles from 500 ms, not from more.
        assert_eq!(b.on_failure(t(1200)), Some(Transition::Reopened));
        assert_eq!(b.open_for(t(1200)), Some(Duration::from_secs(1)));
    }

    #[test]
    fn a_late_answer_or_failure_while_open_changes_nothing() {
        let mut b = Breaker::new(backoff(1, 2));
        b.on_failure(t(0));
        assert_eq!(b.admit(t(250), BOUND), Admit::Probe);
        assert_eq!(b.admit(t(250), BOUND), Admit::Probe);
        assert_eq!(b.on_failure(t(300)), Some(Transition::Reopened));
        // The second probe's failure (or answer) arrives while open again: no second
        // doubling, no closing.
        assert_eq!(b.on_failure(t(310)), None);
        assert_eq!(b.on_success(), None);
        assert_eq!(b.open_for(t(300)), Some(Duration::from_millis(500)));
    }

    #[test]
    fn a_maximum_below_the_first_cool_down_keeps_the_first() {
        let mut b = Breaker::new(BreakerConfig {
            threshold: 1,
            cooldown: Duration::from_secs(1),
            cooldown_max: Duration::from_millis(10),
            probes: 1,
        });
        b.on_failure(t(0));
        assert_eq!(b.open_for(t(0)), Some(Duration::from_secs(1)));
        assert_eq!(fail_probe(&mut b, 1000, 1000), Some(Duration::from_secs(1)));
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
