//! Provider updates -> maglev table -> data plane, in order, until the data
//! plane holds the latest set (a failed write is retried; readiness says
//! `not_converged` meanwhile).

use std::time::Duration;

use anyhow::Result;
use tokio::sync::watch;
use tracing::{info, warn};

use super::BackendSet;
use crate::dataplane::DataplaneHandle;
use crate::provider::Backend;
use crate::status::SharedStatus;

/// Installs a backend set (when it changed) and publishes it with its ids.
/// The set becomes current only once the data plane took its table, so a
/// failed write is tried again.
async fn apply(
    set: &mut BackendSet,
    next: Vec<Backend>,
    dp: &DataplaneHandle,
    published: &watch::Sender<Vec<(u32, Backend)>>,
) -> Result<()> {
    if let Some(p) = set.prepare(next) {
        dp.set_backends(p.table.clone()).await?;
        p.changes.log();
        set.commit(p);
        published.send_replace(set.current_with_ids());
    }
    Ok(())
}

/// How long a failed backend-table write waits before it is tried again.
const RETRY_APPLY: Duration = Duration::from_secs(1);

/// Provider updates -> maglev table -> data plane, in order; a failed write
/// is retried (readiness says `not_converged` meanwhile). The published set
/// also tells the interface manager where backends are.
pub async fn balancer_loop(
    mut set: BackendSet,
    mut updates: watch::Receiver<Vec<Backend>>,
    dp: DataplaneHandle,
    published: watch::Sender<Vec<(u32, Backend)>>,
    status: SharedStatus,
) {
    let mut failing = false;
    loop {
        if failing {
            tokio::select! {
                r = updates.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RETRY_APPLY) => {}
            }
        } else if updates.changed().await.is_err() {
            return;
        }
        let next = updates.borrow_and_update().clone();
        match apply(&mut set, next, &dp, &published).await {
            Ok(()) => {
                if failing {
                    info!("backend table written: the data plane has converged");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!("writing the backend table failed: {e:#}; retrying every {RETRY_APPLY:?}");
                }
                failing = true;
            }
        }
        status.update(|s| s.converged = !failing);
    }
}
