//! `xlb-bench flood`: forged TCP segments as fast as one core can send them
//! through an AF_PACKET socket (sendmmsg batches), for the attack tests and
//! benchmarks. Only ever run it inside a network namespace whose addresses
//! the caller owns: every frame goes out of `--iface` to `--dmac`.
//!
//! Kinds:
//! - `syn`: SYNs from random addresses of `--sources CIDR` and random ports
//!   (a spoofed SYN flood);
//! - `rst`: RSTs from `--from IP:PORT` to every port of `--target IP:P1-P2`
//!   in turn, with random sequence numbers, every `--bad-csum-every`-th with
//!   a broken checksum (a blind reset attack);
//! - `ttl`: ACKs with TTL 1 from random addresses of `--sources` (each asks
//!   for an ICMP time exceeded).
//!
//! Prints one JSON line: frames sent, seconds, frames per second.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::libc;
use serde_json::json;

pub const USAGE: &str = "xlb-bench flood --kind syn|rst|ttl --iface IF --dmac MAC --target IP:PORT[-PORT] \
                         [--sources CIDR] [--from IP:PORT] [--bad-csum-every K] --secs S";

const BATCH: usize = 64;
const FRAME: usize = 54;
/// The longest a flood may run, whatever it is asked.
const MAX_SECS: u64 = 300;

pub fn flood_cmd(args: &[String]) -> Result<()> {
    let flag = |n: &str| super::flag_value(args, n);
    let kind = flag("--kind").context("--kind")?;
    let iface = flag("--iface").context("--iface")?;
    let dmac = parse_mac(&flag("--dmac").context("--dmac")?)?;
    let (dst, ports) = parse_target(&flag("--target").context("--target")?)?;
    let secs: u64 = flag("--secs").context("--secs")?.parse()?;
    ensure!(secs <= MAX_SECS, "--secs at most {MAX_SECS}");
    let sources = flag("--sources").map(|s| parse_cidr(&s)).transpose()?;
    let from = flag("--from").map(|s| parse_target(&s)).transpose()?;
    let bad_every: u64 = flag("--bad-csum-every").map_or(Ok(0), |v| v.parse())?;
    let smac = parse_mac(std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))?.trim())?;
    let ifindex = nix::net::if_::if_nametoindex(iface.as_str())?;

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut next_port = ports.0;
    let mut make = |n: u64, f: &mut [u8; FRAME]| -> Result<()> {
        let seq = rng.next() as u32;
        let (src, sport, dport, flags, ttl) = match kind.as_str() {
            "syn" | "ttl" => {
                let (base, size) = sources.context("--sources")?;
                let src = Ipv4Addr::from(u32::from(base) + (rng.next() as u32) % size);
                let sport = 1024 + (rng.next() % 64000) as u16;
                let dport = ports.0 + (rng.next() as u16) % (ports.1 - ports.0 + 1);
                if kind == "syn" {
                    (src, sport, dport, 0x02, 64)
                } else {
                    (src, sport, dport, 0x10, 1)
                }
            }
            "rst" => {
                let (src, (sport, _)) = from.context("--from")?;
                let dport = next_port;
                next_port = if next_port >= ports.1 { ports.0 } else { next_port + 1 };
                (src, sport, dport, 0x04, 64)
            }
            other => bail!("unknown --kind {other}"),
        };
        build(f, &smac, &dmac, (src, sport), (dst, dport), flags, seq, ttl);
        if bad_every > 0 && n % bad_every == 0 {
            f[50] ^= 0x5a;
        }
        Ok(())
    };

    // SAFETY: plain socket(2); the fd is closed on every path below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    ensure!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    let _close = Close(fd);
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set are its own.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dmac);

    let mut frames = vec![[0u8; FRAME]; BATCH];
    let start = Instant::now();
    let limit = Duration::from_secs(secs);
    let mut sent: u64 = 0;
    while start.elapsed() < limit && !super::STOP.load(std::sync::atomic::Ordering::Relaxed) {
        for (i, f) in frames.iter_mut().enumerate() {
            make(sent + i as u64, f)?;
        }
        let mut iov: Vec<libc::iovec> = frames
            .iter_mut()
            .map(|f| libc::iovec { iov_base: f.as_mut_ptr().cast(), iov_len: FRAME })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: a zeroed msghdr is valid; it points at live buffers.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: msgs and everything they point to outlive the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // A full queue: the receiver is behind, which is the point.
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            return Err(e).context("sendmmsg");
        }
        sent += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{}", json!({"kind": kind, "sent": sent, "secs": secs, "pps": sent as f64 / secs}));
    Ok(())
}

struct Close(i32);
impl Drop for Close {
    fn drop(&mut self) {
        // SAFETY: the fd is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

#[allow(clippy::too_many_arguments)]
fn build(
    f: &mut [u8; FRAME],
    smac: &[u8; 6],
    dmac: &[u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: u8,
    seq: u32,
    ttl: u8,
) {
    f.fill(0);
    f[0..6].copy_from_slice(dmac);
    f[6..12].copy_from_slice(smac);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = ttl;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.0.octets());
    ip[16..20].copy_from_slice(&dst.0.octets());
    let c = super::csum_fold(super::csum_add(ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&src.1.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.1.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.0.octets());
    pseudo[4..8].copy_from_slice(&dst.0.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let c = super::csum_fold(super::csum_add(tcp, super::csum_add(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s.split(':').map(|h| u8::from_str_radix(h, 16)).collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| anyhow::anyhow!("`{s}` is not a MAC address"))
}

/// `IP:PORT` or `IP:P1-P2`.
fn parse_target(s: &str) -> Result<(Ipv4Addr, (u16, u16))> {
    let (ip, ports) = s.split_once(':').context("IP:PORT")?;
    let (a, b) = ports.split_once('-').unwrap_or((ports, ports));
    let (a, b): (u16, u16) = (a.parse()?, b.parse()?);
    ensure!(a <= b, "empty port range in `{s}`");
    Ok((ip.parse()?, (a, b)))
}

/// `A.B.C.D/N` as (first address, count).
fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u32)> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let len: u32 = len.parse()?;
    ensure!((8..=32).contains(&len), "prefix length 8..=32 in `{s}`");
    let base = u32::from(ip.parse::<Ipv4Addr>()?) & (u32::MAX << (32 - len));
    Ok((Ipv4Addr::from(base), 1u32 << (32 - len)))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
