//! The interfaces XLB is attached to, kept right for as long as it runs.
//!
//! Wanted: the interface holding the listen address, the default route's
//! (the way back to clients off the local subnets) and every interface
//! through which a backend in use is routed; with `interfaces:` in xlb.yaml,
//! exactly those. The set is recomputed when the backends change, on
//! rtnetlink link/address/route events and every few seconds. XLB attaches
//! where an interface becomes wanted (including interfaces created after
//! it started), detaches where none is wanted any more once no connection
//! goes through it, and forgets interfaces that were deleted.
//!
//! Per interface it also chooses how frames leave (`plan_mode`,
//! `plan_transmit`): a veth gets generic mode, whose transmit is an ordinary
//! skb send that always reaches the peer and keeps checksums left to
//! offload; a NIC gets native XDP_TX, or generic mode where its driver has
//! no native XDP. Only interfaces that take XDP frames (the kernel's
//! NDO_XMIT feature, re-read every few seconds) are redirect targets; the
//! kernel forwards to the rest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::dataplane::{self, Bounce, DataplaneHandle, Transmit, Vlan, XdpMode};
use crate::netinfo::{self, LinkFacts};
use crate::provider::Backend;
use crate::status::{InterfaceStatus, SharedStatus};

/// How often XDP features are re-read (a veth peer's GRO or XDP program can
/// change without any event reaching this namespace) and lookups retried.
const RECHECK: Duration = Duration::from_secs(2);
/// Events come in bursts (a pod's veth: link, address, routes): wait this
/// long after the first before looking.
const SETTLE: Duration = Duration::from_millis(50);

/// Why an interface is wanted, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Listed,
    Listen,
    DefaultRoute,
    Backend,
    /// An earlier instance's pinned link: kept until the first sweep says
    /// whether connections still use it.
    Adopted,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::Listed => "listed under interfaces",
            Why::Listen => "holds the listen address",
            Why::DefaultRoute => "carries the default route",
            Why::Backend => "routes to backends",
            Why::Adopted => "pinned by the earlier instance",
        })
    }
}

/// Backend addresses that still carry connections, read by a conntrack
/// sweep that started at `since`.
#[derive(Debug, Clone)]
pub struct InUse {
    pub since: std::time::Instant,
    pub addrs: Vec<Ipv4Addr>,
}

#[derive(Debug, Clone)]
struct Held {
    name: String,
    mode: XdpMode,
    transmit: Transmit,
    mtu: u32,
    /// Native was asked for and the driver refused: do not ask again.
    native_refused: bool,
    /// Since when no backend or route has wanted it: it is detached only
    /// after a sweep that started later still saw no connection through it.
    unwanted_since: Option<std::time::Instant>,
}

/// XDP mode and transmit for an interface, from its kind and the XDP
/// features the kernel reports (0: not reported, kernels before 6.3).
pub fn plan_mode(facts: &LinkFacts) -> XdpMode {
    if facts.is_veth() {
        // A veth delivers what the sender's stack left unfinished: TCP
        // checksums to be completed on the way out (CHECKSUM_PARTIAL, the
        // default for containers). Native XDP drops that state with the
        // skb, so the receiver sees a bad checksum; native frames into a
        // veth whose peer has neither GRO nor XDP are dropped, and XDP_TX
        // leaves a GRO-only peer asleep. Generic mode keeps the skb: its
        // transmit is an ordinary send, which always arrives.
        XdpMode::Generic
    } else {
        XdpMode::Native
    }
}

/// See `plan_mode`; `mode` is the one the interface ended up in. Only an
/// interface that takes XDP frames (NDO_XMIT) is a redirect target.
pub fn plan_transmit(facts: &LinkFacts, features: u64, mode: XdpMode) -> Transmit {
    let takes_frames = if features == 0 {
        mode == XdpMode::Native && !facts.is_veth()
    } else {
        features & dataplane::XDP_FEATURE_NDO_XMIT != 0
    };
    Transmit { bounce: Bounce::XdpTx, redirect_target: takes_frames }
}

pub struct Interfaces {
    dp: DataplaneHandle,
    explicit: Option<Vec<String>>,
    listen: Ipv4Addr,
    status: SharedStatus,
    held: BTreeMap<u32, Held>,
    /// Backend address -> output ifindex, until the routes change.
    routes: HashMap<Ipv4Addr, Option<u32>>,
    vlans: Vec<Vlan>,
    /// Things said once (missing interfaces, unusable devices, no route).
    warned: HashSet<String>,
    /// Past the startup pass, whose errors are fatal.
    started: bool,
}

impl Interfaces {
    /// Takes over the earlier instance's pinned links, then attaches to
    /// what is wanted now. Any failure here is a startup error.
    pub async fn start(
        dp: DataplaneHandle,
        explicit: Option<Vec<String>>,
        listen: Ipv4Addr,
        status: SharedStatus,
        pinned: Vec<(String, u32)>,
        backends: &[Ipv4Addr],
    ) -> Result<Interfaces> {
        let mut me = Interfaces {
            dp,
            explicit,
            listen,
            status,
            held: BTreeMap::new(),
            routes: HashMap::new(),
            vlans: Vec::new(),
            warned: HashSet::new(),
            started: false,
        };
        let links = links_by_index().await?;
        for (name, ifindex) in pinned {
            match links.get(&ifindex) {
                Some(facts) if facts.iface.name == name => me.attach(facts, Why::Adopted).await?,
                _ => {
                    info!("not adopting the pinned link of {name}: the interface changed; removing it");
                    let _ = me.dp.remove_pinned_link(&name).await;
                }
            }
        }
        me.reconcile(backends, None, true).await?;
        if me.held.is_empty() {
            bail!("no interface to attach to");
        }
        me.started = true;
        Ok(me)
    }

    /// Keeps the set right until the task is aborted. `backends`: the
    /// addresses of the current set; `in_use`: addresses of backends with
    /// live connections (None until the first sweep: detach nothing yet).
    pub async fn run(
        mut self,
        mut backends: watch::Receiver<Vec<(u32, Backend)>>,
        mut in_use: watch::Receiver<Option<InUse>>,
    ) {
        let mut events: Box<dyn futures::Stream<Item = ()> + Unpin + Send> = match netinfo::changes() {
            Ok(s) => Box::new(s),
            Err(e) => {
                warn!("cannot follow interface and route changes ({e:#}); rechecking every {RECHECK:?}");
                Box::new(futures::stream::pending())
            }
        };
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = backends.changed() => if r.is_err() { return },
                r = in_use.changed() => if r.is_err() { return },
                Some(()) = events.next() => {
                    tokio::time::sleep(SETTLE).await;
                    while let Some(Some(())) = futures::FutureExt::now_or_never(events.next()) {}
                    self.routes.clear();
                }
                _ = tick.tick() => {}
            }
            let current: Vec<Ipv4Addr> = backends.borrow().iter().map(|(_, b)| b.addr).collect();
            let live = in_use.borrow().clone();
            if let Err(e) = self.reconcile(&current, live.as_ref(), false).await {
                warn!("updating the attached interfaces failed: {e:#}; retrying in {RECHECK:?}");
                self.routes.clear();
            }
        }
    }

    /// One pass: attach what is wanted, re-plan what is held, detach what
    /// is neither wanted nor used. `strict`: the first error ends the pass.
    async fn reconcile(&mut self, backends: &[Ipv4Addr], in_use: Option<&InUse>, strict: bool) -> Result<()> {
        let links = links_by_index().await?;
        self.forget_deleted(&links).await;
        let mut all: Vec<Ipv4Addr> = backends.to_vec();
        all.extend(in_use.map(|u| u.addrs.as_slice()).unwrap_or_default());
        all.sort_unstable();
        all.dedup();
        let wanted = self.wanted(&links, &all).await?;

        for (&ifindex, &why) in &wanted {
            if self.held.contains_key(&ifindex) {
                continue;
            }
            let res = self.attach(&links[&ifindex], why).await;
            if let Err(e) = res {
                if strict {
                    return Err(e);
                }
                self.warn_once(format!("attach {ifindex}"), format!("{e:#}; retrying every {RECHECK:?}"));
            }
        }
        for ifindex in self.held.keys().copied().collect::<Vec<_>>() {
            if let Some(facts) = links.get(&ifindex) {
                if let Err(e) = self.replan(facts).await {
                    warn!("re-planning {}: {e:#}", facts.iface.name);
                }
            }
        }
        // Detach only once a sweep has said which backends still carry
        // connections, so adopted connections are never cut at start.
        let now = std::time::Instant::now();
        for (ifindex, h) in self.held.iter_mut() {
            if wanted.contains_key(ifindex) {
                h.unwanted_since = None;
            } else {
                h.unwanted_since.get_or_insert(now);
            }
        }
        if let Some(sweep) = in_use {
            // A sweep older than the moment an interface stopped being wanted
            // may have missed a connection opened just before: wait for the
            // next one.
            let stale: Vec<u32> = self
                .held
                .iter()
                .filter(|(_, h)| h.unwanted_since.is_some_and(|t| sweep.since > t))
                .map(|(i, _)| *i)
                .collect();
            for ifindex in stale {
                let (name, mode) = (self.held[&ifindex].name.clone(), self.held[&ifindex].mode);
                match self.dp.detach(ifindex).await {
                    Ok(()) => {
                        self.held.remove(&ifindex);
                        info!(
                            interface = %name, mode = %mode,
                            "XDP detached from {name} ({mode} mode): no backend or client route uses it"
                        );
                    }
                    Err(e) => warn!("detaching from {name}: {e:#}"),
                }
            }
        }
        self.update_vlans(&links).await;
        self.publish();
        Ok(())
    }

    async fn wanted(
        &mut self,
        links: &BTreeMap<u32, LinkFacts>,
        backends: &[Ipv4Addr],
    ) -> Result<BTreeMap<u32, Why>> {
        let mut wanted: Vec<(u32, Why)> = Vec::new();
        if let Some(names) = self.explicit.clone() {
            for name in &names {
                match links.values().find(|l| &l.iface.name == name) {
                    Some(l) => wanted.push((l.iface.index, Why::Listed)),
                    None => self.warn_once(
                        format!("missing {name}"),
                        format!("listed interface {name} does not exist; attaching when it appears"),
                    ),
                }
            }
        } else {
            match netinfo::iface_with_addr(self.listen).await? {
                Some(i) => wanted.push((i.index, Why::Listen)),
                None => self.warn_once(
                    "listen gone".into(),
                    format!("no interface holds the listen address {} any more", self.listen),
                ),
            }
            if let Some(oif) = netinfo::default_route_iface().await? {
                wanted.push((oif, Why::DefaultRoute));
            }
            let unknown: Vec<Ipv4Addr> =
                backends.iter().copied().filter(|b| !self.routes.contains_key(b)).collect();
            if !unknown.is_empty() {
                let oifs = netinfo::route_oifs(&unknown).await?;
                self.routes.extend(unknown.into_iter().zip(oifs));
            }
            for b in backends {
                match self.routes.get(b).copied().flatten() {
                    Some(oif) => wanted.push((oif, Why::Backend)),
                    None => self.warn_once(format!("route {b}"), format!("backend {b}: no route to it")),
                }
            }
        }
        let vlans = vlan_lowers(links);
        let mut out = BTreeMap::new();
        for (ifindex, why) in wanted {
            // Tagged traffic arrives on the VLAN's lower interface: that is
            // where XDP sees it.
            let ifindex = vlans.get(&ifindex).copied().unwrap_or(ifindex);
            let Some(facts) = links.get(&ifindex) else { continue };
            if facts.iface.name == "lo" {
                continue;
            }
            if !facts.ethernet {
                self.warn_once(
                    format!("l3 {}", facts.iface.name),
                    format!(
                        "{} ({}) {why}, but it is a layer-3 device: XDP sees no Ethernet frames there, \
                         so XLB cannot serve traffic through it",
                        facts.iface.name,
                        facts.kind.as_deref().unwrap_or("no kind")
                    ),
                );
                continue;
            }
            out.entry(ifindex).or_insert(why);
        }
        Ok(out)
    }

    async fn attach(&mut self, facts: &LinkFacts, why: Why) -> Result<()> {
        let name = &facts.iface.name;
        let ifindex = facts.iface.index;
        match netinfo::prepare_sysctls(name).await {
            Ok(changes) => changes.iter().for_each(|c| info!("sysctl {c}")),
            // At start this is a config problem to fix first; later (no
            // CAP_NET_ADMIN, an interface that came and went) XDP
            // still serves the interface: only packets XDP hands to the
            // kernel (unresolved neighbours) may be refused there.
            Err(e) if self.started => warn!(
                "{name}: {e:#}; attaching anyway: packets handed to the kernel through {name} \
                 may be dropped until forwarding=1 and accept_local=1 are set on it"
            ),
            Err(e) => return Err(e),
        }
        let features = dataplane::xdp_features(ifindex).unwrap_or(0);
        let want = plan_mode(facts);
        let mode =
            self.dp.attach(name, ifindex, want).await.with_context(|| format!("attaching XDP to {name}"))?;
        let transmit = plan_transmit(facts, features, mode);
        let configured = match self.dp.set_transmit(ifindex, transmit).await {
            Ok(()) => self.dp.set_mtu(ifindex, facts.mtu).await,
            Err(e) => Err(e),
        };
        if let Err(e) = configured {
            // Half attached is worse than not at all: roll back.
            let _ = self.dp.detach(ifindex).await;
            return Err(e).with_context(|| format!("configuring transmit on {name}"));
        }
        info!(
            interface = %name, mode = %mode, transmit = %transmit,
            "XDP attached to {name} in {mode} mode ({why}; {})", describe(facts, mode, transmit)
        );
        let native_refused = want == XdpMode::Native && mode == XdpMode::Generic;
        self.held.insert(
            ifindex,
            Held { name: name.clone(), mode, transmit, mtu: facts.mtu, native_refused, unwanted_since: None },
        );
        Ok(())
    }

    /// Follows a change in what the kernel reports for a held interface:
    /// a new transmit in place, or a re-attach in the other mode.
    async fn replan(&mut self, facts: &LinkFacts) -> Result<()> {
        let ifindex = facts.iface.index;
        let Some(h) = self.held.get(&ifindex).cloned() else { return Ok(()) };
        // A failed query says nothing new: keep the current plan.
        let Ok(features) = dataplane::xdp_features(ifindex) else { return Ok(()) };
        let want = plan_mode(facts);
        if want != h.mode && !(h.native_refused && want == XdpMode::Native) {
            // Native and generic XDP cannot share an interface: the switch
            // leaves a gap of a few milliseconds without XDP.
            warn!(
                interface = %h.name,
                "{}: attached in {} mode (taken over from an earlier instance?), the plan is {want}: re-attaching", h.name, h.mode
            );
            self.dp.detach(ifindex).await?;
            self.held.remove(&ifindex);
            return self.attach(facts, Why::Backend).await;
        }
        if facts.mtu != h.mtu {
            self.dp.set_mtu(ifindex, facts.mtu).await?;
            if let Some(h) = self.held.get_mut(&ifindex) {
                h.mtu = facts.mtu;
            }
        }
        let transmit = plan_transmit(facts, features, h.mode);
        if transmit != h.transmit {
            self.dp.set_transmit(ifindex, transmit).await?;
            info!(interface = %h.name, "{}: transmit now {transmit} ({})", h.name, describe(facts, h.mode, transmit));
            if let Some(h) = self.held.get_mut(&ifindex) {
                h.transmit = transmit;
            }
        }
        Ok(())
    }

    async fn forget_deleted(&mut self, links: &BTreeMap<u32, LinkFacts>) {
        // Deleted, renamed, or deleted and made again under the same name
        // and index (its link died with the first one).
        let dead = self.dp.dead_links().await.unwrap_or_default();
        let gone: Vec<u32> = self
            .held
            .iter()
            .filter(|(i, h)| dead.contains(i) || links.get(i).is_none_or(|l| l.iface.name != h.name))
            .map(|(i, _)| *i)
            .collect();
        for ifindex in gone {
            let h = self.held.remove(&ifindex).expect("held");
            // The kernel already took the program off; this drops our link
            // and its pin.
            let _ = self.dp.detach(ifindex).await;
            info!(interface = %h.name, mode = %h.mode, "{} is gone (deleted or renamed): XDP ({} mode) detached", h.name, h.mode);
        }
    }

    async fn update_vlans(&mut self, links: &BTreeMap<u32, LinkFacts>) {
        let vlans: Vec<Vlan> = links
            .values()
            .filter_map(|l| {
                let (lower, vid) = l.vlan?;
                self.held.contains_key(&lower).then_some(Vlan {
                    ifindex: l.iface.index,
                    lower_ifindex: lower,
                    vid,
                })
            })
            .collect();
        if vlans == self.vlans {
            return;
        }
        for v in vlans.iter().filter(|v| !self.vlans.contains(v)) {
            if let Some(l) = links.get(&v.ifindex) {
                let _ = netinfo::prepare_sysctls(&l.iface.name)
                    .await
                    .map(|c| c.iter().for_each(|c| info!("sysctl {c}")));
                info!(vlan = %l.iface.name, vid = v.vid, "serving tagged traffic of VLAN {} ({})", v.vid, l.iface.name);
            }
        }
        match self.dp.set_vlans(vlans.clone()).await {
            Ok(()) => self.vlans = vlans,
            Err(e) => warn!("updating VLANs: {e:#}"),
        }
    }

    fn publish(&self) {
        let list: Vec<InterfaceStatus> = self
            .held
            .iter()
            .map(|(&ifindex, h)| InterfaceStatus {
                name: h.name.clone(),
                ifindex,
                xdp_mode: h.mode.to_string(),
                transmit: h.transmit.to_string(),
                redirect_target: h.transmit.redirect_target,
            })
            .collect();
        self.status.update(|s| s.interfaces = list);
    }

    fn warn_once(&mut self, key: String, msg: String) {
        if self.warned.insert(key) {
            warn!("{msg}");
        }
    }
}

fn describe(facts: &LinkFacts, mode: XdpMode, t: Transmit) -> String {
    let kind = facts.kind.as_deref().unwrap_or("device");
    let out = match (mode, t.bounce) {
        (XdpMode::Generic, _) if facts.is_veth() => {
            "generic mode, sent as skbs, which keep offloaded checksums and always reach the peer"
        }
        (XdpMode::Generic, _) => "no native XDP in its driver: generic mode, sent as skbs",
        (XdpMode::Native, Bounce::Redirect) => "frames back out by devmap redirect, which wakes the peer",
        (XdpMode::Native, Bounce::XdpTx) => "frames back out by XDP_TX",
    };
    let target = if t.redirect_target { "takes redirected frames" } else { "the kernel forwards to it" };
    format!("{kind}: {out}; {target}")
}

async fn links_by_index() -> Result<BTreeMap<u32, LinkFacts>> {
    Ok(netinfo::links().await?.into_iter().map(|l| (l.iface.index, l)).collect())
}

/// VLAN ifindex -> lower ifindex, for VLAN devices in `links`.
fn vlan_lowers(links: &BTreeMap<u32, LinkFacts>) -> HashMap<u32, u32> {
    links.values().filter_map(|l| Some((l.iface.index, l.vlan?.0))).collect()
}
