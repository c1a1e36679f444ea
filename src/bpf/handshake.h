/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * What backends' answers to new connections say about them (passive health
 * checking): the first answer to each connection's SYN is noted per backend
 * address, a SYN-ACK with its latency since the SYN left (a histogram), a
 * RST as a refusal. SYNs never answered are found by the control plane's
 * sweep. Only answers a forger cannot make count: a SYN-ACK or RST must ack
 * the client's SYN (acks_client_syn).
 */
#ifndef XLB_HANDSHAKE_H
#define XLB_HANDSHAKE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "xlb_maps.h"
#include "parsing.h"
#include "conntrack.h"

/* The bucket of a latency: the first whose bound it does not exceed. */
static __always_inline __u32 handshake_bucket(__u64 ns)
{
	__u32 i;

	for (i = 0; i < XLB_SYN_BUCKETS - 1; i++)
		if (ns <= config.syn_bucket_ns[i])
			break;
	return i;
}

/* A backend's first entry starts from this: too big for the stack. */
const volatile struct handshakes handshakes_zero = {};

static __always_inline struct handshakes *handshakes_of(__u32 backend)
{
	struct handshakes *h;

	h = bpf_map_lookup_elem(&handshakes, &backend);
	if (h)
		return h;
	bpf_map_update_elem(&handshakes, &backend, (const void *)&handshakes_zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&handshakes, &backend);
}

/* A backend's segment (f: the reverse entry) that XLB accepted: if it is
 * the backend's first answer to the SYN, note it, and mark the entry
 * answered (the sweep counts SYNs left unanswered by that mark). A SYN-ACK
 * or RST acking anything else is not an answer, and cannot hide one. */
static __always_inline void handshake_note(struct flow *f, const struct packet *pkt)
{
	__u32 flags = tcp_flags(pkt->tcp);
	struct flow_key peer = {};
	const struct flow *c;
	struct handshakes *h;
	__u64 ns;
	__u32 b;

	if ((f->tcp_flags & XLB_CT_ANSWERED) || !(flags & XLB_TCP_ACK) ||
	    !(flags & (XLB_TCP_SYN | XLB_TCP_RST)))
		return;
	flow_peer_key(&peer, f);
	c = bpf_map_lookup_elem(&conntrack, &peer);
	if (!c || !acks_client_syn(c, bpf_ntohl(pkt->tcp->ack_seq)))
		return;
	/* Once, whichever CPU marks it first. */
	if (__sync_fetch_and_or(&f->tcp_flags, XLB_CT_ANSWERED) & XLB_CT_ANSWERED)
		return;
	h = handshakes_of(pkt->ip->saddr);
	if (!h)
		return;
	if (flags & XLB_TCP_RST) {
		__sync_fetch_and_add(&h->refused, 1);
		return;
	}
	ns = bpf_ktime_get_ns() - f->created_ns;
	b = handshake_bucket(ns);
	if (b < XLB_SYN_BUCKETS) {
		__sync_fetch_and_add(&h->answered[b], 1);
		__sync_fetch_and_add(&h->latency_ns[b], ns);
	}
}

#endif
