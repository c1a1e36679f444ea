//! The conntrack sweep with its policy: finished and idle connections are
//! removed (both entries of a pair together), the per-backend accounting is
//! folded in, and the interface manager learns where connections still go.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::warn;

use crate::accounting::{self, Totals};
use crate::dataplane::{DataplaneHandle, GcPolicy, GcStats};
use crate::health::{HandshakeNews, HandshakeReport};
use crate::ifaces::InUse;
use crate::status::SharedStatus;

/// How long a closed connection (FIN both ways, or RST) keeps its entries:
/// long enough for the last ACK and stray retransmissions.
const CLOSED_TTL: Duration = Duration::from_secs(10);
/// CLOSED_TTL, or XLB_CLOSED_TTL_SECS (tests: a short one shows that the
/// tombstones, not the closed grace period, keep ports off TIME_WAIT).
fn closed_ttl() -> Duration {
    std::env::var("XLB_CLOSED_TTL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(CLOSED_TTL, Duration::from_secs)
}

/// How long a closed connection whose backend closed first keeps its
/// entries, and so its NAT port: the backend holds the 4-tuple in TIME_WAIT
/// for 60 s (Linux's fixed TCP_TIMEWAIT_LEN), and a different client handed
/// that port meanwhile would be answered with a stale ACK. The same client
/// tuple reopens the pair at once (conntrack.h ct_reopen). 10 s of slack
/// covers the sweep's own period and clock steps.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(70);
/// How long a connection whose handshake never completed keeps its entries:
/// a SYN flood must not fill the table for orphan_ttl_secs.
const HALF_OPEN_TTL: Duration = Duration::from_secs(30);
/// How often counters are read and expired connections swept.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// syn_proxy: auto, decided once per sweep from the half-open connections
/// counted: engaged at the threshold, released below half of it, so a flood
/// near the threshold does not flap it.
#[derive(Debug, Clone, Copy)]
pub struct SynProxyAuto {
    pub threshold: u64,
    pub engaged: bool,
}

impl SynProxyAuto {
    /// Whether the proxy should be engaged now; logs a change.
    pub fn decide(&mut self, half_open: u64) -> bool {
        let engage = if self.engaged { half_open * 2 >= self.threshold } else { half_open >= self.threshold };
        if engage != self.engaged {
            if engage {
                warn!(
                    half_open,
                    threshold = self.threshold,
                    "SYN flood: SYN proxy engaged, new connections are answered with SYN cookies"
                );
            } else {
                tracing::info!(half_open, "SYN flood over: SYN proxy released");
            }
        }
        self.engaged = engage;
        engage
    }
}

/// Passive health checking's source: each sweep counts the SYNs left
/// unanswered for `syn_timeout` and sends every backend's handshake news.
pub struct PassiveFeed {
    pub syn_timeout: Duration,
    pub tx: mpsc::Sender<HandshakeReport>,
}

/// What each backend's handshakes were at the last sweep, to send news.
#[derive(Default)]
struct HandshakesSeen(HashMap<Ipv4Addr, (u64, u64)>);

impl HandshakesSeen {
    /// This sweep's news: answers and refusals since the last reading, and
    /// the SYNs this sweep found unanswered.
    fn news(&mut self, gc: &GcStats) -> HashMap<Ipv4Addr, HandshakeNews> {
        let mut report = HashMap::new();
        for (addr, h) in &gc.handshakes {
            let now = (h.answered(), h.refused);
            // A reading below the last one: the data path's entry started
            // over (an LRU eviction); all of it is new.
            let then = self.0.insert(*addr, now).filter(|t| t.0 <= now.0 && t.1 <= now.1).unwrap_or_default();
            let n: &mut HandshakeNews = report.entry(*addr).or_default();
            (n.answered, n.refused) = (now.0 - then.0, now.1 - then.1);
        }
        for (addr, b) in &gc.per_backend {
            if b.syn_timeouts > 0 {
                report.entry(*addr).or_default().timed_out = b.syn_timeouts;
            }
        }
        report.retain(|_, n| *n != HandshakeNews::default());
        report
    }
}

/// Expiry of finished connections and the per-backend accounting it
/// yields; also tells the interface manager where connections still go,
/// engages the SYN proxy (syn_proxy: auto, `auto` Some) under a SYN flood,
/// and feeds passive health checking (`passive` Some).
pub async fn sweep_loop(
    dp: DataplaneHandle,
    status: SharedStatus,
    totals: Totals,
    in_use: watch::Sender<Option<InUse>>,
    orphan_ttl_secs: u64,
    mut auto: Option<SynProxyAuto>,
    passive: Option<PassiveFeed>,
) {
    let mut pause = Duration::ZERO;
    // Tests that watch sweeps over a million connections cap the back-off
    // (XLB_SWEEP_MAX_PAUSE_MS) so a loaded machine cannot outwait them.
    let max_pause = std::env::var("XLB_SWEEP_MAX_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::MAX, Duration::from_millis);
    let ttls = GcPolicy {
        now_ns: 0,
        idle_ns: orphan_ttl_secs.saturating_mul(1_000_000_000),
        closed_ns: closed_ttl().as_nanos() as u64,
        tombstone_ns: TOMBSTONE_TTL.as_nanos() as u64,
        half_open_ns: HALF_OPEN_TTL.as_nanos() as u64,
        unanswered_created: None,
    };
    let mut seen = HandshakesSeen::default();
    // Each sweep counts the unanswered SYNs whose deadline passed since the
    // last one's start: adjoining ranges, so each is counted once.
    let started_ns = crate::dataplane::now_precise_ns();
    let mut deadline_passed = started_ns;
    loop {
        tokio::time::sleep(pause).await;
        pause = STATS_INTERVAL;
        let sweep_started = std::time::Instant::now();
        let deadline_now = crate::dataplane::now_precise_ns();
        let unanswered_created = passive.as_ref().map(|p| {
            let timeout = p.syn_timeout.as_nanos() as u64;
            // Nothing from before this process: connections adopted from an
            // earlier one carry no answered mark of this one's making.
            let upto = deadline_now.saturating_sub(timeout).max(started_ns);
            (deadline_passed.saturating_sub(timeout).max(started_ns), upto)
        });
        let policy = GcPolicy { now_ns: crate::dataplane::now_ns(), unanswered_created, ..ttls };
        let gc = match dp.expire_flows(policy).await {
            Ok(gc) => gc,
            Err(e) => {
                warn!("conntrack sweep failed: {e:#}");
                continue;
            }
        };
        deadline_passed = deadline_now;
        if let (Some(p), Some(created)) = (&passive, unanswered_created) {
            // Waits while the health loop is behind; ends with it.
            let _ = p.tx.send(HandshakeReport { created, backends: seen.news(&gc) }).await;
        }
        // A sweep reads every entry: with millions of connections, sweep
        // less often so it stays under ~10% of one core.
        let took = sweep_started.elapsed();
        pause = STATS_INTERVAL.max(took * 10).min(max_pause);
        tracing::debug!(
            ms = took.as_millis() as u64,
            active = gc.active,
            closed = gc.closed,
            orphaned = gc.orphaned,
            unpaired = gc.unpaired,
            "conntrack sweep"
        );
        accounting::fold_sweep(&totals, &gc);
        // Where connections still go, as of this sweep's start.
        let busy: Vec<Ipv4Addr> = gc.backend_addrs.iter().copied().collect();
        in_use.send_replace(Some(InUse { since: sweep_started, addrs: busy }));
        if let Some(a) = auto.as_mut() {
            let was = a.engaged;
            let now = a.decide(gc.half_open);
            if now != was {
                if let Err(e) = dp.set_syn_proxy(now).await {
                    warn!("setting the SYN proxy failed: {e:#}");
                    a.engaged = was;
                }
            }
        }
        let engaged = auto.map(|a| a.engaged);
        status.update(|s| {
            s.connections_active = gc.active;
            s.connections_half_open = gc.half_open;
            if let Some(e) = engaged {
                s.syn_proxy_engaged = e;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_news_is_what_changed_since_the_last_sweep() {
        use crate::dataplane::{BackendFlows, Handshakes};
        let (a, b): (Ipv4Addr, Ipv4Addr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let reading = |answered: u64, refused: u64| {
            let mut h = Handshakes { refused, ..Default::default() };
            h.answered[3] = answered;
            h
        };
        let mut seen = HandshakesSeen::default();
        let mut gc = GcStats::default();
        gc.handshakes.insert(a, reading(5, 1));
        gc.per_backend.insert(b, BackendFlows { syn_timeouts: 2, ..Default::default() });
        let news = seen.news(&gc);
        assert_eq!(news[&a], HandshakeNews { answered: 5, refused: 1, timed_out: 0 });
        assert_eq!(news[&b], HandshakeNews { answered: 0, refused: 0, timed_out: 2 });
        // Nothing new: no news at all.
        gc.per_backend.clear();
        assert!(seen.news(&gc).is_empty());
        gc.handshakes.insert(a, reading(7, 1));
        assert_eq!(seen.news(&gc)[&a], HandshakeNews { answered: 2, refused: 0, timed_out: 0 });
        // The data path's entry started over: all of it is news.
        gc.handshakes.insert(a, reading(1, 0));
        assert_eq!(seen.news(&gc)[&a], HandshakeNews { answered: 1, refused: 0, timed_out: 0 });
    }

    #[test]
    fn auto_engages_at_the_threshold_and_lets_go_below_half() {
        let mut a = SynProxyAuto { threshold: 100, engaged: false };
        assert!(!a.decide(99));
        assert!(a.decide(100));
        assert!(a.decide(50), "still flooding: no flapping");
        assert!(!a.decide(49));
        assert!(!a.decide(99));
    }
}
