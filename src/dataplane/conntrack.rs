//! Reading and expiring the conntrack map from user space.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapMut};

use super::abi::tcp_flags::{
    CT_ANSWERED, CT_CLOSED, CT_ESTABLISHED, CT_FIN_FIRST, CT_RESET, FIN as TCP_FIN, RST as TCP_RST,
};
use super::abi::{bytes, from_bytes, Flow, FlowKey, DIR_TO_BACKEND, DIR_TO_CLIENT};

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

/// Whether `peer` is the other half of the entry keyed `key`: a NAT port
/// taken over, or a connection moved to another backend, leaves an entry
/// whose peer key finds someone else's entry (conntrack.h flow_pairs_with).
pub fn pairs_with(peer: &Flow, key: &FlowKey) -> bool {
    peer.nat_daddr == key.saddr
        && peer.nat_dport == key.sport
        && peer.nat_saddr == key.daddr
        && peer.nat_sport == key.dport
}

/// Whether the backend closed first, so it holds the 4-tuple in TIME_WAIT
/// and the NAT port must stay reserved (the reverse entry is the port's
/// tombstone). A reset ends TIME_WAIT: no hold then.
fn backend_holds_time_wait(rev: &Flow) -> bool {
    rev.tcp_flags & CT_FIN_FIRST != 0 && rev.tcp_flags & (CT_CLOSED | CT_RESET) == CT_CLOSED
}

/// A TCP connection's state as XLB sees it, from the flags seen each way.
pub fn connection_state(fwd: &Flow, rev: Option<&Flow>) -> &'static str {
    let (f, r) = (fwd.tcp_flags, rev.map_or(0, |r| r.tcp_flags));
    if (f | r) & TCP_RST != 0 {
        "reset"
    } else if f & TCP_FIN != 0 && r & TCP_FIN != 0 {
        "closed"
    } else if (f | r) & TCP_FIN != 0 {
        "closing"
    } else if (f | r) & CT_ESTABLISHED != 0 {
        // The data path's mark, not the flags seen: a forged ACK sets ACK,
        // and a proxied client's handshake ACK became the backend's SYN.
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

/// One connection from its forward entry and, when it pairs, its reverse.
fn connection(e: &FlowEntry, rev: Option<&Flow>, now_ns: u64) -> Connection {
    let secs = |ns: u64| now_ns.saturating_sub(ns) as f64 / 1e9;
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
}

/// Every connection (forward entry) in the map, batch by batch: each one's
/// reverse entry is looked up by key, so memory stays one batch whatever
/// the table holds.
pub fn for_each_connection(map: &dyn MapCore, now_ns: u64, mut f: impl FnMut(Connection)) -> Result<()> {
    for_each_batch(map, |batch| {
        for e in batch.iter().filter(|e| e.is_forward()) {
            let rev = lookup(map, &peer_key(&e.flow))?.filter(|r| pairs_with(r, &e.key));
            f(connection(e, rev.as_ref(), now_ns));
        }
        Ok(())
    })
}

/// Open connections (not closed both ways, not reset) right now.
pub(super) fn open_connections(map: &dyn MapCore) -> Result<u64> {
    let mut open = 0;
    for_each_connection(map, super::now_ns(), |c| {
        if c.state != "closed" && c.state != "reset" {
            open += 1;
        }
    })?;
    Ok(open)
}

/// Connections (forward entries) in the map, whatever their state.
pub(super) fn count_connections(map: &dyn MapCore) -> Result<u64> {
    let mut n = 0;
    for_each_batch(map, |batch| {
        n += batch.iter().filter(|e| e.is_forward()).count() as u64;
        Ok(())
    })?;
    Ok(n)
}

/// Every connection in an instance's pinned conntrack map: works while the
/// instance runs, and after it crashed. Holds the answer and one batch,
/// never a second copy of the table.
pub fn pinned_connections(pins: &super::pins::PinDir) -> Result<Vec<Connection>> {
    let path = pins.map("conntrack");
    let map = libbpf_rs::MapHandle::from_pinned_path(&path).with_context(|| {
        format!("opening {} (is the instance running, and are you root?)", path.display())
    })?;
    let mut out = Vec::new();
    for_each_connection(&map, super::now_ns(), |c| out.push(c))?;
    out.sort_by_key(|c| c.client);
    Ok(out)
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
    /// Closed connections whose backend closed first, after this long idle:
    /// their NAT port stays reserved while the backend holds the 4-tuple in
    /// TIME_WAIT (60 s on Linux).
    pub tombstone_ns: u64,
    /// Connections whose handshake never completed (a SYN flood, a dead
    /// backend) after this long idle.
    pub half_open_ns: u64,
    /// Passive health: count the connections whose backend has not answered
    /// their SYN and that were created in (after, upto] (CLOCK_MONOTONIC
    /// ns). Successive sweeps give adjoining ranges, so each unanswered SYN
    /// is counted once, by the first sweep after its deadline.
    pub unanswered_created: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Open connections (tracked, and not closed both ways or reset).
    pub active: u64,
    /// Of `active`, those whose handshake has not completed (syn_sent): a
    /// SYN flood's state, or connections still opening.
    pub half_open: u64,
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
    pub retired: HashMap<std::net::Ipv4Addr, RetiredFlows>,
    /// Per backend address, since load: how it answered new connections.
    pub handshakes: HashMap<std::net::Ipv4Addr, super::Handshakes>,
}

/// Connections of one backend the data path ended itself (reopened or taken
/// over; cumulative since load): ended by FIN and by RST, and their traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetiredFlows {
    pub closed_fin: u64,
    pub closed_rst: u64,
    pub traffic: Traffic,
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
    /// Closed connections still in the table (holding their NAT port), by
    /// how they ended: closed, though not yet removed.
    pub held_fin: u64,
    pub held_rst: u64,
    pub orphaned: u64,
    /// Final bytes/packets of the connections this sweep removed.
    pub removed: Traffic,
    /// Connections whose SYN the backend left unanswered past the deadline
    /// (`GcPolicy::unanswered_created`).
    pub syn_timeouts: u64,
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

/// Entries one batch read asks for: whole hash buckets come back, so a
/// batch holds about this many (16 + 64 bytes each, decoded once more).
const BATCH: u32 = 8192;

pub(super) fn entries(map: &MapMut<'_>) -> Result<Vec<FlowEntry>> {
    read_all(map)
}

/// Every entry, in one Vec (tests, the bench and inspection tools: the
/// running daemon walks the map with `for_each_batch` instead).
pub fn read_all(map: &dyn MapCore) -> Result<Vec<FlowEntry>> {
    let mut out = Vec::new();
    for_each_batch(map, |batch| {
        out.extend_from_slice(batch);
        Ok(())
    })?;
    Ok(out)
}

/// Walks every entry, one batch at a time, until the kernel says the table
/// ended: memory is one batch, whatever the table holds. (A hash map returns
/// whole buckets per batch, so a short batch is normal: only ENOENT means the
/// end. libbpf-rs's batch iterator stops at the first short batch, which
/// would make a sweep see part of a large table.)
///
/// `f` may delete and update entries: the batch token is a bucket index, so
/// entries of buckets already read are not read again, and an entry deleted
/// from a bucket not yet read is simply not seen. An entry is never seen
/// twice in one walk (a key always hashes to the same bucket).
pub fn for_each_batch(map: &dyn MapCore, mut f: impl FnMut(&[FlowEntry]) -> Result<()>) -> Result<()> {
    use std::os::fd::AsRawFd;
    let (ks, vs) = (std::mem::size_of::<FlowKey>(), std::mem::size_of::<Flow>());
    anyhow::ensure!(
        ks == map.key_size() as usize && vs == map.value_size() as usize,
        "the conntrack map's layout differs from this binary's"
    );
    let mut keys = vec![0u8; BATCH as usize * ks];
    let mut vals = vec![0u8; BATCH as usize * vs];
    let mut batch = Vec::with_capacity(BATCH as usize);
    // The batch token is a u32 bucket index for hash maps; room to spare.
    let (mut token_in, mut token_out) = ([0u8; 16], [0u8; 16]);
    let opts = libbpf_rs::libbpf_sys::bpf_map_batch_opts {
        sz: std::mem::size_of::<libbpf_rs::libbpf_sys::bpf_map_batch_opts>() as _,
        ..Default::default()
    };
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
        if ret < 0 && ret != -nix::libc::ENOENT {
            return Err(std::io::Error::from_raw_os_error(-ret)).context("reading conntrack");
        }
        batch.clear();
        for i in 0..count as usize {
            batch.push(FlowEntry {
                key: from_bytes(&keys[i * ks..(i + 1) * ks]),
                flow: from_bytes(&vals[i * vs..(i + 1) * vs]),
            });
        }
        f(&batch)?;
        if ret == -nix::libc::ENOENT {
            return Ok(());
        }
        token_in = token_out;
        first = false;
    }
    anyhow::bail!("reading conntrack did not end")
}

/// Removes what `p` says has ended, batch by batch (memory: one batch and the
/// per-backend tallies). Each forward entry's reverse is looked up by key;
/// a reverse entry costs a lookup only when it has idled past its hold, to
/// learn whether a forward entry still carries it.
pub(super) fn expire(map: &MapMut<'_>, p: &GcPolicy) -> Result<GcStats> {
    let mut stats = GcStats::default();
    for_each_batch(map, |batch| {
        for e in batch.iter().filter(|e| e.is_forward()) {
            expire_pair(map, p, e, &mut stats)?;
        }
        for e in batch.iter().filter(|e| e.flow.dir == DIR_TO_CLIENT) {
            expire_lone_reverse(map, p, e, &mut stats)?;
        }
        Ok(())
    })?;
    Ok(stats)
}

/// A forward entry and the reverse entry it pairs with: counted, or removed
/// together when the connection has ended.
fn expire_pair(map: &MapMut<'_>, p: &GcPolicy, e: &FlowEntry, stats: &mut GcStats) -> Result<()> {
    let idle_for = |f: &Flow| p.now_ns.saturating_sub(f.last_seen_ns);
    let rk = peer_key(&e.flow);
    let Some(rev) = lookup(map, &rk)?.filter(|r| pairs_with(r, &e.key)) else {
        // A pair is created reverse-first, so a lone forward entry is a
        // half-finished insert, or its port was taken over (nat.h); give
        // it the closed grace period. Its peer's absence was just read by
        // key, never from an earlier reading.
        if idle_for(&e.flow) > p.closed_ns && unchanged(map, &e.key, &e.flow) {
            delete(map, &e.key)?;
            stats.unpaired += 1;
        }
        return Ok(());
    };
    let idle = idle_for(&e.flow).min(idle_for(&rev));
    let state = connection_state(&e.flow, Some(&rev));
    let reset = state == "reset";
    let closed = reset || state == "closed";
    let hold = if backend_holds_time_wait(&rev) { p.tombstone_ns } else { p.closed_ns };
    let traffic = Traffic::of(&e.flow, &rev);
    let backend = std::net::Ipv4Addr::from(e.flow.nat_daddr.to_ne_bytes());
    let b = stats.per_backend.entry(backend).or_default();
    // The data path noted no answer of the backend's to the SYN
    // (handshake.h): it is unanswered (the entry is precise-timed from the
    // SYN, conntrack.h).
    if let Some((after, upto)) = p.unanswered_created {
        let answered = rev.tcp_flags & CT_ANSWERED != 0;
        if !answered && rev.created_ns > after && rev.created_ns <= upto {
            b.syn_timeouts += 1;
        }
    }
    if closed && idle > hold {
        stats.closed += 1;
        if reset {
            b.closed_rst += 1;
        } else {
            b.closed_fin += 1;
        }
    } else if idle > p.idle_ns || (state == "syn_sent" && idle_for(&e.flow) > p.half_open_ns) {
        // A half-open pair idles from the client side only: a backend
        // retransmitting its SYN-ACK to a forged client keeps nothing alive.
        stats.orphaned += 1;
        b.orphaned += 1;
    } else {
        // Closed ones only hold their port: not active.
        if reset {
            b.held_rst += 1;
        } else if closed {
            b.held_fin += 1;
        } else {
            stats.active += 1;
            stats.half_open += u64::from(state == "syn_sent");
            b.active += 1;
            stats.backend_addrs.insert(backend);
        }
        b.live.add(&traffic);
        return Ok(());
    }
    // The sweep judged what it read: if the connection moved since (a
    // packet, or its tuple reopened for a new one), leave it for later.
    // Each entry is taken out atomically and put back if it moved in the
    // moment between: a SYN reopening the pair then keeps both halves.
    if !unchanged(map, &e.key, &e.flow) || !take(map, &e.key, &e.flow)? {
        stats.active += 1;
        stats.backend_addrs.insert(backend);
        return Ok(());
    }
    b.removed.add(&traffic);
    // Forward first: once it is gone no client packet can use the NAT
    // port, and only then is the port freed with the reverse.
    take(map, &rk, &rev)?;
    Ok(())
}

/// A reverse entry whose forward entry is gone or moved on: a half-finished
/// insert, a crash, or the tombstone of a connection that moved to another
/// backend, which holds its port as long as a paired one would. One whose
/// forward entry pairs with it is that forward entry's to judge (and count),
/// whichever batch it is in.
fn expire_lone_reverse(map: &MapMut<'_>, p: &GcPolicy, e: &FlowEntry, stats: &mut GcStats) -> Result<()> {
    let hold = if backend_holds_time_wait(&e.flow) { p.tombstone_ns } else { p.closed_ns };
    if p.now_ns.saturating_sub(e.flow.last_seen_ns) <= hold {
        return Ok(());
    }
    if !paired(map, &peer_key(&e.flow), &e.key)
        && unchanged(map, &e.key, &e.flow)
        && take(map, &e.key, &e.flow)?
    {
        stats.unpaired += 1;
    }
    Ok(())
}

/// The entry keyed `key`, read into place (no allocation: the sweep does
/// this once per connection).
fn lookup(map: &dyn MapCore, key: &FlowKey) -> Result<Option<Flow>> {
    let mut v = Flow::default();
    let found = map
        .lookup_into(bytes(key), super::abi::bytes_mut(&mut v), MapFlags::ANY)
        .context("reading a conntrack entry")?;
    Ok(found.then_some(v))
}

/// Whether the entry keyed `key` exists and pairs with `with`. On a failed
/// lookup, assume it does: never delete on doubt.
fn paired(map: &MapMut<'_>, key: &FlowKey, with: &FlowKey) -> bool {
    match lookup(map, key) {
        Ok(Some(v)) => pairs_with(&v, with),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Removes an entry the sweep judged from `seen`, atomically; one that moved
/// in the meantime is put back (the data path rewrites an entry whole when it
/// reopens it). Whether this call removed the judged entry (not if it had
/// gone already, or moved).
fn take(map: &MapMut<'_>, key: &FlowKey, seen: &Flow) -> Result<bool> {
    let now: Flow = match map.lookup_and_delete(bytes(key)) {
        Ok(Some(v)) => from_bytes(&v),
        // Gone already: the data path recycled or reopened it meanwhile, so
        // what the sweep judged is no more; its partner stays.
        Ok(None) => return Ok(false),
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).context("deleting a conntrack entry"),
    };
    if same(&now, seen) {
        return Ok(true);
    }
    match map.update(bytes(key), bytes(&now), MapFlags::NO_EXIST) {
        // Taken again by then: the newer entry stands.
        Ok(()) | Err(_) => Ok(false),
    }
}

fn unchanged(map: &MapMut<'_>, key: &FlowKey, seen: &Flow) -> bool {
    match lookup(map, key) {
        Ok(Some(v)) => same(&v, seen),
        _ => false,
    }
}

fn same(now: &Flow, seen: &Flow) -> bool {
    now.created_ns == seen.created_ns
        && now.nat_sport == seen.nat_sport
        && now.nat_daddr == seen.nat_daddr
        && now.last_seen_ns == seen.last_seen_ns
}

fn delete(map: &MapMut<'_>, key: &FlowKey) -> Result<()> {
    match map.delete(bytes(key)) {
        Ok(()) => Ok(()),
        // Already gone (the program or another sweep removed it): fine.
        Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context("deleting a conntrack entry"),
    }
}
