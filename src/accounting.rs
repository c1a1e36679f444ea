//! Per-backend accounting across conntrack sweeps, keyed by backend address
//! (ids are per process; adopted connections carry an earlier one's), and
//! the per-backend view of the status document built from it.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::dataplane::{GcStats, Handshakes, RetiredFlows, Traffic, SYN_ACK_LATENCY_BOUNDS};
use crate::provider::Backend;
use crate::status::{self, BackendStatus, LatencyHistogram};

/// Per-backend accounting kept across sweeps, by backend address.
#[derive(Debug, Default)]
pub struct BackendTotals {
    /// As the current set last listed it (None: known only by address).
    pub backend: Option<Backend>,
    active: u64,
    live: Traffic,
    /// Connections the sweeps removed, by how they ended.
    closed_fin: u64,
    closed_rst: u64,
    orphaned: u64,
    /// Closed connections the last sweep found still holding their port.
    held: Closed,
    /// What status and metrics show as closed: removed + held + retired,
    /// never less than shown before (a pair reopened between the reading of
    /// `retired` and the walk is briefly in neither).
    closed_reported: Closed,
    /// Traffic of connections that have ended.
    ended: Traffic,
    /// What status and metrics show: never less than shown before.
    reported: Traffic,
    /// The data path's retired connections for this backend as last read
    /// (cumulative), to add only what is new.
    retired_seen: RetiredFlows,
    /// How it answered new connections, as last read (cumulative), and the
    /// SYNs the sweeps found unanswered (passive_health only).
    handshakes: Handshakes,
    syn_timeouts: u64,
}

impl BackendTotals {
    /// The status document's view of its handshakes.
    fn handshakes(&self) -> status::Handshakes {
        let h = &self.handshakes;
        let answered = h.answered();
        let latency_sum: u64 = h.latency_ns.iter().sum();
        status::Handshakes {
            answered,
            refused: h.refused,
            timed_out: self.syn_timeouts,
            latency_mean_ms: (answered > 0).then(|| latency_sum as f64 / answered as f64 / 1e6),
            latency: LatencyHistogram {
                bounds: SYN_ACK_LATENCY_BOUNDS,
                counts: h.answered.to_vec(),
                sums: h.latency_ns.iter().map(|&ns| ns as f64 / 1e9).collect(),
            },
        }
    }
}

/// Closed connections by how they ended.
#[derive(Debug, Default, Clone, Copy)]
struct Closed {
    fin: u64,
    rst: u64,
}

impl BackendTotals {
    /// ended + live, but never below what was reported: a counter must not
    /// go down. Pairs the data path replaced are in `ended` through its
    /// retired traffic; this guard covers what could still slip (a retired
    /// entry the LRU map evicted). True when it had to hold a value.
    pub fn report(&mut self) -> bool {
        let mut now = self.ended;
        now.add(&self.live);
        let r = &mut self.reported;
        let fell = now.bytes_to_backend < r.bytes_to_backend
            || now.bytes_to_client < r.bytes_to_client
            || now.packets_to_backend < r.packets_to_backend
            || now.packets_to_client < r.packets_to_client;
        r.bytes_to_backend = r.bytes_to_backend.max(now.bytes_to_backend);
        r.bytes_to_client = r.bytes_to_client.max(now.bytes_to_client);
        r.packets_to_backend = r.packets_to_backend.max(now.packets_to_backend);
        r.packets_to_client = r.packets_to_client.max(now.packets_to_client);
        let c = &mut self.closed_reported;
        let fin = self.closed_fin + self.held.fin + self.retired_seen.closed_fin;
        let rst = self.closed_rst + self.held.rst + self.retired_seen.closed_rst;
        c.fin = c.fin.max(fin);
        c.rst = c.rst.max(rst);
        fell
    }
}

pub type Totals = std::sync::Arc<std::sync::Mutex<HashMap<Ipv4Addr, BackendTotals>>>;

/// The current set (active) plus backends that left it but still carry
/// connections (draining).
pub fn backend_status(
    current: &[(u32, Backend)],
    totals: &HashMap<Ipv4Addr, BackendTotals>,
) -> Vec<BackendStatus> {
    let mut out: Vec<BackendStatus> = totals
        .iter()
        .filter_map(|(addr, t)| {
            // A backend this process never listed (connections adopted from
            // an earlier one) is known by its address alone.
            let unknown = Backend { name: addr.to_string(), addr: *addr, weight: 0 };
            let b = t.backend.as_ref().unwrap_or(&unknown);
            let state = if current.iter().any(|(_, c)| c.addr == *addr) {
                "active"
            } else if t.active > 0 {
                "draining"
            } else {
                return None;
            };
            let traffic = t.reported;
            Some(BackendStatus {
                name: b.name.clone(),
                address: b.addr,
                weight: b.weight,
                state,
                connections_active: t.active,
                connections_closed_fin: t.closed_reported.fin,
                connections_closed_rst: t.closed_reported.rst,
                connections_orphaned: t.orphaned,
                traffic,
                check: Default::default(),
                handshakes: t.handshakes(),
            })
        })
        .collect();
    out.sort_by_key(|b| b.address);
    out
}

/// Folds one sweep's findings into the totals; a sweep reports live
/// connections afresh and adds what it removed.
pub fn fold_sweep(totals: &Totals, gc: &GcStats) {
    let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
    for t in totals.values_mut() {
        t.active = 0;
        t.live = Default::default();
        t.held = Closed::default();
    }
    for (addr, f) in &gc.per_backend {
        let t = totals.entry(*addr).or_default();
        t.active = f.active;
        t.live = f.live;
        t.closed_fin += f.closed_fin;
        t.closed_rst += f.closed_rst;
        t.orphaned += f.orphaned;
        t.held = Closed { fin: f.held_fin, rst: f.held_rst };
        t.ended.add(&f.removed);
    }
    for (addr, h) in &gc.handshakes {
        totals.entry(*addr).or_default().handshakes = *h;
    }
    for (addr, f) in &gc.per_backend {
        if f.syn_timeouts > 0 {
            totals.entry(*addr).or_default().syn_timeouts += f.syn_timeouts;
        }
    }
    // Pairs the data path replaced ended too: their final traffic counts.
    for (addr, r) in &gc.retired {
        let t = totals.entry(*addr).or_default();
        t.ended.add(&r.traffic.since(&t.retired_seen.traffic));
        t.retired_seen = *r;
    }
    for (addr, t) in totals.iter_mut() {
        if t.report() {
            tracing::debug!(backend = %addr, "per-backend traffic held at its last value");
        }
    }
}

#[cfg(test)]
mod accounting_tests {
    use super::*;

    fn traffic(b: u64) -> Traffic {
        Traffic { bytes_to_backend: b, packets_to_backend: b, bytes_to_client: b, packets_to_client: b }
    }

    #[test]
    fn reported_traffic_never_goes_down() {
        let mut t = BackendTotals::default();
        let mut shown = Vec::new();
        // (ended, live) as sweeps see them: a connection of 500 bytes ends
        // normally; then a pair reaches 300 and is replaced by the data path
        // before a sweep removes it (live drops, ended does not grow); then
        // its successor grows past what was shown.
        for (ended, live) in [(0, 100), (0, 500), (500, 0), (500, 300), (500, 0), (500, 200), (900, 100)] {
            t.ended = traffic(ended);
            t.live = traffic(live);
            t.report();
            shown.push(t.reported.bytes_to_backend);
        }
        assert_eq!(shown, [100, 500, 500, 800, 800, 800, 1000]);
    }
}

#[cfg(test)]
mod fold_tests {
    use super::*;
    use crate::dataplane::{BackendFlows, RetiredFlows};

    fn bytes(b: u64) -> Traffic {
        Traffic { bytes_to_backend: b, ..Default::default() }
    }

    #[test]
    fn a_pair_the_data_path_replaced_counts_through_its_retired_traffic() {
        let be: Ipv4Addr = "10.0.0.1".parse().unwrap();
        let totals = Totals::default();
        let shown = || totals.lock().unwrap()[&be].reported.bytes_to_backend;
        // A sweep sees a live connection of 300 bytes.
        let mut gc = GcStats::default();
        gc.per_backend.insert(be, BackendFlows { active: 1, live: bytes(300), ..Default::default() });
        fold_sweep(&totals, &gc);
        assert_eq!(shown(), 300);
        // It reached 400 and was replaced by the data path before the next
        // sweep; its successor has 50 so far.
        let mut gc = GcStats::default();
        gc.per_backend.insert(be, BackendFlows { active: 1, live: bytes(50), ..Default::default() });
        gc.retired.insert(be, RetiredFlows { closed_fin: 1, traffic: bytes(400), ..Default::default() });
        fold_sweep(&totals, &gc);
        assert_eq!(shown(), 450, "the replaced pair's 400 plus the live 50");
        assert_eq!(totals.lock().unwrap()[&be].closed_reported.fin, 1, "it counts as closed");
        // The retired reading is cumulative: the same reading adds nothing.
        fold_sweep(&totals, &gc);
        assert_eq!(shown(), 450);
    }
}
