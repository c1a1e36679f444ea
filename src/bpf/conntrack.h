/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking: exact 5-tuple keys, an entry per direction. The data
 * path creates pairs and reopens closed ones in place; only the control
 * plane's sweep removes them, once a closed pair has held its NAT port long
 * enough (a tombstone, see nat.h).
 */
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

/* Whether `peer` is the other half of the entry keyed `key`: a port taken
 * over (nat.h) or a connection moved to another backend leaves an entry whose
 * peer key finds someone else's entry. */
static __always_inline int flow_pairs_with(const struct flow *peer, const struct flow_key *key)
{
	return peer->nat_daddr == key->saddr && peer->nat_dport == key->sport &&
	       peer->nat_saddr == key->daddr && peer->nat_sport == key->dport;
}

/* The sequence number after this segment: its payload, SYN and FIN counted. */
static __always_inline __u32 seg_end(const struct packet *pkt)
{
	__u32 len = bpf_ntohs(pkt->ip->tot_len) - pkt->ip->ihl * 4 - pkt->tcp->doff * 4;

	return bpf_ntohl(pkt->tcp->seq) + len + pkt->tcp->syn + pkt->tcp->fin;
}

/* The first FIN or RST of a direction: what the port's tombstone needs to
 * know (who closed first, where the client's sequence ended) and whether the
 * connection is now closed, marked on both entries so neither a SYN nor the
 * sweep has to look at the other. Rare (once per connection and side), so
 * the peer lookup is affordable here. */
static __always_inline void ct_note_close(struct flow *f, const struct packet *pkt, __u32 flags)
{
	struct flow_key peer = {};
	struct flow *p;
	__u32 mine = 0, theirs = 0;

	flow_peer_key(&peer, f);
	p = bpf_map_lookup_elem(&conntrack, &peer);
	if (flags & XLB_TCP_RST) {
		mine |= XLB_CT_CLOSED | XLB_CT_RESET;
		theirs |= XLB_CT_CLOSED | XLB_CT_RESET;
	}
	if ((flags & XLB_TCP_FIN) && p) {
		if (!(p->tcp_flags & XLB_TCP_FIN)) {
			mine |= XLB_CT_FIN_FIRST;
		} else {
			mine |= XLB_CT_CLOSED;
			theirs |= XLB_CT_CLOSED;
		}
		if (f->dir == XLB_DIR_TO_BACKEND) {
			p->fin_seq = seg_end(pkt);
			theirs |= XLB_CT_FIN_SEQ;
		}
	}
	if (mine)
		__sync_fetch_and_or(&f->tcp_flags, mine);
	if (p && theirs)
		__sync_fetch_and_or(&p->tcp_flags, theirs);
}

/* Marks the handshake complete on both entries, once it shows: data or a
 * FIN from the backend right where its sequence was (its TCP sends them only
 * once established; a bare ACK may be its answer to anyone's out-of-window
 * segment), or a client ACK for the backend's
 * SYN-ACK (a blind sender cannot know the backend's ISN, so the ack must be near where the
 * backend's sequence was seen). A complete pair is no longer half-open: its port can no longer be
 * recycled (nat.h). Costs a peer lookup per segment until then, which in practice is the client's
 * first ACK. */
static __always_inline void ct_note_established(struct flow *f, const struct packet *pkt,
						int in_order)
{
	struct flow_key peer = {};
	struct flow *p;

	if (f->dir == XLB_DIR_TO_CLIENT && (seg_end(pkt) == bpf_ntohl(pkt->tcp->seq) || !in_order))
		return;
	flow_peer_key(&peer, f);
	p = bpf_map_lookup_elem(&conntrack, &peer);
	if (!p)
		return;
	if (f->dir == XLB_DIR_TO_BACKEND &&
	    (!pkt->tcp->ack || !(p->tcp_flags & XLB_TCP_SYN) || !(p->tcp_flags & XLB_CT_SEQ) ||
	     p->seq_next - bpf_ntohl(pkt->tcp->ack_seq) > XLB_RST_AHEAD))
		return;
	__sync_fetch_and_or(&p->tcp_flags, XLB_CT_ESTABLISHED);
	__sync_fetch_and_or(&f->tcp_flags, XLB_CT_ESTABLISHED);
}

/* Marks a pair the SYN proxy opened (f: its forward entry): the client's
 * ISN and the cookie it was answered with, on both entries. Before the
 * backend's SYN is sent, so its SYN-ACK finds them. */
static __always_inline void ct_mark_proxy(struct flow *f, __u32 client_isn, __u32 cookie)
{
	struct flow_key peer = {};
	struct flow *p;

	flow_peer_key(&peer, f);
	p = bpf_map_lookup_elem(&conntrack, &peer);
	f->client_isn = client_isn;
	f->cookie = cookie;
	__sync_fetch_and_or(&f->tcp_flags, XLB_CT_PROXY);
	if (p) {
		p->client_isn = client_isn;
		p->cookie = cookie;
		__sync_fetch_and_or(&p->tcp_flags, XLB_CT_PROXY);
	}
}

/* The backend answered a proxied pair (f: its reverse entry) with ISN
 * `backend_isn`: its sequence numbers are translated from now on, on both
 * entries, and the pair is established (the client completed its handshake
 * with XLB). The distance is written before the mark that makes it used. */
static __always_inline void ct_proxy_ready(struct flow *f, __u32 backend_isn)
{
	struct flow_key peer = {};
	struct flow *p;
	__u32 delta = backend_isn - f->cookie;

	flow_peer_key(&peer, f);
	p = bpf_map_lookup_elem(&conntrack, &peer);
	f->seq_delta = delta;
	if (p)
		p->seq_delta = delta;
	__sync_fetch_and_or(&f->tcp_flags, XLB_CT_ESTABLISHED);
	if (p)
		__sync_fetch_and_or(&p->tcp_flags, XLB_CT_ESTABLISHED);
}

/* Whether `ack` acks the client's SYN (c: the client's entry): its ISN + 1,
 * or up to what the SYN carried with it (data, a Fast Open request), which a
 * backend may or may not take. A blind sender cannot know either. */
static __always_inline int acks_client_syn(const struct flow *c, __u32 ack)
{
	return (c->tcp_flags & XLB_CT_SEQ) &&
	       ack - (c->client_isn + 1) <= c->seq_next - (c->client_isn + 1);
}

/* Whether `seq` lies near where f's sender's sequence was last seen. */
static __always_inline int seq_near(const struct flow *f, __u32 seq)
{
	return seq - (f->seq_next - XLB_RST_BEHIND) < XLB_RST_BEHIND + XLB_RST_AHEAD;
}

/* Whether a segment may start tracking f's sequence: the client's SYN, or
 * the backend's SYN-ACK that acks it exactly (a forger cannot know the
 * client's ISN, so cannot plant the backend's mark). */
static __always_inline int seq_first(const struct flow *f, const struct packet *pkt, __u32 flags)
{
	struct flow_key peer = {};
	const struct flow *p;

	if (!(flags & XLB_TCP_SYN))
		return 0;
	if (f->dir == XLB_DIR_TO_BACKEND)
		return 1;
	flow_peer_key(&peer, f);
	p = bpf_map_lookup_elem(&conntrack, &peer);
	return (flags & XLB_TCP_ACK) && p && acks_client_syn(p, bpf_ntohl(pkt->tcp->ack_seq));
}

/* Whether a RST may end the connection (RFC 5961 §3, as a middlebox can
 * apply it): its sequence number near where its sender's was last seen
 * (XLB_RST_BEHIND, XLB_RST_AHEAD). A side that has sent nothing yet (the
 * backend refusing the SYN) answers the other side's SYN: it must ack it
 * exactly, as RFC 9293 asks in SYN-SENT. A blind attacker's RST is neither. */
static __always_inline int rst_acceptable(const struct flow *f, const struct packet *pkt)
{
	struct flow_key peer = {};
	const struct flow *p;
	__u32 seq = bpf_ntohl(pkt->tcp->seq);

	/* A client whose handshake has not completed answers a backend's ACK
	 * for some older connection on the tuple (a recycled port whose
	 * SYN_RECV the backend still holds) with a RST of that ACK's number:
	 * it must get through, or the backend keeps refusing the tuple. A
	 * forged one only ends a half-open pair, which a SYN reopens. */
	if (f->dir == XLB_DIR_TO_BACKEND && !(f->tcp_flags & XLB_CT_ESTABLISHED))
		return 1;
	if (f->tcp_flags & XLB_CT_SEQ)
		return seq_near(f, seq);
	if (!pkt->tcp->ack)
		return 0;
	flow_peer_key(&peer, f);
	p = bpf_map_lookup_elem(&conntrack, &peer);
	return p && acks_client_syn(p, bpf_ntohl(pkt->tcp->ack_seq));
}

/* Per-direction accounting and the TCP state the sweep reads (flags seen,
 * last activity), with as few writes to the shared entry as possible. One
 * direction of a connection is one queue's, so one CPU's, at a time: plain
 * adds, no locked instructions (two CPUs on one direction at the same moment
 * could lose a count, never corrupt an entry). The timestamp moves only in
 * XLB_LAST_SEEN_STEP_NS steps, far below any expiry; flags are OR-ed in,
 * atomically, only when new: they are also written for the other side. */
static __always_inline void flow_touch(struct flow *f, const struct packet *pkt, __u64 now)
{
	__u32 flags = tcp_flags(pkt->tcp);
	__u32 seq = bpf_ntohl(pkt->tcp->seq), end = seg_end(pkt), fresh;
	int tracked = f->tcp_flags & XLB_CT_SEQ;
	int in_order = tracked && seq == f->seq_next, near;

	f->packets += 1;
	f->bytes += pkt->len;
	/* The sender's mark moves on with its segments, never by a leap a
	 * forger could make (nor by a RST, which says nothing of what was
	 * sent). A FIN far from it is no FIN of the sender's. */
	if (!(flags & XLB_TCP_RST)) {
		if (tracked ? end - f->seq_next - 1 < XLB_RST_AHEAD : seq_first(f, pkt, flags)) {
			f->seq_next = end;
			flags |= XLB_CT_SEQ;
		}
	}
	near = tracked && seq_near(f, seq);
	if ((flags & XLB_TCP_FIN) && !near)
		flags &= ~XLB_TCP_FIN;
	/* A client RST before the handshake completed goes through whatever
	 * its number (rst_acceptable), but ends the connection only near the
	 * client's own mark: one answering some other connection's segment (a
	 * backend's stale ACK, a late SYN-ACK of a backend the tuple left) is
	 * not this connection's end. */
	if ((flags & XLB_TCP_RST) && f->dir == XLB_DIR_TO_BACKEND &&
	    !(f->tcp_flags & XLB_CT_ESTABLISHED) && !near)
		flags &= ~XLB_TCP_RST;
	fresh = flags & ~f->tcp_flags;
	if (fresh) {
		/* seq_next first: the other side reads it once the mark is set. */
		__sync_fetch_and_or(&f->tcp_flags, fresh & XLB_CT_SEQ);
		if (fresh & (XLB_TCP_FIN | XLB_TCP_RST))
			ct_note_close(f, pkt, fresh);
		__sync_fetch_and_or(&f->tcp_flags, flags);
	}
	if (!(f->tcp_flags & XLB_CT_ESTABLISHED) && !(flags & (XLB_TCP_SYN | XLB_TCP_RST)))
		ct_note_established(f, pkt, in_order);
	if (now - f->last_seen_ns >= XLB_LAST_SEEN_STEP_NS)
		f->last_seen_ns = now;
}

/* Whether a connection is over (FIN both ways, or a RST either way): a new
 * SYN on its tuple then starts a new connection rather than resuming this
 * one. A half-closed connection may still be streaming: it is not over. */
static __always_inline int ct_closed(const struct flow *f)
{
	return f->tcp_flags & XLB_CT_CLOSED;
}

/* Adds a connection about to be reopened or taken over to the retired
 * traffic of its backend (the sweep never sees it end). */
static __always_inline void ct_retire(const struct flow *fwd, const struct flow *rev)
{
	struct retired zero = {}, *r;
	__u32 backend = fwd->nat_daddr;

	r = bpf_map_lookup_elem(&retired, &backend);
	if (!r) {
		bpf_map_update_elem(&retired, &backend, &zero, BPF_NOEXIST);
		r = bpf_map_lookup_elem(&retired, &backend);
		if (!r)
			return;
	}
	r->connections += 1;
	if (fwd->tcp_flags & XLB_CT_RESET)
		r->connections_reset += 1;
	r->bytes_to_backend += fwd->bytes;
	r->packets_to_backend += fwd->packets;
	if (rev) {
		r->bytes_to_client += rev->bytes;
		r->packets_to_client += rev->packets;
	}
}

/* A fresh pair's entries for a connection from `key` to `be`, opened by a
 * SYN with sequence number `syn_seq`. */
static __always_inline void ct_pair_init(struct flow *fwd, struct flow *rev,
					 struct flow_key *rev_key, const struct flow_key *key,
					 const struct backend *be, __u16 remote_port, __u32 syn_seq,
					 __u64 now)
{
	__u32 snat = snat_addr_for(key->saddr);
	/* Precise: the backend's SYN leaves now, and its answer's latency is
	 * measured from here (handshake.h). */
	__u64 born = bpf_ktime_get_ns();

	fwd->nat_saddr = snat;
	fwd->nat_daddr = be->addr;
	fwd->nat_dport = remote_port;
	fwd->backend_id = be->id;
	fwd->created_ns = born;
	fwd->client_isn = syn_seq;
	fwd->last_seen_ns = now;
	fwd->dir = XLB_DIR_TO_BACKEND;

	rev->nat_saddr = key->daddr;
	rev->nat_daddr = key->saddr;
	rev->nat_sport = key->dport;
	rev->nat_dport = key->sport;
	rev->backend_id = be->id;
	rev->created_ns = born;
	rev->client_isn = syn_seq;
	rev->last_seen_ns = now;
	rev->dir = XLB_DIR_TO_CLIENT;

	rev_key->saddr = be->addr;
	rev_key->daddr = snat;
	rev_key->sport = remote_port;
	rev_key->proto = IPPROTO_TCP;
}

/* Claims a NAT port for rev: free ports first, then a tombstone that may be
 * taken over, then the oldest half-open pair seen, recycled (see nat.h).
 * Returns -1 with rev_key->dport set, or the drop counter. */
static __always_inline int ct_claim(struct flow_key *rev_key, const struct flow *rev,
				    const struct flow_key *key, __u32 syn_seq)
{
	struct port_spare spare = {};
	struct flow_key old_fwd = {};
	struct flow *t, *of, old;
	int why = nat_claim_port(rev_key, rev, key, syn_seq, &spare);

	if (why < 0 || (!spare.tombstone && !spare.half_open))
		return why;
	rev_key->dport = spare.tombstone ? spare.tombstone : spare.half_open;
	t = bpf_map_lookup_elem(&conntrack, rev_key);
	if (!t || (!spare.tombstone && !nat_half_open(t)))
		return why;
	/* Read before the entry is replaced: the old connection ends here. */
	old = *t;
	flow_peer_key(&old_fwd, &old);
	of = bpf_map_lookup_elem(&conntrack, &old_fwd);
	/* The backend may still hold the half-open connection (SYN_RECV) on
	 * this very 4-tuple, and answers a SYN inside its window with a RST:
	 * not with this SYN's sequence number. */
	if (!spare.tombstone && of && flow_pairs_with(of, rev_key) &&
	    (of->tcp_flags & XLB_CT_SEQ) && syn_seq - of->seq_next < XLB_RST_AHEAD)
		return why;
	if (bpf_map_update_elem(&conntrack, rev_key, rev, BPF_EXIST))
		return why;
	if (spare.tombstone) {
		/* Its forward entry is left to the sweep, which sees it no longer
		 * pairs; its traffic is retired here. */
		if (of && flow_pairs_with(of, rev_key))
			ct_retire(of, &old);
		count(XLB_CNT_NAT_RECLAIMED);
	} else {
		/* A half-open pair carried no traffic; its forward entry goes at
		 * once, so the entry the new pair needs is there, and a late
		 * packet from its client cannot reach the new connection. */
		if (of && flow_pairs_with(of, rev_key))
			bpf_map_delete_elem(&conntrack, &old_fwd);
		count(XLB_CNT_NAT_RECYCLED);
	}
	return -1;
}

/*
 * Creates the entry pair for a new connection from `key` to `be`. The reverse
 * entry is inserted first, because inserting it is what claims the NAT port.
 * Returns the forward entry, or NULL with *why set to the drop counter.
 */
static __always_inline struct flow *ct_create(const struct flow_key *key, const struct backend *be,
					      __u16 remote_port, __u32 syn_seq, __u64 now, int *why)
{
	struct flow fwd = {}, rev = {};
	struct flow_key rev_key = {};
	long err;

	ct_pair_init(&fwd, &rev, &rev_key, key, be, remote_port, syn_seq, now);
	*why = ct_claim(&rev_key, &rev, key, syn_seq);
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

/*
 * A bare SYN on the tuple of a closed connection, or of a half-open one
 * the client gave up on (syn_starts_anew in xlb.bpf.c: it reused its port):
 * the pair is reopened in place, same backend and same NAT port, so
 * the backend sees the same 4-tuple again, with a newer ISN and timestamp,
 * and accepts it out of TIME_WAIT. Nothing is deleted: both entries are
 * rewritten whole, the reverse one only if it still exists (BPF_EXIST), so a
 * sweep that removed the pair a moment before cannot leave half of it. If
 * the backend changed (it left the set) or the port's claim is gone, the
 * forward entry moves to a newly claimed port and the old reverse entry
 * stays behind as that port's tombstone.
 */
static __always_inline struct flow *ct_reopen(const struct flow_key *key, const struct flow *f,
					      const struct backend *be, __u16 remote_port,
					      __u32 syn_seq, __u64 now, int *why)
{
	struct flow fwd = {}, rev = {}, old_fwd = *f, old_rev = {};
	struct flow_key rev_key = {}, peer = {};
	struct flow *r;

	/* The old connection's final traffic, read before either entry is
	 * rewritten, and retired once a new one has replaced it. Without its
	 * reverse entry (its port was taken over) it was retired then. */
	flow_peer_key(&peer, f);
	r = bpf_map_lookup_elem(&conntrack, &peer);
	if (r && flow_pairs_with(r, key))
		old_rev = *r;
	else
		r = NULL;
	ct_pair_init(&fwd, &rev, &rev_key, key, be, remote_port, syn_seq, now);
	if (r && f->nat_daddr == be->addr && f->nat_saddr == fwd.nat_saddr &&
	    f->nat_dport == remote_port) {
		fwd.nat_sport = f->nat_sport;
		if (!bpf_map_update_elem(&conntrack, &peer, &rev, BPF_EXIST)) {
			count(XLB_CNT_CT_REOPENED);
			goto commit;
		}
	}
	*why = ct_claim(&rev_key, &rev, key, syn_seq);
	if (*why >= 0)
		return NULL;
	fwd.nat_sport = rev_key.dport;
commit:
	if (r)
		ct_retire(&old_fwd, &old_rev);
	count(XLB_CNT_NEW_FLOW);
	*why = XLB_CNT_DROP_CT_FULL;
	if (bpf_map_update_elem(&conntrack, key, &fwd, BPF_ANY))
		return NULL;
	return bpf_map_lookup_elem(&conntrack, key);
}

#endif
