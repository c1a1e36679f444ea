//! Connection per request at full speed, the backend closing first (so it,
//! not the client, holds each 4-tuple in TIME_WAIT): every connection must
//! succeed at the first SYN. A NAT port handed to a new client tuple while the
//! backend still holds it in TIME_WAIT is answered with a stale ACK, and the
//! client retransmits its SYN a second later: the client namespace's own TCP
//! counters (TCPSynRetrans) catch that. XLB's counters prove it did the NAT.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const CONNECTIONS: usize = 20_000;
const THREADS: usize = 8;

/// An HTTP/1.0 server on :8080 that answers and closes first, as a server
/// with `Connection: close` does; remembers the peer addresses it saw (the
/// SNAT addresses). Stops on drop.
struct Closer {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<std::collections::BTreeSet<Ipv4Addr>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn start_closer(ns: &NsRef) -> Closer {
    let stop = Arc::new(AtomicBool::new(false));
    let peers = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let listener = ns.run(|| {
        let l = std::net::TcpListener::bind("0.0.0.0:8080").expect("bind backend");
        // Accept wakes up to see `stop`.
        let tv = nix::sys::time::TimeVal::new(0, 100_000);
        nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
        l
    });
    let threads = (0..4)
        .map(|_| {
            let (l, stop, peers) = (listener.try_clone().unwrap(), stop.clone(), peers.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut c, peer)) = l.accept() else { continue };
                    if let std::net::SocketAddr::V4(p) = peer {
                        peers.lock().unwrap().insert(*p.ip());
                    }
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut req = Vec::new();
                    let mut buf = [0u8; 512];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf) {
                            Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                    }
                    let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                    // Dropped here: the server's FIN comes first.
                }
            })
        })
        .collect();
    Closer { stop, peers, threads }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One request on a new connection from `src` (port chosen by the kernel).
fn request(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<()> {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0)))?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst))?;
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    if !got.ends_with(b"ok\n") {
        return Err(std::io::Error::other(format!("bad answer {:?}", String::from_utf8_lossy(&got))));
    }
    Ok(())
}

/// A counter of the namespace's TCP stack (/proc/net/netstat, TcpExt).
fn tcp_ext(ns: &NsRef, name: &str) -> u64 {
    let out = String::from_utf8(ns.exec("cat /proc/net/netstat").stdout).unwrap();
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (names, values) = (lines[0], lines[1]);
    let i = names.split_whitespace().position(|n| n == name).expect("TcpExt counter");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Where the test runs: the client's, XLB's and the two backends'
/// namespaces, and the listen address.
struct Node<'a> {
    client: &'a NsRef,
    lb: &'a NsRef,
    backends: [&'a NsRef; 2],
    listen: Ipv4Addr,
}

/// Half of CONNECTIONS requests (`half` 0 or 1) from `clients` (round robin)
/// over THREADS threads; returns how many failed, with the first error.
fn run_requests(n: &Node, clients: Vec<Ipv4Addr>, half: usize) -> (usize, Option<String>) {
    let dst = SocketAddrV4::new(n.listen, 80);
    let clients = Arc::new(clients);
    let workers: Vec<_> = (0..THREADS)
        .map(|w| {
            let clients = clients.clone();
            n.client.spawn(move || {
                let (mut failed, mut first) = (0, None);
                for i in (half * CONNECTIONS / 2 + w..(half + 1) * CONNECTIONS / 2).step_by(THREADS) {
                    if let Err(e) = request(clients[i % clients.len()], dst) {
                        failed += 1;
                        first.get_or_insert(format!("request {i}: {e}"));
                    }
                }
                (failed, first)
            })
        })
        .collect();
    workers.into_iter().map(|h| h.join().unwrap()).fold((0, None), |(n, e), (m, f)| (n + m, e.or(f)))
}

/// Every TcpExt and Tcp counter of the namespace (for a failure's message).
fn tcp_all(ns: &NsRef) -> std::collections::BTreeMap<String, i64> {
    let mut out = std::collections::BTreeMap::new();
    for file in ["/proc/net/netstat", "/proc/net/snmp"] {
        let text = String::from_utf8(ns.exec(&format!("cat {file}")).stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let (names, values) = (pair[0].split_whitespace(), pair[1].split_whitespace());
            let proto = pair[0].split(':').next().unwrap_or("");
            if proto != "TcpExt" && proto != "Tcp" {
                continue;
            }
            for (n, v) in names.zip(values).skip(1) {
                out.insert(format!("{proto}.{n}"), v.parse().unwrap_or(0));
            }
        }
    }
    out
}

/// What moved between two tcp_all readings.
fn moved(a: &std::collections::BTreeMap<String, i64>, b: &std::collections::BTreeMap<String, i64>) -> String {
    b.iter()
        .filter(|(k, v)| a.get(*k) != Some(v) && !k.contains("CurrEstab"))
        .map(|(k, v)| format!("{k}+{}", v - a.get(k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs the requests through a fresh XLB with `config` and checks them;
/// returns the servers, XLB's status document and its log.
fn check(n: &Node, clients: Vec<Ipv4Addr>, config: &str) -> ((Closer, Closer), serde_json::Value, String) {
    let closers = (start_closer(n.backends[0]), start_closer(n.backends[1]));
    // Closed pairs that hold no TIME_WAIT go after 1 s, not 10: the run
    // outlasts that, so only the tombstones keep ports off TIME_WAIT.
    let xlb = XlbProcess::start_with_env(n.lb, config, &[("XLB_CLOSED_TTL_SECS", "1")]);
    let retrans = tcp_ext(n.client, "TCPSynRetrans");
    let nss = [n.client, n.backends[0], n.backends[1]];
    let before: Vec<_> = nss.iter().map(|n| tcp_all(n)).collect();
    // Two halves, 3 s apart: by the second, the first half's pairs are past
    // the closed grace period, and only their tombstones keep the second
    // half's new tuples off the ports the backends hold in TIME_WAIT.
    let (mut failed, mut first) = run_requests(n, clients.clone(), 0);
    std::thread::sleep(Duration::from_secs(3));
    let (f2, e2) = run_requests(n, clients, 1);
    failed += f2;
    first = first.or(e2);
    let retrans = tcp_ext(n.client, "TCPSynRetrans") - retrans;
    let tcp: Vec<String> = nss.iter().zip(&before).map(|(n, b)| moved(b, &tcp_all(n))).collect();
    // The status document is refreshed every second.
    let s = wait_for(Duration::from_secs(5), || {
        let s = status(n.lb);
        (counter(&s, "new_flow") >= CONNECTIONS as u64).then_some(s)
    })
    .unwrap_or_else(|| status(n.lb));
    let counters = &s["counters"];
    assert_eq!(failed, 0, "{failed} of {CONNECTIONS} requests failed; first: {first:?}");
    assert_eq!(retrans, 0, "the client retransmitted {retrans} SYNs: a handshake was lost; {counters}; TCP client/be1/be2: {tcp:#?}");
    assert!(counter(&s, "new_flow") >= CONNECTIONS as u64, "XDP opened every connection: {counters}");
    assert!(counter(&s, "fwd_to_client") >= 2 * CONNECTIONS as u64, "XDP translated the replies");
    for c in ["drop_nat_exhausted", "drop_ct_full", "drop_no_flow", "rst_unknown_flow"] {
        assert_eq!(counter(&s, c), 0, "{c}");
    }
    (closers, s, xlb.log())
}

fn two_armed(t: &Topology) -> Node<'_> {
    Node {
        client: &t.client,
        lb: &t.lb,
        backends: [&t.backends[0], &t.backends[1]],
        listen: LISTEN.parse().unwrap(),
    }
}

#[test]
fn twenty_thousand_short_connections_from_one_client_lose_no_handshake() {
    let t = Topology::new(2);
    let n = two_armed(&t);
    let (closers, s, _) =
        check(&n, vec![Ipv4Addr::new(10, 100, 0, 2)], &lb_config(2, "shutdown_timeout: 1\n"));
    // The client's kernel reuses its ports within the run: those tuples come
    // back to their closed pair, reopened in place on the same NAT port.
    assert!(counter(&s, "ct_reopened") > 0, "no tuple came back: {s}");
    assert_eq!(closers.0.peers.lock().unwrap().len(), 1, "one SNAT address");
}

#[test]
fn twenty_thousand_short_connections_from_200_clients_lose_no_handshake() {
    let t = Topology::new(2);
    let clients: Vec<Ipv4Addr> = (30..230).map(|i| Ipv4Addr::new(10, 100, 0, i)).collect();
    for c in &clients {
        t.client.exec(&format!("ip addr add {c}/24 dev eth0"));
    }
    let pool: Vec<String> = (1..=4).map(|i| format!("10.99.0.{i}")).collect();
    for a in &pool {
        t.lb.exec(&format!("ip addr add {a}/32 dev lo"));
    }
    // The pool sustains 4 x 22,528 ports / 70 s = 1,287 new tuples per
    // second per backend: XLB says so, and warns about a higher rate.
    let extra =
        format!("shutdown_timeout: 1\nsnat_ips: [{}]\nexpected_connection_rate: 5000\n", pool.join(", "));
    let (closers, _, log) = check(&two_armed(&t), clients, &lb_config(2, &extra));
    assert!(log.contains("= 1287 new connections per second per backend"), "{log}");
    assert!(log.contains("expected_connection_rate 5000/s per backend exceeds"), "{log}");
    // The pool is used: clients spread over its addresses by hash.
    for c in [&closers.0, &closers.1] {
        let peers = c.peers.lock().unwrap();
        assert!(peers.len() >= 3, "SNAT addresses seen by a backend: {peers:?}");
        assert!(peers.iter().all(|p| pool.contains(&p.to_string())), "{peers:?}");
    }
}

/// One-armed (one bridge, XLB with a single interface in generic mode, its
/// bridge port without GRO or XDP), 200 client addresses on the same segment
/// and XLB's one SNAT address: 10,000 new tuples per backend in a few
/// seconds stay within one address's ports.
#[test]
fn twenty_thousand_short_connections_one_armed_from_200_clients_lose_no_handshake() {
    let t = OneArmed::new(2, false);
    let clients: Vec<Ipv4Addr> = (30..230).map(|i| Ipv4Addr::new(10, 200, 0, i)).collect();
    for c in &clients {
        t.client.exec(&format!("ip addr add {c}/24 dev eth0"));
    }
    let n = Node {
        client: &t.client,
        lb: &t.lb,
        backends: [&t.backends[0], &t.backends[1]],
        listen: ONE_ARMED_LISTEN.parse().unwrap(),
    };
    let (_, s, log) = check(&n, clients, &t.config(2, "shutdown_timeout: 1\n"));
    assert!(!log.contains("exceeds what the NAT ports sustain"), "no rate stated, no warning: {log}");
    let ifs = s["interfaces"].as_array().cloned().unwrap_or_default();
    assert_eq!(ifs.len(), 1, "one interface: {ifs:?}");
}
