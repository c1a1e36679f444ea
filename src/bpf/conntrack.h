/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Connection tracking: exact 5-tuple keys, an entry per direction, created
 * and removed as a pair (removal is the control plane's GC). */
#ifndef XLB_CONNTRACK_H
#define XLB_CONNTRACK_H

#include <linux/errno.h>
#include "parsing.h"
#include "xlb_maps.h"
#include "nat.h"

static __always_inline void flow_key_of(struct flow_key *k, const struct packet *pkt)
{
	k->saddr = pkt->ip->saddr;
	k->daddr = pkt->ip->daddr;
	k->sport = pkt->tcp->source;
	k->dport = pkt->tcp->dest;
	k->proto = IPPROTO_TCP;
}

/* Per-direction accounting and the TCP state the GC reads (flags seen,
 * last activity). Two CPUs may touch one entry: counts are atomic, the
 * timestamp is last-writer-wins, flags are OR-ed in only when new. */
static __always_inline void flow_touch(struct flow *f, const struct packet *pkt, __u64 now)
{
	__u32 flags = tcp_flags(pkt->tcp);

	__sync_fetch_and_add(&f->packets, 1);
	__sync_fetch_and_add(&f->bytes, pkt->len);
	if ((f->tcp_flags & flags) != flags)
		__sync_fetch_and_or(&f->tcp_flags, flags);
	f->last_seen_ns = now;
}

/* The key of the entry for the other direction: the reverse of this entry's
 * rewritten tuple. */
static __always_inline void flow_peer_key(struct flow_key *peer, const struct flow *f)
{
	peer->saddr = f->nat_daddr;
	peer->daddr = f->nat_saddr;
	peer->sport = f->nat_dport;
	peer->dport = f->nat_sport;
	peer->proto = IPPROTO_TCP;
}

/* Whether a connection is over (FIN both ways, or a RST either way): a new
 * SYN on its tuple then starts a new connection rather than resuming this
 * one. A half-closed connection may still be streaming: it is not over. */
static __always_inline int ct_closed(const struct flow *f)
{
	struct flow_key peer = {};
	struct flow *r;
	__u32 back = 0;

	flow_peer_key(&peer, f);
	r = bpf_map_lookup_elem(&conntrack, &peer);
	if (r)
		back = r->tcp_flags;
	if ((f->tcp_flags | back) & XLB_TCP_RST)
		return 1;
	return (f->tcp_flags & XLB_TCP_FIN) && (back & XLB_TCP_FIN);
}

/* Adds a forward entry's connection, about to be removed, to the retired
 * traffic of its backend. */
static __always_inline void ct_retire(const struct flow *fwd, const struct flow_key *peer)
{
	struct retired zero = {}, *r;
	struct flow *rev = bpf_map_lookup_elem(&conntrack, peer);
	__u32 backend = fwd->nat_daddr;

	r = bpf_map_lookup_elem(&retired, &backend);
	if (!r) {
		bpf_map_update_elem(&retired, &backend, &zero, BPF_NOEXIST);
		r = bpf_map_lookup_elem(&retired, &backend);
		if (!r)
			return;
	}
	r->connections += 1;
	r->bytes_to_backend += fwd->bytes;
	r->packets_to_backend += fwd->packets;
	if (rev) {
		r->bytes_to_client += rev->bytes;
		r->packets_to_client += rev->packets;
	}
}

/* Removes both entries, forward first so the NAT port is never in use by
 * the client side once the reverse entry (the port's claim) is gone. */
static __always_inline void ct_delete_pair(const struct flow_key *key, const struct flow *f)
{
	struct flow_key peer = {};

	flow_peer_key(&peer, f);
	ct_retire(f, &peer);
	bpf_map_delete_elem(&conntrack, key);
	bpf_map_delete_elem(&conntrack, &peer);
}

/*
 * Creates the entry pair for a new connection from `key` to `be`. The reverse
 * entry is inserted first, because inserting it is what claims the NAT port.
 * Returns the forward entry, or NULL with *why set to the drop counter.
 */
static __always_inline struct flow *ct_create(const struct flow_key *key, const struct backend *be,
					      __u16 remote_port, __u64 now, int *why)
{
	struct flow fwd = {
		.nat_saddr = config.snat_addr,
		.nat_daddr = be->addr,
		.nat_dport = remote_port,
		.backend_id = be->id,
		.created_ns = now,
		.last_seen_ns = now,
		.dir = XLB_DIR_TO_BACKEND,
	};
	struct flow rev = {
		.nat_saddr = key->daddr,
		.nat_daddr = key->saddr,
		.nat_sport = key->dport,
		.nat_dport = key->sport,
		.backend_id = be->id,
		.created_ns = now,
		.last_seen_ns = now,
		.dir = XLB_DIR_TO_CLIENT,
	};
	struct flow_key rev_key = {
		.saddr = be->addr,
		.daddr = config.snat_addr,
		.sport = remote_port,
		.proto = IPPROTO_TCP,
	};
	long err;

	*why = nat_claim_port(&rev_key, &rev, key);
	if (*why >= 0)
		return NULL;
	fwd.nat_sport = rev_key.dport;

	err = bpf_map_update_elem(&conntrack, key, &fwd, BPF_NOEXIST);
	if (err) {
		bpf_map_delete_elem(&conntrack, &rev_key);
		/* -EEXIST: the same SYN raced in on another CPU and won; use its entry. */
		if (err != -EEXIST) {
			*why = XLB_CNT_DROP_CT_FULL;
			return NULL;
		}
	} else {
		count(XLB_CNT_NEW_FLOW);
	}
	*why = XLB_CNT_DROP_CT_FULL;
	return bpf_map_lookup_elem(&conntrack, key);
}

#endif
