//! Every node shape, end to end: the real `xlb` binary, real TCP, real veth
//! interfaces in namespaces. Each shape gets the same workout: 100 requests
//! answered by every backend, a 10 MB download byte-identical, 200
//! concurrent connections, and a drain during which, with no other traffic
//! on the node, three new connections are each refused with a RST in under
//! 100 ms. XLB's counters must move: the kernel cannot pass for XLB (the LB
//! node has no listener or route that could answer on its own).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

/// Where the client connects and which namespaces play which part.
struct Shape<'a> {
    client: &'a NsRef,
    lb: &'a NsRef,
    listen: &'a str,
    backends: usize,
}

impl Shape<'_> {
    fn url(&self) -> String {
        format!("{}:80", self.listen)
    }

    fn counter_reaches(&self, name: &str, min: u64) -> u64 {
        let mut last = 0;
        wait_for(Duration::from_secs(5), || {
            last = counter(&status(self.lb), name);
            (last >= min).then_some(())
        });
        last
    }

    fn hundred_requests_reach_every_backend(&self) {
        let url = self.url();
        let answers = self.client.run(move || {
            let mut seen: HashMap<String, usize> = HashMap::new();
            for i in 0..100 {
                let r = http_get(&url, "/").unwrap_or_else(|e| panic!("request {i} through XLB: {e}"));
                assert_eq!(r.status, 200);
                *seen.entry(String::from_utf8(r.body).unwrap()).or_default() += 1;
            }
            seen
        });
        for k in 1..=self.backends {
            let n = answers.get(&format!("backend be{k}\n")).copied().unwrap_or(0);
            assert!(n >= 100 / self.backends / 3, "be{k} answered {n} of 100: {answers:?}");
        }
        assert!(self.counter_reaches("new_flow", 100) >= 100, "XDP opened the connections");
        assert!(self.counter_reaches("fwd_to_client", 200) >= 200, "XDP translated the replies");
    }

    fn ten_megabytes_arrive_byte_identical(&self) {
        const SIZE: usize = 10 * 1024 * 1024;
        let before = counter(&status(self.lb), "fwd_to_client");
        let url = self.url();
        let body = self.client.run(move || http_get(&url, &format!("/blob/{SIZE}")).expect("download").body);
        assert_eq!(body.len(), SIZE);
        assert!(body == blob(SIZE), "payload differs from what the backend sent");
        assert!(self.counter_reaches("fwd_to_client", before + 1000) >= before + 1000);
    }

    fn two_hundred_concurrent_connections(&self) {
        let addr: std::net::SocketAddr = self.url().parse().unwrap();
        let ok = self.client.run(move || {
            let mut conns: Vec<_> = (0..200)
                .map(|i| {
                    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    s
                })
                .collect();
            for s in conns.iter_mut() {
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            }
            let mut ok = 0;
            for s in conns.iter_mut() {
                let mut raw = Vec::new();
                if s.read_to_end(&mut raw).is_ok()
                    && parse_response(&raw)
                        .is_ok_and(|r| r.status == 200 && r.body.starts_with(b"backend be"))
                {
                    ok += 1;
                }
            }
            ok
        });
        assert_eq!(ok, 200);
    }

    /// Drain with nothing else on the wire: each refusal must arrive on its
    /// own, not ride along with other traffic.
    fn drain_refuses_with_rst(&self, xlb: &mut XlbProcess) {
        let rst_before = counter(&status(self.lb), "drain_rst");
        xlb.signal(nix::sys::signal::Signal::SIGTERM);
        let lb = self.lb.clone();
        wait_for(Duration::from_secs(3), || {
            let lb = lb.clone();
            let code = lb.run(|| http_get("127.0.0.1:9090", "/readyz").map(|r| r.status));
            (code.ok() == Some(503)).then_some(())
        })
        .expect("readiness fails during the drain");
        std::thread::sleep(Duration::from_millis(300));
        let addr: std::net::SocketAddr = self.url().parse().unwrap();
        for probe in 0..3 {
            let (res, took) = self.client.run(move || {
                let t0 = Instant::now();
                let r = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2));
                (r.map(drop), t0.elapsed())
            });
            let err = res.expect_err("a new connection during the drain is refused");
            assert!(
                matches!(
                    err.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ),
                "probe {probe}: refused with a reset, not {err}"
            );
            assert!(took < Duration::from_millis(100), "probe {probe}: refusal took {took:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(self.counter_reaches("drain_rst", rst_before + 3) >= rst_before + 3, "XDP sent the RSTs");
        let exit = xlb.wait(Duration::from_secs(15)).expect("xlb exits after shutdown_timeout");
        assert!(exit.success(), "{}", xlb.log());
    }

    fn workout(&self, xlb: &mut XlbProcess) {
        self.hundred_requests_reach_every_backend();
        self.ten_megabytes_arrive_byte_identical();
        self.two_hundred_concurrent_connections();
        self.drain_refuses_with_rst(xlb);
    }
}

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
    // Counters are read once a second.
    let sent =
        wait_for(Duration::from_secs(5), || (counter(&status(&t.lb), "icmp_frag_needed") >= 1).then_some(()));
    let s = status(&t.lb);
    assert!(sent.is_some(), "XLB told the sender: {}", s["counters"]);
    assert!(counter(&s, "fwd_to_backend") >= 2000, "the upload went through XDP: {}", s["counters"]);
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
