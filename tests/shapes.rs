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
    // How the choice was made: a GRO peer takes XDP frames (native, sent by
    // redirect); a peer without GRO or XDP does not (generic mode).
    let (mode, transmit) = if peer_gro { ("native", "redirect") } else { ("generic", "xdp_tx") };
    assert_eq!(ifs[0]["xdp_mode"], mode, "{ifs:?}");
    assert_eq!(ifs[0]["transmit"], transmit, "{ifs:?}");
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
