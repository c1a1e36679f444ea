/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* A packet of ours that cannot be sent on is answered as a router answers
 * it: ICMP time exceeded when its TTL would run out, "fragmentation needed"
 * when it is too big for the egress link and may not be fragmented (RFC
 * 792, RFC 1191), quoting its IP header and first 8 payload bytes, from the
 * address it was sent to. Answers are rate-limited per CPU: their
 * destination is a source address anyone can forge. */
#ifndef XLB_ICMP_REPLY_H
#define XLB_ICMP_REPLY_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "csum.h"
#include "icmp.h"
#include "parsing.h"
#include "xlb_maps.h"

#define XLB_QUOTE_LEN	    (sizeof(struct iphdr) + 8)
#define XLB_REPLY_PREFIX    (sizeof(struct iphdr) + sizeof(struct icmp_err))
#define XLB_REPLY_FRAME_LEN (sizeof(struct ethhdr) + XLB_REPLY_PREFIX + XLB_QUOTE_LEN)
#define XLB_ICMP_TTL	    64

/* Whether icmp_reply() can answer this packet: not a tagged frame, no IP
 * options. Asked before taking from the budget, so packets that are never
 * answered cannot starve those that are. */
static __always_inline int icmp_answerable(const struct packet *pkt)
{
	return !pkt->vlan && pkt->ip->ihl == 5;
}

/* Returns 0 with the frame turned into the ICMP error (send it back out with
 * bounce()), or -1 when it cannot be (a tagged frame, IP options: the caller
 * drops). `mtu` is the next-hop MTU for "fragmentation needed", else 0. */
static __always_inline int icmp_reply(struct xdp_md *ctx, struct packet *pkt, __u8 type, __u8 code,
				      __u16 mtu)
{
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	__u32 to, from;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct icmp_err *icmp;
	void *data, *data_end;
	__s64 sum;

	if (!icmp_answerable(pkt))
		return -1;
	__builtin_memcpy(smac, pkt->eth->h_dest, ETH_ALEN);
	__builtin_memcpy(dmac, pkt->eth->h_source, ETH_ALEN);
	to = pkt->ip->saddr;
	from = pkt->ip->daddr;

	/* Room for a new IP and ICMP header in front: the old IP header then
	 * sits exactly where the quote belongs. Cut after the quote. */
	if (bpf_xdp_adjust_head(ctx, -(int)XLB_REPLY_PREFIX))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (bpf_xdp_adjust_tail(ctx, (int)XLB_REPLY_FRAME_LEN - (int)(data_end - data)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + XLB_REPLY_FRAME_LEN > data_end)
		return -1;
	eth = data;
	ip = (void *)(eth + 1);
	icmp = (void *)(ip + 1);

	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);

	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(XLB_REPLY_PREFIX + XLB_QUOTE_LEN);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = XLB_ICMP_TTL;
	ip->protocol = IPPROTO_ICMP;
	ip->saddr = from;
	ip->daddr = to;
	ip->check = 0;
	sum = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0);
	ip->check = ~csum_fold((__u64)sum);

	icmp->type = type;
	icmp->code = code;
	icmp->checksum = 0;
	icmp->unused = 0;
	icmp->mtu = bpf_htons(mtu);
	sum = bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(*icmp) + XLB_QUOTE_LEN, 0);
	icmp->checksum = ~csum_fold((__u64)sum);
	pkt->len = XLB_REPLY_FRAME_LEN;
	return 0;
}

#endif
