//! Golden packets through BPF_PROG_TEST_RUN: crafted frames in, the XDP
//! action, the exact output frame (built independently with etherparse,
//! checksums included) and the counter deltas out. Each case is named for
//! the behaviour it pins and runs on a fresh program in its own namespace,
//! where the FIB knows the test addresses (static neighbours).

mod common;

use std::net::Ipv4Addr;

use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv4Options, TcpHeader};
use xlb::config::SynProxy;
// TCP flag bits and XLB's marks as struct flow.tcp_flags holds them.
use xlb::dataplane::tcp_flags::{
    ACK, CT_ANSWERED, CT_CLOSED, CT_ESTABLISHED, CT_FIN_FIRST, CT_FIN_SEQ, CT_SEQ, FIN, RST, SYN,
};
use xlb::dataplane::{
    Bounce, Counter, Counters, Dataplane, FlowEntry, GcPolicy, LoadOptions, Service, Traffic, Transmit,
    XdpMode,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const LB1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
const FAR_BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x0a];

const LISTEN: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// On the LB's second interface: reached by redirect, not XDP_TX.
const FAR_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
/// On-link but with no neighbour entry: the kernel must resolve it.
const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
const NAT_PORTS: (u16, u16) = (20000, 20999);
/// VLAN 100 over g0. This kernel has no 8021q module, so g1 stands in for
/// the VLAN interface in the maps (the program only sees ifindexes): its
/// hosts are reached with frames tagged 100 on g0.
const VLAN_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const VLAN_BACKEND: Ipv4Addr = FAR_BACKEND;

/// A TCP/IPv4 frame, described by the fields a case cares about.
#[derive(Clone)]
struct Tcp {
    smac: [u8; 6],
    dmac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    syn: bool,
    ack: bool,
    fin: bool,
    rst: bool,
    seq: u32,
    /// The acknowledgment number, when `ack`.
    ack_no: u32,
    ttl: u8,
    /// Don't fragment.
    df: bool,
    ip_options: Vec<u8>,
    payload: Vec<u8>,
    /// An 802.1Q tag with this VLAN id.
    vlan: Option<u16>,
    /// ECE and CWR (a SYN asking for ECN).
    ecn: bool,
}

fn from_client(dport: u16) -> Tcp {
    Tcp {
        smac: CLIENT_MAC,
        dmac: LB_MAC,
        src: (CLIENT, 40000),
        dst: (LISTEN, dport),
        syn: true,
        ack: false,
        fin: false,
        rst: false,
        seq: 1000,
        ack_no: 7777,
        ttl: 64,
        df: true,
        ip_options: vec![],
        payload: vec![],
        vlan: None,
        ecn: false,
    }
}

impl Tcp {
    fn ack(mut self) -> Tcp {
        self.syn = false;
        self.ack = true;
        self.payload = b"GET / HTTP/1.0\r\n\r\n".to_vec();
        self
    }

    fn frame(&self) -> Vec<u8> {
        let mut tcp = TcpHeader::new(self.src.1, self.dst.1, self.seq, 64240);
        tcp.syn = self.syn;
        tcp.ack = self.ack;
        tcp.fin = self.fin;
        tcp.rst = self.rst;
        tcp.ece = self.ecn;
        tcp.cwr = self.ecn;
        tcp.acknowledgment_number = if self.ack { self.ack_no } else { 0 };
        let mut ip = Ipv4Header::new(
            (tcp.header_len() + self.payload.len()) as u16,
            self.ttl,
            IpNumber::TCP,
            self.src.0.octets(),
            self.dst.0.octets(),
        )
        .unwrap();
        ip.options = Ipv4Options::try_from(&self.ip_options[..]).unwrap();
        ip.total_len = (ip.header_len() + tcp.header_len() + self.payload.len()) as u16;
        ip.identification = 0x4242;
        ip.dont_fragment = self.df;
        ip.header_checksum = ip.calc_header_checksum();
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, &self.payload).unwrap();
        let eth = Ethernet2Header { source: self.smac, destination: self.dmac, ether_type: EtherType::IPV4 };
        let mut out = eth.to_bytes().to_vec();
        tag(&mut out, self.vlan);
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&tcp.to_bytes());
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Inserts an 802.1Q tag after the MAC addresses of a 14-byte header.
fn tag(frame: &mut Vec<u8>, vlan: Option<u16>) {
    if let Some(vid) = vlan {
        let [hi, lo] = vid.to_be_bytes();
        frame.splice(12..12, [0x81, 0x00, hi, lo]);
    }
}

/// Checks the frame's IPv4 and TCP checksums with etherparse, and returns
/// the TCP header.
fn checked_tcp(frame: &[u8]) -> (Ipv4Header, TcpHeader) {
    let (eth, mut rest) = Ethernet2Header::from_slice(frame).unwrap();
    if eth.ether_type == EtherType::VLAN_TAGGED_FRAME {
        rest = &rest[4..];
    }
    let (ip, rest) = Ipv4Header::from_slice(rest).unwrap();
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 checksum");
    let (tcp, payload) = TcpHeader::from_slice(rest).unwrap();
    assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, payload).unwrap(), "TCP checksum");
    (ip, tcp)
}

/// A loaded program in a namespace whose FIB knows the test hosts. IPv6 is
/// off there: the program sits on g1, and the kernel's own neighbour
/// discovery frames would otherwise move the counters under a test.
struct Lb {
    dp: Dataplane,
    ifindex: u32,
    /// g1, where the program is attached (the test runs inject on g0).
    far: u32,
    seen: Counters,
}

impl Lb {
    fn new(backends: &[Ipv4Addr]) -> Lb {
        Lb::with_capacity(backends, 1024)
    }

    fn with_capacity(backends: &[Ipv4Addr], conntrack_capacity: u32) -> Lb {
        Lb::load(backends, conntrack_capacity, NAT_PORTS, &[LISTEN], false, Default::default(), SynProxy::Off)
    }

    /// A program whose NAT source ports are `nat_ports`: a range of one
    /// port puts every second connection to a backend under port pressure.
    fn with_nat_ports(backends: &[Ipv4Addr], nat_ports: (u16, u16)) -> Lb {
        Lb::load(backends, 1024, nat_ports, &[LISTEN], false, Default::default(), SynProxy::Off)
    }

    /// A program whose backends see clients from the SNAT pool `snat`.
    fn with_snat(backends: &[Ipv4Addr], snat: &[Ipv4Addr]) -> Lb {
        Lb::load(backends, 1024, NAT_PORTS, snat, false, Default::default(), SynProxy::Off)
    }

    /// A program that answers packets of no known connection with a RST
    /// (unknown_flow: rst; the other cases keep the drop).
    fn with_unknown_flow_rst(backends: &[Ipv4Addr]) -> Lb {
        Lb::load(backends, 1024, NAT_PORTS, &[LISTEN], true, Default::default(), SynProxy::Off)
    }

    /// A program whose own answers are limited by `rate_limits`.
    fn with_rate_limits(backends: &[Ipv4Addr], rate_limits: xlb::config::RateLimits) -> Lb {
        Lb::load(backends, 1024, NAT_PORTS, &[LISTEN], false, rate_limits, SynProxy::Off)
    }

    /// A program with the SYN proxy set to `mode`.
    fn with_syn_proxy(backends: &[Ipv4Addr], mode: SynProxy) -> Lb {
        Lb::load(backends, 1024, NAT_PORTS, &[LISTEN], false, Default::default(), mode)
    }

    fn load(
        backends: &[Ipv4Addr],
        conntrack_capacity: u32,
        nat_ports: (u16, u16),
        snat: &[Ipv4Addr],
        unknown_flow_rst: bool,
        rate_limits: xlb::config::RateLimits,
        syn_proxy: xlb::config::SynProxy,
    ) -> Lb {
        let ifindex = nix::net::if_::if_nametoindex("g0").unwrap();
        let far = nix::net::if_::if_nametoindex("g1").unwrap();
        let mut dp =
            Dataplane::load(LoadOptions { conntrack_capacity, maglev_size: 251, pins: None }).unwrap();
        dp.set_service(&Service {
            listen: LISTEN,
            snat: snat.to_vec(),
            nat_ports,
            ports: vec![(80, 8080), (443, 8443)],
            vlans: vec![xlb::dataplane::Vlan { ifindex: far, lower_ifindex: ifindex, vid: 100 }],
            unknown_flow_rst,
            rate_limits,
            syn_proxy,
        })
        .unwrap();
        dp.set_backends(&maglev_table(backends)).unwrap();
        // g1 becomes a redirect target; g0 stays free for test runs.
        dp.attach("g1", far).unwrap();
        let seen = dp.counters().unwrap();
        Lb { dp, ifindex, far, seen }
    }

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.dp.test_run(frame, self.ifindex).unwrap()
    }

    /// `run`, arriving on g1, where the program is attached.
    fn run_on_far(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.dp.test_run(frame, self.far).unwrap()
    }

    /// Asserts exactly these counters moved since the last call.
    ///
    /// A case that names none of the NAT port counters expects each new
    /// connection's port derived from its tuple: the test client's ports lie
    /// outside the NAT range and no two collide.
    fn counters_moved(&mut self, expected: &[(Counter, u64)]) {
        const PORT_CHOICE: [Counter; 7] = [
            Counter::XLB_CNT_NAT_RECYCLED,
            Counter::XLB_CNT_NAT_PRESERVED,
            Counter::XLB_CNT_NAT_DERIVED,
            Counter::XLB_CNT_NAT_PROBED,
            Counter::XLB_CNT_NAT_RECLAIMED,
            Counter::XLB_CNT_NAT_COLLISION,
            Counter::XLB_CNT_CT_REOPENED,
        ];
        let mut expected = expected.to_vec();
        if !expected.iter().any(|(c, _)| PORT_CHOICE.contains(c)) {
            let new = expected.iter().find(|(c, _)| *c == Counter::XLB_CNT_NEW_FLOW).map_or(0, |e| e.1);
            expected.push((Counter::XLB_CNT_NAT_DERIVED, new));
        }
        let now = self.dp.counters().unwrap();
        let delta = now.since(&self.seen);
        let cache_checked = expected.iter().any(|(c, _)| *c == Counter::XLB_CNT_NEXTHOP_MISS);
        for (name, v) in delta.iter() {
            // How often the route cache missed is a cost, not an outcome: only
            // the cases about the cache check it.
            if name == "nexthop_miss" && !cache_checked {
                continue;
            }
            let want = expected
                .iter()
                .find(|(c, _)| xlb::dataplane::counter_name(*c) == name)
                .map_or(0, |(_, n)| *n);
            assert_eq!(v, want, "counter {name}");
        }
        self.seen = now;
    }

    /// `counters_moved` for a case that opens `new_flow` connections whose
    /// derived ports may collide (more than two in one range): each port is
    /// derived or, after collisions, probed.
    fn counters_moved_opening(&mut self, expected: &[(Counter, u64)]) {
        let d = self.dp.counters().unwrap().since(&self.seen);
        let new = expected.iter().find(|(c, _)| *c == Counter::XLB_CNT_NEW_FLOW).map_or(0, |e| e.1);
        let (derived, probed) = (d.get(Counter::XLB_CNT_NAT_DERIVED), d.get(Counter::XLB_CNT_NAT_PROBED));
        let collisions = d.get(Counter::XLB_CNT_NAT_COLLISION);
        assert_eq!(derived + probed, new, "every new connection's port derived or probed");
        assert!(collisions >= probed, "a port is probed only after a collision");
        let mut expected = expected.to_vec();
        expected.extend([
            (Counter::XLB_CNT_NAT_DERIVED, derived),
            (Counter::XLB_CNT_NAT_PROBED, probed),
            (Counter::XLB_CNT_NAT_COLLISION, collisions),
        ]);
        self.counters_moved(&expected);
    }

    /// The NAT source port of the one connection from `client`.
    fn nat_port(&self, client: (Ipv4Addr, u16)) -> u16 {
        let flows = self.dp.flows().unwrap();
        let f = flows.iter().find(|f| f.is_forward() && f.src() == client).expect("forward entry");
        f.nat().0 .1
    }
}

fn golden_ns() -> common::Netns {
    let ns = common::Netns::new("xg");
    ns.exec(&format!(
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 && \
         ip link add g0 address {} type veth peer name g0p && \
         ip link add g1 address {} type veth peer name g1p && \
         ip addr add 10.0.0.1/24 dev g0 && ip addr add 10.1.0.1/24 dev g1 && \
         for d in g0 g0p g1 g1p; do ip link set $d up; done && \
         sysctl -qw net.ipv4.conf.all.forwarding=1 && \
         ip neigh add {CLIENT} lladdr {} dev g0 nud permanent && \
         ip neigh add {BACKEND} lladdr {} dev g0 nud permanent && \
         ip neigh add {FAR_BACKEND} lladdr {} dev g1 nud permanent && \
         ip neigh add {VLAN_CLIENT} lladdr {} dev g1 nud permanent",
        mac(LB_MAC),
        mac(LB1_MAC),
        mac(CLIENT_MAC),
        mac(BACKEND_MAC),
        mac(FAR_BACKEND_MAC),
        mac(CLIENT_MAC)
    ));
    ns
}

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Runs a case on a fresh program inside a fresh namespace.
fn case(backends: &'static [Ipv4Addr], f: impl FnOnce(&mut Lb) + Send + 'static) {
    case_in("true", backends, f);
}

/// `case`, after shell commands `setup` ran in the namespace.
fn case_in(setup: &str, backends: &'static [Ipv4Addr], f: impl FnOnce(&mut Lb) + Send + 'static) {
    case_on(setup, move || Lb::new(backends), f);
}

/// `case_in` on the program `lb` loads (one of Lb's constructors).
fn case_on(setup: &str, lb: impl FnOnce() -> Lb + Send + 'static, f: impl FnOnce(&mut Lb) + Send + 'static) {
    let ns = golden_ns();
    ns.exec(setup);
    ns.run(move || f(&mut lb()));
}

/// A maglev table of 251 slots spread over `backends` (ids: their index),
/// empty without backends.
fn maglev_table(backends: &[Ipv4Addr]) -> Vec<Option<(Ipv4Addr, u32)>> {
    (0..251)
        .map(|i| (!backends.is_empty()).then(|| (backends[i % backends.len()], (i % backends.len()) as u32)))
        .collect()
}

const ONE: &[Ipv4Addr] = &[BACKEND];

/// Frames the program must leave to the kernel untouched, with the counter
/// that says why: (name, frame, counter).
fn passed_untouched() -> Vec<(&'static str, Vec<u8>, Counter)> {
    let other_ip = Tcp { dst: (Ipv4Addr::new(10, 0, 0, 99), 80), ..from_client(80) };
    let other_port = from_client(22);
    let mut udp = from_client(80).frame();
    udp[14 + 9] = 17; // protocol: UDP (checksums are irrelevant to a pass)
    let arp = {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&CLIENT.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&LISTEN.octets());
        f
    };
    let ipv6 = {
        let mut f = from_client(80).frame();
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f
    };
    let mut vlan = from_client(80).frame();
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
    let short_ip = from_client(80).frame()[..14 + 12].to_vec();
    let short_tcp = from_client(80).frame()[..14 + 20 + 10].to_vec();
    let mut fragment = from_client(80).frame();
    fragment[14 + 6] = 0x20; // more-fragments set, DF cleared
    let mut bad_ihl = from_client(80).frame();
    bad_ihl[14] = 0x44; // IHL 4 < 5
    let reply_without_flow = Tcp {
        smac: BACKEND_MAC,
        src: (BACKEND, 8080),
        dst: (LISTEN, NAT_PORTS.0 + 5),
        ack: true,
        ..from_client(80)
    };
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = from_client(80).frame();
        f(&mut frame);
        frame
    };
    let icmp = with(&|f| f[14 + 9] = 1);
    let qinq = with(&|f| {
        f.splice(12..12, [0x88, 0xa8, 0x00, 0x07]);
    });
    let later_fragment = with(&|f| f[14 + 7] = 0x10); // offset 16, MF clear
    let ipv6_in_ipv4_type = with(&|f| f[14] = 0x65);
    let ihl_past_frame = with(&|f| f[14] = 0x4f);
    let doff_below_5 = with(&|f| f[14 + 20 + 12] = 0x40);
    let doff_past_total_len = with(&|f| f[14 + 20 + 12] = 0xf0);
    let tot_len_short = with(&|f| f[14 + 2..14 + 4].copy_from_slice(&30u16.to_be_bytes()));
    let other_local_port = from_client(81);
    let reply_outside_nat_range = Tcp {
        smac: BACKEND_MAC,
        src: (BACKEND, 8080),
        dst: (LISTEN, NAT_PORTS.1 + 1),
        ack: true,
        ..from_client(80)
    };
    let from_listen_port = Tcp { src: (LISTEN, 80), dst: (CLIENT, 40000), ..from_client(80) };
    vec![
        ("icmp_to_listen_ip", icmp, Counter::XLB_CNT_PASS_NOT_TCP),
        ("qinq_tagged", qinq, Counter::XLB_CNT_PASS_VLAN),
        ("non_first_fragment", later_fragment, Counter::XLB_CNT_PASS_FRAGMENT),
        ("ip_version_6_in_ipv4_frame", ipv6_in_ipv4_type, Counter::XLB_CNT_PASS_MALFORMED),
        ("ihl_beyond_the_frame", ihl_past_frame, Counter::XLB_CNT_PASS_MALFORMED),
        ("tcp_data_offset_below_5", doff_below_5, Counter::XLB_CNT_PASS_MALFORMED),
        ("tcp_data_offset_past_total_length", doff_past_total_len, Counter::XLB_CNT_PASS_MALFORMED),
        ("ip_total_length_shorter_than_headers", tot_len_short, Counter::XLB_CNT_PASS_MALFORMED),
        ("tcp_to_neighbouring_port", other_local_port.frame(), Counter::XLB_CNT_PASS_NOT_OURS),
        ("backend_packet_outside_nat_range", reply_outside_nat_range.frame(), Counter::XLB_CNT_PASS_NOT_OURS),
        ("packet_from_the_listen_ip", from_listen_port.frame(), Counter::XLB_CNT_PASS_NOT_OURS),
        ("tcp_to_other_ip", other_ip.frame(), Counter::XLB_CNT_PASS_NOT_OURS),
        ("tcp_to_unmapped_port", other_port.frame(), Counter::XLB_CNT_PASS_NOT_OURS),
        ("udp_to_listen_port", udp, Counter::XLB_CNT_PASS_NOT_TCP),
        ("arp_request", arp, Counter::XLB_CNT_PASS_NOT_IPV4),
        ("ipv6_ethertype", ipv6, Counter::XLB_CNT_PASS_NOT_IPV4),
        ("vlan_tagged", vlan, Counter::XLB_CNT_PASS_VLAN),
        // (A frame shorter than an Ethernet header cannot be test-run: the
        // kernel refuses it before XDP, as drivers do.)
        ("truncated_ipv4", short_ip, Counter::XLB_CNT_PASS_MALFORMED),
        ("truncated_tcp", short_tcp, Counter::XLB_CNT_PASS_MALFORMED),
        ("ipv4_fragment", fragment, Counter::XLB_CNT_PASS_FRAGMENT),
        ("ipv4_ihl_below_5", bad_ihl, Counter::XLB_CNT_PASS_MALFORMED),
        ("reply_to_nat_port_without_flow", reply_without_flow.frame(), Counter::XLB_CNT_PASS_NOT_OURS),
    ]
}

#[test]
fn frames_not_ours_pass_untouched() {
    case(ONE, |lb| {
        for (name, frame, counter) in passed_untouched() {
            let (action, out) = lb.run(&frame);
            assert_eq!(action, XDP_PASS, "{name}: action");
            assert_eq!(out, frame, "{name}: frame must be untouched");
            lb.counters_moved(&[(counter, 1)]);
            assert!(lb.dp.flows().unwrap().is_empty(), "{name}: no conntrack entry");
        }
    });
}

#[test]
fn syn_is_natted_to_the_backend_and_sent_back_out() {
    case(ONE, |lb| {
        let syn = from_client(80);
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        let port = lb.nat_port(syn.src);
        assert!((NAT_PORTS.0..=NAT_PORTS.1).contains(&port), "NAT port {port} in range");
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..syn
        };
        assert_eq!(out, want.frame());
        checked_tcp(&out);
        assert_eq!(lb.dp.flows().unwrap().len(), 2, "forward and reverse entries");
    });
}

#[test]
fn established_packets_follow_the_flow_and_replies_go_back() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);

        let reply = Tcp {
            smac: BACKEND_MAC,
            dmac: LB_MAC,
            src: (BACKEND, 8080),
            dst: (LISTEN, port),
            ack: true,
            seq: 5000,
            ..syn.clone()
        };
        let (action, out) = lb.run(&reply.frame());
        assert_eq!(action, XDP_TX, "SYN-ACK");
        let want = Tcp { smac: LB_MAC, dmac: CLIENT_MAC, src: (LISTEN, 80), dst: syn.src, ttl: 63, ..reply };
        assert_eq!(out, want.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);

        let data = syn.clone().ack();
        let (action, out) = lb.run(&data.frame());
        assert_eq!(action, XDP_TX, "ACK with data");
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..data
        };
        assert_eq!(out, want.frame());
        checked_tcp(&out);
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);

        let flows = lb.dp.flows().unwrap();
        let fwd = flows.iter().find(|f| f.is_forward()).unwrap();
        assert_eq!(fwd.flow.packets, 2);
        assert_eq!(fwd.flow.tcp_flags & 0x12, 0x12, "SYN and ACK recorded");
    });
}

#[test]
fn retransmitted_syn_reuses_backend_and_nat_port() {
    case(&[BACKEND, FAR_BACKEND], |lb| {
        let syn = from_client(80);
        let (_, first) = lb.run(&syn.frame());
        let (_, again) = lb.run(&syn.frame());
        assert_eq!(first[14..], again[14..], "same rewrite");
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 2)]);
        assert_eq!(lb.dp.flows().unwrap().len(), 2);
    });
}

#[test]
fn non_syn_without_a_flow_is_dropped() {
    case(ONE, |lb| {
        for (name, t) in [
            ("ack", from_client(80).ack()),
            ("syn_ack", Tcp { ack: true, ..from_client(80) }),
            ("rst", Tcp { syn: false, rst: true, ..from_client(80) }),
            ("syn_fin", Tcp { fin: true, ..from_client(80) }),
            ("syn_rst", Tcp { rst: true, ..from_client(80) }),
            ("fin", Tcp { syn: false, fin: true, ..from_client(80) }),
        ] {
            let (action, _) = lb.run(&t.frame());
            assert_eq!(action, XDP_DROP, "{name}");
            lb.counters_moved(&[(Counter::XLB_CNT_DROP_NO_FLOW, 1)]);
        }
        assert!(lb.dp.flows().unwrap().is_empty());
    });
}

#[test]
fn syn_without_backends_is_dropped() {
    case(&[], |lb| {
        let (action, _) = lb.run(&from_client(80).frame());
        assert_eq!(action, XDP_DROP);
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_NO_BACKEND, 1)]);
        assert!(lb.dp.flows().unwrap().is_empty());
    });
}

#[test]
fn second_port_mapping_uses_its_remote_port() {
    case(ONE, |lb| {
        let syn = from_client(443);
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        let (_, tcp) = checked_tcp(&out);
        assert_eq!(tcp.destination_port, 8443);
    });
}

#[test]
fn ip_options_are_carried_and_checksums_stay_valid() {
    case(ONE, |lb| {
        // Four NOPs and an end-of-list: IHL 6.
        let syn = Tcp { ip_options: vec![1, 1, 1, 0], ..from_client(80) };
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        let port = lb.nat_port(syn.src);
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..syn
        };
        assert_eq!(out, want.frame());
    });
}

/// ICMP time exceeded for `t`, from the address it was sent to, quoting
/// its IP header and first 8 bytes of TCP.
fn time_exceeded(t: &Tcp) -> Vec<u8> {
    use etherparse::{icmpv4::TimeExceededCode, Icmpv4Type};
    icmp_answer(t, Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit))
}

/// ICMP "fragmentation needed" (type 3 code 4) for `t` with the next-hop
/// MTU in bytes 6-7, from the address it was sent to, quoting its IP header
/// and first 8 bytes of TCP as it arrived (before any NAT).
fn frag_needed_answer(t: &Tcp, mtu: u16) -> Vec<u8> {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
    icmp_answer(
        t,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu }),
    )
}

/// The ICMP error a router sends back for `t`: to its sender, from the
/// address it was sent to, MACs swapped, quoting its IP header and first 8
/// bytes of TCP.
fn icmp_answer(t: &Tcp, kind: etherparse::Icmpv4Type) -> Vec<u8> {
    use etherparse::Icmpv4Header;
    let f = t.frame();
    let quote = &f[14..14 + 28];
    let icmp = Icmpv4Header::with_checksum(kind, quote);
    let mut ip = Ipv4Header::new(
        (icmp.header_len() + 28) as u16,
        64,
        IpNumber::ICMP,
        t.dst.0.octets(),
        t.src.0.octets(),
    )
    .unwrap();
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();
    let eth = Ethernet2Header { source: t.dmac, destination: t.smac, ether_type: EtherType::IPV4 };
    let mut out = eth.to_bytes().to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(quote);
    out
}

#[test]
fn ttl_one_is_answered_with_time_exceeded_not_forwarded() {
    case(ONE, |lb| {
        let syn = Tcp { ttl: 1, payload: vec![9; 20], ..from_client(80) };
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        assert_eq!(out, time_exceeded(&syn));
        assert!(checksums_valid(&out));
        lb.counters_moved(&[(Counter::XLB_CNT_TTL_EXCEEDED, 1)]);
        assert!(lb.dp.flows().unwrap().is_empty(), "no connection for an expired SYN");

        // With IP options the quote would need more room: dropped, counted.
        let (action, _) = lb.run(&Tcp { ttl: 1, ip_options: vec![1, 1, 1, 0], ..from_client(80) }.frame());
        assert_eq!(action, XDP_DROP);
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_TTL, 1)]);

        // A backend's reply with TTL 1 is answered to the backend.
        lb.run(&from_client(80).frame());
        let port = lb.nat_port(syn.src);
        let reply = Tcp {
            smac: BACKEND_MAC,
            src: (BACKEND, 8080),
            dst: (LISTEN, port),
            ack: true,
            ttl: 1,
            ..syn.clone()
        };
        let (action, out) = lb.run(&reply.frame());
        assert_eq!(action, XDP_TX);
        assert_eq!(out, time_exceeded(&reply));
    });
}

#[test]
fn backend_behind_another_interface_is_redirected() {
    case(&[FAR_BACKEND], |lb| {
        let syn = from_client(80);
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_REDIRECT);
        let port = lb.nat_port(syn.src);
        let want = Tcp {
            smac: LB1_MAC,
            dmac: FAR_BACKEND_MAC,
            src: (LISTEN, port),
            dst: (FAR_BACKEND, 8080),
            ttl: 63,
            ..syn
        };
        assert_eq!(out, want.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
    });
}

#[test]
fn unresolved_neighbour_goes_to_the_kernel_rewritten_with_ttl_intact() {
    case(&[UNRESOLVED_BACKEND], |lb| {
        let syn = from_client(80);
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_PASS);
        let port = lb.nat_port(syn.src);
        // MACs untouched (the kernel routes it), TTL untouched (the kernel
        // decrements it when it forwards).
        let want = Tcp { src: (LISTEN, port), dst: (UNRESOLVED_BACKEND, 8080), ..syn };
        assert_eq!(out, want.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_PASS_NO_NEIGH, 1)]);
    });
}

#[test]
fn connections_spread_over_backends_and_each_keeps_its_own() {
    case(&[BACKEND, FAR_BACKEND], |lb| {
        let mut to = std::collections::HashMap::new();
        for sport in 30000..30200u16 {
            let syn = Tcp { src: (CLIENT, sport), ..from_client(80) };
            let (_, out) = lb.run(&syn.frame());
            let (ip, _) = checked_tcp(&out);
            to.insert(sport, ip.destination);
        }
        let far = to.values().filter(|d| **d == FAR_BACKEND.octets()).count();
        assert!((50..150).contains(&far), "200 connections split {far}/{}", 200 - far);
        for sport in 30000..30200u16 {
            let data = Tcp { src: (CLIENT, sport), ..from_client(80) }.ack();
            let (_, out) = lb.run(&data.frame());
            let (ip, _) = checked_tcp(&out);
            assert_eq!(ip.destination, to[&sport], "flow {sport} stays on its backend");
        }
        // 200 ports derived from 200 tuples into a range of 1000: a few
        // collide, and those take a random port.
        let d = lb.dp.counters().unwrap().since(&lb.seen);
        let (derived, probed) = (d.get(Counter::XLB_CNT_NAT_DERIVED), d.get(Counter::XLB_CNT_NAT_PROBED));
        assert_eq!(derived + probed, 200);
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 200),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 400),
            (Counter::XLB_CNT_NAT_DERIVED, derived),
            (Counter::XLB_CNT_NAT_PROBED, probed),
            (Counter::XLB_CNT_NAT_COLLISION, d.get(Counter::XLB_CNT_NAT_COLLISION)),
        ]);
    });
}

#[test]
fn nat_ports_are_unique_per_backend_and_exhaustion_is_counted() {
    case(ONE, |lb| {
        let span = (NAT_PORTS.1 - NAT_PORTS.0 + 1) as usize;
        let mut ports = std::collections::HashSet::new();
        let mut exhausted = 0;
        for sport in 0..(span as u16 + 20) {
            let syn = Tcp { src: (CLIENT, 30000 + sport), ..from_client(80) };
            let (action, out) = lb.run(&syn.frame());
            if action == XDP_DROP {
                exhausted += 1;
                continue;
            }
            let (_, tcp) = checked_tcp(&out);
            assert!(ports.insert(tcp.source_port), "port {} handed out twice", tcp.source_port);
            // Established, so its port can never be recycled.
            let synack = Tcp {
                syn: true,
                seq: BACKEND_ISN,
                ack_no: syn.seq + 1,
                ..from_backend(BACKEND, tcp.source_port)
            };
            assert_eq!(lb.run(&synack.frame()).0, XDP_TX);
            assert_eq!(lb.run(&request(&syn).frame()).0, XDP_TX);
        }
        // Bounded probing may give up a little before the range is full,
        // but never hands out a port twice and never rewrites on failure.
        assert!(ports.len() >= span * 9 / 10, "{} of {span} ports used", ports.len());
        let c = lb.dp.counters().unwrap();
        assert_eq!(c.get(Counter::XLB_CNT_DROP_NAT_EXHAUSTED), exhausted);
        assert_eq!(c.get(Counter::XLB_CNT_NAT_RECYCLED), 0);
        assert!(exhausted >= 20);
        assert!(flags_of(lb).iter().all(|(_, f)| f & CT_ESTABLISHED != 0), "all established");
    });
}

/// A SYN flood's half-open pairs hold ports; a SYN that finds none free
/// takes over the oldest half-open pair it saw, never an established one.
#[test]
fn half_open_pairs_are_recycled_when_ports_run_out_established_ones_never() {
    case_on(
        "true",
        || Lb::with_nat_ports(ONE, (20000, 20001)),
        |lb| {
            // One established connection and one half-open (a spoofed SYN).
            let good = from_client(80);
            let good_port = open(lb, &good, BACKEND);
            let spoofed = Tcp { src: ([198, 51, 100, 7].into(), 1234), ..from_client(80) };
            lb.run(&spoofed.frame());
            let spoofed_port = lb.nat_port(spoofed.src);
            assert_ne!(good_port, spoofed_port);
            lb.counters_moved_opening(&[
                (Counter::XLB_CNT_NEW_FLOW, 2),
                (Counter::XLB_CNT_FWD_TO_BACKEND, 3),
                (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
            ]);
            // A new client: both ports taken; the half-open one is recycled.
            let next = Tcp { src: (CLIENT, 40007), ..from_client(80) };
            let (action, out) = lb.run(&next.frame());
            assert_eq!(action, XDP_TX);
            assert_eq!(out, natted_to_backend(&next, (LISTEN, spoofed_port), BACKEND).frame());
            lb.counters_moved(&[
                (Counter::XLB_CNT_NEW_FLOW, 1),
                (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
                (Counter::XLB_CNT_NAT_COLLISION, 32),
                (Counter::XLB_CNT_NAT_RECYCLED, 1),
            ]);
            // The spoofed pair is gone whole: its client's packets find nothing.
            assert!(entry(lb, spoofed.src, (LISTEN, 80)).is_none(), "old forward entry removed");
            assert_eq!(lb.dp.flows().unwrap().len(), 4);
            assert_eq!(rev_of(lb, BACKEND, spoofed_port).nat().1, next.src);
            assert_eq!(rev_of(lb, BACKEND, good_port).nat().1, good.src, "established kept");
            // Once the new one completes too, nothing is left to recycle.
            let synack = Tcp {
                syn: true,
                seq: BACKEND_ISN,
                ack_no: next.seq + 1,
                ..from_backend(BACKEND, spoofed_port)
            };
            expect_sent(lb, &synack, &natted_to_client(&synack, next.src), "SYN-ACK");
            let req = request(&next);
            expect_sent(lb, &req, &natted_to_backend(&req, (LISTEN, spoofed_port), BACKEND), "request");
            let late = Tcp { src: (CLIENT, 40008), ..from_client(80) };
            expect_dropped(lb, &late, "no port left");
            lb.counters_moved(&[
                (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
                (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
                (Counter::XLB_CNT_NAT_COLLISION, 32),
                (Counter::XLB_CNT_DROP_NAT_EXHAUSTED, 1),
            ]);
        },
    );
}

/// A backend may still hold a recycled pair's SYN_RECV on the very 4-tuple,
/// and answers a SYN inside that connection's window with a RST: such a SYN
/// is not given the port. A client answering the backend's stale ACK with
/// a RST gets it through (the handshake has not completed).
#[test]
fn a_half_open_pair_is_not_recycled_for_a_syn_inside_its_window() {
    case_on(
        "true",
        || Lb::with_nat_ports(ONE, (20000, 20000)),
        |lb| {
            let spoofed = Tcp { src: ([198, 51, 100, 7].into(), 1234), seq: 1_000_000, ..from_client(80) };
            lb.run(&spoofed.frame());
            let close = Tcp { seq: 1_000_005, ..from_client(80) };
            expect_dropped(lb, &close, "inside the old window");
            let far = Tcp { seq: 1_000_000u32.wrapping_add(1 << 31), ..from_client(80) };
            assert_eq!(lb.run(&far.frame()).0, XDP_TX, "outside it: recycled");
            let d = lb.dp.counters().unwrap().since(&lb.seen);
            assert_eq!(
                (d.get(Counter::XLB_CNT_NAT_RECYCLED), d.get(Counter::XLB_CNT_DROP_NAT_EXHAUSTED)),
                (1, 1)
            );
            // The client's RST for the backend's stale ACK goes through.
            let rst = Tcp { syn: false, rst: true, seq: 1_000_001, ..from_client(80) };
            let (action, _) = lb.run(&rst.frame());
            assert_eq!(action, XDP_TX);
            lb.seen = lb.dp.counters().unwrap();
        },
    );
}

/// A client ACK that does not ack the backend's SYN-ACK (a blind guess)
/// does not complete the handshake: the pair stays recyclable.
#[test]
fn only_an_ack_of_the_backends_syn_ack_completes_the_handshake() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        let synack = Tcp { syn: true, seq: BACKEND_ISN, ack_no: syn.seq + 1, ..from_backend(BACKEND, port) };
        lb.run(&synack.frame());
        let blind = Tcp { ack_no: 0x1234_5678, ..request(&syn) };
        lb.run(&blind.frame());
        assert!(flags_of(lb).iter().all(|(_, f)| f & CT_ESTABLISHED == 0), "{:?}", flags_of(lb));
        lb.run(&request(&syn).frame());
        assert!(flags_of(lb).iter().all(|(_, f)| f & CT_ESTABLISHED != 0), "{:?}", flags_of(lb));
    });
}

/// RFC 5961 §3 as a middlebox applies it: a RST counts only near where its
/// sender's sequence was seen; a blind attacker's guesses are dropped.
#[test]
fn rsts_outside_their_senders_window_are_ignored_and_an_in_window_one_closes() {
    case(ONE, |lb| {
        let syn = from_client(80);
        let port = open(lb, &syn, BACKEND);
        let client_next = request(&syn).seq + request(&syn).payload.len() as u32;
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 2),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
        ]);
        let before = flags_of(lb);
        let backend_rst = |seq: u32| Tcp { rst: true, ack: false, seq, ..from_backend(BACKEND, port) };
        let client_rst = |seq: u32| Tcp { rst: true, ack: false, syn: false, seq, ..syn.clone() };
        let guesses = [
            backend_rst(BACKEND_ISN + 1 + (1 << 20) + 1),
            backend_rst((BACKEND_ISN + 1).wrapping_sub((1 << 20) + 1)),
            backend_rst(BACKEND_ISN.wrapping_add(1 << 31)),
            client_rst(client_next + (1 << 20) + 1),
            client_rst(client_next.wrapping_sub((1 << 20) + 1)),
        ];
        for g in &guesses {
            expect_dropped(lb, g, "out-of-window RST");
        }
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_RST_WINDOW, guesses.len() as u64)]);
        assert_eq!(flags_of(lb), before, "no RST recorded");
        // The backend's own RST carries its snd_nxt, or a little past what
        // XLB saw of it: in the window, it ends the connection.
        let genuine = backend_rst(BACKEND_ISN + 1 + 1000);
        expect_sent(lb, &genuine, &natted_to_client(&genuine, syn.src), "in-window RST");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
        assert!(flags_of(lb).iter().all(|(_, f)| f & CT_CLOSED != 0), "closed: {:?}", flags_of(lb));
    });
}

/// A forger cannot walk a sender's mark to where its RST would land: the
/// mark moves by at most 1 MiB at a time, and a FIN far from it is not
/// taken for one.
#[test]
fn forged_segments_cannot_move_the_window_a_rst_or_fin_is_judged_by() {
    case(ONE, |lb| {
        let syn = from_client(80);
        let port = open(lb, &syn, BACKEND);
        let before = flags_of(lb);
        let far = BACKEND_ISN.wrapping_add(7 << 30);
        for k in 0..8u32 {
            let forged = Tcp { seq: BACKEND_ISN.wrapping_add(k << 30), ..from_backend(BACKEND, port) };
            lb.run(&forged.frame());
        }
        let rst = Tcp { rst: true, ack: false, seq: far, ..from_backend(BACKEND, port) };
        expect_dropped(lb, &rst, "RST where the forgeries pointed");
        let fin = Tcp { fin: true, seq: far, ..from_backend(BACKEND, port) };
        lb.run(&fin.frame());
        let client_fin = Tcp { fin: true, seq: syn.seq.wrapping_add(1 << 31), ..syn.clone().ack() };
        lb.run(&client_fin.frame());
        assert_eq!(flags_of(lb), before, "nothing closed, nothing reset");
        let d = lb.dp.counters().unwrap().since(&lb.seen);
        assert_eq!(d.get(Counter::XLB_CNT_DROP_RST_WINDOW), 1);
        lb.seen = lb.dp.counters().unwrap();
    });
}

/// A forged reply bigger than the backend's path MTU is still checked
/// against the backend's route (the size must not decide it).
#[test]
fn an_oversized_forged_reply_on_the_wrong_interface_is_dropped() {
    case_in(&narrow_paths(), ONE, |lb| {
        let syn = from_client(80);
        let port = open(lb, &syn, BACKEND);
        let big = Tcp { seq: BACKEND_ISN + 1, payload: vec![0x42; 1100], ..from_backend(BACKEND, port) };
        let frame = big.frame();
        assert_eq!(lb.run_on_far(&frame), (XDP_DROP, frame.clone()));
        let d = lb.dp.counters().unwrap().since(&lb.seen);
        assert_eq!(d.get(Counter::XLB_CNT_DROP_REPLY_IFACE), 1);
        lb.seen = lb.dp.counters().unwrap();
    });
}

/// A side that has sent nothing can only refuse the other's SYN: its RST
/// must ack that SYN exactly (RFC 9293, SYN-SENT).
#[test]
fn a_backend_rst_before_it_sent_anything_must_ack_the_syn() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        let refuse = |ack_no: u32| Tcp { rst: true, seq: 0, ack_no, ..from_backend(BACKEND, port) };
        expect_dropped(lb, &refuse(syn.seq + 2), "acks past the SYN");
        expect_dropped(lb, &Tcp { ack: false, ..refuse(syn.seq + 1) }, "acks nothing");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_DROP_RST_WINDOW, 2),
        ]);
        let genuine = refuse(syn.seq + 1);
        expect_sent(lb, &genuine, &natted_to_client(&genuine, syn.src), "refusal");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
    });
}

/// Passive health: a backend's first answer to each SYN is noted per
/// backend, a SYN-ACK in the latency bucket of the time since the SYN left
/// (each bucket's sum keeps its mean inside it); a retransmitted SYN-ACK, or
/// one that does not ack the SYN, is not noted again.
#[test]
fn a_backends_syn_ack_is_noted_once_with_its_latency() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        assert!(lb.dp.handshakes().unwrap().is_empty(), "nothing answered yet");
        std::thread::sleep(std::time::Duration::from_millis(30));
        let wrong = Tcp { syn: true, seq: BACKEND_ISN, ack_no: syn.seq + 7, ..from_backend(BACKEND, port) };
        lb.run(&wrong.frame());
        assert!(lb.dp.handshakes().unwrap().is_empty(), "a SYN-ACK of something else");
        // Forwarded (the client judges it), it does not hide the answer.
        let synack = Tcp { syn: true, seq: BACKEND_ISN, ack_no: syn.seq + 1, ..from_backend(BACKEND, port) };
        lb.run(&synack.frame());
        lb.run(&synack.frame());
        let h = lb.dp.handshakes().unwrap()[&BACKEND];
        assert_eq!((h.answered(), h.refused), (1, 0), "{h:?}");
        let b = h.answered.iter().position(|&n| n == 1).unwrap();
        let bounds = xlb::dataplane::SYN_ACK_LATENCY_BOUNDS;
        let ns = h.latency_ns[b] as f64 / 1e9;
        assert!(ns >= 0.030, "at least the 30 ms slept: {ns}");
        assert!(ns <= bounds.get(b).copied().unwrap_or(f64::MAX), "{ns} in bucket {b}");
        assert!(b == 0 || ns > bounds[b - 1], "{ns} in bucket {b}");
        lb.seen = lb.dp.counters().unwrap();
    });
}

/// A SYN whose checksum does not hold opens nothing: its backend would
/// never answer it (and passive health checking would blame the backend).
#[test]
fn a_syn_with_a_bad_checksum_opens_nothing() {
    case(ONE, |lb| {
        let mut frame = from_client(80).frame();
        // The TCP checksum: Ethernet 14 + IPv4 20 + 16.
        frame[50] ^= 0x5a;
        assert_eq!(lb.run(&frame), (XDP_DROP, frame.clone()), "dropped untouched");
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_SYN_CSUM, 1)]);
        assert!(lb.dp.flows().unwrap().is_empty(), "no state");
    });
}

/// A RST acking the SYN is a refusal; a forged one (dropped) is not.
#[test]
fn a_backend_refusing_a_syn_is_noted() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        let refuse = |ack_no: u32| Tcp { rst: true, seq: 0, ack_no, ..from_backend(BACKEND, port) };
        expect_dropped(lb, &refuse(syn.seq + 2), "acks past the SYN");
        assert!(lb.dp.handshakes().unwrap().is_empty());
        lb.run(&refuse(syn.seq + 1).frame());
        lb.run(&refuse(syn.seq + 1).frame());
        let h = lb.dp.handshakes().unwrap()[&BACKEND];
        assert_eq!((h.answered(), h.refused), (0, 1), "{h:?}");
        lb.seen = lb.dp.counters().unwrap();
    });
}

/// XDP runs before rp_filter: a reply to a NAT port must arrive on the
/// interface its backend is routed by, or it is a forgery.
#[test]
fn a_reply_on_an_interface_its_backend_is_not_routed_by_is_dropped() {
    case(ONE, |lb| {
        let syn = from_client(80);
        let port = open(lb, &syn, BACKEND);
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 2),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
        ]);
        // BACKEND is routed by g0; the same reply arriving on g1 is forged.
        let reply = Tcp { seq: BACKEND_ISN + 1, ..from_backend(BACKEND, port) };
        let frame = reply.frame();
        assert_eq!(lb.run_on_far(&frame), (XDP_DROP, frame.clone()));
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_REPLY_IFACE, 1), (Counter::XLB_CNT_NEXTHOP_MISS, 1)]);
    });
    // A backend routed by g1 is answered from g1 (the client is on g0,
    // which takes no redirects here: the kernel sends it on).
    case(&[FAR_BACKEND], |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        let synack =
            Tcp { syn: true, seq: BACKEND_ISN, ack_no: syn.seq + 1, ..from_backend(FAR_BACKEND, port) };
        let (action, out) = lb.run_on_far(&synack.frame());
        assert_eq!(action, XDP_PASS);
        checked_tcp(&out);
        let d = lb.dp.counters().unwrap().since(&lb.seen);
        assert_eq!(d.get(Counter::XLB_CNT_PASS_FOREIGN_EGRESS), 1);
        assert_eq!(d.get(Counter::XLB_CNT_DROP_REPLY_IFACE), 0);
    });
}

/// While draining, the RSTs refusing new connections have their own budget.
#[test]
fn drain_rsts_are_rate_limited() {
    let limits = xlb::config::RateLimits {
        drain_rst: xlb::config::RateLimit { per_sec: 100, burst: 20 },
        ..Default::default()
    };
    case_on(
        "true",
        move || Lb::with_rate_limits(ONE, limits),
        |lb| {
            lb.dp.set_drain(true);
            let mut sent = 0;
            for i in 0..300u16 {
                let syn = Tcp { src: (Ipv4Addr::new(10, 0, 0, 2), 40000 + i), ..from_client(80) };
                if lb.run(&syn.frame()).0 == XDP_TX {
                    sent += 1;
                }
            }
            // The burst, and what 100/s refills while the loop runs.
            assert!((20..40).contains(&sent), "{sent} RSTs for 300 SYNs");
            lb.counters_moved(&[
                (Counter::XLB_CNT_DRAIN_RST, sent),
                (Counter::XLB_CNT_DROP_DRAIN_LIMIT, 300 - sent),
            ]);
        },
    );
}

/// The (MAC, IP, TCP) of a frame the SYN proxy built, checksums checked.
fn proxy_frame(frame: &[u8]) -> (Ethernet2Header, Ipv4Header, TcpHeader) {
    let (eth, _) = Ethernet2Header::from_slice(frame).unwrap();
    let (ip, tcp) = checked_tcp(frame);
    assert_eq!(frame.len(), 14 + 20 + tcp.header_len(), "no payload");
    (eth, ip, tcp)
}

/// With syn_proxy on, a SYN gets XLB's own SYN-ACK, whose sequence number
/// is a SYN cookie, and leaves no state behind.
#[test]
fn the_syn_proxy_answers_a_syn_with_a_cookie_and_keeps_no_state() {
    case_on(
        "true",
        || Lb::with_syn_proxy(ONE, SynProxy::On),
        |lb| {
            let syn = from_client(80);
            let (action, out) = lb.run(&syn.frame());
            assert_eq!(action, XDP_TX);
            let (eth, ip, tcp) = proxy_frame(&out);
            assert_eq!((eth.source, eth.destination), (LB_MAC, CLIENT_MAC));
            assert_eq!((ip.source, ip.destination), (LISTEN.octets(), CLIENT.octets()));
            assert_eq!((tcp.source_port, tcp.destination_port), (80, 40000));
            assert!(tcp.syn && tcp.ack && !tcp.rst && !tcp.fin);
            assert_eq!(tcp.acknowledgment_number, syn.seq + 1);
            // The MSS option only: a cookie remembers nothing else.
            assert_eq!(tcp.options.as_slice(), &[2, 4, 0x02, 0x18], "MSS 536: the SYN offered none");
            assert!(lb.dp.flows().unwrap().is_empty(), "no state for a SYN");
            lb.counters_moved(&[(Counter::XLB_CNT_SYNPROXY_COOKIE, 1)]);
        },
    );
}

/// The whole proxied life of a connection: the client's ACK with a valid
/// cookie becomes the backend's SYN, the backend's SYN-ACK becomes its ACK,
/// and from then on the backend's sequence numbers are translated.
#[test]
fn a_valid_cookie_opens_the_connection_and_sequence_numbers_are_translated() {
    case_on(
        "true",
        || Lb::with_syn_proxy(ONE, SynProxy::On),
        |lb| {
            let syn = from_client(80);
            let (_, out) = lb.run(&syn.frame());
            let cookie = proxy_frame(&out).2.sequence_number;
            // A forged ACK: the cookie does not hold.
            let forged = Tcp { ack_no: cookie ^ 0x8000_0000, payload: vec![], ..request(&syn) };
            expect_dropped(lb, &forged, "forged cookie");
            lb.counters_moved(&[
                (Counter::XLB_CNT_SYNPROXY_COOKIE, 1),
                (Counter::XLB_CNT_SYNPROXY_FAILED, 1),
                (Counter::XLB_CNT_DROP_NO_FLOW, 1),
            ]);
            // The client's ACK: now the connection exists, and the ACK goes
            // to the backend as the client's SYN (its own ISN).
            let ack = Tcp { ack_no: cookie + 1, payload: vec![], ..request(&syn) };
            let (action, out) = lb.run(&ack.frame());
            assert_eq!(action, XDP_TX);
            let port = lb.nat_port(syn.src);
            let (eth, ip, tcp) = proxy_frame(&out);
            assert_eq!(eth.destination, BACKEND_MAC);
            assert_eq!((ip.source, ip.destination), (LISTEN.octets(), BACKEND.octets()));
            assert_eq!((tcp.source_port, tcp.destination_port), (port, 8080));
            assert!(tcp.syn && !tcp.ack);
            assert_eq!(tcp.sequence_number, syn.seq);
            assert_eq!(tcp.options.as_slice(), &[2, 4, 0x05, 0x14], "MSS 1300");
            lb.counters_moved(&[
                (Counter::XLB_CNT_NEW_FLOW, 1),
                (Counter::XLB_CNT_SYNPROXY_VALID, 1),
                (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            ]);
            // Data before the backend answered waits for a retransmission.
            expect_dropped(lb, &Tcp { seq: syn.seq + 1 + 5, ack_no: cookie + 1, ..request(&syn) }, "early");
            // The backend answers: XLB completes its handshake, the client
            // (already connected) gets nothing.
            let synack =
                Tcp { syn: true, seq: BACKEND_ISN, ack_no: syn.seq + 1, ..from_backend(BACKEND, port) };
            let (action, out) = lb.run(&synack.frame());
            assert_eq!(action, XDP_TX);
            let (eth, ip, tcp) = proxy_frame(&out);
            assert_eq!(eth.destination, BACKEND_MAC);
            assert_eq!((ip.source, ip.destination), (LISTEN.octets(), BACKEND.octets()));
            assert_eq!((tcp.source_port, tcp.destination_port), (port, 8080));
            assert!(tcp.ack && !tcp.syn);
            assert_eq!((tcp.sequence_number, tcp.acknowledgment_number), (syn.seq + 1, BACKEND_ISN + 1));
            lb.counters_moved(&[
                (Counter::XLB_CNT_DROP_SYNPROXY_WAIT, 1),
                (Counter::XLB_CNT_SYNPROXY_ACKED, 1),
            ]);
            let h = lb.dp.handshakes().unwrap()[&BACKEND];
            assert_eq!((h.answered(), h.refused), (1, 0), "the backend's answer is noted: {h:?}");
            // Both ways, the backend's numbers in the client's view.
            let req = Tcp { ack_no: cookie + 1, ..request(&syn) };
            let want = Tcp { ack_no: BACKEND_ISN + 1, ..natted_to_backend(&req, (LISTEN, port), BACKEND) };
            expect_sent(lb, &req, &want, "request, ack translated");
            let reply = Tcp {
                seq: BACKEND_ISN + 1,
                ack_no: req.seq + req.payload.len() as u32,
                payload: b"HTTP/1.0 200 OK\r\n\r\n".to_vec(),
                ..from_backend(BACKEND, port)
            };
            let want = Tcp { seq: cookie + 1, ..natted_to_client(&reply, syn.src) };
            expect_sent(lb, &reply, &want, "reply, seq translated");
            lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1), (Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
            assert!(flags_of(lb).iter().all(|(_, f)| f & CT_ESTABLISHED != 0));
        },
    );
}

/// A lost backend SYN is sent again when the client's ACK comes again; a
/// backend that refuses is reported to the client in its own numbers.
#[test]
fn a_proxied_connection_resends_the_backends_syn_and_relays_its_refusal() {
    case_on(
        "true",
        || Lb::with_syn_proxy(ONE, SynProxy::On),
        |lb| {
            let syn = from_client(80);
            let (_, out) = lb.run(&syn.frame());
            let cookie = proxy_frame(&out).2.sequence_number;
            let ack = Tcp { ack_no: cookie + 1, payload: vec![], ..request(&syn) };
            lb.run(&ack.frame());
            let port = lb.nat_port(syn.src);
            let (action, out) = lb.run(&ack.frame());
            assert_eq!(action, XDP_TX);
            assert!(proxy_frame(&out).2.syn, "the SYN again");
            lb.counters_moved(&[
                (Counter::XLB_CNT_SYNPROXY_COOKIE, 1),
                (Counter::XLB_CNT_NEW_FLOW, 1),
                (Counter::XLB_CNT_SYNPROXY_VALID, 1),
                (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
                (Counter::XLB_CNT_SYNPROXY_RESENT, 1),
            ]);
            let refuse = Tcp { rst: true, seq: 0, ack_no: syn.seq + 1, ..from_backend(BACKEND, port) };
            let want = Tcp { seq: cookie + 1, ..natted_to_client(&refuse, syn.src) };
            expect_sent(lb, &refuse, &want, "refusal in the client's numbers");
            lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
            let h = lb.dp.handshakes().unwrap()[&BACKEND];
            assert_eq!((h.answered(), h.refused), (0, 1), "the refusal is noted: {h:?}");
        },
    );
}

/// syn_proxy: auto passes SYNs through until the proxy is engaged, and
/// takes cookie ACKs all along.
#[test]
fn with_syn_proxy_auto_syns_pass_until_engaged() {
    case_on(
        "true",
        || Lb::with_syn_proxy(ONE, SynProxy::Auto),
        |lb| {
            let syn = from_client(80);
            open(lb, &syn, BACKEND);
            lb.counters_moved(&[
                (Counter::XLB_CNT_NEW_FLOW, 1),
                (Counter::XLB_CNT_FWD_TO_BACKEND, 2),
                (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
            ]);
            lb.dp.set_syn_proxy(true);
            let other = Tcp { src: (CLIENT, 40001), ..from_client(80) };
            let (action, out) = lb.run(&other.frame());
            assert_eq!(action, XDP_TX);
            let cookie = proxy_frame(&out).2.sequence_number;
            lb.dp.set_syn_proxy(false);
            // Released meanwhile: its cookie still opens the connection.
            let ack = Tcp { ack_no: cookie + 1, payload: vec![], ..request(&other) };
            assert_eq!(lb.run(&ack.frame()).0, XDP_TX);
            lb.counters_moved(&[
                (Counter::XLB_CNT_SYNPROXY_COOKIE, 1),
                (Counter::XLB_CNT_NEW_FLOW, 1),
                (Counter::XLB_CNT_SYNPROXY_VALID, 1),
                (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            ]);
        },
    );
}

#[test]
fn closed_and_idle_flows_are_expired_in_pairs() {
    case(ONE, |lb| {
        let a = from_client(80);
        let b = Tcp { src: (CLIENT, 40001), ..from_client(80) };
        lb.run(&a.frame());
        lb.run(&b.frame());
        let port_a = lb.nat_port(a.src);
        // a: the backend answers, FIN from the client, FIN from the backend.
        lb.run(&Tcp { syn: true, ..from_backend(BACKEND, port_a) }.frame());
        lb.run(&Tcp { fin: true, ..a.clone().ack() }.frame());
        let back_fin = Tcp { fin: true, seq: BACKEND_ISN + 1, ..from_backend(BACKEND, port_a) };
        lb.run(&back_fin.frame());
        assert_eq!(lb.dp.flows().unwrap().len(), 4);

        let now = xlb::dataplane::now_ns();
        let soon = GcPolicy {
            now_ns: now + 2_000_000_000,
            idle_ns: 300_000_000_000,
            closed_ns: 1_000_000_000,
            tombstone_ns: 1_000_000_000,
            half_open_ns: 30_000_000_000,
            unanswered_created: None,
        };
        let stats = lb.dp.expire_flows(&soon).unwrap();
        assert_eq!((stats.closed, stats.orphaned, stats.active), (1, 0, 1));
        let left = lb.dp.flows().unwrap();
        assert_eq!(left.len(), 2, "only b's pair remains");
        assert!(left.iter().all(|f| f.src() == b.src || f.dst().1 != port_a));

        let later = GcPolicy { now_ns: now + 301_000_000_000, ..soon };
        let stats = lb.dp.expire_flows(&later).unwrap();
        assert_eq!((stats.closed, stats.orphaned, stats.active), (0, 1, 0));
        assert!(lb.dp.flows().unwrap().is_empty());

        // After expiry the client's next non-SYN is not ours any more.
        let (action, _) = lb.run(&a.clone().ack().frame());
        assert_eq!(action, XDP_DROP);
    });
}

#[test]
fn rst_closes_a_flow() {
    case(ONE, |lb| {
        let a = from_client(80);
        lb.run(&a.frame());
        lb.run(&Tcp { syn: false, rst: true, ..a.clone() }.frame());
        let now = xlb::dataplane::now_ns();
        let p = GcPolicy {
            now_ns: now + 2_000_000_000,
            idle_ns: 300_000_000_000,
            closed_ns: 1_000_000_000,
            tombstone_ns: 1_000_000_000,
            half_open_ns: 30_000_000_000,
            unanswered_created: None,
        };
        assert_eq!(lb.dp.expire_flows(&p).unwrap().closed, 1);
        assert!(lb.dp.flows().unwrap().is_empty());
    });
}

/// The RST a closed port sends for `seg`, built independently.
fn expected_rst(seg: &Tcp) -> Vec<u8> {
    // RFC 9293 §3.10.7.1: to a segment with ACK, seq = its ack (7777 in
    // `Tcp::frame`) and RST alone; to one without, seq 0 and RST|ACK acking
    // its sequence number plus its length (SYN and FIN count one).
    let mut tcp = TcpHeader::new(seg.dst.1, seg.src.1, if seg.ack { 7777 } else { 0 }, 0);
    tcp.rst = true;
    if !seg.ack {
        tcp.ack = true;
        let len = seg.payload.len() as u32 + u32::from(seg.syn) + u32::from(seg.fin);
        tcp.acknowledgment_number = seg.seq.wrapping_add(len);
    }
    let mut ip =
        Ipv4Header::new(tcp.header_len() as u16, 64, IpNumber::TCP, seg.dst.0.octets(), seg.src.0.octets())
            .unwrap();
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).unwrap();
    let eth = Ethernet2Header { source: seg.dmac, destination: seg.smac, ether_type: EtherType::IPV4 };
    let mut out = eth.to_bytes().to_vec();
    tag(&mut out, seg.vlan);
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&tcp.to_bytes());
    out
}

#[test]
fn draining_answers_a_new_syn_with_an_exact_rst() {
    case(ONE, |lb| {
        lb.dp.set_drain(true);
        let syn = from_client(80);
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        assert_eq!(out, expected_rst(&syn));
        checked_tcp(&out);
        lb.counters_moved(&[(Counter::XLB_CNT_DRAIN_RST, 1)]);
        assert!(lb.dp.flows().unwrap().is_empty(), "a refused SYN opens nothing");
    });
}

#[test]
fn with_unknown_flow_rst_a_packet_of_no_known_connection_gets_an_exact_rst() {
    case_on(
        "true",
        || Lb::with_unknown_flow_rst(ONE),
        |lb| {
            // Data with ACK (a connection XLB forgot): RST, seq = its ack.
            let data = from_client(80).ack();
            let (action, out) = lb.run(&data.frame());
            assert_eq!(action, XDP_TX);
            assert_eq!(out, expected_rst(&data));
            checked_tcp(&out);
            lb.counters_moved(&[(Counter::XLB_CNT_UNKNOWN_FLOW_RST, 1)]);
            // A FIN without ACK: RST|ACK acking it (the FIN counts one).
            let fin = Tcp { syn: false, fin: true, payload: vec![1, 2, 3], ..from_client(443) };
            let (action, out) = lb.run(&fin.frame());
            assert_eq!(action, XDP_TX);
            // expected_rst acks a SYN's one; a FIN counts one too: same bytes.
            assert_eq!(out, expected_rst(&Tcp { payload: vec![1, 2, 3], ..from_client(443) }));
            lb.counters_moved(&[(Counter::XLB_CNT_UNKNOWN_FLOW_RST, 1)]);
            // A RST is never answered; nothing was opened.
            let rst = Tcp { syn: false, rst: true, ..from_client(80) };
            assert_eq!(lb.run(&rst.frame()).0, XDP_DROP);
            lb.counters_moved(&[(Counter::XLB_CNT_DROP_NO_FLOW, 1)]);
            assert!(lb.dp.flows().unwrap().is_empty());
            // A tracked connection is not touched by it.
            let syn = from_client(80);
            lb.run(&syn.frame());
            let (action, out) = lb.run(&syn.clone().ack().frame());
            assert_eq!(action, XDP_TX);
            assert_eq!(checked_tcp(&out).0.destination, BACKEND.octets());
            lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 2)]);
        },
    );
}

#[test]
fn unknown_flow_rsts_are_rate_limited_and_drop_keeps_silence() {
    case_on(
        "true",
        || Lb::with_unknown_flow_rst(ONE),
        |lb| {
            // A flood from forged sources: at most the burst is answered at
            // once (the budget refills at 1000/s: a few more may pass while the
            // loop runs); the rest is dropped and counted.
            let mut sent = 0;
            for i in 0..500u16 {
                let seg = Tcp { src: (Ipv4Addr::new(10, 0, 0, 2), 40000 + i), ..from_client(80).ack() };
                if lb.run(&seg.frame()).0 == XDP_TX {
                    sent += 1;
                }
            }
            let d = lb.dp.counters().unwrap().since(&lb.seen);
            assert_eq!(d.get(Counter::XLB_CNT_UNKNOWN_FLOW_RST), sent);
            assert!((50..100).contains(&sent), "{sent} RSTs for 500 packets");
            assert_eq!(d.get(Counter::XLB_CNT_DROP_RST_LIMIT), 500 - sent);
            lb.counters_moved(&[
                (Counter::XLB_CNT_UNKNOWN_FLOW_RST, sent),
                (Counter::XLB_CNT_DROP_RST_LIMIT, 500 - sent),
            ]);
        },
    );
    // unknown_flow: drop: silence, as before.
    case(ONE, |lb| {
        let data = from_client(80).ack();
        assert_eq!(lb.run(&data.frame()), (XDP_DROP, data.frame()));
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_NO_FLOW, 1)]);
    });
}

#[test]
fn drain_rst_acks_syn_payload_and_drops_options() {
    case(ONE, |lb| {
        lb.dp.set_drain(true);
        let syn =
            Tcp { ip_options: vec![1, 1, 1, 0], payload: vec![7; 33], seq: u32::MAX - 3, ..from_client(443) };
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        assert_eq!(out, expected_rst(&syn), "ack = seq + 1 + 33, wrapping; 54-byte frame");
    });
}

#[test]
fn draining_never_answers_a_rst_and_keeps_established_flows() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        lb.dp.set_drain(true);

        let (action, out) = lb.run(&syn.clone().ack().frame());
        assert_eq!(action, XDP_TX, "established flow still forwarded");
        assert_eq!(checked_tcp(&out).0.destination, BACKEND.octets());
        let (action, _) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX, "a retransmitted SYN of a tracked flow is forwarded, not refused");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 2)]);

        let stranger = Tcp { src: (CLIENT, 40009), syn: false, rst: true, ..from_client(80) };
        let (action, _) = lb.run(&stranger.frame());
        assert_eq!(action, XDP_DROP, "an incoming RST is never answered");
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_NO_FLOW, 1)]);

        lb.dp.set_drain(false);
        let (action, _) = lb.run(&Tcp { src: (CLIENT, 40010), ..from_client(80) }.frame());
        assert_eq!(action, XDP_TX, "drain off: new connections are balanced again");
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
    });
}

#[test]
fn tcp_options_and_large_payloads_keep_valid_checksums() {
    case(ONE, |lb| {
        // SYN with MSS, SACK-permitted, timestamps and window scale.
        let mut syn = from_client(80);
        syn.payload = vec![];
        let frame = {
            let mut tcp = TcpHeader::new(syn.src.1, syn.dst.1, syn.seq, 64240);
            tcp.syn = true;
            tcp.set_options(&[
                etherparse::TcpOptionElement::MaximumSegmentSize(1460),
                etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted,
                etherparse::TcpOptionElement::Timestamp(123456, 0),
                etherparse::TcpOptionElement::Noop,
                etherparse::TcpOptionElement::WindowScale(7),
            ])
            .unwrap();
            let mut ip =
                Ipv4Header::new(tcp.header_len() as u16, 64, IpNumber::TCP, CLIENT.octets(), LISTEN.octets())
                    .unwrap();
            ip.header_checksum = ip.calc_header_checksum();
            tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).unwrap();
            let eth =
                Ethernet2Header { source: CLIENT_MAC, destination: LB_MAC, ether_type: EtherType::IPV4 };
            let mut f = eth.to_bytes().to_vec();
            f.extend_from_slice(&ip.to_bytes());
            f.extend_from_slice(&tcp.to_bytes());
            f
        };
        let (action, out) = lb.run(&frame);
        assert_eq!(action, XDP_TX);
        let (_, tcp) = checked_tcp(&out);
        assert_eq!(
            tcp.options.as_slice(),
            TcpHeader::from_slice(&frame[34..]).unwrap().0.options.as_slice(),
            "options intact"
        );

        let big = Tcp { payload: (0..1400).map(|i| i as u8).collect(), ..syn.clone().ack() };
        let (action, out) = lb.run(&big.frame());
        assert_eq!(action, XDP_TX);
        checked_tcp(&out);
        assert_eq!(&out[out.len() - 1400..], &big.payload[..], "payload untouched");

        let empty_ack = Tcp { payload: vec![], ..syn.ack() };
        let (action, out) = lb.run(&empty_ack.frame());
        assert_eq!(action, XDP_TX);
        checked_tcp(&out);
    });
}

#[test]
fn a_syn_after_the_connection_closed_starts_a_fresh_one() {
    case(&[BACKEND, FAR_BACKEND], |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let fwd = fwd_of(lb, syn.src);
        let (be, port) = (fwd.nat().1 .0, fwd.nat().0 .1);
        let synack = Tcp { syn: true, ..from_backend(be, port) };
        lb.run(&synack.frame());
        lb.run(&Tcp { fin: true, ..syn.clone().ack() }.frame());
        let before = lb.dp.flows().unwrap();
        let fwd = before.iter().find(|f| f.is_forward()).unwrap();
        assert_eq!(fwd.flow.tcp_flags & 0x01, 0x01, "FIN recorded");
        // The backend closes too: now the connection is over.
        let back_fin = Tcp { fin: true, seq: BACKEND_ISN + 1, ..from_backend(be, port) };
        lb.run(&back_fin.frame());

        let again = Tcp { seq: 999_999, ..syn.clone() };
        let (action, _) = lb.run(&again.frame());
        assert!(action == XDP_TX || action == XDP_REDIRECT);
        let after = lb.dp.flows().unwrap();
        assert_eq!(after.len(), 2, "the old pair was reopened, not added to");
        let fresh = after.iter().find(|f| f.is_forward()).unwrap();
        assert_eq!(fresh.flow.tcp_flags & 0x01, 0, "a new connection, without the old FIN");
        assert_eq!(fresh.flow.packets, 1);
        assert_eq!((fresh.nat().1 .0, fresh.nat().0 .1), (be, port), "same backend, same NAT port");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 2),
            (Counter::XLB_CNT_NAT_DERIVED, 1),
            (Counter::XLB_CNT_CT_REOPENED, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 3),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 2),
        ]);
        // The replaced pair's traffic is kept for the control plane's
        // totals: no sweep saw it end.
        let policy = GcPolicy {
            now_ns: 0,
            idle_ns: u64::MAX,
            closed_ns: u64::MAX,
            tombstone_ns: u64::MAX,
            half_open_ns: u64::MAX,
            unanswered_created: None,
        };
        let retired = lb.dp.expire_flows(&policy).unwrap().retired;
        let t = retired.get(&be).copied().unwrap_or_default().traffic;
        assert_eq!((t.packets_to_backend, t.packets_to_client), (2, 2), "{retired:?}");
        let fin = Tcp { fin: true, ..syn.clone().ack() };
        assert_eq!(t.bytes_to_backend, (syn.frame().len() + fin.frame().len()) as u64);
        assert_eq!(t.bytes_to_client, (synack.frame().len() + back_fin.frame().len()) as u64);
    });
}

#[test]
fn a_syn_on_a_reset_connection_starts_a_fresh_one() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        // The backend refuses: RST|ACK acking the SYN (RFC 9293).
        let rst = Tcp {
            smac: BACKEND_MAC,
            src: (BACKEND, 8080),
            dst: (LISTEN, port),
            syn: false,
            rst: true,
            ack: true,
            seq: 0,
            ack_no: syn.seq + 1,
            ..syn.clone()
        };
        lb.run(&rst.frame());
        lb.run(&syn.frame());
        let fwd = lb.dp.flows().unwrap().into_iter().find(|f| f.is_forward()).unwrap();
        assert_eq!(fwd.flow.packets, 1, "fresh entry after the backend's RST");
        assert_eq!(fwd.nat().0 .1, port, "reopened in place");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 2),
            (Counter::XLB_CNT_NAT_DERIVED, 1),
            (Counter::XLB_CNT_CT_REOPENED, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 2),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
        ]);
    });
}

#[test]
fn a_rst_with_a_bad_checksum_is_dropped_and_resets_nothing() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        let before = flags_of(lb);
        // Forged or corrupt, from either side: dropped before anything is
        // marked, so the connection is not closed by it.
        let backend_rst = Tcp { syn: false, rst: true, ..from_backend(BACKEND, port) };
        for seg in [backend_rst, Tcp { syn: false, rst: true, ..syn.clone() }] {
            let mut frame = seg.frame();
            frame[TCP_CSUM.start] ^= 0x5a;
            assert_eq!(lb.run(&frame), (XDP_DROP, frame.clone()));
        }
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_RST_CSUM, 2)]);
        assert_eq!(flags_of(lb), before, "no RST recorded");
        // The genuine one goes through and ends the connection.
        let rst = Tcp { syn: false, rst: true, seq: 0, ack_no: syn.seq + 1, ..from_backend(BACKEND, port) };
        let (action, out) = lb.run(&rst.frame());
        assert_eq!(action, XDP_TX);
        checked_tcp(&out);
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
        let after = flags_of(lb);
        assert!(after.iter().all(|(_, f)| f & (1 << 10) != 0), "closed: {after:?}");
    });
}

/// (is forward, tcp_flags) of every conntrack entry, sorted.
fn flags_of(lb: &Lb) -> Vec<(bool, u32)> {
    let mut t: Vec<(bool, u32)> =
        lb.dp.flows().unwrap().iter().map(|e| (e.is_forward(), e.flow.tcp_flags)).collect();
    t.sort();
    t
}

#[test]
fn fin_and_rst_of_a_tracked_flow_are_forwarded() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        for (name, t) in [
            ("fin", Tcp { fin: true, ..syn.clone().ack() }),
            ("rst", Tcp { syn: false, rst: true, ..syn.clone() }),
        ] {
            let (action, out) = lb.run(&t.frame());
            assert_eq!(action, XDP_TX, "{name}");
            checked_tcp(&out);
        }
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 3)]);
    });
}

/// A small deterministic PRNG (xorshift64*), so a failing seed reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Whether the program may touch this frame: IPv4/TCP (untagged or on the
/// served VLAN) to the listen IP on a mapped port or in the NAT range, or an
/// ICMP error to it.
fn may_touch(frame: &[u8]) -> bool {
    let Ok((eth, mut rest)) = Ethernet2Header::from_slice(frame) else { return false };
    let mut ether_type = eth.ether_type;
    if ether_type == EtherType::VLAN_TAGGED_FRAME {
        // Only the served VLAN (100) is looked into.
        if rest.len() < 4 || u16::from_be_bytes([rest[0], rest[1]]) & 0x0fff != 100 {
            return false;
        }
        ether_type = EtherType(u16::from_be_bytes([rest[2], rest[3]]));
        rest = &rest[4..];
    }
    if ether_type != EtherType::IPV4 {
        return false;
    }
    let Ok((ip, rest)) = Ipv4Header::from_slice(rest) else { return false };
    if ip.protocol == IpNumber::ICMP && ip.destination == LISTEN.octets() {
        return true; // an error about one of our flows is translated
    }
    if ip.protocol != IpNumber::TCP || ip.destination != LISTEN.octets() || rest.len() < 4 {
        return false;
    }
    let dport = u16::from_be_bytes([rest[2], rest[3]]);
    dport == 80 || dport == 443 || (NAT_PORTS.0..=NAT_PORTS.1).contains(&dport)
}

/// RFC 1071: the ones' complement sum of a span with its checksum in place.
fn sums_to_zero(b: &[u8]) -> bool {
    let mut sum: u32 =
        b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// IPv4 and TCP (or ICMP) checksums all valid (false when it does not parse).
fn checksums_valid(frame: &[u8]) -> bool {
    let Ok((eth, mut rest)) = Ethernet2Header::from_slice(frame) else { return false };
    if eth.ether_type == EtherType::VLAN_TAGGED_FRAME && rest.len() >= 4 {
        rest = &rest[4..];
    }
    let Ok((ip, rest)) = Ipv4Header::from_slice(rest) else { return false };
    if ip.protocol == IpNumber::ICMP {
        let len = (ip.total_len as usize).saturating_sub(ip.header_len()).min(rest.len());
        return ip.header_checksum == ip.calc_header_checksum() && sums_to_zero(&rest[..len]);
    }
    let Ok((tcp, payload)) = TcpHeader::from_slice(rest) else { return false };
    let payload = &payload
        [..payload.len().min((ip.total_len as usize).saturating_sub(ip.header_len() + tcp.header_len()))];
    ip.header_checksum == ip.calc_header_checksum()
        && tcp.calc_checksum_ipv4(&ip, payload).ok() == Some(tcp.checksum)
}

/// Random and mutated frames: never XDP_ABORTED; a frame that is not ours
/// leaves untouched; a rewritten frame that had valid checksums keeps them.
/// XLB_FUZZ_ITERS sets the count (make fuzz runs a long one); XLB_FUZZ_SEED
/// replays a seed.
#[test]
fn fuzz_random_and_mutated_frames() {
    let iters: usize = std::env::var("XLB_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let seed: u64 = std::env::var("XLB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_1234);
    let lb = || Lb::with_syn_proxy(&[BACKEND, FAR_BACKEND, UNRESOLVED_BACKEND], SynProxy::Auto);
    case_on("true", lb, move |lb| {
        let mut rng = Rng(seed);
        let start = std::time::Instant::now();
        let templates: Vec<Vec<u8>> = vec![
            from_client(80).frame(),
            from_client(443).ack().frame(),
            Tcp { ip_options: vec![1, 1, 1, 0], ..from_client(80) }.frame(),
            Tcp {
                smac: BACKEND_MAC,
                src: (BACKEND, 8080),
                dst: (LISTEN, NAT_PORTS.0 + 3),
                ack: true,
                ..from_client(80)
            }
            .frame(),
            Tcp { src: (VLAN_CLIENT, 2000), vlan: Some(100), ..from_client(80) }.frame(),
            // An ICMP error quoting a segment of one of the fuzzer's flows.
            frag_needed(
                CLIENT_MAC,
                Ipv4Addr::new(10, 0, 0, 254),
                LISTEN,
                &Tcp { src: (LISTEN, 80), dst: (CLIENT, 1024), ack: true, ..from_client(80) },
                64,
            ),
        ];
        let mut touched = 0;
        for i in 0..iters {
            let mut f = match rng.below(4) {
                // Pure noise, sometimes with an IPv4 ethertype to get further.
                0 => {
                    let len = 14 + rng.below(120);
                    let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    if rng.below(2) == 0 {
                        f[12..14].copy_from_slice(&[8, 0]);
                    }
                    f
                }
                // A valid frame with random client port/flags/sequence, or a
                // backend's to a random NAT port: real flows, with the
                // handshake, RST window and half-open recycling in play.
                1 => {
                    let mut t = from_client(if rng.below(2) == 0 { 80 } else { 443 });
                    t.src.1 = 1024 + rng.below(2000) as u16;
                    if rng.below(3) == 0 {
                        t = Tcp { seq: 5000, ..from_backend(BACKEND, NAT_PORTS.0 + rng.below(64) as u16) };
                    }
                    t.syn = rng.below(2) == 0;
                    t.ack = rng.below(2) == 0;
                    t.fin = rng.below(8) == 0;
                    t.rst = rng.below(8) == 0;
                    if rng.below(2) == 0 {
                        t.seq = t.seq.wrapping_add(rng.next() as u32 >> rng.below(32));
                        t.ack_no = t.ack_no.wrapping_add(rng.next() as u32 >> rng.below(32));
                    }
                    t.payload = vec![0xab; rng.below(64)];
                    t.frame()
                }
                // A template with a few random bytes or bits changed.
                _ => {
                    let mut f = templates[rng.below(templates.len())].clone();
                    for _ in 0..1 + rng.below(4) {
                        let at = rng.below(f.len());
                        if rng.below(2) == 0 {
                            f[at] = rng.next() as u8;
                        } else {
                            f[at] ^= 1 << rng.below(8);
                        }
                    }
                    match rng.below(6) {
                        0 => f.truncate(14.max(rng.below(f.len() + 1))),
                        1 => f.extend((0..rng.below(32)).map(|_| rng.next() as u8)),
                        _ => {}
                    }
                    f
                }
            };
            if f.len() < 14 {
                f.resize(14, 0);
            }
            // Now and then a drain starts or ends (its RSTs and their budget),
            // and the SYN proxy is engaged or released.
            if rng.below(5000) == 0 {
                lb.dp.set_drain(rng.below(2) == 0);
            }
            if rng.below(3000) == 0 {
                lb.dp.set_syn_proxy(rng.below(2) == 0);
            }
            // Mostly on g0; some on g1, where the program is attached and
            // replies are checked against their backend's route.
            let (action, out) = if rng.below(8) == 0 { lb.run_on_far(&f) } else { lb.run(&f) };
            let ctx = || format!("iteration {i} (seed {seed}), frame {f:02x?}");
            assert!(
                matches!(action, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT),
                "action {action}: {}",
                ctx()
            );
            if !may_touch(&f) {
                assert_eq!(action, XDP_PASS, "not ours must pass: {}", ctx());
                assert_eq!(out, f, "not ours must be untouched: {}", ctx());
            } else if out != f {
                touched += 1;
                if checksums_valid(&f) {
                    assert!(checksums_valid(&out), "checksums broken by the rewrite: {}", ctx());
                }
            }
            if start.elapsed() > std::time::Duration::from_secs(120) {
                eprintln!("fuzz: time bound reached after {i} frames");
                break;
            }
        }
        assert!(touched > iters / 20, "the fuzzer reached the rewrite path ({touched} frames)");
    });
}

/// An ICMP "fragmentation needed" from `router` to `to`, quoting the first
/// 28 bytes of `quoted` (an IPv4/TCP frame), with valid checksums.
fn frag_needed(smac: [u8; 6], router: Ipv4Addr, to: Ipv4Addr, quoted: &Tcp, ttl: u8) -> Vec<u8> {
    frag_needed_mtu(smac, router, to, quoted, ttl, 1400)
}

/// `frag_needed` advertising a next-hop MTU of `mtu`.
fn frag_needed_mtu(
    smac: [u8; 6],
    router: Ipv4Addr,
    to: Ipv4Addr,
    quoted: &Tcp,
    ttl: u8,
    mtu: u16,
) -> Vec<u8> {
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Header, Icmpv4Type};
    let q = quoted.frame();
    let quote = &q[14..14 + 28];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu }),
        quote,
    );
    let mut ip = Ipv4Header::new(
        (icmp.header_len() + quote.len()) as u16,
        ttl,
        IpNumber::ICMP,
        router.octets(),
        to.octets(),
    )
    .unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let eth = Ethernet2Header { source: smac, destination: LB_MAC, ether_type: EtherType::IPV4 };
    let mut out = eth.to_bytes().to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&icmp.to_bytes());
    out.extend_from_slice(quote);
    out
}

#[test]
fn icmp_frag_needed_from_the_client_side_reaches_the_backend() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        // A router near the client reports on a segment XLB sent the client.
        let sent_to_client =
            Tcp { smac: LB_MAC, dmac: CLIENT_MAC, src: (LISTEN, 80), dst: syn.src, ack: true, ..syn.clone() };
        let router = Ipv4Addr::new(10, 0, 0, 254);
        let (action, out) = lb.run(&frag_needed(CLIENT_MAC, router, LISTEN, &sent_to_client, 64));
        assert_eq!(action, XDP_TX);
        // The backend hears about its own segment, from the address it talks to.
        let backend_sent = Tcp { src: (BACKEND, 8080), dst: (LISTEN, port), ..sent_to_client.clone() };
        let mut want = frag_needed(LB_MAC, LISTEN, BACKEND, &backend_sent, 63);
        want[0..6].copy_from_slice(&BACKEND_MAC);
        assert_eq!(out, want);
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_FWD_ICMP, 1),
        ]);
    });
}

#[test]
fn icmp_frag_needed_from_the_backend_side_reaches_the_client() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        let sent_to_backend = Tcp { src: (LISTEN, port), dst: (BACKEND, 8080), ack: true, ..syn.clone() };
        let router = Ipv4Addr::new(10, 0, 0, 253);
        let (action, out) = lb.run(&frag_needed(BACKEND_MAC, router, LISTEN, &sent_to_backend, 64));
        assert_eq!(action, XDP_TX);
        let client_sent = Tcp { src: syn.src, dst: (LISTEN, 80), ..sent_to_backend.clone() };
        let mut want = frag_needed(LB_MAC, LISTEN, CLIENT, &client_sent, 63);
        want[0..6].copy_from_slice(&CLIENT_MAC);
        assert_eq!(out, want);
    });
}

#[test]
fn icmp_about_no_flow_of_ours_passes_untouched() {
    case(ONE, |lb| {
        let stranger = Tcp { src: (LISTEN, 80), dst: (CLIENT, 41234), ack: true, ..from_client(80) };
        let frame = frag_needed(CLIENT_MAC, Ipv4Addr::new(10, 0, 0, 254), LISTEN, &stranger, 64);
        let (action, out) = lb.run(&frame);
        assert_eq!(action, XDP_PASS);
        assert_eq!(out, frame);
        lb.counters_moved(&[(Counter::XLB_CNT_PASS_NOT_TCP, 1)]);
    });
}

#[test]
fn tagged_traffic_on_a_served_vlan_keeps_its_tag() {
    case(&[VLAN_BACKEND], |lb| {
        let syn = Tcp { src: (VLAN_CLIENT, 40000), vlan: Some(100), ..from_client(80) };
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        let port = lb.nat_port(syn.src);
        let want = Tcp {
            smac: LB1_MAC,
            dmac: FAR_BACKEND_MAC,
            src: (LISTEN, port),
            dst: (VLAN_BACKEND, 8080),
            ttl: 63,
            ..syn.clone()
        };
        assert_eq!(out, want.frame(), "rewritten, tag 100 kept");
        checked_tcp(&out);
        let reply = Tcp {
            smac: FAR_BACKEND_MAC,
            src: (VLAN_BACKEND, 8080),
            dst: (LISTEN, port),
            ack: true,
            ..syn.clone()
        };
        let (action, out) = lb.run(&reply.frame());
        assert_eq!(action, XDP_TX);
        let want = Tcp { smac: LB1_MAC, dmac: CLIENT_MAC, src: (LISTEN, 80), dst: syn.src, ttl: 63, ..reply };
        assert_eq!(out, want.frame());
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
        ]);
    });
}

#[test]
fn tagged_traffic_routed_off_its_vlan_goes_to_the_kernel() {
    case(ONE, |lb| {
        let syn = Tcp { src: (VLAN_CLIENT, 40000), vlan: Some(100), ..from_client(80) };
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_PASS, "the backend is untagged: only the kernel can untag it");
        let (ip, _) = checked_tcp(&out);
        assert_eq!(ip.destination, BACKEND.octets(), "rewritten for the kernel to forward");
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_PASS_FOREIGN_EGRESS, 1)]);
    });
}

#[test]
fn draining_answers_a_tagged_syn_with_a_tagged_rst() {
    case(&[VLAN_BACKEND], |lb| {
        lb.dp.set_drain(true);
        let syn = Tcp { src: (VLAN_CLIENT, 40000), vlan: Some(100), payload: vec![1; 10], ..from_client(80) };
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        assert_eq!(out, expected_rst(&syn));
        lb.counters_moved(&[(Counter::XLB_CNT_DRAIN_RST, 1)]);
    });
}

#[test]
fn half_open_connections_expire_early_established_ones_do_not() {
    case(ONE, |lb| {
        // A: handshake never completes (a spoofed SYN). B: completes.
        let a = Tcp { src: (CLIENT, 40100), ..from_client(80) };
        let b = Tcp { src: (CLIENT, 40101), ..from_client(80) };
        lb.run(&a.frame());
        lb.run(&b.frame());
        let port_b = lb.nat_port(b.src);
        lb.run(&Tcp { syn: true, seq: BACKEND_ISN, ..from_backend(BACKEND, port_b) }.frame());
        lb.run(&request(&b).frame());
        let now = xlb::dataplane::now_ns();
        let p = GcPolicy {
            now_ns: now + 31_000_000_000,
            idle_ns: 300_000_000_000,
            closed_ns: 10_000_000_000,
            tombstone_ns: 10_000_000_000,
            half_open_ns: 30_000_000_000,
            unanswered_created: None,
        };
        let stats = lb.dp.expire_flows(&p).unwrap();
        assert_eq!((stats.orphaned, stats.active), (1, 1));
        let left = lb.dp.flows().unwrap();
        assert!(
            left.iter().filter(|f| f.is_forward()).all(|f| f.src() == b.src),
            "only the established one stays"
        );
    });
}

#[test]
fn a_syn_on_a_half_closed_connection_does_not_replace_it() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        lb.run(&Tcp { fin: true, ..syn.clone().ack() }.frame());
        // Only the client has closed: the backend may still be sending.
        let (_, out) = lb.run(&syn.frame());
        let (_, tcp) = checked_tcp(&out);
        assert_eq!(tcp.source_port, lb.nat_port(syn.src), "same connection, same NAT port");
        let fwd = lb.dp.flows().unwrap().into_iter().find(|f| f.is_forward()).unwrap();
        assert_eq!(fwd.flow.packets, 3, "the live entry was kept");
    });
}

#[test]
fn a_full_conntrack_refuses_new_connections_and_keeps_the_old() {
    let ns = golden_ns();
    ns.run(|| {
        let mut lb = Lb::with_capacity(ONE, 4);
        for sport in 0..4u16 {
            open(&mut lb, &Tcp { src: (CLIENT, 30000 + sport), ..from_client(80) }, BACKEND);
        }
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 4),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 8),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 4),
        ]);
        let (action, out) = lb.run(&Tcp { src: (CLIENT, 31000), ..from_client(80) }.frame());
        assert_eq!(action, XDP_DROP, "a full table of established connections refuses");
        assert_eq!(out, Tcp { src: (CLIENT, 31000), ..from_client(80) }.frame(), "nothing rewritten");
        let d = lb.dp.counters().unwrap().since(&lb.seen);
        assert_eq!(d.get(Counter::XLB_CNT_DROP_CT_FULL), 1);
        assert_eq!(d.get(Counter::XLB_CNT_NAT_RECYCLED) + d.get(Counter::XLB_CNT_NEW_FLOW), 0);
        for sport in 0..4u16 {
            let (action, _) = lb.run(&Tcp { src: (CLIENT, 30000 + sport), ..from_client(80) }.ack().frame());
            assert_eq!(action, XDP_TX, "established connection {sport} is never evicted");
        }
        assert_eq!(lb.dp.flows().unwrap().len(), 8);
    });
    // Full of a SYN flood's half-open pairs (on every NAT port): a new SYN
    // recycles one.
    let ns = golden_ns();
    ns.run(|| {
        let mut lb = Lb::load(ONE, 4, (20000, 20003), &[LISTEN], false, Default::default(), SynProxy::Off);
        for i in 0..4u16 {
            let spoofed = Tcp { src: (Ipv4Addr::new(198, 51, 100, 1 + i as u8), 1234), ..from_client(80) };
            assert_eq!(lb.run(&spoofed.frame()).0, XDP_TX);
        }
        let (action, _) = lb.run(&from_client(80).frame());
        assert_eq!(action, XDP_TX, "a full table of half-open pairs makes room");
        let d = lb.dp.counters().unwrap().since(&lb.seen);
        assert_eq!((d.get(Counter::XLB_CNT_NAT_RECYCLED), d.get(Counter::XLB_CNT_NEW_FLOW)), (1, 5));
        assert_eq!(lb.dp.flows().unwrap().len(), 8);
        lb.seen = lb.dp.counters().unwrap();
    });
}

#[test]
fn a_sweep_reads_the_whole_table_and_deletes_no_open_connection() {
    let ns = golden_ns();
    ns.run(|| {
        // More entries than one batch read returns (8192): 3 backends x 2
        // ports of 1000 NAT ports each leave room for ~5000 connections.
        let lb = Lb::with_capacity(&[BACKEND, FAR_BACKEND, UNRESOLVED_BACKEND], 20_000);
        let mut opened = 0u64;
        for i in 0..5000u16 {
            let t = Tcp { src: (CLIENT, 1024 + i), ..from_client(if i % 2 == 0 { 80 } else { 443 }) };
            let (action, _) = lb.run(&t.frame());
            if action != XDP_DROP {
                opened += 1;
            }
        }
        assert!(opened > 4500, "{opened} connections opened");
        // Near a full port range a SYN may recycle a half-open pair (these
        // all are): that pair is gone.
        let opened = opened - lb.dp.counters().unwrap().get(Counter::XLB_CNT_NAT_RECYCLED);
        assert_eq!(lb.dp.flows().unwrap().len() as u64, 2 * opened, "every entry is read");
        let now = xlb::dataplane::now_ns();
        let p = GcPolicy {
            now_ns: now + 11_000_000_000,
            idle_ns: 300_000_000_000,
            closed_ns: 10_000_000_000,
            tombstone_ns: 10_000_000_000,
            half_open_ns: 30_000_000_000,
            unanswered_created: None,
        };
        let stats = lb.dp.expire_flows(&p).unwrap();
        assert_eq!((stats.active, stats.closed, stats.orphaned, stats.unpaired), (opened, 0, 0, 0));
        assert_eq!(lb.dp.flows().unwrap().len() as u64, 2 * opened, "nothing open was deleted");
    });
}

#[test]
fn a_sweep_removes_each_ended_pair_once_whichever_batches_hold_its_halves() {
    let ns = golden_ns();
    ns.run(|| {
        // More entries than one batch read returns (8192): the sweep walks
        // the table batch by batch, so most pairs have their halves in
        // different batches, and it deletes as it goes.
        let lb = Lb::with_capacity(&[BACKEND, FAR_BACKEND, UNRESOLVED_BACKEND], 20_000);
        let mut opened = 0u64;
        for i in 0..5000u16 {
            let t = Tcp { src: (CLIENT, 1024 + i), ..from_client(if i % 2 == 0 { 80 } else { 443 }) };
            if lb.run(&t.frame()).0 != XDP_DROP {
                opened += 1;
            }
        }
        assert!(opened > 4500, "{opened} connections opened");
        // Near a full port range a SYN may recycle a half-open pair (these
        // all are): that pair is gone.
        let opened = opened - lb.dp.counters().unwrap().get(Counter::XLB_CNT_NAT_RECYCLED);
        let now = xlb::dataplane::now_ns();
        let p = GcPolicy {
            now_ns: now + 301_000_000_000,
            idle_ns: 300_000_000_000,
            closed_ns: 10_000_000_000,
            tombstone_ns: 10_000_000_000,
            half_open_ns: 30_000_000_000,
            unanswered_created: None,
        };
        let stats = lb.dp.expire_flows(&p).unwrap();
        assert_eq!((stats.active, stats.closed, stats.orphaned, stats.unpaired), (0, 0, opened, 0));
        let per_backend: u64 = stats.per_backend.values().map(|b| b.orphaned).sum();
        assert_eq!(per_backend, opened, "each pair counted once, for its backend");
        assert!(stats.backend_addrs.is_empty());
        assert!(lb.dp.flows().unwrap().is_empty(), "both entries of every pair removed");
        let again = lb.dp.expire_flows(&p).unwrap();
        assert_eq!((again.active, again.closed, again.orphaned, again.unpaired), (0, 0, 0, 0));
    });
}

/// Path MTUs in the namespace of a `case_in(&narrow_paths(), ..)`, as locked
/// route metrics (bpf_fib_lookup checks a route's MTU only when it is
/// locked, or with ip_forward_use_pmtu): the way to the backend takes
/// 1000-byte packets, the way back to the client 1200.
const BACKEND_PATH_MTU: u16 = 1000;
const CLIENT_PATH_MTU: u16 = 1200;

fn narrow_paths() -> String {
    format!(
        "ip route add {BACKEND}/32 dev g0 mtu lock {BACKEND_PATH_MTU} && \
         ip route add {CLIENT}/32 dev g0 mtu lock {CLIENT_PATH_MTU} && \
         ip route add {FAR_BACKEND}/32 dev g1 mtu lock {BACKEND_PATH_MTU}"
    )
}

/// `t` with a payload that makes its IP packet `tot_len` bytes long.
fn sized(t: Tcp, tot_len: u16) -> Tcp {
    let headers = 20 + t.ip_options.len() + 20;
    Tcp { payload: (0..tot_len as usize - headers).map(|i| i as u8).collect(), ..t }
}

/// The one forward conntrack entry.
fn forward_entry(lb: &Lb) -> xlb::dataplane::FlowEntry {
    lb.dp.flows().unwrap().into_iter().find(|f| f.is_forward()).expect("forward entry")
}

/// Spot checks of an answer's ICMP fields by offset, independent of the
/// etherparse builder: type, code, next-hop MTU and the addresses.
fn assert_icmp_fields(out: &[u8], from: Ipv4Addr, to: Ipv4Addr, type_code: [u8; 2], mtu: u16) {
    assert_eq!(out.len(), 14 + 20 + 8 + 28, "an Ethernet frame of 70 bytes");
    assert_eq!(out[14 + 9], 1, "protocol ICMP");
    assert_eq!(out[14 + 6] & 0x40, 0, "the answer itself may be fragmented");
    assert_eq!(&out[14 + 12..14 + 16], &from.octets(), "from");
    assert_eq!(&out[14 + 16..14 + 20], &to.octets(), "to");
    assert_eq!(&out[34..36], &type_code, "type and code");
    assert_eq!(&out[34 + 4..34 + 6], &[0, 0], "unused");
    assert_eq!(&out[34 + 6..34 + 8], &mtu.to_be_bytes(), "next-hop MTU");
    assert!(checksums_valid(out), "IP and ICMP checksums");
}

#[test]
fn next_hops_come_from_the_cache_until_a_change_makes_them_stale() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_NEXTHOP_MISS, 1),
        ]);
        let data = syn.clone().ack();
        let natted = |dmac| {
            Tcp { smac: LB_MAC, dmac, src: (LISTEN, port), dst: (BACKEND, 8080), ttl: 63, ..data.clone() }
                .frame()
        };
        // Hit: the same answer, no FIB lookup.
        assert_eq!(lb.run(&data.frame()).1, natted(BACKEND_MAC));
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1), (Counter::XLB_CNT_NEXTHOP_MISS, 0)]);
        // The backend's MAC changes: until the control plane says so, the
        // cache still answers (which proves the answer came from it)...
        const MOVED_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
        common::sh(&format!("ip neigh replace {BACKEND} lladdr {} dev g0 nud permanent", mac(MOVED_MAC)));
        assert_eq!(lb.run(&data.frame()).1, natted(BACKEND_MAC));
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1), (Counter::XLB_CNT_NEXTHOP_MISS, 0)]);
        // ... and a new generation sends the next packet to the new MAC.
        lb.dp.invalidate_nexthops();
        assert_eq!(lb.run(&data.frame()).1, natted(MOVED_MAC));
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1), (Counter::XLB_CNT_NEXTHOP_MISS, 1)]);
        assert_eq!(lb.run(&data.frame()).1, natted(MOVED_MAC));
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1), (Counter::XLB_CNT_NEXTHOP_MISS, 0)]);
    });
}

#[test]
fn a_too_big_df_packet_is_answered_with_frag_needed_about_what_the_client_sent() {
    case_in(&narrow_paths(), ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);

        // Exactly the path MTU still goes through.
        let fits = sized(syn.clone().ack(), BACKEND_PATH_MTU);
        let (action, out) = lb.run(&fits.frame());
        assert_eq!(action, XDP_TX, "a packet of exactly the path MTU is forwarded");
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..fits
        };
        assert_eq!(out, want.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);

        // One byte more, DF set: answered to the client, from the listen
        // address, quoting the header the client sent (not the NATed one).
        let big = sized(syn.clone().ack(), BACKEND_PATH_MTU + 1);
        let (action, out) = lb.run(&big.frame());
        assert_eq!(action, XDP_TX);
        assert_eq!(out, frag_needed_answer(&big, BACKEND_PATH_MTU));
        assert_icmp_fields(&out, LISTEN, CLIENT, [3, 4], BACKEND_PATH_MTU);
        assert_eq!(&out[0..12], &[CLIENT_MAC, LB_MAC].concat()[..], "MACs swapped");
        assert_eq!(&out[42..42 + 28], &big.frame()[14..14 + 28], "quote: original header + 8 bytes");
        lb.counters_moved(&[(Counter::XLB_CNT_FRAG_NEEDED, 1)]);
        let fwd = forward_entry(lb);
        assert_eq!(fwd.flow.packets, 2, "the answered packet was not forwarded, nor accounted");

        // Without DF: XDP cannot fragment, so it is dropped, unrewritten.
        let no_df = Tcp { df: false, ..big.clone() };
        let (action, out) = lb.run(&no_df.frame());
        assert_eq!(action, XDP_DROP);
        assert_eq!(out, no_df.frame(), "nothing rewritten");
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_FIB, 1)]);
        assert_eq!(forward_entry(lb).flow.packets, 2);
    });
}

#[test]
fn a_backend_reply_too_big_for_the_client_path_is_answered_to_the_backend() {
    case_in(&narrow_paths(), ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        let reply = Tcp {
            smac: BACKEND_MAC,
            src: (BACKEND, 8080),
            dst: (LISTEN, port),
            ack: true,
            syn: false,
            seq: 5000,
            ..syn.clone()
        };

        // Bigger than the backend's path but within the client's: the MTU
        // checked is the one towards the rewritten destination.
        let fits = sized(reply.clone(), CLIENT_PATH_MTU);
        let (action, out) = lb.run(&fits.frame());
        assert_eq!(action, XDP_TX);
        let want = Tcp { smac: LB_MAC, dmac: CLIENT_MAC, src: (LISTEN, 80), dst: syn.src, ttl: 63, ..fits };
        assert_eq!(out, want.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);

        let big = sized(reply.clone(), CLIENT_PATH_MTU + 1);
        let (action, out) = lb.run(&big.frame());
        assert_eq!(action, XDP_TX);
        // From the SNAT address the backend talks to (the listen address in
        // this service), to the backend, quoting the backend's own header.
        assert_eq!(out, frag_needed_answer(&big, CLIENT_PATH_MTU));
        assert_icmp_fields(&out, LISTEN, BACKEND, [3, 4], CLIENT_PATH_MTU);
        assert_eq!(&out[0..6], &BACKEND_MAC);
        lb.counters_moved(&[(Counter::XLB_CNT_FRAG_NEEDED, 1)]);

        let (action, out) = lb.run(&Tcp { df: false, ..big.clone() }.frame());
        assert_eq!(action, XDP_DROP);
        assert_eq!(out, Tcp { df: false, ..big }.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_FIB, 1)]);
    });
}

#[test]
fn a_too_big_syn_opens_the_connection_but_is_answered_not_forwarded() {
    case_in(&narrow_paths(), ONE, |lb| {
        // A SYN carrying data (TCP Fast Open style) beyond the backend's MTU.
        let syn = sized(from_client(80), BACKEND_PATH_MTU + 1);
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        assert_eq!(out, frag_needed_answer(&syn, BACKEND_PATH_MTU));
        assert_icmp_fields(&out, LISTEN, CLIENT, [3, 4], BACKEND_PATH_MTU);
        // The conntrack pair is created before the route is known: it stays,
        // with nothing accounted and no flag seen (a half-open connection for
        // the GC), and holds its NAT port.
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FRAG_NEEDED, 1)]);
        assert_eq!(lb.dp.flows().unwrap().len(), 2, "forward and reverse entries");
        let fwd = forward_entry(lb);
        assert_eq!((fwd.flow.packets, fwd.flow.bytes, fwd.flow.tcp_flags), (0, 0, 0));
        let port = lb.nat_port(syn.src);

        // The client's smaller retransmission uses that entry.
        let again = sized(from_client(80), BACKEND_PATH_MTU);
        let (action, out) = lb.run(&again.frame());
        assert_eq!(action, XDP_TX);
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..again
        };
        assert_eq!(out, want.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        assert_eq!(forward_entry(lb).flow.packets, 1);
        assert_eq!(lb.dp.flows().unwrap().len(), 2);
    });
}

#[test]
fn too_big_frames_that_cannot_be_answered_are_dropped() {
    case_in(&narrow_paths(), &[VLAN_BACKEND], |lb| {
        // A tagged client (VLAN 100): the answer would need the tag; XLB
        // does not build tagged ICMP, so the frame is dropped unanswered.
        let syn = Tcp { src: (VLAN_CLIENT, 40000), vlan: Some(100), ..from_client(80) };
        let (action, _) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        let big = sized(syn.clone().ack(), BACKEND_PATH_MTU + 1);
        let (action, out) = lb.run(&big.frame());
        assert_eq!(action, XDP_DROP);
        assert_eq!(out, big.frame(), "nothing rewritten");
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_FIB, 1)]);

        // IP options: the quote would need more room, as with TTL expiry.
        let opts = Tcp { src: (CLIENT, 40001), ip_options: vec![1, 1, 1, 0], ..from_client(80) };
        let (action, _) = lb.run(&opts.frame());
        assert_eq!(action, XDP_REDIRECT, "to the far backend on g1");
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        let big = sized(opts.clone().ack(), BACKEND_PATH_MTU + 1);
        let (action, out) = lb.run(&big.frame());
        assert_eq!(action, XDP_DROP);
        assert_eq!(out, big.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_DROP_FIB, 1)]);
    });
}

/// Pins the calling thread to one CPU: the ICMP answer budget is per CPU.
fn pin_to_one_cpu() {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let cpu = (0..CpuSet::count()).find(|&c| allowed.is_set(c).unwrap_or(false)).expect("a CPU");
    let mut one = CpuSet::new();
    one.set(cpu).unwrap();
    sched_setaffinity(Pid::from_raw(0), &one).unwrap();
}

#[test]
fn icmp_answers_are_rate_limited_by_one_budget_per_cpu() {
    case_in(&narrow_paths(), ONE, |lb| {
        pin_to_one_cpu();
        let syn = from_client(80);
        lb.run(&syn.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        let big = sized(syn.clone().ack(), BACKEND_PATH_MTU + 1);
        let answer = frag_needed_answer(&big, BACKEND_PATH_MTU);
        let expiring = Tcp { ttl: 1, ..syn.clone().ack() };

        let start = std::time::Instant::now();
        let mut answered = vec![];
        let mut limited = 0u64;
        for i in 0..300 {
            let (action, out) = lb.run(&big.frame());
            match action {
                XDP_TX => {
                    assert_eq!(out, answer, "packet {i}");
                    answered.push(i);
                }
                XDP_DROP => {
                    assert_eq!(out, big.frame(), "packet {i}: dropped as it came");
                    limited += 1;
                }
                a => panic!("packet {i}: action {a}"),
            }
        }
        let frag_answered = answered.len() as u64;
        assert_eq!(frag_answered + limited, 300);
        // A fresh bucket holds the whole burst: the first 50 are answered.
        assert_eq!(answered[..50], (0..50).collect::<Vec<_>>()[..], "the burst");
        lb.counters_moved(&[
            (Counter::XLB_CNT_FRAG_NEEDED, frag_answered),
            (Counter::XLB_CNT_DROP_ICMP_LIMIT, limited),
        ]);

        // Time exceeded draws on the same budget.
        let mut ttl_answered = 0u64;
        for i in 0..300 {
            let (action, out) = lb.run(&expiring.frame());
            match action {
                XDP_TX => {
                    assert_eq!(out, time_exceeded(&expiring), "TTL packet {i}");
                    ttl_answered += 1;
                }
                XDP_DROP => assert_eq!(out, expiring.frame(), "TTL packet {i}"),
                a => panic!("TTL packet {i}: action {a}"),
            }
        }
        let ms = start.elapsed().as_millis() as u64;
        lb.counters_moved(&[
            (Counter::XLB_CNT_TTL_EXCEEDED, ttl_answered),
            (Counter::XLB_CNT_DROP_ICMP_LIMIT, 300 - ttl_answered),
        ]);
        // After the burst, 1000 answers a second refill it: one per
        // millisecond elapsed, plus slack for the coarse clock's ticks.
        let allowance = 50 + ms + 10;
        assert!(
            frag_answered + ttl_answered <= allowance,
            "{frag_answered} + {ttl_answered} answers in {ms} ms (at most {allowance})"
        );
        assert!(frag_answered >= 50);
        // Nothing was forwarded, nothing accounted to the connection.
        assert_eq!(forward_entry(lb).flow.packets, 1);
    });
}

#[test]
fn a_translated_frag_needed_never_advertises_less_than_552() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        let sent_to_client =
            Tcp { smac: LB_MAC, dmac: CLIENT_MAC, src: (LISTEN, 80), dst: syn.src, ack: true, ..syn.clone() };
        let backend_sent = Tcp { src: (BACKEND, 8080), dst: (LISTEN, port), ..sent_to_client.clone() };
        let router = Ipv4Addr::new(10, 0, 0, 254);
        for (mtu, out_mtu) in [(300, 552), (0, 552), (551, 552), (552, 552), (1400, 1400)] {
            let (action, out) =
                lb.run(&frag_needed_mtu(CLIENT_MAC, router, LISTEN, &sent_to_client, 64, mtu));
            assert_eq!(action, XDP_TX, "MTU {mtu}");
            let mut want = frag_needed_mtu(LB_MAC, LISTEN, BACKEND, &backend_sent, 63, out_mtu);
            want[0..6].copy_from_slice(&BACKEND_MAC);
            assert_eq!(out, want, "MTU {mtu} comes out as {out_mtu}");
            assert!(checksums_valid(&out), "MTU {mtu}: checksums");
            assert_eq!(&out[34 + 6..34 + 8], &out_mtu.to_be_bytes());
            let floored = u64::from(mtu < 552);
            lb.counters_moved(&[(Counter::XLB_CNT_FWD_ICMP, 1), (Counter::XLB_CNT_ICMP_MTU_FLOOR, floored)]);
        }

        // The other way round too: a router near the backend.
        let sent_to_backend = Tcp { src: (LISTEN, port), dst: (BACKEND, 8080), ack: true, ..syn.clone() };
        let router = Ipv4Addr::new(10, 0, 0, 253);
        let (action, out) = lb.run(&frag_needed_mtu(BACKEND_MAC, router, LISTEN, &sent_to_backend, 64, 300));
        assert_eq!(action, XDP_TX);
        let client_sent = Tcp { src: syn.src, dst: (LISTEN, 80), ..sent_to_backend.clone() };
        let mut want = frag_needed_mtu(LB_MAC, LISTEN, CLIENT, &client_sent, 63, 552);
        want[0..6].copy_from_slice(&CLIENT_MAC);
        assert_eq!(out, want);
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_ICMP, 1), (Counter::XLB_CNT_ICMP_MTU_FLOOR, 1)]);
    });
}

#[test]
fn an_interface_that_bounces_by_redirect_sends_the_same_frames() {
    case_in(&narrow_paths(), ONE, |lb| {
        // g0 carries no traffic of its own (IPv6 off, static neighbours):
        // attaching to it moves no counter.
        let g0 = lb.ifindex;
        assert_eq!(lb.dp.attach_as("g0", g0, XdpMode::Native).unwrap(), XdpMode::Native);
        assert!(
            lb.dp.set_transmit(g0, Transmit { bounce: Bounce::Redirect, redirect_target: false }).is_err(),
            "a redirect bounce needs the interface in the redirect map"
        );
        lb.dp.set_transmit(g0, Transmit { bounce: Bounce::Redirect, redirect_target: true }).unwrap();

        // Same-interface forwarding.
        let syn = from_client(80);
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_REDIRECT, "forward to a backend on the ingress interface");
        let port = lb.nat_port(syn.src);
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..syn.clone()
        };
        assert_eq!(out, want.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);

        // Time exceeded.
        let expiring = Tcp { ttl: 1, ..syn.clone().ack() };
        let (action, out) = lb.run(&expiring.frame());
        assert_eq!(action, XDP_REDIRECT, "time exceeded");
        assert_eq!(out, time_exceeded(&expiring));
        lb.counters_moved(&[(Counter::XLB_CNT_TTL_EXCEEDED, 1)]);

        // Fragmentation needed.
        let big = sized(syn.clone().ack(), BACKEND_PATH_MTU + 1);
        let (action, out) = lb.run(&big.frame());
        assert_eq!(action, XDP_REDIRECT, "fragmentation needed");
        assert_eq!(out, frag_needed_answer(&big, BACKEND_PATH_MTU));
        lb.counters_moved(&[(Counter::XLB_CNT_FRAG_NEEDED, 1)]);

        // A drain RST.
        lb.dp.set_drain(true);
        let fresh = Tcp { src: (CLIENT, 40001), ..from_client(80) };
        let (action, out) = lb.run(&fresh.frame());
        assert_eq!(action, XDP_REDIRECT, "drain RST");
        assert_eq!(out, expected_rst(&fresh));
        lb.counters_moved(&[(Counter::XLB_CNT_DRAIN_RST, 1)]);

        // Back to XDP_TX, and with no entry at all (detached) XDP_TX too.
        lb.dp.set_transmit(g0, Transmit { bounce: Bounce::XdpTx, redirect_target: true }).unwrap();
        let (action, out) = lb.run(&fresh.frame());
        assert_eq!((action, out), (XDP_TX, expected_rst(&fresh)));
        lb.dp.set_transmit(g0, Transmit { bounce: Bounce::Redirect, redirect_target: true }).unwrap();
        lb.dp.detach(g0).unwrap();
        let (action, out) = lb.run(&fresh.frame());
        assert_eq!((action, out), (XDP_TX, expected_rst(&fresh)), "detached: no ifaces entry");
        lb.counters_moved(&[(Counter::XLB_CNT_DRAIN_RST, 2)]);
    });
}

#[test]
fn on_a_generic_mode_interface_oversized_packets_are_forwarded_not_answered() {
    case_in(&narrow_paths(), ONE, |lb| {
        let g0 = lb.ifindex;
        assert_eq!(lb.dp.attach_as("g0", g0, XdpMode::Generic).unwrap(), XdpMode::Generic);
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);

        // Generic mode may see GRO aggregates that the stack splits again
        // on the way out: no MTU check, the packet is forwarded.
        let big = sized(syn.clone().ack(), BACKEND_PATH_MTU + 400);
        let (action, out) = lb.run(&big.frame());
        assert_eq!(action, XDP_TX);
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..big.clone()
        };
        assert_eq!(out, want.frame());
        checked_tcp(&out);
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);

        // The flag is the ingress interface's: the same frame arriving on g1
        // (native) is answered.
        let g1 = nix::net::if_::if_nametoindex("g1").unwrap();
        let (action, out) = lb.dp.test_run(&big.frame(), g1).unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(out, frag_needed_answer(&big, BACKEND_PATH_MTU));
        lb.counters_moved(&[(Counter::XLB_CNT_FRAG_NEEDED, 1)]);
    });
}

/// The folded IPv4 pseudo-header sum: the seed a stack leaves in the TCP
/// checksum field when the device is to finish it (CHECKSUM_PARTIAL).
fn seed(src: Ipv4Addr, dst: Ipv4Addr, tcp_len: u16) -> u16 {
    let words = [src.octets(), dst.octets()]
        .iter()
        .flat_map(|o| [u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]])])
        .chain([6u16, tcp_len])
        .map(u32::from)
        .sum::<u32>();
    let folded = (words & 0xffff) + (words >> 16);
    ((folded & 0xffff) + (folded >> 16)) as u16
}

/// TCP checksum bytes of an untagged frame without IP options.
const TCP_CSUM: std::ops::Range<usize> = 50..52;

#[test]
fn a_checksum_left_to_offload_stays_a_seed_for_the_new_addresses_in_generic_mode() {
    case(ONE, |lb| {
        let g0 = lb.ifindex;
        assert_eq!(lb.dp.attach_as("g0", g0, XdpMode::Generic).unwrap(), XdpMode::Generic);
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);

        // A data segment as a sender with checksum offload hands it over.
        let data = Tcp { payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(), ..syn.clone().ack() };
        let tcp_len = (20 + data.payload.len()) as u16;
        let mut frame = data.frame();
        frame[TCP_CSUM].copy_from_slice(&seed(data.src.0, data.dst.0, tcp_len).to_be_bytes());
        let (action, out) = lb.run(&frame);
        assert_eq!(action, XDP_TX);
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..data.clone()
        };
        let mut want = want.frame();
        want[TCP_CSUM].copy_from_slice(&seed(LISTEN, BACKEND, tcp_len).to_be_bytes());
        assert_eq!(out, want, "the seed of the rewritten addresses, ports untouched by it");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);

        // A full checksum is still updated as one.
        let (action, out) = lb.run(&data.frame());
        assert_eq!(action, XDP_TX);
        checked_tcp(&out);
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
    });
}

#[test]
fn a_full_checksum_that_equals_the_seed_by_chance_is_still_updated_as_full_in_generic_mode() {
    case(ONE, |lb| {
        let g0 = lb.ifindex;
        assert_eq!(lb.dp.attach_as("g0", g0, XdpMode::Generic).unwrap(), XdpMode::Generic);
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        // A segment whose correct full checksum happens to equal the seed
        // value (1 segment in 65536 does): found by trying the last two
        // payload bytes. Taken for a seed, its ports would be left out of the
        // update and the backend would drop it as corrupt.
        let tcp_len = 20 + 20;
        let want_csum = seed(CLIENT, LISTEN, tcp_len);
        let data = (0..=u16::MAX)
            .map(|w| {
                let mut payload = b"GET / HTTP/1.0\r\n\r\n".to_vec();
                payload.extend_from_slice(&w.to_be_bytes());
                Tcp { payload, ..syn.clone().ack() }
            })
            .find(|d| d.frame()[TCP_CSUM] == want_csum.to_be_bytes())
            .expect("a payload whose full checksum is the seed");
        let (action, out) = lb.run(&data.frame());
        assert_eq!(action, XDP_TX);
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..data.clone()
        };
        assert_eq!(out, want.frame(), "rewritten with a correct full checksum");
        checked_tcp(&out);
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
    });
}

#[test]
fn native_mode_treats_every_checksum_as_full() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        // No skb, no offload state: a field that happens to hold the seed
        // is a full checksum like any other and keeps its meaning.
        let data = Tcp { payload: b"x".repeat(10), ..syn.clone().ack() };
        let tcp_len = (20 + data.payload.len()) as u16;
        let mut frame = data.frame();
        let s = seed(data.src.0, data.dst.0, tcp_len);
        frame[TCP_CSUM].copy_from_slice(&s.to_be_bytes());
        let (_, out) = lb.run(&frame);
        let port = lb.nat_port(syn.src);
        assert_ne!(&out[TCP_CSUM], &seed(LISTEN, BACKEND, tcp_len).to_be_bytes()[..]);
        // Updated with the full-checksum rule: off from the correct full
        // checksum by exactly as much as the input was.
        let right_in = u16::from_be_bytes(data.frame()[TCP_CSUM].try_into().unwrap());
        let want = Tcp {
            smac: LB_MAC,
            dmac: BACKEND_MAC,
            src: (LISTEN, port),
            dst: (BACKEND, 8080),
            ttl: 63,
            ..data.clone()
        };
        let right_out = u16::from_be_bytes(want.frame()[TCP_CSUM].try_into().unwrap());
        let got = u16::from_be_bytes(out[TCP_CSUM].try_into().unwrap());
        let diff = |a: u16, b: u16| (u32::from(a) + u32::from(!b)) % 0xffff;
        assert_eq!(diff(s, right_in), diff(got, right_out), "the same error carried through");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
    });
}

#[test]
fn nat_ports_follow_the_client_tuple() {
    case(ONE, |lb| {
        // The client's own port, when it lies in the NAT range and is free.
        let inside = Tcp { src: (CLIENT, 20_123), ..from_client(80) };
        lb.run(&inside.frame());
        assert_eq!(lb.nat_port(inside.src), 20_123, "kept");
        // Taken already (the same port from another client to the same
        // backend): another one.
        let other = Tcp { src: (Ipv4Addr::new(10, 0, 0, 9), 20_123), ..from_client(80) };
        lb.run(&other.frame());
        assert_ne!(lb.nat_port(other.src), 20_123);

        // Outside the range: derived from the tuple, so the same tuple after
        // its connection closed gets the same port again (the backend then
        // sees the same 4-tuple and accepts it out of TIME_WAIT).
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        lb.run(&Tcp { rst: true, ..syn.clone().ack() }.frame());
        lb.run(&Tcp { seq: 5_000_000, ..syn.clone() }.frame());
        assert_eq!(lb.nat_port(syn.src), port, "the reopened connection keeps its NAT port");
    });
}

// NAT port choice, closed connections reopened in place, tombstones and
// their takeover under port pressure, the SNAT pool.

const SEC: u64 = 1_000_000_000;

/// A second client on g0, with its own neighbour entry where a case's setup
/// adds `other_client_neigh()`.
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const OTHER_CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];

fn other_client_neigh() -> String {
    format!("ip neigh add {OTHER_CLIENT} lladdr {} dev g0 nud permanent", mac(OTHER_CLIENT_MAC))
}

/// A NAT range of one port: a second connection to a backend must take a
/// closed pair's port over or be refused.
const ONE_PORT: (u16, u16) = (20000, 20000);

/// The sequence number after the FIN `close` has the client send (seq 1019,
/// 3 bytes of data): what a backend in TIME_WAIT expects next.
const CLIENT_FIN_END: u32 = 1019 + 3 + 1;

/// The MAC of a test host (SNAT pool clients: 02:00:00:00:03:nn).
fn mac_of(host: Ipv4Addr) -> [u8; 6] {
    match host {
        CLIENT => CLIENT_MAC,
        OTHER_CLIENT => OTHER_CLIENT_MAC,
        BACKEND => BACKEND_MAC,
        FAR_BACKEND => FAR_BACKEND_MAC,
        h if pool_clients().contains(&h) => [2, 0, 0, 0, 3, h.octets()[3]],
        h => panic!("no MAC for {h}"),
    }
}

/// The MAC XLB sends from towards `host`: g1's for the far backend.
fn lb_mac_to(host: Ipv4Addr) -> [u8; 6] {
    if host == FAR_BACKEND {
        LB1_MAC
    } else {
        LB_MAC
    }
}

/// A client's SYN to port 80 from `src`.
fn client_syn(src: (Ipv4Addr, u16)) -> Tcp {
    Tcp { smac: mac_of(src.0), src, ..from_client(80) }
}

/// An ACK from `backend` to the NAT port `port` of `snat`.
fn from_backend_to(backend: Ipv4Addr, snat: Ipv4Addr, port: u16) -> Tcp {
    Tcp {
        smac: mac_of(backend),
        src: (backend, 8080),
        dst: (snat, port),
        syn: false,
        ack: true,
        seq: 5000,
        // Acks from_client's SYN (seq 1000): a SYN-ACK built from this is
        // the one XLB takes to start tracking the backend's sequence.
        ack_no: 1001,
        ..from_client(80)
    }
}

/// An ACK from `backend` to the NAT port `port` of the listen address (the
/// one SNAT address of Lb's other constructors).
fn from_backend(backend: Ipv4Addr, port: u16) -> Tcp {
    from_backend_to(backend, LISTEN, port)
}

/// Client segment `t` as XLB sends it to `backend`, from `nat_src`.
fn natted_to_backend(t: &Tcp, nat_src: (Ipv4Addr, u16), backend: Ipv4Addr) -> Tcp {
    Tcp {
        smac: lb_mac_to(backend),
        dmac: mac_of(backend),
        src: nat_src,
        dst: (backend, 8080),
        ttl: t.ttl - 1,
        ..t.clone()
    }
}

/// Backend segment `t` as XLB sends it to `client` (who connected to port 80).
fn natted_to_client(t: &Tcp, client: (Ipv4Addr, u16)) -> Tcp {
    Tcp { smac: LB_MAC, dmac: mac_of(client.0), src: (LISTEN, 80), dst: client, ttl: t.ttl - 1, ..t.clone() }
}

/// Runs `t` and asserts XLB sends exactly `want` on (by XDP_TX, or by
/// redirect to g1).
fn expect_sent(lb: &Lb, t: &Tcp, want: &Tcp, what: &str) {
    let (action, out) = lb.run(&t.frame());
    let how = if want.smac == LB1_MAC { XDP_REDIRECT } else { XDP_TX };
    assert_eq!(action, how, "{what}: action");
    assert_eq!(out, want.frame(), "{what}: frame");
    checked_tcp(&out);
}

/// Runs `t` and asserts XLB drops it as it came.
fn expect_dropped(lb: &Lb, t: &Tcp, what: &str) {
    let (action, out) = lb.run(&t.frame());
    assert_eq!(action, XDP_DROP, "{what}: action");
    assert_eq!(out, t.frame(), "{what}: nothing rewritten");
}

/// The request `open` has the client send after the handshake.
fn request(syn: &Tcp) -> Tcp {
    Tcp { seq: syn.seq + 1, ack_no: BACKEND_ISN + 1, ..syn.clone().ack() }
}

/// The initial sequence number of every backend in these cases.
const BACKEND_ISN: u32 = 5000;

/// Opens a connection with `syn` to `backend` (SYN, the backend's SYN-ACK,
/// a request from the client), checking every frame XLB sends on; returns
/// its NAT port. Counters: new_flow 1, fwd_to_backend 2, fwd_to_client 1.
fn open(lb: &mut Lb, syn: &Tcp, backend: Ipv4Addr) -> u16 {
    let (action, out) = lb.run(&syn.frame());
    let port = lb.nat_port(syn.src);
    let want = natted_to_backend(syn, (LISTEN, port), backend);
    assert_eq!(action, if want.smac == LB1_MAC { XDP_REDIRECT } else { XDP_TX }, "SYN: action");
    assert_eq!(out, want.frame(), "SYN");
    let synack = Tcp { syn: true, seq: BACKEND_ISN, ack_no: syn.seq + 1, ..from_backend(backend, port) };
    expect_sent(lb, &synack, &natted_to_client(&synack, syn.src), "SYN-ACK");
    let req = request(syn);
    expect_sent(lb, &req, &natted_to_backend(&req, (LISTEN, port), backend), "request");
    port
}

/// `open`, then `close`, with their counters checked; returns the NAT port.
fn open_and_close(lb: &mut Lb, syn: &Tcp, backend: Ipv4Addr, backend_first: bool) -> u16 {
    let port = open(lb, syn, backend);
    close(lb, syn, backend, port, backend_first);
    lb.counters_moved(&[
        (Counter::XLB_CNT_NEW_FLOW, 1),
        (Counter::XLB_CNT_FWD_TO_BACKEND, 3),
        (Counter::XLB_CNT_FWD_TO_CLIENT, 2),
    ]);
    port
}

/// The client's FIN of `close`: 3 bytes of data, ending at CLIENT_FIN_END.
fn client_fin(syn: &Tcp) -> Tcp {
    Tcp { fin: true, seq: syn.seq + 19, payload: b"bye".to_vec(), ..syn.clone().ack() }
}

/// Closes a connection `open` opened: FIN both ways, the backend's first
/// when `backend_first`. Counters: fwd_to_backend 1, fwd_to_client 1.
fn close(lb: &mut Lb, syn: &Tcp, backend: Ipv4Addr, port: u16, backend_first: bool) {
    let fin = client_fin(syn);
    let back_fin = Tcp { fin: true, seq: 5001, ..from_backend(backend, port) };
    let client_closes =
        |lb: &Lb| expect_sent(lb, &fin, &natted_to_backend(&fin, (LISTEN, port), backend), "client FIN");
    let backend_closes =
        |lb: &Lb| expect_sent(lb, &back_fin, &natted_to_client(&back_fin, syn.src), "backend FIN");
    if backend_first {
        backend_closes(lb);
        client_closes(lb);
    } else {
        client_closes(lb);
        backend_closes(lb);
    }
}

/// The entry keyed (src, dst), if there is one.
fn entry(lb: &Lb, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Option<FlowEntry> {
    lb.dp.flows().unwrap().into_iter().find(|e| e.src() == src && e.dst() == dst)
}

/// The forward entry of `client`'s connection to port 80.
fn fwd_of(lb: &Lb, client: (Ipv4Addr, u16)) -> FlowEntry {
    entry(lb, client, (LISTEN, 80)).expect("forward entry")
}

/// The reverse entry holding NAT port `port` of the listen address at `backend`.
fn rev_of(lb: &Lb, backend: Ipv4Addr, port: u16) -> FlowEntry {
    entry(lb, (backend, 8080), (LISTEN, port)).expect("reverse entry")
}

/// The whole conntrack table, comparable.
fn table(lb: &Lb) -> Vec<String> {
    let mut t: Vec<String> = lb.dp.flows().unwrap().iter().map(|e| format!("{e:?}")).collect();
    t.sort();
    t
}

/// Sweeps of these cases: closed pairs go after 10 s idle, pairs the
/// backend closed first after 70 s; nothing open expires.
fn sweep_at(now: u64, after_secs: u64) -> GcPolicy {
    GcPolicy {
        now_ns: now + after_secs * SEC,
        idle_ns: 600 * SEC,
        closed_ns: 10 * SEC,
        tombstone_ns: 70 * SEC,
        half_open_ns: 300 * SEC,
        unanswered_created: None,
    }
}

/// The retired traffic so far, per backend (read by a sweep that removes
/// nothing).
fn retired(lb: &Lb) -> std::collections::HashMap<Ipv4Addr, Traffic> {
    let keep = GcPolicy {
        now_ns: 0,
        idle_ns: u64::MAX,
        closed_ns: u64::MAX,
        tombstone_ns: u64::MAX,
        half_open_ns: u64::MAX,
        unanswered_created: None,
    };
    lb.dp.expire_flows(&keep).unwrap().retired.into_iter().map(|(a, r)| (a, r.traffic)).collect()
}

/// The traffic `open` and `close` send on each way, as conntrack counts it
/// (frame lengths).
fn open_close_traffic(syn: &Tcp, backend: Ipv4Addr, port: u16) -> Traffic {
    let to_backend = [syn.frame(), request(syn).frame(), client_fin(syn).frame()];
    let to_client = [
        Tcp { syn: true, ..from_backend(backend, port) }.frame(),
        Tcp { fin: true, seq: 5001, ..from_backend(backend, port) }.frame(),
    ];
    Traffic {
        bytes_to_backend: to_backend.iter().map(|f| f.len() as u64).sum(),
        packets_to_backend: 3,
        bytes_to_client: to_client.iter().map(|f| f.len() as u64).sum(),
        packets_to_client: 2,
    }
}

#[test]
fn a_client_port_in_the_nat_range_is_kept_and_a_second_client_on_it_gets_the_derived_port() {
    case_in(&other_client_neigh(), ONE, |lb| {
        let first = client_syn((CLIENT, 20_123));
        expect_sent(lb, &first, &natted_to_backend(&first, (LISTEN, 20_123), BACKEND), "first SYN");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_NAT_PRESERVED, 1),
        ]);

        // Another address, the same port, the same backend: its own port is
        // taken (one collision), the one derived from its tuple is next.
        let second = client_syn((OTHER_CLIENT, 20_123));
        let (action, out) = lb.run(&second.frame());
        assert_eq!(action, XDP_TX);
        let port = lb.nat_port(second.src);
        assert_ne!(port, 20_123);
        assert!((NAT_PORTS.0..=NAT_PORTS.1).contains(&port), "NAT port {port} in range");
        assert_eq!(out, natted_to_backend(&second, (LISTEN, port), BACKEND).frame());
        let d = lb.dp.counters().unwrap().since(&lb.seen);
        if d.get(Counter::XLB_CNT_NAT_PROBED) == 0 {
            lb.counters_moved(&[
                (Counter::XLB_CNT_NEW_FLOW, 1),
                (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
                (Counter::XLB_CNT_NAT_COLLISION, 1),
                (Counter::XLB_CNT_NAT_DERIVED, 1),
            ]);
        } else {
            // 1 in 1000 (by the seed): the derived port is 20123 too, and
            // collides as well; a random one then.
            let collisions = d.get(Counter::XLB_CNT_NAT_COLLISION);
            assert!(collisions >= 2, "{collisions} collisions");
            lb.counters_moved(&[
                (Counter::XLB_CNT_NEW_FLOW, 1),
                (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
                (Counter::XLB_CNT_NAT_COLLISION, collisions),
                (Counter::XLB_CNT_NAT_PROBED, 1),
            ]);
        }

        // Each NAT port answers its own client.
        for (client, port) in [(first.src, 20_123), (second.src, port)] {
            let reply = Tcp { syn: true, ..from_backend(BACKEND, port) };
            expect_sent(lb, &reply, &natted_to_client(&reply, client), "SYN-ACK");
        }
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 2)]);
    });
}

#[test]
fn a_syn_after_the_backend_closed_first_reopens_the_pair_in_place() {
    case(ONE, |lb| {
        let syn = from_client(80);
        let port = open_and_close(lb, &syn, BACKEND, true);
        // The backend's FIN came first and the client's FIN ended at
        // CLIENT_FIN_END: marked on the entries.
        let (fwd, rev) = (fwd_of(lb, syn.src), rev_of(lb, BACKEND, port));
        assert_eq!(
            fwd.flow.tcp_flags,
            SYN | ACK | FIN | CT_CLOSED | CT_SEQ | CT_ESTABLISHED,
            "forward flags {:#x}",
            fwd.flow.tcp_flags
        );
        assert_eq!(
            rev.flow.tcp_flags,
            SYN | ACK | FIN | CT_FIN_FIRST | CT_FIN_SEQ | CT_CLOSED | CT_SEQ | CT_ESTABLISHED | CT_ANSWERED,
            "reverse flags {:#x}",
            rev.flow.tcp_flags
        );
        assert_eq!(rev.flow.fin_seq, CLIENT_FIN_END);

        // The client reuses its port: same backend, same NAT port, so the
        // backend sees its TIME_WAIT 4-tuple again, with a newer ISN.
        let again = Tcp { seq: 5_000_000, ..syn.clone() };
        expect_sent(lb, &again, &natted_to_backend(&again, (LISTEN, port), BACKEND), "new SYN");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_CT_REOPENED, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
        ]);
        assert_eq!(lb.dp.flows().unwrap().len(), 2, "rewritten in place, nothing added");
        let (fwd, rev) = (fwd_of(lb, syn.src), rev_of(lb, BACKEND, port));
        assert_eq!(fwd.nat(), ((LISTEN, port), (BACKEND, 8080)));
        assert_eq!(
            (fwd.flow.tcp_flags, fwd.flow.packets, fwd.flow.fin_seq),
            (SYN | CT_SEQ, 1, 0),
            "fresh forward entry"
        );
        assert_eq!(rev.nat(), ((LISTEN, 80), syn.src));
        assert_eq!(
            (rev.flow.tcp_flags, rev.flow.packets, rev.flow.fin_seq),
            (0, 0, 0),
            "fresh reverse entry"
        );

        // And it works both ways.
        let synack = Tcp { syn: true, seq: 9000, ..from_backend(BACKEND, port) };
        expect_sent(lb, &synack, &natted_to_client(&synack, syn.src), "SYN-ACK");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
    });
}

#[test]
fn a_pair_the_backend_closed_first_holds_its_port_for_tombstone_ns_others_go_after_closed_ns() {
    case(ONE, |lb| {
        let held = client_syn((CLIENT, 40000));
        let client_closed = client_syn((CLIENT, 40001));
        let backend_reset = client_syn((CLIENT, 40002));
        let client_reset = client_syn((CLIENT, 40003));
        let mut ports = vec![];
        for syn in [&held, &client_closed, &backend_reset, &client_reset] {
            ports.push(open(lb, syn, BACKEND));
        }
        close(lb, &held, BACKEND, ports[0], true);
        close(lb, &client_closed, BACKEND, ports[1], false);
        let rst = Tcp { rst: true, ack: false, seq: 5001, ..from_backend(BACKEND, ports[2]) };
        expect_sent(lb, &rst, &natted_to_client(&rst, backend_reset.src), "backend RST");
        let rst = Tcp { syn: false, rst: true, seq: 1019, ..client_reset.clone() };
        expect_sent(lb, &rst, &natted_to_backend(&rst, (LISTEN, ports[3]), BACKEND), "client RST");
        lb.counters_moved_opening(&[
            (Counter::XLB_CNT_NEW_FLOW, 4),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 8 + 2 + 1),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 4 + 2 + 1),
        ]);
        let rev = |i: usize| rev_of(lb, BACKEND, ports[i]).flow.tcp_flags;
        assert_eq!(
            rev(0) & (CT_FIN_FIRST | CT_CLOSED | RST),
            CT_FIN_FIRST | CT_CLOSED,
            "backend closed first"
        );
        assert_eq!(rev(1) & (CT_FIN_FIRST | CT_CLOSED | RST), CT_CLOSED, "client closed first");
        assert_eq!(rev(2) & (CT_CLOSED | RST), CT_CLOSED | RST, "reset by the backend");
        assert_eq!(rev(3) & (CT_CLOSED | RST), CT_CLOSED, "reset by the client");

        // Past closed_ns: all but the backend-closed-first pair go; that one
        // holds its port, and is not an open connection.
        let now = xlb::dataplane::now_ns();
        let stats = lb.dp.expire_flows(&sweep_at(now, 11)).unwrap();
        assert_eq!((stats.closed, stats.orphaned, stats.unpaired, stats.active), (3, 0, 0, 0));
        let b = stats.per_backend[&BACKEND];
        assert_eq!((b.closed_fin, b.closed_rst, b.orphaned, b.active), (1, 2, 0, 0));
        assert!(stats.backend_addrs.is_empty(), "no open connection: {:?}", stats.backend_addrs);
        let left = lb.dp.flows().unwrap();
        assert_eq!(left.len(), 2, "the held pair only: {left:?}");
        assert!(
            entry(lb, held.src, (LISTEN, 80)).is_some()
                && entry(lb, (BACKEND, 8080), (LISTEN, ports[0])).is_some()
        );

        // Still there just before tombstone_ns, gone after.
        let stats = lb.dp.expire_flows(&sweep_at(now, 69)).unwrap();
        assert_eq!((stats.closed, stats.orphaned, stats.unpaired, stats.active), (0, 0, 0, 0));
        assert_eq!(lb.dp.flows().unwrap().len(), 2);
        let stats = lb.dp.expire_flows(&sweep_at(now, 71)).unwrap();
        assert_eq!((stats.closed, stats.orphaned, stats.unpaired, stats.active), (1, 0, 0, 0));
        assert_eq!(stats.per_backend[&BACKEND].closed_fin, 1);
        assert_eq!(stats.per_backend[&BACKEND].removed, open_close_traffic(&held, BACKEND, ports[0]));
        assert!(lb.dp.flows().unwrap().is_empty());
        lb.counters_moved(&[]);
    });
}

/// A case on a program with one backend and a NAT range of one port, the
/// other client's neighbour known.
fn one_port_case(f: impl FnOnce(&mut Lb) + Send + 'static) {
    case_on(&other_client_neigh(), || Lb::with_nat_ports(ONE, ONE_PORT), f);
}

/// With one NAT port: the client's connection, opened and closed (the
/// backend first when `backend_first`), holding port 20000.
fn one_port_closed(lb: &mut Lb, backend_first: bool) -> Tcp {
    let syn = from_client(80);
    let port = open(lb, &syn, BACKEND);
    assert_eq!(port, ONE_PORT.0);
    close(lb, &syn, BACKEND, port, backend_first);
    lb.counters_moved(&[
        (Counter::XLB_CNT_NEW_FLOW, 1),
        (Counter::XLB_CNT_FWD_TO_BACKEND, 3),
        (Counter::XLB_CNT_FWD_TO_CLIENT, 2),
    ]);
    syn
}

/// Every one of XLB_NAT_PORT_TRIES choices of a one-port range collides.
const ONE_PORT_COLLISIONS: u64 = 32;

#[test]
fn a_syn_not_past_the_old_fin_cannot_take_over_a_port_the_backend_holds_in_time_wait() {
    one_port_case(|lb| {
        one_port_closed(lb, true);
        let before = table(lb);
        // Another client (the same port number, another address): the
        // backend's TIME_WAIT would take its SYN for an old duplicate.
        for (what, seq) in [
            ("at the old FIN's end", CLIENT_FIN_END),
            ("before it", CLIENT_FIN_END - 1),
            ("half the sequence space away", CLIENT_FIN_END.wrapping_add(1 << 31)),
        ] {
            let syn = Tcp { seq, ..client_syn((OTHER_CLIENT, 40000)) };
            expect_dropped(lb, &syn, what);
            lb.counters_moved(&[
                (Counter::XLB_CNT_DROP_NAT_EXHAUSTED, 1),
                (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
            ]);
            assert_eq!(table(lb), before, "{what}: the closed pair untouched");
        }
        assert!(retired(lb).is_empty(), "nothing retired");
    });
}

#[test]
fn a_syn_past_the_old_fin_takes_over_the_port_and_the_stale_forward_entry_is_swept() {
    one_port_case(|lb| {
        let old = one_port_closed(lb, true);
        let port = ONE_PORT.0;
        let syn = Tcp { seq: CLIENT_FIN_END + 1, ..client_syn((OTHER_CLIENT, 40000)) };
        expect_sent(
            lb,
            &syn,
            &natted_to_backend(&syn, (LISTEN, port), BACKEND),
            "SYN on the taken-over port",
        );
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
            (Counter::XLB_CNT_NAT_RECLAIMED, 1),
        ]);
        // The port now answers the new client.
        let rev = rev_of(lb, BACKEND, port);
        assert_eq!(rev.nat(), ((LISTEN, 80), syn.src));
        assert_eq!(rev.flow.tcp_flags, 0, "a fresh reverse entry");
        let synack = Tcp { syn: true, seq: 9000, ..from_backend(BACKEND, port) };
        expect_sent(lb, &synack, &natted_to_client(&synack, syn.src), "SYN-ACK to the new client");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
        // The old connection ended there for accounting.
        let r = retired(lb);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[&BACKEND], open_close_traffic(&old, BACKEND, port));

        // The old client's forward entry no longer pairs: it stays for
        // closed_ns, then the sweep removes it; the new pair stays.
        assert_eq!(lb.dp.flows().unwrap().len(), 3);
        let now = xlb::dataplane::now_ns();
        let stats = lb.dp.expire_flows(&sweep_at(now, 9)).unwrap();
        assert_eq!((stats.closed, stats.orphaned, stats.unpaired, stats.active), (0, 0, 0, 1));
        assert!(entry(lb, old.src, (LISTEN, 80)).is_some(), "held for closed_ns");
        let stats = lb.dp.expire_flows(&sweep_at(now, 11)).unwrap();
        assert_eq!((stats.closed, stats.orphaned, stats.unpaired, stats.active), (0, 0, 1, 1));
        assert!(entry(lb, old.src, (LISTEN, 80)).is_none(), "the stale forward entry is gone");
        assert_eq!(fwd_of(lb, syn.src).nat(), ((LISTEN, port), (BACKEND, 8080)));
        assert_eq!(rev_of(lb, BACKEND, port).nat(), ((LISTEN, 80), syn.src));
        assert_eq!(lb.dp.flows().unwrap().len(), 2);
        assert_eq!(retired(lb)[&BACKEND], open_close_traffic(&old, BACKEND, port), "retired once");
    });
}

#[test]
fn a_port_with_no_time_wait_behind_it_is_taken_over_whatever_the_sequence() {
    one_port_case(|lb| {
        // The client closed first: the backend holds no TIME_WAIT.
        let first = one_port_closed(lb, false);
        let port = ONE_PORT.0;
        assert_eq!(rev_of(lb, BACKEND, port).flow.tcp_flags & CT_FIN_FIRST, 0);
        let second = Tcp { seq: 7, ..client_syn((OTHER_CLIENT, 40000)) };
        expect_sent(lb, &second, &natted_to_backend(&second, (LISTEN, port), BACKEND), "second client");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
            (Counter::XLB_CNT_NAT_RECLAIMED, 1),
        ]);
        assert_eq!(retired(lb)[&BACKEND], open_close_traffic(&first, BACKEND, port));

        // The backend closes first, then resets: a reset ends TIME_WAIT.
        let synack = Tcp { syn: true, ack_no: second.seq + 1, ..from_backend(BACKEND, port) };
        expect_sent(lb, &synack, &natted_to_client(&synack, second.src), "SYN-ACK");
        let back_fin = Tcp { fin: true, seq: 5001, ..from_backend(BACKEND, port) };
        expect_sent(lb, &back_fin, &natted_to_client(&back_fin, second.src), "backend FIN");
        let back_rst = Tcp { rst: true, ack: false, seq: 5002, ..from_backend(BACKEND, port) };
        expect_sent(lb, &back_rst, &natted_to_client(&back_rst, second.src), "backend RST");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 3)]);
        let rev = rev_of(lb, BACKEND, port).flow.tcp_flags;
        assert_eq!(rev & (CT_FIN_FIRST | CT_CLOSED | RST), CT_FIN_FIRST | CT_CLOSED | RST, "{rev:#x}");
        // A third client, its sequence number anywhere.
        let third = Tcp { seq: 0, ..client_syn((CLIENT, 40001)) };
        expect_sent(lb, &third, &natted_to_backend(&third, (LISTEN, port), BACKEND), "third client");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
            (Counter::XLB_CNT_NAT_RECLAIMED, 1),
        ]);
        let reply = from_backend(BACKEND, port);
        expect_sent(lb, &reply, &natted_to_client(&reply, third.src), "reply to the third client");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
    });
}

#[test]
fn an_open_connections_port_is_never_taken_over() {
    one_port_case(|lb| {
        let syn = from_client(80);
        let port = open(lb, &syn, BACKEND);
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 2),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
        ]);
        let other = Tcp { seq: CLIENT_FIN_END + 1_000_000, ..client_syn((OTHER_CLIENT, 40000)) };
        let before = table(lb);
        expect_dropped(lb, &other, "established");
        lb.counters_moved(&[
            (Counter::XLB_CNT_DROP_NAT_EXHAUSTED, 1),
            (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
        ]);
        assert_eq!(table(lb), before);

        // Half-closed by the client, its FIN's end recorded: the backend may
        // still be sending, the port is not free.
        let fin = client_fin(&syn);
        expect_sent(lb, &fin, &natted_to_backend(&fin, (LISTEN, port), BACKEND), "client FIN");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        let rev = rev_of(lb, BACKEND, port).flow;
        assert_eq!((rev.tcp_flags & (CT_FIN_SEQ | CT_CLOSED), rev.fin_seq), (CT_FIN_SEQ, CLIENT_FIN_END));
        let before = table(lb);
        expect_dropped(lb, &other, "half-closed");
        lb.counters_moved(&[
            (Counter::XLB_CNT_DROP_NAT_EXHAUSTED, 1),
            (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
        ]);
        assert_eq!(table(lb), before);
        // Its own client still gets through on it.
        let data = Tcp { seq: 1001, ..syn.clone().ack() };
        expect_sent(lb, &data, &natted_to_backend(&data, (LISTEN, port), BACKEND), "data");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        assert!(retired(lb).is_empty());
    });
}

/// A SNAT pool of four addresses, none of them the listen address (nor
/// assigned in the namespace: backends only send replies to them).
const POOL: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 0, 0, 21),
    Ipv4Addr::new(10, 0, 0, 22),
    Ipv4Addr::new(10, 0, 0, 23),
    Ipv4Addr::new(10, 0, 0, 24),
];

/// Sixteen clients on g0, 10.0.0.100-115.
fn pool_clients() -> Vec<Ipv4Addr> {
    (100..116).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect()
}

fn pool_clients_neigh() -> String {
    pool_clients()
        .iter()
        .map(|c| format!("ip neigh add {c} lladdr {} dev g0 nud permanent", mac(mac_of(*c))))
        .collect::<Vec<_>>()
        .join(" && ")
}

#[test]
fn snat_pool_gives_each_client_one_address_and_replies_to_any_of_it_come_back() {
    case_on(
        &pool_clients_neigh(),
        || Lb::with_snat(ONE, &POOL),
        |lb| {
            let mut used = std::collections::HashMap::new();
            let mut conns = vec![];
            for client in pool_clients() {
                for sport in [40000, 40001, 40002] {
                    let syn = client_syn((client, sport));
                    let (action, out) = lb.run(&syn.frame());
                    assert_eq!(action, XDP_TX, "{client}:{sport}");
                    let fwd = fwd_of(lb, syn.src);
                    let (snat, port) = fwd.nat().0;
                    assert!(POOL.contains(&snat), "{snat} from the pool");
                    assert_eq!(
                        out,
                        natted_to_backend(&syn, (snat, port), BACKEND).frame(),
                        "{client}:{sport}"
                    );
                    assert_eq!(*used.entry(client).or_insert(snat), snat, "{client}: one SNAT address");
                    conns.push((syn.src, snat, port));
                }
            }
            lb.counters_moved_opening(&[
                (Counter::XLB_CNT_NEW_FLOW, 48),
                (Counter::XLB_CNT_FWD_TO_BACKEND, 48),
            ]);
            let spread: std::collections::HashSet<_> = used.values().collect();
            assert!(spread.len() >= 2, "16 clients over {} SNAT address(es)", spread.len());

            // A reply to each (address, port) goes back to its own client.
            for &(client, snat, port) in &conns {
                let reply = Tcp { syn: true, ..from_backend_to(BACKEND, snat, port) };
                expect_sent(lb, &reply, &natted_to_client(&reply, client), "reply");
            }
            lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 48)]);

            // A pool address and NAT port without an entry, and the listen
            // address (not in this pool): not ours.
            let taken: Vec<(Ipv4Addr, u16)> = conns.iter().map(|&(_, s, p)| (s, p)).collect();
            let free = (NAT_PORTS.0..).find(|p| !taken.contains(&(POOL[0], *p))).unwrap();
            for stranger in [from_backend_to(BACKEND, POOL[0], free), from_backend(BACKEND, conns[0].2)] {
                let (action, out) = lb.run(&stranger.frame());
                assert_eq!(action, XDP_PASS);
                assert_eq!(out, stranger.frame());
                lb.counters_moved(&[(Counter::XLB_CNT_PASS_NOT_OURS, 1)]);
            }
        },
    );
}

#[test]
fn a_closed_connection_whose_backend_left_reopens_on_the_new_one_and_leaves_a_tombstone() {
    case(ONE, |lb| {
        let syn = from_client(80);
        let old_port = open_and_close(lb, &syn, BACKEND, true);
        let tombstone = rev_of(lb, BACKEND, old_port);

        // The backend leaves; the far backend is all there is.
        lb.dp.set_backends(&maglev_table(&[FAR_BACKEND])).unwrap();
        let again = Tcp { seq: 5_000_000, ..syn.clone() };
        let (action, out) = lb.run(&again.frame());
        assert_eq!(action, XDP_REDIRECT);
        let port = lb.nat_port(syn.src);
        assert_eq!(out, natted_to_backend(&again, (LISTEN, port), FAR_BACKEND).frame());
        // A new port claim at the new backend, not a reopening.
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        assert_eq!(retired(lb)[&BACKEND], open_close_traffic(&syn, BACKEND, old_port));
        let synack = Tcp { syn: true, seq: 9000, ..from_backend(FAR_BACKEND, port) };
        expect_sent(lb, &synack, &natted_to_client(&synack, syn.src), "SYN-ACK from the far backend");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
        // The old backend's reverse entry stays, as it was: the tombstone.
        assert_eq!(lb.dp.flows().unwrap().len(), 3);
        assert_eq!(format!("{:?}", rev_of(lb, BACKEND, old_port)), format!("{tombstone:?}"));
        assert_eq!(fwd_of(lb, syn.src).nat(), ((LISTEN, port), (FAR_BACKEND, 8080)));

        // The backend closed first: the tombstone stays for tombstone_ns.
        let now = xlb::dataplane::now_ns();
        let stats = lb.dp.expire_flows(&sweep_at(now, 11)).unwrap();
        assert_eq!((stats.closed, stats.orphaned, stats.unpaired, stats.active), (0, 0, 0, 1));
        assert_eq!(lb.dp.flows().unwrap().len(), 3);
        let stats = lb.dp.expire_flows(&sweep_at(now, 71)).unwrap();
        assert_eq!((stats.closed, stats.orphaned, stats.unpaired, stats.active), (0, 0, 1, 1));
        assert!(entry(lb, (BACKEND, 8080), (LISTEN, old_port)).is_none(), "the tombstone is gone");
        assert_eq!(lb.dp.flows().unwrap().len(), 2, "the new connection stays");
        assert_eq!(rev_of(lb, FAR_BACKEND, port).nat(), ((LISTEN, 80), syn.src));
        assert_eq!(stats.backend_addrs.iter().copied().collect::<Vec<_>>(), vec![FAR_BACKEND]);
    });
}

/// A client that gave up on a connection its backend never answered, and
/// whose kernel hands the port to a new socket, opens a new connection: its
/// SYN (another ISN) is balanced afresh, so a backend that left meanwhile
/// (a passive health verdict) gets nothing. The old SYN's retransmission
/// still goes where it went.
#[test]
fn a_new_syn_on_a_half_open_tuple_is_balanced_afresh() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let old_port = lb.nat_port(syn.src);
        lb.dp.set_backends(&maglev_table(&[FAR_BACKEND])).unwrap();
        let (action, out) = lb.run(&syn.frame());
        assert_eq!(action, XDP_TX, "a retransmission keeps its backend");
        assert_eq!(out, natted_to_backend(&syn, (LISTEN, old_port), BACKEND).frame());
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 2)]);
        let again = Tcp { seq: syn.seq + 77_777, ..syn.clone() };
        let (action, out) = lb.run(&again.frame());
        assert_eq!(action, XDP_REDIRECT);
        let port = lb.nat_port(syn.src);
        assert_eq!(out, natted_to_backend(&again, (LISTEN, port), FAR_BACKEND).frame());
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
        assert_eq!(fwd_of(lb, syn.src).nat(), ((LISTEN, port), (FAR_BACKEND, 8080)));
    });
}

/// While the backend a half-open connection went to is still in the
/// table, a SYN with another ISN on its tuple (forged, or a client that
/// sent two) goes on as before: the connection in progress completes.
#[test]
fn another_syn_on_a_half_open_tuple_does_not_undo_it_while_its_backend_stays() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        let other = Tcp { seq: syn.seq + 99_999, ..syn.clone() };
        let (action, out) = lb.run(&other.frame());
        assert_eq!(action, XDP_TX);
        assert_eq!(out, natted_to_backend(&other, (LISTEN, port), BACKEND).frame(), "same pair");
        let synack = Tcp { syn: true, seq: BACKEND_ISN, ack_no: syn.seq + 1, ..from_backend(BACKEND, port) };
        expect_sent(lb, &synack, &natted_to_client(&synack, syn.src), "the SYN-ACK of the first");
        lb.run(&request(&syn).frame());
        assert!(flags_of(lb).iter().all(|(_, f)| f & CT_ESTABLISHED != 0), "{:?}", flags_of(lb));
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 3),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
        ]);
    });
}

/// A client asking for ECN (ECE and CWR on its SYN) is balanced afresh too
/// when it comes back with another ISN after its backend left.
#[test]
fn an_ecn_syn_on_a_half_open_tuple_is_balanced_afresh() {
    case(ONE, |lb| {
        let syn = Tcp { ecn: true, ..from_client(80) };
        lb.run(&syn.frame());
        lb.dp.set_backends(&maglev_table(&[FAR_BACKEND])).unwrap();
        let again = Tcp { seq: syn.seq + 77_777, ..syn.clone() };
        let (action, _) = lb.run(&again.frame());
        assert_eq!(action, XDP_REDIRECT, "to the far backend");
        assert_eq!(fwd_of(lb, syn.src).nat().1, (FAR_BACKEND, 8080));
        lb.seen = lb.dp.counters().unwrap();
    });
}

/// The old backend's late SYN-ACK after the tuple moved reaches the client,
/// whose RST answers it: that RST is not the new connection's end.
#[test]
fn a_clients_rst_to_the_old_backends_late_syn_ack_does_not_end_the_moved_connection() {
    case(ONE, |lb| {
        let syn = from_client(80);
        lb.run(&syn.frame());
        let old_port = lb.nat_port(syn.src);
        lb.dp.set_backends(&maglev_table(&[FAR_BACKEND])).unwrap();
        let again = Tcp { seq: syn.seq.wrapping_add(0x4000_0000), ..syn.clone() };
        lb.run(&again.frame());
        let late =
            Tcp { syn: true, seq: BACKEND_ISN, ack_no: syn.seq + 1, ..from_backend(BACKEND, old_port) };
        lb.run(&late.frame());
        let rst = Tcp { syn: false, rst: true, ack: false, seq: syn.seq + 1, ..syn.clone() };
        lb.run(&rst.frame());
        let fwd = fwd_of(lb, syn.src);
        assert_eq!(fwd.flow.tcp_flags & (RST | CT_CLOSED), 0, "{:#x}", fwd.flow.tcp_flags);
        // The new backend answers; the handshake completes.
        let port = lb.nat_port(syn.src);
        let synack = Tcp { syn: true, seq: 9000, ack_no: again.seq + 1, ..from_backend(FAR_BACKEND, port) };
        lb.run_on_far(&synack.frame());
        lb.run(&Tcp { seq: again.seq + 1, ack_no: 9001, ..syn.clone().ack() }.frame());
        assert!(fwd_of(lb, syn.src).flow.tcp_flags & CT_ESTABLISHED != 0);
        lb.seen = lb.dp.counters().unwrap();
    });
}

/// A SYN carrying data (a Fast Open request) may be answered with or
/// without taking the data: either answer counts, and the connection goes
/// on to be established.
#[test]
fn a_syn_with_data_is_answered_whether_the_backend_takes_the_data_or_not() {
    case(ONE, |lb| {
        for (sport, took) in [(40_100u16, 0u32), (40_101, 10)] {
            let syn = Tcp { src: (CLIENT, sport), payload: vec![7; 10], ..from_client(80) };
            lb.run(&syn.frame());
            let port = lb.nat_port(syn.src);
            let synack = Tcp {
                syn: true,
                seq: BACKEND_ISN,
                ack_no: syn.seq + 1 + took,
                ..from_backend(BACKEND, port)
            };
            expect_sent(lb, &synack, &natted_to_client(&synack, syn.src), "SYN-ACK");
            let ack =
                Tcp { seq: syn.seq + 11, ack_no: BACKEND_ISN + 1, payload: vec![], ..syn.clone().ack() };
            lb.run(&ack.frame());
            assert!(fwd_of(lb, syn.src).flow.tcp_flags & CT_ESTABLISHED != 0, "took {took}");
        }
        assert_eq!(lb.dp.handshakes().unwrap()[&BACKEND].answered(), 2);
        // A refusal of a SYN with data acks its ISN + 1.
        let syn = Tcp { src: (CLIENT, 40_102), payload: vec![7; 10], ..from_client(80) };
        lb.run(&syn.frame());
        let port = lb.nat_port(syn.src);
        let refuse = Tcp { rst: true, seq: 0, ack_no: syn.seq + 1, ..from_backend(BACKEND, port) };
        expect_sent(lb, &refuse, &natted_to_client(&refuse, syn.src), "refusal");
        assert_eq!(lb.dp.handshakes().unwrap()[&BACKEND].refused, 1);
        lb.seen = lb.dp.counters().unwrap();
    });
}

#[test]
fn a_syn_refused_for_want_of_a_port_retires_nothing() {
    one_port_case(|lb| {
        let first = one_port_closed(lb, true);
        let port = ONE_PORT.0;
        // The backend leaves, and another client holds the far backend's
        // only port.
        lb.dp.set_backends(&maglev_table(&[FAR_BACKEND])).unwrap();
        let other = client_syn((OTHER_CLIENT, 40000));
        open(lb, &other, FAR_BACKEND);
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 2),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 1),
        ]);
        let before = table(lb);
        // The first client comes back: no port for it at the far backend.
        // Refused, and again when it retransmits; its closed pair stays as
        // it was, for the sweep to account.
        for what in ["SYN", "retransmitted SYN"] {
            let again = Tcp { seq: 5_000_000, ..first.clone() };
            expect_dropped(lb, &again, what);
            lb.counters_moved(&[
                (Counter::XLB_CNT_DROP_NAT_EXHAUSTED, 1),
                (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
            ]);
            assert_eq!(table(lb), before, "{what}: nothing changed");
            let r = retired(lb);
            assert!(r.is_empty(), "{what}: retired {r:?}");
        }
        let now = xlb::dataplane::now_ns();
        let stats = lb.dp.expire_flows(&sweep_at(now, 71)).unwrap();
        assert_eq!((stats.closed, stats.active), (1, 1));
        assert_eq!(stats.per_backend[&BACKEND].removed, open_close_traffic(&first, BACKEND, port));
    });
}

#[test]
fn a_client_whose_port_was_taken_over_is_not_retired_again_when_it_comes_back() {
    one_port_case(|lb| {
        let first = one_port_closed(lb, true);
        let port = ONE_PORT.0;
        let second = Tcp { seq: CLIENT_FIN_END + 1, ..client_syn((OTHER_CLIENT, 40000)) };
        assert_eq!(open(lb, &second, BACKEND), port);
        close(lb, &second, BACKEND, port, false);
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 3),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 2),
            (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
            (Counter::XLB_CNT_NAT_RECLAIMED, 1),
        ]);
        assert_eq!(retired(lb)[&BACKEND], open_close_traffic(&first, BACKEND, port));

        // The first client comes back on its tuple (its stale forward entry
        // not swept yet) and takes the port over from the second, which
        // closed first.
        let again = Tcp { seq: 5_000_000, ..first.clone() };
        expect_sent(lb, &again, &natted_to_backend(&again, (LISTEN, port), BACKEND), "first client again");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
            (Counter::XLB_CNT_NAT_RECLAIMED, 1),
        ]);
        // Each connection retired once.
        let mut want = open_close_traffic(&first, BACKEND, port);
        want.add(&open_close_traffic(&second, BACKEND, port));
        assert_eq!(retired(lb)[&BACKEND], want);
    });
}

#[test]
fn taking_over_a_tombstone_left_by_a_move_retires_no_live_connection() {
    one_port_case(|lb| {
        // Closed by the client first: its port may be taken at once.
        let first = one_port_closed(lb, false);
        let port = ONE_PORT.0;
        // The backend leaves: the client's next connection goes to the far
        // backend, and the old reverse entry stays as port 20000's tombstone.
        lb.dp.set_backends(&maglev_table(&[FAR_BACKEND])).unwrap();
        let again = Tcp { seq: 5_000_000, ..first.clone() };
        expect_sent(lb, &again, &natted_to_backend(&again, (LISTEN, port), FAR_BACKEND), "moved");
        let data = Tcp { seq: 5_000_001, ..first.clone().ack() };
        expect_sent(lb, &data, &natted_to_backend(&data, (LISTEN, port), FAR_BACKEND), "data");
        lb.counters_moved(&[(Counter::XLB_CNT_NEW_FLOW, 1), (Counter::XLB_CNT_FWD_TO_BACKEND, 2)]);
        let before = retired(lb);
        assert_eq!(before.len(), 1, "{before:?}");
        assert_eq!(before[&BACKEND], open_close_traffic(&first, BACKEND, port));

        // The backend comes back, and another client takes the tombstone's
        // port over: the old connection was retired when it moved, the
        // client's connection to the far backend is live.
        lb.dp.set_backends(&maglev_table(&[BACKEND])).unwrap();
        let other = client_syn((OTHER_CLIENT, 40000));
        expect_sent(lb, &other, &natted_to_backend(&other, (LISTEN, port), BACKEND), "takeover");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
            (Counter::XLB_CNT_NAT_RECLAIMED, 1),
        ]);
        assert_eq!(retired(lb), before, "nothing more retired");
        // The live connection is untouched.
        expect_sent(lb, &data, &natted_to_backend(&data, (LISTEN, port), FAR_BACKEND), "data again");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_BACKEND, 1)]);
    });
}

#[test]
fn a_client_back_at_its_old_backend_takes_its_own_tombstone_over_at_once() {
    one_port_case(|lb| {
        let syn = one_port_closed(lb, true);
        let port = ONE_PORT.0;
        // The backend leaves: the client's next connection goes to the far
        // backend, leaving port 20000's tombstone at the first; it closes.
        lb.dp.set_backends(&maglev_table(&[FAR_BACKEND])).unwrap();
        let moved = Tcp { seq: 5_000_000, ..syn.clone() };
        assert_eq!(open(lb, &moved, FAR_BACKEND), port);
        close(lb, &moved, FAR_BACKEND, port, false);
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 3),
            (Counter::XLB_CNT_FWD_TO_CLIENT, 2),
        ]);
        assert_eq!(lb.dp.flows().unwrap().len(), 3, "two pairs' worth: the tombstone and the moved pair");

        // The backend comes back and the client with it. Its own tuple's
        // tombstone is taken over whatever the sequence number: the backend
        // sees the very 4-tuple it holds in TIME_WAIT.
        lb.dp.set_backends(&maglev_table(&[BACKEND])).unwrap();
        let back = Tcp { seq: CLIENT_FIN_END - 100, ..syn.clone() };
        expect_sent(lb, &back, &natted_to_backend(&back, (LISTEN, port), BACKEND), "back at the backend");
        lb.counters_moved(&[
            (Counter::XLB_CNT_NEW_FLOW, 1),
            (Counter::XLB_CNT_FWD_TO_BACKEND, 1),
            (Counter::XLB_CNT_NAT_COLLISION, ONE_PORT_COLLISIONS),
            (Counter::XLB_CNT_NAT_RECLAIMED, 1),
        ]);
        let rev = rev_of(lb, BACKEND, port);
        assert_eq!((rev.nat(), rev.flow.tcp_flags), (((LISTEN, 80), syn.src), 0), "a fresh reverse entry");
        assert_eq!(fwd_of(lb, syn.src).nat(), ((LISTEN, port), (BACKEND, 8080)));
        let synack = Tcp { syn: true, seq: 9000, ..from_backend(BACKEND, port) };
        expect_sent(lb, &synack, &natted_to_client(&synack, syn.src), "SYN-ACK");
        lb.counters_moved(&[(Counter::XLB_CNT_FWD_TO_CLIENT, 1)]);
        // The far backend's reverse entry is left alone, a tombstone now.
        assert_eq!(lb.dp.flows().unwrap().len(), 3);
        assert_eq!(rev_of(lb, FAR_BACKEND, port).nat(), ((LISTEN, 80), syn.src));
    });
}
