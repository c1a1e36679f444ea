//! Passive health checking: what the data path saw of real connections'
//! handshakes, once per sweep, judged against `passive_health`.
//!
//! A failure is a SYN the backend left unanswered past `syn_timeout_ms`, or
//! (with `rst_on_syn`) one it refused with a RST. The data path reports
//! counts per sweep, not sequences, so "in a row" is judged by sweeps: a
//! sweep in which the backend answered any SYN ends the run (its failures
//! do not count: a busy backend losing the odd SYN stays in), and failures
//! of sweeps without an answer add up. `fall` of them mark the backend
//! unhealthy. Active checks (`rise` passing probes) or, without them,
//! `interval_ms x rise` without a new failure clear it, but only once the
//! sweeps have reported every SYN sent before the verdict, so a late report
//! of those cannot take the backend out again.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::PassiveHealth;

/// What one sweep learnt about a backend's handshakes since the last one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandshakeNews {
    /// SYNs answered with a SYN-ACK.
    pub answered: u64,
    /// SYNs answered with a RST.
    pub refused: u64,
    /// SYNs with no answer within syn_timeout_ms.
    pub timed_out: u64,
}

/// One sweep's news.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandshakeReport {
    /// The creation times (CLOCK_MONOTONIC ns, as the data path stamps
    /// connections) of the SYNs whose timeouts it counts: (after, upto].
    /// Successive reports adjoin.
    pub created: (u64, u64),
    /// By backend address; backends with nothing new are left out.
    pub backends: HashMap<Ipv4Addr, HandshakeNews>,
}

/// The detector's settings.
#[derive(Debug, Clone, Copy)]
pub struct Passive {
    pub syn_timeout: Duration,
    pub rst_on_syn: bool,
    pub fall: u32,
    /// Without active checks: how long without a failure clears a verdict
    /// (interval_ms x rise).
    pub clear_after: Option<Duration>,
}

impl Passive {
    pub fn new(p: &PassiveHealth, clear_after: Option<Duration>) -> Self {
        Passive {
            syn_timeout: Duration::from_millis(p.syn_timeout_ms),
            rst_on_syn: p.rst_on_syn,
            fall: p.fall,
            clear_after,
        }
    }
}

/// One backend's run of failures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    pub failures: u32,
    pub last_failure: Option<Instant>,
    /// When (CLOCK_MONOTONIC ns) the backend's health last changed: SYNs
    /// created before that were judged already.
    pub since_ns: u64,
    /// When the sweeps had reported every SYN created before `since_ns`:
    /// from then on, silence is known to be silence.
    pub covered_at: Option<Instant>,
}

impl Run {
    /// Folds in one sweep's news, whose timeouts are of SYNs created up to
    /// `created_upto`; returns the failure that completed a run of `fall`
    /// (its description), after which the run starts over.
    pub fn observe(
        &mut self,
        news: &HandshakeNews,
        created_upto: u64,
        p: &Passive,
        now: Instant,
    ) -> Option<String> {
        let refused = if p.rst_on_syn { news.refused } else { 0 };
        // Timeouts of SYNs sent before the last change of health are old news.
        let timed_out = if created_upto <= self.since_ns { 0 } else { news.timed_out };
        if news.answered > 0 {
            self.failures = 0;
            return None;
        }
        let failures = timed_out + refused;
        if failures == 0 {
            return None;
        }
        self.failures = self.failures.saturating_add(u32::try_from(failures).unwrap_or(u32::MAX));
        self.last_failure = Some(now);
        if self.failures < p.fall {
            return None;
        }
        let ms = p.syn_timeout.as_millis();
        Some(match (timed_out, refused) {
            (0, _) => "passive: SYN refused with a RST".to_string(),
            (_, 0) => format!("passive: no SYN-ACK within {ms} ms"),
            _ => format!("passive: SYNs refused and unanswered within {ms} ms"),
        })
    }

    /// The backend's health changed at `at_ns`: the run starts over.
    pub fn changed(&mut self, at_ns: u64) {
        self.failures = 0;
        self.since_ns = at_ns;
        self.covered_at = None;
    }

    /// A report came whose creation range starts at `covered_from`: every
    /// SYN created before that has been reported.
    pub fn covered(&mut self, covered_from: u64, now: Instant) {
        if self.covered_at.is_none() && covered_from >= self.since_ns {
            self.covered_at = Some(now);
        }
    }

    /// Whether a verdict may be cleared by time: `after` without a failure,
    /// counted from when the sweeps had reported every SYN sent before the
    /// verdict (until then, silence may only be a report still to come).
    pub fn quiet_for(&self, after: Duration, now: Instant) -> bool {
        self.covered_at.is_some_and(|c| {
            let from = self.last_failure.map_or(c, |f| f.max(c));
            now.saturating_duration_since(from) >= after
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Passive =
        Passive { syn_timeout: Duration::from_millis(1000), rst_on_syn: true, fall: 5, clear_after: None };

    fn news(answered: u64, refused: u64, timed_out: u64) -> HandshakeNews {
        HandshakeNews { answered, refused, timed_out }
    }

    #[test]
    fn fall_failures_without_an_answer_in_between_make_a_verdict() {
        let now = Instant::now();
        let mut r = Run::default();
        assert_eq!(r.observe(&news(0, 0, 2), 10, &P, now), None);
        assert_eq!(r.observe(&news(0, 0, 2), 10, &P, now), None);
        assert_eq!(
            r.observe(&news(0, 0, 1), 10, &P, now).as_deref(),
            Some("passive: no SYN-ACK within 1000 ms")
        );
        // A sweep with answers ends the run, its own failures included: the
        // odd lost SYN of a busy backend does not take it out.
        let mut r = Run::default();
        assert_eq!(r.observe(&news(0, 0, 4), 10, &P, now), None);
        assert_eq!(r.observe(&news(100_000, 0, 5), 10, &P, now), None);
        assert_eq!(r.failures, 0);
        assert_eq!(
            r.observe(&news(0, 5, 0), 10, &P, now).as_deref(),
            Some("passive: SYN refused with a RST")
        );
        let mut r = Run::default();
        assert!(r.observe(&news(0, 2, 3), 10, &P, now).unwrap().contains("refused and unanswered"));
    }

    #[test]
    fn timeouts_of_syns_sent_before_the_last_change_are_old_news() {
        let now = Instant::now();
        let mut r = Run::default();
        r.changed(1_000);
        assert_eq!(r.observe(&news(0, 0, 9), 1_000, &P, now), None, "created up to the change");
        assert_eq!((r.failures, r.last_failure), (0, None));
        assert!(r.observe(&news(0, 0, 9), 1_001, &P, now).is_some(), "straddling: counted");
    }

    #[test]
    fn refusals_count_only_with_rst_on_syn() {
        let p = Passive { rst_on_syn: false, ..P };
        let mut r = Run::default();
        assert_eq!(r.observe(&news(0, 100, 0), 10, &p, Instant::now()), None);
        assert_eq!((r.failures, r.last_failure), (0, None));
    }

    #[test]
    fn quiet_counts_once_the_sweeps_caught_up_and_from_the_last_failure() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let two = Duration::from_secs(2);
        let mut r = Run::default();
        r.observe(&news(0, 0, 1), 10, &P, t0);
        r.changed(500);
        r.covered(499, t0 + ms(500));
        assert!(!r.quiet_for(two, t0 + ms(5000)), "SYNs from before the verdict not yet reported");
        r.covered(500, t0 + ms(1000));
        assert!(!r.quiet_for(two, t0 + ms(2999)), "silence counts from the report that covered the verdict");
        assert!(r.quiet_for(two, t0 + ms(3000)));
        // A failure after that starts the silence over.
        r.observe(&news(0, 0, 1), 600, &P, t0 + ms(3500));
        assert!(!r.quiet_for(two, t0 + ms(5000)));
        assert!(r.quiet_for(two, t0 + ms(5500)));
        // A change of health forgets the coverage.
        r.changed(900);
        assert!(!r.quiet_for(two, t0 + ms(60_000)));
    }
}
