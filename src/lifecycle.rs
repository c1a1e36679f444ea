//! The only owner of start, drain and exit: resolves the host's network,
//! starts the data plane and the loops around it, waits for a shutdown
//! trigger and takes everything down in order.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::balancer::BackendSet;
use crate::config::{Config, Listen};
use crate::dataplane::{pins, Counter, DataplaneHandle, GcPolicy, LoadOptions, Service, Traffic};
use crate::ifaces::{InUse, Interfaces};
use crate::netinfo;
use crate::provider::{self, Backend, ProviderHealth, Supervisor};
use crate::reload;
use crate::status::{BackendStatus, Phase, PortStatus, SharedStatus};
use crate::triggers::{Request, Triggers};

/// How long a closed connection (FIN both ways, or RST) keeps its entries:
/// long enough for the last ACK and stray retransmissions.
const CLOSED_TTL: Duration = Duration::from_secs(10);
/// How long a connection whose handshake never completed keeps its entries:
/// a SYN flood must not fill the table for orphan_ttl_secs.
const HALF_OPEN_TTL: Duration = Duration::from_secs(30);
/// How often counters are read and expired connections swept.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// How long startup waits for a provider's first complete backend set.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(5);

/// The host-side facts a config resolves to.
#[derive(Debug)]
struct Network {
    listen: Ipv4Addr,
    snat: Ipv4Addr,
}

pub async fn run(cfg: Config, sources: provider::Sources) -> Result<()> {
    cfg.startup_checks()?;
    // Signals and the shutdown file count from the first moment: a preStop
    // hook may run while the provider is still syncing.
    let mut triggers = Triggers::install(&cfg.shutdown_file)?;
    let (supervisor, mut provider, _provider_task) = Supervisor::start(&cfg, sources.clone()).await?;
    // Give a discovering provider a moment to deliver its first set, so the
    // first table is complete. An API server that does not answer is not
    // fatal: XLB starts with what it has and follows later sets (and the
    // interfaces they need) as they come.
    let synced = tokio::time::timeout(FIRST_SYNC_WAIT, provider.health.wait_for(|h| h.synced))
        .await
        .is_ok_and(|r| r.is_ok());
    if !synced {
        warn!(
            "the backend provider has not synced after {}s; starting without its backends",
            FIRST_SYNC_WAIT.as_secs()
        );
    }
    let initial = provider.backends.borrow().clone();
    let net = resolve_network(&cfg).await?;
    check_nat_range(&cfg)?;
    let status = SharedStatus::default();
    status.update(|s| {
        s.listen = Some(net.listen);
        s.snat = Some(net.snat);
        s.conntrack_capacity = cfg.conntrack_capacity.into();
        s.ports = cfg
            .ports
            .iter()
            .map(|p| PortStatus { local_port: p.local_port, remote_port: p.remote_port })
            .collect();
    });
    // Bound before anything is attached: a taken port is a startup error.
    let admin = crate::admin::serve(&cfg, status.clone()).await?;

    let instance = instance_name(&cfg, net.listen);
    let pins = if pins::is_bpffs(Path::new("/sys/fs/bpf")) {
        Some(pins::PinDir::for_instance(&instance))
    } else {
        warn!("/sys/fs/bpf is not a bpf file system: nothing is pinned, so a restart drops connections");
        None
    };
    let opts = LoadOptions {
        conntrack_capacity: cfg.conntrack_capacity,
        maglev_size: cfg.maglev_table_size,
        pins: pins.clone(),
    };
    let service = Service {
        listen: net.listen,
        snat: net.snat,
        nat_ports: (cfg.nat_port_range.min, cfg.nat_port_range.max),
        ports: cfg.ports.iter().map(|p| (p.local_port, p.remote_port)).collect(),
        vlans: Vec::new(),
    };
    let initial_addrs: Vec<Ipv4Addr> = initial.iter().map(|b| b.addr).collect();
    let mut set = BackendSet::new(cfg.maglev_table_size);
    let first = set.update(initial);
    let (table, first_changes) = match first {
        Some((t, c)) => (Some(t), Some(c)),
        None => (None, None),
    };
    // Exporting reads the status document only; started before anything is
    // attached so that its failure cannot leave a program behind.
    let telemetry = crate::telemetry::start(&cfg, status.clone())?;
    let (dp, started) = tokio::task::spawn_blocking(move || DataplaneHandle::start(opts, service, table))
        .await
        .context("data plane start task")??;
    let ifaces = match Interfaces::start(
        dp.clone(),
        cfg.interfaces.clone(),
        net.listen,
        status.clone(),
        started.pinned_links.clone(),
        &initial_addrs,
    )
    .await
    {
        Ok(i) => i,
        Err(e) => {
            // A fresh instance leaves nothing behind; an adopted one keeps
            // the pins, whose connections are still live.
            let _ = dp.stop(started.adopted.is_some()).await;
            return Err(e);
        }
    };
    if let Some(p) = &pins {
        match started.adopted {
            Some(n) => {
                info!(instance = %instance, "adopted {n} live connections pinned in {}", p.path.display())
            }
            None => info!(instance = %instance, "pinned in {}", p.path.display()),
        }
    }
    if let Some(c) = first_changes {
        c.log();
    }
    let (set_tx, set_rx) = watch::channel(set.current_with_ids());
    let (in_use_tx, in_use_rx) = watch::channel(None);
    let balancer = tokio::spawn(balancer_loop(set, provider.backends, dp.clone(), set_tx, status.clone()));
    let interfaces = tokio::spawn(ifaces.run(set_rx.clone(), in_use_rx));
    let totals = Totals::default();
    let sweep =
        tokio::spawn(sweep_loop(dp.clone(), status.clone(), totals.clone(), in_use_tx, cfg.orphan_ttl_secs));
    let stats = tokio::spawn(status_loop(dp.clone(), status.clone(), totals, set_rx, provider.health));
    status.update(|s| s.phase = Phase::Running);
    info!(
        listen = %net.listen,
        ports = ?cfg.ports.iter().map(|p| format!("{}->{}", p.local_port, p.remote_port)).collect::<Vec<_>>(),
        "xlb running"
    );

    let mut running = cfg.clone();
    let trigger = loop {
        match triggers.next().await {
            Request::Reload => reload::reload(&sources.config_path, &mut running, &supervisor).await,
            Request::Drain(t) => break t,
            Request::Handover => {
                // Exit at once and leave the program attached and pinned: the
                // next `xlb run` for this instance adopts its connections.
                info!("SIGUSR2: exiting for a handover; XDP stays attached and pinned");
                balancer.abort();
                stats.abort();
                interfaces.abort();
                dp.stop(true).await?;
                admin.abort();
                return Ok(());
            }
        }
    };
    let began = Instant::now();
    // The data plane refuses new connections before readiness says so, so
    // nothing that saw 503 can still get a connection in.
    dp.set_drain(true).await?;
    status.update(|s| s.phase = Phase::Draining);
    // The backend set is frozen from here on.
    balancer.abort();
    let before = status.read();
    let open_at_start = before.connections_active;
    let rst_at_start = before.counters.get("drain_rst").copied().unwrap_or(0);
    info!(
        "shutting down ({trigger}): readiness fails, new connections get a RST for {}s \
         while {open_at_start} open connections finish",
        cfg.shutdown_timeout
    );
    if cfg.shutdown_timeout > 0 {
        triggers.drain(began, Duration::from_secs(cfg.shutdown_timeout)).await;
    }
    stats.abort();
    sweep.abort();
    interfaces.abort();
    let rst = dp.counters().await.map(|c| c.get(Counter::XLB_CNT_DRAIN_RST)).unwrap_or(rst_at_start);
    let open_at_end = dp.flows_active().await.unwrap_or(0);
    dp.stop(false).await?;
    status.update(|s| {
        s.phase = Phase::Stopped;
        s.interfaces.clear();
    });
    telemetry.shutdown().await;
    admin.abort();
    info!(
        "drain done: {} of {open_at_start} connections finished, {open_at_end} still open were cut, \
         {} new connections refused with RST; detached",
        open_at_start.saturating_sub(open_at_end),
        rst.saturating_sub(rst_at_start)
    );
    Ok(())
}

/// The pin directory name: the config's `name`, else derived from the
/// listen address, so two XLBs on one node never share pins.
pub fn instance_name(cfg: &Config, listen: Ipv4Addr) -> String {
    match &cfg.name {
        Some(n) => n
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect(),
        None => format!("xlb-{}", listen.to_string().replace('.', "-")),
    }
}

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
async fn balancer_loop(
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

async fn resolve_network(cfg: &Config) -> Result<Network> {
    let listen = match cfg.listen {
        Listen::Auto => {
            netinfo::default_route_addr()
                .await
                .context("listen: auto needs an IPv4 default route; or set listen: {ip: ...}")?
                .1
        }
        Listen::Ip(ip) => {
            netinfo::iface_with_addr(ip)
                .await?
                .with_context(|| format!("listen ip {ip} is not an address on any local interface"))?;
            ip
        }
    };
    let snat = cfg.snat_ip.unwrap_or(listen);
    if snat != listen && netinfo::iface_with_addr(snat).await?.is_none() {
        bail!("snat_ip {snat} is not an address on any local interface");
    }
    // A listed interface must exist at start (a typo is a config error);
    // one that disappears later is re-attached when it comes back.
    for name in cfg.interfaces.iter().flatten() {
        netinfo::iface_by_name(name).await?;
    }
    Ok(Network { listen, snat })
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

/// Per-backend accounting kept across sweeps, by backend address.
#[derive(Debug, Default)]
struct BackendTotals {
    backend: Option<Backend>,
    active: u64,
    live: Traffic,
    closed_fin: u64,
    closed_rst: u64,
    orphaned: u64,
    /// Traffic of connections that have ended.
    ended: Traffic,
    /// What status and metrics show: never less than shown before.
    reported: Traffic,
}

impl BackendTotals {
    /// ended + live, but never below what was reported: a pair the data
    /// path replaced (a SYN reusing a closed tuple) between two sweeps takes
    /// its last bytes with it, and a counter must not go down. The bytes of
    /// such a pair since the previous sweep are not counted (logged below).
    fn report(&mut self) -> bool {
        let mut now = self.ended;
        now.add(&self.live);
        let r = &mut self.reported;
        let fell = now.bytes_to_backend < r.bytes_to_backend
            || now.bytes_to_client < r.bytes_to_client
            || now.packets_to_backend < r.packets_to_backend
            || now.packets_to_client < r.packets_to_client;
        r.bytes_to_backend = r.bytes_to_backend.max(now.bytes_to_backend);
        r.bytes_to_client = r.bytes_to_client.max(now.bytes_to_client);
        r.packets_to_backend = r.packets_to_backend.max(now.packets_to_backend);
        r.packets_to_client = r.packets_to_client.max(now.packets_to_client);
        fell
    }
}

type Totals = std::sync::Arc<std::sync::Mutex<HashMap<Ipv4Addr, BackendTotals>>>;

/// The current set (active) plus backends that left it but still carry
/// connections (draining).
fn backend_status(
    current: &[(u32, Backend)],
    totals: &HashMap<Ipv4Addr, BackendTotals>,
) -> Vec<BackendStatus> {
    let mut out: Vec<BackendStatus> = totals
        .iter()
        .filter_map(|(addr, t)| {
            // A backend this process never listed (connections adopted from
            // an earlier one) is known by its address alone.
            let unknown = Backend { name: addr.to_string(), addr: *addr, weight: 0 };
            let b = t.backend.as_ref().unwrap_or(&unknown);
            let state = if current.iter().any(|(_, c)| c.addr == *addr) {
                "active"
            } else if t.active > 0 {
                "draining"
            } else {
                return None;
            };
            let traffic = t.reported;
            Some(BackendStatus {
                name: b.name.clone(),
                address: b.addr,
                weight: b.weight,
                state,
                connections_active: t.active,
                connections_closed_fin: t.closed_fin,
                connections_closed_rst: t.closed_rst,
                connections_orphaned: t.orphaned,
                traffic,
            })
        })
        .collect();
    out.sort_by_key(|b| b.address);
    out
}

/// Expiry of finished connections and the per-backend accounting it
/// yields; also tells the interface manager where connections still go.
async fn sweep_loop(
    dp: DataplaneHandle,
    status: SharedStatus,
    totals: Totals,
    in_use: watch::Sender<Option<InUse>>,
    orphan_ttl_secs: u64,
) {
    let mut pause = Duration::ZERO;
    loop {
        tokio::time::sleep(pause).await;
        pause = STATS_INTERVAL;
        let sweep_started = std::time::Instant::now();
        let policy = GcPolicy {
            now_ns: crate::dataplane::now_ns(),
            idle_ns: orphan_ttl_secs.saturating_mul(1_000_000_000),
            closed_ns: CLOSED_TTL.as_nanos() as u64,
            half_open_ns: HALF_OPEN_TTL.as_nanos() as u64,
        };
        let gc = match dp.expire_flows(policy).await {
            Ok(gc) => gc,
            Err(e) => {
                warn!("conntrack sweep failed: {e:#}");
                continue;
            }
        };
        // A sweep reads every entry: with millions of connections, sweep
        // less often so it stays under ~10% of one core.
        pause = STATS_INTERVAL.max(sweep_started.elapsed() * 10);
        if gc.closed + gc.orphaned + gc.unpaired > 0 {
            tracing::debug!(
                closed = gc.closed,
                orphaned = gc.orphaned,
                unpaired = gc.unpaired,
                "expired connections"
            );
        }
        {
            let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
            for t in totals.values_mut() {
                t.active = 0;
                t.live = Default::default();
            }
            for (addr, f) in &gc.per_backend {
                let t = totals.entry(*addr).or_default();
                t.active = f.active;
                t.live = f.live;
                t.closed_fin += f.closed_fin;
                t.closed_rst += f.closed_rst;
                t.orphaned += f.orphaned;
                t.ended.add(&f.removed);
            }
            for (addr, t) in totals.iter_mut() {
                if t.report() {
                    tracing::debug!(backend = %addr, "traffic of a replaced connection went uncounted");
                }
            }
        }
        // Where connections still go, as of this sweep's start.
        let busy: Vec<Ipv4Addr> = gc.backend_addrs.iter().copied().collect();
        in_use.send_replace(Some(InUse { since: sweep_started, addrs: busy }));
        status.update(|s| s.connections_active = gc.active);
    }
}

/// How long a data-plane call may take before the status loop stops
/// waiting for it (the watchdog in /healthz counts from the last answer).
const DATAPLANE_CALL_LIMIT: Duration = Duration::from_secs(2);

/// The status document on its own clock, every second whatever the sweep
/// does: counters, provider health, the backends with their accounting,
/// and when the data plane last answered (the /healthz watchdog).
async fn status_loop(
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
            s.backends = backends;
            s.provider = Some(provider);
            match counters {
                Ok(Ok(c)) => {
                    s.counters = c.iter().map(|(k, v)| (k.to_string(), v)).collect();
                    s.data_plane_answered_unix_ms = Some(provider::unix_ms());
                }
                Ok(Err(e)) => warn!("reading counters failed: {e:#}"),
                Err(_) => warn!("the data plane did not answer within {DATAPLANE_CALL_LIMIT:?}"),
            }
        });
    }
}

#[cfg(test)]
mod accounting_tests {
    use super::*;

    fn traffic(b: u64) -> Traffic {
        Traffic { bytes_to_backend: b, packets_to_backend: b, bytes_to_client: b, packets_to_client: b }
    }

    #[test]
    fn reported_traffic_never_goes_down() {
        let mut t = BackendTotals::default();
        let mut shown = Vec::new();
        // (ended, live) as sweeps see them: a connection of 500 bytes ends
        // normally; then a pair reaches 300 and is replaced by the data path
        // before a sweep removes it (live drops, ended does not grow); then
        // its successor grows past what was shown.
        for (ended, live) in [(0, 100), (0, 500), (500, 0), (500, 300), (500, 0), (500, 200), (900, 100)] {
            t.ended = traffic(ended);
            t.live = traffic(live);
            t.report();
            shown.push(t.reported.bytes_to_backend);
        }
        assert_eq!(shown, [100, 500, 500, 800, 800, 800, 1000]);
    }
}
