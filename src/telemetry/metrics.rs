//! The one metric model. Every metric XLB exports is described once in
//! [`CATALOG`] and computed once, from the shared status document, by
//! [`Metrics::collect`]; the OTLP exporter and the Prometheus text endpoint
//! only translate the resulting [`Snapshot`].
//!
//! Names follow the original XLB convention (`xlb.global.*`, per-backend
//! `xlb.ingress.*` / `xlb.egress.*`); Prometheus replaces the dots with
//! underscores and adds `_total` to counters.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::status::{LatencyHistogram, Phase, SharedStatus, Status, Traffic};

/// Rates are averaged over at least this long. The status behind them is
/// refreshed once a second, so a window of N seconds is accurate to about
/// 1/N.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Cumulative (monotonic), a value at this moment, or a cumulative
/// distribution over fixed buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Points are [`Value::Histogram`] over [`Desc::bounds`].
    Histogram,
}

/// The number type of a metric's points (of a histogram: of its values and
/// sum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Num {
    U64,
    F64,
}

/// One metric: its name, type, unit (UCUM, as OTLP carries it), help text
/// and label keys, in the order points carry them.
#[derive(Debug, PartialEq)]
pub struct Desc {
    pub name: &'static str,
    pub kind: Kind,
    pub num: Num,
    pub unit: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    /// A histogram's bucket upper bounds, ascending (every point has
    /// these); empty for other kinds.
    pub bounds: &'static [f64],
}

impl Desc {
    /// The Prometheus name: dots become underscores (the text encoder adds
    /// `_total` to counters).
    pub fn prometheus_name(&self) -> String {
        self.name.replace('.', "_")
    }
}

const fn desc(
    name: &'static str,
    kind: Kind,
    num: Num,
    unit: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> Desc {
    Desc { name, kind, num, unit, help, labels, bounds: &[] }
}

/// A histogram of F64 values over `bounds`.
const fn histogram(
    name: &'static str,
    unit: &'static str,
    labels: &'static [&'static str],
    bounds: &'static [f64],
    help: &'static str,
) -> Desc {
    Desc { name, kind: Kind::Histogram, num: Num::F64, unit, help, labels, bounds }
}

use Kind::{Counter, Gauge};
use Num::{F64, U64};

const BACKEND: &[&str] = &["backend", "backend_name"];
const BACKEND_TYPE: &[&str] = &["backend", "backend_name", "type"];
const BACKEND_RESULT: &[&str] = &["backend", "backend_name", "result"];
const PROVIDER: &[&str] = &["kind", "mode"];

/// Every metric XLB exports. docs/metrics.md documents each one (a test
/// checks that it does).
#[rustfmt::skip]
pub static CATALOG: &[Desc] = &[
    // Global.
    desc("xlb.global.backends.available", Gauge, U64, "{backend}", &[],
        "Backends in the current set (receiving new connections)"),
    desc("xlb.global.backends.healthy", Gauge, U64, "{backend}", &[],
        "Listed backends whose health check passes (with health_check or passive_health)"),
    desc("xlb.health.fail_open", Gauge, U64, "1", &[],
        "1 while no backend passes its health check and all listed backends stay eligible (with health_check or passive_health), else 0"),
    desc("xlb.global.connections.active", Gauge, U64, "{connection}", &[],
        "Connections tracked at the last conntrack sweep"),
    desc("xlb.global.connections.opened", Counter, U64, "{connection}", &[],
        "Connections opened (a SYN that created a conntrack pair)"),
    desc("xlb.global.connections.closed", Counter, U64, "{connection}", &[],
        "Connections that ended with FIN both ways or a RST and were removed"),
    desc("xlb.global.connections.orphaned", Counter, U64, "{connection}", &[],
        "Connections removed after idling past orphan_ttl_secs"),
    // Per backend, client -> backend.
    desc("xlb.ingress.bytes", Counter, U64, "By", BACKEND,
        "Bytes forwarded from clients to the backend"),
    desc("xlb.ingress.packets", Counter, U64, "{packet}", BACKEND,
        "Packets forwarded from clients to the backend"),
    desc("xlb.ingress.mbps", Gauge, F64, "Mbit/s", BACKEND,
        "Client-to-backend bandwidth, averaged over the rate window"),
    desc("xlb.ingress.pps", Gauge, F64, "{packet}/s", BACKEND,
        "Client-to-backend packets per second, averaged over the rate window"),
    desc("xlb.ingress.flows.active", Gauge, U64, "{connection}", BACKEND,
        "Live connections to the backend"),
    desc("xlb.ingress.flows.closed", Counter, U64, "{connection}", BACKEND_TYPE,
        "Connections to the backend removed after they closed, by type fin or rst"),
    desc("xlb.ingress.flows.orphaned", Counter, U64, "{connection}", BACKEND,
        "Connections to the backend removed after idling past orphan_ttl_secs"),
    // Per backend, backend -> client.
    desc("xlb.egress.bytes", Counter, U64, "By", BACKEND,
        "Bytes forwarded from the backend back to clients"),
    desc("xlb.egress.packets", Counter, U64, "{packet}", BACKEND,
        "Packets forwarded from the backend back to clients"),
    desc("xlb.egress.mbps", Gauge, F64, "Mbit/s", BACKEND,
        "Backend-to-client bandwidth, averaged over the rate window"),
    desc("xlb.egress.pps", Gauge, F64, "{packet}/s", BACKEND,
        "Backend-to-client packets per second, averaged over the rate window"),
    desc("xlb.egress.flows.active", Gauge, U64, "{connection}", BACKEND,
        "Live connections of the backend (return direction; each connection has both)"),
    // Per backend, configuration and state.
    desc("xlb.backend.weight", Gauge, U64, "1", BACKEND,
        "The backend's Maglev weight"),
    desc("xlb.backend.draining", Gauge, U64, "1", BACKEND,
        "1 while the backend has left the set and its connections drain, else 0"),
    desc("xlb.backend.healthy", Gauge, U64, "1", BACKEND,
        "1 while the backend's health check passes, 0 while it fails or has no result yet (with health_check or passive_health)"),
    desc("xlb.backend.check.latency", Gauge, F64, "s", BACKEND,
        "How long the backend's last health check took (with health_check)"),
    histogram("xlb.backend.syn_ack.latency", "s", BACKEND, crate::dataplane::SYN_ACK_LATENCY_BOUNDS,
        "SYN->SYN-ACK latency of new connections to the backend, as the data path measured it \
         (from the SYN XLB forwarded to the backend's SYN-ACK)"),
    desc("xlb.backend.handshakes", Counter, U64, "{connection}", BACKEND_RESULT,
        "New connections to the backend by how it answered the SYN: answered (SYN-ACK), refused (RST), \
         timed_out (no answer within passive_health.syn_timeout_ms; only with passive_health)"),
    // Data path.
    desc("xlb.packets", Counter, U64, "{packet}", &["action", "reason"],
        "Packets seen by the XDP program, by outcome: action forward|pass|drop|rst and its reason"),
    desc("xlb.nat.port_allocation_failures", Counter, U64, "{packet}", &[],
        "SYNs dropped because no NAT source port was free"),
    desc("xlb.nat.ports", Counter, U64, "{connection}", &["choice"],
        "NAT ports claimed, by how: preserved (the client's own), derived (from its tuple), probed (random), reclaimed (a closed connection's, under port pressure), recycled (the oldest half-open connection's seen, under port pressure)"),
    desc("xlb.nat.port_collisions", Counter, U64, "{event}", &[],
        "NAT port choices found taken (each costs one more try): rising against new connections is port pressure"),
    desc("xlb.synproxy.cookies", Counter, U64, "{packet}", &["result"],
        "SYN cookies of the SYN proxy: sent (a SYN answered with one), validated (an ACK carrying one opened a connection), failed (an ACK of no connection without a valid one)"),
    desc("xlb.synproxy.engaged", Gauge, U64, "1", &[],
        "1 while new SYNs are answered with SYN cookies (syn_proxy: on, or auto during a SYN flood), else 0"),
    desc("xlb.conntrack.half_open", Gauge, U64, "{connection}", &[],
        "Tracked connections whose handshake had not completed at the last sweep (syn_proxy: auto engages at syn_proxy_threshold)"),
    desc("xlb.conntrack.reopened", Counter, U64, "{connection}", &[],
        "Closed connections whose tuple a new SYN reopened in place (same backend, same NAT port)"),
    desc("xlb.nexthop.misses", Counter, U64, "{packet}", &[],
        "Routes looked up in the FIB because the route cache had no current answer"),
    desc("xlb.drain.rst_sent", Counter, U64, "{packet}", &[],
        "RSTs sent to new connections during the shutdown drain"),
    desc("xlb.conntrack.connections", Gauge, U64, "{connection}", &[],
        "Connections (conntrack entry pairs) tracked at the last sweep"),
    desc("xlb.conntrack.capacity", Gauge, U64, "{connection}", &[],
        "Connections the conntrack map can hold (conntrack_capacity)"),
    desc("xlb.conntrack.utilization", Gauge, F64, "1", &[],
        "Tracked connections as a fraction of capacity, 0 to 1"),
    desc("xlb.interface.xdp_mode", Gauge, U64, "1", &["interface", "mode", "transmit"],
        "1 for each interface XLB is attached to, labelled with its XDP mode (native or generic) \
         and how frames leave back out of it (xdp_tx or redirect)"),
    // Provider.
    desc("xlb.provider.connected", Gauge, U64, "1", PROVIDER,
        "1 while the backend provider is connected to its source"),
    desc("xlb.provider.synced", Gauge, U64, "1", PROVIDER,
        "1 once the provider has produced a complete backend set"),
    desc("xlb.provider.last_sync.age", Gauge, F64, "s", PROVIDER,
        "Seconds since the provider's last complete sync (absent before the first)"),
    desc("xlb.provider.errors", Counter, U64, "{error}", PROVIDER,
        "Provider errors since start (API failures, rejected reloads)"),
    // Lifecycle.
    desc("xlb.lifecycle.phase", Gauge, U64, "1", &["phase"],
        "1 for the current phase (starting, running, draining, stopped), 0 for the others"),
    desc("xlb.ready", Gauge, U64, "1", &[],
        "1 when /readyz answers 200, else 0"),
];

/// The description of a metric by its (dotted) name.
pub fn lookup(name: &str) -> Option<&'static Desc> {
    CATALOG.iter().find(|d| d.name == name)
}

/// A point's value. Clones are cheap (a histogram is shared).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    F64(f64),
    Histogram(Arc<Histogram>),
}

impl Value {
    /// The number, as f64; None for a histogram.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::U64(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            Value::Histogram(_) => None,
        }
    }
}

/// A histogram value: the status document's, as it is.
pub use crate::status::LatencyHistogram as Histogram;

/// One time series: label values in the order of [`Desc::labels`].
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub labels: Vec<(&'static str, String)>,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub desc: &'static Desc,
    pub points: Vec<Point>,
}

/// Every metric at one moment, in [`CATALOG`] order. A family may have no
/// points (no backends yet, a counter the data path does not have).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub families: Vec<Family>,
}

impl Snapshot {
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.desc.name == name)
    }
}

/// Closure counts of one backend as last seen.
#[derive(Debug, Clone, Copy, Default)]
struct Closed {
    fin: u64,
    rst: u64,
    orphaned: u64,
}

/// What the model remembers between snapshots: traffic for rates, and
/// closure counts so that the global counters stay monotonic when a
/// backend drops out of the status document.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The start of the current rate window and the traffic then.
    window: Option<(Instant, HashMap<Ipv4Addr, Traffic>)>,
    /// Per backend: (bytes/s, packets/s) to the backend, then to the client.
    rates: HashMap<Ipv4Addr, [f64; 4]>,
    /// Per backend address: counts from earlier runs (a counter that went
    /// down was restarted) plus the last value seen.
    closed_base: HashMap<Ipv4Addr, Closed>,
    closed_last: HashMap<Ipv4Addr, Closed>,
}

impl Tracker {
    fn update_rates(&mut self, now: Instant, backends: &[crate::status::BackendStatus]) {
        let current: HashMap<Ipv4Addr, Traffic> = backends.iter().map(|b| (b.address, b.traffic)).collect();
        match &self.window {
            None => self.window = Some((now, current)),
            Some((start, _)) if now.saturating_duration_since(*start) < RATE_WINDOW => {}
            Some((start, earlier)) => {
                let secs = now.saturating_duration_since(*start).as_secs_f64();
                let per_sec = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
                self.rates = current
                    .iter()
                    .map(|(addr, t)| {
                        // New in this window: its rate is known from the next one on.
                        let Some(e) = earlier.get(addr) else { return (*addr, [0.0; 4]) };
                        let r = [
                            per_sec(t.bytes_to_backend, e.bytes_to_backend),
                            per_sec(t.packets_to_backend, e.packets_to_backend),
                            per_sec(t.bytes_to_client, e.bytes_to_client),
                            per_sec(t.packets_to_client, e.packets_to_client),
                        ];
                        (*addr, r)
                    })
                    .collect();
                self.window = Some((now, current));
            }
        }
    }

    fn update_closed(&mut self, backends: &[crate::status::BackendStatus]) -> Closed {
        for b in backends {
            let now = Closed {
                fin: b.connections_closed_fin,
                rst: b.connections_closed_rst,
                orphaned: b.connections_orphaned,
            };
            let last = self.closed_last.entry(b.address).or_default();
            let base = self.closed_base.entry(b.address).or_default();
            // A count below the last one means the backend's accounting
            // restarted: keep what it had counted before.
            if now.fin < last.fin || now.rst < last.rst || now.orphaned < last.orphaned {
                base.fin += last.fin;
                base.rst += last.rst;
                base.orphaned += last.orphaned;
            }
            *last = now;
        }
        let mut total = Closed::default();
        for (addr, last) in &self.closed_last {
            let base = self.closed_base.get(addr).copied().unwrap_or_default();
            total.fin += base.fin + last.fin;
            total.rst += base.rst + last.rst;
            total.orphaned += base.orphaned + last.orphaned;
        }
        total
    }
}

/// The model bound to a status document. Each consumer (the OTLP exporter,
/// the Prometheus endpoint) holds its own, so that rate windows follow its
/// own reads.
#[derive(Debug)]
pub struct Metrics {
    status: SharedStatus,
    tracker: Mutex<Tracker>,
}

impl Metrics {
    pub fn new(status: SharedStatus) -> Self {
        Metrics { status, tracker: Mutex::new(Tracker::default()) }
    }

    /// Reads the status document (a copy; nothing is held) and computes
    /// every metric.
    pub fn collect(&self) -> Snapshot {
        let status = self.status.read();
        let mut tracker = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        snapshot(&status, &mut tracker, Instant::now(), crate::provider::unix_ms())
    }
}

/// Collects points by metric name, then orders them as the catalog does.
struct Builder {
    points: BTreeMap<&'static str, Vec<Point>>,
}

impl Builder {
    fn push(&mut self, name: &'static str, labels: Vec<(&'static str, String)>, value: Value) {
        debug_assert!(
            lookup(name).is_some_and(|d| d.labels.len() == labels.len()
                && d.labels.iter().zip(&labels).all(|(k, (l, _))| k == l)
                && match (d.kind, d.num, &value) {
                    (Kind::Histogram, Num::F64, Value::Histogram(h)) => {
                        h.bounds == d.bounds
                            && h.counts.len() == d.bounds.len() + 1
                            && h.sums.len() == h.counts.len()
                    }
                    (Kind::Counter | Kind::Gauge, Num::U64, Value::U64(_))
                    | (Kind::Counter | Kind::Gauge, Num::F64, Value::F64(_)) => true,
                    _ => false,
                }),
            "{name} does not match its catalog entry"
        );
        self.points.entry(name).or_default().push(Point { labels, value });
    }

    fn u64(&mut self, name: &'static str, labels: Vec<(&'static str, String)>, v: u64) {
        self.push(name, labels, Value::U64(v));
    }

    fn f64(&mut self, name: &'static str, labels: Vec<(&'static str, String)>, v: f64) {
        self.push(name, labels, Value::F64(v));
    }

    fn histogram(&mut self, name: &'static str, labels: Vec<(&'static str, String)>, h: &LatencyHistogram) {
        self.push(name, labels, Value::Histogram(Arc::new(h.clone())));
    }

    fn finish(mut self) -> Snapshot {
        let families = CATALOG
            .iter()
            .map(|desc| Family { desc, points: self.points.remove(desc.name).unwrap_or_default() })
            .collect();
        Snapshot { families }
    }
}

/// The counters in `Status::counters` that are not packet outcomes.
const NOT_PACKET_OUTCOMES: &[&str] = &[
    "new_flow",
    "nat_port_preserved",
    "nat_port_derived",
    "nat_port_probed",
    "nat_port_reclaimed",
    "nat_port_recycled",
    "nat_port_collision",
    "synproxy_cookie_valid",
    "synproxy_cookie_failed",
    "ct_reopened",
    "nexthop_miss",
];

/// A packet counter's name as (action, reason): `fwd_to_backend` ->
/// (forward, to_backend), `pass_vlan` -> (pass, vlan), `drop_ttl` -> (drop,
/// ttl), `drain_rst` -> (rst, drain), `rst_unknown_flow` -> (rst,
/// unknown_flow); anything else -> (other, name).
pub fn packet_outcome(counter: &str) -> (&'static str, &str) {
    if counter == "drain_rst" {
        return ("rst", "drain");
    }
    for (prefix, action) in [("fwd_", "forward"), ("pass_", "pass"), ("drop_", "drop"), ("rst_", "rst")] {
        if let Some(reason) = counter.strip_prefix(prefix) {
            return (action, reason);
        }
    }
    ("other", counter)
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Draining => "draining",
        Phase::Stopped => "stopped",
    }
}

/// Every metric from one status document. `now` clocks the rate window;
/// `now_unix_ms` ages the provider's last sync.
pub fn snapshot(s: &Status, tracker: &mut Tracker, now: Instant, now_unix_ms: u64) -> Snapshot {
    let mut b = Builder { points: BTreeMap::new() };
    let none = Vec::new;
    let counter = |name: &str| s.counters.get(name).copied();

    let available = s.backends.iter().filter(|b| b.state == "active").count() as u64;
    b.u64("xlb.global.backends.available", none(), available);
    if let Some(h) = &s.health_checks {
        b.u64("xlb.global.backends.healthy", none(), h.healthy);
        b.u64("xlb.health.fail_open", none(), h.fail_open.into());
    }
    b.u64("xlb.global.connections.active", none(), s.connections_active);
    b.u64("xlb.global.connections.opened", none(), counter("new_flow").unwrap_or(0));
    let closed = tracker.update_closed(&s.backends);
    b.u64("xlb.global.connections.closed", none(), closed.fin + closed.rst);
    b.u64("xlb.global.connections.orphaned", none(), closed.orphaned);

    tracker.update_rates(now, &s.backends);
    for be in &s.backends {
        let labels = || vec![("backend", be.address.to_string()), ("backend_name", be.name.clone())];
        let with_type = |t: &str| {
            let mut l = labels();
            l.push(("type", t.to_string()));
            l
        };
        let t = &be.traffic;
        let r = tracker.rates.get(&be.address).copied().unwrap_or_default();
        b.u64("xlb.ingress.bytes", labels(), t.bytes_to_backend);
        b.u64("xlb.ingress.packets", labels(), t.packets_to_backend);
        b.f64("xlb.ingress.mbps", labels(), r[0] * 8.0 / 1e6);
        b.f64("xlb.ingress.pps", labels(), r[1]);
        b.u64("xlb.ingress.flows.active", labels(), be.connections_active);
        b.u64("xlb.ingress.flows.closed", with_type("fin"), be.connections_closed_fin);
        b.u64("xlb.ingress.flows.closed", with_type("rst"), be.connections_closed_rst);
        b.u64("xlb.ingress.flows.orphaned", labels(), be.connections_orphaned);
        b.u64("xlb.egress.bytes", labels(), t.bytes_to_client);
        b.u64("xlb.egress.packets", labels(), t.packets_to_client);
        b.f64("xlb.egress.mbps", labels(), r[2] * 8.0 / 1e6);
        b.f64("xlb.egress.pps", labels(), r[3]);
        b.u64("xlb.egress.flows.active", labels(), be.connections_active);
        b.u64("xlb.backend.weight", labels(), be.weight.into());
        b.u64("xlb.backend.draining", labels(), u64::from(be.state == "draining"));
        if let Some(h) = be.check.health {
            b.u64("xlb.backend.healthy", labels(), u64::from(h == "healthy"));
        }
        if let Some(ms) = be.check.check_latency_ms {
            b.f64("xlb.backend.check.latency", labels(), ms / 1000.0);
        }
        let hs = &be.handshakes;
        // Empty: no data path behind it (nothing measured, not even zero).
        if !hs.latency.counts.is_empty() {
            b.histogram("xlb.backend.syn_ack.latency", labels(), &hs.latency);
        }
        for (result, v) in [("answered", hs.answered), ("refused", hs.refused), ("timed_out", hs.timed_out)] {
            let mut l = labels();
            l.push(("result", result.to_string()));
            b.u64("xlb.backend.handshakes", l, v);
        }
    }

    for (name, &v) in &s.counters {
        if NOT_PACKET_OUTCOMES.contains(&name.as_str()) {
            continue;
        }
        let (action, reason) = packet_outcome(name);
        b.u64("xlb.packets", vec![("action", action.to_string()), ("reason", reason.to_string())], v);
    }
    b.u64("xlb.nat.port_allocation_failures", none(), counter("drop_nat_exhausted").unwrap_or(0));
    for choice in ["preserved", "derived", "probed", "reclaimed", "recycled"] {
        let v = counter(&format!("nat_port_{choice}")).unwrap_or(0);
        b.u64("xlb.nat.ports", vec![("choice", choice.to_string())], v);
    }
    b.u64("xlb.nat.port_collisions", none(), counter("nat_port_collision").unwrap_or(0));
    for (result, name) in [
        ("sent", "synproxy_cookie_sent"),
        ("validated", "synproxy_cookie_valid"),
        ("failed", "synproxy_cookie_failed"),
    ] {
        b.u64("xlb.synproxy.cookies", vec![("result", result.to_string())], counter(name).unwrap_or(0));
    }
    b.u64("xlb.synproxy.engaged", none(), u64::from(s.syn_proxy_engaged));
    b.u64("xlb.conntrack.half_open", none(), s.connections_half_open);
    b.u64("xlb.conntrack.reopened", none(), counter("ct_reopened").unwrap_or(0));
    b.u64("xlb.nexthop.misses", none(), counter("nexthop_miss").unwrap_or(0));
    // Only data paths that can drain with RSTs have this counter.
    if let Some(v) = counter("drain_rst") {
        b.u64("xlb.drain.rst_sent", none(), v);
    }
    b.u64("xlb.conntrack.connections", none(), s.connections_active);
    if s.conntrack_capacity > 0 {
        b.u64("xlb.conntrack.capacity", none(), s.conntrack_capacity);
        b.f64("xlb.conntrack.utilization", none(), s.connections_active as f64 / s.conntrack_capacity as f64);
    }
    for i in &s.interfaces {
        let labels = vec![
            ("interface", i.name.clone()),
            ("mode", i.xdp_mode.clone()),
            ("transmit", i.transmit.clone()),
        ];
        b.u64("xlb.interface.xdp_mode", labels, 1);
    }

    if let Some(p) = &s.provider {
        let labels = || vec![("kind", p.kind.to_string()), ("mode", p.mode.clone())];
        b.u64("xlb.provider.connected", labels(), p.connected.into());
        b.u64("xlb.provider.synced", labels(), p.synced.into());
        if let Some(at) = p.last_sync_unix_ms {
            b.f64("xlb.provider.last_sync.age", labels(), now_unix_ms.saturating_sub(at) as f64 / 1000.0);
        }
        b.u64("xlb.provider.errors", labels(), p.errors);
    }

    for phase in [Phase::Starting, Phase::Running, Phase::Draining, Phase::Stopped] {
        b.u64(
            "xlb.lifecycle.phase",
            vec![("phase", phase_name(phase).to_string())],
            (s.phase == phase).into(),
        );
    }
    b.u64("xlb.ready", none(), s.not_ready_reason().is_none().into());
    b.finish()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::provider::ProviderHealth;
    use crate::status::{BackendStatus, InterfaceStatus};

    pub(crate) fn backend(name: &str, last: u8, bytes: u64) -> BackendStatus {
        BackendStatus {
            name: name.into(),
            address: Ipv4Addr::new(10, 0, 0, last),
            weight: 1,
            state: "active",
            connections_active: 2,
            connections_closed_fin: 5,
            connections_closed_rst: 1,
            connections_orphaned: 0,
            traffic: Traffic {
                bytes_to_backend: bytes,
                packets_to_backend: bytes / 100,
                bytes_to_client: bytes * 10,
                packets_to_client: bytes / 10,
            },
            check: Default::default(),
            handshakes: Default::default(),
        }
    }

    /// A latency histogram over the data path's bounds with `n` values of
    /// `secs` each, per (bucket, n, secs).
    pub(crate) fn latency(values: &[(usize, u64, f64)]) -> LatencyHistogram {
        let bounds = crate::dataplane::SYN_ACK_LATENCY_BOUNDS;
        let mut h =
            LatencyHistogram { bounds, counts: vec![0; bounds.len() + 1], sums: vec![0.0; bounds.len() + 1] };
        for &(i, n, secs) in values {
            h.counts[i] += n;
            h.sums[i] += n as f64 * secs;
        }
        h
    }

    pub(crate) fn running() -> Status {
        let mut provider = ProviderHealth::new("static", "static");
        provider.synced_now();
        Status {
            phase: Phase::Running,
            listen: Some(Ipv4Addr::new(10, 0, 0, 1)),
            interfaces: vec![InterfaceStatus {
                name: "eth0".into(),
                ifindex: 2,
                xdp_mode: "native".into(),
                transmit: "xdp_tx".into(),
                redirect_target: true,
            }],
            backends: vec![backend("be1", 2, 1000), backend("be2", 3, 2000)],
            provider: Some(provider),
            connections_active: 4,
            conntrack_capacity: 100,
            counters: [
                ("fwd_to_backend", 10),
                ("fwd_to_client", 20),
                ("new_flow", 3),
                ("drop_nat_exhausted", 1),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            ..Status::default()
        }
    }

    fn value(s: &Snapshot, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let f = s.family(name).unwrap_or_else(|| panic!("{name} missing"));
        f.points
            .iter()
            .find(|p| labels.iter().all(|(k, v)| p.labels.iter().any(|(pk, pv)| pk == k && pv == v)))
            .map(|p| p.value.as_f64().expect("a number"))
    }

    #[test]
    fn catalog_names_are_unique_and_valid_for_otel_and_prometheus() {
        let mut names: Vec<_> = CATALOG.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOG.len());
        for d in CATALOG {
            assert!(d.name.starts_with("xlb."), "{}", d.name);
            let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_';
            assert!(d.name.chars().all(ok), "{}", d.name);
            assert!(!d.prometheus_name().contains('.'));
            assert!(!d.help.is_empty() && !d.unit.is_empty());
            if d.kind == Kind::Histogram {
                assert!(!d.bounds.is_empty(), "{}", d.name);
                assert!(d.bounds.windows(2).all(|w| w[0] < w[1]), "{} bounds ascend", d.name);
                assert!(d.bounds.iter().all(|b| b.is_finite()), "{}", d.name);
            } else {
                assert!(d.bounds.is_empty(), "{}", d.name);
            }
        }
    }

    #[test]
    fn every_metric_is_documented_with_type_unit_and_labels() {
        let doc = include_str!("../../docs/metrics.md");
        for d in CATALOG {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", d.name)))
                .unwrap_or_else(|| panic!("docs/metrics.md has no row for {}", d.name));
            let kind = match d.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            assert!(row.contains(&format!("| {kind} |")), "{row}");
            assert!(row.contains(&format!("`{}`", d.unit)), "{row} lacks unit {}", d.unit);
            for l in d.labels {
                assert!(row.contains(&format!("`{l}`")), "{row} lacks label {l}");
            }
            let prom = d.prometheus_name() + if d.kind == Kind::Counter { "_total" } else { "" };
            assert!(doc.contains(&format!("`{prom}`")), "docs/metrics.md lacks {prom}");
        }
    }

    #[test]
    fn snapshot_reads_the_status_document() {
        let mut t = Tracker::default();
        let s = snapshot(&running(), &mut t, Instant::now(), 0);
        assert_eq!(s.families.len(), CATALOG.len());
        assert_eq!(value(&s, "xlb.global.backends.available", &[]), Some(2.0));
        assert_eq!(value(&s, "xlb.global.connections.active", &[]), Some(4.0));
        assert_eq!(value(&s, "xlb.global.connections.opened", &[]), Some(3.0));
        assert_eq!(value(&s, "xlb.global.connections.closed", &[]), Some(12.0));
        let be2 = [("backend", "10.0.0.3"), ("backend_name", "be2")];
        assert_eq!(value(&s, "xlb.ingress.bytes", &be2), Some(2000.0));
        assert_eq!(value(&s, "xlb.egress.bytes", &be2), Some(20000.0));
        assert_eq!(
            value(&s, "xlb.ingress.flows.closed", &[("backend", "10.0.0.3"), ("type", "rst")]),
            Some(1.0)
        );
        assert_eq!(value(&s, "xlb.packets", &[("action", "forward"), ("reason", "to_client")]), Some(20.0));
        assert_eq!(value(&s, "xlb.packets", &[("reason", "new_flow")]), None);
        assert_eq!(value(&s, "xlb.nat.port_allocation_failures", &[]), Some(1.0));
        assert!(s.family("xlb.drain.rst_sent").unwrap().points.is_empty());
        assert_eq!(value(&s, "xlb.conntrack.utilization", &[]), Some(0.04));
        assert_eq!(
            value(&s, "xlb.interface.xdp_mode", &[("interface", "eth0"), ("mode", "native")]),
            Some(1.0)
        );
        assert_eq!(value(&s, "xlb.provider.synced", &[("kind", "static")]), Some(1.0));
        assert_eq!(value(&s, "xlb.lifecycle.phase", &[("phase", "running")]), Some(1.0));
        assert_eq!(value(&s, "xlb.lifecycle.phase", &[("phase", "draining")]), Some(0.0));
        assert_eq!(value(&s, "xlb.ready", &[]), Some(1.0));

        let mut draining = running();
        draining.phase = Phase::Draining;
        draining.counters.insert("drain_rst".into(), 7);
        let s = snapshot(&draining, &mut t, Instant::now(), 0);
        assert_eq!(value(&s, "xlb.drain.rst_sent", &[]), Some(7.0));
        assert_eq!(value(&s, "xlb.packets", &[("action", "rst"), ("reason", "drain")]), Some(7.0));
        assert_eq!(value(&s, "xlb.ready", &[]), Some(0.0));
    }

    #[test]
    fn rates_are_averaged_over_the_window() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let mut s = running();
        let first = snapshot(&s, &mut t, t0, 0);
        assert_eq!(value(&first, "xlb.ingress.pps", &[("backend", "10.0.0.2")]), Some(0.0));
        s.backends[0].traffic.bytes_to_backend += 2_500_000;
        s.backends[0].traffic.packets_to_backend += 5_000;
        // Inside the window the last rates stand.
        let early = snapshot(&s, &mut t, t0 + Duration::from_secs(3), 0);
        assert_eq!(value(&early, "xlb.ingress.pps", &[("backend", "10.0.0.2")]), Some(0.0));
        let later = snapshot(&s, &mut t, t0 + Duration::from_secs(20), 0);
        assert_eq!(value(&later, "xlb.ingress.pps", &[("backend", "10.0.0.2")]), Some(250.0));
        assert_eq!(value(&later, "xlb.ingress.mbps", &[("backend", "10.0.0.2")]), Some(1.0));
        assert_eq!(value(&later, "xlb.egress.pps", &[("backend", "10.0.0.2")]), Some(0.0));
    }

    #[test]
    fn global_closed_counts_survive_a_backend_leaving_and_restarting() {
        let mut t = Tracker::default();
        let now = Instant::now();
        let closed = |s: &Snapshot| value(s, "xlb.global.connections.closed", &[]).unwrap();
        let mut s = running();
        assert_eq!(closed(&snapshot(&s, &mut t, now, 0)), 12.0);
        s.backends.remove(1);
        assert_eq!(closed(&snapshot(&s, &mut t, now, 0)), 12.0, "be2 left; its closures stay counted");
        s.backends[0].connections_closed_fin = 1;
        s.backends[0].connections_closed_rst = 0;
        assert_eq!(closed(&snapshot(&s, &mut t, now, 0)), 13.0, "be1's accounting restarted at 1");
    }

    #[test]
    fn health_metrics_only_with_health_checks() {
        let s = snapshot(&running(), &mut Tracker::default(), Instant::now(), 0);
        for name in ["xlb.global.backends.healthy", "xlb.health.fail_open", "xlb.backend.healthy"] {
            assert!(s.family(name).unwrap().points.is_empty(), "{name}");
        }
        let mut st = running();
        st.health_checks = Some(crate::status::HealthChecks {
            kind: "tcp",
            healthy: 0,
            unhealthy: 2,
            unknown: 0,
            fail_open: true,
        });
        st.backends[1].check.health = Some("unhealthy");
        st.backends[1].check.check_latency_ms = Some(1.5);
        st.backends[0].check.health = Some("healthy");
        let s = snapshot(&st, &mut Tracker::default(), Instant::now(), 0);
        assert_eq!(value(&s, "xlb.global.backends.healthy", &[]), Some(0.0));
        assert_eq!(value(&s, "xlb.health.fail_open", &[]), Some(1.0));
        assert_eq!(value(&s, "xlb.backend.healthy", &[("backend_name", "be1")]), Some(1.0));
        assert_eq!(value(&s, "xlb.backend.healthy", &[("backend_name", "be2")]), Some(0.0));
        assert_eq!(value(&s, "xlb.backend.check.latency", &[("backend_name", "be2")]), Some(0.0015));
        assert_eq!(value(&s, "xlb.ready", &[]), Some(0.0), "no_healthy_backends");
    }

    #[test]
    fn handshakes_and_their_latency_per_backend() {
        let mut st = running();
        // be1 has a data path behind it, be2 none (no histogram).
        st.backends[0].handshakes = crate::status::Handshakes {
            answered: 5,
            refused: 2,
            timed_out: 1,
            latency_mean_ms: Some(0.4),
            latency: latency(&[(1, 3, 0.000_08), (4, 2, 0.000_8)]),
        };
        let s = snapshot(&st, &mut Tracker::default(), Instant::now(), 0);
        let be1 = |result: &'static str| [("backend_name", "be1"), ("result", result)];
        assert_eq!(value(&s, "xlb.backend.handshakes", &be1("answered")), Some(5.0));
        assert_eq!(value(&s, "xlb.backend.handshakes", &be1("refused")), Some(2.0));
        assert_eq!(value(&s, "xlb.backend.handshakes", &be1("timed_out")), Some(1.0));
        assert_eq!(
            value(&s, "xlb.backend.handshakes", &[("backend_name", "be2"), ("result", "answered")]),
            Some(0.0),
            "every backend has its three counters"
        );
        let f = s.family("xlb.backend.syn_ack.latency").unwrap();
        assert_eq!(f.points.len(), 1, "only backends with a histogram: {f:?}");
        let p = &f.points[0];
        assert_eq!(p.labels, [("backend", "10.0.0.2".to_string()), ("backend_name", "be1".to_string())]);
        let Value::Histogram(h) = &p.value else { panic!("{p:?}") };
        assert_eq!(h.bounds, crate::dataplane::SYN_ACK_LATENCY_BOUNDS);
        assert_eq!(h.count(), 5);
        assert!((h.sum() - 0.001_84).abs() < 1e-12, "{}", h.sum());
        assert_eq!(h.bucket(0), (f64::NEG_INFINITY, 0.000_05));
        assert_eq!(h.bucket(1), (0.000_05, 0.000_1));
        assert_eq!(h.bucket(h.bounds.len()), (3.5, f64::INFINITY));
        let buckets: Vec<_> = h.buckets().collect();
        assert_eq!(buckets.len(), h.bounds.len() + 1);
        assert_eq!(buckets[1], (0.000_1, 3));
        assert_eq!(buckets[4], (0.001, 2));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 0)));
    }

    #[test]
    fn packet_outcomes() {
        assert_eq!(packet_outcome("fwd_to_backend"), ("forward", "to_backend"));
        assert_eq!(packet_outcome("pass_not_ours"), ("pass", "not_ours"));
        assert_eq!(packet_outcome("drop_ct_full"), ("drop", "ct_full"));
        assert_eq!(packet_outcome("drain_rst"), ("rst", "drain"));
        assert_eq!(packet_outcome("something_new"), ("other", "something_new"));
    }

    #[test]
    fn provider_age_and_absent_provider() {
        let mut s = running();
        s.provider.as_mut().unwrap().last_sync_unix_ms = Some(10_000);
        let snap = snapshot(&s, &mut Tracker::default(), Instant::now(), 12_500);
        assert_eq!(value(&snap, "xlb.provider.last_sync.age", &[]), Some(2.5));
        s.provider = None;
        let snap = snapshot(&s, &mut Tracker::default(), Instant::now(), 12_500);
        assert!(snap.family("xlb.provider.connected").unwrap().points.is_empty());
    }
}
