//! The only code that touches BPF: it opens, sizes, loads and attaches the
//! XDP program, and offers one typed function per thing the control plane
//! does to it ("set the backend table", "read counters", "expire flows").

mod abi;
mod conntrack;
mod counters;
pub mod pins;
mod worker;

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, ensure, Context, Result};
use libbpf_rs::libbpf_sys;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, ProgramInput};

pub use abi::{tcp_flags, BackendSlot, Flow, FlowKey, DIR_TO_BACKEND, DIR_TO_CLIENT};
pub use conntrack::{
    for_each_batch as for_each_conntrack_batch, for_each_connection, peer_key, pinned_connections,
    read_all as read_conntrack, BackendFlows, Connection, FlowEntry, GcPolicy, GcStats, RetiredFlows,
    Traffic,
};
pub use counters::{counter_name, Counter, Counters};
pub use worker::{DataplaneHandle, Started};

use abi::{bytes, XlbSkel, XlbSkelBuilder};

/// Most port mappings one listener carries (XLB_MAX_PORTS in xlb_consts.h).
pub const MAX_PORTS: usize = 8;

/// How one backend answered the SYNs of new connections (each connection's
/// first answer), cumulative: `answered[i]` SYN-ACKs whose latency fell in
/// bucket i of [`SYN_ACK_LATENCY_BOUNDS`] (the last: above them all),
/// `latency_ns[i]` their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handshakes {
    pub refused: u64,
    pub answered: [u64; SYN_BUCKETS],
    pub latency_ns: [u64; SYN_BUCKETS],
}

/// Latency buckets: one per bound and one above them.
pub const SYN_BUCKETS: usize = SYN_ACK_LATENCY_BOUNDS.len() + 1;

impl From<&abi::HandshakesSlot> for Handshakes {
    fn from(h: &abi::HandshakesSlot) -> Self {
        Handshakes { refused: h.refused, answered: h.answered, latency_ns: h.latency_ns }
    }
}

impl Handshakes {
    pub fn answered(&self) -> u64 {
        self.answered.iter().sum()
    }
}

/// The upper bounds (seconds) of the data path's SYN->SYN-ACK latency
/// buckets, written into its config at load (so this is their one copy):
/// from a veth pair's tens of microseconds to a SYN retransmitted twice.
/// XLB_SYN_BUCKETS in xlb_consts.h is their number plus one.
pub const SYN_ACK_LATENCY_BOUNDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.5,
];

/// Sizes fixed when the program is loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Concurrent connections the conntrack map holds (two entries each).
    pub conntrack_capacity: u32,
    /// Slots in one maglev table (prime).
    pub maglev_size: u32,
    /// Pin conntrack and links here, adopting what an earlier instance left.
    pub pins: Option<pins::PinDir>,
}

/// What the packet path serves; written before attaching.
#[derive(Debug, Clone)]
pub struct Service {
    pub listen: Ipv4Addr,
    /// Source addresses backends see (1..=16), one per client by hash.
    pub snat: Vec<Ipv4Addr>,
    /// Inclusive NAT source-port range.
    pub nat_ports: (u16, u16),
    /// (local_port, remote_port) pairs.
    pub ports: Vec<(u16, u16)>,
    /// VLAN interfaces on attached interfaces: tagged traffic on them is
    /// served too.
    pub vlans: Vec<Vlan>,
    /// Answer packets of no known connection with a RST (unknown_flow: rst).
    pub unknown_flow_rst: bool,
    /// How fast the program answers itself, per CPU.
    pub rate_limits: crate::config::RateLimits,
    /// SYN cookies: `On` answers every new SYN with one; `Auto` only while
    /// engaged (`set_syn_proxy`); both accept an ACK carrying one.
    pub syn_proxy: crate::config::SynProxy,
}

/// A VLAN interface over a lower interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vlan {
    pub ifindex: u32,
    pub lower_ifindex: u32,
    pub vid: u16,
}

/// How the program sits on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver (native XDP).
    Native,
    /// In the generic stack path, after the skb is built: slower, works anywhere.
    Generic,
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}

/// How frames leave an attached interface (see `struct iface` in
/// xlb_structs.h and the README's "Node shapes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Frames going back out of the interface they arrived on.
    pub bounce: Bounce,
    /// Other interfaces may redirect frames into this one: its driver takes
    /// XDP frames (the kernel's NDO_XMIT feature).
    pub redirect_target: bool,
}

/// How a frame leaves by the interface it arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bounce {
    XdpTx,
    /// A devmap redirect to the interface itself: unlike XDP_TX it wakes a
    /// veth peer that runs no XDP program.
    Redirect,
}

impl std::fmt::Display for Transmit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.bounce {
            Bounce::XdpTx => "xdp_tx",
            Bounce::Redirect => "redirect",
        })
    }
}

impl Transmit {
    /// What an interface in `mode` does when nothing more is known: XDP_TX,
    /// and native interfaces take redirects.
    pub fn default_for(mode: XdpMode) -> Transmit {
        Transmit { bounce: Bounce::XdpTx, redirect_target: mode == XdpMode::Native }
    }
}

/// The kernel's NETDEV_XDP_ACT_NDO_XMIT: the driver takes redirected frames.
pub const XDP_FEATURE_NDO_XMIT: u64 = 1 << 2;

/// The XDP features the kernel reports for an interface (0 when it reports
/// none: kernels before 6.3).
pub fn xdp_features(ifindex: u32) -> Result<u64> {
    // SAFETY: a zeroed options struct of the size libbpf expects.
    let mut opts: libbpf_sys::bpf_xdp_query_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<libbpf_sys::bpf_xdp_query_opts>() as _;
    // SAFETY: opts outlives the call.
    let rc = unsafe { libbpf_sys::bpf_xdp_query(ifindex as i32, 0, &mut opts) };
    ensure!(rc == 0, "querying XDP on ifindex {ifindex}: {}", std::io::Error::from_raw_os_error(-rc));
    Ok(opts.feature_flags)
}

/// One attached interface. Dropping the link fd detaches the program.
#[derive(Debug)]
pub struct Attachment {
    pub ifname: String,
    pub ifindex: u32,
    pub mode: XdpMode,
    pub transmit: Transmit,
    /// The interface's own MTU (0: unknown): in generic mode a bigger packet
    /// is an aggregate the stack splits again, not one too big to send.
    pub mtu: u32,
    /// Closing it detaches the program.
    _link: OwnedFd,
}

pub struct Dataplane {
    skel: XlbSkel<'static>,
    maglev_size: u32,
    attachments: Vec<Attachment>,
    pins: Option<pins::PinDir>,
    /// Connections taken over from an earlier instance's pinned map.
    adopted: bool,
    /// Held while this process owns the pins: a second `xlb run` of the same
    /// instance must not adopt (and later delete) what a live one uses.
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Dataplane {
    /// Opens and loads the program with the given sizes; nothing is attached.
    pub fn load(opts: LoadOptions) -> Result<Self> {
        ensure!(opts.maglev_size > 0, "maglev table size must be positive");
        ensure!(opts.conntrack_capacity > 0, "conntrack capacity must be positive");
        // The skeleton borrows its object storage for its whole life; one
        // small allocation per loaded program is the price of owning it here.
        let storage = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = XlbSkelBuilder::default().open(storage).context("opening the XDP program")?;
        open.maps
            .conntrack
            .set_max_entries(opts.conntrack_capacity.checked_mul(2).context("conntrack capacity too large")?)
            .context("sizing the conntrack map")?;
        open.maps
            .maglev
            .set_max_entries(opts.maglev_size.checked_mul(2).context("maglev size too large")?)
            .context("sizing the maglev map")?;
        let abi =
            open.maps.rodata_data.as_deref().expect("the program has a .rodata section").xlb_abi_version;
        let mut adopted = false;
        let mut lock = None;
        if let Some(p) = &opts.pins {
            std::fs::create_dir_all(&p.path).with_context(|| format!("creating {}", p.path.display()))?;
            lock = Some(pins::lock(p)?);
            let ct = p.map("conntrack");
            if ct.exists() {
                check_pinned_abi(p, abi)?;
                // reuse_pinned_map takes the pinned map's shape as it is, so
                // the shape is compared here: never adopt a map of another size.
                let pinned = libbpf_rs::MapHandle::from_pinned_path(&ct)
                    .map_err(|e| incompatible(p, &e.to_string()))?;
                let want = &open.maps.conntrack;
                let shape = |m: &dyn MapCore| (m.key_size(), m.value_size(), m.max_entries());
                if shape(&pinned) != (want.key_size(), want.value_size(), want.max_entries()) {
                    return Err(incompatible(
                        p,
                        &format!(
                            "it holds {} entries of {}+{} bytes, this run needs {} of {}+{}",
                            pinned.max_entries(),
                            pinned.key_size(),
                            pinned.value_size(),
                            want.max_entries(),
                            want.key_size(),
                            want.value_size()
                        ),
                    ));
                }
                open.maps.conntrack.reuse_pinned_map(&ct).map_err(|e| incompatible(p, &e.to_string()))?;
                adopted = true;
            }
        }
        let skel = open.load().context(
            "loading the XDP program into the kernel (needs root or CAP_BPF+CAP_NET_ADMIN, and BTF)",
        )?;
        let mut dp = Dataplane {
            skel,
            maglev_size: opts.maglev_size,
            attachments: Vec::new(),
            pins: opts.pins,
            adopted,
            _lock: lock,
        };
        dp.config_mut().maglev_size = opts.maglev_size;
        if let Some(p) = dp.pins.clone() {
            if !adopted {
                dp.skel.maps.abi.update(&0u32.to_ne_bytes(), &abi.to_ne_bytes(), MapFlags::ANY)?;
                let _ = std::fs::remove_file(p.map("abi"));
                dp.skel.maps.abi.pin(p.map("abi")).context("pinning the abi map")?;
                dp.skel.maps.conntrack.pin(p.map("conntrack")).context("pinning the conntrack map")?;
            }
        }
        Ok(dp)
    }

    /// Whether live connections were taken over from pins.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    fn config_mut(&mut self) -> &mut abi::XlbConfig {
        &mut self.skel.maps.bss_data.as_deref_mut().expect("the program has a .bss section").config
    }

    fn config(&self) -> &abi::XlbConfig {
        &self.skel.maps.bss_data.as_deref().expect("the program has a .bss section").config
    }

    /// Sets what the program serves. Call before attaching: a packet may see
    /// a mix of old and new fields while this runs.
    pub fn set_service(&mut self, s: &Service) -> Result<()> {
        ensure!(!s.ports.is_empty() && s.ports.len() <= MAX_PORTS, "1 to {MAX_PORTS} port mappings");
        ensure!(s.nat_ports.0 > 0 && s.nat_ports.0 <= s.nat_ports.1, "bad NAT port range");
        let cfg = self.config_mut();
        cfg.listen_addr = u32::from_ne_bytes(s.listen.octets());
        ensure!(!s.snat.is_empty() && s.snat.len() <= cfg.snat_addrs.len(), "1 to 16 SNAT addresses");
        for (slot, ip) in cfg.snat_addrs.iter_mut().zip(s.snat.iter()) {
            *slot = u32::from_ne_bytes(ip.octets());
        }
        cfg.nr_snat = s.snat.len() as u32;
        cfg.nat_port_min = s.nat_ports.0;
        cfg.nat_port_max = s.nat_ports.1;
        for (slot, &(local, remote)) in cfg.ports.iter_mut().zip(s.ports.iter()) {
            slot.local_port = local.to_be();
            slot.remote_port = remote.to_be();
        }
        cfg.nr_ports = s.ports.len() as u32;
        // A per-instance seed keeps backend choice unpredictable to clients.
        cfg.hash_seed = rand_u32();
        cfg.flags =
            if s.unknown_flow_rst { cfg.flags | UNKNOWN_RST_FLAG } else { cfg.flags & !UNKNOWN_RST_FLAG };
        use crate::config::SynProxy;
        cfg.flags &= !(SYN_PROXY_FLAG | SYN_COOKIES_FLAG);
        cfg.flags |= match s.syn_proxy {
            SynProxy::On => SYN_PROXY_FLAG | SYN_COOKIES_FLAG,
            SynProxy::Auto => SYN_COOKIES_FLAG,
            SynProxy::Off => 0,
        };
        let r = &s.rate_limits;
        for (slot, limit) in cfg.limits.iter_mut().zip([r.icmp, r.rst, r.drain_rst]) {
            // XLB_BUDGET_ICMP, _RST, _DRAIN_RST; credit in nanoseconds.
            let cost = if limit.per_sec == 0 { 0 } else { 1_000_000_000 / u64::from(limit.per_sec) };
            slot.cost_ns = cost;
            slot.burst_ns = cost * u64::from(limit.burst);
        }
        for (slot, bound) in cfg.syn_bucket_ns.iter_mut().zip(SYN_ACK_LATENCY_BOUNDS) {
            *slot = (bound * 1e9).round() as u64;
        }
        self.set_vlans(&s.vlans)
    }

    /// Replaces the VLAN interfaces served (those over attached interfaces).
    pub fn set_vlans(&mut self, vlans: &[Vlan]) -> Result<()> {
        for v in vlans {
            let key = abi::VlanTagKey { lower_ifindex: v.lower_ifindex, vid: v.vid, pad: 0 };
            self.skel.maps.vlan_by_tag.update(bytes(&key), &v.ifindex.to_ne_bytes(), MapFlags::ANY)?;
            self.skel.maps.vlan_by_dev.update(&v.ifindex.to_ne_bytes(), bytes(&key), MapFlags::ANY)?;
        }
        for k in self.skel.maps.vlan_by_dev.keys().collect::<Vec<_>>() {
            let ifindex = u32::from_ne_bytes(k[..4].try_into().expect("u32 key"));
            if !vlans.iter().any(|v| v.ifindex == ifindex) {
                if let Ok(Some(tag)) = self.skel.maps.vlan_by_dev.lookup(&k, MapFlags::ANY) {
                    let _ = self.skel.maps.vlan_by_tag.delete(&tag);
                }
                let _ = self.skel.maps.vlan_by_dev.delete(&k);
            }
        }
        Ok(())
    }

    /// Installs a new maglev table atomically: the idle half is filled, then
    /// one word flips which half packets read. `table[i]` is slot i's
    /// backend (address, id), None for an empty table.
    pub fn set_backends(&mut self, table: &[Option<(Ipv4Addr, u32)>]) -> Result<()> {
        let m = self.maglev_size;
        ensure!(table.len() == m as usize, "maglev table has {} slots, expected {m}", table.len());
        let active = self.config().maglev_active;
        let base = if active == 0 { m } else { 0 };
        let mut keys = Vec::with_capacity(table.len() * 4);
        let mut values = Vec::with_capacity(table.len() * std::mem::size_of::<BackendSlot>());
        for (i, slot) in table.iter().enumerate() {
            let b = slot.map_or(BackendSlot::default(), |(addr, id)| BackendSlot {
                addr: u32::from_ne_bytes(addr.octets()),
                id,
            });
            keys.extend_from_slice(&(base + i as u32).to_ne_bytes());
            values.extend_from_slice(bytes(&b));
        }
        self.skel
            .maps
            .maglev
            .update_batch(&keys, &values, m, MapFlags::ANY, MapFlags::ANY)
            .context("writing the maglev table")?;
        let flag = &mut self.config_mut().maglev_active;
        // SAFETY: an aligned u32 in the mmapped .bss; a volatile store is one
        // instruction, so the program reads either the old or the new half.
        unsafe { std::ptr::write_volatile(flag, 1 - active) };
        Ok(())
    }

    /// Starts a new generation of the route cache: the program looks every
    /// next hop up again (a link, address, route or neighbour changed).
    pub fn invalidate_nexthops(&mut self) {
        let gen = &mut self.config_mut().nexthop_gen;
        let v = gen.wrapping_add(1);
        // SAFETY: as in set_backends.
        unsafe { std::ptr::write_volatile(gen, v) };
    }

    /// Sets or clears the drain flag (new SYNs answered with RST).
    pub fn set_drain(&mut self, on: bool) {
        self.set_flag(DRAIN_FLAG, on);
    }

    /// Engages or releases the SYN proxy (new SYNs answered with cookies),
    /// for syn_proxy: auto.
    pub fn set_syn_proxy(&mut self, on: bool) {
        self.set_flag(SYN_PROXY_FLAG, on);
    }

    fn set_flag(&mut self, flag: u32, on: bool) {
        let flags = &mut self.config_mut().flags;
        let v = if on { *flags | flag } else { *flags & !flag };
        // SAFETY: as in set_backends.
        unsafe { std::ptr::write_volatile(flags, v) };
    }

    /// Attaches the program to an interface with a bpf_link, native XDP
    /// when the driver has it, generic otherwise, and sends by the defaults
    /// of that mode (`Transmit::default_for`).
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<XdpMode> {
        let mode = self.attach_as(ifname, ifindex, XdpMode::Native)?;
        self.set_transmit(ifindex, Transmit::default_for(mode))?;
        Ok(mode)
    }

    /// Attaches the program to an interface with a bpf_link: in `want` mode,
    /// or generic when native fails. An earlier instance's pinned link is
    /// taken over in place (its mode kept), so no packet goes without XDP.
    /// Call `set_transmit` next: until then the interface bounces with
    /// XDP_TX and takes no redirects.
    pub fn attach_as(&mut self, ifname: &str, ifindex: u32, want: XdpMode) -> Result<XdpMode> {
        if self.attachments.iter().any(|a| a.ifindex == ifindex) {
            bail!("{ifname} is already attached");
        }
        let prog = self.skel.progs.xlb_xdp.as_fd();
        let pinned = self.pins.as_ref().map(|p| p.link(ifname));
        let mut adopted = None;
        if let Some(path) = &pinned {
            if let Some(link) = pins::open(path).with_context(|| format!("opening {}", path.display()))? {
                // The earlier instance's link: swap the program in place, so
                // no packet on this interface goes without XDP. A link of an
                // interface that was deleted (and maybe recreated) is stale.
                let same_iface = link_ifindex(link.as_fd()) == Some(ifindex);
                match same_iface.then(|| pins::link_update(link.as_fd(), prog)) {
                    Some(Ok(())) => adopted = Some(link),
                    Some(Err(e)) => {
                        tracing::warn!("pinned link for {ifname} is stale ({e}); attaching afresh");
                        std::fs::remove_file(path)?;
                    }
                    None => {
                        tracing::info!(
                            "pinned link for {ifname} belongs to a deleted interface; attaching afresh"
                        );
                        std::fs::remove_file(path)?;
                    }
                }
            }
        }
        let (link, mode) = match adopted {
            Some(link) => (link, query_mode(prog, ifindex)),
            None => {
                let native = match want {
                    XdpMode::Native => link_xdp(prog.as_raw_fd(), ifindex, libbpf_sys::XDP_FLAGS_DRV_MODE),
                    XdpMode::Generic => Err(std::io::Error::other("generic mode chosen")),
                };
                let (link, mode) = match native {
                    Ok(fd) => (fd, XdpMode::Native),
                    Err(native) => {
                        let fd = link_xdp(prog.as_raw_fd(), ifindex, libbpf_sys::XDP_FLAGS_SKB_MODE)
                            .with_context(|| format!("attaching XDP to {ifname} (native mode: {native})"))?;
                        (fd, XdpMode::Generic)
                    }
                };
                if let Some(path) = &pinned {
                    let _ = std::fs::remove_file(path);
                    pins::pin(link.as_fd(), path).with_context(|| format!("pinning {}", path.display()))?;
                }
                (link, mode)
            }
        };
        let transmit = Transmit { bounce: Bounce::XdpTx, redirect_target: false };
        self.attachments.push(Attachment {
            ifname: ifname.to_string(),
            ifindex,
            mode,
            transmit,
            mtu: 0,
            _link: link,
        });
        self.write_transmit(ifindex)?;
        Ok(mode)
    }

    /// Sets how frames leave an attached interface.
    pub fn set_transmit(&mut self, ifindex: u32, t: Transmit) -> Result<()> {
        ensure!(
            t.bounce != Bounce::Redirect || t.redirect_target,
            "bouncing by redirect needs the interface in the redirect map"
        );
        self.attachment_mut(ifindex)?.transmit = t;
        self.write_transmit(ifindex)
    }

    /// Records an attached interface's own MTU (see `Attachment::mtu`).
    pub fn set_mtu(&mut self, ifindex: u32, mtu: u32) -> Result<()> {
        self.attachment_mut(ifindex)?.mtu = mtu;
        self.write_transmit(ifindex)
    }

    fn attachment_mut(&mut self, ifindex: u32) -> Result<&mut Attachment> {
        self.attachments
            .iter_mut()
            .find(|a| a.ifindex == ifindex)
            .with_context(|| format!("ifindex {ifindex} is not attached"))
    }

    fn write_transmit(&mut self, ifindex: u32) -> Result<()> {
        let a = self.attachments.iter().find(|a| a.ifindex == ifindex).context("not attached")?;
        let (mode, t, mtu) = (a.mode, a.transmit, a.mtu);
        let key = ifindex.to_ne_bytes();
        let slot = abi::IfaceSlot {
            tx: match t.bounce {
                Bounce::XdpTx => abi::TxId::XLB_TX_XDP_TX,
                Bounce::Redirect => abi::TxId::XLB_TX_REDIRECT,
            },
            flags: if mode == XdpMode::Generic { abi::IFACE_GENERIC } else { 0 },
            mtu,
            pad: 0,
        };
        // The redirect map first: a bounce by redirect must find its entry.
        if t.redirect_target {
            self.skel
                .maps
                .tx_ports
                .update(&key, &key, MapFlags::ANY)
                .with_context(|| format!("adding ifindex {ifindex} to the redirect map"))?;
        }
        self.skel.maps.ifaces.update(&key, bytes(&slot), MapFlags::ANY).context("writing the ifaces map")?;
        if !t.redirect_target {
            let _ = self.skel.maps.tx_ports.delete(&key);
        }
        Ok(())
    }

    /// Detaches from one interface and removes its pinned link: the program
    /// stops running there at once.
    pub fn detach(&mut self, ifindex: u32) -> Result<()> {
        let i = self
            .attachments
            .iter()
            .position(|a| a.ifindex == ifindex)
            .with_context(|| format!("ifindex {ifindex} is not attached"))?;
        let a = self.attachments.remove(i);
        self.forget(&a);
        if let Some(p) = &self.pins {
            match std::fs::remove_file(p.link(&a.ifname)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing the pinned link of {}", a.ifname))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn forget(&self, a: &Attachment) {
        let key = a.ifindex.to_ne_bytes();
        let _ = self.skel.maps.tx_ports.delete(&key);
        let _ = self.skel.maps.ifaces.delete(&key);
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Attached interfaces whose link the kernel has let go of (the
    /// interface was deleted, even if one of the same name and index came
    /// back since).
    pub fn dead_links(&self) -> Vec<u32> {
        self.attachments
            .iter()
            .filter(|a| link_ifindex(a._link.as_fd()) != Some(a.ifindex))
            .map(|a| a.ifindex)
            .collect()
    }

    /// Removes the pinned link of an interface this instance does not hold:
    /// the earlier instance's program stops running there.
    pub fn remove_pinned_link(&self, ifname: &str) -> Result<()> {
        ensure!(!self.attachments.iter().any(|a| a.ifname == ifname), "{ifname} is attached");
        if let Some(p) = &self.pins {
            match std::fs::remove_file(p.link(ifname)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// The interfaces an earlier instance left pinned links on, with the
    /// interface each link is still attached to. Links whose interface is
    /// gone are removed.
    pub fn pinned_links(&self) -> Vec<(String, u32)> {
        let Some(p) = &self.pins else { return Vec::new() };
        let mut out = Vec::new();
        for name in p.linked_ifaces() {
            let path = p.link(&name);
            match pins::open(&path).ok().flatten().and_then(|l| link_ifindex(l.as_fd())) {
                Some(ifindex) => out.push((name, ifindex)),
                None => {
                    tracing::info!("removing the pinned link of {name}: its interface is gone");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        out
    }

    /// Removes this instance's pins: on exit the program then detaches and
    /// the maps go away with the process.
    pub fn remove_pins(&self) -> Result<()> {
        if let Some(p) = &self.pins {
            p.remove().with_context(|| format!("removing {}", p.path.display()))?;
        }
        Ok(())
    }

    /// Lets go without touching what runs: the pinned links keep the
    /// program attached, with its redirect map intact, for the next instance.
    pub fn release_for_handover(mut self) {
        self.attachments.clear();
    }

    /// Detaches from every interface (also done on drop).
    pub fn detach_all(&mut self) {
        for a in std::mem::take(&mut self.attachments) {
            self.forget(&a);
        }
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        counters::read(&self.skel.maps.counters)
    }

    /// Every conntrack entry (both directions), in one Vec: for tests and
    /// tools; the running control plane uses the counts below, which read
    /// the table one batch at a time.
    pub fn flows(&self) -> Result<Vec<FlowEntry>> {
        conntrack::entries(&self.skel.maps.conntrack)
    }

    /// Connections in the table (forward entries), in any state.
    pub fn connections_tracked(&self) -> Result<u64> {
        conntrack::count_connections(&self.skel.maps.conntrack)
    }

    /// Open connections right now (closed ones waiting out their grace
    /// period are not counted).
    pub fn connections_open(&self) -> Result<u64> {
        conntrack::open_connections(&self.skel.maps.conntrack)
    }

    /// Removes expired connections, both entries of each at once.
    pub fn expire_flows(&self, policy: &GcPolicy) -> Result<GcStats> {
        // Retired first: a pair the program replaces during the walk is then
        // in the next reading of `retired`, not in this one and in `live`.
        let retired = self.retired()?;
        // Read before the walk too: a failed reading must not lose what the
        // walk counted (its range of unanswered SYNs is then read again).
        let handshakes = self.handshakes()?;
        let mut stats = conntrack::expire(&self.skel.maps.conntrack, policy)?;
        stats.retired = retired;
        stats.handshakes = handshakes;
        Ok(stats)
    }

    /// How each backend answered new connections' SYNs, since load.
    pub fn handshakes(&self) -> Result<HashMap<Ipv4Addr, Handshakes>> {
        let map = &self.skel.maps.handshakes;
        let mut out = HashMap::new();
        for key in map.keys() {
            let Some(v) = map.lookup(&key, MapFlags::ANY).context("reading handshakes")? else {
                continue;
            };
            let addr = Ipv4Addr::from(<[u8; 4]>::try_from(&key[..4]).expect("a u32 key"));
            out.insert(addr, Handshakes::from(&abi::from_bytes::<abi::HandshakesSlot>(&v)));
        }
        Ok(out)
    }

    /// Traffic of the connections the data path removed itself, per
    /// backend, since load (summed over CPUs).
    fn retired(&self) -> Result<HashMap<Ipv4Addr, RetiredFlows>> {
        let map = &self.skel.maps.retired;
        let mut out = HashMap::new();
        for key in map.keys() {
            let Some(per_cpu) = map.lookup_percpu(&key, MapFlags::ANY).context("reading retired traffic")?
            else {
                continue;
            };
            let mut t = RetiredFlows::default();
            for v in &per_cpu {
                let r: abi::Retired = abi::from_bytes(v);
                t.closed_rst += r.connections_reset;
                t.closed_fin += r.connections - r.connections_reset;
                t.traffic.add(&Traffic {
                    bytes_to_backend: r.bytes_to_backend,
                    packets_to_backend: r.packets_to_backend,
                    bytes_to_client: r.bytes_to_client,
                    packets_to_client: r.packets_to_client,
                });
            }
            let addr = Ipv4Addr::from(<[u8; 4]>::try_from(&key[..4]).expect("a u32 key"));
            out.insert(addr, t);
        }
        Ok(out)
    }

    /// Runs one frame through the program with BPF_PROG_TEST_RUN, as if it
    /// arrived on `ifindex` (0: loopback) of the calling thread's network
    /// namespace. Returns the XDP action and the frame as the program left it.
    pub fn test_run(&self, frame: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let ctx = abi::XdpMd { data_end: frame.len() as u32, ingress_ifindex: ifindex, ..Default::default() };
        let mut ctx_bytes = bytes(&ctx).to_vec();
        let input = ProgramInput {
            data_in: Some(frame),
            data_out: Some(&mut out),
            context_in: (ifindex != 0).then_some(&mut ctx_bytes[..]),
            ..Default::default()
        };
        let output = self.skel.progs.xlb_xdp.test_run(input).context("BPF_PROG_TEST_RUN")?;
        let action = output.return_value;
        let len = output.data.as_ref().map_or(0, |d| d.len());
        out.truncate(len);
        Ok((action, out))
    }

    /// Kernel-timed runs of one frame: (action, mean time per run).
    pub fn time_run(&self, frame: &[u8], repeat: u32) -> Result<(u32, std::time::Duration)> {
        let mut out = vec![0u8; frame.len() + 256];
        let input =
            ProgramInput { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() };
        let output = self.skel.progs.xlb_xdp.test_run(input).context("BPF_PROG_TEST_RUN")?;
        Ok((output.return_value, output.duration))
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn check_pinned_abi(p: &pins::PinDir, ours: u32) -> Result<()> {
    let path = p.map("abi");
    let fd = pins::open(&path)?.ok_or_else(|| incompatible(p, "it has no ABI version"))?;
    let key = 0u32;
    let mut theirs = 0u32;
    // SAFETY: a 4-byte key and a 4-byte value buffer, as the abi map has.
    let ret = unsafe {
        libbpf_sys::bpf_map_lookup_elem(
            fd.as_raw_fd(),
            (&key as *const u32).cast(),
            (&mut theirs as *mut u32).cast(),
        )
    };
    if ret != 0 || theirs != ours {
        return Err(incompatible(p, &format!("its ABI version is {theirs}, this binary's is {ours}")));
    }
    Ok(())
}

fn incompatible(p: &pins::PinDir, why: &str) -> anyhow::Error {
    let instance = p.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    anyhow::anyhow!(
        "the connections pinned in {} cannot be adopted ({why}; conntrack_capacity changed, or another \
         XLB version left them). `xlb detach --instance {instance}` removes them (their connections \
         break), or run the XLB version that made them",
        p.path.display()
    )
}

/// The interface a pinned XDP link is attached to, if it still is.
fn link_ifindex(link: std::os::fd::BorrowedFd<'_>) -> Option<u32> {
    // SAFETY: zeroed info of the size the syscall is told.
    let mut info: libbpf_sys::bpf_link_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libbpf_sys::bpf_link_info>() as u32;
    // SAFETY: info and len outlive the call.
    let rc = unsafe { libbpf_sys::bpf_link_get_info_by_fd(link.as_raw_fd(), &mut info, &mut len) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the xdp member is the one an XDP link fills.
    let ifindex = unsafe { info.__bindgen_anon_1.xdp.ifindex };
    (ifindex != 0).then_some(ifindex)
}

fn query_mode(prog: std::os::fd::BorrowedFd<'_>, ifindex: u32) -> XdpMode {
    let q = libbpf_rs::Xdp::new(prog).query(ifindex as i32, libbpf_rs::XdpFlags::empty());
    match q.map(|q| q.attach_mode as u32) {
        Ok(libbpf_sys::XDP_ATTACHED_SKB) => XdpMode::Generic,
        _ => XdpMode::Native,
    }
}

/// XLB_F_UNKNOWN_RST in xlb_consts.h.
const UNKNOWN_RST_FLAG: u32 = 2;
/// XLB_F_DRAIN in xlb_consts.h.
const DRAIN_FLAG: u32 = 1;
/// XLB_F_SYN_PROXY, XLB_F_SYN_COOKIES in xlb_consts.h.
const SYN_PROXY_FLAG: u32 = 4;
const SYN_COOKIES_FLAG: u32 = 8;

fn link_xdp(prog_fd: i32, ifindex: u32, flags: u32) -> std::io::Result<OwnedFd> {
    let opts = libbpf_sys::bpf_link_create_opts {
        sz: std::mem::size_of::<libbpf_sys::bpf_link_create_opts>() as _,
        flags,
        ..Default::default()
    };
    // SAFETY: plain syscall wrapper; opts outlives the call.
    let fd = unsafe { libbpf_sys::bpf_link_create(prog_fd, ifindex as i32, libbpf_sys::BPF_XDP, &opts) };
    if fd < 0 {
        return Err(std::io::Error::from_raw_os_error(-fd));
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness: no crate needed.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(0x5eed);
    h.finish() as u32
}

/// CLOCK_MONOTONIC, as the data path's bpf_ktime_get_ns() reads it (the
/// precise clock: handshake times).
pub fn now_precise_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of
/// bpf_ktime_get_coarse_ns(), which stamps flows.
pub fn now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
