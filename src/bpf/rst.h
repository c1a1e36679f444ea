/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Answering for a closed port from XDP: the client's segment becomes, in
 * place, the RST a closed port sends (RFC 9293 §3.10.7.1): to a segment with
 * ACK, seq = its ack and RST alone; to one without (a SYN), seq 0, ack = its
 * sequence number plus its length (SYN and FIN count one) and RST|ACK. Used
 * for SYNs while draining, so clients fail over at once instead of waiting
 * for a timeout, and for packets of no known connection (unknown_flow: rst),
 * so a client whose connection XLB forgot reconnects at once. Never called
 * for a RST. */
#ifndef XLB_RST_H
#define XLB_RST_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "csum.h"
#include "parsing.h"

#define XLB_RST_L3L4_LEN (sizeof(struct iphdr) + sizeof(struct tcphdr))
#define XLB_RST_TTL	 64

static __always_inline __u16 csum_fold32(__s64 sum)
{
	return ~csum_fold((__u64)sum);
}

/* Returns 0 with the frame rewritten into the RST (send it back out with bounce()), or
 * -1 if the frame could not be reshaped (leave it alone). */
static __always_inline int tcp_reset(struct xdp_md *ctx, struct packet *pkt)
{
	struct ethhdr *eth = pkt->eth;
	struct iphdr *ip = pkt->ip;
	struct tcphdr *tcp = pkt->tcp;
	__u8 mac[ETH_ALEN];
	__u8 in = tcp_flags(tcp);
	__u32 saddr = ip->saddr, daddr = ip->daddr;
	__u16 sport = tcp->source, dport = tcp->dest;
	__u32 payload = bpf_ntohs(ip->tot_len) - ip->ihl * 4 - tcp->doff * 4;
	__u32 ack = bpf_ntohl(tcp->seq) + payload + !!(in & XLB_TCP_SYN) + !!(in & XLB_TCP_FIN);
	__u32 seq = (in & XLB_TCP_ACK) ? bpf_ntohl(tcp->ack_seq) : 0;
	void *data, *data_end;
	__u32 l2;
	__s64 sum;

	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);

	/* Drop IP options, TCP options and payload: a bare 54-byte frame (58
	 * with the VLAN tag, which stays as it came). */
	l2 = pkt->vlan ? sizeof(struct ethhdr) + sizeof(struct vlan_tag) : sizeof(struct ethhdr);
	if (bpf_xdp_adjust_tail(ctx, (int)(l2 + XLB_RST_L3L4_LEN) - (int)pkt->len))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + l2 + XLB_RST_L3L4_LEN > data_end)
		return -1;
	ip = data + l2;
	tcp = (void *)(ip + 1);

	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct tcphdr));
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); /* DF */
	ip->ttl = XLB_RST_TTL;
	ip->protocol = IPPROTO_TCP;
	ip->saddr = daddr;
	ip->daddr = saddr;
	ip->check = 0;
	sum = bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0);
	ip->check = csum_fold32(sum);

	__builtin_memset(tcp, 0, sizeof(*tcp));
	tcp->source = dport;
	tcp->dest = sport;
	tcp->seq = bpf_htonl(seq);
	tcp->doff = 5;
	tcp->rst = 1;
	if (!(in & XLB_TCP_ACK)) {
		tcp->ack_seq = bpf_htonl(ack);
		tcp->ack = 1;
	}
	/* Pseudo-header (addresses, protocol, length), then the header. */
	sum = bpf_csum_diff(0, 0, &ip->saddr, 8, 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)tcp, sizeof(*tcp), sum);
	sum += bpf_htons(IPPROTO_TCP) + bpf_htons(sizeof(*tcp));
	tcp->check = csum_fold32(sum);
	pkt->len = l2 + XLB_RST_L3L4_LEN;
	return 0;
}

#endif
