//! The status document on its own clock (see `status_loop`).

use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use crate::accounting::{backend_status, Totals};
use crate::dataplane::DataplaneHandle;
use crate::health::{Health, Report};
use crate::provider::{Backend, ProviderHealth};
use crate::status::{BackendStatus, CheckStatus, HealthChecks, SharedStatus};
use crate::sweep::STATS_INTERVAL;

/// How long a data-plane call may take before the status loop stops
/// waiting for it (the watchdog in /healthz counts from the last answer).
const DATAPLANE_CALL_LIMIT: Duration = Duration::from_secs(2);

/// The status document on its own clock, every second whatever the sweep
/// does: counters, provider health, the backends with their accounting,
/// the health checks (`checks`, when configured) and how long the data
/// plane has been busy (the /healthz watchdog).
pub async fn status_loop(
    dp: DataplaneHandle,
    status: SharedStatus,
    totals: Totals,
    set: watch::Receiver<Vec<(u32, Backend)>>,
    health: watch::Receiver<ProviderHealth>,
    checks: Option<watch::Receiver<Report>>,
) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let counters = tokio::time::timeout(DATAPLANE_CALL_LIMIT, dp.counters()).await;
        let current = set.borrow().clone();
        let backends = {
            let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
            for (_, b) in &current {
                totals.entry(b.addr).or_default().backend = Some(b.clone());
            }
            backend_status(&current, &totals)
        };
        let (backends, health_checks) = match &checks {
            None => (backends, None),
            Some(r) => {
                let (b, h) = with_health(backends, &r.borrow());
                (b, Some(h))
            }
        };
        let provider = health.borrow().clone();
        status.update(|s| {
            s.health_checks = health_checks;
            s.data_plane_busy_since_unix_ms = dp.busy_since();
            s.backends = backends;
            s.provider = Some(provider);
            match counters {
                Ok(Ok(c)) => {
                    s.counters = c.iter().map(|(k, v)| (k.to_string(), v)).collect();
                }
                Ok(Err(e)) => warn!("reading counters failed: {e:#}"),
                Err(_) => warn!("the data plane did not answer within {DATAPLANE_CALL_LIMIT:?}"),
            }
        });
    }
}

/// Adds each backend's health check to its status, and lists the backends
/// the checks keep out of the table (`excluded`), whether or not they
/// still carry connections.
pub fn with_health(mut backends: Vec<BackendStatus>, r: &Report) -> (Vec<BackendStatus>, HealthChecks) {
    for l in &r.listed {
        match backends.iter_mut().find(|b| b.address == l.addr) {
            Some(b) => {
                if b.state == "draining" {
                    b.state = "excluded";
                }
                (b.name, b.weight) = (l.name.clone(), l.weight);
            }
            None => backends.push(BackendStatus {
                name: l.name.clone(),
                address: l.addr,
                weight: l.weight,
                state: "excluded",
                connections_active: 0,
                connections_closed_fin: 0,
                connections_closed_rst: 0,
                connections_orphaned: 0,
                traffic: Default::default(),
                check: CheckStatus::default(),
                handshakes: Default::default(),
            }),
        }
    }
    for b in &mut backends {
        if let Some(h) = r.health.get(&b.address) {
            b.check = CheckStatus {
                health: Some(h.state.as_str()),
                last_check: h.last_result.clone(),
                health_changed_unix_ms: h.last_change_unix_ms,
                check_latency_ms: h.latency.map(|d| d.as_secs_f64() * 1000.0),
            };
        }
    }
    backends.sort_by_key(|b| b.address);
    let summary = HealthChecks {
        kind: r.kind,
        healthy: r.count(Health::Healthy) as u64,
        unhealthy: r.count(Health::Unhealthy) as u64,
        unknown: r.count(Health::Unknown) as u64,
        fail_open: r.fail_open,
    };
    (backends, summary)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::health::{BackendHealth, Observation, Thresholds};

    #[test]
    fn listed_backends_kept_out_by_their_check_show_as_excluded() {
        let be =
            |last: u8| Backend { name: format!("be{last}"), addr: Ipv4Addr::new(10, 0, 0, last), weight: 1 };
        let mut r = Report { kind: "tcp", listed: vec![be(1), be(2)], ..Report::default() };
        let t = Thresholds { rise: 2, fall: 3 };
        for (last, ok, detail) in [(1, true, "connect ok"), (2, false, "connect refused")] {
            let mut h = BackendHealth::default();
            h.observe(&Observation { ok, detail: detail.into(), latency: Duration::from_millis(2) }, t, 9);
            r.health.insert(Ipv4Addr::new(10, 0, 0, last), h);
        }
        let active = crate::telemetry::metrics::tests::backend("be1", 1, 10);
        let (list, summary) = with_health(vec![active], &r);
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].state, list[0].check.health), ("active", Some("healthy")));
        assert_eq!((list[1].state, list[1].check.health), ("excluded", Some("unhealthy")));
        assert_eq!(list[1].check.last_check.as_deref(), Some("connect refused"));
        assert_eq!(list[1].check.health_changed_unix_ms, Some(9));
        assert_eq!(list[1].check.check_latency_ms, Some(2.0));
        assert_eq!(
            (summary.healthy, summary.unhealthy, summary.unknown, summary.fail_open),
            (1, 1, 0, false)
        );
    }
}
