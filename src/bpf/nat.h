/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* NAT: source-port allocation and the header rewrite. */
#ifndef XLB_NAT_H
#define XLB_NAT_H

#include <linux/errno.h>
#include <linux/in.h>
#include "csum.h"
#include "hash.h"
#include "parsing.h"
#include "xlb_maps.h"

/* The source address backends see for a client: one of the SNAT pool,
 * chosen by the client's address so all its connections share one. */
static __always_inline __u32 snat_addr_for(__u32 client)
{
	__u32 n = config.nr_snat;

	if (n <= 1)
		return config.snat_addrs[0];
	return config.snat_addrs[(jhash_3words(client, 0, 0, config.hash_seed) % n) &
				 (XLB_MAX_SNAT - 1)];
}

/* Whether a packet to `addr` may be a backend's reply: one of the pool. */
static __always_inline int is_snat_addr(__u32 addr)
{
	__u32 n = config.nr_snat;
	int i;

	for (i = 0; i < XLB_MAX_SNAT; i++) {
		if (i >= n)
			break;
		if (config.snat_addrs[i] == addr)
			return 1;
	}
	return 0;
}

/* Whether a client's SYN (sequence number `seq`) may take over the NAT port
 * of the closed connection whose reverse entry is `t`. If the backend closed
 * first it holds the old 4-tuple in TIME_WAIT, and accepts a new SYN on it
 * only with a sequence number past the old connection's (and, with
 * timestamps, a newer timestamp, which XLB cannot see): nf_nat's rule. The
 * same client tuple, or a connection the backend did not close first (no
 * TIME_WAIT on its side), may take it at once. */
static __always_inline int nat_reclaimable(const struct flow *t, const struct flow_key *client,
					   __u32 seq)
{
	if (!(t->tcp_flags & XLB_CT_CLOSED))
		return 0;
	if (t->nat_daddr == client->saddr && t->nat_dport == client->sport)
		return 1;
	if ((t->tcp_flags & (XLB_CT_RESET | XLB_CT_FIN_FIRST)) != XLB_CT_FIN_FIRST)
		return 1;
	return (t->tcp_flags & XLB_CT_FIN_SEQ) && (__s32)(seq - t->fin_seq) > 0;
}

/* Ports a SYN that found none free may still take (nat_claim_port). */
struct port_spare {
	__u16 tombstone; /* a closed pair's port it may take over */
	__u16 half_open; /* the port of the oldest half-open pair seen */
	__u64 half_open_created_ns;
};

/* Whether the pair whose reverse entry is `t` never completed its handshake
 * and is not closed: a SYN flood's state, or a connection still opening. */
static __always_inline int nat_half_open(const struct flow *t)
{
	/* A pair the SYN proxy opened has a client that answered a cookie. */
	return !(t->tcp_flags & (XLB_CT_ESTABLISHED | XLB_CT_CLOSED | XLB_CT_PROXY));
}

/*
 * Claims a NAT source port for a new connection by inserting its reverse
 * entry: the insert (BPF_NOEXIST) is the allocation, atomic across CPUs. A
 * closed pair keeps its port (its tombstone) until the sweep removes it,
 * long enough for a backend's TIME_WAIT when the backend closed first.
 *
 * The first choice follows the client's tuple, as nf_nat does: its own
 * source port when that lies in the range, else one derived from the tuple.
 * A client that comes back on the same tuple then reaches the backend on the
 * same 4-tuple, which the backend's TCP accepts out of TIME_WAIT; a port
 * picked at random could land on another tuple's TIME_WAIT and be answered
 * with a stale ACK.
 *
 * After that, a bounded number of random ports: unlike a linear run from a
 * random start, random probes do not cluster, so with a fraction p of the
 * range in use a SYN finds no free port with probability p^XLB_NAT_PORT_TRIES.
 * Under that pressure (or with the table full) `spare` gets the first taken
 * port seen whose tombstone this SYN may take over (nat_reclaimable), and
 * the oldest half-open pair among those seen: a SYN flood's pairs then make
 * room for new connections instead of starving them, and established ones
 * are never touched. Returns -1 with rev_key->dport set, or the counter of
 * the reason it failed.
 */
static __always_inline int nat_claim_port(struct flow_key *rev_key, const struct flow *rev,
					  const struct flow_key *client, __u32 syn_seq,
					  struct port_spare *spare)
{
	__u32 min = config.nat_port_min;
	__u32 max = config.nat_port_max;
	__u32 sport = bpf_ntohs(client->sport);
	__u32 span, derived, first;
	int why = XLB_CNT_DROP_NAT_EXHAUSTED;
	long err;
	int i;

	if (min == 0 || max < min)
		return XLB_CNT_DROP_NAT_EXHAUSTED;
	span = max - min + 1;
	derived =
		min +
		jhash_3words(client->saddr, client->sport, rev_key->saddr, config.hash_seed) % span;
	first = (sport >= min && sport <= max) ? sport : derived;
	for (i = 0; i < XLB_NAT_PORT_TRIES; i++) {
		enum xlb_counter how = XLB_CNT_NAT_PROBED;
		struct flow *t;
		__u32 port;

		if (i == 0) {
			port = first;
			how = first == sport ? XLB_CNT_NAT_PRESERVED : XLB_CNT_NAT_DERIVED;
		} else if (i == 1 && first != derived) {
			port = derived;
			how = XLB_CNT_NAT_DERIVED;
		} else {
			port = min + bpf_get_prandom_u32() % span;
		}
		rev_key->dport = bpf_htons(port);
		/* A full table refuses every insert: the rest only look. */
		err = why == XLB_CNT_DROP_CT_FULL
			      ? -E2BIG
			      : bpf_map_update_elem(&conntrack, rev_key, rev, BPF_NOEXIST);
		if (!err) {
			count(how);
			return -1;
		}
		if (err == -EEXIST)
			count(XLB_CNT_NAT_COLLISION);
		else
			why = XLB_CNT_DROP_CT_FULL;
		t = bpf_map_lookup_elem(&conntrack, rev_key);
		if (!t)
			continue;
		if (!spare->tombstone && nat_reclaimable(t, client, syn_seq))
			spare->tombstone = rev_key->dport;
		else if (nat_half_open(t) &&
			 (!spare->half_open || t->created_ns < spare->half_open_created_ns)) {
			spare->half_open = rev_key->dport;
			spare->half_open_created_ns = t->created_ns;
		}
	}
	return why;
}

/*
 * Whether the TCP segment at `tcp_off` in the frame, `len` bytes (at most
 * XLB_CSUM_VERIFY_MAX), carries a valid full checksum: the one's-complement
 * sum of pseudo-header (`pseudo`, folded) and segment is 0xffff. A global
 * function, so the verifier checks its loop once, not on every path into it.
 */
__attribute__((noinline)) int xlb_tcp_csum_verifies(struct xdp_md *ctx, __u32 tcp_off, __u32 len,
						    __u32 pseudo)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 sum = pseudo;
	__u32 off = 0;
	__u8 *p;
	int i;

	if (tcp_off > 128 || len > XLB_CSUM_VERIFY_MAX)
		return 0;
	p = (__u8 *)data + tcp_off;
	for (i = 0; i < XLB_CSUM_VERIFY_MAX / 4; i++) {
		if (off + 4 > len)
			break;
		if ((void *)(p + off + 4) > data_end)
			return 0;
		sum += *(__u16 *)(p + off) + *(__u16 *)(p + off + 2);
		off += 4;
	}
	for (i = 0; i < 3; i++) {
		if (off >= len || off > XLB_CSUM_VERIFY_MAX)
			break;
		if ((void *)(p + off + 1) > data_end)
			return 0;
		/* Words as they sit in memory: an even offset is the low byte. */
		sum += (off & 1) ? (__u64)p[off] << 8 : p[off];
		off++;
	}
	return csum_fold(sum) == 0xffff;
}

/* Whether the segment is short enough for its checksum to be verified
 * here (XLB_CSUM_VERIFY_MAX). */
static __always_inline int tcp_csum_checkable(const struct packet *pkt)
{
	return bpf_ntohs(pkt->ip->tot_len) - pkt->ip->ihl * 4 <= XLB_CSUM_VERIFY_MAX;
}

/* Whether the segment's TCP checksum verifies as a full one. */
static __always_inline int tcp_csum_verifies(struct xdp_md *ctx, const struct packet *pkt)
{
	const struct iphdr *ip = pkt->ip;
	__u16 len = bpf_ntohs(ip->tot_len) - ip->ihl * 4;
	__u32 tcp_off = (void *)pkt->tcp - (void *)(long)ctx->data;

	return xlb_tcp_csum_verifies(ctx, tcp_off, len,
				     csum_pseudo4(ip->saddr, ip->daddr, IPPROTO_TCP, len));
}

/*
 * Whether the TCP checksum is a seed left to offload (csum.h): only an skb
 * can carry one (generic mode), recognised by its value. A full checksum can
 * equal the seed by chance (1 in 65536 segments: at 100k connections a
 * second, a lost handshake every second), so a segment of up to
 * XLB_CSUM_VERIFY_MAX bytes whose checksum looks like a seed is summed: if
 * it verifies as a full checksum, it is one. Longer ones are GRO aggregates,
 * which the kernel leaves as seeds. A seed that also verifies as a full
 * checksum (again 1 in 65536, and only from senders that offload) is
 * updated as a full one: that segment is lost and sent again.
 */
static __always_inline int tcp_csum_is_seed(struct xdp_md *ctx, const struct packet *pkt)
{
	const struct iphdr *ip = pkt->ip;
	__u16 len = bpf_ntohs(ip->tot_len) - ip->ihl * 4;

	if (pkt->tcp->check != csum_pseudo4(ip->saddr, ip->daddr, IPPROTO_TCP, len))
		return 0;
	return len > XLB_CSUM_VERIFY_MAX || !tcp_csum_verifies(ctx, pkt);
}

/* The difference translating the sequence numbers of a pair the SYN proxy
 * opened makes to the TCP checksum (synproxy.h): the backend's are moved
 * into the client's view (its RST before it answered lands on the cookie),
 * the client's acknowledgments into the backend's. */
static __always_inline __u64 nat_translate_seq(struct tcphdr *tcp, const struct flow *f)
{
	__u32 from, to;

	if (f->dir == XLB_DIR_TO_CLIENT) {
		from = tcp->seq;
		if (f->tcp_flags & XLB_CT_ESTABLISHED)
			to = bpf_htonl(bpf_ntohl(from) - f->seq_delta);
		else
			to = bpf_htonl(f->cookie + 1);
		tcp->seq = to;
	} else {
		if (!tcp->ack || !(f->tcp_flags & XLB_CT_ESTABLISHED))
			return 0;
		from = tcp->ack_seq;
		to = bpf_htonl(bpf_ntohl(from) + f->seq_delta);
		tcp->ack_seq = to;
	}
	return csum_diff4(from, to);
}

/* Rewrites addresses and ports to the flow's NAT tuple; both checksums are
 * fixed incrementally from one difference of the addresses (the TCP one
 * covers them in its pseudo-header), a TCP seed (`seed`, see
 * tcp_csum_is_seed) as a seed, which holds no ports. */
static __always_inline void nat_rewrite(struct packet *pkt, const struct flow *f, int seed)
{
	struct iphdr *ip = pkt->ip;
	struct tcphdr *tcp = pkt->tcp;
	__u64 addrs = csum_diff4(ip->saddr, f->nat_saddr) + csum_diff4(ip->daddr, f->nat_daddr);
	__u64 seqs = (f->tcp_flags & XLB_CT_PROXY) ? nat_translate_seq(tcp, f) : 0;

	csum_apply(&ip->check, addrs);
	if (seed)
		csum_seed_apply(&tcp->check, addrs);
	else
		csum_apply(&tcp->check, addrs + seqs + csum_diff2(tcp->source, f->nat_sport) +
						csum_diff2(tcp->dest, f->nat_dport));
	ip->saddr = f->nat_saddr;
	ip->daddr = f->nat_daddr;
	tcp->source = f->nat_sport;
	tcp->dest = f->nat_dport;
}

#endif
