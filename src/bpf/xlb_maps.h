/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of the data plane, with its size and why. */
#ifndef XLB_MAPS_H
#define XLB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "xlb_structs.h"

/* Runtime settings (see struct xlb_config); lives in .bss so the control
 * plane writes it through the skeleton's typed view. */
struct xlb_config config;

/* The number of counters; also what puts enum xlb_counter into BTF, and so
 * into the skeleton's generated types. */
const volatile enum xlb_counter xlb_counter_max = XLB_CNT_MAX;

/* The ABI version this object was built with, and its pinned copy: a new
 * binary adopts pinned connections only when the two match. */
const volatile __u32 xlb_abi_version = XLB_ABI_VERSION;
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} abi SEC(".maps");

/* Both directions of every connection. A plain hash, not an LRU: a SYN flood
 * must never evict an established connection; a full table refuses new ones.
 * Preallocated: a SYN takes an element from a free list instead of the
 * allocator (2.5-4x cheaper, measured), the memory is reserved at load (and
 * is less, full, than allocated one element at a time), and what fits at
 * start fits under any load. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_CT_DEFAULT_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct flow);
} conntrack SEC(".maps");

/* Two maglev tables back to back; config.maglev_active picks one. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_MAGLEV_DEFAULT_SLOTS);
	__type(key, __u32);
	__type(value, struct backend);
} maglev SEC(".maps");

/* Interfaces carrying the XLB program, keyed by ifindex: the only places
 * XDP redirects to. Anything else is left to the kernel's forwarding. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, XLB_MAX_IFACES);
	__type(key, __u32);
	__type(value, __u32);
} tx_ports SEC(".maps");

/* Attached interfaces by ifindex: how each sends a frame back out (struct
 * iface). Missing (a test run) means XDP_TX. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_IFACES);
	__type(key, __u32);
	__type(value, struct iface);
} ifaces SEC(".maps");

/* The answer budgets of each CPU (budget_take()), by XLB_BUDGET_*: what XLB
 * itself sends goes to a source address anyone can forge. */
struct bucket {
	__u64 tokens;
	__u64 last_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XLB_BUDGETS);
	__type(key, __u32);
	__type(value, struct bucket);
} budgets SEC(".maps");

/* Takes one answer from this CPU's budget `which` (XLB_BUDGET_*): a token
 * bucket of config.limits[which], kept as credit in nanoseconds, so no
 * fraction of a token is lost between answers. */
static __always_inline int budget_take(__u32 which)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	struct bucket *b;
	__u64 credit, cost, cap;

	if (which >= XLB_BUDGETS)
		return 0;
	cost = config.limits[which].cost_ns;
	cap = config.limits[which].burst_ns;
	b = bpf_map_lookup_elem(&budgets, &which);
	if (!b || !cost)
		return 0;
	credit = now - b->last_ns;
	if (credit > cap || b->tokens > cap - credit)
		credit = cap;
	else
		credit += b->tokens;
	b->last_ns = now;
	if (credit < cost) {
		b->tokens = credit;
		return 0;
	}
	b->tokens = credit - cost;
	return 1;
}

/* Next hops as bpf_fib_lookup() found them (forward.h route()): most packets
 * take a hash lookup instead of a FIB walk. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XLB_NEXTHOP_CACHE);
	__type(key, struct nexthop_key);
	__type(value, struct nexthop);
} nexthops SEC(".maps");

/* VLAN interfaces on attached interfaces (see struct vlan_tag_key): a
 * tagged frame is ours only on a known VLAN, and leaves through XDP only
 * tagged for a VLAN on the same wire. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_VLANS);
	__type(key, struct vlan_tag_key);
	__type(value, __u32); /* the VLAN interface's ifindex */
} vlan_by_tag SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_VLANS);
	__type(key, __u32); /* the VLAN interface's ifindex */
	__type(value, struct vlan_tag_key);
} vlan_by_dev SEC(".maps");

/* struct retired by backend address; per CPU, summed in user space. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, XLB_MAX_RETIRED);
	__type(key, __u32);
	__type(value, struct retired);
} retired SEC(".maps");

/* struct handshakes by backend address. An LRU for the same reason as
 * `retired`; not per CPU: written once per connection, and per CPU it would
 * hold a copy of every backend's histogram for each CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XLB_MAX_HANDSHAKE_BACKENDS);
	__type(key, __u32);
	__type(value, struct handshakes);
} handshakes SEC(".maps");

/* One slot per enum xlb_counter; per CPU, summed in user space. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XLB_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(enum xlb_counter c)
{
	__u32 key = c;
	__u64 *v = bpf_map_lookup_elem(&counters, &key);

	if (v)
		*v += 1;
}

#endif
