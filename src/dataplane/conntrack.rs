//! Reading and expiring the conntrack map from user space.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapMut};

use super::abi::{bytes, from_bytes, Flow, FlowKey, DIR_TO_BACKEND, DIR_TO_CLIENT};

const TCP_FIN: u32 = 0x01;
const TCP_RST: u32 = 0x04;

/// One conntrack entry, decoded.
#[derive(Debug, Clone, Copy)]
pub struct FlowEntry {
    pub key: FlowKey,
    pub flow: Flow,
}

impl FlowEntry {
    pub fn is_forward(&self) -> bool {
        self.flow.dir == DIR_TO_BACKEND
    }
    pub fn src(&self) -> (Ipv4Addr, u16) {
        (addr(self.key.saddr), u16::from_be(self.key.sport))
    }
    pub fn dst(&self) -> (Ipv4Addr, u16) {
        (addr(self.key.daddr), u16::from_be(self.key.dport))
    }
    /// The tuple packets are rewritten to: (src, dst).
    pub fn nat(&self) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
        let f = &self.flow;
        ((addr(f.nat_saddr), u16::from_be(f.nat_sport)), (addr(f.nat_daddr), u16::from_be(f.nat_dport)))
    }
}

fn addr(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

/// The key of the entry that carries the other direction: the reverse of
/// this entry's rewritten tuple.
pub fn peer_key(f: &Flow) -> FlowKey {
    FlowKey {
        saddr: f.nat_daddr,
        daddr: f.nat_saddr,
        sport: f.nat_dport,
        dport: f.nat_sport,
        proto: 6,
        pad: [0; 3],
    }
}

/// A TCP connection's state as XLB sees it, from the flags seen each way.
pub fn connection_state(fwd: &Flow, rev: Option<&Flow>) -> &'static str {
    let (f, r) = (fwd.tcp_flags, rev.map_or(0, |r| r.tcp_flags));
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    if (f | r) & TCP_RST != 0 {
        "reset"
    } else if f & TCP_FIN != 0 && r & TCP_FIN != 0 {
        "closed"
    } else if (f | r) & TCP_FIN != 0 {
        "closing"
    } else if r & SYN != 0 && f & ACK != 0 {
        "established"
    } else {
        "syn_sent"
    }
}

/// One connection, both entries decoded (for inspection).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Connection {
    pub client: std::net::SocketAddrV4,
    pub listen: std::net::SocketAddrV4,
    pub backend: std::net::SocketAddrV4,
    pub nat_port: u16,
    pub state: &'static str,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub backend_id: u32,
    pub traffic: Traffic,
}

/// Pairs up entries into connections.
pub fn connections(all: &[FlowEntry], now_ns: u64) -> Vec<Connection> {
    let by_key: HashMap<Vec<u8>, &Flow> = all.iter().map(|e| (bytes(&e.key).to_vec(), &e.flow)).collect();
    let secs = |ns: u64| now_ns.saturating_sub(ns) as f64 / 1e9;
    let mut out: Vec<Connection> = all
        .iter()
        .filter(|e| e.is_forward())
        .map(|e| {
            let rev = by_key.get(bytes(&peer_key(&e.flow))).copied();
            let ((_, nat_port), backend) = e.nat();
            let last = rev.map_or(e.flow.last_seen_ns, |r| r.last_seen_ns.max(e.flow.last_seen_ns));
            Connection {
                client: std::net::SocketAddrV4::new(e.src().0, e.src().1),
                listen: std::net::SocketAddrV4::new(e.dst().0, e.dst().1),
                backend: std::net::SocketAddrV4::new(backend.0, backend.1),
                nat_port,
                state: connection_state(&e.flow, rev),
                age_secs: secs(e.flow.created_ns),
                idle_secs: secs(last),
                backend_id: e.flow.backend_id,
                traffic: rev.map_or(Traffic::default(), |r| Traffic::of(&e.flow, r)),
            }
        })
        .collect();
    out.sort_by_key(|c| c.client);
    out
}

/// Every connection in an instance's pinned conntrack map: works while the
/// instance runs, and after it crashed.
pub fn pinned_connections(pins: &super::pins::PinDir) -> Result<Vec<Connection>> {
    let path = pins.map("conntrack");
    let map = libbpf_rs::MapHandle::from_pinned_path(&path).with_context(|| {
        format!("opening {} (is the instance running, and are you root?)", path.display())
    })?;
    Ok(connections(&read_all(&map)?, super::now_ns()))
}

/// When connections are removed.
#[derive(Debug, Clone, Copy)]
pub struct GcPolicy {
    /// Now, on the clock of bpf_ktime_get_coarse_ns (see `now_ns`).
    pub now_ns: u64,
    /// Idle connections in any state are removed after this long.
    pub idle_ns: u64,
    /// Closed connections (FIN both ways, or RST) after this long idle.
    pub closed_ns: u64,
    /// Connections whose handshake never completed (a SYN flood, a dead
    /// backend) after this long idle.
    pub half_open_ns: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Open connections (tracked, and not closed both ways or reset).
    pub active: u64,
    /// Pairs removed because both sides closed or one reset.
    pub closed: u64,
    /// Pairs removed because they idled past the orphan TTL.
    pub orphaned: u64,
    /// Entries whose peer was missing, removed.
    pub unpaired: u64,
    /// Per backend address (ids are per process; adopted connections carry
    /// the earlier process's): live connections, and what this sweep removed.
    pub per_backend: HashMap<std::net::Ipv4Addr, BackendFlows>,
    /// Backend addresses of the open connections: where traffic still goes.
    /// By address, not id: ids are per process, and adopted connections
    /// carry the earlier process's.
    pub backend_addrs: std::collections::BTreeSet<std::net::Ipv4Addr>,
    /// Per backend address, since load: the traffic of connections the data
    /// path removed itself (a SYN reusing a closed tuple), which no sweep
    /// saw end.
    pub retired: HashMap<std::net::Ipv4Addr, Traffic>,
}

/// Traffic of one backend's connections as one sweep saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendFlows {
    /// Open connections.
    pub active: u64,
    /// Bytes/packets of the live connections, client -> backend and back.
    pub live: Traffic,
    /// Connections removed by this sweep, by how they ended.
    pub closed_fin: u64,
    pub closed_rst: u64,
    pub orphaned: u64,
    /// Final bytes/packets of the connections this sweep removed.
    pub removed: Traffic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    pub bytes_to_backend: u64,
    pub packets_to_backend: u64,
    pub bytes_to_client: u64,
    pub packets_to_client: u64,
}

impl Traffic {
    fn of(fwd: &Flow, rev: &Flow) -> Traffic {
        Traffic {
            bytes_to_backend: fwd.bytes,
            packets_to_backend: fwd.packets,
            bytes_to_client: rev.bytes,
            packets_to_client: rev.packets,
        }
    }

    /// What grew from `earlier` to this (cumulative) reading.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            bytes_to_backend: self.bytes_to_backend.saturating_sub(earlier.bytes_to_backend),
            packets_to_backend: self.packets_to_backend.saturating_sub(earlier.packets_to_backend),
            bytes_to_client: self.bytes_to_client.saturating_sub(earlier.bytes_to_client),
            packets_to_client: self.packets_to_client.saturating_sub(earlier.packets_to_client),
        }
    }

    pub fn add(&mut self, o: &Traffic) {
        self.bytes_to_backend += o.bytes_to_backend;
        self.packets_to_backend += o.packets_to_backend;
        self.bytes_to_client += o.bytes_to_client;
        self.packets_to_client += o.packets_to_client;
    }
}

const BATCH: u32 = 8192;

pub(super) fn entries(map: &MapMut<'_>) -> Result<Vec<FlowEntry>> {
    read_all(map)
}

/// Every entry, read in batches until the kernel says the table ended.
/// (A hash map returns whole buckets per batch, so a short batch is normal:
/// only ENOENT means the end. libbpf-rs's batch iterator stops at the first
/// short batch, which would make a sweep see part of a large table.)
pub fn read_all(map: &dyn MapCore) -> Result<Vec<FlowEntry>> {
    use std::os::fd::AsRawFd;
    let (ks, vs) = (std::mem::size_of::<FlowKey>(), std::mem::size_of::<Flow>());
    anyhow::ensure!(
        ks == map.key_size() as usize && vs == map.value_size() as usize,
        "the conntrack map's layout differs from this binary's"
    );
    let mut keys = vec![0u8; BATCH as usize * ks];
    let mut vals = vec![0u8; BATCH as usize * vs];
    // The batch token is a u32 bucket index for hash maps; room to spare.
    let (mut token_in, mut token_out) = ([0u8; 16], [0u8; 16]);
    let opts = libbpf_rs::libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_batch_opts>() as _,
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut first = true;
    // Bounded: every call returns at least one bucket or ends the table.
    for _ in 0..=map.max_entries() as usize + 1 {
        let mut count = BATCH;
        // SAFETY: buffers sized for BATCH keys and values; tokens larger than
        // the kernel's; the fd is the map's.
        let ret = unsafe {
            libbpf_rs::libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                if first { std::ptr::null_mut() } else { token_in.as_mut_ptr().cast() },
                token_out.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                vals.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        for i in 0..count as usize {
            out.push(FlowEntry {
                key: from_bytes(&keys[i * ks..(i + 1) * ks]),
                flow: from_bytes(&vals[i * vs..(i + 1) * vs]),
            });
        }
        if ret == -nix::libc::ENOENT {
            return Ok(out);
        }
        if ret < 0 {
            return Err(std::io::Error::from_raw_os_error(-ret)).context("reading conntrack");
        }
        token_in = token_out;
        first = false;
    }
    anyhow::bail!("reading conntrack did not end")
}

pub(super) fn expire(map: &MapMut<'_>, p: &GcPolicy) -> Result<GcStats> {
    let all = entries(map)?;
    let mut by_key = HashMap::with_capacity(all.len());
    for e in &all {
        by_key.insert(bytes(&e.key).to_vec(), e.flow);
    }
    let mut stats = GcStats::default();
    let idle_for = |f: &Flow| p.now_ns.saturating_sub(f.last_seen_ns);
    for e in all.iter().filter(|e| e.is_forward()) {
        let rk = peer_key(&e.flow);
        let Some(rev) = by_key.get(bytes(&rk)) else {
            // A pair is created reverse-first, so a lone forward entry is a
            // bug or a half-finished insert; give it the closed grace period.
            // Its peer's absence is confirmed by key, never from the sweep.
            if idle_for(&e.flow) > p.closed_ns && !exists(map, &rk) {
                delete(map, &e.key)?;
                stats.unpaired += 1;
            }
            continue;
        };
        let idle = idle_for(&e.flow).min(idle_for(rev));
        let state = connection_state(&e.flow, Some(rev));
        let reset = state == "reset";
        let closed = reset || state == "closed";
        let traffic = Traffic::of(&e.flow, rev);
        let backend = std::net::Ipv4Addr::from(e.flow.nat_daddr.to_ne_bytes());
        let b = stats.per_backend.entry(backend).or_default();
        if closed && idle > p.closed_ns {
            stats.closed += 1;
            if reset {
                b.closed_rst += 1;
            } else {
                b.closed_fin += 1;
            }
        } else if idle > p.idle_ns || (state == "syn_sent" && idle > p.half_open_ns) {
            stats.orphaned += 1;
            b.orphaned += 1;
        } else {
            // Closed ones only wait out their grace period: not active.
            if !closed {
                stats.active += 1;
                b.active += 1;
                stats.backend_addrs.insert(backend);
            }
            b.live.add(&traffic);
            continue;
        }
        // The sweep judged a snapshot: if the connection moved since (a
        // packet, or its tuple reused for a new one), leave it for next time.
        if !unchanged(map, &e.key, &e.flow) {
            stats.active += 1;
            stats.backend_addrs.insert(backend);
            continue;
        }
        b.removed.add(&traffic);
        // Forward first: once it is gone no client packet can use the NAT
        // port, and only then is the port freed with the reverse.
        delete(map, &e.key)?;
        delete(map, &rk)?;
    }
    // Reverse entries whose forward entry is gone (insert raced, or a crash).
    for e in all.iter().filter(|e| e.flow.dir == DIR_TO_CLIENT) {
        let fk = peer_key(&e.flow);
        if !by_key.contains_key(bytes(&fk)) && idle_for(&e.flow) > p.closed_ns && !exists(map, &fk) {
            delete(map, &e.key)?;
            stats.unpaired += 1;
        }
    }
    Ok(stats)
}

fn exists(map: &MapMut<'_>, key: &FlowKey) -> bool {
    // On a failed lookup, assume it exists: never delete on doubt.
    !matches!(map.lookup(bytes(key), MapFlags::ANY), Ok(None))
}

fn unchanged(map: &MapMut<'_>, key: &FlowKey, seen: &Flow) -> bool {
    match map.lookup(bytes(key), MapFlags::ANY) {
        Ok(Some(v)) => {
            let now: Flow = from_bytes(&v);
            now.created_ns == seen.created_ns
                && now.nat_sport == seen.nat_sport
                && now.last_seen_ns == seen.last_seen_ns
        }
        _ => false,
    }
}

fn delete(map: &MapMut<'_>, key: &FlowKey) -> Result<()> {
    match map.delete(bytes(key)) {
        Ok(()) => Ok(()),
        // Already gone (the program or another sweep removed it): fine.
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context("deleting a conntrack entry"),
    }
}
