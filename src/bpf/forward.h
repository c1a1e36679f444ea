/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Sending a packet on: FIB lookup for the next hop, then out of the ingress
 * interface (bounce) or a devmap redirect; the kernel gets what XDP cannot
 * finish itself. */
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

/* The ingress interface's entry, if XLB attached it (not in test runs). */
static __always_inline const struct iface *ingress_iface(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex;

	return bpf_map_lookup_elem(&ifaces, &ifindex);
}

/* The action that sends the frame back out of the interface it arrived on,
 * the way that interface delivers (`in`: its entry, see ingress_iface()). */
static __always_inline __u32 bounce(struct xdp_md *ctx, const struct iface *in)
{
	if (in && in->tx == XLB_TX_REDIRECT)
		return bpf_redirect_map(&tx_ports, ctx->ingress_ifindex, XDP_DROP);
	return XDP_TX;
}

/* Whether the program runs in generic mode there: on an skb, which may be
 * a GRO/GSO aggregate or carry a checksum left to offload. */
static __always_inline int is_generic(const struct iface *in)
{
	return in && (in->flags & XLB_IFACE_GENERIC);
}

/* A packet bigger than its own ingress link: an aggregate of segments (GRO,
 * or GSO from a local sender), which only generic mode sees. */
static __always_inline int is_aggregate(const struct iface *in, const struct packet *pkt)
{
	return is_generic(in) && in->mtu && bpf_ntohs(pkt->ip->tot_len) > in->mtu;
}

/* Caches a successful lookup (`fib` answered for `k`, asked at generation
 * `gen`) with the route's MTU, which the FIB only reports for a packet too
 * big for it: asked again with the largest size. */
static __always_inline void nexthop_learn(struct xdp_md *ctx, const struct nexthop_key *k,
					  const struct bpf_fib_lookup *fib, __u32 gen, __u64 now)
{
	struct bpf_fib_lookup probe = {
		.family = AF_INET,
		.tos = fib->tos,
		.l4_protocol = fib->l4_protocol,
		.tot_len = 0xffff,
		.ipv4_src = k->saddr,
		.ipv4_dst = k->daddr,
		.ifindex = k->ifindex,
	};
	struct nexthop nh = {
		.ifindex = fib->ifindex,
		.mtu = 0xffff,
		.gen = gen,
		.expires_ns = now + XLB_NEXTHOP_TTL_NS,
	};

	if (bpf_fib_lookup(ctx, &probe, sizeof(probe), 0) == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		nh.mtu = probe.mtu_result;
	__builtin_memcpy(nh.smac, fib->smac, ETH_ALEN);
	__builtin_memcpy(nh.dmac, fib->dmac, ETH_ALEN);
	bpf_map_update_elem(&nexthops, k, &nh, BPF_ANY);
}

/* The next hop of a packet from saddr to daddr as it arrived: returns the
 * bpf_fib_lookup() code with fib filled in, from the `nexthops` cache when
 * it holds a current answer. The egress MTU is checked, except for a packet
 * bigger than its own ingress link: an aggregate of segments (GRO, or GSO
 * from a local sender) that the stack splits again on the way out, possible
 * in generic mode only. */
static __always_inline long route(struct xdp_md *ctx, struct packet *pkt, __u32 saddr, __u32 daddr,
				  const struct iface *in, struct bpf_fib_lookup *fib, __u64 now)
{
	struct nexthop_key k = { .saddr = saddr, .daddr = daddr, .ifindex = pkt->l3_ifindex };
	struct iphdr *ip = pkt->ip;
	__u16 len = bpf_ntohs(ip->tot_len);
	__u32 gen = config.nexthop_gen;
	struct nexthop *nh;
	long rc;

	fib->family = AF_INET;
	fib->tos = ip->tos;
	fib->l4_protocol = ip->protocol;
	fib->tot_len = (is_generic(in) && (!in->mtu || len > in->mtu)) ? 0 : len;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = pkt->l3_ifindex;

	nh = bpf_map_lookup_elem(&nexthops, &k);
	if (nh && nh->gen == gen && now < nh->expires_ns) {
		if (fib->tot_len > nh->mtu) {
			fib->mtu_result = nh->mtu;
			return BPF_FIB_LKUP_RET_FRAG_NEEDED;
		}
		fib->ifindex = nh->ifindex;
		__builtin_memcpy(fib->smac, nh->smac, ETH_ALEN);
		__builtin_memcpy(fib->dmac, nh->dmac, ETH_ALEN);
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	count(XLB_CNT_NEXTHOP_MISS);
	rc = bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		nexthop_learn(ctx, &k, fib, gen, now);
	return rc;
}

/* Sends a packet whose next hop route() found (rc, fib); `sent` is the
 * counter for a packet that leaves through XDP. `in`: the ingress entry. */
static __always_inline struct outcome transmit(struct xdp_md *ctx, struct packet *pkt, long rc,
					       struct bpf_fib_lookup *fib, const struct iface *in,
					       __u32 sent)
{
	struct iphdr *ip = pkt->ip;
	__u16 old_ttl_word;
	__u32 ifindex;

	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		/* The kernel resolves the neighbour and forwards this one packet
		 * (TTL untouched: it decrements it itself); later ones find it. */
		return verdict(XDP_PASS, XLB_CNT_PASS_NO_NEIGH);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return verdict(XDP_DROP, XLB_CNT_DROP_FIB);

	ifindex = fib->ifindex;
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
	/* Only interfaces that take redirected frames are in tx_ports (the
	 * control plane checks); the kernel forwards to any other. */
	if (ifindex != ctx->ingress_ifindex && !bpf_map_lookup_elem(&tx_ports, &ifindex))
		return verdict(XDP_PASS, XLB_CNT_PASS_FOREIGN_EGRESS);
	/* An aggregate is redirected whole, past the checks that split it for
	 * a smaller link: the kernel's forwarding splits (or refuses) it. Sent
	 * back out of the same link it fits, as it came. */
	if (ifindex != ctx->ingress_ifindex && is_aggregate(in, pkt))
		return verdict(XDP_PASS, XLB_CNT_PASS_AGGREGATE);
	if (ip->ttl <= 1)
		return verdict(XDP_DROP, XLB_CNT_DROP_TTL);

	old_ttl_word = *(__u16 *)&ip->ttl;
	ip->ttl--;
	csum_replace2(&ip->check, old_ttl_word, *(__u16 *)&ip->ttl);
	__builtin_memcpy(pkt->eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, fib->smac, ETH_ALEN);

	if (ifindex == ctx->ingress_ifindex)
		return verdict(bounce(ctx, in), sent);
	return verdict(bpf_redirect_map(&tx_ports, ifindex, XDP_DROP), sent);
}

/* Routes and sends a packet as it is (a translated ICMP error). */
static __always_inline struct outcome forward(struct xdp_md *ctx, struct packet *pkt, __u32 sent)
{
	struct bpf_fib_lookup fib = {};
	const struct iface *in = ingress_iface(ctx);
	long rc = route(ctx, pkt, pkt->ip->saddr, pkt->ip->daddr, in, &fib,
			bpf_ktime_get_coarse_ns());

	return transmit(ctx, pkt, rc, &fib, in, sent);
}

#endif
