/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ICMP errors about our connections (destination unreachable, including
 * "fragmentation needed", and time exceeded): a router on one side reports
 * on a packet XLB sent, so the report is translated for the other side, as a
 * NAT must do for path MTU discovery to work. The quoted packet is one XLB
 * emitted, tuple T; the entry keyed by reverse(T) holds reverse(O), where O
 * is what the far end originally sent: the error goes to O's sender, about O.
 */
#ifndef XLB_ICMP_H
#define XLB_ICMP_H

#include "csum.h"
#include "parsing.h"
#include "xlb_maps.h"

/* The ICMP error header (RFC 792); linux/icmp.h would pull in libc. */
struct icmp_err {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u16 unused;
	__u16 mtu; /* the next-hop MTU for "fragmentation needed" (RFC 1191), else 0 */
};

/* What of the quoted packet is rewritten: its addresses and ports. */
struct icmp_quote {
	struct icmp_err *icmp;
	struct iphdr *ip;
	__u16 *ports; /* source, destination */
};

/* Returns 0 with q filled when pkt is an ICMP error quoting IPv4/TCP (a
 * quoted header without options, and at least the 8 bytes with ports). */
static __always_inline int parse_icmp_quote(struct xdp_md *ctx, struct packet *pkt,
					    struct icmp_quote *q)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = pkt->ip;
	struct icmp_err *icmp;
	struct iphdr *inner;

	if (ip->protocol != IPPROTO_ICMP || (ip->frag_off & bpf_htons(XLB_IP_MF | XLB_IP_OFFSET)))
		return -1;
	icmp = (void *)ip + ip->ihl * 4;
	if ((void *)(icmp + 1) > data_end)
		return -1;
	if (icmp->type != XLB_ICMP_DEST_UNREACH && icmp->type != XLB_ICMP_TIME_EXCEEDED)
		return -1;
	inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) + 4 > data_end)
		return -1;
	if (inner->version != 4 || inner->ihl != 5 || inner->protocol != IPPROTO_TCP)
		return -1;
	q->icmp = icmp;
	q->ip = inner;
	q->ports = (void *)(inner + 1);
	return 0;
}

/* The translation, or XDP_PASS (untouched) when it is about no flow of ours. */
static __always_inline struct outcome icmp_error(struct xdp_md *ctx, struct packet *pkt)
{
	struct iphdr *ip = pkt->ip;
	struct flow_key peer = {};
	struct icmp_quote q;
	__u32 src, dst, old;
	__u16 sport, dport;
	struct flow *y;

	if (ip->daddr != config.listen_addr && !is_snat_addr(ip->daddr))
		return verdict(XDP_PASS, XLB_CNT_PASS_NOT_TCP);
	if (parse_icmp_quote(ctx, pkt, &q))
		return verdict(XDP_PASS, XLB_CNT_PASS_NOT_TCP);
	peer.saddr = q.ip->daddr;
	peer.daddr = q.ip->saddr;
	peer.sport = q.ports[1];
	peer.dport = q.ports[0];
	peer.proto = IPPROTO_TCP;
	y = bpf_map_lookup_elem(&conntrack, &peer);
	if (!y)
		return verdict(XDP_PASS, XLB_CNT_PASS_NOT_TCP);

	/* O = reverse(y's rewrite): the quoted packet becomes O ... */
	src = y->nat_daddr;
	dst = y->nat_saddr;
	sport = y->nat_dport;
	dport = y->nat_sport;
	old = *(__u16 *)&q.ip->check;
	csum_replace4(&q.ip->check, q.ip->saddr, src);
	csum_replace4(&q.ip->check, q.ip->daddr, dst);
	/* The ICMP checksum covers the quote: every changed word, the quoted
	 * IP checksum included. (A quoted TCP checksum, if present at all, is
	 * left alone, as the kernel's NAT does.) */
	csum_replace4(&q.icmp->checksum, q.ip->saddr, src);
	csum_replace4(&q.icmp->checksum, q.ip->daddr, dst);
	csum_replace2(&q.icmp->checksum, q.ports[0], sport);
	csum_replace2(&q.icmp->checksum, q.ports[1], dport);
	csum_replace2(&q.icmp->checksum, old, *(__u16 *)&q.ip->check);
	q.ip->saddr = src;
	q.ip->daddr = dst;
	q.ports[0] = sport;
	q.ports[1] = dport;
	/* A segment XLB sent a proxied connection's client carries the
	 * backend's sequence in the client's view (nat.h): the backend only
	 * believes an error quoting its own. */
	if (y->dir == XLB_DIR_TO_BACKEND && (y->tcp_flags & XLB_CT_PROXY) &&
	    (y->tcp_flags & XLB_CT_ESTABLISHED) &&
	    (void *)(q.ports + 4) <= (void *)(long)ctx->data_end) {
		__u32 *seq = (__u32 *)(q.ports + 2);
		__u32 was = *seq, now = bpf_htonl(bpf_ntohl(was) + y->seq_delta);

		csum_replace4(&q.icmp->checksum, was, now);
		*seq = now;
	}

	/* A path MTU below the floor is a forgery or a broken link: raise it,
	 * so one error cannot shrink the path of everyone behind the NAT. */
	if (q.icmp->type == XLB_ICMP_DEST_UNREACH && q.icmp->code == XLB_ICMP_FRAG_NEEDED &&
	    bpf_ntohs(q.icmp->mtu) < XLB_MIN_PMTU) {
		__u16 floor = bpf_htons(XLB_MIN_PMTU);

		csum_replace2(&q.icmp->checksum, q.icmp->mtu, floor);
		q.icmp->mtu = floor;
		count(XLB_CNT_ICMP_MTU_FLOOR);
	}

	/* ... and goes to O's sender, from the address O was sent to. */
	csum_replace4(&ip->check, ip->saddr, dst);
	csum_replace4(&ip->check, ip->daddr, src);
	ip->saddr = dst;
	ip->daddr = src;
	return forward(ctx, pkt, XLB_CNT_FWD_ICMP);
}

#endif
