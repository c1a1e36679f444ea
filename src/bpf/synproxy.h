/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The SYN proxy (syn_proxy: on, or auto while SYNs flood): XLB answers a
 * new SYN itself with a SYN-ACK whose sequence number is a SYN cookie
 * (bpf_tcp_raw_gen_syncookie_ipv4), keeping no state. Only a client that
 * answers with a valid cookie (bpf_tcp_raw_check_syncookie_ipv4) gets a
 * connection: its ACK becomes, in place, the backend's SYN with the client's
 * own ISN, so the client's sequence numbers need no translation; the
 * backend's SYN-ACK becomes, in place, the ACK that completes the backend's
 * handshake. From then on the backend's sequence numbers are translated by
 * the distance between its ISN and the cookie (nat.h nat_rewrite), as DPVS
 * and nftables' synproxy do.
 *
 * One frame in, one frame out: client data sent before the backend answered
 * is dropped and sent again by the client (its first retransmission).
 * A cookie remembers only the MSS, so neither side is offered window
 * scaling, SACK or timestamps on a proxied connection.
 */
#ifndef XLB_SYNPROXY_H
#define XLB_SYNPROXY_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "csum.h"
#include "parsing.h"

static __always_inline __u32 l2_len(const struct packet *pkt)
{
	return pkt->vlan ? sizeof(struct ethhdr) + sizeof(struct vlan_tag) : sizeof(struct ethhdr);
}

/* Resizes the frame to its L2 header, a 20-byte IP header and `tcp_len`
 * bytes of TCP, and points pkt at the result; -1 if it cannot (IP options,
 * or no room). What was past the TCP header is gone. */
static __always_inline int reshape(struct xdp_md *ctx, struct packet *pkt, __u32 tcp_len)
{
	__u32 l2 = l2_len(pkt);
	void *data, *data_end;

	if (pkt->ip->ihl != 5)
		return -1;
	if (bpf_xdp_adjust_tail(ctx, (int)(l2 + sizeof(struct iphdr) + tcp_len) - (int)pkt->len))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + l2 + sizeof(struct iphdr) + tcp_len > data_end)
		return -1;
	pkt->eth = data;
	pkt->vlan = pkt->vlan ? data + sizeof(struct ethhdr) : NULL;
	pkt->ip = data + l2;
	pkt->tcp = data + l2 + sizeof(struct iphdr);
	pkt->len = l2 + sizeof(struct iphdr) + tcp_len;
	return 0;
}

/* Fills the IP header for a TCP segment of `tcp_len` bytes from saddr to
 * daddr, with its checksum. */
static __always_inline void ip_fill(struct iphdr *ip, __u32 saddr, __u32 daddr, __u32 tcp_len)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(sizeof(struct iphdr) + tcp_len);
	ip->id = 0;
	ip->frag_off = bpf_htons(XLB_IP_DF);
	ip->ttl = 64;
	ip->protocol = IPPROTO_TCP;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = 0;
	ip->check = ~csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
}

/* A TCP header of XLB's own (no payload): ports, numbers, flags (byte 13),
 * with `with_mss` (a constant) an MSS option of `mss`, a full checksum. tcp
 * points at 20 bytes, 24 with the option. */
static __always_inline void tcp_fill(const struct iphdr *ip, struct tcphdr *tcp, __u16 sport,
				     __u16 dport, __u32 seq, __u32 ack, __u8 flags, int with_mss,
				     __u16 mss)
{
	const __u32 len = with_mss ? XLB_SYNPROXY_TCP_LEN : sizeof(struct tcphdr);
	__u8 *opt = (__u8 *)(tcp + 1);
	__u64 sum;

	__builtin_memset(tcp, 0, sizeof(*tcp));
	tcp->source = sport;
	tcp->dest = dport;
	tcp->seq = bpf_htonl(seq);
	tcp->ack_seq = bpf_htonl(ack);
	tcp->doff = len / 4;
	((__u8 *)tcp)[13] = flags;
	tcp->window = bpf_htons(XLB_SYNPROXY_WINDOW);
	if (with_mss) {
		opt[0] = 2; /* MSS */
		opt[1] = 4;
		opt[2] = mss >> 8;
		opt[3] = mss & 0xff;
	}
	sum = bpf_csum_diff(0, 0, (__be32 *)tcp, len, 0);
	tcp->check = ~csum_fold(sum + csum_pseudo4(ip->saddr, ip->daddr, IPPROTO_TCP, len));
}

/* Turns a client's bare SYN into XLB's SYN-ACK with a cookie, back to the
 * client: 0, or -1 if it cannot (then the SYN is left as it was or is
 * unusable: drop it). */
static __always_inline int synproxy_answer(struct xdp_md *ctx, struct packet *pkt)
{
	__u8 mac[ETH_ALEN];
	__u32 saddr, daddr, th_len, seq;
	__u16 sport, dport, mss;
	struct tcphdr *tcp;
	struct iphdr *ip;
	__s64 value;

	/* The helper reads the options through th_len, which the verifier
	 * must see in bounds: the TCP part is made XLB_TCP_MAX_LEN long. */
	if (reshape(ctx, pkt, XLB_TCP_MAX_LEN))
		return -1;
	ip = pkt->ip;
	tcp = pkt->tcp;
	if ((void *)tcp + XLB_TCP_MAX_LEN > (void *)(long)ctx->data_end)
		return -1;
	th_len = (tcp->doff * 4) & 0x3c;
	if (th_len < sizeof(struct tcphdr))
		return -1;
	/* The IP length still says what the client sent. */
	value = bpf_tcp_raw_gen_syncookie_ipv4(ip, tcp, th_len);
	if (value < 0)
		return -1;
	mss = (value >> 32) & 0xffff;
	saddr = ip->saddr;
	daddr = ip->daddr;
	sport = tcp->source;
	dport = tcp->dest;
	seq = bpf_ntohl(tcp->seq);
	if (reshape(ctx, pkt, XLB_SYNPROXY_TCP_LEN))
		return -1;
	if ((void *)pkt->tcp + XLB_SYNPROXY_TCP_LEN > (void *)(long)ctx->data_end)
		return -1;
	__builtin_memcpy(mac, pkt->eth->h_source, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, pkt->eth->h_dest, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_dest, mac, ETH_ALEN);
	ip_fill(pkt->ip, daddr, saddr, XLB_SYNPROXY_TCP_LEN);
	tcp_fill(pkt->ip, pkt->tcp, dport, sport, (__u32)value, seq + 1, XLB_TCP_SYN | XLB_TCP_ACK,
		 1, mss);
	return 0;
}

/* Whether a client's ACK carries a cookie XLB issued for its tuple. */
static __always_inline int synproxy_cookie_ok(struct packet *pkt)
{
	return bpf_tcp_raw_check_syncookie_ipv4(pkt->ip, pkt->tcp) == 0;
}

/* Turns a client segment into the SYN the client would have sent the
 * backend (its ISN `isn`, XLB_SYNPROXY_MSS), still addressed as the
 * client's: the NAT rewrite follows. 0, or -1 if it cannot. */
static __always_inline int synproxy_as_syn(struct xdp_md *ctx, struct packet *pkt, __u32 isn)
{
	__u32 saddr = pkt->ip->saddr, daddr = pkt->ip->daddr;
	__u16 sport = pkt->tcp->source, dport = pkt->tcp->dest;

	if (reshape(ctx, pkt, XLB_SYNPROXY_TCP_LEN))
		return -1;
	if ((void *)pkt->tcp + XLB_SYNPROXY_TCP_LEN > (void *)(long)ctx->data_end)
		return -1;
	ip_fill(pkt->ip, saddr, daddr, XLB_SYNPROXY_TCP_LEN);
	tcp_fill(pkt->ip, pkt->tcp, sport, dport, isn, 0, XLB_TCP_SYN, 1, XLB_SYNPROXY_MSS);
	return 0;
}

/* Turns the backend's SYN-ACK into the ACK that completes its handshake,
 * back to the backend: the client's side of it (seq client_isn + 1) as the
 * backend knows the client (the SYN-ACK's own addresses, reversed). */
static __always_inline int synproxy_ack_backend(struct xdp_md *ctx, struct packet *pkt,
						__u32 client_isn)
{
	__u32 saddr = pkt->ip->saddr, daddr = pkt->ip->daddr;
	__u16 sport = pkt->tcp->source, dport = pkt->tcp->dest;
	__u32 backend_isn = bpf_ntohl(pkt->tcp->seq);
	__u8 mac[ETH_ALEN];

	if (reshape(ctx, pkt, sizeof(struct tcphdr)))
		return -1;
	if ((void *)(pkt->tcp + 1) > (void *)(long)ctx->data_end)
		return -1;
	__builtin_memcpy(mac, pkt->eth->h_source, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, pkt->eth->h_dest, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_dest, mac, ETH_ALEN);
	ip_fill(pkt->ip, daddr, saddr, sizeof(struct tcphdr));
	tcp_fill(pkt->ip, pkt->tcp, dport, sport, client_isn + 1, backend_isn + 1, XLB_TCP_ACK, 0,
		 0);
	return 0;
}

#endif
