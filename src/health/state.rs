//! One backend's health as a small state machine fed by observations.
//!
//! An observation is one result of an active probe (`probe.rs`). The
//! machine starts `unknown`; the first result decides (so XLB is ready
//! quickly), after that `rise` successes in a row make a backend healthy
//! and `fall` failures in a row make it unhealthy. The passive detector
//! (`passive.rs`) keeps its own counts and, when they say so, sets the state
//! directly ([`BackendHealth::set`]); the probes' runs then start over.

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No result yet.
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// One result about a backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub ok: bool,
    /// What was seen, for logs and status: `connect ok`, `connect refused`,
    /// `status 500`, `timeout after 500 ms`, ...
    pub detail: String,
    /// How long the check took.
    pub latency: Duration,
}

/// How many results in a row change the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
}

/// A change of state, with what caused it: `count` results in a row of
/// the `of` needed.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub to: Health,
    pub detail: String,
    pub count: u32,
    pub of: u32,
}

impl Transition {
    /// The log line's text after `backend <name> <ip> `:
    /// `unhealthy: connect refused (3/3)`.
    pub fn describe(&self) -> String {
        format!("{}: {} ({}/{})", self.to.as_str(), self.detail, self.count, self.of)
    }
}

/// A backend's health and its last result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendHealth {
    pub state: Health,
    successes: u32,
    failures: u32,
    pub last_result: Option<String>,
    /// When the state last changed (unix ms).
    pub last_change_unix_ms: Option<u64>,
    /// How long the last check took.
    pub latency: Option<Duration>,
}

impl BackendHealth {
    /// A backend nobody probes (passive checks only): eligible until the
    /// data path says otherwise.
    pub fn assumed_healthy() -> Self {
        BackendHealth { state: Health::Healthy, ..Default::default() }
    }

    /// A verdict of another source (the passive detector): `count` of `of`
    /// events caused it. The probes' runs start over, so an unhealthy
    /// backend needs `rise` passing probes to come back.
    pub fn set(
        &mut self,
        to: Health,
        detail: String,
        count: u32,
        of: u32,
        now_unix_ms: u64,
    ) -> Option<Transition> {
        self.successes = 0;
        self.failures = 0;
        if self.state == to {
            return None;
        }
        self.state = to;
        self.last_result = Some(detail.clone());
        self.last_change_unix_ms = Some(now_unix_ms);
        Some(Transition { to, detail, count, of })
    }

    /// Folds in one result; returns the transition it caused, if any.
    pub fn observe(&mut self, o: &Observation, t: Thresholds, now_unix_ms: u64) -> Option<Transition> {
        self.last_result = Some(o.detail.clone());
        self.latency = Some(o.latency);
        if o.ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let (to, count, of) = match self.state {
            // The first result decides.
            Health::Unknown if o.ok => (Health::Healthy, self.successes, t.rise),
            Health::Unknown => (Health::Unhealthy, self.failures, t.fall),
            Health::Healthy if !o.ok && self.failures >= t.fall => (Health::Unhealthy, self.failures, t.fall),
            Health::Unhealthy if o.ok && self.successes >= t.rise => {
                (Health::Healthy, self.successes, t.rise)
            }
            _ => return None,
        };
        self.state = to;
        self.last_change_unix_ms = Some(now_unix_ms);
        Some(Transition { to, detail: o.detail.clone(), count, of })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { rise: 2, fall: 3 };

    fn ok() -> Observation {
        Observation { ok: true, detail: "connect ok".into(), latency: Duration::from_millis(1) }
    }

    fn refused() -> Observation {
        Observation { ok: false, detail: "connect refused".into(), latency: Duration::from_millis(1) }
    }

    /// The states after each observation.
    fn run(h: &mut BackendHealth, seq: &[Observation]) -> Vec<Health> {
        seq.iter()
            .map(|o| {
                h.observe(o, T, 7);
                h.state
            })
            .collect()
    }

    #[test]
    fn the_first_result_decides() {
        let mut h = BackendHealth::default();
        assert_eq!(h.state, Health::Unknown);
        let t = h.observe(&ok(), T, 5).expect("a transition");
        assert_eq!((t.to, t.count, t.of), (Health::Healthy, 1, 2));
        assert_eq!(h.last_change_unix_ms, Some(5));
        let mut h = BackendHealth::default();
        let t = h.observe(&refused(), T, 5).expect("a transition");
        assert_eq!(t.describe(), "unhealthy: connect refused (1/3)");
    }

    #[test]
    fn fall_failures_in_a_row_then_rise_successes_in_a_row() {
        use Health::{Healthy as H, Unhealthy as U};
        let mut h = BackendHealth::default();
        let seq =
            [ok(), refused(), refused(), ok(), refused(), refused(), refused(), ok(), refused(), ok(), ok()];
        assert_eq!(run(&mut h, &seq), [H, H, H, H, H, H, U, U, U, U, H]);
        assert_eq!(h.last_result.as_deref(), Some("connect ok"));
    }

    #[test]
    fn a_passive_verdict_restarts_the_probes_runs() {
        let mut h = BackendHealth::default();
        for _ in 0..5 {
            h.observe(&ok(), T, 1);
        }
        let t = h.set(Health::Unhealthy, "passive: no SYN-ACK".into(), 5, 5, 3).expect("a transition");
        assert_eq!(t.describe(), "unhealthy: passive: no SYN-ACK (5/5)");
        assert_eq!((h.last_result.as_deref(), h.last_change_unix_ms), (Some("passive: no SYN-ACK"), Some(3)));
        assert_eq!(h.set(Health::Unhealthy, "again".into(), 5, 5, 4), None, "no change, no transition");
        assert_eq!(h.observe(&ok(), T, 5), None, "one success of rise 2");
        assert_eq!(h.observe(&ok(), T, 6).map(|t| t.to), Some(Health::Healthy));
    }

    #[test]
    fn each_transition_is_reported_once_with_its_count() {
        let mut h = BackendHealth::default();
        h.observe(&ok(), T, 1);
        let got: Vec<Option<String>> = [refused(), refused(), refused(), refused(), ok(), ok(), ok()]
            .iter()
            .map(|o| h.observe(o, T, 2).map(|t| t.describe()))
            .collect();
        assert_eq!(
            got,
            [
                None,
                None,
                Some("unhealthy: connect refused (3/3)".into()),
                None,
                None,
                Some("healthy: connect ok (2/2)".into()),
                None
            ]
        );
    }
}
