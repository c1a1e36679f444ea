//! The status document on its own clock (see `status_loop`).

use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use crate::accounting::{backend_status, Totals};
use crate::dataplane::DataplaneHandle;
use crate::provider::{Backend, ProviderHealth};
use crate::status::SharedStatus;
use crate::sweep::STATS_INTERVAL;

/// How long a data-plane call may take before the status loop stops
/// waiting for it (the watchdog in /healthz counts from the last answer).
const DATAPLANE_CALL_LIMIT: Duration = Duration::from_secs(2);

/// The status document on its own clock, every second whatever the sweep
/// does: counters, provider health, the backends with their accounting,
/// and how long the data plane has been busy (the /healthz watchdog).
pub async fn status_loop(
    dp: DataplaneHandle,
    status: SharedStatus,
    totals: Totals,
    set: watch::Receiver<Vec<(u32, Backend)>>,
    health: watch::Receiver<ProviderHealth>,
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
        let provider = health.borrow().clone();
        status.update(|s| {
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
