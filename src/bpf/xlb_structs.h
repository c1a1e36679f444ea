/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The ABI between the XDP program and the control plane. The Rust side uses
 * the skeleton's generated copies of these types, never hand-written ones,
 * so every struct is padded explicitly: what clang lays out is what Rust gets.
 * Addresses and ports are in network byte order unless a field says otherwise.
 */
#ifndef XLB_STRUCTS_H
#define XLB_STRUCTS_H

#include <linux/types.h>
#include "xlb_consts.h"

/* One per packet outcome; the per-CPU `counters` map has a slot for each. */
enum xlb_counter {
	XLB_CNT_PASS_NOT_IPV4 = 0,   /* ARP, IPv6, ... */
	XLB_CNT_PASS_VLAN,	     /* 802.1Q/802.1ad tagged: not handled yet */
	XLB_CNT_PASS_MALFORMED,	     /* truncated or inconsistent headers */
	XLB_CNT_PASS_NOT_TCP,	     /* ICMP, UDP, ... */
	XLB_CNT_PASS_FRAGMENT,	     /* IPv4 fragments */
	XLB_CNT_PASS_NOT_OURS,	     /* other address or port */
	XLB_CNT_PASS_NO_NEIGH,	     /* next hop unresolved: kernel forwards it */
	XLB_CNT_PASS_FOREIGN_EGRESS, /* egress has no XLB program: kernel forwards */
	XLB_CNT_FWD_TO_BACKEND,	     /* client packet sent to a backend */
	XLB_CNT_FWD_TO_CLIENT,	     /* backend reply sent to the client */
	XLB_CNT_NEW_FLOW,	     /* connections opened */
	XLB_CNT_DROP_NO_FLOW,	     /* non-SYN without a conntrack entry */
	XLB_CNT_DROP_NO_BACKEND,     /* SYN while the backend set is empty */
	XLB_CNT_DROP_NAT_EXHAUSTED,  /* no free NAT source port */
	XLB_CNT_DROP_CT_FULL,	     /* conntrack at capacity */
	XLB_CNT_DROP_FIB,	     /* no route / unreachable / MTU */
	XLB_CNT_DROP_TTL,	     /* TTL would reach zero */
	XLB_CNT_DRAIN_RST,	     /* new connection refused with RST (drain) */
	XLB_CNT_FWD_ICMP,	     /* ICMP error about a flow, translated and sent on */
	XLB_CNT_TTL_EXCEEDED,	     /* answered with ICMP time exceeded */
	XLB_CNT_FRAG_NEEDED,	     /* answered with ICMP fragmentation needed */
	XLB_CNT_DROP_ICMP_LIMIT,     /* an ICMP answer over the rate limit: dropped */
	XLB_CNT_ICMP_MTU_FLOOR,	     /* a translated MTU raised to the floor */
	XLB_CNT_PASS_AGGREGATE,	     /* rewritten GRO/GSO aggregate: kernel forwards it */
	XLB_CNT_NAT_PRESERVED,	     /* NAT port: the client's own */
	XLB_CNT_NAT_DERIVED,	     /* NAT port: derived from the client tuple */
	XLB_CNT_NAT_PROBED,	     /* NAT port: a random probe */
	XLB_CNT_NAT_RECLAIMED,	     /* NAT port: a tombstone taken over (port pressure) */
	XLB_CNT_NAT_COLLISION,	     /* a NAT port choice found taken: one more try */
	XLB_CNT_CT_REOPENED,	     /* a closed connection's tuple reopened in place */
	XLB_CNT_NEXTHOP_MISS,	     /* a route looked up in the FIB, not the cache */
	XLB_CNT_UNKNOWN_FLOW_RST,    /* a non-SYN of no known connection answered with RST */
	XLB_CNT_DROP_RST_LIMIT,	     /* such a RST over the rate limit: dropped */
	XLB_CNT_DROP_RST_CSUM,	     /* a RST of a tracked connection with a bad checksum */
	XLB_CNT_DROP_RST_WINDOW,     /* a RST outside its sender's window: ignored */
	XLB_CNT_DROP_REPLY_IFACE,    /* a backend reply on an interface it is not routed by */
	XLB_CNT_DROP_DRAIN_LIMIT,    /* a drain RST over the rate limit: dropped */
	XLB_CNT_NAT_RECYCLED,	     /* NAT port: the oldest half-open pair sampled, recycled */
	XLB_CNT_SYNPROXY_COOKIE,     /* a SYN answered with a SYN cookie (SYN proxy) */
	XLB_CNT_SYNPROXY_VALID,	 /* an ACK with a valid cookie: sent to the backend as its SYN */
	XLB_CNT_SYNPROXY_FAILED, /* an ACK of no connection whose cookie failed */
	XLB_CNT_SYNPROXY_RESENT, /* the backend's SYN sent again (the client's ACK retransmitted) */
	XLB_CNT_SYNPROXY_ACKED,	 /* the backend's SYN-ACK answered with its ACK */
	XLB_CNT_DROP_SYNPROXY_WAIT, /* client data before the backend answered: dropped, resent */
	XLB_CNT_DROP_SYN_CSUM,	    /* a SYN with a bad checksum: it would open nothing */
	XLB_CNT_MAX,
};

struct port_map {
	__u16 local_port;  /* what clients connect to */
	__u16 remote_port; /* what backends listen on */
};

/* A token bucket's settings in nanoseconds of credit: one answer costs
 * cost_ns (1 s / rate), and at most burst_ns is saved up (burst * cost_ns).
 * cost_ns 0 means nothing is ever sent. */
struct rate_limit {
	__u64 cost_ns;
	__u64 burst_ns;
};

/* Runtime settings, written by the control plane through the skeleton's
 * .bss view. Word-sized fields are read once per packet. */
struct xlb_config {
	__u32 listen_addr; /* clients connect to listen_addr:local_port */
	/* Backends see connections from one of snat_addrs:nat_port. */
	__u32 snat_addrs[XLB_MAX_SNAT];
	__u32 nr_snat;
	__u16 nat_port_min; /* host byte order, inclusive */
	__u16 nat_port_max; /* host byte order, inclusive */
	__u32 nr_ports;
	struct port_map ports[XLB_MAX_PORTS];
	__u32 maglev_size;   /* slots in one half of the maglev map (prime) */
	__u32 maglev_active; /* 0 or 1: which half is live */
	__u32 flags;	     /* XLB_F_* */
	__u32 hash_seed;
	/* Bumped by the control plane on every link, address, route or
	 * neighbour change: cached next hops of an older one are stale. */
	__u32 nexthop_gen;
	__u32 pad;
	/* What XLB itself sends, per CPU (budget_take()), by XLB_BUDGET_*. */
	struct rate_limit limits[XLB_BUDGETS];
	/* Upper bounds of the SYN->SYN-ACK latency buckets, ascending. */
	__u64 syn_bucket_ns[XLB_SYN_BUCKETS - 1];
};

/* How a frame leaves by the interface it arrived on. XDP_TX is the fast
 * path on NICs; a veth whose peer runs no XDP program queues XDP_TX frames
 * without waking the peer, while a devmap redirect flushes it. */
enum xlb_tx {
	XLB_TX_XDP_TX = 0,
	XLB_TX_REDIRECT = 1,
};

/* An interface XLB is attached to, by ifindex (the `ifaces` map). */
struct iface {
	enum xlb_tx tx;
	__u32 flags; /* XLB_IFACE_* */
	__u32 mtu;   /* of the interface itself: bigger packets are aggregates */
	__u32 pad;
};

/* A VLAN on an interface XLB is attached to, both ways round: by the VLAN
 * interface's ifindex (where routes point) and by (lower ifindex, VLAN id)
 * (what a tagged frame carries). */
struct vlan_tag_key {
	__u32 lower_ifindex;
	__u16 vid;
	__u16 pad;
};

/* A route as bpf_fib_lookup() is asked it (the `nexthops` cache). */
struct nexthop_key {
	__u32 saddr;
	__u32 daddr;
	__u32 ifindex; /* where the packet arrived (its L3 interface) */
};

/* bpf_fib_lookup()'s answer for a nexthop_key, with the path MTU. */
struct nexthop {
	__u32 ifindex; /* egress */
	__u32 mtu;     /* the route's, as the FIB checks it */
	__u8 smac[6];
	__u8 dmac[6];
	__u32 gen;	  /* config.nexthop_gen when it was looked up */
	__u64 expires_ns; /* bpf_ktime_get_coarse_ns() */
};

/* One maglev slot: the backend that owns it. addr == 0 means empty. */
struct backend {
	__u32 addr;
	__u32 id; /* the control plane's index, for per-backend accounting */
};

/* How a backend answered the SYNs of new connections (the first answer of
 * each), per backend address: what passive health checking and the
 * latency histogram are made of. Each bucket keeps its own sum, so its mean
 * lies in it. Added to atomically: the map is shared by all CPUs. */
struct handshakes {
	__u64 refused;			   /* a RST acking the SYN */
	__u64 answered[XLB_SYN_BUCKETS];   /* SYN-ACKs, by latency bucket */
	__u64 latency_ns[XLB_SYN_BUCKETS]; /* their summed SYN->SYN-ACK time */
};

/* Connections the data path itself ended for good (a SYN reopening a closed
 * pair, or taking its port over), per backend address: the control plane's
 * sweep never sees those end, so it adds these to its totals. */
struct retired {
	__u64 connections;
	__u64 bytes_to_backend;
	__u64 packets_to_backend;
	__u64 bytes_to_client;
	__u64 packets_to_client;
	__u64 connections_reset; /* of `connections`, those that ended by a RST */
};

/* Exact 5-tuple: no lossy hashing of keys. */
struct flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

/*
 * A conntrack entry. Each connection has two: one keyed by the client's
 * tuple (dir XLB_DIR_TO_BACKEND) and one keyed by the backend's reply tuple
 * (dir XLB_DIR_TO_CLIENT). `nat_*` is what the packet is rewritten to; the
 * peer entry's key is the reverse of that tuple, so pairs can be found and
 * removed together without storing both keys.
 */
struct flow {
	__u32 nat_saddr;
	__u32 nat_daddr;
	__u16 nat_sport;
	__u16 nat_dport;
	__u32 backend_id;
	__u64 created_ns;   /* bpf_ktime_get_ns(): when the backend's SYN left */
	__u64 last_seen_ns; /* bpf_ktime_get_coarse_ns() */
	__u64 packets;
	__u64 bytes;
	__u32 tcp_flags; /* OR of the TCP flags seen in this direction, XLB_CT_* */
	__u8 dir;	 /* XLB_DIR_* */
	__u8 pad[3];
	/* Reverse entry, with XLB_CT_FIN_SEQ: the sequence number after the
	 * client's FIN, which a backend in TIME_WAIT expects next (its
	 * rcv_nxt). A SYN past it may take over the port (nat.h). */
	__u32 fin_seq;
	/* With XLB_CT_SEQ: the sequence number after the last segment this
	 * direction sent (its sender's snd_nxt as far as XLB saw). A RST from
	 * this direction must fall near it (RFC 5961). */
	__u32 seq_next;
	/* Reverse entry: the interface (L3 ifindex) the backend's replies were
	 * last found to arrive on through its route; 0 until the first one. */
	__u32 reply_ifindex;
	/* Both entries: the client's ISN (its SYN's sequence number). With
	 * XLB_CT_PROXY (both entries) also the SYN cookie XLB answered it
	 * with; once the backend answered
	 * (XLB_CT_ESTABLISHED), seq_delta is the backend's ISN minus the
	 * cookie: its sequence numbers are that far from the client's view. */
	__u32 client_isn;
	__u32 cookie;
	__u32 seq_delta;
	__u32 pad2;
};

#endif
