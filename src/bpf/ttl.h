/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* A packet of ours whose TTL would run out on the way to the other side is
 * answered as a router answers it: ICMP time exceeded (RFC 792), quoting its
 * IP header and first 8 payload bytes, from the address it was sent to. */
#ifndef XLB_TTL_H
#define XLB_TTL_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "csum.h"
#include "icmp.h"
#include "parsing.h"

#define XLB_QUOTE_LEN	 (sizeof(struct iphdr) + 8)
#define XLB_TE_PREFIX	 (sizeof(struct iphdr) + sizeof(struct icmp_err))
#define XLB_TE_FRAME_LEN (sizeof(struct ethhdr) + XLB_TE_PREFIX + XLB_QUOTE_LEN)
#define XLB_ICMP_TTL	 64

/* Returns 0 with the frame turned into the ICMP error (send it with XDP_TX),
 * or -1 when it cannot be (a tagged frame, IP options: the caller drops). */
static __always_inline int ttl_exceeded(struct xdp_md *ctx, struct packet *pkt)
{
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	__u32 to, from;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct icmp_err *icmp;
	void *data, *data_end;
	__s64 sum;

	if (pkt->vlan || pkt->ip->ihl != 5)
		return -1;
	__builtin_memcpy(smac, pkt->eth->h_dest, ETH_ALEN);
	__builtin_memcpy(dmac, pkt->eth->h_source, ETH_ALEN);
	to = pkt->ip->saddr;
	from = pkt->ip->daddr;

	/* Room for a new IP and ICMP header in front: the old IP header then
	 * sits exactly where the quote belongs. Cut after the quote. */
	if (bpf_xdp_adjust_head(ctx, -(int)XLB_TE_PREFIX))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (bpf_xdp_adjust_tail(ctx, (int)XLB_TE_FRAME_LEN - (int)(data_end - data)))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + XLB_TE_FRAME_LEN > data_end)
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
	ip->tot_len = bpf_htons(XLB_TE_PREFIX + XLB_QUOTE_LEN);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = XLB_ICMP_TTL;
	ip->protocol = IPPROTO_ICMP;
	ip->saddr = from;
	ip->daddr = to;
	ip->check = 0;
	sum = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0);
	ip->check = ~csum_fold((__u64)sum);

	icmp->type = XLB_ICMP_TIME_EXCEEDED;
	icmp->code = 0; /* TTL exceeded in transit */
	icmp->checksum = 0;
	icmp->rest = 0;
	sum = bpf_csum_diff(0, 0, (__be32 *)icmp, sizeof(*icmp) + XLB_QUOTE_LEN, 0);
	icmp->checksum = ~csum_fold((__u64)sum);
	pkt->len = XLB_TE_FRAME_LEN;
	return 0;
}

#endif
