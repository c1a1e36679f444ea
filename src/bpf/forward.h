/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Sending a rewritten packet on: FIB lookup for the next hop, then XDP_TX or
 * a devmap redirect; the kernel gets what XDP cannot finish itself. */
#ifndef XLB_FORWARD_H
#define XLB_FORWARD_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "csum.h"
#include "parsing.h"
#include "xlb_maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif

struct outcome {
	__u32 action;  /* XDP_* */
	__u32 counter; /* enum xlb_counter */
};

static __always_inline struct outcome verdict(__u32 action, __u32 counter)
{
	struct outcome o = { .action = action, .counter = counter };

	return o;
}

/* `sent` is the counter for a packet that leaves through XDP. */
static __always_inline struct outcome forward(struct xdp_md *ctx, struct packet *pkt, __u32 sent)
{
	struct iphdr *ip = pkt->ip;
	struct bpf_fib_lookup fib = {};
	__u16 old_ttl_word;
	__u32 ifindex;
	long rc;

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = pkt->l3_ifindex;

	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		/* The kernel resolves the neighbour and forwards this one packet
		 * (TTL untouched: it decrements it itself); later ones find it. */
		return verdict(XDP_PASS, XLB_CNT_PASS_NO_NEIGH);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return verdict(XDP_DROP, XLB_CNT_DROP_FIB);

	ifindex = fib.ifindex;
	if (pkt->vlan) {
		/* Tagged: XDP can send it on only as a tagged frame on the same
		 * wire, i.e. when the route leaves through a VLAN interface on top
		 * of the ingress interface. The kernel handles anything else. */
		struct vlan_tag_key *v = bpf_map_lookup_elem(&vlan_by_dev, &ifindex);

		if (!v || v->lower_ifindex != ctx->ingress_ifindex)
			return verdict(XDP_PASS, XLB_CNT_PASS_FOREIGN_EGRESS);
		pkt->vlan->tci = (pkt->vlan->tci & bpf_htons(0xf000)) | bpf_htons(v->vid & 0x0fff);
		ifindex = ctx->ingress_ifindex;
	}
	if (ifindex != ctx->ingress_ifindex && !bpf_map_lookup_elem(&tx_ports, &ifindex))
		return verdict(XDP_PASS, XLB_CNT_PASS_FOREIGN_EGRESS);
	if (ip->ttl <= 1)
		return verdict(XDP_DROP, XLB_CNT_DROP_TTL);

	old_ttl_word = *(__u16 *)&ip->ttl;
	ip->ttl--;
	csum_replace2(&ip->check, old_ttl_word, *(__u16 *)&ip->ttl);
	__builtin_memcpy(pkt->eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, fib.smac, ETH_ALEN);

	if (ifindex == ctx->ingress_ifindex)
		return verdict(XDP_TX, sent);
	return verdict(bpf_redirect_map(&tx_ports, ifindex, XDP_DROP), sent);
}

#endif
