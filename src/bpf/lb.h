/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Classification (is this packet ours?) and backend selection. */
#ifndef XLB_LB_H
#define XLB_LB_H

#include "hash.h"
#include "xlb_maps.h"

/* Sets pkt->l3_ifindex; returns 0 if the packet arrived untagged or on a
 * VLAN XLB knows (one configured on this interface), -1 otherwise. */
static __always_inline int known_l2(struct xdp_md *ctx, struct packet *pkt)
{
	struct vlan_tag_key k = {};
	__u32 *dev;

	pkt->l3_ifindex = ctx->ingress_ifindex;
	if (!pkt->vlan)
		return 0;
	k.lower_ifindex = ctx->ingress_ifindex;
	k.vid = bpf_ntohs(pkt->vlan->tci) & 0x0fff;
	dev = bpf_map_lookup_elem(&vlan_by_tag, &k);
	if (!dev)
		return -1;
	pkt->l3_ifindex = *dev;
	return 0;
}

/* The backend port for a listened-on port, or 0 when the port is not ours. */
static __always_inline __u16 remote_port_of(__u16 local_port)
{
	__u32 n = config.nr_ports;
	int i;

	for (i = 0; i < XLB_MAX_PORTS; i++) {
		if (i >= n)
			break;
		if (config.ports[i].local_port == local_port)
			return config.ports[i].remote_port;
	}
	return 0;
}

static __always_inline int in_nat_range(__u16 port_be)
{
	__u16 port = bpf_ntohs(port_be);

	return port >= config.nat_port_min && port <= config.nat_port_max;
}

/* Maglev lookup in the live half of the table; NULL when no backend. */
static __always_inline const struct backend *pick_backend(const struct flow_key *k)
{
	__u32 size = config.maglev_size;
	__u32 slot, h;
	struct backend *be;

	if (!size)
		return NULL;
	h = jhash_3words(k->saddr, k->daddr, ((__u32)k->sport << 16) | k->dport, config.hash_seed);
	slot = h % size + (config.maglev_active ? size : 0);
	be = bpf_map_lookup_elem(&maglev, &slot);
	if (!be || !be->addr)
		return NULL;
	return be;
}

#endif
