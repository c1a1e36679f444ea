//! Backend providers. Each runs on its own and publishes the latest set of
//! backends that may receive new connections (ready ones only: a backend
//! that leaves the set keeps its existing connections, which drain) and its
//! own health. Providers never touch the data plane.

pub mod kubernetes;
pub mod static_list;
mod supervisor;

pub use supervisor::{Supervised, Supervisor};

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{Config, Provider as ProviderConfig};

/// A backend as providers describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    pub addr: Ipv4Addr,
    pub weight: u32,
}

/// What a provider says about itself (readiness, metrics, status).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProviderHealth {
    /// `static` or `kubernetes`.
    pub kind: &'static str,
    /// How it discovers: `static`, `endpointslices` or `endpoints`.
    pub mode: String,
    /// Connected to its source (always true for static).
    pub connected: bool,
    /// Has produced at least one complete backend set.
    pub synced: bool,
    /// Unix time (ms) of the last complete sync.
    pub last_sync_unix_ms: Option<u64>,
    /// Errors since start (API failures, rejected reloads, ...).
    pub errors: u64,
    pub last_error: Option<String>,
}

impl ProviderHealth {
    pub fn new(kind: &'static str, mode: &str) -> Self {
        ProviderHealth {
            kind,
            mode: mode.to_string(),
            connected: false,
            synced: false,
            last_sync_unix_ms: None,
            errors: 0,
            last_error: None,
        }
    }

    /// Records a complete, successful sync now.
    pub fn synced_now(&mut self) {
        self.connected = true;
        self.synced = true;
        self.last_sync_unix_ms = Some(unix_ms());
    }

    /// Records an error (the last good backend set stays in force).
    pub fn failed(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        self.last_error = Some(format!("{e:#}"));
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A running provider's outputs. Dropping it stops the provider.
pub struct Provider {
    pub backends: watch::Receiver<Vec<Backend>>,
    pub health: watch::Receiver<ProviderHealth>,
    pub task: Option<TaskGuard>,
}

/// Aborts its task when dropped.
pub struct TaskGuard(pub tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the running config came from, for reloads and API clients.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub config_path: PathBuf,
    pub kubeconfig: Option<PathBuf>,
}

/// Starts the provider the config names.
pub async fn start(cfg: &Config, sources: &Sources) -> Result<Provider> {
    match &cfg.provider {
        ProviderConfig::Static(s) => Ok(static_list::start(s)),
        ProviderConfig::Kubernetes(k) => kubernetes::start(k, sources.kubeconfig.as_deref()).await,
    }
}
