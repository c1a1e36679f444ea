//! Active health checks: a gate between the provider and the balancer.
//!
//! The provider says which backends exist (and, with Kubernetes, which are
//! ready); the gate passes on those whose checks pass. Each listed backend
//! has its own probe task (`probe.rs`), jittered, at most
//! [`MAX_CONCURRENT_PROBES`] probing at once, each bounded by timeout_ms;
//! results come back as observations to one loop that owns every
//! backend's state machine (`state.rs`), logs each transition once and
//! publishes the eligible set. Backends the provider adds are probed from
//! then on; removed ones stop being probed. Nothing here touches the data
//! plane or waits on the provider: the balancer reads the eligible set as
//! it reads a provider's.
//!
//! Passive checks (`passive.rs`) feed the same loop: once per sweep, what
//! the data path saw of each backend's handshakes. Without active checks
//! every listed backend starts healthy and only the passive detector takes
//! it out.
//!
//! Fail open: when no listed backend is healthy, all of them stay eligible
//! (a check that fails everywhere is more likely wrong than every backend
//! dead); the report says so, and readiness reports `no_healthy_backends`.

mod passive;
mod probe;
mod state;

pub use passive::{HandshakeNews, HandshakeReport, Passive};
pub use probe::Probe;
pub use state::{BackendHealth, Health, Observation, Thresholds, Transition};

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::HealthCheck;
use crate::provider::{unix_ms, Backend, TaskGuard};

/// Probes in flight at once, whatever the number of backends.
pub const MAX_CONCURRENT_PROBES: usize = 64;

/// The first probe of a backend starts within this (or interval_ms, if
/// shorter), so a new backend is decided quickly.
const FIRST_PROBE_SPREAD: Duration = Duration::from_millis(200);

/// Each later probe starts interval_ms after the previous one, give or
/// take this fraction, so probes of many backends do not march in step.
const JITTER: f64 = 0.1;

/// What the gate knows, for status, readiness and metrics.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// `tcp` or `http`, or `passive` without active checks.
    pub kind: &'static str,
    /// The backends the provider lists, in its order.
    pub listed: Vec<Backend>,
    /// Their health, by address.
    pub health: HashMap<Ipv4Addr, BackendHealth>,
    /// No listed backend is healthy (and each has a result): all of them
    /// stay eligible.
    pub fail_open: bool,
}

impl Report {
    /// Every listed backend has a result.
    pub fn decided(&self) -> bool {
        self.listed.iter().all(|b| self.health.get(&b.addr).is_some_and(|h| h.state != Health::Unknown))
    }

    pub fn count(&self, state: Health) -> usize {
        self.listed.iter().filter(|b| self.health.get(&b.addr).is_some_and(|h| h.state == state)).count()
    }
}

/// The healthy listed backends; when there is none, every listed one (and
/// whether that is failing open: every one has a result and none passed).
pub fn eligible(listed: &[Backend], health: &HashMap<Ipv4Addr, BackendHealth>) -> (Vec<Backend>, bool) {
    let state = |b: &Backend| health.get(&b.addr).map_or(Health::Unknown, |h| h.state);
    let healthy: Vec<Backend> = listed.iter().filter(|b| state(b) == Health::Healthy).cloned().collect();
    if !healthy.is_empty() || listed.is_empty() {
        return (healthy, false);
    }
    let decided = listed.iter().all(|b| state(b) != Health::Unknown);
    (listed.to_vec(), decided)
}

/// A running gate. Dropping it stops every probe.
pub struct Gate {
    /// The backends that may receive new connections.
    pub eligible: watch::Receiver<Vec<Backend>>,
    pub report: watch::Receiver<Report>,
    pub task: TaskGuard,
}

/// What the gate checks: active probes (`health_check`), passive
/// detection from the data path (`passive_health`), or both.
pub struct Checks<'a> {
    pub active: Option<&'a HealthCheck>,
    pub passive: Option<&'a crate::config::PassiveHealth>,
    /// The first ports[] mapping's remote_port (active checks' default).
    pub default_port: u16,
}

/// How often verdicts of the passive detector are looked at for clearing.
const CLEAR_TICK: Duration = Duration::from_millis(100);

/// Starts checking the backends `listed` names; `handshakes` brings the
/// sweeps' passive reports (needed with `passive_health`).
pub fn start(
    checks: Checks<'_>,
    listed: watch::Receiver<Vec<Backend>>,
    handshakes: Option<mpsc::Receiver<HandshakeReport>>,
) -> Gate {
    let first = listed.borrow().clone();
    let (eligible_tx, eligible) = watch::channel(first.clone());
    let active = checks.active;
    // Every listed backend unknown until the checker has results, so that
    // nobody takes the set for decided before it started; without probes,
    // healthy until the data path says otherwise.
    let fresh = if active.is_some() { BackendHealth::default } else { BackendHealth::assumed_healthy };
    let health = first.iter().map(|b| (b.addr, fresh())).collect();
    let kind = active.map_or("passive", |hc| hc.kind.as_str());
    let (report_tx, report) = watch::channel(Report { kind, listed: first, health, fail_open: false });
    let thresholds =
        active.map_or(Thresholds { rise: 2, fall: 3 }, |hc| Thresholds { rise: hc.rise, fall: hc.fall });
    let interval = Duration::from_millis(active.map_or(1000, |hc| hc.interval_ms));
    let passive = checks.passive.map(|p| {
        // interval x rise of health_check's defaults when it is absent.
        let clear_after = active.is_none().then(|| interval * thresholds.rise);
        Passive::new(p, clear_after)
    });
    let checker = Checker {
        probe: active.map(|hc| Arc::new(Probe::new(hc, checks.default_port))),
        passive,
        runs: HashMap::new(),
        interval,
        thresholds,
        slots: Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES)),
        probers: HashMap::new(),
        generation: 0,
        listed: Vec::new(),
        health: HashMap::new(),
        fail_open: false,
        eligible: eligible_tx,
        report: report_tx,
    };
    let task = tokio::spawn(checker.run(listed, handshakes));
    Gate { eligible, report, task: TaskGuard(task) }
}

/// One backend's probe task, and which one it is (an address that leaves
/// and comes back gets a new one; results of the old one are ignored).
struct Prober {
    generation: u64,
    _task: TaskGuard,
}

/// One probe's result: the backend, its prober's generation, what was seen.
type Outcome = (Ipv4Addr, u64, Observation);

struct Checker {
    /// Active checks; None: passive only.
    probe: Option<Arc<Probe>>,
    passive: Option<Passive>,
    /// The passive detector's runs, by backend.
    runs: HashMap<Ipv4Addr, passive::Run>,
    interval: Duration,
    thresholds: Thresholds,
    slots: Arc<Semaphore>,
    probers: HashMap<Ipv4Addr, Prober>,
    generation: u64,
    listed: Vec<Backend>,
    health: HashMap<Ipv4Addr, BackendHealth>,
    fail_open: bool,
    eligible: watch::Sender<Vec<Backend>>,
    report: watch::Sender<Report>,
}

impl Checker {
    async fn run(
        mut self,
        mut listed: watch::Receiver<Vec<Backend>>,
        mut handshakes: Option<mpsc::Receiver<HandshakeReport>>,
    ) {
        let (tx, mut rx) = mpsc::channel::<Outcome>(MAX_CONCURRENT_PROBES * 4);
        let first = listed.borrow_and_update().clone();
        self.follow(first, &tx);
        let mut listed_open = true;
        let mut clear = tokio::time::interval(CLEAR_TICK);
        clear.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let clears = self.passive.is_some_and(|p| p.clear_after.is_some());
        loop {
            tokio::select! {
                r = listed.changed(), if listed_open => match r {
                    Ok(()) => {
                        let next = listed.borrow_and_update().clone();
                        self.follow(next, &tx);
                    }
                    // A static provider never changes its set.
                    Err(_) => listed_open = false,
                },
                Some((addr, generation, o)) = rx.recv() => self.observe(addr, generation, &o),
                r = recv(&mut handshakes) => match r {
                    Some(report) => self.passive_report(&report),
                    None => handshakes = None,
                },
                _ = clear.tick(), if clears => self.clear_quiet(),
            }
        }
    }

    /// One sweep's handshakes: a run of `fall` failures marks a backend
    /// unhealthy.
    fn passive_report(&mut self, report: &HandshakeReport) {
        let Some(p) = self.passive else { return };
        let now = Instant::now();
        for run in self.runs.values_mut() {
            run.covered(report.created.0, now);
        }
        for (addr, news) in &report.backends {
            if !self.health.contains_key(addr) {
                continue;
            }
            let run = self.runs.entry(*addr).or_default();
            let Some(detail) = run.observe(news, report.created.1, &p, now) else { continue };
            let count = run.failures;
            let h = self.health.get_mut(addr).expect("checked above");
            let t = h.set(Health::Unhealthy, detail, count, p.fall, unix_ms());
            self.note(*addr, t);
        }
    }

    /// Without active checks, a passive verdict ends after interval x rise
    /// without a failure: the backend gets new connections again, and the
    /// data path judges it anew.
    fn clear_quiet(&mut self) {
        let Some(after) = self.passive.and_then(|p| p.clear_after) else { return };
        let now = Instant::now();
        let quiet: Vec<Ipv4Addr> = self
            .health
            .iter()
            .filter(|(addr, h)| {
                h.state == Health::Unhealthy && self.runs.get(*addr).is_some_and(|r| r.quiet_for(after, now))
            })
            .map(|(addr, _)| *addr)
            .collect();
        for addr in quiet {
            let detail = format!("passive: no failure for {} ms", after.as_millis());
            let rise = self.thresholds.rise;
            let h = self.health.get_mut(&addr).expect("listed");
            let t = h.set(Health::Healthy, detail, rise, rise, unix_ms());
            self.note(addr, t);
        }
    }

    /// Starts probing new backends, stops probing removed ones.
    fn follow(&mut self, next: Vec<Backend>, tx: &mpsc::Sender<Outcome>) {
        self.probers.retain(|addr, _| next.iter().any(|b| b.addr == *addr));
        self.health.retain(|addr, _| next.iter().any(|b| b.addr == *addr));
        self.runs.retain(|addr, _| next.iter().any(|b| b.addr == *addr));
        for b in &next {
            let Some(probe) = &self.probe else {
                self.health.entry(b.addr).or_insert_with(BackendHealth::assumed_healthy);
                continue;
            };
            if self.probers.contains_key(&b.addr) {
                continue;
            }
            self.generation += 1;
            let task = tokio::spawn(probe_loop(
                b.addr,
                self.generation,
                probe.clone(),
                self.interval,
                self.slots.clone(),
                tx.clone(),
            ));
            self.probers.insert(b.addr, Prober { generation: self.generation, _task: TaskGuard(task) });
            self.health.insert(b.addr, BackendHealth::default());
        }
        self.listed = next;
        self.publish();
        let (listed, health, fail_open) = (self.listed.clone(), self.health.clone(), self.fail_open);
        self.report.send_modify(|r| {
            (r.listed, r.health, r.fail_open) = (listed, health, fail_open);
        });
    }

    fn observe(&mut self, addr: Ipv4Addr, generation: u64, o: &Observation) {
        if self.probers.get(&addr).is_none_or(|p| p.generation != generation) {
            return;
        }
        let Some(h) = self.health.get_mut(&addr) else { return };
        let transition = h.observe(o, self.thresholds, unix_ms());
        self.note(addr, transition);
    }

    /// Logs a backend's transition once and publishes what follows from it,
    /// then its health.
    fn note(&mut self, addr: Ipv4Addr, transition: Option<Transition>) {
        if let Some(t) = transition {
            // The passive run starts over; SYNs sent before now were judged.
            if self.passive.is_some() {
                self.runs.entry(addr).or_default().changed(crate::dataplane::now_precise_ns());
            }
            let name = self
                .listed
                .iter()
                .find(|b| b.addr == addr)
                .map_or_else(|| addr.to_string(), |b| b.name.clone());
            let line = format!("backend {name} {addr} {}", t.describe());
            match t.to {
                Health::Unhealthy => warn!(name = %name, address = %addr, "{line}"),
                _ => info!(name = %name, address = %addr, "{line}"),
            }
            // The eligible set first: whoever sees the report sees a set
            // that already follows it.
            self.publish();
        }
        let Some(snapshot) = self.health.get(&addr).cloned() else { return };
        let fail_open = self.fail_open;
        self.report.send_modify(|r| {
            r.health.insert(addr, snapshot);
            r.fail_open = fail_open;
        });
    }

    /// Publishes the eligible set when it changed, and logs failing open
    /// once each way.
    fn publish(&mut self) {
        let (set, fail_open) = eligible(&self.listed, &self.health);
        if fail_open != self.fail_open {
            self.fail_open = fail_open;
            if fail_open {
                warn!(
                    "no backend passes its health check: failing open, all {} listed backends stay \
                     eligible for new connections (readiness: no_healthy_backends)",
                    set.len()
                );
            } else {
                let healthy = set.len();
                info!(
                    "no longer failing open: {healthy} of {} listed backends pass their health check",
                    self.listed.len()
                );
            }
        }
        self.eligible.send_if_modified(|cur| {
            if *cur == set {
                false
            } else {
                *cur = set;
                true
            }
        });
    }
}

/// The next passive report, or never without a source.
async fn recv(rx: &mut Option<mpsc::Receiver<HandshakeReport>>) -> Option<HandshakeReport> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Probes one backend until aborted: the first probe soon, then one every
/// interval (jittered), each holding one of the shared slots.
async fn probe_loop(
    addr: Ipv4Addr,
    generation: u64,
    probe: Arc<Probe>,
    interval: Duration,
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<Outcome>,
) {
    let mut rng = Jitter::new(addr, generation);
    let mut next = Instant::now() + FIRST_PROBE_SPREAD.min(interval).mul_f64(rng.unit());
    loop {
        tokio::time::sleep_until(next).await;
        let started = Instant::now();
        let o = {
            let Ok(_slot) = slots.acquire().await else { return };
            probe.run(addr).await
        };
        if tx.send((addr, generation, o)).await.is_err() {
            return;
        }
        next = started + interval.mul_f64(1.0 + JITTER * (2.0 * rng.unit() - 1.0));
    }
}

/// A small xorshift generator seeded from the process's random hash keys:
/// jitter needs spread, not quality.
struct Jitter(u64);

impl Jitter {
    fn new(addr: Ipv4Addr, generation: u64) -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(addr.into());
        h.write_u64(generation);
        Jitter(h.finish() | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, last: u8) -> Backend {
        Backend { name: name.into(), addr: Ipv4Addr::new(10, 0, 0, last), weight: 1 }
    }

    fn with(states: &[(u8, Health)]) -> HashMap<Ipv4Addr, BackendHealth> {
        states
            .iter()
            .map(|&(last, state)| {
                let mut h = BackendHealth::default();
                h.state = state;
                (Ipv4Addr::new(10, 0, 0, last), h)
            })
            .collect()
    }

    #[test]
    fn only_healthy_backends_are_eligible() {
        use Health::*;
        let listed = [b("a", 1), b("b", 2), b("c", 3)];
        let (set, open) = eligible(&listed, &with(&[(1, Healthy), (2, Unhealthy), (3, Unknown)]));
        assert_eq!((set, open), (vec![b("a", 1)], false));
    }

    #[test]
    fn no_healthy_backend_fails_open_once_each_has_a_result() {
        use Health::*;
        let listed = [b("a", 1), b("b", 2)];
        let (set, open) = eligible(&listed, &with(&[(1, Unhealthy), (2, Unhealthy)]));
        assert_eq!((set, open), (listed.to_vec(), true));
        // Not yet decided: all stay eligible, but that is not failing open.
        let (set, open) = eligible(&listed, &with(&[(1, Unhealthy), (2, Unknown)]));
        assert_eq!((set, open), (listed.to_vec(), false));
        assert_eq!(eligible(&[], &HashMap::new()), (vec![], false));
    }

    /// The gate end to end on loopback: 127.0.0.1 has a listener, 127.0.0.2
    /// refuses.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gate_follows_results_fails_open_and_follows_the_list() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hc = HealthCheck {
            kind: crate::config::CheckType::Tcp,
            port: Some(port),
            path: None,
            expect_status: None,
            interval_ms: 50,
            timeout_ms: 50,
            rise: 1,
            fall: 1,
        };
        let up = Backend { name: "up".into(), addr: Ipv4Addr::LOCALHOST, weight: 1 };
        let down = Backend { name: "down".into(), addr: Ipv4Addr::new(127, 0, 0, 2), weight: 1 };
        let (tx, rx) = watch::channel(vec![up.clone(), down.clone()]);
        let mut gate = start(Checks { active: Some(&hc), passive: None, default_port: 0 }, rx, None);
        let limit = Duration::from_secs(5);
        let wait = |f: &'static (dyn Fn(&Report) -> bool + Sync)| {
            let mut r = gate.report.clone();
            async move {
                tokio::time::timeout(limit, r.wait_for(|x| f(x))).await.expect("in time").unwrap().clone()
            }
        };
        let r = wait(&|r: &Report| r.decided()).await;
        assert_eq!(r.health[&down.addr].last_result.as_deref(), Some("connect refused"));
        assert_eq!(
            gate.eligible.borrow().as_slice(),
            std::slice::from_ref(&up),
            "decided before the report says so"
        );

        // Nobody passes: fail open, both eligible.
        drop(listener);
        wait(&|r: &Report| r.fail_open).await;
        let both = tokio::time::timeout(limit, gate.eligible.wait_for(|e| e.len() == 2)).await.is_ok();
        assert!(both, "fail open keeps every listed backend");

        // Removed from the list: no longer reported (nor probed).
        tx.send_replace(vec![up.clone()]);
        let r = wait(&|r: &Report| r.listed.len() == 1).await;
        assert!(!r.health.contains_key(&down.addr));

        // Back: healthy, fail open ends.
        let _listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        wait(&|r: &Report| !r.fail_open && r.count(Health::Healthy) == 1).await;
        assert_eq!(*gate.eligible.borrow(), [up]);
    }

    #[test]
    fn jitter_stays_in_its_range() {
        let mut j = Jitter::new(Ipv4Addr::new(10, 0, 0, 1), 1);
        let xs: Vec<f64> = (0..1000).map(|_| j.unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((0.4..0.6).contains(&mean), "{mean}");
    }
}
