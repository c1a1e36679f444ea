//! The running provider behind outputs that never change: a reload may
//! replace the provider (another static list, another Kubernetes service or
//! namespace, another kind) while the balancer and the status keep reading
//! the same channels. A new provider takes over only once it has synced:
//! until then, and for good if it never does, the running one serves.

use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{start, Backend, Provider, ProviderHealth, Sources, TaskGuard};
use crate::config::{Config, Provider as ProviderConfig};

/// How long a new provider may take to sync before the reload is given up.
const SYNC_LIMIT: Duration = Duration::from_secs(30);

/// The outputs, as for a single provider.
pub struct Supervised {
    pub backends: watch::Receiver<Vec<Backend>>,
    pub health: watch::Receiver<ProviderHealth>,
}

/// Asks the supervisor to switch providers or to count a failed reload.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Cmd>,
    current: watch::Receiver<ProviderConfig>,
}

enum Cmd {
    Replace(ProviderConfig),
    Failed(String),
}

impl Supervisor {
    /// Starts the provider `cfg` names, supervised.
    pub async fn start(cfg: &Config, sources: Sources) -> Result<(Supervisor, Supervised, TaskGuard)> {
        let first = start(cfg, &sources).await?;
        let (set_tx, set_rx) = watch::channel(first.backends.borrow().clone());
        let (health_tx, health_rx) = watch::channel(first.health.borrow().clone());
        let (current_tx, current) = watch::channel(cfg.provider.clone());
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(run(first, cfg.clone(), sources, rx, set_tx, health_tx, current_tx));
        Ok((Supervisor { tx, current }, Supervised { backends: set_rx, health: health_rx }, TaskGuard(task)))
    }

    /// The provider configuration that serves now.
    pub fn current(&self) -> ProviderConfig {
        self.current.borrow().clone()
    }

    /// Starts the provider `next` describes; it replaces the running one once
    /// it has synced (logged), or is given up after SYNC_LIMIT (logged and
    /// counted). Returns at once.
    pub async fn replace(&self, next: ProviderConfig) -> Result<()> {
        self.tx.send(Cmd::Replace(next)).await.map_err(|_| anyhow!("the provider supervisor stopped"))
    }

    /// Counts a rejected reload in the provider's health (errors, last error).
    pub async fn failed(&self, e: &anyhow::Error) {
        let _ = self.tx.send(Cmd::Failed(format!("{e:#}"))).await;
    }
}

/// Starts a provider and waits until it has synced.
async fn start_synced(cfg: Config, sources: Sources) -> Result<Provider> {
    let mut p = start(&cfg, &sources).await?;
    let synced = match tokio::time::timeout(SYNC_LIMIT, p.health.wait_for(|h| h.synced)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(anyhow!("the new provider stopped before it synced")),
        Err(_) => Err(anyhow!("the new provider did not sync within {}s", SYNC_LIMIT.as_secs())),
    };
    synced.map(|()| p)
}

async fn run(
    mut current: Provider,
    mut cfg: Config,
    sources: Sources,
    mut rx: mpsc::Receiver<Cmd>,
    set: watch::Sender<Vec<Backend>>,
    health: watch::Sender<ProviderHealth>,
    current_cfg: watch::Sender<ProviderConfig>,
) {
    // Errors of earlier providers and of rejected reloads, added to what
    // the serving provider says, so the errors counter never goes down.
    let (mut errors, mut last_error) = (0u64, None::<String>);
    let publish_health = |h: &ProviderHealth, errors: u64, last: &Option<String>| {
        let mut h = h.clone();
        h.errors += errors;
        if last.is_some() {
            h.last_error = last.clone();
        }
        health.send_replace(h);
    };
    // The provider being started by a reload, delivered here once synced.
    let (ready_tx, mut ready_rx) = mpsc::channel::<(ProviderConfig, Result<Provider>)>(1);
    let mut pending: Option<tokio::task::JoinHandle<()>> = None;
    // A static provider's senders are gone at once: its set never changes.
    let (mut set_open, mut health_open) = (true, true);
    loop {
        tokio::select! {
            r = current.backends.changed(), if set_open => match r {
                Ok(()) => {
                    set.send_replace(current.backends.borrow_and_update().clone());
                }
                Err(_) => set_open = false,
            },
            r = current.health.changed(), if health_open => match r {
                Ok(()) => publish_health(&current.health.borrow_and_update(), errors, &last_error),
                Err(_) => health_open = false,
            },
            Some((next, res)) = ready_rx.recv() => match res {
                Ok(p) => {
                    info!("reload applied: provider replaced by {}", describe(&next));
                    errors += current.health.borrow().errors;
                    current = p;
                    cfg.provider = next.clone();
                    current_cfg.send_replace(next);
                    (set_open, health_open) = (true, true);
                    set.send_replace(current.backends.borrow_and_update().clone());
                    publish_health(&current.health.borrow_and_update(), errors, &last_error);
                }
                Err(e) => {
                    warn!("reload rejected, keeping the running provider: {e:#}");
                    errors += 1;
                    last_error = Some(format!("{e:#}"));
                    publish_health(&current.health.borrow(), errors, &last_error);
                }
            },
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Cmd::Failed(e)) => {
                    errors += 1;
                    last_error = Some(e);
                    publish_health(&current.health.borrow(), errors, &last_error);
                }
                Some(Cmd::Replace(next)) => {
                    // A newer reload supersedes one still starting.
                    if let Some(p) = pending.take() {
                        p.abort();
                    }
                    info!("reload: starting {}; it takes over once it has synced", describe(&next));
                    let mut next_cfg = cfg.clone();
                    next_cfg.provider = next.clone();
                    let (tx, sources) = (ready_tx.clone(), sources.clone());
                    pending = Some(tokio::spawn(async move {
                        let res = start_synced(next_cfg, sources).await;
                        let _ = tx.send((next, res)).await;
                    }));
                }
            }
        }
    }
}

fn describe(p: &ProviderConfig) -> String {
    match p {
        ProviderConfig::Static(s) => format!("static, {} backends", s.backends.len()),
        ProviderConfig::Kubernetes(k) => format!("kubernetes service {}/{}", k.namespace, k.service),
    }
}
