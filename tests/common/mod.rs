//! Test hosts in network namespaces: uniquely named, removed on drop.
#![allow(dead_code)]

pub mod workout;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A name no other test (or concurrent test binary) uses: prefix + pid + counter,
/// at most 15 characters so it also fits an interface name.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{:x}{n:x}", std::process::id() & 0xfffff);
    assert!(name.len() <= 15, "name {name} too long");
    name
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(cmd: &str) -> Output {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh runs");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A namespace this test owns: removed on drop. Everything else it does
/// is NsRef's.
pub struct Netns {
    ns: NsRef,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        sh(&format!("ip netns add {name}"));
        let ns = Netns { ns: NsRef { name } };
        ns.exec("ip link set lo up");
        ns
    }
}

impl std::ops::Deref for Netns {
    type Target = NsRef;
    fn deref(&self) -> &NsRef {
        &self.ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Enters a network namespace on the calling thread.
pub fn enter(path: &std::path::Path) {
    let f = std::fs::File::open(path).expect("open netns");
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Polls `f` until it returns Some, at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The demo's topology (scripts/topology.sh) under a unique prefix: a client,
/// an LB node (listen ip 10.100.0.1) and `n` backends at 10.10k.0.2.
pub struct Topology {
    pub prefix: String,
    pub client: NsRef,
    pub lb: NsRef,
    pub backends: Vec<NsRef>,
}

/// A namespace someone else (the topology) owns.
#[derive(Clone)]
pub struct NsRef {
    pub name: String,
}

impl NsRef {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    pub fn exec(&self, cmd: &str) -> Output {
        sh(&format!("ip netns exec {} sh -c '{}'", self.name, cmd.replace('\'', r"'\''")))
    }

    /// Runs `f` on a thread that has entered this namespace (network only:
    /// the host's /sys/fs/bpf stays visible, unlike with `ip netns exec`).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("namespaced thread panicked")
    }

    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

pub const LISTEN: &str = "10.100.0.1";

/// An XLB config for a Topology with `backends` backends, plus `extra` YAML
/// lines. Its unique name is also the instance whose pins the run owns.
pub fn lb_config(backends: usize, extra: &str) -> String {
    static_config(LISTEN, (1..=backends).map(backend_ip), extra)
}

/// A uniquely named static config listening on `listen`:80, backends be1..
/// at `ips` on :8080, plus `extra` YAML lines.
pub fn static_config(listen: &str, ips: impl Iterator<Item = String>, extra: &str) -> String {
    let mut c = format!("name: {}\n", unique("xi"));
    c += &format!("listen: {{ip: {listen}}}\nports:\n  - {{local_port: 80, remote_port: 8080}}\n");
    c += "provider:\n  static:\n    backends:\n";
    for (k, ip) in ips.enumerate() {
        c += &format!("      - {{name: be{}, ip: {ip}}}\n", k + 1);
    }
    c + extra
}

pub fn backend_ip(k: usize) -> String {
    format!("10.{}.0.2", 100 + k)
}

impl Topology {
    pub fn new(n: usize) -> Topology {
        let prefix = unique("xe");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/topology.sh");
        let t = Topology {
            client: NsRef { name: format!("{prefix}-client") },
            lb: NsRef { name: format!("{prefix}-lb") },
            backends: (1..=n).map(|k| NsRef { name: format!("{prefix}-be{k}") }).collect(),
            prefix,
        };
        sh(&format!("{script} up {} {n}", t.prefix));
        t
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/topology.sh");
        let _ = Command::new(script).args(["down", &self.prefix]).output();
    }
}

/// A one-armed node: client, LB and backends each have one interface, all
/// ports of one bridge in a switch namespace. The bridge-side veth peers
/// run no XDP program (as on kind or Docker nodes); the LB's peer has GRO on
/// or off as asked:
///
///   <p>-client 10.200.0.2, <p>-lb 10.200.0.1 (listen), <p>-be<k> 10.200.0.(10+k)
///   all: eth0 --- port in <p>-sw (bridge br0)
pub struct OneArmed {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Netns>,
    pub switch: Netns,
}

pub const ONE_ARMED_LISTEN: &str = "10.200.0.1";

impl OneArmed {
    pub fn new(n: usize, lb_peer_gro: bool) -> OneArmed {
        let switch = Netns::new("xsw");
        switch.exec("ip link add br0 type bridge && ip link set br0 up");
        let client = Netns::new("xoc");
        let lb = Netns::new("xol");
        let backends: Vec<Netns> = (0..n).map(|_| Netns::new("xob")).collect();
        let plug = |ns: &Netns, port: &str, addr: &str| {
            sh(&format!(
                "ip link add eth0 netns {} type veth peer name {port} netns {}",
                ns.name, switch.name
            ));
            switch.exec(&format!("ip link set {port} master br0 && ip link set {port} up"));
            ns.exec(&format!("ip addr add {addr}/24 dev eth0 && ip link set eth0 up"));
        };
        plug(&client, "pc", "10.200.0.2");
        plug(&lb, "pl", ONE_ARMED_LISTEN);
        for (k, b) in backends.iter().enumerate() {
            plug(b, &format!("pb{k}"), &one_armed_backend_ip(k + 1));
        }
        // veth quirks (design.md §4): endpoints send full checksums.
        for ns in std::iter::once(&client).chain(backends.iter()) {
            ns.exec("ethtool -K eth0 tx off >/dev/null");
        }
        let gro = if lb_peer_gro { "on" } else { "off" };
        switch.exec(&format!("ethtool -K pl gro {gro} >/dev/null"));
        OneArmed { client, lb, backends, switch }
    }

    /// A static config for the first `n` backends, plus `extra` lines.
    pub fn config(&self, n: usize, extra: &str) -> String {
        static_config(ONE_ARMED_LISTEN, (1..=n).map(one_armed_backend_ip), extra)
    }
}

pub fn one_armed_backend_ip(k: usize) -> String {
    format!("10.200.0.{}", 10 + k)
}

/// A running `xlb run` inside a namespace; SIGKILLed on drop if still alive.
pub struct XlbProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
    /// The config's `name`: its pins are removed on drop.
    pub instance: Option<String>,
    _dir: tempfile::TempDir,
}

impl XlbProcess {
    /// Starts xlb with `config` (YAML text) in `ns`, entering only its network
    /// namespace, and waits until /readyz answers 200.
    pub fn start(ns: &NsRef, config: &str) -> XlbProcess {
        Self::start_binary(ns, config, std::path::Path::new(env!("CARGO_BIN_EXE_xlb")))
    }

    pub fn start_binary(ns: &NsRef, config: &str, binary: &std::path::Path) -> XlbProcess {
        Self::spawn_binary(ns, config, binary).ready(ns)
    }

    /// Waits (bounded) until /readyz answers 200 in `ns`.
    fn ready(self, ns: &NsRef) -> XlbProcess {
        let lb = ns.clone();
        let ready = wait_for(Duration::from_secs(30), || {
            let lb = lb.clone();
            let code = lb.run(|| http_get("127.0.0.1:9090", "/readyz").map(|r| r.status));
            (code.ok() == Some(200)).then_some(())
        });
        assert!(ready.is_some(), "xlb did not become ready:\n{}", self.log());
        self
    }

    pub fn spawn(ns: &NsRef, config: &str) -> XlbProcess {
        Self::spawn_binary(ns, config, std::path::Path::new(env!("CARGO_BIN_EXE_xlb")))
    }

    pub fn spawn_binary(ns: &NsRef, config: &str, binary: &std::path::Path) -> XlbProcess {
        Self::spawn_with_env(ns, config, binary, &[])
    }

    /// Started with extra environment (the worker's fault hooks), and
    /// waited for like `start`.
    pub fn start_with_env(ns: &NsRef, config: &str, env: &[(&str, &str)]) -> XlbProcess {
        Self::spawn_with_env(ns, config, std::path::Path::new(env!("CARGO_BIN_EXE_xlb")), env).ready(ns)
    }

    pub fn spawn_with_env(
        ns: &NsRef,
        config: &str,
        binary: &std::path::Path,
        env: &[(&str, &str)],
    ) -> XlbProcess {
        Self::spawn_in(ns, config, binary, env, None)
    }

    /// Started inside a cgroup: the shell that becomes xlb (by exec, same
    /// pid) first writes itself into `cgroup_procs` (a cgroup's
    /// cgroup.procs), so all xlb allocates, its BPF maps included, is
    /// charged there. Waited for like `start`.
    pub fn start_in_cgroup(
        ns: &NsRef,
        config: &str,
        cgroup_procs: &std::path::Path,
        env: &[(&str, &str)],
    ) -> XlbProcess {
        let binary = std::path::Path::new(env!("CARGO_BIN_EXE_xlb"));
        Self::spawn_in(ns, config, binary, env, Some(cgroup_procs)).ready(ns)
    }

    fn spawn_in(
        ns: &NsRef,
        config: &str,
        binary: &std::path::Path,
        env: &[(&str, &str)],
        cgroup_procs: Option<&std::path::Path>,
    ) -> XlbProcess {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("xlb.yaml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.path().join("xlb.log");
        let mut cmd = match cgroup_procs {
            None => Command::new("nsenter"),
            Some(procs) => {
                let mut c = Command::new("sh");
                c.args(["-c", r#"echo $$ > "$0" && exec nsenter "$@""#]).arg(procs);
                c
            }
        };
        let child = cmd
            .arg(format!("--net={}", ns.path().display()))
            .arg(binary)
            .args(["run", "-c"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn xlb");
        let instance = xlb::config::Config::parse(config, "test").ok().and_then(|c| c.name);
        XlbProcess { child, log, instance, _dir: dir }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.wait(Duration::from_secs(30)).expect("xlb exits after SIGTERM")
    }

    pub fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_for(limit, || self.child.try_wait().ok().flatten())
    }
}

impl XlbProcess {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(self.pid(), sig);
    }
}

impl Drop for XlbProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(i) = &self.instance {
            remove_pins(i);
        }
    }
}

pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A minimal HTTP/1.0 GET over a real TCP connection (bounded by timeouts).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<HttpResponse> {
    use std::io::{Read, Write};
    let sa: std::net::SocketAddr = addr.parse().expect("socket address");
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: xlb\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// Sends blob(n) to the backends' /upload/<n> and returns the answer.
pub fn http_upload(addr: &str, n: usize) -> std::io::Result<HttpResponse> {
    use std::io::{Read, Write};
    let sa: std::net::SocketAddr = addr.parse().expect("socket address");
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "POST /upload/{n} HTTP/1.0\r\nHost: xlb\r\nContent-Length: {n}\r\n\r\n")?;
    s.write_all(&blob(n))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok(HttpResponse { status, body: raw[end + 4..].to_vec() })
}

/// The deterministic content of the backends' /blob/<n> (n bytes).
pub fn blob(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A small threaded HTTP/1.0 server on 0.0.0.0:8080 in `ns`: "/" answers
/// "backend <name>\n", "/blob/<n>" answers blob(n), "/check" answers with
/// the status in `check` (200 at first; 0: accepts and never answers).
/// Stops listening on drop (connections it accepted carry on).
pub struct Backend {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub check: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

pub fn start_backend(ns: &NsRef, name: &str) -> Backend {
    use std::sync::atomic::AtomicBool;
    let name = name.to_string();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let flag = stop.clone();
    let check = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
    let answer = check.clone();
    let thread = ns.spawn(move || {
        let l = std::net::TcpListener::bind("0.0.0.0:8080").expect("bind backend");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        while !flag.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    let (name, answer) = (name.clone(), answer.clone());
                    std::thread::spawn(move || serve_one(&mut c, &name, &answer));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("backend listening");
    Backend { stop, thread: Some(thread), check }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_one(c: &mut std::net::TcpStream, name: &str, check: &std::sync::atomic::AtomicU16) {
    use std::io::{BufRead, BufReader, Write};
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(n) if n > 2 => continue,
            _ => break,
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    if path == "/check" {
        match check.load(Ordering::Relaxed) {
            // Accepts, reads the request and never answers (for a while).
            0 => std::thread::sleep(Duration::from_secs(3)),
            code => {
                let _ = write!(c, "HTTP/1.0 {code} Check\r\nContent-Length: 0\r\n\r\n");
            }
        }
        return;
    }
    if let Some(n) = path.strip_prefix("/upload/") {
        // Reads n bytes and answers whether they are blob(n).
        use std::io::Read;
        let n: usize = n.parse().unwrap_or(0);
        let mut got = vec![0u8; n];
        let ok = r.read_exact(&mut got).is_ok() && got == blob(n);
        let body = if ok { "upload ok\n" } else { "upload differs\n" };
        let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        return;
    }
    if path == "/echo" {
        // A long-lived connection: echo lines back until the client closes.
        let _ = write!(c, "HTTP/1.0 200 OK\r\n\r\n");
        let mut l = String::new();
        while r.read_line(&mut l).is_ok_and(|n| n > 0) {
            if c.write_all(l.as_bytes()).is_err() {
                return;
            }
            l.clear();
        }
        return;
    }
    if let Some((n, secs)) = path.strip_prefix("/paced/").and_then(|r| r.split_once('/')) {
        // blob(n) in 100 chunks paced over `secs` seconds: a long transfer.
        let body = blob(n.parse().unwrap_or(0));
        let pause = Duration::from_millis(secs.parse::<u64>().unwrap_or(1).min(120) * 10);
        let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        for chunk in body.chunks(body.len().div_ceil(100).max(1)) {
            if c.write_all(chunk).is_err() {
                return;
            }
            std::thread::sleep(pause);
        }
        return;
    }
    if let Some(n) = path.strip_prefix("/slow/") {
        // blob(n) in 50 paced chunks: a transfer that takes about 2 s.
        let body = blob(n.parse().unwrap_or(0));
        let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        for chunk in body.chunks(body.len().div_ceil(50).max(1)) {
            if c.write_all(chunk).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(40));
        }
        return;
    }
    let body = match path.strip_prefix("/blob/") {
        Some(n) => blob(n.parse().unwrap_or(0)),
        None => format!("backend {name}\n").into_bytes(),
    };
    let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
    let _ = c.write_all(&body);
}

/// A long-lived connection to the backends' /echo through XLB.
pub struct EchoConn {
    s: std::net::TcpStream,
    r: std::io::BufReader<std::net::TcpStream>,
}

impl EchoConn {
    pub fn open(addr: &str) -> std::io::Result<EchoConn> {
        use std::io::{BufRead, Write};
        let sa: std::net::SocketAddr = addr.parse().expect("socket address");
        let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /echo HTTP/1.0\r\n\r\n")?;
        let mut r = std::io::BufReader::new(s.try_clone()?);
        let mut l = String::new();
        while r.read_line(&mut l)? > 2 {
            l.clear();
        }
        Ok(EchoConn { s, r })
    }

    /// Ends the connection with a RST (SO_LINGER 0), as an aborting client does.
    pub fn abort(self) {
        let off = nix::libc::linger { l_onoff: 1, l_linger: 0 };
        let _ = nix::sys::socket::setsockopt(&self.s, nix::sys::socket::sockopt::Linger, &off);
    }

    /// Sends a line and checks it comes back.
    pub fn ping(&mut self, msg: &str) -> std::io::Result<()> {
        use std::io::{BufRead, Write};
        self.s.write_all(format!("{msg}\n").as_bytes())?;
        let mut l = String::new();
        self.r.read_line(&mut l)?;
        if l.trim_end() != msg {
            return Err(std::io::Error::other(format!("echo returned {l:?} for {msg:?}")));
        }
        Ok(())
    }
}

/// Pins an XLB instance leaves on the host's bpffs.
pub fn pin_dir(instance: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/xlb/{instance}"))
}

/// Removes an instance's pins (what a SIGKILLed xlb leaves).
pub fn remove_pins(instance: &str) {
    let dir = pin_dir(instance);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

/// The LB's status document (admin API, inside the LB namespace).
pub fn status(lb: &NsRef) -> serde_json::Value {
    let r = lb.run(|| http_get("127.0.0.1:9090", "/api/v1/status")).expect("status answers");
    serde_json::from_slice(&r.body).expect("status is JSON")
}

pub fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name} in {status}"))
}
