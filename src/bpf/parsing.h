/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Bounds-checked parsing of Ethernet / IPv4 / TCP. Every pointer is compared
 * against data_end here, right before it is used; callers get a packet whose
 * headers are all in bounds, or the reason it is not one of ours. */
#ifndef XLB_PARSING_H
#define XLB_PARSING_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include "xlb_structs.h"

/* An 802.1Q tag, after the MAC addresses. */
struct vlan_tag {
	__u16 tci; /* priority, DEI, VLAN id (low 12 bits) */
	__u16 proto;
};

struct packet {
	struct ethhdr *eth;
	struct vlan_tag *vlan; /* NULL when untagged */
	__u32 l3_ifindex;      /* where the IP packet arrived: the VLAN interface if tagged */
	struct iphdr *ip;
	struct tcphdr *tcp;
	__u32 len; /* whole frame, for byte accounting */
};

/* Returns -1 when pkt now holds an in-bounds Ethernet/IPv4/TCP packet,
 * otherwise the counter that says why the packet is left to the kernel. */
static __always_inline int parse_tcp4(struct xdp_md *ctx, struct packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct vlan_tag *vlan;
	struct iphdr *ip;
	struct tcphdr *tcp;
	__u16 proto;
	__u32 ihl;

	pkt->len = data_end - data;
	if ((void *)(eth + 1) > data_end)
		return XLB_CNT_PASS_MALFORMED;
	proto = eth->h_proto;
	ip = (void *)(eth + 1);
	pkt->vlan = NULL;
	/* One 802.1Q tag is looked through; 802.1ad and stacked tags are not. */
	if (proto == bpf_htons(ETH_P_8021Q)) {
		vlan = (void *)(eth + 1);
		if ((void *)(vlan + 1) > data_end)
			return XLB_CNT_PASS_MALFORMED;
		proto = vlan->proto;
		pkt->vlan = vlan;
		ip = (void *)(vlan + 1);
	}
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		return XLB_CNT_PASS_VLAN;
	if (proto != bpf_htons(ETH_P_IP))
		return XLB_CNT_PASS_NOT_IPV4;

	if ((void *)(ip + 1) > data_end)
		return XLB_CNT_PASS_MALFORMED;
	ihl = ip->ihl;
	if (ip->version != 4 || ihl < 5)
		return XLB_CNT_PASS_MALFORMED;
	/* Kept for the ICMP path, which looks inside errors about our flows. */
	pkt->eth = eth;
	pkt->ip = ip;
	if (ip->protocol != IPPROTO_TCP)
		return XLB_CNT_PASS_NOT_TCP;
	if (ip->frag_off & bpf_htons(XLB_IP_MF | XLB_IP_OFFSET))
		return XLB_CNT_PASS_FRAGMENT;
	/* The IP header may carry options: step over them, they need no care
	 * because every checksum fix below is incremental. */
	tcp = (void *)ip + ihl * 4;
	if ((void *)(tcp + 1) > data_end)
		return XLB_CNT_PASS_MALFORMED;
	if (tcp->doff < 5 || bpf_ntohs(ip->tot_len) < ihl * 4 + tcp->doff * 4)
		return XLB_CNT_PASS_MALFORMED;

	pkt->eth = eth;
	pkt->ip = ip;
	pkt->tcp = tcp;
	return -1;
}

/* The flag byte (FIN, SYN, RST, PSH, ACK, ...) of a parsed TCP header. */
static __always_inline __u8 tcp_flags(const struct tcphdr *tcp)
{
	return ((const __u8 *)tcp)[13];
}

#endif
