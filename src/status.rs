//! What the running instance knows about itself, shared read-mostly between
//! the lifecycle (the only writer of phase), the balancer, the stats loop
//! and the admin API (a reader only).

use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use serde::Serialize;

pub use crate::dataplane::Traffic;
use crate::provider::ProviderHealth;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Running,
    Draining,
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    /// `native` or `generic`.
    pub xdp_mode: String,
    /// How frames leave back out of this interface: `xdp_tx` or `redirect`.
    pub transmit: String,
    /// Other interfaces hand frames to it from XDP; when false the kernel
    /// forwards what is routed to it.
    pub redirect_target: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub address: Ipv4Addr,
    pub weight: u32,
    /// `active` (gets new connections), `excluded` (listed, but its health
    /// check keeps it out of the table; existing connections continue) or
    /// `draining` (left the set; its existing connections continue).
    pub state: &'static str,
    /// Live connections at the last sweep.
    pub connections_active: u64,
    /// Connections that ended with FIN both ways / with a RST / idle past
    /// orphan_ttl_secs, since start.
    pub connections_closed_fin: u64,
    pub connections_closed_rst: u64,
    pub connections_orphaned: u64,
    /// Bytes and packets since start, both directions (ended connections
    /// plus live ones as of the last sweep).
    pub traffic: Traffic,
    /// Its health check (all null without `health_check`).
    #[serde(flatten)]
    pub check: CheckStatus,
    /// How it answered the SYNs XLB forwarded, as the data path saw them.
    pub handshakes: Handshakes,
}

/// One backend's handshakes as the data path saw them, since start: the
/// passive health detector's input, and its SYN->SYN-ACK latency.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Handshakes {
    /// New connections the backend answered with a SYN-ACK.
    pub answered: u64,
    /// New connections it answered with a RST.
    pub refused: u64,
    /// New connections with no answer within `passive_health.syn_timeout_ms`
    /// (counted only with `passive_health`).
    pub timed_out: u64,
    /// The mean SYN->SYN-ACK latency of the answered ones (null before the
    /// first).
    pub latency_mean_ms: Option<f64>,
    /// The same latencies as a histogram (the metric
    /// `xlb.backend.syn_ack.latency`).
    #[serde(skip)]
    pub latency: LatencyHistogram,
}

/// A histogram of latencies in seconds with fixed bucket bounds: bucket i
/// holds the values in (bounds[i-1], bounds[i]], the last one those above
/// every bound. Each bucket keeps its own sum, so an exporter that can only
/// record values one by one (OTLP's SDK) can replay a bucket's new counts at
/// their mean and still land every one in its bucket, with the exact sum.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyHistogram {
    /// Upper bounds in seconds, ascending.
    pub bounds: &'static [f64],
    /// bounds.len() + 1 counts (empty: no data path behind it).
    pub counts: Vec<u64>,
    /// bounds.len() + 1 sums in seconds.
    pub sums: Vec<f64>,
}

impl LatencyHistogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn sum(&self) -> f64 {
        self.sums.iter().sum()
    }

    /// Bucket i as (lower, upper]: -inf below the first, +inf above the last.
    pub fn bucket(&self, i: usize) -> (f64, f64) {
        let lo = if i == 0 { f64::NEG_INFINITY } else { self.bounds[i - 1] };
        let hi = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
        (lo, hi)
    }

    /// The upper bound of every bucket, +inf last, with its count (not
    /// cumulative).
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.bounds.iter().copied().chain([f64::INFINITY]).zip(self.counts.iter().copied())
    }
}

/// One backend's health check, as the status document shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckStatus {
    /// `unknown`, `healthy` or `unhealthy`.
    pub health: Option<&'static str>,
    /// What the last check saw: `connect ok`, `connect refused`, `status 500`, ...
    pub last_check: Option<String>,
    /// When `health` last changed (unix ms).
    pub health_changed_unix_ms: Option<u64>,
    /// How long the last check took.
    pub check_latency_ms: Option<f64>,
}

/// The health checks as a whole (`health_check` in the config).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HealthChecks {
    /// `tcp` or `http`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Listed backends by health.
    pub healthy: u64,
    pub unhealthy: u64,
    pub unknown: u64,
    /// No backend passes its check: all listed backends stay eligible
    /// (readiness says `no_healthy_backends`).
    pub fail_open: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PortStatus {
    pub local_port: u16,
    pub remote_port: u16,
}

/// The `/api/v1/status` document.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub phase: Phase,
    pub listen: Option<Ipv4Addr>,
    pub snat: Option<Ipv4Addr>,
    /// The whole SNAT pool (snat is its first address).
    pub snat_ips: Vec<Ipv4Addr>,
    pub ports: Vec<PortStatus>,
    pub interfaces: Vec<InterfaceStatus>,
    pub backends: Vec<BackendStatus>,
    pub provider: Option<ProviderHealth>,
    /// Null without `health_check`.
    pub health_checks: Option<HealthChecks>,
    /// Connections tracked at the last sweep.
    pub connections_active: u64,
    /// Of those, the ones whose handshake had not completed.
    pub connections_half_open: u64,
    /// `syn_proxy` as configured (auto, on, off), and whether new SYNs are
    /// answered with cookies now.
    pub syn_proxy: &'static str,
    pub syn_proxy_engaged: bool,
    /// Concurrent connections the conntrack map holds (config
    /// `conntrack_capacity`); 0 until the data plane is configured.
    pub conntrack_capacity: u64,
    /// Packet outcome counters, by name.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// The data plane holds the provider's latest backend set (false while
    /// a failed table write is being retried).
    pub converged: bool,
    /// When the data-plane worker began the command it is still running
    /// (unix ms), None when idle: /healthz fails when one command has run
    /// longer than the watchdog (`watchdog()`).
    pub data_plane_busy_since_unix_ms: Option<u64>,
}

/// /healthz fails when one data-plane command has been running this long: a
/// sweep of millions of connections takes seconds, a wedged syscall forever.
/// XLB_WATCHDOG_SECS overrides it (tests).
pub fn watchdog() -> std::time::Duration {
    let secs = std::env::var("XLB_WATCHDOG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    std::time::Duration::from_secs(secs)
}

impl Default for Status {
    fn default() -> Self {
        Status {
            version: env!("CARGO_PKG_VERSION"),
            phase: Phase::Starting,
            listen: None,
            snat: None,
            snat_ips: Vec::new(),
            ports: Vec::new(),
            interfaces: Vec::new(),
            backends: Vec::new(),
            provider: None,
            health_checks: None,
            connections_active: 0,
            connections_half_open: 0,
            syn_proxy: "off",
            syn_proxy_engaged: false,
            conntrack_capacity: 0,
            counters: Default::default(),
            converged: true,
            data_plane_busy_since_unix_ms: None,
        }
    }
}

impl Status {
    /// Liveness: None when healthy, otherwise why not: no data-plane
    /// command may run longer than `watchdog()`.
    pub fn unhealthy_reason(&self, now_unix_ms: u64) -> Option<String> {
        let since = self.data_plane_busy_since_unix_ms?;
        let stuck = now_unix_ms.saturating_sub(since);
        (matches!(self.phase, Phase::Running | Phase::Draining) && stuck > watchdog().as_millis() as u64)
            .then(|| format!("data plane unresponsive for {}s", stuck / 1000))
    }

    /// Readiness: None when ready, otherwise the reason word.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        match self.phase {
            Phase::Starting => Some("starting"),
            Phase::Draining | Phase::Stopped => Some("shutting_down"),
            Phase::Running if self.interfaces.is_empty() => Some("not_attached"),
            Phase::Running if !self.provider.as_ref().is_some_and(|p| p.synced) => {
                Some("provider_not_synced")
            }
            Phase::Running if !self.converged => Some("not_converged"),
            Phase::Running if !self.backends.iter().any(|b| b.state == "active") => Some("no_backends"),
            // Still serving: every listed backend stays eligible.
            Phase::Running if self.health_checks.as_ref().is_some_and(|h| h.fail_open) => {
                Some("no_healthy_backends")
            }
            Phase::Running => None,
        }
    }
}

#[derive(Clone, Default, Debug)]
pub struct SharedStatus(Arc<RwLock<Status>>);

impl SharedStatus {
    pub fn read(&self) -> Status {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.0.write().unwrap_or_else(|e| e.into_inner()));
    }
}
