//! Passive health checking: what the data path saw of real connections'
//! handshakes, once per sweep, judged against `passive_health`.
//!
//! A failure is a SYN the backend left unanswered past `syn_timeout_ms`, or
//! (with `rst_on_syn`) one it refused with a RST. Consecutive is judged per
//! sweep, as the data path reports counts, not sequences: a sweep in which
//! the backend answered some SYN starts the run over from that sweep's
//! failures, one without answers adds to it. `fall` failures in a run mark
//! the backend unhealthy; active checks (`rise` passing probes) or, without
//! them, `interval_ms x rise` without a new failure clear it.

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

/// One sweep's news, by backend address.
pub type HandshakeReport = HashMap<Ipv4Addr, HandshakeNews>;

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
}

impl Run {
    /// Folds in one sweep's news; returns the failure that completed a run of
    /// `fall` (its description), after which the run starts over.
    pub fn observe(&mut self, news: &HandshakeNews, p: &Passive, now: Instant) -> Option<String> {
        let refused = if p.rst_on_syn { news.refused } else { 0 };
        let failures = news.timed_out + refused;
        if news.answered > 0 {
            self.failures = 0;
        }
        if failures == 0 {
            return None;
        }
        self.failures = self.failures.saturating_add(u32::try_from(failures).unwrap_or(u32::MAX));
        self.last_failure = Some(now);
        if self.failures < p.fall {
            return None;
        }
        let ms = p.syn_timeout.as_millis();
        Some(match (news.timed_out, refused) {
            (0, _) => "passive: SYN refused with a RST".to_string(),
            (_, 0) => format!("passive: no SYN-ACK within {ms} ms"),
            _ => format!("passive: SYNs refused and unanswered within {ms} ms"),
        })
    }

    /// Whether a verdict may be cleared by time: no failure for `after`.
    pub fn quiet_for(&self, after: Duration, now: Instant) -> bool {
        self.last_failure.is_none_or(|t| now.saturating_duration_since(t) >= after)
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
        assert_eq!(r.observe(&news(0, 0, 2), &P, now), None);
        assert_eq!(r.observe(&news(0, 0, 2), &P, now), None);
        assert_eq!(r.observe(&news(0, 0, 1), &P, now).as_deref(), Some("passive: no SYN-ACK within 1000 ms"));
        // A sweep with answers starts the run over from its own failures.
        let mut r = Run::default();
        assert_eq!(r.observe(&news(0, 0, 4), &P, now), None);
        assert_eq!(r.observe(&news(9, 0, 1), &P, now), None);
        assert_eq!(r.failures, 1);
        assert_eq!(r.observe(&news(0, 4, 0), &P, now).as_deref(), Some("passive: SYN refused with a RST"));
        // Five in one sweep, answers or not.
        let mut r = Run::default();
        assert!(r.observe(&news(3, 2, 3), &P, now).unwrap().contains("refused and unanswered"));
    }

    #[test]
    fn refusals_count_only_with_rst_on_syn() {
        let p = Passive { rst_on_syn: false, ..P };
        let mut r = Run::default();
        assert_eq!(r.observe(&news(0, 100, 0), &p, Instant::now()), None);
        assert_eq!((r.failures, r.last_failure), (0, None));
    }

    #[test]
    fn quiet_counts_from_the_last_failure() {
        let t0 = Instant::now();
        let mut r = Run::default();
        assert!(r.quiet_for(Duration::from_secs(2), t0));
        r.observe(&news(0, 0, 1), &P, t0);
        assert!(!r.quiet_for(Duration::from_secs(2), t0 + Duration::from_millis(1999)));
        assert!(r.quiet_for(Duration::from_secs(2), t0 + Duration::from_secs(2)));
    }
}
