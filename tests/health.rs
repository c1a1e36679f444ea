//! Active health checks end to end: the real `xlb` binary in network
//! namespaces, real backends whose servers stop, come back, answer a
//! failing status or never answer. New connections must follow the
//! checks; established ones must not notice.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Probes every 200 ms (rise 2, fall 3 unless `extra` says otherwise).
fn config(check: &str) -> String {
    lb_config(
        3,
        &format!("shutdown_timeout: 1\nhealth_check: {{interval_ms: 200, timeout_ms: 150, {check}}}\n"),
    )
}

const INTERVAL: Duration = Duration::from_millis(200);

fn url() -> String {
    format!("{LISTEN}:80")
}

/// `n` sequential new connections from the client: which backend answered
/// each, and how many failed.
fn connections(t: &Topology, n: usize) -> (HashMap<String, usize>, usize) {
    t.client.run(move || {
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut failed = 0;
        for _ in 0..n {
            match http_get(&url(), "/") {
                Ok(r) if r.status == 200 => {
                    let who =
                        String::from_utf8_lossy(&r.body).trim().trim_start_matches("backend ").to_string();
                    *seen.entry(who).or_default() += 1;
                }
                _ => failed += 1,
            }
        }
        (seen, failed)
    })
}

/// The status document's entry for backend `name`.
fn backend(lb: &NsRef, name: &str) -> Value {
    let s = status(lb);
    s["backends"]
        .as_array()
        .and_then(|l| l.iter().find(|b| b["name"] == name).cloned())
        .unwrap_or_else(|| panic!("{name} not in {s}"))
}

/// Waits (bounded) until backend `name` reports `health`; returns its entry.
fn wait_health(lb: &NsRef, name: &str, health: &str, limit: Duration) -> Value {
    let mut last = Value::Null;
    let got = wait_for(limit, || {
        last = backend(lb, name);
        (last["health"] == health).then(|| last.clone())
    });
    got.unwrap_or_else(|| panic!("{name} not {health} within {limit:?}: {last}"))
}

fn readyz(lb: &NsRef) -> (u16, String) {
    let r = lb.run(|| http_get("127.0.0.1:9090", "/readyz")).expect("readyz answers");
    (r.status, String::from_utf8_lossy(&r.body).trim().to_string())
}

/// The value of an unlabelled (or first matching) Prometheus sample.
fn metric(lb: &NsRef, line_start: &str) -> Option<f64> {
    let r = lb.run(|| http_get("127.0.0.1:9090", "/metrics")).expect("metrics answer");
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Sleeps until `at`.
fn until(at: Instant) {
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
}

#[test]
fn a_stopped_backend_gets_no_new_connections_until_it_is_back_and_transfers_carry_on() {
    let t = Topology::new(3);
    let mut servers: Vec<Option<Backend>> =
        (0..3).map(|k| Some(start_backend(&t.backends[k], &format!("be{}", k + 1)))).collect();
    let mut xlb = XlbProcess::start(&t.lb, &config("type: tcp, rise: 2, fall: 3"));
    for k in 1..=3 {
        assert_eq!(backend(&t.lb, &format!("be{k}"))["health"], "healthy", "the first result decides");
    }

    // Long transfers (2 MB paced over 12 s) on whatever backends Maglev picks.
    const SIZE: usize = 2_000_000;
    let transfers: Vec<_> =
        (0..4).map(|_| t.client.spawn(|| http_get(&url(), &format!("/paced/{SIZE}/12")))).collect();
    let carrying = wait_for(Duration::from_secs(5), || {
        let s = status(&t.lb);
        let per: Vec<u64> = (1..=3)
            .map(|k| {
                s["backends"].as_array().unwrap().iter().find(|b| b["name"] == format!("be{k}")).unwrap()
                    ["connections_active"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        (per.iter().sum::<u64>() == 4).then_some(per)
    })
    .expect("the four transfers are tracked");
    // Stop the server carrying the fewest of them: at least one transfer
    // runs on a backend that stays up.
    let victim = (0..3).min_by_key(|&k| carrying[k]).unwrap();
    let name = format!("be{}", victim + 1);
    let ip = backend_ip(victim + 1);

    let stopped = Instant::now();
    servers[victim] = None;
    until(stopped + INTERVAL * 3 + Duration::from_secs(1));
    let (seen, failed) = connections(&t, 100);
    assert_eq!(failed, 0, "100 new connections after {name} stopped: {seen:?}\n{}", xlb.log());
    assert_eq!(seen.get(&name), None, "{name} got new connections: {seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
    let b = backend(&t.lb, &name);
    assert_eq!((b["health"].as_str(), b["state"].as_str()), (Some("unhealthy"), Some("excluded")), "{b}");
    assert_eq!(b["last_check"], "connect refused", "{b}");
    assert!(
        b["health_changed_unix_ms"].as_u64().is_some() && b["check_latency_ms"].as_f64().is_some(),
        "{b}"
    );

    let restarted = Instant::now();
    servers[victim] = Some(start_backend(&t.backends[victim], &name));
    until(restarted + INTERVAL * 2 + Duration::from_secs(1));
    let (seen, failed) = connections(&t, 100);
    assert_eq!(failed, 0, "{seen:?}");
    let back = seen.get(&name).copied().unwrap_or(0);
    assert!(back >= 10, "{name} is back but answered {back} of 100: {seen:?}");

    for (i, tr) in transfers.into_iter().enumerate() {
        let r = tr.join().unwrap().unwrap_or_else(|e| panic!("transfer {i} failed: {e}"));
        assert!(r.status == 200 && r.body == blob(SIZE), "transfer {i} was disturbed");
    }
    let log = xlb.log();
    assert_eq!(
        log.matches(&format!("backend {name} {ip} unhealthy: connect refused (3/3)")).count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches(&format!("backend {name} {ip} healthy: connect ok (2/2)")).count(), 1, "{log}");
    assert!(xlb.terminate().success());
}

#[test]
fn a_backend_down_at_start_is_left_out_of_the_first_table() {
    let t = Topology::new(3);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b3 = start_backend(&t.backends[2], "be3");
    let started = Instant::now();
    let mut xlb = XlbProcess::start(&t.lb, &config("type: tcp"));
    assert!(started.elapsed() < Duration::from_secs(10), "ready quickly");
    let b2 = backend(&t.lb, "be2");
    assert_eq!((b2["health"].as_str(), b2["state"].as_str()), (Some("unhealthy"), Some("excluded")), "{b2}");
    let (seen, failed) = connections(&t, 50);
    assert_eq!(failed, 0, "{seen:?}");
    assert_eq!(seen.get("be2"), None, "{seen:?}");
    let log = xlb.log();
    assert!(
        log.contains(&format!("backend be2 {} unhealthy: connect refused (1/3)", backend_ip(2))),
        "{log}"
    );
    assert_eq!(readyz(&t.lb), (200, "ready".into()));
    assert!(xlb.terminate().success());
}

#[test]
fn http_checks_follow_the_status_and_time_out_a_silent_backend() {
    let t = Topology::new(3);
    let servers: Vec<Backend> =
        (0..3).map(|k| start_backend(&t.backends[k], &format!("be{}", k + 1))).collect();
    let xlb = XlbProcess::start(&t.lb, &config("type: http, path: /check, rise: 2, fall: 2"));
    let b = backend(&t.lb, "be1");
    assert_eq!(
        (b["health"].as_str(), b["last_check"].as_str()),
        (Some("healthy"), Some("status 200")),
        "{b}"
    );

    // 500 on the check path: unhealthy, though "/" still answers.
    servers[1].check.store(500, Ordering::Relaxed);
    let b = wait_health(&t.lb, "be2", "unhealthy", INTERVAL * 2 + Duration::from_secs(1));
    assert_eq!(b["last_check"], "status 500, expected 200-399", "{b}");
    let (seen, failed) = connections(&t, 60);
    assert_eq!((failed, seen.get("be2")), (0, None), "{seen:?}");

    // 200 again: back in.
    servers[1].check.store(200, Ordering::Relaxed);
    wait_health(&t.lb, "be2", "healthy", INTERVAL * 2 + Duration::from_secs(1));
    let (seen, failed) = connections(&t, 100);
    assert_eq!(failed, 0);
    assert!(seen.get("be2").copied().unwrap_or(0) >= 10, "{seen:?}");

    // Accepts, reads the request and never answers: a timeout.
    servers[2].check.store(0, Ordering::Relaxed);
    let b = wait_health(&t.lb, "be3", "unhealthy", INTERVAL * 2 + Duration::from_secs(1));
    assert_eq!(b["last_check"], "no answer within 150 ms", "{b}");
    assert!(b["check_latency_ms"].as_f64().unwrap() >= 140.0, "a timeout takes its full length: {b}");
    let (seen, failed) = connections(&t, 60);
    assert_eq!((failed, seen.get("be3")), (0, None), "{seen:?}");
    assert_eq!(metric(&t.lb, "xlb_global_backends_healthy "), Some(2.0));
    assert_eq!(metric(&t.lb, "xlb_backend_healthy{backend=\"10.103.0.2\",backend_name=\"be3\"}"), Some(0.0));
    let log = xlb.log();
    assert!(log.contains("backend be2 10.102.0.2 unhealthy: status 500, expected 200-399 (2/2)"), "{log}");
    assert!(log.contains("backend be2 10.102.0.2 healthy: status 200 (2/2)"), "{log}");
    assert!(log.contains("backend be3 10.103.0.2 unhealthy: no answer within 150 ms (2/2)"), "{log}");
}

#[test]
fn all_backends_failing_their_check_fail_open() {
    let t = Topology::new(3);
    let servers: Vec<Backend> =
        (0..3).map(|k| start_backend(&t.backends[k], &format!("be{}", k + 1))).collect();
    let xlb = XlbProcess::start(&t.lb, &config("type: http, path: /check, rise: 1, fall: 1"));
    assert_eq!(metric(&t.lb, "xlb_health_fail_open "), Some(0.0));

    for s in &servers {
        s.check.store(503, Ordering::Relaxed);
    }
    for k in 1..=3 {
        wait_health(&t.lb, &format!("be{k}"), "unhealthy", Duration::from_secs(3));
    }
    let not_ready = wait_for(Duration::from_secs(3), || {
        let r = readyz(&t.lb);
        (r.0 == 503).then_some(r)
    });
    assert_eq!(not_ready, Some((503, "no_healthy_backends".into())));
    assert_eq!(metric(&t.lb, "xlb_health_fail_open "), Some(1.0));
    assert_eq!(metric(&t.lb, "xlb_global_backends_healthy "), Some(0.0));
    // Still serving, and over every listed backend.
    let (seen, failed) = connections(&t, 100);
    assert_eq!(failed, 0, "{seen:?}");
    assert_eq!(seen.len(), 3, "every backend stays eligible: {seen:?}");
    let s = status(&t.lb);
    assert_eq!(s["health_checks"]["fail_open"], true, "{s}");
    assert!(s["backends"].as_array().unwrap().iter().all(|b| b["state"] == "active"), "{s}");

    // One passes again: fail open ends, only it gets new connections.
    servers[0].check.store(200, Ordering::Relaxed);
    wait_health(&t.lb, "be1", "healthy", Duration::from_secs(3));
    let ready = wait_for(Duration::from_secs(3), || (readyz(&t.lb).0 == 200).then_some(()));
    assert!(ready.is_some(), "{:?}", readyz(&t.lb));
    let (seen, failed) = connections(&t, 30);
    assert_eq!((failed, seen.len(), seen.get("be1")), (0, 1, Some(&30)), "{seen:?}");
    assert_eq!(metric(&t.lb, "xlb_health_fail_open "), Some(0.0));
    let log = xlb.log();
    assert_eq!(log.matches("no backend passes its health check: failing open").count(), 1, "{log}");
    assert_eq!(log.matches("no longer failing open: 1 of 3 listed backends pass").count(), 1, "{log}");
}

/// Not a pass/fail test: what probing 1,000 backends costs. Run as root with
/// `cargo test --release --test health -- --ignored --nocapture probe_cost`
/// (XLB_BIN=path picks another xlb binary). 1,000 static backends, all
/// addresses of one backend namespace (a local route makes a /22 its own),
/// one listener answering them; xlb with the same config once without
/// checks, then with tcp and with http checks every second. Prints xlb's
/// CPU (ms per second, from /proc/<pid>/stat), the probes the LB node's
/// kernel opened (ActiveOpens in /proc/net/snmp), the sockets xlb held
/// (sampled every 50 ms) and TIME_WAIT sockets on the node.
#[test]
#[ignore]
fn probe_cost_at_1000_backends() {
    const N: usize = 1000;
    const WINDOW: Duration = Duration::from_secs(20);
    let t = Topology::new(1);
    t.backends[0].exec("ip route add local 10.50.0.0/22 dev lo");
    t.lb.exec(&format!("ip route add 10.50.0.0/22 via {}", "10.101.0.2"));
    let _server = start_backend(&t.backends[0], "be");
    let ips: Vec<String> = (0..1024u32)
        .map(|i| format!("10.50.{}.{}", i / 256, i % 256))
        .filter(|ip| !ip.ends_with(".0") && !ip.ends_with(".255"))
        .take(N)
        .collect();
    let binary =
        std::env::var("XLB_BIN").map_or_else(|_| env!("CARGO_BIN_EXE_xlb").into(), std::path::PathBuf::from);
    let snmp_active_opens = |ns: &NsRef| -> u64 {
        let out = String::from_utf8(ns.exec("cat /proc/net/snmp").stdout).unwrap();
        let tcp: Vec<&str> = out.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let keys: Vec<&str> = tcp[0].split_whitespace().collect();
        let vals: Vec<&str> = tcp[1].split_whitespace().collect();
        vals[keys.iter().position(|k| *k == "ActiveOpens").unwrap()].parse().unwrap()
    };
    // (user, system) clock ticks.
    let cpu_ticks = |pid: u32| -> (u64, u64) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split(' ').collect();
        (f[11].parse().unwrap(), f[12].parse().unwrap())
    };
    let sockets = |pid: u32| -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as f64;
    println!("{N} backends, {WINDOW:?} window, xlb {}", binary.display());
    for (label, check) in [
        ("no checks", ""),
        ("tcp every 1000 ms", "health_check: {type: tcp}\n"),
        ("http every 1000 ms", "health_check: {type: http}\n"),
    ] {
        let config = static_config(
            LISTEN,
            ips.iter().cloned(),
            &format!("maglev_table_size: 100003\nshutdown_timeout: 0\n{check}"),
        );
        let mut xlb = XlbProcess::start_binary(&t.lb, &config, &binary);
        let pid = xlb.child.id();
        std::thread::sleep(Duration::from_secs(3));
        let s = status(&t.lb);
        if !check.is_empty() {
            assert_eq!(s["health_checks"]["healthy"], N, "every backend healthy: {}", s["health_checks"]);
        }
        let (cpu0, opens0, start) = (cpu_ticks(pid), snmp_active_opens(&t.lb), Instant::now());
        let (mut max_sockets, mut sum_sockets, mut samples) = (0, 0, 0);
        while start.elapsed() < WINDOW {
            let n = sockets(pid);
            (max_sockets, sum_sockets, samples) = (max_sockets.max(n), sum_sockets + n, samples + 1);
            std::thread::sleep(Duration::from_millis(50));
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu1 = cpu_ticks(pid);
        let ms = |ticks: u64| ticks as f64 / hz * 1000.0 / secs;
        let (user, sys) = (ms(cpu1.0 - cpu0.0), ms(cpu1.1 - cpu0.1));
        let probes_per_s = (snmp_active_opens(&t.lb) - opens0) as f64 / secs;
        let time_wait = String::from_utf8(t.lb.exec("ss -Htan state time-wait | wc -l").stdout).unwrap();
        println!(
            "{label:>20}: xlb CPU {:.1} ms/s (user {user:.1}, system {sys:.1}), {probes_per_s:.0} connects/s from the node, \
             sockets held by xlb mean {:.1} max {max_sockets}, TIME_WAIT on the node {}",
            user + sys,
            sum_sockets as f64 / samples as f64,
            time_wait.trim()
        );
        xlb.terminate();
    }
}

#[test]
fn all_servers_stopped_fail_open_and_connections_are_still_sent_to_every_backend() {
    let t = Topology::new(3);
    let servers: Vec<Backend> =
        (0..3).map(|k| start_backend(&t.backends[k], &format!("be{}", k + 1))).collect();
    let xlb = XlbProcess::start(&t.lb, &config("type: tcp, rise: 2, fall: 3"));
    drop(servers);
    let not_ready = wait_for(Duration::from_secs(3), || {
        let r = readyz(&t.lb);
        (r.0 == 503).then_some(r)
    });
    assert_eq!(not_ready, Some((503, "no_healthy_backends".into())), "{}", xlb.log());
    assert_eq!(metric(&t.lb, "xlb_health_fail_open "), Some(1.0));
    let packets = |s: &Value| -> Vec<u64> {
        (1..=3)
            .map(|k| {
                let b =
                    s["backends"].as_array().unwrap().iter().find(|b| b["name"] == format!("be{k}")).unwrap();
                b["traffic"]["packets_to_backend"].as_u64().unwrap()
            })
            .collect()
    };
    let before = packets(&status(&t.lb));
    // Every attempt is refused by the backend's kernel, but XDP sends each
    // SYN to one of the three: all stay in the table.
    let (_, failed) = connections(&t, 60);
    assert_eq!(failed, 60, "nothing listens on any backend");
    let moved = wait_for(Duration::from_secs(5), || {
        let now = packets(&status(&t.lb));
        now.iter().zip(&before).all(|(n, b)| n > b).then_some(now)
    });
    assert!(
        moved.is_some(),
        "SYNs reached every backend: before {before:?}, now {:?}",
        packets(&status(&t.lb))
    );
    assert!(counter(&status(&t.lb), "new_flow") >= 60);
    let log = xlb.log();
    assert_eq!(log.matches("no backend passes its health check: failing open").count(), 1, "{log}");
}

/// Passive checks only (no `health_check`): every listed backend is
/// healthy from the start.
fn passive_config(extra: &str) -> String {
    lb_config(3, &format!("shutdown_timeout: 1\npassive_health: {{{extra}}}\n"))
}

/// Waits (bounded) until xlb's log holds `needle`.
fn wait_log(xlb: &XlbProcess, needle: &str, limit: Duration) {
    let found = wait_for(limit, || xlb.log().contains(needle).then_some(()));
    assert!(found.is_some(), "no {needle:?} within {limit:?}:\n{}", xlb.log());
}

/// `n` connection attempts at once from the client, each given `limit` to
/// connect; joined, they say how many connected.
fn concurrent_connects(t: &Topology, n: usize, limit: Duration) -> Vec<std::thread::JoinHandle<bool>> {
    (0..n)
        .map(|_| {
            t.client.spawn(move || {
                let sa: std::net::SocketAddr = url().parse().unwrap();
                std::net::TcpStream::connect_timeout(&sa, limit).is_ok()
            })
        })
        .collect()
}

/// A backend whose namespace drops SYNs to its port (nftables) is taken out
/// by the passive detector alone, from the SYNs it leaves unanswered; the
/// healthy backends' SYN->SYN-ACK latencies are recorded as a histogram;
/// once the drop is gone, the backend comes back after interval x rise
/// (2 s) without a failure and gets new connections again.
#[test]
fn passive_checks_alone_take_out_a_backend_that_drops_syns() {
    let t = Topology::new(3);
    let _servers: Vec<Backend> =
        (0..3).map(|k| start_backend(&t.backends[k], &format!("be{}", k + 1))).collect();
    let mut xlb = XlbProcess::start(&t.lb, &passive_config("syn_timeout_ms: 500, fall: 3"));
    let s = status(&t.lb);
    assert_eq!(s["health_checks"]["type"], "passive", "{s}");
    for k in 1..=3 {
        assert_eq!(backend(&t.lb, &format!("be{k}"))["health"], "healthy", "no probe needed");
    }

    // Healthy backends: every answer is timed.
    let (seen, failed) = connections(&t, 60);
    assert_eq!((failed, seen.len()), (0, 3), "{seen:?}");
    for (name, n) in &seen {
        let b = wait_for(Duration::from_secs(5), || {
            let b = backend(&t.lb, name);
            (b["handshakes"]["answered"].as_u64() >= Some(*n as u64)).then_some(b)
        })
        .unwrap_or_else(|| panic!("{name}'s {n} handshakes not counted: {}", status(&t.lb)));
        let mean = b["handshakes"]["latency_mean_ms"].as_f64().expect("a mean latency");
        assert!(mean > 0.0 && mean < 1000.0, "{b}");
        assert_eq!(
            (b["handshakes"]["refused"].as_u64(), b["handshakes"]["timed_out"].as_u64()),
            (Some(0), Some(0))
        );
        let ip = b["address"].as_str().unwrap().to_string();
        let count = metric(&t.lb, &format!("xlb_backend_syn_ack_latency_count{{backend=\"{ip}\""));
        assert!(count >= Some(*n as f64), "{name}: histogram count {count:?} of {n}");
        let sum = metric(&t.lb, &format!("xlb_backend_syn_ack_latency_sum{{backend=\"{ip}\""));
        assert!(sum.is_some_and(|s| s > 0.0), "{name}: histogram sum {sum:?}");
    }

    // be2 drops every SYN to its server.
    let rules = std::env::temp_dir().join(format!("{}.nft", unique("xn")));
    std::fs::write(
        &rules,
        "table inet xlbtest {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    \
         tcp dport 8080 tcp flags & (syn | ack) == syn drop\n  }\n}\n",
    )
    .unwrap();
    let out = t.backends[1].exec(&format!("nft -f {}", rules.display()));
    let _ = std::fs::remove_file(&rules);
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    let ip2 = backend_ip(2);
    // A third of 45 connections go to be2 and are left unanswered; the
    // verdict comes while they wait (a verdict lasts 2 s from the last
    // failure: the test must not sit out their timeouts first).
    let tries = concurrent_connects(&t, 45, Duration::from_secs(3));
    wait_log(
        &xlb,
        &format!("backend be2 {ip2} unhealthy: passive: no SYN-ACK within 500 ms ("),
        Duration::from_secs(5),
    );
    wait_log(&xlb, &format!("backend removed: be2 {ip2}"), Duration::from_secs(2));
    // Out of the table for new connections at once (for at least 2 s after
    // the sweeps caught up with the verdict, longer than these take).
    let (seen, failed) = connections(&t, 20);
    assert_eq!(failed, 0, "{seen:?}\n{}", xlb.log());
    assert_eq!(seen.get("be2"), None, "{seen:?}");
    let counted = wait_for(Duration::from_secs(3), || {
        (backend(&t.lb, "be2")["handshakes"]["timed_out"].as_u64() >= Some(3)).then_some(())
    });
    assert!(counted.is_some(), "{}", backend(&t.lb, "be2"));
    let connected = tries.into_iter().map(|t| t.join()).filter(|r| matches!(r, Ok(true))).count();
    assert!(connected < 45, "be2 answered SYNs through the drop rule");

    // The drop ends: be2 is cleared after 2 s without a failure (counted
    // once the sweeps reported every SYN from before the verdict) and stays.
    let out = t.backends[1].exec("nft delete table inet xlbtest");
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    wait_log(
        &xlb,
        &format!("backend be2 {ip2} healthy: passive: no failure for 2000 ms (2/2)"),
        Duration::from_secs(10),
    );
    wait_health(&t.lb, "be2", "healthy", Duration::from_secs(3));
    let (seen, failed) = connections(&t, 60);
    assert_eq!(failed, 0, "{seen:?}");
    assert!(seen.get("be2").copied().unwrap_or(0) >= 5, "be2 is back: {seen:?}");
    assert_eq!(backend(&t.lb, "be2")["health"], "healthy");
    assert!(xlb.terminate().success());
}

/// A backend whose server is gone answers SYNs with RSTs: with rst_on_syn
/// (the default) that takes it out; with rst_on_syn: false it does not.
#[test]
fn passive_checks_take_out_a_backend_that_refuses_syns_if_asked_to() {
    let t = Topology::new(3);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let mut xlb = XlbProcess::start(&t.lb, &passive_config("rst_on_syn: false, fall: 2"));
    let (seen, failed) = connections(&t, 30);
    assert!(failed > 0 && !seen.contains_key("be3"), "be3 refuses: {seen:?}");
    let b3 = wait_for(Duration::from_secs(5), || {
        let b = backend(&t.lb, "be3");
        (b["handshakes"]["refused"].as_u64() >= Some(failed as u64)).then_some(b)
    })
    .unwrap_or_else(|| panic!("refusals not counted: {}", status(&t.lb)));
    assert_eq!(b3["health"], "healthy", "rst_on_syn: false: {b3}");
    assert!(xlb.terminate().success());

    let mut xlb = XlbProcess::start(&t.lb, &passive_config("fall: 2"));
    let (_, failed) = connections(&t, 30);
    assert!(failed >= 2, "be3 refused");
    wait_log(
        &xlb,
        &format!("backend be3 {} unhealthy: passive: SYN refused with a RST (", backend_ip(3)),
        Duration::from_secs(5),
    );
    wait_log(&xlb, &format!("backend removed: be3 {}", backend_ip(3)), Duration::from_secs(2));
    let (seen, failed) = connections(&t, 20);
    assert_eq!(failed, 0, "{seen:?}\n{}", xlb.log());
    assert_eq!(seen.get("be3"), None, "{seen:?}");
    assert!(xlb.terminate().success());
}
