//! The per-CPU outcome counters, summed and named.

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapMut};

use super::abi::CounterId;

pub type Counter = CounterId;

/// Every counter with its stable name (metric label and status key).
pub const ALL: &[(Counter, &str)] = &[
    (Counter::XLB_CNT_PASS_NOT_IPV4, "pass_not_ipv4"),
    (Counter::XLB_CNT_PASS_VLAN, "pass_vlan"),
    (Counter::XLB_CNT_PASS_MALFORMED, "pass_malformed"),
    (Counter::XLB_CNT_PASS_NOT_TCP, "pass_not_tcp"),
    (Counter::XLB_CNT_PASS_FRAGMENT, "pass_fragment"),
    (Counter::XLB_CNT_PASS_NOT_OURS, "pass_not_ours"),
    (Counter::XLB_CNT_PASS_NO_NEIGH, "pass_no_neigh"),
    (Counter::XLB_CNT_PASS_FOREIGN_EGRESS, "pass_foreign_egress"),
    (Counter::XLB_CNT_FWD_TO_BACKEND, "fwd_to_backend"),
    (Counter::XLB_CNT_FWD_TO_CLIENT, "fwd_to_client"),
    (Counter::XLB_CNT_NEW_FLOW, "new_flow"),
    (Counter::XLB_CNT_DROP_NO_FLOW, "drop_no_flow"),
    (Counter::XLB_CNT_DROP_NO_BACKEND, "drop_no_backend"),
    (Counter::XLB_CNT_DROP_NAT_EXHAUSTED, "drop_nat_exhausted"),
    (Counter::XLB_CNT_DROP_CT_FULL, "drop_ct_full"),
    (Counter::XLB_CNT_DROP_FIB, "drop_fib"),
    (Counter::XLB_CNT_DROP_TTL, "drop_ttl"),
    (Counter::XLB_CNT_DRAIN_RST, "drain_rst"),
    (Counter::XLB_CNT_FWD_ICMP, "fwd_icmp"),
    (Counter::XLB_CNT_TTL_EXCEEDED, "icmp_ttl_exceeded"),
    (Counter::XLB_CNT_FRAG_NEEDED, "icmp_frag_needed"),
    (Counter::XLB_CNT_DROP_ICMP_LIMIT, "drop_icmp_ratelimit"),
    (Counter::XLB_CNT_ICMP_MTU_FLOOR, "icmp_mtu_floor"),
    (Counter::XLB_CNT_PASS_AGGREGATE, "pass_aggregate"),
    (Counter::XLB_CNT_NAT_PRESERVED, "nat_port_preserved"),
    (Counter::XLB_CNT_NAT_DERIVED, "nat_port_derived"),
    (Counter::XLB_CNT_NAT_PROBED, "nat_port_probed"),
    (Counter::XLB_CNT_NAT_RECLAIMED, "nat_port_reclaimed"),
    (Counter::XLB_CNT_NAT_COLLISION, "nat_port_collision"),
    (Counter::XLB_CNT_CT_REOPENED, "ct_reopened"),
    (Counter::XLB_CNT_NEXTHOP_MISS, "nexthop_miss"),
    (Counter::XLB_CNT_UNKNOWN_FLOW_RST, "rst_unknown_flow"),
    (Counter::XLB_CNT_DROP_RST_LIMIT, "drop_rst_ratelimit"),
    (Counter::XLB_CNT_DROP_RST_CSUM, "drop_rst_bad_csum"),
    (Counter::XLB_CNT_DROP_RST_WINDOW, "drop_rst_out_of_window"),
    (Counter::XLB_CNT_DROP_REPLY_IFACE, "drop_reply_wrong_iface"),
    (Counter::XLB_CNT_DROP_DRAIN_LIMIT, "drop_drain_rst_ratelimit"),
    (Counter::XLB_CNT_NAT_RECYCLED, "nat_port_recycled"),
    (Counter::XLB_CNT_SYNPROXY_COOKIE, "synproxy_cookie_sent"),
    (Counter::XLB_CNT_SYNPROXY_VALID, "synproxy_cookie_valid"),
    (Counter::XLB_CNT_SYNPROXY_FAILED, "synproxy_cookie_failed"),
    (Counter::XLB_CNT_SYNPROXY_RESENT, "synproxy_syn_resent"),
    (Counter::XLB_CNT_SYNPROXY_ACKED, "synproxy_backend_acked"),
    (Counter::XLB_CNT_DROP_SYNPROXY_WAIT, "drop_synproxy_waiting"),
    (Counter::XLB_CNT_DROP_SYN_CSUM, "drop_syn_bad_csum"),
];

/// The stable name of a counter.
pub fn counter_name(c: Counter) -> &'static str {
    ALL[c.0 as usize].1
}

/// A snapshot of all counters, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    values: Vec<u64>,
}

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.values.get(c.0 as usize).copied().unwrap_or(0)
    }

    /// (name, value) for every counter, in ABI order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ALL.iter().map(|&(c, name)| (name, self.get(c)))
    }

    /// What moved between `earlier` and this snapshot.
    pub fn since(&self, earlier: &Counters) -> Counters {
        let values = (0..self.values.len())
            .map(|i| self.values[i].saturating_sub(earlier.values.get(i).copied().unwrap_or(0)))
            .collect();
        Counters { values }
    }
}

pub(super) fn read(map: &MapMut<'_>) -> Result<Counters> {
    let mut values = vec![0u64; Counter::XLB_CNT_MAX.0 as usize];
    for (i, v) in values.iter_mut().enumerate() {
        let per_cpu = map
            .lookup_percpu(&(i as u32).to_ne_bytes(), MapFlags::ANY)
            .context("reading the counters map")?
            .unwrap_or_default();
        *v = per_cpu.iter().map(|b| u64::from_ne_bytes(b[..8].try_into().expect("u64 counter"))).sum();
    }
    Ok(Counters { values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_one_name_in_abi_order() {
        assert_eq!(ALL.len(), Counter::XLB_CNT_MAX.0 as usize);
        for (i, (c, _)) in ALL.iter().enumerate() {
            assert_eq!(c.0 as usize, i);
        }
        let mut names: Vec<_> = ALL.iter().map(|(_, n)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }
}
