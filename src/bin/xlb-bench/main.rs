//! `xlb-bench`: the in-process half of `make bench` (bench/run.sh drives the
//! traffic half and calls this). Everything runs as root inside one network
//! namespace this process creates and removes (also on Ctrl-C).
//!
//! `xlb-bench dataplane --out FILE [--quick]` measures, through the library:
//! - the XDP program's kernel-timed cost per packet (BPF_PROG_TEST_RUN) for a
//!   new-connection SYN, an established client->backend packet, a
//!   backend->client reply, a passed packet and a non-SYN without a flow, with
//!   the conntrack table at 1%, 50% and 90% of its capacity;
//! - the scale test: 1,000,000 connections opened by SYNs through the real
//!   program, the maps' memory, lookups at that size, a full sweep and a full
//!   expiry (GC);
//! - the control plane: a backend-set change to the data plane for 10, 1,000
//!   and 10,000 backends (diff + Maglev build + map write), and the cost of
//!   reading the counters.
//!
//! `xlb-bench connect --target IP:PORT ... --sources A.B.C.X-Y --conns N
//! --secs S` is the load generator of the bench's `many` mode: connection
//! per request from many client addresses (load.rs).
//!
//! `xlb-bench flood --kind syn|rst|ttl ...` sends forged segments as fast as
//! one core can (flood.rs): the attack tests' SYN, RST and TTL floods.
//! `xlb-bench fill-pinned --instance NAME ...` writes a million connections
//! (or any number) straight into a running instance's pinned conntrack map,
//! live, closed, idle and half-finished ones (fill.rs): the memory test's
//! and the sweep's scale workload.
//!
//! `xlb-bench hold-stats --secs N` keeps the kernel's BPF run-time statistics
//! on (BPF_ENABLE_STATS, reference counted: they turn off when this exits)
//! for at most N seconds, so the traffic rounds can read the attached
//! program's real run time per packet from `bpftool prog show`.
//!
//! Two timing modes, because BPF_PROG_TEST_RUN with `repeat` runs the program
//! again on the packet *it already rewrote*:
//! - single: one run per call (`repeat` = 1) on a fresh, genuine packet; the
//!   kernel's time includes a fixed test-run overhead (estimated and
//!   subtracted: single minus loop of the same unmodified packet) and the
//!   entry comes from a cold cache, as at scale;
//! - loop: `repeat` = 250 on packets whose rewrite is their own input (an
//!   established/reply entry that maps a tuple onto itself; for SYNs a chain
//!   where each rewritten SYN is the next new connection), so every run takes
//!   the full path with hot caches. The TTL bounds the repeat (each run
//!   decrements it). Every loop checks the counters: each run must have taken
//!   the intended path, or the bench fails.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde_json::{json, Value};
use xlb::balancer::BackendSet;
use xlb::dataplane::{Counter, Counters, Dataplane, Flow, FlowKey, GcPolicy, LoadOptions, Service};
use xlb::provider::Backend;

mod fill;
mod flood;
mod load;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const LISTEN: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const LOCAL_PORT: u16 = 80;
const REMOTE_PORT: u16 = 8080;
/// XLB's default nat_port_range.
const NAT_PORTS: (u16, u16) = (10240, 32767);
/// Clients of the filled table: 10.0.1.1 .. 10.0.1.250, each with a neighbour.
const CLIENTS: u32 = 250;
/// Backends on the second interface: 10.1.0.10 .. (each with a neighbour).
const BACKENDS: u32 = 100;
const MAGLEV: u32 = 65537;
/// Loop mode: the listen address is a backend, the SNAT address a client-side
/// host, so a rewritten packet is again one the program handles.
const LOOP_LISTEN: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
const LOOP_SNAT: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const LOOP_REPEAT: u32 = 250;
const PAYLOAD: usize = 64;

static STOP: AtomicBool = AtomicBool::new(false);

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { signal_hook::low_level::register(sig, || STOP.store(true, Ordering::Relaxed)) };
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let res = match args.first().map(String::as_str) {
        Some("dataplane") => dataplane_cmd(&args[1..]),
        Some("hold-stats") => hold_stats(&args[1..]),
        Some("spin") => spin_cmd(&args[1..]),
        Some("connect") => load::connect_cmd(&args[1..]),
        Some("flood") => flood::flood_cmd(&args[1..]),
        Some("fill-pinned") => fill::fill_pinned_cmd(&args[1..]),
        _ => {
            eprintln!(
                "usage: xlb-bench dataplane --out FILE [--quick]\n       xlb-bench hold-stats --secs N\n       \
                 xlb-bench spin --case established|reply|syn|synchain|pass --secs N   (for perf record -p)\n       \
                 {}\n       {}\n       {}",
                load::USAGE,
                flood::USAGE,
                fill::USAGE
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn flag_value(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Keeps BPF run-time stats on until stdin closes, a signal, or `--secs`.
fn hold_stats(args: &[String]) -> Result<()> {
    let secs: u64 = flag_value(args, "--secs").unwrap_or_else(|| "900".into()).parse()?;
    // SAFETY: a plain syscall wrapper; the fd it returns is ours.
    let fd = unsafe { libbpf_rs::libbpf_sys::bpf_enable_stats(libbpf_rs::libbpf_sys::BPF_STATS_RUN_TIME) };
    ensure!(fd >= 0, "BPF_ENABLE_STATS failed: {}", std::io::Error::from_raw_os_error(-fd));
    println!("stats on");
    std::io::stdout().flush()?;
    let start = Instant::now();
    while !STOP.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Closing the fd BPF_ENABLE_STATS gave us turns the stats off.
    let _ = nix::unistd::close(fd);
    Ok(())
}

// ---------------------------------------------------------------- namespace

/// A network namespace of this process, removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Result<Netns> {
        let name = format!("xlbbench-dp{}", std::process::id());
        sh(&format!("ip netns add {name}"))?;
        let ns = Netns { name };
        let f = std::fs::File::open(format!("/run/netns/{}", ns.name))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn sh(cmd: &str) -> Result<()> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    ensure!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn client_addr(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 1, (1 + k % CLIENTS) as u8)
}

fn backend_addr(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, (10 + k) as u8)
}

fn mac(last: u32, iface: u8) -> String {
    format!("02:00:00:{iface:02x}:{:02x}:{:02x}", last >> 8, last & 0xff)
}

/// g0 (10.0.0.1/16): clients; g1 (10.1.0.1/16): backends. Static neighbours
/// so every FIB lookup succeeds, forwarding on (bpf_fib_lookup needs it).
fn setup_namespace(ns: &Netns) -> Result<(u32, u32)> {
    let lb_mac = LB_MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let mut batch = String::new();
    writeln!(batch, "link set lo up")?;
    writeln!(batch, "link add g0 address {lb_mac} type veth peer name g0p")?;
    writeln!(batch, "link add g1 type veth peer name g1p")?;
    writeln!(batch, "addr add 10.0.0.1/16 dev g0")?;
    writeln!(batch, "addr add 10.1.0.1/16 dev g1")?;
    for d in ["g0", "g0p", "g1", "g1p"] {
        writeln!(batch, "link set {d} up")?;
    }
    for k in 0..CLIENTS {
        writeln!(batch, "neigh add {} lladdr {} dev g0 nud permanent", client_addr(k), mac(k, 0))?;
    }
    for (i, a) in ["10.0.2.1", "10.0.2.2", "10.0.2.3", "10.0.3.1"].iter().enumerate() {
        writeln!(batch, "neigh add {a} lladdr {} dev g0 nud permanent", mac(1000 + i as u32, 0))?;
    }
    for k in 0..BACKENDS {
        writeln!(batch, "neigh add {} lladdr {} dev g1 nud permanent", backend_addr(k), mac(k, 1))?;
    }
    let path = std::env::temp_dir().join(format!("xlbbench-dp{}.ip", std::process::id()));
    std::fs::write(&path, batch)?;
    let r = sh(&format!("ip -n {} -batch {}", ns.name, path.display()));
    let _ = std::fs::remove_file(&path);
    r?;
    for s in ["all", "default", "lo", "g0", "g1"] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{s}/forwarding"), "1")?;
    }
    let g0 = nix::net::if_::if_nametoindex("g0")?;
    let g1 = nix::net::if_::if_nametoindex("g1")?;
    Ok((g0, g1))
}

// ------------------------------------------------------------------ frames

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn csum_add(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from(c[0]) << 8 };
        sum += u32::from(w);
    }
    sum
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// An Ethernet/IPv4/TCP frame with valid checksums.
fn tcp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, payload: usize, ttl: u8) -> Vec<u8> {
    let tot = 20 + 20 + payload;
    let mut f = Vec::with_capacity(14 + tot);
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(tot as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = ttl;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.0.octets());
    ip[16..20].copy_from_slice(&dst.0.octets());
    let c = csum_fold(csum_add(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = vec![0u8; 20 + payload];
    tcp[0..2].copy_from_slice(&src.1.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.1.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    if flags & ACK != 0 {
        tcp[8..12].copy_from_slice(&7777u32.to_be_bytes());
    }
    tcp[12] = 0x50;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    for (i, b) in tcp[20..].iter_mut().enumerate() {
        *b = b'a' + (i % 26) as u8;
    }
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.0.octets());
    pseudo.extend_from_slice(&dst.0.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((20 + payload) as u16).to_be_bytes());
    let c = csum_fold(csum_add(&tcp, csum_add(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// The i-th client of the fill: 250 addresses, ports from 1024 upwards.
fn fill_client(i: u32) -> (Ipv4Addr, u16) {
    (client_addr(i), 1024 + (i / CLIENTS) as u16)
}

// ------------------------------------------------------------------- stats

/// Percentiles of a sample (nanoseconds).
fn summary(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    json!({"n": v.len(), "p10": q(0.10), "median": q(0.5), "p90": q(0.9), "p99": q(0.99),
           "mean": v.iter().sum::<f64>() / v.len() as f64})
}

fn median(v: &Value) -> f64 {
    v["median"].as_f64().unwrap_or(f64::NAN)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// -------------------------------------------------------------- the bench

struct Bench {
    dp: Dataplane,
    ct: MapHandle,
    capacity: u32,
    /// Next fill index (clients are fill_client(i)).
    next: u32,
    /// Pairs removed by the bench itself (to make room for probes).
    removed: u64,
    quick: bool,
    rng: Rng,
    /// SYN chains started so far (each from its own client port).
    chains: u32,
}

fn normal_service() -> Service {
    Service {
        listen: LISTEN,
        snat: vec![LISTEN],
        nat_ports: NAT_PORTS,
        ports: vec![(LOCAL_PORT, REMOTE_PORT)],
        vlans: vec![],
        unknown_flow_rst: false,
        rate_limits: Default::default(),
        syn_proxy: xlb::config::SynProxy::Off,
    }
}

fn loop_service() -> Service {
    Service {
        listen: LOOP_LISTEN,
        snat: vec![LOOP_SNAT],
        nat_ports: NAT_PORTS,
        ports: vec![(LOCAL_PORT, LOCAL_PORT)],
        vlans: vec![],
        unknown_flow_rst: false,
        rate_limits: Default::default(),
        syn_proxy: xlb::config::SynProxy::Off,
    }
}

/// A maglev table over `backends` (the balancer's own builder).
fn table_for(backends: &[Ipv4Addr], size: u32) -> Vec<Option<(Ipv4Addr, u32)>> {
    let list: Vec<Backend> = backends
        .iter()
        .enumerate()
        .map(|(i, a)| Backend { name: format!("be{i}"), addr: *a, weight: 1 })
        .collect();
    let mut set = BackendSet::new(size);
    set.update(list).map(|(t, _)| t).unwrap_or_else(|| vec![None; size as usize])
}

/// This process's conntrack map: the newest map named "conntrack" among
/// our own file descriptors (the library keeps the skeleton private).
fn find_conntrack() -> Result<MapHandle> {
    let mut best: Option<(u32, MapHandle)> = None;
    for e in std::fs::read_dir("/proc/self/fd")? {
        let e = e?;
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        if target.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", e.file_name().to_string_lossy()))
            .unwrap_or_default();
        let Some(id) =
            info.lines().find_map(|l| l.strip_prefix("map_id:")).and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(h) = MapHandle::from_map_id(id) else { continue };
        if h.name() == "conntrack" && best.as_ref().is_none_or(|(b, _)| id > *b) {
            best = Some((id, h));
        }
    }
    best.map(|(_, h)| h).context("the conntrack map is not among this process's fds")
}

/// `memlock` of a map (the kernel's own accounting of its memory).
fn memlock(h: &MapHandle) -> u64 {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(h));
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Slab + per-CPU memory of the whole machine (kB), a cross-check of memlock.
fn kernel_mem_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get("Slab:") + get("Percpu:")
}

/// The bytes of an ABI value, as map syscalls take them.
fn raw<T: plain::Plain>(v: &T) -> &[u8] {
    // SAFETY: the skeleton's ABI types are Plain (plain integers, explicit
    // padding), as the library declares.
    unsafe { plain::as_bytes(v) }
}

fn key_bytes(k: &FlowKey) -> &[u8] {
    raw(k)
}

fn key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> FlowKey {
    FlowKey {
        saddr: u32::from_ne_bytes(src.0.octets()),
        daddr: u32::from_ne_bytes(dst.0.octets()),
        sport: src.1.to_be(),
        dport: dst.1.to_be(),
        proto: 6,
        pad: [0; 3],
    }
}

/// An entry that rewrites `tuple` onto itself (loop mode).
fn self_map(tuple: &FlowKey, dir: u8) -> Flow {
    let now = xlb::dataplane::now_ns();
    Flow {
        nat_saddr: tuple.saddr,
        nat_daddr: tuple.daddr,
        nat_sport: tuple.sport,
        nat_dport: tuple.dport,
        created_ns: now,
        last_seen_ns: now,
        dir,
        ..Default::default()
    }
}

/// The counters that moved, by name (for checks and error messages).
fn moved(d: &Counters) -> Vec<(&'static str, u64)> {
    d.iter().filter(|(_, v)| *v > 0).collect()
}

impl Bench {
    fn counters(&self) -> Result<Counters> {
        self.dp.counters()
    }

    /// Live connections: SYNs that opened one, minus pairs the bench removed.
    fn connections(&self) -> Result<u64> {
        Ok(self.counters()?.get(Counter::XLB_CNT_NEW_FLOW) - self.removed)
    }

    /// Removes the SYN chains' connections (they share one NAT port range,
    /// which must stay nearly empty for the next chain).
    fn remove_chains(&mut self) -> Result<u64> {
        let l = u32::from_ne_bytes(LOOP_LISTEN.octets());
        let mut pairs = 0;
        for (k, f) in dump(&self.ct)? {
            if f.dir == 1 && k.daddr == l {
                self.ct.delete(key_bytes(&k))?;
                let _ = self.ct.delete(key_bytes(&xlb::dataplane::peer_key(&f)));
                pairs += 1;
            }
        }
        self.removed += pairs;
        Ok(pairs)
    }

    /// Opens connections with SYNs through the program until `target`.
    fn fill_to(&mut self, target: u64) -> Result<Value> {
        let start = Instant::now();
        let before = self.connections()?;
        let mut failed = 0u64;
        let mut n = before;
        let mut times = Vec::new();
        let mut guard = 0u64;
        while n < target {
            check_stop()?;
            let batch = (target - n).min(4096);
            for _ in 0..batch {
                let f = tcp_frame(fill_client(self.next), (LISTEN, LOCAL_PORT), SYN, 0, 64);
                self.next += 1;
                let (act, d) = self.dp.time_run(&f, 1)?;
                if act != XDP_REDIRECT {
                    failed += 1;
                }
                if times.len() < 200_000 {
                    times.push(d.as_nanos() as f64);
                }
            }
            n = self.connections()?;
            guard += 1;
            ensure!(guard < 10_000_000 / 4096 + 100, "filling does not progress");
            ensure!(failed < 1000, "{failed} SYNs failed while filling: {:?}", moved(&self.counters()?));
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(json!({"opened": n - before, "failed_syns": failed, "seconds": secs,
                  "syns_per_sec": (n - before) as f64 / secs.max(1e-9)}))
    }

    /// One run per call on each frame; kernel time per run (ns).
    fn single(&self, what: &str, frames: &[Vec<u8>], want: u32, want_counter: Counter) -> Result<Value> {
        let before = self.counters()?;
        let mut t = Vec::with_capacity(frames.len());
        for (i, f) in frames.iter().enumerate() {
            if i % 1024 == 0 {
                check_stop()?;
            }
            let (act, d) = self.dp.time_run(f, 1)?;
            ensure!(act == want, "{what}: a single run returned action {act}, expected {want}");
            t.push(d.as_nanos() as f64);
        }
        let delta = self.counters()?.since(&before);
        ensure!(
            delta.get(want_counter) == frames.len() as u64,
            "{what}: expected {} x {}, counters moved {:?}",
            frames.len(),
            xlb::dataplane::counter_name(want_counter),
            moved(&delta)
        );
        Ok(summary(t))
    }

    /// `calls` runs of `repeat` each on frames from `make(call)`; kernel
    /// mean per run. The counters must show calls*repeat runs on `path`.
    fn looped(
        &self,
        calls: u32,
        repeat: u32,
        what: &str,
        mut make: impl FnMut(u32) -> Vec<u8>,
        want: u32,
        path: &[Counter],
    ) -> Result<Value> {
        let before = self.counters()?;
        let mut t = Vec::with_capacity(calls as usize);
        for c in 0..calls {
            check_stop()?;
            let (act, d) = self.dp.time_run(&make(c), repeat)?;
            ensure!(act == want, "{what}: a loop run returned action {act}, expected {want}");
            t.push(d.as_nanos() as f64);
        }
        let delta = self.counters()?.since(&before);
        let runs = u64::from(calls) * u64::from(repeat);
        for c in path {
            ensure!(
                delta.get(*c) == runs,
                "{what}: expected {runs} x {}, counters moved {:?} (the packet left the intended path)",
                xlb::dataplane::counter_name(*c),
                moved(&delta)
            );
        }
        Ok(summary(t))
    }

    /// Every timing at the current fill.
    fn measure_level(&mut self, label: &str, syns: bool) -> Result<Value> {
        let n_single = if self.quick { 2000 } else { 20_000 };
        let loop_calls = if self.quick { 40 } else { 400 };
        let conns = self.connections()?;
        let mut out = json!({"label": label, "connections": conns,
                             "fill": conns as f64 / f64::from(self.capacity),
                             "conntrack_memlock_bytes": memlock(&self.ct)});

        // The whole table read correctly (batches until ENOENT), then what
        // the library reads: `flows()` (xlb flows, status) and the no-op
        // sweep the control plane runs every second. Their counts are
        // compared with the truth; all three leave the caches cold for the
        // single runs below.
        let t = Instant::now();
        let all = dump(&self.ct)?;
        out["dump_ms"] = json!(t.elapsed().as_secs_f64() * 1e3);
        out["entries"] = json!(all.len());
        let t = Instant::now();
        let lib_entries = self.dp.flows()?.len();
        out["library_flows_ms"] = json!(t.elapsed().as_secs_f64() * 1e3);
        out["library_flows_entries"] = json!(lib_entries);
        let fwd: Vec<&(FlowKey, Flow)> = all.iter().filter(|(_, f)| f.dir == 1).collect();
        ensure!(fwd.len() as u64 == conns, "the table holds {} connections, expected {conns}", fwd.len());
        // Sample the service's own connections (not the loop runs' chains).
        let listen = u32::from_ne_bytes(LISTEN.octets());
        let fwd: Vec<&(FlowKey, Flow)> = fwd.into_iter().filter(|(k, _)| k.daddr == listen).collect();
        ensure!(!fwd.is_empty(), "no connections to sample");
        let mut est = Vec::with_capacity(n_single);
        let mut rep = Vec::with_capacity(n_single);
        for _ in 0..n_single {
            let (k, f) = fwd[self.rng.below(fwd.len())];
            est.push(tcp_frame(tuple(k.saddr, k.sport), tuple(k.daddr, k.dport), ACK | PSH, PAYLOAD, 64));
            rep.push(tcp_frame(
                tuple(f.nat_daddr, f.nat_dport),
                tuple(f.nat_saddr, f.nat_sport),
                ACK | PSH,
                PAYLOAD,
                64,
            ));
        }
        let sample = fwd[0].0;
        drop(fwd);
        drop(all);
        let policy = GcPolicy {
            now_ns: xlb::dataplane::now_ns(),
            idle_ns: u64::MAX / 2,
            closed_ns: u64::MAX / 2,
            tombstone_ns: u64::MAX / 2,
            half_open_ns: u64::MAX / 2,
            unanswered_created: None,
        };
        let t = Instant::now();
        let gc = self.dp.expire_flows(&policy)?;
        out["sweep_ms"] = json!(t.elapsed().as_secs_f64() * 1e3);
        out["sweep_saw_connections"] = json!(gc.active);

        // single runs
        let mut single = json!({});
        single["established"] =
            self.single("single established", &est, XDP_REDIRECT, Counter::XLB_CNT_FWD_TO_BACKEND)?;
        single["reply"] = self.single("single reply", &rep, XDP_REDIRECT, Counter::XLB_CNT_FWD_TO_CLIENT)?;
        let pass = vec![tcp_frame((client_addr(0), 5555), (LISTEN, 22), ACK, PAYLOAD, 64); n_single];
        single["pass"] = self.single("single pass", &pass, XDP_PASS, Counter::XLB_CNT_PASS_NOT_OURS)?;
        let noflow: Vec<_> = (0..n_single)
            .map(|i| tcp_frame((Ipv4Addr::new(10, 0, 3, 1), 1024 + i as u16), (LISTEN, 80), ACK, PAYLOAD, 64))
            .collect();
        single["no_flow"] =
            self.single("single no_flow", &noflow, XDP_DROP, Counter::XLB_CNT_DROP_NO_FLOW)?;
        if syns {
            let frames: Vec<_> = (0..n_single as u32)
                .map(|i| tcp_frame(fill_client(self.next + i), (LISTEN, LOCAL_PORT), SYN, 0, 64))
                .collect();
            self.next += n_single as u32;
            single["syn"] = self.single("single syn", &frames, XDP_REDIRECT, Counter::XLB_CNT_NEW_FLOW)?;
        }

        // loop runs: unmodified packets first, on the normal service
        let mut lp = json!({});
        lp["pass"] = self.looped(
            loop_calls,
            10_000,
            "loop pass",
            |_| tcp_frame((client_addr(0), 5555), (LISTEN, 22), ACK, PAYLOAD, 64),
            XDP_PASS,
            &[Counter::XLB_CNT_PASS_NOT_OURS],
        )?;
        lp["no_flow"] = self.looped(
            loop_calls,
            10_000,
            "loop no_flow",
            |_| tcp_frame((Ipv4Addr::new(10, 0, 3, 1), 999), (LISTEN, 80), ACK, PAYLOAD, 64),
            XDP_DROP,
            &[Counter::XLB_CNT_DROP_NO_FLOW],
        )?;

        // then the self-mapping entries and the SYN chain on the loop service
        let full = self.connections()? >= u64::from(self.capacity);
        if full {
            // Make room for the two probe entries: remove one real pair.
            let rk = peer_of(&self.ct, &sample)?;
            self.ct.delete(key_bytes(&sample))?;
            self.ct.delete(key_bytes(&rk))?;
            self.removed += 1;
        }
        self.dp.set_service(&loop_service())?;
        self.dp.set_backends(&vec![Some((LOOP_LISTEN, 0)); MAGLEV as usize])?;
        let est_src = (Ipv4Addr::new(10, 0, 2, 3), 40000);
        let est_key = key(est_src, (LOOP_LISTEN, LOCAL_PORT));
        let rep_src = (backend_addr(1), REMOTE_PORT);
        let rep_key = key(rep_src, (LOOP_SNAT, 20000));
        let res = (|| -> Result<()> {
            self.ct.update(key_bytes(&est_key), raw(&self_map(&est_key, 1)), MapFlags::NO_EXIST)?;
            self.ct.update(key_bytes(&rep_key), raw(&self_map(&rep_key, 2)), MapFlags::NO_EXIST)?;
            lp["established"] = self.looped(
                loop_calls,
                LOOP_REPEAT,
                "loop established",
                |_| tcp_frame(est_src, (LOOP_LISTEN, LOCAL_PORT), ACK | PSH, PAYLOAD, 255),
                XDP_REDIRECT,
                &[Counter::XLB_CNT_FWD_TO_BACKEND],
            )?;
            lp["reply"] = self.looped(
                loop_calls,
                LOOP_REPEAT,
                "loop reply",
                |_| tcp_frame(rep_src, (LOOP_SNAT, 20000), ACK | PSH, PAYLOAD, 255),
                XDP_REDIRECT,
                &[Counter::XLB_CNT_FWD_TO_CLIENT],
            )?;
            if syns {
                // Each call starts a chain of LOOP_REPEAT new connections;
                // they stay in the table (a few thousand at most).
                let calls = if self.quick { 4 } else { 8 };
                // Each chain starts from a client port no earlier chain used.
                let first_port = 30000 + self.chains as u16;
                self.chains += calls;
                lp["syn"] = self.looped(
                    calls,
                    LOOP_REPEAT,
                    "loop syn",
                    |c| {
                        tcp_frame(
                            (Ipv4Addr::new(10, 0, 2, 2), first_port + c as u16),
                            (LOOP_LISTEN, 80),
                            SYN,
                            0,
                            255,
                        )
                    },
                    XDP_REDIRECT,
                    &[Counter::XLB_CNT_NEW_FLOW, Counter::XLB_CNT_FWD_TO_BACKEND],
                )?;
            }
            Ok(())
        })();
        let _ = self.ct.delete(key_bytes(&est_key));
        let _ = self.ct.delete(key_bytes(&rep_key));
        self.dp.set_service(&normal_service())?;
        self.dp.set_backends(&table_for(&(0..BACKENDS).map(backend_addr).collect::<Vec<_>>(), MAGLEV))?;
        res?;
        if syns {
            self.remove_chains()?;
        }

        // test-run overhead of a single call: same unmodified packet, single
        // minus loop; subtracted from the single figures as "corrected".
        let overhead = (median(&single["pass"]) - median(&lp["pass"])).max(0.0);
        let mut corrected = json!({});
        for (k, v) in single.as_object().expect("object") {
            corrected[k] = json!((median(v) - overhead).max(0.0));
        }
        out["single"] = single;
        out["single_corrected_median"] = corrected;
        out["test_run_overhead_ns"] = json!(overhead);
        out["loop"] = lp;
        out["nat_port_fill_per_backend"] =
            json!(conns as f64 / f64::from(BACKENDS) / f64::from(NAT_PORTS.1 - NAT_PORTS.0 + 1));
        Ok(out)
    }
}

fn tuple(addr: u32, port_be: u16) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(addr.to_ne_bytes()), u16::from_be(port_be))
}

/// Every conntrack entry. A hash map's batch read returns whole buckets, so
/// a batch shorter than asked for is not the end: only ENOENT is.
/// Every conntrack entry (the data plane's own reader, which reads until the
/// kernel says the table ended).
fn dump(ct: &MapHandle) -> Result<Vec<(FlowKey, Flow)>> {
    Ok(xlb::dataplane::read_conntrack(ct)?.into_iter().map(|e| (e.key, e.flow)).collect())
}

fn peer_of(ct: &MapHandle, k: &FlowKey) -> Result<FlowKey> {
    let v = ct.lookup(key_bytes(k), MapFlags::ANY)?.context("sample entry vanished")?;
    let mut f = Flow::default();
    plain::copy_from_bytes(&mut f, &v).map_err(|e| anyhow::anyhow!("flow bytes: {e:?}"))?;
    Ok(FlowKey {
        saddr: f.nat_daddr,
        daddr: f.nat_saddr,
        sport: f.nat_dport,
        dport: f.nat_sport,
        proto: 6,
        pad: [0; 3],
    })
}

fn next_prime(n: u32) -> u32 {
    (n..).find(|&p| xlb::balancer::is_prime(p)).expect("a prime")
}

/// A backend-set change to the data plane: diff + Maglev build (BackendSet,
/// as the control plane runs it) and the map write (set_backends).
fn control_plane(quick: bool) -> Result<Value> {
    let mut out = Vec::new();
    let sizes: &[u32] = if quick { &[10, 1000] } else { &[10, 1000, 10_000] };
    for &n in sizes {
        check_stop()?;
        let m = if 100 * n <= MAGLEV { MAGLEV } else { next_prime(100 * n).min(1_000_003) };
        let dp = Dataplane::load(LoadOptions { conntrack_capacity: 1024, maglev_size: m, pins: None })?;
        let mut dp = dp;
        dp.set_service(&normal_service())?;
        let list: Vec<Backend> = (0..n)
            .map(|k| Backend {
                name: format!("be{k}"),
                addr: Ipv4Addr::new(
                    10,
                    200 + (k / 62_500) as u8,
                    ((k / 250) % 250) as u8,
                    (k % 250 + 1) as u8,
                ),
                weight: 1,
            })
            .collect();
        let mut set = BackendSet::new(m);
        let t = Instant::now();
        let (table, _) = set.update(list.clone()).context("a first set changes the table")?;
        let first_build = t.elapsed();
        let t = Instant::now();
        dp.set_backends(&table)?;
        let first_write = t.elapsed();
        // Then single-backend changes (remove one, add it back), as a
        // provider reports them.
        let reps = if quick { 3 } else { 7 };
        let (mut builds, mut writes) = (Vec::new(), Vec::new());
        for r in 0..reps {
            check_stop()?;
            let next = if r % 2 == 0 { list[..list.len() - 1].to_vec() } else { list.clone() };
            let t = Instant::now();
            let (table, _) = set.update(next).context("the change changes the table")?;
            builds.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            dp.set_backends(&table)?;
            writes.push(t.elapsed().as_secs_f64() * 1e3);
        }
        // counters() is what each stats tick reads besides the sweep.
        let t = Instant::now();
        for _ in 0..100 {
            dp.counters()?;
        }
        let counters_us = t.elapsed().as_secs_f64() * 1e6 / 100.0;
        let ms = |v: Vec<f64>| summary(v)["median"].clone();
        out.push(json!({
            "backends": n, "maglev_size": m,
            "first": {"build_ms": first_build.as_secs_f64() * 1e3, "write_ms": first_write.as_secs_f64() * 1e3},
            "change_one": {"build_ms": ms(builds.clone()), "write_ms": ms(writes.clone()),
                           "total_ms": builds.iter().zip(&writes).map(|(a, b)| a + b)
                               .fold(f64::NAN, |m, x| if m.is_nan() || x < m { x } else { m })},
            "counters_read_us": counters_us,
        }));
        eprintln!(
            "  control plane: {n} backends (maglev {m}): build {:.1} ms + write {:.1} ms",
            first_build.as_secs_f64() * 1e3,
            first_write.as_secs_f64() * 1e3
        );
    }
    Ok(Value::Array(out))
}

fn dataplane_cmd(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick") || std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let out_path = flag_value(args, "--out").context("--out FILE")?;
    use std::os::unix::fs::MetadataExt;
    ensure!(std::fs::metadata("/proc/self")?.uid() == 0, "xlb-bench needs root (BPF, namespaces)");
    let started = Instant::now();
    let ns = Netns::new()?;
    let res = run_dataplane(&ns, quick);
    drop(ns);
    let mut doc = res?;
    doc["seconds"] = json!(started.elapsed().as_secs_f64());
    std::fs::write(&out_path, serde_json::to_string_pretty(&doc)?)?;
    eprintln!("xlb-bench: wrote {out_path} in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A loaded, attached program serving the normal service with 100 backends.
fn bench_dataplane(ns: &Netns, capacity: u32, quick: bool) -> Result<Bench> {
    let (g0, g1) = setup_namespace(ns)?;
    let mut dp =
        Dataplane::load(LoadOptions { conntrack_capacity: capacity, maglev_size: MAGLEV, pins: None })?;
    dp.set_service(&normal_service())?;
    let backends: Vec<Ipv4Addr> = (0..BACKENDS).map(backend_addr).collect();
    dp.set_backends(&table_for(&backends, MAGLEV))?;
    // Both interfaces carry the program: each direction is a redirect.
    dp.attach("g0", g0)?;
    dp.attach("g1", g1)?;
    let ct = find_conntrack()?;
    ensure!(ct.max_entries() == 2 * capacity, "found the wrong conntrack map");
    Ok(Bench { dp, ct, capacity, next: 0, removed: 0, quick, rng: Rng(0x9e37_79b9_7f4a_7c15), chains: 0 })
}

/// Runs one case in a tight loop for `--secs` (bounded), for a profiler.
fn spin_cmd(args: &[String]) -> Result<()> {
    let case = flag_value(args, "--case").unwrap_or_else(|| "established".into());
    let secs: u64 = flag_value(args, "--secs").unwrap_or_else(|| "5".into()).parse()?;
    let ns = Netns::new()?;
    let mut b = bench_dataplane(&ns, 1_000_000, false)?;
    b.fill_to(100_000)?;
    let start = Instant::now();
    let mut runs = 0u64;
    let est_src = (Ipv4Addr::new(10, 0, 2, 3), 40000);
    let est_key = key(est_src, (LOOP_LISTEN, LOCAL_PORT));
    let rep_src = (backend_addr(1), REMOTE_PORT);
    let rep_key = key(rep_src, (LOOP_SNAT, 20000));
    if case != "syn" {
        b.dp.set_service(&loop_service())?;
        b.dp.set_backends(&vec![Some((LOOP_LISTEN, 0)); MAGLEV as usize])?;
        b.ct.update(key_bytes(&est_key), raw(&self_map(&est_key, 1)), MapFlags::NO_EXIST)?;
        b.ct.update(key_bytes(&rep_key), raw(&self_map(&rep_key, 2)), MapFlags::NO_EXIST)?;
    }
    eprintln!("spinning {case} for {secs} s (pid {})", std::process::id());
    while start.elapsed() < Duration::from_secs(secs) && !STOP.load(Ordering::Relaxed) {
        match case.as_str() {
            "established" => {
                let f = tcp_frame(est_src, (LOOP_LISTEN, LOCAL_PORT), ACK | PSH, PAYLOAD, 255);
                b.dp.time_run(&f, LOOP_REPEAT)?;
                runs += u64::from(LOOP_REPEAT);
            }
            "reply" => {
                let f = tcp_frame(rep_src, (LOOP_SNAT, 20000), ACK | PSH, PAYLOAD, 255);
                b.dp.time_run(&f, LOOP_REPEAT)?;
                runs += u64::from(LOOP_REPEAT);
            }
            "pass" => {
                let f = tcp_frame((client_addr(0), 5555), (LISTEN, 22), ACK, PAYLOAD, 64);
                b.dp.time_run(&f, 10_000)?;
                runs += 10_000;
            }
            "synchain" => {
                if b.chains % 16 == 15 {
                    b.remove_chains()?;
                }
                ensure!(b.chains < 30000, "out of SYN chains");
                let f = tcp_frame(
                    (Ipv4Addr::new(10, 0, 2, 2), 30000 + b.chains as u16),
                    (LOOP_LISTEN, 80),
                    SYN,
                    0,
                    255,
                );
                b.chains += 1;
                b.dp.time_run(&f, LOOP_REPEAT)?;
                runs += u64::from(LOOP_REPEAT);
            }
            "syn" => {
                ensure!(b.next < 900_000, "out of fresh SYN tuples");
                let f = tcp_frame(fill_client(b.next), (LISTEN, LOCAL_PORT), SYN, 0, 64);
                b.next += 1;
                b.dp.time_run(&f, 1)?;
                runs += 1;
            }
            other => bail!("unknown case {other}"),
        }
    }
    eprintln!("{runs} runs");
    Ok(())
}

fn run_dataplane(ns: &Netns, quick: bool) -> Result<Value> {
    let capacity: u32 = if quick { 50_000 } else { 1_000_000 };
    let mem0 = kernel_mem_kb();
    let mut b = bench_dataplane(ns, capacity, quick)?;
    let empty_memlock = memlock(&b.ct);

    let mut levels = Vec::new();
    let mut fills = Vec::new();
    for (label, pct) in [("1%", 0.01), ("50%", 0.50), ("90%", 0.90)] {
        let target = (f64::from(capacity) * pct) as u64;
        eprintln!("  filling conntrack to {label} ({target} connections)");
        fills.push(b.fill_to(target)?);
        let lvl = b.measure_level(label, true)?;
        eprintln!(
            "  {label}: established {:.0} ns (loop) / {:.0} ns (single, corrected), SYN {:.0} / {:.0} ns",
            median(&lvl["loop"]["established"]),
            lvl["single_corrected_median"]["established"].as_f64().unwrap_or(f64::NAN),
            median(&lvl["loop"]["syn"]),
            lvl["single_corrected_median"]["syn"].as_f64().unwrap_or(f64::NAN),
        );
        levels.push(lvl);
    }

    // Scale: the table at capacity (1,000,000 connections unless quick).
    eprintln!("  filling conntrack to {capacity} connections");
    fills.push(b.fill_to(u64::from(capacity))?);
    let conns = b.connections()?;
    ensure!(conns == u64::from(capacity), "holding {conns} connections, expected {capacity}");
    let full_memlock = memlock(&b.ct);
    let mem_full = kernel_mem_kb();
    let full_level = b.measure_level("full", false)?;
    // Every XLB map's memlock (conntrack dominates).
    let maps_memlock = all_maps_memlock();

    // GC correctness at scale: with the production policy (orphan TTL
    // 300 s, closed connections 10 s) a sweep 11 s after the last packet
    // must remove nothing: every connection is open and far from idle.
    let now = xlb::dataplane::now_ns();
    let before = dump(&b.ct)?.len();
    let policy = GcPolicy {
        now_ns: now + 11_000_000_000,
        idle_ns: 300_000_000_000,
        closed_ns: 10_000_000_000,
        tombstone_ns: 10_000_000_000,
        half_open_ns: 30_000_000_000,
        unanswered_created: None,
    };
    let gc = b.dp.expire_flows(&policy)?;
    let after = dump(&b.ct)?.len();
    let gc_check = json!({
        "entries_before": before, "entries_after": after,
        "wrongly_removed_entries": before - after,
        "sweep_reported": {"active": gc.active, "closed": gc.closed, "orphaned": gc.orphaned,
                           "unpaired": gc.unpaired},
    });
    if before != after {
        eprintln!(
            "  finding (not a harness failure): a sweep 11 s after the last packet removed {} of {before} \
             entries of open connections",
            before - after
        );
    }

    // Full expiry: every connection idle past its TTL, swept as the control
    // plane sweeps (repeatedly, until a sweep finds nothing).
    let t = Instant::now();
    let policy = GcPolicy {
        now_ns: now + 3_600_000_000_000,
        idle_ns: 1,
        closed_ns: 1,
        tombstone_ns: 1,
        half_open_ns: 1,
        unanswered_created: None,
    };
    let (mut sweeps, mut expired) = (0u64, 0u64);
    while sweeps < 100_000 && t.elapsed() < Duration::from_secs(if quick { 30 } else { 120 }) {
        check_stop()?;
        let gc = b.dp.expire_flows(&policy)?;
        sweeps += 1;
        let n = gc.orphaned + gc.closed + gc.unpaired;
        expired += n;
        if n == 0 {
            break;
        }
    }
    let gc_secs = t.elapsed().as_secs_f64();
    let left = dump(&b.ct)?.len();
    let after_gc_memlock = memlock(&b.ct);
    let mem_after = kernel_mem_kb();
    eprintln!("  full expiry: {sweeps} sweeps, {gc_secs:.2} s, {left} entries left");
    drop(b);

    let scale = json!({
        "connections": conns,
        "capacity": capacity,
        "conntrack_memlock_empty_bytes": empty_memlock,
        "conntrack_memlock_full_bytes": full_memlock,
        "conntrack_memlock_after_gc_bytes": after_gc_memlock,
        "bytes_per_connection_memlock": (full_memlock - empty_memlock) as f64 / conns as f64,
        "all_maps_memlock_full_bytes": maps_memlock,
        "kernel_slab_percpu_delta_kb": mem_full as i64 - mem0 as i64,
        "kernel_slab_percpu_after_gc_delta_kb": mem_after as i64 - mem0 as i64,
        "level": full_level,
        "gc_check_live_connections": gc_check,
        "gc_full_expiry_seconds": gc_secs,
        "gc_full_expiry_sweeps": sweeps,
        "gc_full_expiry_removed": expired,
        "gc_full_expiry_entries_left": left,
    });
    eprintln!(
        "  {} connections: conntrack memlock {:.1} MiB ({:.0} B/connection incl. the empty table's {:.1} MiB)",
        conns,
        full_memlock as f64 / 1048576.0,
        full_memlock as f64 / conns as f64,
        empty_memlock as f64 / 1048576.0
    );
    let cp = control_plane(quick)?;
    Ok(json!({
        "quick": quick,
        "capacity": capacity,
        "backends": BACKENDS,
        "nat_port_range": [NAT_PORTS.0, NAT_PORTS.1],
        "loop_repeat": LOOP_REPEAT,
        "payload_bytes": PAYLOAD,
        "fills": fills,
        "levels": levels,
        "scale": scale,
        "control_plane": cp,
    }))
}

/// Sum of memlock over every BPF map this process holds.
fn all_maps_memlock() -> Value {
    let mut maps = serde_json::Map::new();
    let mut total = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let mut seen = std::collections::HashSet::new();
        for e in dir.flatten() {
            let Ok(t) = std::fs::read_link(e.path()) else { continue };
            if t.to_string_lossy() != "anon_inode:bpf-map" {
                continue;
            }
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{}", e.file_name().to_string_lossy()))
                    .unwrap_or_default();
            let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_string());
            let (Some(id), Some(ml)) = (field("map_id:"), field("memlock:")) else { continue };
            if !seen.insert(id.clone()) {
                continue;
            }
            let name = id
                .parse()
                .ok()
                .and_then(|i| MapHandle::from_map_id(i).ok())
                .map(|h| h.name().to_string_lossy().into_owned())
                .unwrap_or_default();
            let ml: u64 = ml.parse().unwrap_or(0);
            total += ml;
            maps.insert(format!("{name}#{id}"), json!(ml));
        }
    }
    json!({"total": total, "maps": maps})
}
