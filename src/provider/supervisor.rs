//! The running provider behind outputs that never change: a reload may
//! replace the provider (another static list, another Kubernetes service or
//! namespace, another kind) while the balancer and the status keep reading
//! the same channels.

use anyhow::{anyhow, Result};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::info;

use super::{start, Backend, Provider, ProviderHealth, Sources, TaskGuard};
use crate::config::{Config, Provider as ProviderConfig};

/// The outputs, as for a single provider.
pub struct Supervised {
    pub backends: watch::Receiver<Vec<Backend>>,
    pub health: watch::Receiver<ProviderHealth>,
}

/// Asks the supervisor to switch providers or to count a failed reload.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Cmd>,
}

enum Cmd {
    Replace(ProviderConfig, oneshot::Sender<Result<()>>),
    Failed(String),
}

impl Supervisor {
    /// Starts the provider `cfg` names, supervised.
    pub async fn start(cfg: &Config, sources: Sources) -> Result<(Supervisor, Supervised, TaskGuard)> {
        let first = start(cfg, &sources).await?;
        let (set_tx, set_rx) = watch::channel(first.backends.borrow().clone());
        let (health_tx, health_rx) = watch::channel(first.health.borrow().clone());
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(run(first, cfg.clone(), sources, rx, set_tx, health_tx));
        Ok((Supervisor { tx }, Supervised { backends: set_rx, health: health_rx }, TaskGuard(task)))
    }

    /// Starts the provider `next` describes and retires the running one once
    /// the new one is up; on an error the running one stays.
    pub async fn replace(&self, next: ProviderConfig) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Replace(next, tx)).await.map_err(|_| anyhow!("the provider supervisor stopped"))?;
        rx.await.map_err(|_| anyhow!("the provider supervisor stopped"))?
    }

    /// Counts a rejected reload in the provider's health (errors, last error).
    pub async fn failed(&self, e: &anyhow::Error) {
        let _ = self.tx.send(Cmd::Failed(format!("{e:#}"))).await;
    }
}

async fn run(
    mut current: Provider,
    mut cfg: Config,
    sources: Sources,
    mut rx: mpsc::Receiver<Cmd>,
    set: watch::Sender<Vec<Backend>>,
    health: watch::Sender<ProviderHealth>,
) {
    // Errors the supervisor saw itself, added to whatever the provider says.
    let (mut errors, mut last_error) = (0u64, None::<String>);
    let publish_health = |h: &ProviderHealth, errors: u64, last: &Option<String>| {
        let mut h = h.clone();
        h.errors += errors;
        if last.is_some() && h.last_error.is_none() {
            h.last_error = last.clone();
        }
        health.send_replace(h);
    };
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
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Cmd::Failed(e)) => {
                    errors += 1;
                    last_error = Some(e);
                    publish_health(&current.health.borrow(), errors, &last_error);
                }
                Some(Cmd::Replace(next, reply)) => {
                    let mut next_cfg = cfg.clone();
                    next_cfg.provider = next;
                    match start(&next_cfg, &sources).await {
                        Ok(p) => {
                            info!("provider replaced: {}", describe(&next_cfg.provider));
                            current = p;
                            cfg = next_cfg;
                            (set_open, health_open) = (true, true);
                            set.send_replace(current.backends.borrow_and_update().clone());
                            publish_health(&current.health.borrow_and_update(), errors, &last_error);
                            let _ = reply.send(Ok(()));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
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
