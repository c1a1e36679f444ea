//! `provider: static`: the backends listed in xlb.yaml. A reload (SIGHUP,
//! see src/reload.rs) replaces the provider with one of the new list.

use tokio::sync::watch;

use super::{Backend, Provider, ProviderHealth};
use crate::config::StaticProvider;

pub fn backends(p: &StaticProvider) -> Vec<Backend> {
    p.backends.iter().map(|b| Backend { name: b.name.clone(), addr: b.ip, weight: b.weight }).collect()
}

pub fn start(p: &StaticProvider) -> Provider {
    let (_, set_rx) = watch::channel(backends(p));
    let mut health = ProviderHealth::new("static", "static");
    health.synced_now();
    let (_, health_rx) = watch::channel(health);
    Provider { backends: set_rx, health: health_rx, task: None }
}
