//! XLB under attack, for real: forged floods from `xlb-bench flood` (an
//! AF_PACKET sender) inside the test's own namespaces, against the real
//! binary on veth, while real clients connect and transfer. Root only.
//!
//! Forged sources are 198.18.0.0/15 (RFC 2544's benchmark range), routed by
//! the LB node to the client namespace, which owns none of them and drops
//! whatever comes back.

mod common;

use std::time::{Duration, Instant};

use common::*;

const FORGED: &str = "198.18.0.0/15";

/// One flood at a time: each takes a core, and they would measure each other.
static FLOODS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    FLOODS.lock().unwrap_or_else(|e| e.into_inner())
}

fn url() -> String {
    format!("{LISTEN}:80")
}

/// The MAC address of `dev` in namespace `ns`.
fn mac_of(ns: &NsRef, dev: &str) -> String {
    let out = ns.exec(&format!("cat /sys/class/net/{dev}/address"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `xlb-bench flood` in `ns` with `args`; returns its JSON summary.
fn flood(ns: &NsRef, args: &str) -> serde_json::Value {
    let bin = env!("CARGO_BIN_EXE_xlb-bench");
    let out = ns.exec(&format!("{bin} flood {args}"));
    assert!(out.status.success(), "flood {args}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("flood prints JSON")
}

/// A topology whose LB routes the forged range back to the client side.
fn topology() -> Topology {
    let t = Topology::new(1);
    t.lb.exec(&format!("ip route add {FORGED} via 10.100.0.2"));
    t
}

/// `n` downloads of blob(bytes) paced over `secs`, started now; each
/// returns whether its body arrived byte-identical.
fn transfers(t: &Topology, n: usize, bytes: usize, secs: u64) -> Vec<std::thread::JoinHandle<bool>> {
    (0..n)
        .map(|_| {
            t.client.spawn(move || {
                let sa: std::net::SocketAddr = url().parse().unwrap();
                let get = || -> std::io::Result<Vec<u8>> {
                    use std::io::{Read, Write};
                    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(10))?;
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    write!(s, "GET /paced/{bytes}/{secs} HTTP/1.0\r\n\r\n")?;
                    let mut raw = Vec::new();
                    s.read_to_end(&mut raw)?;
                    Ok(parse_response(&raw)?.body)
                };
                get().is_ok_and(|body| body == blob(bytes))
            })
        })
        .collect()
}

/// A spoofed SYN flood at the highest rate one core can send, for 60 s,
/// against the one backend, while a real client opens 500 connections one
/// after another and 20 long transfers run: all connect, all transfers
/// arrive byte-identical. With `syn_proxy: off`, half-open pairs hold every
/// NAT port within a second, and new connections live on ports recycled from
/// the flood's oldest half-open pairs. With `auto`, the first sweep that
/// counts the flood's half-open pairs engages the SYN proxy: SYNs are answered
/// with cookies and create no state, and requests over proxied connections
/// arrive whole (sequence numbers translated).
fn syn_flood(mode: &str) {
    let _one = one_at_a_time();
    let t = topology();
    let _b = start_backend(&t.backends[0], "be1");
    let xlb =
        XlbProcess::start(&t.lb, &lb_config(1, &format!("conntrack_capacity: 300000\nsyn_proxy: {mode}\n")));
    let dmac = mac_of(&t.lb, "lb-client");
    let transfers = transfers(&t, 20, 4 << 20, 40);
    let flooder = {
        let client = t.client.clone();
        let args = format!(
            "--kind syn --iface eth0 --dmac {dmac} --target {LISTEN}:80 --sources {FORGED} --secs 60"
        );
        std::thread::spawn(move || flood(&client, &args))
    };
    std::thread::sleep(Duration::from_secs(3));
    let connects = t.client.run(|| {
        let start = Instant::now();
        let mut slow = Vec::new();
        for i in 0..500 {
            let began = Instant::now();
            // The kernel retransmits a lost SYN: up to 3 tries within 7 s.
            let sa: std::net::SocketAddr = url().parse().unwrap();
            let r = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(7));
            assert!(r.is_ok(), "connection {i} failed after {:?}: {r:?}", began.elapsed());
            if began.elapsed() > Duration::from_millis(500) {
                slow.push(began.elapsed());
            }
            assert!(start.elapsed() < Duration::from_secs(240), "500 connections take too long");
        }
        (start.elapsed(), slow)
    });
    // Requests during the flood: through the proxy, with `auto`. A client
    // may try twice, as real ones do; every failed try is reported.
    let (requests, failures) = t.client.run(|| {
        let mut failures = Vec::new();
        let ok = (0..10)
            .filter(|i| {
                (0..2).any(|attempt| match http_get(&url(), "/blob/1048576") {
                    Ok(r) if r.status == 200 && r.body == blob(1 << 20) => true,
                    Ok(r) => {
                        failures.push(format!(
                            "request {i} try {attempt}: status {}, {} bytes",
                            r.status,
                            r.body.len()
                        ));
                        false
                    }
                    Err(e) => {
                        failures.push(format!("request {i} try {attempt}: {e}"));
                        false
                    }
                })
            })
            .count();
        (ok, failures)
    });
    eprintln!("requests during the flood: {requests}/10 answered whole; failed tries: {failures:?}");
    let during = status(&t.lb);
    let sent = flooder.join().expect("flooder");
    let ok = transfers.into_iter().map(|h| h.join().unwrap_or(false)).filter(|&ok| ok).count();
    let s = status(&t.lb);
    let c = |n: &str| counter(&s, n);
    eprintln!(
        "SYN flood, syn_proxy {mode}: {sent}; 500 connects in {:?} ({} over 500 ms); requests ok {requests}/10; \
         transfers ok {ok}/20; new_flow {} nat_port_recycled {} drop_nat_exhausted {} drop_ct_full {} \
         cookies sent {} valid {} failed {}, backend SYN-ACKs acked {}, SYNs resent {}, \
         client segments held {}; half-open during the flood {}, engaged {}",
        connects.0,
        connects.1.len(),
        c("new_flow"),
        c("nat_port_recycled"),
        c("drop_nat_exhausted"),
        c("drop_ct_full"),
        c("synproxy_cookie_sent"),
        c("synproxy_cookie_valid"),
        c("synproxy_cookie_failed"),
        c("synproxy_backend_acked"),
        c("synproxy_syn_resent"),
        c("drop_synproxy_waiting"),
        during["connections_half_open"],
        during["syn_proxy_engaged"],
    );
    assert_eq!(ok, 20, "every long transfer completes byte-identical");
    assert_eq!(requests, 10, "every request during the flood is answered whole");
    assert!(sent["pps"].as_f64().unwrap() > 10_000.0, "a flood worth the name: {sent}");
    if mode == "off" {
        assert!(c("nat_port_recycled") > 0, "the flood's half-open pairs were recycled: {s}");
        assert_eq!(c("synproxy_cookie_sent"), 0);
    } else {
        assert_eq!(during["syn_proxy_engaged"], true, "engaged during the flood: {during}");
        assert!(c("synproxy_cookie_sent") > 100_000, "the flood met cookies: {s}");
        // Every real connection after the engagement came through a cookie.
        assert!(c("synproxy_cookie_valid") >= 500, "{s}");
        assert!(c("synproxy_backend_acked") > 0, "{s}");
    }
    drop(xlb);
}

#[test]
fn a_spoofed_syn_flood_starves_no_real_client_with_syn_proxy_off() {
    syn_flood("off");
}

#[test]
fn a_spoofed_syn_flood_starves_no_real_client_with_syn_proxy_auto() {
    syn_flood("auto");
}

/// Blind RSTs from the backend's address to every NAT port, with random
/// sequence numbers and some broken checksums, during 20 long transfers:
/// every transfer completes, the RSTs are counted and ignored. A genuine
/// RST (the client's kernel aborting a connection) still ends it.
#[test]
fn a_blind_rst_flood_ends_no_connection_a_genuine_rst_does() {
    let _one = one_at_a_time();
    let t = topology();
    let _b = start_backend(&t.backends[0], "be1");
    let xlb = XlbProcess::start_with_env(&t.lb, &lb_config(1, ""), &[("XLB_CLOSED_TTL_SECS", "1")]);
    let transfers = transfers(&t, 20, 2 << 20, 15);
    std::thread::sleep(Duration::from_secs(1));
    let dmac = mac_of(&t.lb, "lb-be1");
    let args = format!(
        "--kind rst --iface eth0 --dmac {dmac} --from 10.101.0.2:8080 --target {LISTEN}:10240-32767 \
         --bad-csum-every 5 --secs 10"
    );
    let sent = flood(&t.backends[0], &args);
    let ok = transfers.into_iter().map(|h| h.join().unwrap_or(false)).filter(|&ok| ok).count();
    let s = status(&t.lb);
    eprintln!(
        "RST flood: {sent}; transfers ok {ok}/20; drop_rst_out_of_window {} drop_rst_bad_csum {}",
        counter(&s, "drop_rst_out_of_window"),
        counter(&s, "drop_rst_bad_csum")
    );
    assert_eq!(ok, 20, "every transfer completes byte-identical");
    assert!(counter(&s, "drop_rst_out_of_window") > 0, "{s}");
    assert!(counter(&s, "drop_rst_bad_csum") > 0, "{s}");
    // The client's own RST is in its window: XLB lets it end the connection.
    let reset_before = s["backends"][0]["connections_closed_rst"].as_u64().unwrap();
    t.client.run(|| {
        let c = EchoConn::open(&url()).expect("connect");
        c.abort();
    });
    let closed = wait_for(Duration::from_secs(10), || {
        let s = status(&t.lb);
        let n = s["backends"][0]["connections_closed_rst"].as_u64().unwrap();
        (n > reset_before).then_some(n)
    });
    assert!(closed.is_some(), "the genuine RST closed the connection: {}", status(&t.lb));
    drop(xlb);
}

/// TTL-1 packets and SYNs while draining each want an answer to a forged
/// source: answered at most at the configured rate per CPU, the rest
/// counted and dropped.
#[test]
fn ttl_and_drain_floods_are_answered_at_the_configured_rate() {
    let _one = one_at_a_time();
    let t = topology();
    let _b = start_backend(&t.backends[0], "be1");
    let shutdown = std::env::temp_dir().join(unique("xsd"));
    let extra = format!(
        "shutdown_timeout: 30\nshutdown_file: {}\nrate_limits:\n  icmp: {{per_sec: 100, burst: 10}}\n  \
         drain_rst: {{per_sec: 200, burst: 20}}\n",
        shutdown.display()
    );
    let mut xlb = XlbProcess::start(&t.lb, &lb_config(1, &extra));
    let dmac = mac_of(&t.lb, "lb-client");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let base =
        |args: &str| format!("--iface eth0 --dmac {dmac} --target {LISTEN}:80 --sources {FORGED} {args}");

    let sent = flood(&t.client, &base("--kind ttl --secs 3"));
    let s = status(&t.lb);
    let (answered, dropped) = (counter(&s, "icmp_ttl_exceeded"), counter(&s, "drop_icmp_ratelimit"));
    let cap = cpus * (100.0 * sent["secs"].as_f64().unwrap() + 10.0) + 10.0;
    eprintln!("TTL flood: {sent}; answered {answered}, dropped {dropped}, cap {cap}");
    assert!(answered >= 10 && (answered as f64) <= cap, "{answered} ICMP answers, cap {cap}");
    assert!(dropped > 0);

    std::fs::write(&shutdown, b"").unwrap();
    let draining = wait_for(Duration::from_secs(10), || {
        (status(&t.lb)["phase"].as_str() == Some("draining")).then_some(())
    });
    assert!(draining.is_some(), "draining: {}", status(&t.lb));
    let sent = flood(&t.client, &base("--kind syn --secs 3"));
    let s = status(&t.lb);
    let (answered, dropped) = (counter(&s, "drain_rst"), counter(&s, "drop_drain_rst_ratelimit"));
    let cap = cpus * (200.0 * sent["secs"].as_f64().unwrap() + 20.0) + 20.0;
    eprintln!("drain flood: {sent}; answered {answered}, dropped {dropped}, cap {cap}");
    assert!(answered >= 20 && (answered as f64) <= cap, "{answered} drain RSTs, cap {cap}");
    assert!(dropped > 0);
    xlb.terminate();
    let _ = std::fs::remove_file(&shutdown);
}
