//! `xlb-bench connect`: connection-per-request HTTP load from many client
//! addresses, which wrk cannot do (it cannot bind a source address).
//!
//! `--conns` blocking worker threads (closed loop: each has one request in
//! flight) each repeat until the deadline: a socket bound to the next source
//! address (port chosen by the kernel), a connect to the next target, one
//! `GET` with `Connection: close`, the answer read to EOF (the server closes
//! first, so the client holds no TIME_WAIT), its status line checked. The
//! latency of a request is from the socket's creation to EOF, so it includes
//! the handshake (wrk's does not: it times requests, not connects); a lost
//! SYN shows as a latency of a second or more.
//!
//! Every step has a 2 s timeout (SO_SNDTIMEO bounds connect and write,
//! SO_RCVTIMEO each read); a failure is counted, never fatal. Requests that
//! end after the deadline, or after SIGINT/SIGTERM, are not counted either
//! way. The result is one line in bench/wrk-report.lua's format, so
//! bench/run.sh and bench/report.py take it as they take wrk's.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::socket::{
    bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};
use nix::sys::time::TimeVal;
use serde_json::{json, Map, Value};

use crate::STOP;

const TIMEOUT: Duration = Duration::from_secs(2);

pub const USAGE: &str = "xlb-bench connect --target IP:PORT [--target IP:PORT ...] --sources A.B.C.X-Y \
                         --conns N --secs S [--path /]";

/// How one request ended.
enum Outcome {
    /// A whole answer: its bytes and whether its status was 200.
    Done {
        bytes: u64,
        ok: bool,
    },
    Connect,
    Read,
    Write,
    Timeout,
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    bytes: u64,
    connect: u64,
    read: u64,
    write: u64,
    status: u64,
    timeout: u64,
}

/// `A.B.C.X-Y` (or a single address): the addresses X..=Y of A.B.C.
fn parse_sources(s: &str) -> Result<Vec<Ipv4Addr>> {
    let Some((first, last)) = s.split_once('-') else {
        return Ok(vec![s.parse().with_context(|| format!("--sources {s}"))?]);
    };
    let first: Ipv4Addr = first.parse().with_context(|| format!("--sources {s}"))?;
    let last: u8 = last.parse().with_context(|| format!("--sources {s}: the last octet"))?;
    let [a, b, c, x] = first.octets();
    ensure!(x <= last, "--sources {s}: an empty range");
    Ok((x..=last).map(|d| Ipv4Addr::new(a, b, c, d)).collect())
}

fn is_timeout(e: &std::io::Error) -> bool {
    // A connect that SO_SNDTIMEO cut short returns EINPROGRESS.
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
        || e.raw_os_error() == Some(nix::libc::EINPROGRESS)
}

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// A socket of `src` (port chosen by the kernel) connected to `dst`.
fn open(src: Ipv4Addr, dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(io)?;
    let tv = TimeVal::new(TIMEOUT.as_secs() as i64, 0);
    setsockopt(&fd, sockopt::SendTimeout, &tv).map_err(io)?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(io)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(src, 0))).map_err(io)?;
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst)).map_err(io)?;
    Ok(TcpStream::from(fd))
}

fn request(src: Ipv4Addr, dst: SocketAddrV4, req: &[u8]) -> Outcome {
    let mut s = match open(src, dst) {
        Ok(s) => s,
        Err(e) if is_timeout(&e) => return Outcome::Timeout,
        Err(_) => return Outcome::Connect,
    };
    match s.write_all(req) {
        Ok(()) => {}
        Err(e) if is_timeout(&e) => return Outcome::Timeout,
        Err(_) => return Outcome::Write,
    }
    let mut buf = [0u8; 4096];
    let mut head = [0u8; 12]; // "HTTP/1.1 200"
    let mut bytes = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let at = bytes as usize;
                if at < head.len() {
                    let k = (head.len() - at).min(n);
                    head[at..at + k].copy_from_slice(&buf[..k]);
                }
                bytes += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Outcome::Timeout,
            Err(_) => return Outcome::Read,
        }
    }
    let ok = bytes >= head.len() as u64 && head.starts_with(b"HTTP/1.") && &head[8..] == b" 200";
    Outcome::Done { bytes, ok }
}

/// Worker `w` of `n`: sources round robin from its own offset (so together
/// the workers use every source), targets round robin.
fn worker(
    w: usize,
    n: usize,
    sources: &[Ipv4Addr],
    targets: &[SocketAddrV4],
    req: &[u8],
    deadline: Instant,
) -> Tally {
    let mut t = Tally::default();
    let mut k = 0usize;
    while !STOP.load(Ordering::Relaxed) {
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        let src = sources[(w + k * n) % sources.len()];
        let dst = targets[(w + k) % targets.len()];
        k += 1;
        let outcome = request(src, dst, req);
        let end = Instant::now();
        if end > deadline || STOP.load(Ordering::Relaxed) {
            break; // past the measured window: counted neither way
        }
        match outcome {
            Outcome::Done { bytes, ok } => {
                t.latencies_us.push(u32::try_from((end - start).as_micros()).unwrap_or(u32::MAX));
                t.bytes += bytes;
                t.status += u64::from(!ok);
            }
            Outcome::Connect => t.connect += 1,
            Outcome::Read => t.read += 1,
            Outcome::Write => t.write += 1,
            Outcome::Timeout => t.timeout += 1,
        }
        // A failure that returns at once (no local port left, say) must not
        // spin the core the balancer and the backends need.
        if !matches!(outcome, Outcome::Done { .. }) && end - start < Duration::from_millis(1) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    t
}

/// The value at percentile `p` of sorted `v` (nearest rank).
fn percentile(v: &[u32], p: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn report(tallies: Vec<Tally>, duration: Duration) -> Value {
    let mut lat: Vec<u32> = Vec::new();
    let mut sum = Tally::default();
    for t in tallies {
        lat.extend_from_slice(&t.latencies_us);
        sum.bytes += t.bytes;
        sum.connect += t.connect;
        sum.read += t.read;
        sum.write += t.write;
        sum.status += t.status;
        sum.timeout += t.timeout;
    }
    lat.sort_unstable();
    let mut pct = Map::new();
    for p in 1..=99 {
        pct.insert(p.to_string(), percentile(&lat, p as f64).into());
    }
    for p in [99.5, 99.9] {
        pct.insert(p.to_string(), percentile(&lat, p).into());
    }
    let mean =
        if lat.is_empty() { 0.0 } else { lat.iter().map(|&x| x as f64).sum::<f64>() / lat.len() as f64 };
    json!({
        "requests": lat.len(),
        "duration_us": duration.as_micros() as u64,
        "bytes": sum.bytes,
        "errors": {"connect": sum.connect, "read": sum.read, "write": sum.write,
                   "status": sum.status, "timeout": sum.timeout},
        "latency_mean_us": (mean * 10.0).round() / 10.0,
        "latency_max_us": lat.last().copied().unwrap_or(0),
        "latency_pct_us": pct,
    })
}

pub fn connect_cmd(args: &[String]) -> Result<()> {
    let mut targets: Vec<SocketAddrV4> = Vec::new();
    let (mut sources, mut conns, mut secs, mut path) = (None, None, None, "/".to_string());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value; usage: {USAGE}"));
        match a.as_str() {
            "--target" => {
                let v = val()?;
                targets.push(v.parse().with_context(|| format!("--target {v}: IP:PORT"))?);
            }
            "--sources" => sources = Some(parse_sources(val()?)?),
            "--conns" => conns = Some(val()?.parse::<usize>().context("--conns")?),
            "--secs" => secs = Some(val()?.parse::<f64>().context("--secs")?),
            "--path" => path = val()?.clone(),
            _ => bail!("unknown argument {a}; usage: {USAGE}"),
        }
    }
    ensure!(!targets.is_empty(), "no --target; usage: {USAGE}");
    let sources = sources.with_context(|| format!("no --sources; usage: {USAGE}"))?;
    let conns = conns.with_context(|| format!("no --conns; usage: {USAGE}"))?;
    let secs = secs.with_context(|| format!("no --secs; usage: {USAGE}"))?;
    ensure!((1..=4096).contains(&conns), "--conns: 1..4096");
    ensure!(secs > 0.0 && secs <= 3600.0, "--secs: up to 3600");
    ensure!(path.starts_with('/') && !path.contains(char::is_whitespace), "--path: an absolute path");
    // Every source must be an address of this namespace: a missing one would
    // only show as a flood of connect errors.
    for &s in &sources {
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(s, 0)))
            .with_context(|| format!("source {s} cannot be bound (not an address here?)"))?;
    }
    let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").into_bytes();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let tallies = std::thread::scope(|scope| -> Result<Vec<Tally>> {
        let handles: Vec<_> = (0..conns)
            .map(|w| {
                let (sources, targets, req) = (&sources, &targets, &req);
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(scope, move || worker(w, conns, sources, targets, req, deadline))
            })
            .collect::<std::io::Result<_>>()?;
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("a worker panicked"))).collect()
    })?;
    ensure!(!STOP.load(Ordering::Relaxed), "interrupted");
    let duration = Instant::now().min(deadline) - start;
    println!("XLBBENCH {}", report(tallies, duration));
    std::io::stdout().flush()?;
    Ok(())
}
