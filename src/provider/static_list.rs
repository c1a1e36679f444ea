//! `provider: static`: the backends listed in xlb.yaml, re-read on SIGHUP.
//! A reload changes only the backend set; a file that does not validate
//! is rejected with a log line and the running set stays.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use signal_hook::consts::SIGHUP;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Backend, Provider, ProviderHealth};
use crate::config::{Config, Provider as ProviderConfig, StaticProvider};

pub fn backends(p: &StaticProvider) -> Vec<Backend> {
    p.backends.iter().map(|b| Backend { name: b.name.clone(), addr: b.ip, weight: b.weight }).collect()
}

pub fn start(p: &StaticProvider, config_path: &Path) -> Provider {
    let (set_tx, set_rx) = watch::channel(backends(p));
    let mut health = ProviderHealth::new("static", "static");
    health.synced_now();
    let (health_tx, health_rx) = watch::channel(health);
    let path = config_path.to_path_buf();
    match signal_hook_tokio::Signals::new([SIGHUP]) {
        Ok(signals) => {
            tokio::spawn(reload_on_sighup(signals, path, set_tx, health_tx));
        }
        Err(e) => warn!("SIGHUP reload unavailable: {e}"),
    }
    Provider { backends: set_rx, health: health_rx }
}

async fn reload_on_sighup(
    mut signals: signal_hook_tokio::Signals,
    path: PathBuf,
    set: watch::Sender<Vec<Backend>>,
    health: watch::Sender<ProviderHealth>,
) {
    while signals.next().await.is_some() {
        info!(file = %path.display(), "SIGHUP: reloading backends");
        match reload(&path) {
            Ok(next) => {
                set.send_replace(next);
                health.send_modify(|h| h.synced_now());
            }
            Err(e) => {
                warn!("reload rejected, keeping the running backends: {e:#}");
                health.send_modify(|h| h.failed(&e));
            }
        }
    }
}

fn reload(path: &Path) -> anyhow::Result<Vec<Backend>> {
    let cfg = Config::load(path)?;
    match &cfg.provider {
        ProviderConfig::Static(s) => Ok(backends(s)),
        ProviderConfig::Kubernetes(_) => {
            anyhow::bail!("the provider changed to kubernetes; changing providers needs a restart")
        }
    }
}
