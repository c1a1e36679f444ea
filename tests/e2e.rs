//! End to end: the real `xlb` binary on real veth interfaces in network
//! namespaces, real TCP between a client and backends. Every test also
//! checks XLB's own counters, so the kernel's routing cannot pass for XLB
//! (the LB node has no route or listener that could answer on its own).

mod common;

use std::collections::HashMap;
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
    let shape = common::workout::Shape { client: &t.client, lb: &t.lb, listen: LISTEN, backends: 2 };
    shape.two_hundred_concurrent_connections();
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

#[test]
fn five_thousand_sequential_connections_from_one_client() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let _xlb = XlbProcess::start(&t.lb, &config(2));
    let failures =
        t.client.run(|| (0..5000).filter(|_| !http_get(&url(), "/").is_ok_and(|r| r.status == 200)).count());
    assert_eq!(failures, 0, "every one of 5000 short connections succeeded");
    assert!(counter_reaches(&t.lb, "new_flow", 5000) >= 5000);
    let s = status(&t.lb);
    assert_eq!(counter(&s, "drop_nat_exhausted"), 0);
    assert_eq!(counter(&s, "drop_no_flow") + counter(&s, "rst_unknown_flow"), 0);
}

#[test]
fn five_hundred_concurrent_connections() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let _xlb = XlbProcess::start(&t.lb, &config(2));
    let alive = t.client.run(|| {
        let mut conns: Vec<EchoConn> = (0..500)
            .map(|i| EchoConn::open(&url()).unwrap_or_else(|e| panic!("connection {i}: {e}")))
            .collect();
        conns.iter_mut().enumerate().map(|(i, c)| c.ping(&format!("hi {i}")).is_ok()).filter(|ok| *ok).count()
    });
    assert_eq!(alive, 500);
    let s = status(&t.lb);
    assert_eq!(counter(&s, "drop_no_flow") + counter(&s, "rst_unknown_flow"), 0);
}

/// Which backend (1-based) carries the one live connection, from the status API.
fn backend_with_a_connection(lb: &NsRef) -> usize {
    wait_for(Duration::from_secs(5), || {
        let s = status(lb);
        s["backends"].as_array()?.iter().find(|b| b["connections_active"].as_u64() == Some(1)).map(|b| {
            let name = b["name"].as_str().unwrap();
            name.trim_start_matches("be").parse().unwrap()
        })
    })
    .expect("the status API shows the connection on a backend")
}

#[test]
fn sighup_removes_a_backend_without_breaking_its_transfer() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let cfg = config(2);
    let xlb = XlbProcess::start(&t.lb, &cfg);
    let cfg_path = xlb.log.with_file_name("xlb.yaml");

    const SIZE: usize = 4 * 1024 * 1024;
    let transfer = t.client.spawn(|| http_get(&url(), &format!("/slow/{SIZE}")));
    let busy = backend_with_a_connection(&t.lb);
    let keep = 3 - busy;

    // Reload with the busy backend gone.
    let without =
        cfg.lines().filter(|l| !l.contains(&format!("name: be{busy}"))).collect::<Vec<_>>().join("\n");
    std::fs::write(&cfg_path, format!("{without}\n")).unwrap();
    xlb.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(5), || {
        xlb.log().contains(&format!("backend removed: be{busy}")).then_some(())
    })
    .unwrap_or_else(|| panic!("reload applied:\n{}", xlb.log()));

    let answers = t.client.run(|| {
        (0..40).map(|_| String::from_utf8(http_get(&url(), "/").unwrap().body).unwrap()).collect::<Vec<_>>()
    });
    assert!(
        answers.iter().all(|a| a == &format!("backend be{keep}\n")),
        "new connections avoid be{busy}: {answers:?}"
    );
    let body = transfer.join().unwrap().expect("the transfer on the removed backend finishes");
    assert!(body.body == blob(SIZE), "byte-identical");

    // A file that does not validate is refused; the running set stays.
    std::fs::write(&cfg_path, "ports: [}\n").unwrap();
    xlb.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(Duration::from_secs(5), || xlb.log().contains("reload rejected").then_some(()))
        .unwrap_or_else(|| panic!("bad reload logged:\n{}", xlb.log()));
    let after = t.client.run(|| http_get(&url(), "/").map(|r| r.body));
    assert_eq!(after.expect("still serving"), format!("backend be{keep}\n").into_bytes());
}

/// `/metrics` (Prometheus text, read by a real parser) moves with real
/// traffic: connections opened and closed, packets forwarded, bytes per
/// backend (issue #6).
#[test]
fn prometheus_metrics_move_with_traffic() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let mut xlb = XlbProcess::start(&t.lb, &config(2));
    let scrape = |lb: &NsRef| {
        let r = lb.run(|| http_get("127.0.0.1:9090", "/metrics")).expect("/metrics answers");
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body).unwrap();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text")
    };
    // The sum over every series of `name` whose labels include `labels`.
    let sum = |s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]| -> f64 {
        s.samples
            .iter()
            .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let before = scrape(&t.lb);
    assert_eq!(sum(&before, "xlb_ready", &[]), 1.0);
    assert_eq!(sum(&before, "xlb_global_backends_available", &[]), 2.0);
    assert!(sum(&before, "xlb_interface_xdp_mode", &[]) >= 1.0);

    t.client.run(|| {
        for _ in 0..50 {
            assert_eq!(http_get(&url(), "/").expect("request through XLB").status, 200);
        }
    });
    let opened = "xlb_global_connections_opened_total";
    let forwarded = [("action", "forward"), ("reason", "to_backend")];
    // Closed connections are removed (and counted) 10 s after their close.
    let after = wait_for(Duration::from_secs(30), || {
        let s = scrape(&t.lb);
        let moved = sum(&s, opened, &[]) >= sum(&before, opened, &[]) + 50.0
            && sum(&s, "xlb_packets_total", &forwarded)
                >= sum(&before, "xlb_packets_total", &forwarded) + 150.0
            && sum(&s, "xlb_global_connections_closed_total", &[]) >= 50.0;
        moved.then_some(s)
    })
    .unwrap_or_else(|| panic!("metrics did not move:\n{}", xlb.log()));
    for be in ["be1", "be2"] {
        let b = [("backend_name", be)];
        assert!(
            sum(&after, "xlb_ingress_bytes_total", &b) > sum(&before, "xlb_ingress_bytes_total", &b),
            "{be}"
        );
        assert!(
            sum(&after, "xlb_egress_bytes_total", &b) > sum(&before, "xlb_egress_bytes_total", &b),
            "{be}"
        );
        assert!(sum(&after, "xlb_ingress_flows_closed_total", &b) > 0.0, "{be}");
    }
    assert!(xlb.terminate().success(), "{}", xlb.log());
}

#[test]
fn flows_and_backends_show_live_connections() {
    let t = Topology::new(2);
    let _b1 = start_backend(&t.backends[0], "be1");
    let _b2 = start_backend(&t.backends[1], "be2");
    let xlb = XlbProcess::start(&t.lb, &config(2));
    let instance = xlb.instance.clone().unwrap();
    let _conns = t.client.run(|| {
        (0..3)
            .map(|i| {
                let mut c = EchoConn::open(&url()).unwrap();
                c.ping(&format!("x{i}")).unwrap();
                c
            })
            .collect::<Vec<_>>()
    });
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["flows", "--instance", &instance, "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let flows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flows = flows.as_array().unwrap();
    assert_eq!(flows.len(), 3, "{flows:?}");
    for f in flows {
        assert_eq!(f["state"], "established", "{f}");
        assert!(f["client"].as_str().unwrap().starts_with("10.100.0.2:"));
        assert!(f["traffic"]["bytes_to_client"].as_u64().unwrap() > 0);
    }
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["flows", "--instance", &instance])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("3 connections"));

    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", t.lb.path().display()))
        .args([env!("CARGO_BIN_EXE_xlb"), "backends", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let backends: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> =
        backends.as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["be1", "be2"]);
}

/// A connection XLB forgot (idle past orphan_ttl_secs): with `unknown_flow`
/// at its default (rst) the client's next packet is answered with a RST, so
/// the client fails at once and a new connection works; with `drop` it hears
/// nothing and waits.
#[test]
fn a_forgotten_connection_is_reset_at_once_and_the_client_reconnects() {
    for (setting, reset) in [("", true), ("unknown_flow: drop\n", false)] {
        let t = Topology::new(1);
        let _b1 = start_backend(&t.backends[0], "be1");
        let _xlb = XlbProcess::start(&t.lb, &lb_config(1, &format!("orphan_ttl_secs: 1\n{setting}")));
        let (outcome, took) = t.client.run(move || {
            let mut c = EchoConn::open(&url()).expect("connect through XLB");
            c.ping("before").expect("echo through XLB");
            // Idle past the orphan TTL and a sweep or two (1 s apart).
            std::thread::sleep(Duration::from_millis(3500));
            let start = std::time::Instant::now();
            let outcome = c.ping("after");
            (outcome.map_err(|e| e.kind()), start.elapsed())
        });
        let s = status(&t.lb);
        if reset {
            assert_eq!(outcome, Err(std::io::ErrorKind::ConnectionReset), "{setting}");
            assert!(took < Duration::from_secs(1), "reset after {took:?}");
            assert!(counter_reaches(&t.lb, "rst_unknown_flow", 1) >= 1, "{s}");
            t.client.run(move || {
                let mut c = EchoConn::open(&url()).expect("a new connection at once");
                c.ping("again").expect("echo on the new connection");
            });
        } else {
            // The read times out (5 s): nothing came back.
            assert!(outcome.is_err() && took >= Duration::from_secs(4), "{outcome:?} after {took:?}");
            assert_eq!(counter(&s, "rst_unknown_flow"), 0, "{s}");
            assert!(counter_reaches(&t.lb, "drop_no_flow", 1) >= 1, "{s}");
        }
    }
}
