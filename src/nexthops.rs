//! Keeps the data path's route cache honest: every change that can move a
//! next hop (link, address, route, neighbour, rule) makes the cached answers
//! stale at once (a new generation); the program looks them up again. The
//! cache's own 1 s expiry (XLB_NEXTHOP_TTL_NS) covers a missed event.

use std::time::Duration;

use futures::StreamExt;
use tracing::warn;

use crate::dataplane::DataplaneHandle;

/// Events that arrive together (an interface going down takes its
/// addresses, routes and neighbours with it) make one new generation.
const SETTLE: Duration = Duration::from_millis(10);

pub async fn invalidate_loop(dp: DataplaneHandle) {
    let mut events = match crate::netinfo::forwarding_changes() {
        Ok(e) => e,
        Err(e) => {
            warn!("route cache: no netlink events ({e:#}); cached next hops live out their 1 s");
            return;
        }
    };
    while events.next().await.is_some() {
        tokio::time::sleep(SETTLE).await;
        // Whatever else arrived meanwhile is covered by this bump.
        while let Some(Some(())) = futures::FutureExt::now_or_never(events.next()) {}
        if let Err(e) = dp.invalidate_nexthops().await {
            warn!("route cache: {e:#}");
            return;
        }
    }
}
