//! One workout for every node shape (tests/shapes.rs, tests/kube_provider.rs):
//! 100 requests answered by every backend, a 10 MB download byte-identical,
//! 200 concurrent connections, and a drain during which, with no other
//! traffic on the node, three new connections are each refused with a RST in
//! under 100 ms. XLB's counters must move.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::*;

/// Where the client connects and which namespaces play which part.
pub struct Shape<'a> {
    pub client: &'a NsRef,
    pub lb: &'a NsRef,
    pub listen: &'a str,
    pub backends: usize,
}

impl Shape<'_> {
    pub fn url(&self) -> String {
        format!("{}:80", self.listen)
    }

    pub fn counter_reaches(&self, name: &str, min: u64) -> u64 {
        let mut last = 0;
        wait_for(Duration::from_secs(5), || {
            last = counter(&status(self.lb), name);
            (last >= min).then_some(())
        });
        last
    }

    pub fn hundred_requests_reach_every_backend(&self) {
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
        // Each backend's SYN-ACKs were timed (folded in by the next sweep).
        let timed = wait_for(Duration::from_secs(5), || {
            let s = status(self.lb);
            let per: Vec<u64> = s["backends"]
                .as_array()?
                .iter()
                .filter_map(|b| b["handshakes"]["answered"].as_u64().filter(|&n| n > 0))
                .collect();
            (per.iter().sum::<u64>() >= 100 && per.len() >= self.backends).then_some(per)
        });
        assert!(timed.is_some(), "SYN-ACKs timed per backend: {}", status(self.lb));
    }

    pub fn ten_megabytes_arrive_byte_identical(&self) {
        const SIZE: usize = 10 * 1024 * 1024;
        // Rewritten by XDP: sent on by it, or (whole GSO/GRO aggregates seen
        // in generic mode) handed to the kernel's forwarding.
        let translated = |s: &serde_json::Value| counter(s, "fwd_to_client") + counter(s, "pass_aggregate");
        let before = translated(&status(self.lb));
        let url = self.url();
        let body = self.client.run(move || http_get(&url, &format!("/blob/{SIZE}")).expect("download").body);
        assert_eq!(body.len(), SIZE);
        assert!(body == blob(SIZE), "payload differs from what the backend sent");
        // At least one packet per 64 KiB (senders with TSO hand over 64 KiB at once).
        let moved =
            wait_for(Duration::from_secs(5), || (translated(&status(self.lb)) >= before + 160).then_some(()));
        assert!(moved.is_some(), "XDP translated the download: {}", status(self.lb)["counters"]);
    }

    pub fn two_hundred_concurrent_connections(&self) {
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
    pub fn drain_refuses_with_rst(&self, xlb: &mut XlbProcess) {
        let (pid, log) = (xlb.pid(), xlb.log.clone());
        self.drain_refuses_with_rst_of(pid, || xlb.wait(Duration::from_secs(15)), &log);
    }

    /// The drain of the xlb process `pid`; `exit` waits for it to end.
    pub fn drain_refuses_with_rst_of(
        &self,
        pid: nix::unistd::Pid,
        exit: impl FnOnce() -> Option<std::process::ExitStatus>,
        log: &std::path::Path,
    ) {
        let rst_before = counter(&status(self.lb), "drain_rst");
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
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
        let exit = exit().expect("xlb exits after shutdown_timeout");
        assert!(exit.success(), "{}", std::fs::read_to_string(log).unwrap_or_default());
    }

    pub fn workout(&self, xlb: &mut XlbProcess) {
        self.hundred_requests_reach_every_backend();
        self.ten_megabytes_arrive_byte_identical();
        self.two_hundred_concurrent_connections();
        self.drain_refuses_with_rst(xlb);
    }
}
