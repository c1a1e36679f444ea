//! `xlb-bench fill-pinned`: writes connections straight into a running
//! instance's pinned conntrack map (/sys/fs/bpf/xlb/<instance>/map_conntrack)
//! with BPF_MAP_UPDATE_BATCH, as the data path would have left them: a
//! forward entry keyed by the client's tuple and a reverse entry keyed by
//! backend -> SNAT address:NAT port, paired both ways. A million connections
//! take seconds, where SYNs through the program would take minutes; no
//! packet is sent anywhere.
//!
//! Connection k (from `--from`, counting up) has client 10.250.x.y:port
//! (50,000 ports per address), backend `--backends`[k % n] and NAT port
//! `--nat-ports` first + k / n. Kinds, in this order:
//! - `--live N`: established (SYN and ACK both ways), last seen now;
//! - `--closed N`: FIN both ways, the client first, idle 20 s: past the sweep's
//!   closed grace period (10 s), with no TIME_WAIT hold;
//! - `--orphaned N`: established, idle `--orphan-idle-secs` (default 600);
//! - `--lone N`: N forward entries without their reverse and N reverse entries
//!   without their forward, idle 20 s: half-finished pairs.
//!
//! A sweep may run while this writes. So that it never meets half of an
//! ended pair (which it would remove as unpaired), every pair is first
//! written live, both halves, and only then rewritten as closed or idle in
//! place: a sweep that sees one half rewritten still sees the pair live.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use serde_json::json;
use xlb::dataplane::tcp_flags::{
    ACK as TCP_ACK, CT_CLOSED, CT_ESTABLISHED, CT_FIN_FIRST, CT_SEQ, FIN as TCP_FIN, SYN as TCP_SYN,
};
use xlb::dataplane::{Flow, FlowKey, DIR_TO_BACKEND, DIR_TO_CLIENT};

use crate::{check_stop, flag_value, raw};

pub const USAGE: &str = "xlb-bench fill-pinned --instance NAME --listen IP:PORT --snat IP \
                         --backends A.B.C.X-Y --backend-port P [--nat-ports LO-HI] [--from K] \
                         [--live N] [--closed N] [--orphaned N] [--orphan-idle-secs S] [--lone N]";

/// Idle time of closed and lone entries: past the sweep's 10 s grace period.
const ENDED_IDLE: Duration = Duration::from_secs(20);
/// Client ports per client address.
const PORTS_PER_CLIENT: u32 = 50_000;
/// Pairs per BPF_MAP_UPDATE_BATCH call (two entries each).
const CHUNK: u64 = 32_768;

struct Plan {
    listen: SocketAddrV4,
    snat: Ipv4Addr,
    backends: Vec<Ipv4Addr>,
    backend_port: u16,
    nat_ports: (u16, u16),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Live,
    Closed,
    Orphaned,
}

fn be(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

impl Plan {
    /// Connection k's forward and reverse entries, live.
    fn pair(&self, k: u64, now: u64) -> Result<(FlowKey, Flow, FlowKey, Flow)> {
        let client = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + (k / u64::from(PORTS_PER_CLIENT)) as u32;
        let client = Ipv4Addr::from(client);
        let client_port = 10_000 + (k % u64::from(PORTS_PER_CLIENT)) as u16;
        let n = self.backends.len() as u64;
        let backend = self.backends[(k % n) as usize];
        let nat_port = u64::from(self.nat_ports.0) + k / n;
        ensure!(
            nat_port <= u64::from(self.nat_ports.1),
            "connection {k} needs NAT port {nat_port}, past {}: give more backends",
            self.nat_ports.1
        );
        let nat_port = nat_port as u16;
        let fk = FlowKey {
            saddr: be(client),
            daddr: be(*self.listen.ip()),
            sport: client_port.to_be(),
            dport: self.listen.port().to_be(),
            proto: 6,
            pad: [0; 3],
        };
        let fwd = Flow {
            nat_saddr: be(self.snat),
            nat_daddr: be(backend),
            nat_sport: nat_port.to_be(),
            nat_dport: self.backend_port.to_be(),
            backend_id: (k % n) as u32,
            created_ns: now,
            last_seen_ns: now,
            packets: 10,
            bytes: 1_000,
            tcp_flags: TCP_SYN | TCP_ACK | CT_SEQ | CT_ESTABLISHED,
            dir: DIR_TO_BACKEND,
            ..Default::default()
        };
        let rk = xlb::dataplane::peer_key(&fwd);
        let rev = Flow {
            nat_saddr: fk.daddr,
            nat_daddr: fk.saddr,
            nat_sport: fk.dport,
            nat_dport: fk.sport,
            backend_id: fwd.backend_id,
            created_ns: now,
            last_seen_ns: now,
            packets: 10,
            bytes: 10_000,
            tcp_flags: TCP_SYN | TCP_ACK | CT_SEQ | CT_ESTABLISHED,
            dir: DIR_TO_CLIENT,
            ..Default::default()
        };
        Ok((fk, fwd, rk, rev))
    }
}

/// The entries `make` gives for each k in `range`, in chunks. A batch
/// update takes no BPF_NOEXIST (its elem_flags allow BPF_F_LOCK only): an
/// entry of the same key is replaced, so the clients come from 10.250.0.0/16,
/// which a test's namespaces never use.
fn write(
    map: &MapHandle,
    range: std::ops::Range<u64>,
    mut make: impl FnMut(u64) -> Result<Vec<(FlowKey, Flow)>>,
) -> Result<u64> {
    let mut written = 0;
    let mut k = range.start;
    while k < range.end {
        check_stop()?;
        let end = (k + CHUNK).min(range.end);
        let (mut keys, mut vals, mut n) = (Vec::new(), Vec::new(), 0u32);
        for i in k..end {
            for (key, flow) in make(i)? {
                keys.extend_from_slice(raw(&key));
                vals.extend_from_slice(raw(&flow));
                n += 1;
            }
        }
        if n > 0 {
            map.update_batch(&keys, &vals, n, MapFlags::ANY, MapFlags::ANY)
                .with_context(|| format!("writing connections {k}..{end} ({n} entries)"))?;
        }
        written += u64::from(n);
        k = end;
    }
    Ok(written)
}

fn parse_range(s: &str, what: &str) -> Result<(u32, u32)> {
    let (lo, hi) = s.split_once('-').with_context(|| format!("{what} {s}: LO-HI"))?;
    Ok((
        lo.parse().with_context(|| format!("{what} {s}"))?,
        hi.parse().with_context(|| format!("{what} {s}"))?,
    ))
}

pub fn fill_pinned_cmd(args: &[String]) -> Result<()> {
    let flag = |name: &str| flag_value(args, name);
    let count = |name: &str| -> Result<u64> {
        flag(name).map_or(Ok(0), |v| v.parse().with_context(|| format!("{name} {v}")))
    };
    let instance = flag("--instance").context(USAGE)?;
    let (first, last) = flag("--backends").context("--backends A.B.C.X-Y")?.split_once('-').map_or_else(
        || anyhow::bail!("--backends A.B.C.X-Y"),
        |(a, b)| Ok((a.parse::<Ipv4Addr>()?, b.parse::<u8>()?)),
    )?;
    let [a, b, c, x] = first.octets();
    ensure!(x <= last, "--backends: an empty range");
    let nat = parse_range(&flag("--nat-ports").unwrap_or_else(|| "10240-32767".into()), "--nat-ports")?;
    let plan = Plan {
        listen: flag("--listen").context("--listen IP:PORT")?.parse().context("--listen IP:PORT")?,
        snat: flag("--snat").context("--snat IP")?.parse().context("--snat IP")?,
        backends: (x..=last).map(|d| Ipv4Addr::new(a, b, c, d)).collect(),
        backend_port: flag("--backend-port").context("--backend-port P")?.parse()?,
        nat_ports: (nat.0 as u16, nat.1 as u16),
    };
    let from = count("--from")?;
    let (live, closed, orphaned, lone) =
        (count("--live")?, count("--closed")?, count("--orphaned")?, count("--lone")?);
    let orphan_idle = Duration::from_secs(flag("--orphan-idle-secs").map_or(Ok(600), |v| v.parse())?);

    let path = xlb::dataplane::pins::PinDir::for_instance(&instance).map("conntrack");
    let map = MapHandle::from_pinned_path(&path)
        .with_context(|| format!("opening {} (is the instance running?)", path.display()))?;
    ensure!(
        map.key_size() as usize == std::mem::size_of::<FlowKey>()
            && map.value_size() as usize == std::mem::size_of::<Flow>(),
        "{} is not a conntrack map of this XLB version",
        path.display()
    );
    let now = xlb::dataplane::now_ns();
    let ago = |d: Duration| -> Result<u64> {
        now.checked_sub(d.as_nanos() as u64).with_context(|| format!("the clock is younger than {d:?}"))
    };
    let (ended_at, orphaned_at) = (ago(ENDED_IDLE)?, ago(orphan_idle)?);
    let kind = |k: u64| match k - from {
        i if i < live => Kind::Live,
        i if i < live + closed => Kind::Closed,
        _ => Kind::Orphaned,
    };
    let started = Instant::now();
    let pairs = from..from + live + closed + orphaned;
    // Both halves live first, then the ended ones rewritten in place (see
    // the module's note on sweeps running meanwhile). Reverse entries first,
    // as the data path inserts them.
    let mut entries = write(&map, pairs.clone(), |k| {
        let (fk, fwd, rk, rev) = plan.pair(k, now)?;
        Ok(vec![(rk, rev), (fk, fwd)])
    })?;
    let rewritten = write(&map, pairs.start + live..pairs.end, |k| {
        let (fk, mut fwd, rk, mut rev) = plan.pair(k, now)?;
        if kind(k) == Kind::Closed {
            fwd.tcp_flags |= TCP_FIN | CT_FIN_FIRST | CT_CLOSED;
            rev.tcp_flags |= TCP_FIN | CT_CLOSED;
            (fwd.last_seen_ns, rev.last_seen_ns) = (ended_at, ended_at);
        } else {
            (fwd.last_seen_ns, rev.last_seen_ns) = (orphaned_at, orphaned_at);
        }
        Ok(vec![(rk, rev), (fk, fwd)])
    })?;
    // Lone halves: forward entries of the next `lone` connections, reverse
    // entries of the `lone` after them.
    let lone_from = pairs.end;
    entries += write(&map, lone_from..lone_from + 2 * lone, |k| {
        let (fk, mut fwd, rk, mut rev) = plan.pair(k, now)?;
        (fwd.last_seen_ns, rev.last_seen_ns) = (ended_at, ended_at);
        Ok(vec![if k < lone_from + lone { (fk, fwd) } else { (rk, rev) }])
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"instance": instance, "entries_written": entries, "entries_rewritten": rewritten,
               "live": live, "closed": closed, "orphaned": orphaned, "lone_forward": lone,
               "lone_reverse": lone, "next": lone_from + 2 * lone, "seconds": secs})
    );
    Ok(())
}
