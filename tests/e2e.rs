//! End to end: the real `xlb` binary on real veth interfaces in network
//! namespaces, real TCP between a client and backends. Every test also
//! checks XLB's own counters, so the kernel's routing cannot pass for XLB
//! (the LB node has no route or listener that could answer on its own).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;

fn config(backends: usize) -> String {
    lb_config(backends, "shutdown_timeout: 1\n")
}

fn url() -> String {
    format!("{LISTEN}:80")
}

/// Waits until the status document shows at least `min` for `name`.
fn counter_reaches(lb: &NsRef, name: &str, min: u64) -> u64 {
    let mut last = 0;
    wait_for(Duration::from_secs(5), || {
        last = counter(&status(lb), name);
        (last >= min).then_some(())
    });
    last
}

#[test]
fn requests_are_balanced_over_both_backends() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let mut xlb = XlbProcess::start(&t.lb, &config(2));

    let answers = t.client.run(|| {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for _ in 0..100 {
            let r = http_get(&url(), "/").expect("request through XLB");
            assert_eq!(r.status, 200);
            *seen.entry(String::from_utf8(r.body).unwrap()).or_default() += 1;
        }
        seen
    });
    assert_eq!(answers.values().sum::<usize>(), 100);
    for be in ["backend be1\n", "backend be2\n"] {
        let n = answers.get(be).copied().unwrap_or(0);
        assert!(n >= 20, "{be:?} answered {n} of 100: {answers:?}");
    }
    assert!(counter_reaches(&t.lb, "new_flow", 100) >= 100, "XDP opened the connections");
    assert!(counter_reaches(&t.lb, "fwd_to_backend", 300) >= 300);
    assert!(counter_reaches(&t.lb, "fwd_to_client", 200) >= 200);
    let log = xlb.log();
    assert!(log.contains("backend added: be1 10.101.0.2"), "{log}");
    assert!(xlb.terminate().success(), "{}", xlb.log());
}

#[test]
fn ten_megabyte_download_arrives_byte_identical() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let _xlb = XlbProcess::start(&t.lb, &config(2));
    const SIZE: usize = 10 * 1024 * 1024;
    let body = t.client.run(|| http_get(&url(), &format!("/blob/{SIZE}")).expect("download").body);
    assert_eq!(body.len(), SIZE);
    assert!(body == blob(SIZE), "payload differs from what the backend sent");
    // Thousands of segments each way went through XDP, not a handful.
    assert!(counter_reaches(&t.lb, "fwd_to_client", 1000) >= 1000);
}

#[test]
fn two_hundred_concurrent_connections_all_succeed() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let _xlb = XlbProcess::start(&t.lb, &config(2));
    let ok = t.client.run(|| {
        // All 200 open at once, then each asks and reads.
        let addr: std::net::SocketAddr = url().parse().unwrap();
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
                && parse_response(&raw).is_ok_and(|r| r.status == 200 && r.body.starts_with(b"backend be"))
            {
                ok += 1;
            }
        }
        ok
    });
    assert_eq!(ok, 200);
    assert!(counter_reaches(&t.lb, "new_flow", 200) >= 200);
}

#[test]
fn without_xlb_the_same_request_fails() {
    let t = Topology::new(1);
    let _b1 = start_backend(&t.backends[0], "be1");
    let fails = || t.client.run(|| http_get(&url(), "/").is_err());
    assert!(fails(), "before XLB runs, nothing on the LB node answers port 80");

    let mut xlb = XlbProcess::start(&t.lb, &config(1));
    let body = t.client.run(|| http_get(&url(), "/").map(|r| r.body));
    assert_eq!(body.expect("through XLB"), b"backend be1\n");
    assert!(xlb.terminate().success());

    assert!(fails(), "after XLB stops, the request fails again");
    let links = t.lb.exec("ip -d link show");
    assert!(!String::from_utf8_lossy(&links.stdout).contains("prog/xdp"), "XDP detached on exit");
}
