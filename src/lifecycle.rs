//! The only owner of start, drain and exit: resolves the host's network,
//! starts the data plane and the loops around it (balancer feed, interface
//! manager, sweep, status refresh), waits for a request from the triggers
//! and takes everything down in order. Each loop lives in its own module;
//! the flow stays one-way: config -> provider -> balancer -> data plane,
//! with telemetry and status only reading.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::balancer::BackendSet;
use crate::config::{Config, Listen};
use crate::dataplane::{pins, Counter, DataplaneHandle, LoadOptions, Service};
use crate::ifaces::Interfaces;
use crate::netinfo;
use crate::provider::{self, Supervisor};
use crate::reload;
use crate::status::{Phase, PortStatus, SharedStatus};
use crate::triggers::{Request, Triggers};

/// How long startup waits for a provider's first complete backend set.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(5);

/// How long startup waits for the first health check results beyond one
/// probe's timeout (the first probes are spread over up to 200 ms).
const FIRST_CHECK_SLACK: Duration = Duration::from_millis(500);
/// Passive reports waiting for the health loop (one per sweep): the sweep
/// waits rather than lose one.
const HANDSHAKE_REPORTS: usize = 16;

/// The host-side facts a config resolves to.
#[derive(Debug)]
struct Network {
    listen: Ipv4Addr,
    /// The SNAT pool: snat_ips, or snat_ip, or the listen address.
    snat: Vec<Ipv4Addr>,
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
    // With health checks, the balancer follows the backends that pass
    // them; the first result of each decides, so wait for those (bounded
    // by one probe's timeout) before the first table is built.
    // Passive checks hear from the sweep, once per sweep.
    let (handshakes_tx, handshakes_rx) = match cfg.passive_health {
        Some(_) => {
            let (tx, rx) = tokio::sync::mpsc::channel(HANDSHAKE_REPORTS);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let (backends, checks) = if cfg.health_check.is_none() && cfg.passive_health.is_none() {
        (provider.backends, None)
    } else {
        let default_port = cfg.ports.first().map_or(0, |p| p.remote_port);
        let which = crate::health::Checks {
            active: cfg.health_check.as_ref(),
            passive: cfg.passive_health.as_ref(),
            default_port,
        };
        let mut gate = crate::health::start(which, provider.backends, handshakes_rx);
        if let Some(hc) = &cfg.health_check {
            let wait = Duration::from_millis(hc.timeout_ms) + FIRST_CHECK_SLACK;
            if tokio::time::timeout(wait, gate.report.wait_for(|r| r.decided())).await.is_err() {
                warn!("not every backend has a health check result after {wait:?}; starting anyway");
            }
        }
        (gate.eligible.clone(), Some(gate))
    };
    let initial = backends.borrow().clone();
    let net = resolve_network(&cfg).await?;
    check_nat_range(&cfg)?;
    report_nat_capacity(&cfg, net.snat.len());
    let status = SharedStatus::default();
    status.update(|s| {
        s.listen = Some(net.listen);
        s.snat = net.snat.first().copied();
        s.snat_ips = net.snat.clone();
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
    let dir = pins::PinDir::for_instance(&instance);
    let pins = if dir.on_bpffs() {
        Some(dir)
    } else {
        warn!(
            "{} is not on a bpf file system: nothing is pinned, so a restart drops connections",
            dir.path.display()
        );
        None
    };
    let opts = LoadOptions {
        conntrack_capacity: cfg.conntrack_capacity,
        maglev_size: cfg.maglev_table_size,
        pins: pins.clone(),
    };
    let service = Service {
        listen: net.listen,
        snat: net.snat.clone(),
        nat_ports: (cfg.nat_port_range.min, cfg.nat_port_range.max),
        ports: cfg.ports.iter().map(|p| (p.local_port, p.remote_port)).collect(),
        vlans: Vec::new(),
        unknown_flow_rst: cfg.unknown_flow == crate::config::UnknownFlow::Rst,
        rate_limits: cfg.rate_limits,
        syn_proxy: cfg.syn_proxy,
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
    let balancer =
        tokio::spawn(crate::balancer::feed::balancer_loop(set, backends, dp.clone(), set_tx, status.clone()));
    let interfaces = tokio::spawn(ifaces.run(set_rx.clone(), in_use_rx));
    let nexthops = tokio::spawn(crate::nexthops::invalidate_loop(dp.clone()));
    let totals = crate::accounting::Totals::default();
    let sweep = tokio::spawn(crate::sweep::sweep_loop(
        dp.clone(),
        status.clone(),
        totals.clone(),
        in_use_tx,
        cfg.orphan_ttl_secs,
        (cfg.syn_proxy == crate::config::SynProxy::Auto).then_some(crate::sweep::SynProxyAuto {
            threshold: cfg.syn_proxy_threshold.into(),
            engaged: false,
        }),
        cfg.passive_health.as_ref().zip(handshakes_tx).map(|(p, tx)| crate::sweep::PassiveFeed {
            syn_timeout: Duration::from_millis(p.syn_timeout_ms),
            tx,
        }),
    ));
    let stats = tokio::spawn(crate::status_refresh::status_loop(
        dp.clone(),
        status.clone(),
        totals,
        set_rx,
        provider.health,
        checks.as_ref().map(|g| g.report.clone()),
    ));
    status.update(|s| {
        s.phase = Phase::Running;
        s.syn_proxy = match cfg.syn_proxy {
            crate::config::SynProxy::Auto => "auto",
            crate::config::SynProxy::On => "on",
            crate::config::SynProxy::Off => "off",
        };
        s.syn_proxy_engaged = cfg.syn_proxy == crate::config::SynProxy::On;
    });
    info!(
        listen = %net.listen,
        ports = ?cfg.ports.iter().map(|p| format!("{}->{}", p.local_port, p.remote_port)).collect::<Vec<_>>(),
        "xlb running"
    );

    let (trigger, began) = loop {
        match triggers.next().await {
            Request::Reload => reload::reload(&sources.config_path, &cfg, &supervisor).await,
            Request::Drain(t, at) => break (t, at),
            Request::Handover => {
                // Exit at once and leave the program attached and pinned: the
                // next `xlb run` for this instance adopts its connections.
                info!("SIGUSR2: exiting for a handover; XDP stays attached and pinned");
                balancer.abort();
                stats.abort();
                sweep.abort();
                interfaces.abort();
                nexthops.abort();
                dp.stop(true).await?;
                admin.abort();
                return Ok(());
            }
        }
    };
    if began.elapsed() > Duration::from_secs(1) {
        info!(
            "the drain was asked for {:.1}s ago, while XLB was starting: it counts from then",
            began.elapsed().as_secs_f64()
        );
    }
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
    let snat = match (&cfg.snat_ips, cfg.snat_ip) {
        (Some(pool), _) => pool.clone(),
        (None, Some(ip)) => vec![ip],
        (None, None) => vec![listen],
    };
    let key = if cfg.snat_ips.is_some() { "snat_ips" } else { "snat_ip" };
    for &ip in &snat {
        if ip != listen && netinfo::iface_with_addr(ip).await?.is_none() {
            bail!("{key}: {ip} is not an address on any local interface");
        }
    }
    // A listed interface must exist at start (a typo is a config error);
    // one that disappears later is re-attached when it comes back.
    for name in cfg.interfaces.iter().flatten() {
        netinfo::iface_by_name(name).await?;
    }
    Ok(Network { listen, snat })
}

/// How many new connections per second one backend can take without a NAT
/// port landing on that backend's TIME_WAIT: each connection the backend
/// closes first holds its port for crate::sweep::TOMBSTONE_TTL (README "NAT
/// ports"). Logged, and a warning when expected_connection_rate exceeds it.
fn report_nat_capacity(cfg: &Config, snat_addrs: usize) {
    let ports = u64::from(cfg.nat_port_range.max - cfg.nat_port_range.min) + 1;
    let hold = crate::sweep::TOMBSTONE_TTL.as_secs();
    let rate = ports * snat_addrs as u64 / hold;
    info!(
        "NAT capacity: {ports} ports x {snat_addrs} source address(es) / {hold}s hold = \
         {rate} new connections per second per backend, when backends close first"
    );
    if let Some(want) = cfg.expected_connection_rate.filter(|&w| u64::from(w) > rate) {
        warn!(
            "expected_connection_rate {want}/s per backend exceeds what the NAT ports sustain \
             ({rate}/s): add addresses to snat_ips or widen nat_port_range, or new connections \
             will reuse ports a backend still holds in TIME_WAIT"
        );
    }
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
