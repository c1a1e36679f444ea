//! Every node shape, end to end: the real `xlb` binary, real TCP, real veth
//! interfaces in namespaces. Each shape gets the same workout: 100 requests
//! answered by every backend, a 10 MB download byte-identical, 200
//! concurrent connections, and a drain during which, with no other traffic
//! on the node, three new connections are each refused with a RST in under
//! 100 ms. XLB's counters must move: the kernel cannot pass for XLB (the LB
//! node has no listener or route that could answer on its own).

mod common;

use std::time::Duration;

use common::workout::Shape;
use common::*;

fn interfaces(lb: &NsRef) -> Vec<serde_json::Value> {
    status(lb)["interfaces"].as_array().cloned().unwrap_or_default()
}

fn one_armed(peer_gro: bool) {
    let t = OneArmed::new(2, peer_gro);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let mut xlb = XlbProcess::start(&t.lb, &t.config(2, "shutdown_timeout: 3\n"));
    let ifs = interfaces(&t.lb);
    assert_eq!(ifs.len(), 1, "one interface: {ifs:?}");
    // A veth runs generic mode whatever its peer; only a peer that takes XDP
    // frames (GRO on) makes it a redirect target.
    let mode = "generic";
    assert_eq!(ifs[0]["xdp_mode"], mode, "{ifs:?}");
    assert_eq!(ifs[0]["transmit"], "xdp_tx", "{ifs:?}");
    assert_eq!(ifs[0]["redirect_target"], peer_gro, "{ifs:?}");
    let shape = Shape { client: &t.client, lb: &t.lb, listen: ONE_ARMED_LISTEN, backends: 2 };
    shape.workout(&mut xlb);
    assert!(xlb.log().contains(&format!("XDP attached to eth0 in {mode} mode")), "{}", xlb.log());
}

#[test]
fn one_armed_with_gro_on_the_peer() {
    one_armed(true);
}

#[test]
fn one_armed_without_gro_or_xdp_on_the_peer() {
    one_armed(false);
}

#[test]
fn two_armed() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let mut xlb = XlbProcess::start(&t.lb, &lb_config(2, "shutdown_timeout: 3\n"));
    let names: Vec<String> =
        interfaces(&t.lb).iter().map(|i| i["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names.len(), 3, "the client's and both backends' interfaces: {names:?}");
    let shape = Shape { client: &t.client, lb: &t.lb, listen: LISTEN, backends: 2 };
    shape.workout(&mut xlb);
}

/// Two-armed, one link narrower than the other. The narrow side's hosts
/// advertise a full-size MSS (a route's advmss), as hosts behind a tunnel
/// or a misconfigured link do, so only path MTU discovery can save the
/// transfer: XLB answers the oversized packets with "fragmentation needed".
fn mtu(client_mtu: u32, backend_mtu: u32) {
    let t = Topology::new(1);
    t.client.exec(&format!("ip link set eth0 mtu {client_mtu}"));
    t.lb.exec(&format!("ip link set lb-client mtu {client_mtu}"));
    t.backends[0].exec(&format!("ip link set eth0 mtu {backend_mtu}"));
    t.lb.exec(&format!("ip link set lb-be1 mtu {backend_mtu}"));
    t.client.exec(&format!("ip route add {LISTEN}/32 dev eth0 advmss 1460"));
    t.backends[0].exec(&format!("ip route add {LISTEN}/32 via 10.101.0.1 dev eth0 advmss 1460"));
    let _b1 = start_backend(&t.backends[0], "be1");
    let _xlb = XlbProcess::start(&t.lb, &lb_config(1, "shutdown_timeout: 1\n"));
    const SIZE: usize = 10 * 1024 * 1024;
    let url = format!("{LISTEN}:80");
    let u = url.clone();
    let down = t.client.run(move || http_get(&u, &format!("/blob/{SIZE}")).expect("download").body);
    assert!(down == blob(SIZE), "download differs");
    let up = t.client.run(move || http_upload(&url, SIZE).expect("upload").body);
    assert_eq!(up, b"upload ok\n");
    // Counters are read once a second: wait until the upload shows.
    let seen = wait_for(Duration::from_secs(5), || {
        let s = status(&t.lb);
        (counter(&s, "fwd_to_backend") >= 2000 && counter(&s, "fwd_to_client") >= 2000).then_some(())
    });
    let s = status(&t.lb);
    assert!(seen.is_some(), "both transfers went through XDP: {}", s["counters"]);
    assert!(counter(&s, "icmp_frag_needed") >= 1, "XLB told the sender: {}", s["counters"]);
    assert_eq!(counter(&s, "drop_icmp_ratelimit"), 0, "{}", s["counters"]);
}

#[test]
fn path_mtu_narrow_backend_link() {
    mtu(1500, 1400);
}

#[test]
fn path_mtu_narrow_client_link() {
    mtu(1400, 1500);
}

fn attached(lb: &NsRef) -> Vec<String> {
    interfaces(lb).iter().map(|i| i["name"].as_str().unwrap_or_default().to_string()).collect()
}

/// A backend that leaves the set keeps its interface attached for as long
/// as a connection to it lives; once that connection ends, XLB lets go.
#[test]
fn an_interface_stays_attached_while_a_removed_backend_has_connections() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let only = |k: usize| {
        let other = 3 - k;
        lb_config(2, "shutdown_timeout: 1\n")
            .lines()
            .filter(|l| !l.contains(&format!("name: be{other}")))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    let cfg = only(2);
    let xlb = XlbProcess::start(&t.lb, &cfg);
    let cfg_path = xlb.log.with_file_name("xlb.yaml");
    assert_eq!(attached(&t.lb), ["lb-client", "lb-be2"]);
    let mut conn = t.client.run(|| EchoConn::open(&format!("{LISTEN}:80"))).expect("echo connection to be2");
    conn.ping("before").unwrap();

    // be1 replaces be2: its interface comes, be2's stays for the connection.
    let name = cfg.lines().next().unwrap().to_string();
    let next = only(1).lines().skip(1).fold(name, |acc, l| acc + "\n" + l) + "\n";
    std::fs::write(&cfg_path, next).unwrap();
    xlb.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(10), || attached(&t.lb).contains(&"lb-be1".to_string()).then_some(()))
        .unwrap_or_else(|| panic!("lb-be1 attached: {:?}\n{}", attached(&t.lb), xlb.log()));
    std::thread::sleep(Duration::from_secs(3)); // several sweeps and passes
    assert!(attached(&t.lb).contains(&"lb-be2".to_string()), "kept for the live connection\n{}", xlb.log());
    let before = counter(&status(&t.lb), "fwd_to_client");
    for i in 0..20 {
        conn.ping(&format!("ping {i}")).expect("the connection to the removed backend lives on");
    }
    wait_for(Duration::from_secs(5), || {
        (counter(&status(&t.lb), "fwd_to_client") >= before + 20).then_some(())
    })
    .expect("its replies went through XDP");

    drop(conn);
    wait_for(Duration::from_secs(15), || (!attached(&t.lb).contains(&"lb-be2".to_string())).then_some(()))
        .unwrap_or_else(|| panic!("lb-be2 detached once unused: {:?}\n{}", attached(&t.lb), xlb.log()));
    assert!(xlb.log().contains("XDP detached from lb-be2 (generic mode)"), "{}", xlb.log());
    let body = t.client.run(|| http_get(&format!("{LISTEN}:80"), "/").map(|r| r.body));
    assert_eq!(body.expect("served by be1"), b"backend be1\n");
}

/// Containers send with TCP checksum offload (the veth default): the
/// checksum travels as a seed for the device to finish. XDP must neither
/// lose that state (native XDP on a veth would) nor break the seed.
#[test]
fn endpoints_with_checksum_offload_on() {
    let t = OneArmed::new(2, true);
    for ns in std::iter::once(&t.client).chain(t.backends.iter()) {
        ns.exec("ethtool -K eth0 tx on >/dev/null");
    }
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let mut xlb = XlbProcess::start(&t.lb, &t.config(2, "shutdown_timeout: 3\n"));
    let shape = Shape { client: &t.client, lb: &t.lb, listen: ONE_ARMED_LISTEN, backends: 2 };
    shape.workout(&mut xlb);

    let t = Topology::new(2);
    for ns in std::iter::once(&t.client).chain(t.backends.iter()) {
        ns.exec("ethtool -K eth0 tx on >/dev/null");
    }
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let mut xlb = XlbProcess::start(&t.lb, &lb_config(2, "shutdown_timeout: 3\n"));
    let shape = Shape { client: &t.client, lb: &t.lb, listen: LISTEN, backends: 2 };
    shape.workout(&mut xlb);
}

/// Every connection through the SYN proxy (syn_proxy: on), in both shapes:
/// the same workout, each connection opened by a cookie and its backend's
/// sequence numbers translated both ways.
fn proxied(shape_name: &str) {
    let extra = "shutdown_timeout: 3\nsyn_proxy: on\n";
    match shape_name {
        "one-armed" => {
            let t = OneArmed::new(2, false);
            let _b1 = start_backend(&t.backends[0], "be1");
            let _b2 = start_backend(&t.backends[1], "be2");
            let mut xlb = XlbProcess::start(&t.lb, &t.config(2, extra));
            let shape = Shape { client: &t.client, lb: &t.lb, listen: ONE_ARMED_LISTEN, backends: 2 };
            proxied_workout(&shape, &mut xlb);
        }
        _ => {
            let t = Topology::new(2);
            let _b1 = start_backend(&t.backends[0], "be1");
            let _b2 = start_backend(&t.backends[1], "be2");
            let mut xlb = XlbProcess::start(&t.lb, &lb_config(2, extra));
            let shape = Shape { client: &t.client, lb: &t.lb, listen: LISTEN, backends: 2 };
            proxied_workout(&shape, &mut xlb);
        }
    }
}

fn proxied_workout(shape: &Shape, xlb: &mut XlbProcess) {
    shape.hundred_requests_reach_every_backend();
    shape.ten_megabytes_arrive_byte_identical();
    shape.two_hundred_concurrent_connections();
    // 301 connections (100 requests, the download, 200 at once), each
    // through a cookie, except those on which the client reused the port
    // of a closed connection XLB still tracks: those reopen their pair in
    // place, with no cookie (the counters are read once a second).
    assert!(shape.counter_reaches("new_flow", 301) >= 301, "{}", status(shape.lb));
    for name in ["synproxy_cookie_sent", "synproxy_cookie_valid", "synproxy_backend_acked"] {
        assert!(shape.counter_reaches(name, 250) >= 250, "{name}: {}", status(shape.lb));
    }
    let s = status(shape.lb);
    assert_eq!(s["syn_proxy_engaged"], true, "{s}");
    assert_eq!(counter(&s, "synproxy_cookie_failed"), 0, "{s}");
    assert!(
        counter(&s, "synproxy_cookie_valid") + counter(&s, "ct_reopened") >= 301,
        "every connection came through a cookie or reopened a closed pair: {s}"
    );
    shape.drain_refuses_with_rst(xlb);
}

#[test]
fn one_armed_through_the_syn_proxy() {
    proxied("one-armed");
}

#[test]
fn two_armed_through_the_syn_proxy() {
    proxied("two-armed");
}
