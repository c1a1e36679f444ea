//! The conntrack sweep with its policy: finished and idle connections are
//! removed (both entries of a pair together), the per-backend accounting is
//! folded in, and the interface manager learns where connections still go.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use crate::accounting::{self, Totals};
use crate::dataplane::{DataplaneHandle, GcPolicy};
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

/// Expiry of finished connections and the per-backend accounting it
/// yields; also tells the interface manager where connections still go, and
/// engages the SYN proxy (syn_proxy: auto, `auto` Some) under a SYN flood.
pub async fn sweep_loop(
    dp: DataplaneHandle,
    status: SharedStatus,
    totals: Totals,
    in_use: watch::Sender<Option<InUse>>,
    orphan_ttl_secs: u64,
    mut auto: Option<SynProxyAuto>,
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
    loop {
        tokio::time::sleep(pause).await;
        pause = STATS_INTERVAL;
        let sweep_started = std::time::Instant::now();
        let policy = GcPolicy { now_ns: crate::dataplane::now_ns(), ..ttls };
        let gc = match dp.expire_flows(policy).await {
            Ok(gc) => gc,
            Err(e) => {
                warn!("conntrack sweep failed: {e:#}");
                continue;
            }
        };
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
    fn auto_engages_at_the_threshold_and_lets_go_below_half() {
        let mut a = SynProxyAuto { threshold: 100, engaged: false };
        assert!(!a.decide(99));
        assert!(a.decide(100));
        assert!(a.decide(50), "still flooding: no flapping");
        assert!(!a.decide(49));
        assert!(!a.decide(99));
    }
}
