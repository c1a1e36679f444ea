//! The only owner of start, drain and exit: resolves the host's network,
//! starts the data plane and the loops around it, waits for a shutdown
//! trigger and takes everything down in order.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{info, warn};

use crate::balancer::BackendSet;
use crate::config::{Config, Listen, Provider};
use crate::dataplane::{AttachTarget, DataplaneHandle, GcPolicy, LoadOptions, Service};
use crate::netinfo;
use crate::provider::{self, Backend};
use crate::status::{BackendStatus, InterfaceStatus, Phase, PortStatus, SharedStatus};

/// How long a closed connection (FIN both ways, or RST) keeps its entries:
/// long enough for the last ACK and stray retransmissions.
const CLOSED_TTL: Duration = Duration::from_secs(10);
/// How often counters are read and expired connections swept.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// How often the shutdown file is looked for.
const SHUTDOWN_FILE_POLL: Duration = Duration::from_millis(200);

/// The host-side facts a config resolves to.
#[derive(Debug)]
struct Network {
    listen: Ipv4Addr,
    snat: Ipv4Addr,
    targets: Vec<AttachTarget>,
}

pub async fn run(cfg: Config) -> Result<()> {
    cfg.startup_checks()?;
    let backends = match &cfg.provider {
        Provider::Static(s) => provider::static_list::backends(s),
        Provider::Kubernetes(_) => {
            bail!("provider kubernetes is not available in this version yet; use provider: static")
        }
    };
    let net = resolve_network(&cfg, &backends).await?;
    check_nat_range(&cfg)?;
    let status = SharedStatus::default();
    status.update(|s| {
        s.listen = Some(net.listen);
        s.snat = Some(net.snat);
        s.ports = cfg
            .ports
            .iter()
            .map(|p| PortStatus { local_port: p.local_port, remote_port: p.remote_port })
            .collect();
    });
    // Bound before anything is attached: a taken port is a startup error.
    let admin =
        crate::admin::serve(SocketAddr::new(cfg.admin.address, cfg.admin.port), status.clone()).await?;
    clear_stale_shutdown_file(&cfg.shutdown_file);

    for t in &net.targets {
        for change in netinfo::prepare_sysctls(&t.ifname)? {
            info!("sysctl {change}");
        }
    }
    let opts = LoadOptions { conntrack_capacity: cfg.conntrack_capacity, maglev_size: cfg.maglev_table_size };
    let service = Service {
        listen: net.listen,
        snat: net.snat,
        nat_ports: (cfg.nat_port_range.min, cfg.nat_port_range.max),
        ports: cfg.ports.iter().map(|p| (p.local_port, p.remote_port)).collect(),
    };
    let targets = net.targets.clone();
    let (dp, attached) = tokio::task::spawn_blocking(move || DataplaneHandle::start(opts, service, targets))
        .await
        .context("data plane start task")??;
    for a in &attached {
        info!(interface = %a.ifname, mode = %a.mode, "XDP attached to {} in {} mode", a.ifname, a.mode);
    }

    let mut set = BackendSet::new(cfg.maglev_table_size);
    if let Some(table) = set.update(backends) {
        dp.set_backends(table).await?;
    }
    status.update(|s| {
        s.interfaces = attached
            .iter()
            .map(|a| InterfaceStatus {
                name: a.ifname.clone(),
                ifindex: a.ifindex,
                xdp_mode: a.mode.to_string(),
            })
            .collect();
        s.backends = backend_status(set.current());
        s.phase = Phase::Running;
    });
    info!(
        listen = %net.listen,
        ports = ?cfg.ports.iter().map(|p| format!("{}->{}", p.local_port, p.remote_port)).collect::<Vec<_>>(),
        backends = set.current().len(),
        "xlb running"
    );

    let stats = tokio::spawn(stats_loop(dp.clone(), status.clone(), cfg.orphan_ttl_secs));
    let why = shutdown_trigger(&cfg.shutdown_file).await?;
    info!("shutting down ({why})");
    status.update(|s| s.phase = Phase::Draining);
    stats.abort();
    dp.stop().await?;
    status.update(|s| {
        s.phase = Phase::Stopped;
        s.interfaces.clear();
    });
    admin.abort();
    info!("detached; bye");
    Ok(())
}

async fn resolve_network(cfg: &Config, backends: &[Backend]) -> Result<Network> {
    let (listen_iface, listen) = match cfg.listen {
        Listen::Auto => netinfo::default_route_addr()
            .await
            .context("listen: auto needs an IPv4 default route; or set listen: {ip: ...}")?,
        Listen::Ip(ip) => {
            let iface = netinfo::iface_with_addr(ip)
                .await?
                .with_context(|| format!("listen ip {ip} is not an address on any local interface"))?;
            (iface, ip)
        }
    };
    let snat = cfg.snat_ip.unwrap_or(listen);
    if snat != listen && netinfo::iface_with_addr(snat).await?.is_none() {
        bail!("snat_ip {snat} is not an address on any local interface");
    }
    let mut ifaces = Vec::new();
    match &cfg.interfaces {
        Some(names) => {
            for name in names {
                ifaces.push(netinfo::iface_by_name(name).await?);
            }
        }
        None => {
            ifaces.push(listen_iface);
            for b in backends {
                let iface = netinfo::route_iface(b.addr).await.with_context(|| {
                    format!("finding the interface that reaches backend {} {}", b.name, b.addr)
                })?;
                if !ifaces.contains(&iface) {
                    ifaces.push(iface);
                }
            }
        }
    }
    let targets = ifaces.into_iter().map(|i| AttachTarget { ifname: i.name, ifindex: i.index }).collect();
    Ok(Network { listen, snat, targets })
}

/// Replies arrive at snat:nat_port; if the kernel could hand the same port
/// to a local socket, XDP would steal that socket's packets.
fn check_nat_range(cfg: &Config) -> Result<()> {
    let (lo, hi) = netinfo::local_port_range()?;
    let r = &cfg.nat_port_range;
    if r.min <= hi && lo <= r.max {
        bail!(
            "nat_port_range {}-{} overlaps the kernel's ephemeral port range {lo}-{hi} \
             (net.ipv4.ip_local_port_range); choose a range outside it or narrow the sysctl",
            r.min,
            r.max
        );
    }
    Ok(())
}

fn clear_stale_shutdown_file(path: &Path) {
    if path.exists() {
        warn!(file = %path.display(), "removing a shutdown file left from an earlier run");
        if let Err(e) = std::fs::remove_file(path) {
            warn!(file = %path.display(), "could not remove it: {e}; xlb would stop at once");
        }
    }
}

fn backend_status(set: &[Backend]) -> Vec<BackendStatus> {
    set.iter().map(|b| BackendStatus { name: b.name.clone(), address: b.addr, weight: b.weight }).collect()
}

/// Counters into the status document, and expiry of finished connections.
async fn stats_loop(dp: DataplaneHandle, status: SharedStatus, orphan_ttl_secs: u64) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let policy = GcPolicy {
            now_ns: crate::dataplane::now_ns(),
            idle_ns: orphan_ttl_secs.saturating_mul(1_000_000_000),
            closed_ns: CLOSED_TTL.as_nanos() as u64,
        };
        match dp.expire_flows(policy).await {
            Ok(gc) => {
                if gc.closed + gc.orphaned + gc.unpaired > 0 {
                    tracing::debug!(?gc, "expired connections");
                }
                status.update(|s| s.connections_active = gc.active);
            }
            Err(e) => warn!("conntrack sweep failed: {e:#}"),
        }
        match dp.counters().await {
            Ok(c) => status.update(|s| s.counters = c.iter().map(|(k, v)| (k.to_string(), v)).collect()),
            Err(e) => warn!("reading counters failed: {e:#}"),
        }
    }
}

/// Waits for SIGTERM, SIGINT or the shutdown file; says which.
async fn shutdown_trigger(file: &Path) -> Result<String> {
    let mut signals =
        signal_hook_tokio::Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let file: PathBuf = file.to_path_buf();
    let mut poll = tokio::time::interval(SHUTDOWN_FILE_POLL);
    loop {
        tokio::select! {
            sig = signals.next() => {
                let name = match sig { Some(SIGTERM) => "SIGTERM", Some(SIGINT) => "SIGINT", _ => "signal" };
                return Ok(name.to_string());
            }
            _ = poll.tick() => {
                if file.exists() {
                    return Ok(format!("{} appeared", file.display()));
                }
            }
        }
    }
}
