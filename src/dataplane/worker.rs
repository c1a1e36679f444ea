//! The data plane on its own thread. The skeleton holds raw libbpf pointers
//! and its map syscalls block, so one thread owns it and the async control
//! plane talks to it through a handle.

use std::net::Ipv4Addr;
use std::sync::mpsc;

use anyhow::{anyhow, Context, Result};
use tokio::sync::oneshot;

use super::{Counters, Dataplane, GcPolicy, GcStats, LoadOptions, Service, Transmit, Vlan, XdpMode};

/// What starting produced.
#[derive(Debug, Clone)]
pub struct Started {
    /// Live connections adopted from an earlier instance's pins, if any.
    pub adopted: Option<usize>,
    /// (interface name, ifindex) of each link an earlier instance pinned:
    /// attach to them at once so their connections keep flowing.
    pub pinned_links: Vec<(String, u32)>,
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum Cmd {
    SetBackends(Vec<Option<(Ipv4Addr, u32)>>, Reply<()>),
    Counters(Reply<Counters>),
    Expire(GcPolicy, Reply<GcStats>),
    Drain(bool, Reply<()>),
    SynProxy(bool, Reply<()>),
    InvalidateNexthops(Reply<()>),
    FlowsActive(Reply<u64>),
    Stop(bool, Reply<()>),
    Attach(String, u32, XdpMode, Reply<XdpMode>),
    SetTransmit(u32, Transmit, Reply<()>),
    Detach(u32, Reply<()>),
    SetVlans(Vec<Vlan>, Reply<()>),
    RemovePinnedLink(String, Reply<()>),
    DeadLinks(Reply<Vec<u32>>),
    SetMtu(u32, u32, Reply<()>),
}

/// A cheap, cloneable handle; the thread detaches and exits when the last
/// handle is dropped.
#[derive(Clone)]
pub struct DataplaneHandle {
    tx: mpsc::Sender<Cmd>,
    /// Unix ms when the worker began the command it is running; 0 when idle.
    busy_since: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl DataplaneHandle {
    /// Loads and configures the program on a new thread; nothing is
    /// attached yet (see `attach`). Returns once loaded, or with the error
    /// (a fresh instance then leaves no pins).
    pub fn start(
        opts: LoadOptions,
        service: Service,
        table: Option<Vec<Option<(Ipv4Addr, u32)>>>,
    ) -> Result<(DataplaneHandle, Started)> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let busy_since = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let busy = busy_since.clone();
        std::thread::Builder::new()
            .name("xlb-dataplane".into())
            .spawn(move || {
                let mut dp = match Dataplane::load(opts) {
                    Ok(dp) => dp,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut setup = || -> Result<Started> {
                    let adopted = if dp.adopted() { Some(dp.connections_tracked()? as usize) } else { None };
                    dp.set_service(&service)?;
                    // Backends before the first attach: no packet ever meets
                    // an attached program with an empty table.
                    if let Some(table) = &table {
                        dp.set_backends(table)?;
                    }
                    Ok(Started { adopted, pinned_links: dp.pinned_links() })
                };
                match setup() {
                    Ok(started) => {
                        let _ = ready_tx.send(Ok(started));
                        serve(dp, rx, &busy);
                    }
                    Err(e) => {
                        // A fresh instance leaves nothing behind; an adopted one
                        // keeps the pins, whose connections are still live.
                        if !dp.adopted() {
                            let _ = dp.remove_pins();
                        }
                        drop(dp);
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("starting the data plane thread")?;
        let attached =
            ready_rx.recv().map_err(|_| anyhow!("the data plane thread died while starting"))??;
        Ok((DataplaneHandle { tx, busy_since }, attached))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| anyhow!("the data plane thread has stopped"))?;
        rx.await.map_err(|_| anyhow!("the data plane thread has stopped"))?
    }

    pub async fn set_backends(&self, table: Vec<Option<(Ipv4Addr, u32)>>) -> Result<()> {
        self.call(|r| Cmd::SetBackends(table, r)).await
    }

    pub async fn counters(&self) -> Result<Counters> {
        self.call(Cmd::Counters).await
    }

    pub async fn expire_flows(&self, policy: GcPolicy) -> Result<GcStats> {
        self.call(|r| Cmd::Expire(policy, r)).await
    }

    pub async fn set_drain(&self, on: bool) -> Result<()> {
        self.call(|r| Cmd::Drain(on, r)).await
    }

    /// Engages or releases the SYN proxy (syn_proxy: auto).
    pub async fn set_syn_proxy(&self, on: bool) -> Result<()> {
        self.call(|r| Cmd::SynProxy(on, r)).await
    }

    /// Makes every cached next hop stale (see crate::nexthops).
    pub async fn invalidate_nexthops(&self) -> Result<()> {
        self.call(Cmd::InvalidateNexthops).await
    }

    /// Open connections right now (closed ones waiting out their grace
    /// period are not counted).
    pub async fn flows_active(&self) -> Result<u64> {
        self.call(Cmd::FlowsActive).await
    }

    /// Attaches to an interface in `mode` (generic when native fails), or
    /// takes over the earlier instance's pinned link there.
    pub async fn attach(&self, ifname: &str, ifindex: u32, mode: XdpMode) -> Result<XdpMode> {
        self.call(|r| Cmd::Attach(ifname.to_string(), ifindex, mode, r)).await
    }

    pub async fn set_transmit(&self, ifindex: u32, t: Transmit) -> Result<()> {
        self.call(|r| Cmd::SetTransmit(ifindex, t, r)).await
    }

    /// Detaches from an interface and removes its pinned link.
    pub async fn detach(&self, ifindex: u32) -> Result<()> {
        self.call(|r| Cmd::Detach(ifindex, r)).await
    }

    pub async fn set_mtu(&self, ifindex: u32, mtu: u32) -> Result<()> {
        self.call(|r| Cmd::SetMtu(ifindex, mtu, r)).await
    }

    /// Attached interfaces whose link the kernel has let go of.
    pub async fn dead_links(&self) -> Result<Vec<u32>> {
        self.call(Cmd::DeadLinks).await
    }

    pub async fn remove_pinned_link(&self, ifname: &str) -> Result<()> {
        self.call(|r| Cmd::RemovePinnedLink(ifname.to_string(), r)).await
    }

    pub async fn set_vlans(&self, vlans: Vec<Vlan>) -> Result<()> {
        self.call(|r| Cmd::SetVlans(vlans, r)).await
    }

    /// Unix ms when the worker began the command it is still running, or
    /// None when it is idle: a liveness watchdog's input.
    pub fn busy_since(&self) -> Option<u64> {
        Some(self.busy_since.load(std::sync::atomic::Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Ends the thread; later calls fail. With `handover` the pins stay, so
    /// the program keeps running for the next instance to adopt; otherwise
    /// the pins are removed and the program detaches.
    pub async fn stop(&self, handover: bool) -> Result<()> {
        self.call(|r| Cmd::Stop(handover, r)).await
    }
}

/// Faults the tests inject through the environment: the running process's
/// data path cannot be made to fail otherwise.
/// - XLB_FAULT_TABLE_WRITES=N fails the first N backend-table writes after
///   start;
/// - XLB_FAULT_STALL_AFTER_SECS=N makes the worker hang on its first command
///   N seconds after start (as a wedged map syscall would).
struct Faults {
    table_writes: u32,
    stall_at: Option<std::time::Instant>,
}

impl Faults {
    fn from_env() -> Faults {
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        Faults {
            table_writes: var("XLB_FAULT_TABLE_WRITES").unwrap_or(0) as u32,
            stall_at: var("XLB_FAULT_STALL_AFTER_SECS")
                .map(|s| std::time::Instant::now() + std::time::Duration::from_secs(s)),
        }
    }

    fn maybe_stall(&self) {
        if self.stall_at.is_some_and(|t| std::time::Instant::now() >= t) {
            tracing::warn!("XLB_FAULT_STALL_AFTER_SECS: the data plane worker hangs now");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
    }

    fn table_write(&mut self) -> Result<()> {
        if self.table_writes == 0 {
            return Ok(());
        }
        self.table_writes -= 1;
        Err(anyhow!("injected fault (XLB_FAULT_TABLE_WRITES)"))
    }
}

fn serve(mut dp: Dataplane, rx: mpsc::Receiver<Cmd>, busy: &std::sync::atomic::AtomicU64) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut faults = Faults::from_env();
    // Ends on Stop or when every handle is gone; dropping `dp` detaches.
    for cmd in rx {
        busy.store(crate::provider::unix_ms().max(1), Relaxed);
        faults.maybe_stall();
        match cmd {
            Cmd::SetBackends(table, r) => {
                let _ = r.send(faults.table_write().and_then(|()| dp.set_backends(&table)));
            }
            Cmd::Counters(r) => {
                let _ = r.send(dp.counters());
            }
            Cmd::Expire(p, r) => {
                let _ = r.send(dp.expire_flows(&p));
            }
            Cmd::Drain(on, r) => {
                dp.set_drain(on);
                let _ = r.send(Ok(()));
            }
            Cmd::SynProxy(on, r) => {
                dp.set_syn_proxy(on);
                let _ = r.send(Ok(()));
            }
            Cmd::InvalidateNexthops(r) => {
                dp.invalidate_nexthops();
                let _ = r.send(Ok(()));
            }
            Cmd::FlowsActive(r) => {
                let _ = r.send(dp.connections_open());
            }
            Cmd::Attach(name, ifindex, mode, r) => {
                let _ = r.send(dp.attach_as(&name, ifindex, mode));
            }
            Cmd::SetTransmit(ifindex, t, r) => {
                let _ = r.send(dp.set_transmit(ifindex, t));
            }
            Cmd::Detach(ifindex, r) => {
                let _ = r.send(dp.detach(ifindex));
            }
            Cmd::SetMtu(ifindex, mtu, r) => {
                let _ = r.send(dp.set_mtu(ifindex, mtu));
            }
            Cmd::DeadLinks(r) => {
                let _ = r.send(Ok(dp.dead_links()));
            }
            Cmd::RemovePinnedLink(name, r) => {
                let _ = r.send(dp.remove_pinned_link(&name));
            }
            Cmd::SetVlans(vlans, r) => {
                let _ = r.send(dp.set_vlans(&vlans));
            }
            Cmd::Stop(handover, r) => {
                busy.store(0, Relaxed);
                let res = if handover {
                    dp.release_for_handover();
                    Ok(())
                } else {
                    let res = dp.remove_pins();
                    drop(dp);
                    res
                };
                let _ = r.send(res);
                return;
            }
        }
        busy.store(0, Relaxed);
    }
}
