//! Host network facts, read over rtnetlink, and the sysctls XLB's data path needs.
//!
//! Every async function opens its own rtnetlink socket and drives it on the current tokio
//! runtime for the duration of the call. The socket is created by the calling thread, so the
//! answers come from that thread's network namespace.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use futures::{Stream, TryStreamExt};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::{InetDevConf, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

/// A network interface: its name and kernel index.
#[derive(Debug, Clone, PartialEq)]
pub struct Iface {
    pub name: String,
    pub index: u32,
}

/// The interface of the IPv4 default route and its primary IPv4 address (`listen: auto`).
///
/// Among several default routes in the main table the lowest metric wins. The address is the
/// route's preferred source if the interface carries it, else the first primary (non-secondary)
/// address whose subnet holds the gateway, else the interface's first primary address.
pub async fn default_route_addr() -> Result<(Iface, Ipv4Addr)> {
    let nl = Netlink::connect()?;
    let dump = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let routes: Vec<RouteMessage> =
        nl.handle.route().get(dump).execute().try_collect().await.context("dumping IPv4 routes")?;
    let Some((oif, route)) = best_default(&routes) else {
        bail!("no IPv4 default route");
    };
    let iface = nl.link_by_index(oif).await?;

    let addrs: Vec<AddressMessage> = nl
        .handle
        .address()
        .get()
        .set_link_index_filter(oif)
        .execute()
        .try_collect()
        .await
        .with_context(|| format!("listing addresses of {}", iface.name))?;
    let primaries: Vec<(Ipv4Addr, u8)> = addrs
        .iter()
        .filter(|a| a.header.family == AddressFamily::Inet && !is_secondary(a))
        .filter_map(|a| Some((ipv4_local(a)?, a.header.prefix_len)))
        .collect();
    let pref_src = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    });
    let gateway = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    });
    let chosen = primaries
        .iter()
        .find(|(ip, _)| Some(*ip) == pref_src)
        .or_else(|| {
            let gw = gateway?;
            primaries.iter().find(|(ip, len)| same_subnet(*ip, gw, *len))
        })
        .or_else(|| primaries.first())
        .map(|(ip, _)| *ip);
    match chosen {
        Some(ip) => Ok((iface, ip)),
        None => bail!("interface {} of the IPv4 default route has no IPv4 address", iface.name),
    }
}

/// The interface that carries `addr` as a local address, or None.
pub async fn iface_with_addr(addr: Ipv4Addr) -> Result<Option<Iface>> {
    let nl = Netlink::connect()?;
    let addrs: Vec<AddressMessage> =
        nl.handle.address().get().execute().try_collect().await.context("dumping addresses")?;
    let index = addrs
        .iter()
        .find(|a| a.header.family == AddressFamily::Inet && ipv4_local(a) == Some(addr))
        .map(|a| a.header.index);
    match index {
        Some(index) => Ok(Some(nl.link_by_index(index).await?)),
        None => Ok(None),
    }
}

/// Interface by name.
pub async fn iface_by_name(name: &str) -> Result<Iface> {
    let nl = Netlink::connect()?;
    let request = nl.handle.link().get().match_name(name).execute();
    first_link(request, || format!("no interface named {name:?}")).await
}

/// What XLB needs to know about an interface to serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkFacts {
    pub iface: Iface,
    /// The rtnetlink kind (`veth`, `vxlan`, `bridge`, ...); None for physical NICs.
    pub kind: Option<String>,
    /// An Ethernet device: XDP sees Ethernet frames on it. Layer-3 devices
    /// (ipip, wireguard, gre) are not.
    pub ethernet: bool,
    pub mtu: u32,
    /// For an 802.1Q VLAN device: (lower ifindex, VLAN id).
    pub vlan: Option<(u32, u16)>,
}

impl LinkFacts {
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }

    fn from_message(link: &LinkMessage) -> Option<LinkFacts> {
        use rtnetlink::packet_route::link::{InfoData, InfoVlan, LinkInfo, LinkLayerType};
        let (mut name, mut kind, mut mtu, mut lower, mut vid) = (None, None, 0, None, None);
        for a in &link.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Mtu(m) => mtu = *m,
                LinkAttribute::Link(l) => lower = Some(*l),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::Vlan(v)) => {
                                vid =
                                    v.iter()
                                        .find_map(|x| if let InfoVlan::Id(id) = x { Some(*id) } else { None })
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Some(LinkFacts {
            iface: Iface { name: name?, index: link.header.index },
            kind,
            ethernet: link.header.link_layer_type == LinkLayerType::Ether,
            mtu,
            vlan: lower.zip(vid),
        })
    }
}

/// Every interface of the namespace, by index.
pub async fn links() -> Result<Vec<LinkFacts>> {
    let nl = Netlink::connect()?;
    let links: Vec<LinkMessage> =
        nl.handle.link().get().execute().try_collect().await.context("dumping interfaces")?;
    Ok(links.iter().filter_map(LinkFacts::from_message).collect())
}

/// The interface of the best IPv4 default route in the main table, if any:
/// where replies to clients off the local subnets leave.
pub async fn default_route_iface() -> Result<Option<u32>> {
    let nl = Netlink::connect()?;
    let dump = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let routes: Vec<RouteMessage> =
        nl.handle.route().get(dump).execute().try_collect().await.context("dumping IPv4 routes")?;
    Ok(best_default(&routes).map(|(oif, _)| oif))
}

/// The main table's IPv4 default route with the lowest metric, and its
/// output interface.
fn best_default(routes: &[RouteMessage]) -> Option<(u32, &RouteMessage)> {
    routes
        .iter()
        .filter(|r| is_main_default(r))
        .filter_map(|r| Some((route_oif(r)?, r)))
        .min_by_key(|(_, r)| route_priority(r))
}

/// The output interface index the kernel's routing picks for each address
/// (like `ip route get`), over one socket; None where there is no route.
/// A local address gives the loopback interface.
pub async fn route_oifs(dsts: &[Ipv4Addr]) -> Result<Vec<Option<u32>>> {
    let nl = Netlink::connect()?;
    let mut out = Vec::with_capacity(dsts.len());
    for &dst in dsts {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, 32).build();
        let mut replies = nl.handle.route().get(query).execute();
        // Unreachable, blackhole, prohibit: no interface for this one, the
        // others still count.
        out.push(match replies.try_next().await {
            Ok(Some(route)) => route_oif(&route),
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => None,
            Err(e) => return Err(e).with_context(|| format!("route lookup for {dst}")),
        });
    }
    Ok(out)
}

/// A stream that yields whenever an interface, an IPv4 address or an IPv4
/// route of the namespace changes (rtnetlink multicast). The messages
/// themselves are not parsed: a change means "look again".
pub fn changes() -> Result<impl Stream<Item = ()> + Unpin> {
    use rtnetlink::MulticastGroup;
    events(&[MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv4Route])
}

/// `changes`, and also neighbours, routing rules and nexthop objects: all
/// that can change where bpf_fib_lookup() sends a packet.
pub fn forwarding_changes() -> Result<impl Stream<Item = ()> + Unpin> {
    use rtnetlink::MulticastGroup;
    events(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Nexthop,
    ])
}

fn events(groups: &[rtnetlink::MulticastGroup]) -> Result<impl Stream<Item = ()> + Unpin> {
    use futures::StreamExt;
    let (conn, handle, messages) =
        rtnetlink::new_multicast_connection(groups).context("subscribing to rtnetlink events")?;
    let task = tokio::spawn(conn);
    // The connection task lives as long as the stream: it ends with it.
    let guard = Netlink { handle, task };
    Ok(messages.map(move |_| {
        let _ = &guard;
    }))
}

/// Makes the kernel able to finish what XDP hands it, on `ifname`:
/// - `net.ipv4.conf.<if>.forwarding=1`: `bpf_fib_lookup` refuses to answer without it;
/// - `net.ipv4.conf.<if>.accept_local=1`: rewritten packets carry a local source address when
///   the kernel forwards them after a neighbour miss;
/// - if the effective `rp_filter` (the larger of `conf.all` and `conf.<if>`) is 1 (strict):
///   `conf.<if>.rp_filter=2` (loose), which makes the interface's effective value loose whatever
///   `conf.all` says; `conf.all` and other interfaces are left alone.
///
/// Each value is written to `/proc/sys/net/ipv4/conf/<if>/` (the same effect as sysctl(8)).
/// Where that file system is read-only (a container's `/proc/sys`) or denies the write, the
/// values are set over rtnetlink instead (RTM_SETLINK, `IFLA_AF_SPEC` → `AF_INET` →
/// `IFLA_INET_CONF`), which needs only CAP_NET_ADMIN in the interface's network namespace. That
/// path sets the same per-interface values, but unlike the proc handler for `forwarding` it
/// does not also turn LRO off on the device; native XDP drivers refuse or disable LRO
/// themselves.
///
/// Returns the changes made, e.g. `"net.ipv4.conf.eth0.forwarding 0 -> 1"`; empty if none.
/// Works in the calling thread's network namespace. In the returned keys a `.` in the
/// interface name is written `/`, as sysctl(8) expects.
pub async fn prepare_sysctls(ifname: &str) -> Result<Vec<String>> {
    if ifname.is_empty() || ifname == "." || ifname == ".." || ifname.contains('/') {
        bail!("invalid interface name {ifname:?}");
    }
    let dir = Path::new(CONF_DIR).join(ifname);
    if !dir.is_dir() {
        bail!("no IPv4 configuration for interface {ifname:?} ({} does not exist)", dir.display());
    }
    let mut wanted = Vec::new();
    for key in [DevConf::Forwarding, DevConf::AcceptLocal] {
        let value = read_conf(ifname, key.name())?.1;
        if value != 1 {
            wanted.push((key, value, 1));
        }
    }
    let all = read_conf("all", DevConf::RpFilter.name())?.1;
    let this = read_conf(ifname, DevConf::RpFilter.name())?.1;
    if all.max(this) == 1 {
        wanted.push((DevConf::RpFilter, this, 2));
    }

    let mut refused = Vec::new();
    for &(key, _, new) in &wanted {
        let path = dir.join(key.name());
        match fs::write(&path, format!("{new}\n")) {
            Ok(()) => {}
            Err(e) if is_refusal(&e) => refused.push((key, new)),
            Err(e) => return Err(e).with_context(|| format!("writing {}", path.display())),
        }
    }
    if !refused.is_empty() {
        set_devconf(ifname, &refused).await.with_context(|| {
            format!("{} is not writable here, and setting the values over rtnetlink failed", dir.display())
        })?;
    }
    let name = ifname.replace('.', "/");
    Ok(wanted
        .iter()
        .map(|(key, old, new)| format!("net.ipv4.conf.{name}.{} {old} -> {new}", key.name()))
        .collect())
}

/// The per-interface IPv4 settings XLB changes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum DevConf {
    Forwarding,
    AcceptLocal,
    RpFilter,
}

impl DevConf {
    /// The file under `/proc/sys/net/ipv4/conf/<if>/`.
    fn name(self) -> &'static str {
        match self {
            DevConf::Forwarding => "forwarding",
            DevConf::AcceptLocal => "accept_local",
            DevConf::RpFilter => "rp_filter",
        }
    }

    fn set(self, conf: &mut InetDevConf, value: i32) {
        match self {
            DevConf::Forwarding => conf.forwarding = value,
            DevConf::AcceptLocal => conf.accept_local = value,
            DevConf::RpFilter => conf.rp_filter = value,
        }
    }
}

/// A write that a read-only or access-checked `/proc/sys` refused (rather than a bad value).
fn is_refusal(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error()
        .is_some_and(|n| matches!(Errno::from_raw(n), Errno::EROFS | Errno::EACCES | Errno::EPERM))
}

/// Sets IPv4 devconf values of `ifname` over rtnetlink. The kernel applies each entry of the
/// nested `IFLA_INET_CONF` array (indexed by `IPV4_DEVCONF_*`) to the device, as writing its
/// `/proc/sys/net/ipv4/conf/<if>/` file would. Values must be non-zero: the request leaves
/// zero entries out.
async fn set_devconf(ifname: &str, values: &[(DevConf, i64)]) -> Result<()> {
    use rtnetlink::packet_route::link::{AfSpecInet, AfSpecUnspec};
    let mut conf = InetDevConf::default();
    for &(key, value) in values {
        let v = i32::try_from(value).ok().filter(|v| *v != 0);
        let v = v.ok_or_else(|| anyhow!("{} {value} cannot be set over rtnetlink", key.name()))?;
        key.set(&mut conf, v);
    }
    let request = LinkUnspec::new_with_name(ifname)
        .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![
            AfSpecInet::DevConfRequest(conf),
        ])]))
        .build();
    let nl = Netlink::connect()?;
    nl.handle.link().set(request).execute().await.map_err(|e| match errno(&e) {
        Some(n) => anyhow!("RTM_SETLINK {ifname}: {}", nix::errno::Errno::from_raw(n).desc()),
        None => anyhow!("RTM_SETLINK {ifname}: {e}"),
    })
}

/// The kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`), inclusive.
pub fn local_port_range() -> Result<(u16, u16)> {
    let text = fs::read_to_string(PORT_RANGE).with_context(|| format!("reading {PORT_RANGE}"))?;
    parse_port_range(&text).with_context(|| format!("parsing {PORT_RANGE}"))
}

const CONF_DIR: &str = "/proc/sys/net/ipv4/conf";
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

fn parse_port_range(text: &str) -> Result<(u16, u16)> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [lo, hi] = fields[..] else {
        bail!("expected two ports, got {text:?}");
    };
    let lo: u16 = lo.parse().with_context(|| format!("bad port {lo:?}"))?;
    let hi: u16 = hi.parse().with_context(|| format!("bad port {hi:?}"))?;
    if lo > hi {
        bail!("empty port range {lo}-{hi}");
    }
    Ok((lo, hi))
}

fn read_conf(ifname: &str, key: &str) -> Result<(PathBuf, i64)> {
    let path = Path::new(CONF_DIR).join(ifname).join(key);
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value = text.trim().parse().with_context(|| format!("parsing {} ({text:?})", path.display()))?;
    Ok((path, value))
}

/// An rtnetlink socket driven by a task on the current runtime; the task ends with it.
struct Netlink {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Netlink {
    fn connect() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
        Ok(Netlink { handle, task: tokio::spawn(conn) })
    }

    async fn link_by_index(&self, index: u32) -> Result<Iface> {
        let request = self.handle.link().get().match_index(index).execute();
        first_link(request, || format!("no interface with index {index}")).await
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The first link of a by-name or by-index request; ENODEV becomes `missing()`.
async fn first_link(
    replies: impl Stream<Item = Result<LinkMessage, rtnetlink::Error>>,
    missing: impl Fn() -> String,
) -> Result<Iface> {
    futures::pin_mut!(replies);
    let link = match replies.try_next().await {
        Ok(Some(link)) => link,
        Ok(None) => bail!(missing()),
        Err(e) if errno(&e) == Some(nix::libc::ENODEV) => bail!(missing()),
        Err(e) => return Err(e).with_context(|| format!("link lookup ({})", missing())),
    };
    let name = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .ok_or_else(|| anyhow!("interface {} has no name", link.header.index))?;
    Ok(Iface { name, index: link.header.index })
}

/// The positive errno of a netlink error reply.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

fn is_main_default(route: &RouteMessage) -> bool {
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    route.header.address_family == AddressFamily::Inet
        && route.header.destination_prefix_length == 0
        && route.header.kind == RouteType::Unicast
        && table == u32::from(RouteHeader::RT_TABLE_MAIN)
}

/// The output interface of a route; for a multipath route, that of its first next hop.
fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(oif) => Some(*oif),
        RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
        _ => None,
    })
}

fn route_priority(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

fn is_secondary(addr: &AddressMessage) -> bool {
    addr.header.flags.contains(AddressHeaderFlags::Secondary)
        || addr
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Flags(f) if f.contains(AddressFlags::Secondary)))
}

/// The local IPv4 address of an address message (IFA_LOCAL; IFA_ADDRESS is the peer on
/// point-to-point links and only stands in when IFA_LOCAL is absent).
fn ipv4_local(addr: &AddressMessage) -> Option<Ipv4Addr> {
    let find = |want_local: bool| {
        addr.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) if want_local => Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) if !want_local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix_len.min(32))).unwrap_or(0);
    u32::from(a) & mask == u32::from(b) & mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A network namespace of our own (needs root), deleted on drop. Interfaces are veth pairs
    /// with both ends inside it: nothing leaves the namespace and no traffic is sent.
    struct TestNs {
        name: String,
    }

    impl TestNs {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let name = format!("xlbni{}{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            assert!(name.len() <= 15, "{name}");
            sh(&["ip", "netns", "add", &name]);
            let ns = TestNs { name };
            ns.ip("link set lo up");
            ns
        }

        fn ip(&self, args: &str) {
            let mut argv = vec!["ip", "-n", &self.name];
            argv.extend(args.split_whitespace());
            sh(&argv);
        }

        /// A veth `name` (peer `name`p, both up) with the given addresses.
        fn veth(&self, name: &str, addrs: &[&str]) {
            self.ip(&format!("link add {name} type veth peer name {name}p"));
            for addr in addrs {
                self.ip(&format!("addr add {addr} dev {name}"));
            }
            self.ip(&format!("link set {name}p up"));
            self.ip(&format!("link set {name} up"));
        }

        /// Runs `f` on a thread inside the namespace with a current-thread runtime.
        fn run<F, Fut, T>(&self, f: F) -> T
        where
            F: FnOnce() -> Fut + Send + 'static,
            Fut: Future<Output = T>,
            T: Send + 'static,
        {
            let path = format!("/run/netns/{}", self.name);
            let thread = std::thread::spawn(move || {
                let ns = fs::File::open(&path).expect("open netns");
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(f())
            });
            thread.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        }
    }

    fn sh(argv: &[&str]) {
        let out = Command::new(argv[0]).args(&argv[1..]).output().expect("spawn");
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The index the kernel reports for `name` through another interface (ioctl), inside
    /// the namespace thread.
    fn ifindex(name: &str) -> u32 {
        nix::net::if_::if_nametoindex(name).expect("if_nametoindex")
    }

    fn ip4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// d0: 10.77.0.1/24 (+ secondary 10.77.0.2) with the default route via 10.77.0.254;
    /// d1: 10.88.0.1/24, a worse default route (metric 100) via 10.88.0.254.
    fn routed_ns() -> TestNs {
        let ns = TestNs::new();
        ns.veth("d1", &["10.88.0.1/24"]);
        ns.veth("d0", &["10.77.0.1/24", "10.77.0.2/24"]);
        ns.ip("route add default via 10.88.0.254 metric 100");
        ns.ip("route add default via 10.77.0.254 metric 10");
        ns
    }

    #[test]
    fn default_route_addr_finds_interface_and_primary_address() {
        let ns = routed_ns();
        ns.run(|| async {
            let (iface, addr) = default_route_addr().await.unwrap();
            assert_eq!(iface, Iface { name: "d0".into(), index: ifindex("d0") });
            assert_eq!(addr, ip4("10.77.0.1"));
        });

        // Without a default route: a clear error.
        let bare = TestNs::new();
        bare.veth("d1", &["10.88.0.1/24"]);
        let err = bare.run(|| async { default_route_addr().await.unwrap_err() });
        assert!(err.to_string().contains("no IPv4 default route"), "{err:#}");
    }

    #[test]
    fn default_route_addr_prefers_route_source() {
        let ns = TestNs::new();
        ns.veth("d0", &["10.77.0.1/24", "10.66.0.1/24"]);
        ns.ip("route add default via 10.77.0.254 src 10.66.0.1");
        let (iface, addr) = ns.run(|| async { default_route_addr().await.unwrap() });
        assert_eq!(iface.name, "d0");
        assert_eq!(addr, ip4("10.66.0.1"));
    }

    #[test]
    fn default_route_addr_prefers_gateway_subnet() {
        // Two primary addresses; the first listed is not in the gateway's subnet.
        let ns = TestNs::new();
        ns.veth("d0", &["10.66.0.1/24", "10.77.0.1/24"]);
        ns.ip("route add default via 10.77.0.254");
        let (iface, addr) = ns.run(|| async { default_route_addr().await.unwrap() });
        assert_eq!(iface.name, "d0");
        assert_eq!(addr, ip4("10.77.0.1"));
    }

    #[test]
    fn iface_with_addr_hits_and_misses() {
        let ns = routed_ns();
        ns.run(|| async {
            let d0 = Iface { name: "d0".into(), index: ifindex("d0") };
            let d1 = Iface { name: "d1".into(), index: ifindex("d1") };
            assert_eq!(iface_with_addr(ip4("10.77.0.1")).await.unwrap(), Some(d0.clone()));
            assert_eq!(iface_with_addr(ip4("10.77.0.2")).await.unwrap(), Some(d0));
            assert_eq!(iface_with_addr(ip4("10.88.0.1")).await.unwrap(), Some(d1));
            assert_eq!(iface_with_addr(ip4("127.0.0.1")).await.unwrap().unwrap().name, "lo");
            // In the subnet, or a gateway, but not local: no.
            assert_eq!(iface_with_addr(ip4("10.77.0.3")).await.unwrap(), None);
            assert_eq!(iface_with_addr(ip4("10.77.0.254")).await.unwrap(), None);
        });
    }

    #[test]
    fn route_oifs_follow_kernel_lookup() {
        let ns = routed_ns();
        ns.run(|| async {
            let dsts = [ip4("10.88.0.5"), ip4("10.77.0.9"), ip4("192.0.2.1"), ip4("10.88.0.1")];
            let oifs = route_oifs(&dsts).await.unwrap();
            // Connected, connected, via the (better) default route, and a
            // local address routes to loopback, as `ip route get` says.
            assert_eq!(oifs, [Some(ifindex("d1")), Some(ifindex("d0")), Some(ifindex("d0")), Some(1)]);
        });

        let bare = TestNs::new();
        bare.veth("d1", &["10.88.0.1/24"]);
        bare.run(|| async {
            // No route: None for that address, the others still answered.
            let oifs = route_oifs(&[ip4("10.88.0.7"), ip4("192.0.2.1")]).await.unwrap();
            assert_eq!(oifs, [Some(ifindex("d1")), None]);
        });
    }

    #[test]
    fn iface_by_name_hits_and_misses() {
        let ns = routed_ns();
        ns.run(|| async {
            let d1 = iface_by_name("d1").await.unwrap();
            assert_eq!(d1, Iface { name: "d1".into(), index: ifindex("d1") });
            assert_eq!(iface_by_name("lo").await.unwrap().index, 1);
            let err = iface_by_name("nope0").await.unwrap_err();
            assert!(err.to_string().contains("no interface named \"nope0\""), "{err:#}");
        });
    }

    fn conf(ifname: &str, key: &str) -> i64 {
        read_conf(ifname, key).unwrap().1
    }

    fn set_conf(ifname: &str, key: &str, value: i64) {
        fs::write(Path::new(CONF_DIR).join(ifname).join(key), format!("{value}\n")).unwrap();
    }

    /// Makes `/proc/sys` read-only for the calling thread, as a container's is: the thread
    /// moves to a mount namespace of its own (the rest of the process keeps the host's).
    fn readonly_proc_sys() {
        use nix::libc;
        use std::ffi::CString;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare mount namespace");
        let (root, target) = (CString::new("/").unwrap(), CString::new("/proc/sys").unwrap());
        let mount = |src: &CString, dst: &CString, flags: libc::c_ulong| {
            // SAFETY: NUL-terminated paths; null type and data for bind and propagation mounts.
            let rc =
                unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
            assert_eq!(rc, 0, "mount {src:?} {dst:?}: {}", std::io::Error::last_os_error());
        };
        mount(&root, &root, libc::MS_REC | libc::MS_PRIVATE);
        mount(&target, &target, libc::MS_BIND);
        mount(&target, &target, libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY);
    }

    /// d0.7 from forwarding, accept_local and rp_filter 0, with conf.all
    /// strict: all three set, conf.all left alone.
    async fn d07_is_prepared() {
        let changes = prepare_sysctls("d0.7").await.unwrap();
        assert_eq!(
            changes,
            [
                "net.ipv4.conf.d0/7.forwarding 0 -> 1",
                "net.ipv4.conf.d0/7.accept_local 0 -> 1",
                "net.ipv4.conf.d0/7.rp_filter 0 -> 2",
            ]
        );
        assert_eq!(conf("d0.7", "forwarding"), 1);
        assert_eq!(conf("d0.7", "accept_local"), 1);
        // Effective rp_filter is max(all, d0.7) = 2: loose, with conf.all left strict.
        assert_eq!(conf("d0.7", "rp_filter"), 2);
        assert_eq!(conf("all", "rp_filter"), 1, "conf.all untouched");
    }

    #[test]
    fn prepare_sysctls_sets_once() {
        let ns = TestNs::new();
        // A '.' in the name: /proc/sys/net/ipv4/conf/d0.7/, sysctl key net.ipv4.conf.d0/7.
        ns.veth("d0.7", &["10.77.0.1/24"]);
        ns.veth("d1", &["10.88.0.1/24"]);
        ns.run(|| async {
            set_conf("d0.7", "forwarding", 0);
            set_conf("d0.7", "accept_local", 0);
            set_conf("d0.7", "rp_filter", 0);
            set_conf("all", "rp_filter", 1);
            set_conf("d1", "rp_filter", 1);

            d07_is_prepared().await;
            assert_eq!(conf("d1", "rp_filter"), 1, "other interfaces untouched");
            assert_eq!(conf("d1", "forwarding"), 0, "other interfaces untouched");
            assert_eq!(prepare_sysctls("d0.7").await.unwrap(), Vec::<String>::new());

            // Strict only on the interface: only the interface is loosened.
            set_conf("all", "rp_filter", 0);
            let changes = prepare_sysctls("d1").await.unwrap();
            assert_eq!(
                changes,
                [
                    "net.ipv4.conf.d1.forwarding 0 -> 1",
                    "net.ipv4.conf.d1.accept_local 0 -> 1",
                    "net.ipv4.conf.d1.rp_filter 1 -> 2",
                ]
            );
            assert_eq!(conf("all", "rp_filter"), 0);
            assert_eq!(conf("d1", "rp_filter"), 2);

            // Loose already (all=2 beats if=1): nothing to do for rp_filter.
            set_conf("all", "rp_filter", 2);
            set_conf("d1", "rp_filter", 1);
            assert_eq!(prepare_sysctls("d1").await.unwrap(), Vec::<String>::new());
            assert_eq!(conf("d1", "rp_filter"), 1);

            let err = prepare_sysctls("nope0").await.unwrap_err();
            assert!(err.to_string().contains("nope0"), "{err:#}");
            assert!(prepare_sysctls("../all").await.is_err());
        });
    }

    /// A container's /proc/sys is read-only: the same values then go over rtnetlink, and
    /// /proc/sys shows them.
    #[test]
    fn prepare_sysctls_over_rtnetlink_when_proc_sys_is_read_only() {
        let ns = TestNs::new();
        ns.veth("d0.7", &["10.77.0.1/24"]);
        ns.veth("d1", &["10.88.0.1/24"]);
        ns.run(|| async {
            set_conf("d0.7", "forwarding", 0);
            set_conf("d0.7", "accept_local", 0);
            set_conf("d0.7", "rp_filter", 0);
            set_conf("all", "rp_filter", 1);
            set_conf("d1", "accept_local", 1);
            set_conf("d1", "rp_filter", 1);
            readonly_proc_sys();
            let err = fs::write(Path::new(CONF_DIR).join("d0.7/forwarding"), "1\n").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");

            d07_is_prepared().await;
            assert_eq!(
                (conf("d1", "forwarding"), conf("d1", "rp_filter")),
                (0, 1),
                "other interfaces untouched"
            );
            assert_eq!(prepare_sysctls("d0.7").await.unwrap(), Vec::<String>::new());

            // Only what differs is sent; accept_local is 1 already.
            let changes = prepare_sysctls("d1").await.unwrap();
            assert_eq!(changes, ["net.ipv4.conf.d1.forwarding 0 -> 1", "net.ipv4.conf.d1.rp_filter 1 -> 2"]);
            assert_eq!(
                (conf("d1", "forwarding"), conf("d1", "accept_local"), conf("d1", "rp_filter")),
                (1, 1, 2)
            );
        });
    }

    #[test]
    fn port_range_parses() {
        assert_eq!(parse_port_range("32768\t60999\n").unwrap(), (32768, 60999));
        assert_eq!(parse_port_range(" 1024 1024 ").unwrap(), (1024, 1024));
        assert!(parse_port_range("32768").is_err());
        assert!(parse_port_range("32768 60999 1").is_err());
        assert!(parse_port_range("60999 32768").is_err());
        assert!(parse_port_range("0 70000").is_err());
        assert!(parse_port_range("a b").is_err());
    }

    #[test]
    fn local_port_range_reads_the_namespace() {
        // The range is per network namespace: set one in ours and read it back.
        let ns = TestNs::new();
        let range = ns.run(|| async {
            fs::write(PORT_RANGE, "40000 40999\n").unwrap();
            local_port_range().unwrap()
        });
        assert_eq!(range, (40000, 40999));
    }
}
