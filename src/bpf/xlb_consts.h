/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every magic number of the packet path, named. */
#ifndef XLB_CONSTS_H
#define XLB_CONSTS_H

/* Layout version of the maps a restarted XLB adopts from its pins
 * (struct flow_key, struct flow). Bump on any change to them. */
#define XLB_ABI_VERSION 4

/* Port mappings one listener can carry (the config schema allows 1..8). */
#define XLB_MAX_PORTS 8

/* Source addresses backends may see (snat_ips); a power of two. */
#define XLB_MAX_SNAT 16

/* Conntrack entries are pairs (forward + reverse), so the map holds twice
 * the configured connection capacity. The real size is set at load time. */
#define XLB_CT_DEFAULT_ENTRIES (2 * 1000000)

/* Maglev table: two halves of `maglev_size` slots each; the control plane
 * fills the idle half and then flips `maglev_active`, so a packet never sees
 * a half-written table. Resized at load time. */
#define XLB_MAGLEV_DEFAULT_SLOTS (2 * 65537)

/* Interfaces XLB attaches to and may redirect to (one devmap slot each):
 * every pod veth of a busy node may carry backends. */
#define XLB_MAX_IFACES 1024

/* struct iface.flags */
#define XLB_IFACE_GENERIC (1U << 0) /* generic mode: frames may be GRO aggregates */

/* What XLB itself sends goes to a source address anyone can forge, so each
 * kind has its own per-CPU budget (struct rate_limit, set from the config's
 * rate_limits): ICMP errors it originates (time exceeded, fragmentation
 * needed), RSTs for packets of no known connection, RSTs refusing SYNs
 * while draining. */
#define XLB_BUDGET_ICMP	     0
#define XLB_BUDGET_RST	     1
#define XLB_BUDGET_DRAIN_RST 2
#define XLB_BUDGETS	     3

/* A RST or FIN is acted on only if its sequence number lies this far behind
 * or ahead of where its sender's sequence was last seen, and that mark only
 * moves forward by at most XLB_RST_AHEAD at a time (RFC 5961 §3 as a
 * middlebox can apply it: XLB does not track windows). A sender's RST
 * carries its snd_nxt, ahead of what XLB saw only by what was lost before
 * reaching it; a RST answering the peer's ACK carries that ACK, behind by
 * what was in flight. A blind attacker needs about 2^32 / 2 MiB = 2048
 * guesses per connection. */
#define XLB_RST_BEHIND (1U << 20)
#define XLB_RST_AHEAD  (1U << 20)

/* A translated "fragmentation needed" never advertises less than this (the
 * kernel's min_pmtu): one forged error must not shrink a path for everyone. */
#define XLB_MIN_PMTU 552

/* Backends whose retired traffic is kept (struct retired); an LRU map, so a
 * churning Kubernetes service cannot fill it. */
#define XLB_MAX_RETIRED 65536

/* SYN->SYN-ACK latency buckets per backend (struct handshakes): their upper
 * bounds are config.syn_bucket_ns, the last bucket holds the rest. */
#define XLB_SYN_BUCKETS 16
/* Backends whose handshakes are kept: an LRU, shared by all CPUs (written
 * once per connection, so atomic adds cost nothing), about 1 MiB. */
#define XLB_MAX_HANDSHAKE_BACKENDS 4096

/* Routes cached (struct nexthop): an LRU, so millions of clients only cost
 * lookups, never memory. An entry is used for at most XLB_NEXTHOP_TTL_NS
 * even if no netlink change was seen, so a missed event heals itself. */
#define XLB_NEXTHOP_CACHE  65536
#define XLB_NEXTHOP_TTL_NS 1000000000ULL

/* VLAN interfaces XLB can send tagged frames for. */
#define XLB_MAX_VLANS 256

/* NAT source-port allocation probes this many ports before giving up, so a
 * SYN costs a bounded number of map operations even in a crowded range. */
#define XLB_NAT_PORT_TRIES 32

/* In generic mode, a TCP checksum that looks like an offload seed is
 * verified as a full one on segments up to this long (nat.h). */
#define XLB_CSUM_VERIFY_MAX 1536

/* A connection's last activity is recorded to this precision: the sweep's
 * shortest expiry is 10 s, and a store per packet dirties the entry. */
#define XLB_LAST_SEEN_STEP_NS 100000000ULL

/* Marks kept in struct flow.tcp_flags above the TCP flag bits. */
#define XLB_CT_FIN_FIRST (1U << 8)  /* this direction sent the first FIN */
#define XLB_CT_FIN_SEQ	 (1U << 9)  /* reverse entry: fin_seq is set */
#define XLB_CT_CLOSED	 (1U << 10) /* FIN both ways or a RST: a SYN reopens it */
#define XLB_CT_RESET	 (1U << 11) /* a RST either way (no TIME_WAIT is left) */
#define XLB_CT_SEQ	 (1U << 12) /* seq_next is set */
#define XLB_CT_ESTABLISHED                                                                         \
	(1U << 13) /* the client acked the backend's SYN-ACK (both entries): not half-open */
#define XLB_CT_PROXY (1U << 14) /* opened by the SYN proxy: sequence numbers translated */
#define XLB_CT_ANSWERED                                                                            \
	(1U << 15) /* reverse entry: the backend's answer to the SYN was noted (handshake.h) */

/* Flow directions stored in struct flow.dir. */
#define XLB_DIR_TO_BACKEND 1 /* client -> listen ip, rewritten to backend */
#define XLB_DIR_TO_CLIENT  2 /* backend -> snat ip, rewritten to client */

/* struct xlb_config.flags */
#define XLB_F_DRAIN	  (1U << 0) /* shutdown: answer new SYNs with RST */
#define XLB_F_UNKNOWN_RST (1U << 1) /* unknown_flow: rst */
#define XLB_F_SYN_PROXY	  (1U << 2) /* answer new SYNs with SYN cookies */
#define XLB_F_SYN_COOKIES (1U << 3) /* an ACK of no connection may carry a cookie */

/* The SYN proxy's own segments: its SYN-ACK carries the MSS option only (a
 * cookie from bpf_tcp_raw_gen_syncookie_ipv4 remembers nothing else, so
 * window scaling, SACK and timestamps are not offered on either side). The
 * client's MSS is not known either (the cookie encodes it, keyed): the SYN
 * to the backend offers 1300, the kernel's cookie table's value below 1440,
 * so clients behind PPPoE or a VPN get segments they can take; smaller ones
 * are found by path MTU discovery (icmp.h translates the quoted sequence). */
#define XLB_SYNPROXY_TCP_LEN 24
#define XLB_SYNPROXY_MSS     1300
#define XLB_SYNPROXY_WINDOW  65535
#define XLB_TCP_MAX_LEN	     60

/* TCP flag bits as they sit in byte 13 of the TCP header. */
#define XLB_TCP_FIN 0x01
#define XLB_TCP_SYN 0x02
#define XLB_TCP_RST 0x04
#define XLB_TCP_PSH 0x08
#define XLB_TCP_ACK 0x10

#define XLB_ICMP_DEST_UNREACH  3
#define XLB_ICMP_TIME_EXCEEDED 11
#define XLB_ICMP_FRAG_NEEDED   4 /* code of XLB_ICMP_DEST_UNREACH */

#define XLB_IP_DF     0x4000
#define XLB_IP_MF     0x2000
#define XLB_IP_OFFSET 0x1fff

#endif
