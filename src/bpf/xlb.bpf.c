// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * XLB's packet path, top to bottom:
 *   parse  -> is it Ethernet/IPv4/TCP at all?
 *   classify -> client to listen_ip:local_port, or backend reply to
 *               snat_ip:nat_port? anything else passes untouched
 *   conntrack -> find the connection; a client SYN creates one (maglev
 *                picks the backend, the reverse entry claims a NAT port)
 *                or reopens a closed one in place, or, while draining, is
 *                answered with a RST; under a SYN flood (syn_proxy) it is
 *                answered with a SYN cookie instead, and the client's ACK
 *                creates the connection (synproxy.h)
 *   route -> FIB lookup for the rewritten addresses; a packet too big for
 *            the egress link is answered with ICMP fragmentation needed
 *   NAT -> rewrite addresses and ports, fix checksums incrementally
 *   transmit -> back out of the ingress interface or a devmap redirect,
 *               or the kernel for ARP and interfaces XDP cannot send on
 * A backend's first answer to a new connection's SYN is noted per backend
 * (handshake.h: latency, refusals) for passive health checking.
 * ICMP errors about a tracked connection are translated for the other side
 * (icmp.h), so path MTU discovery works through the NAT.
 * Every outcome is counted once, in xlb_xdp(), which alone returns verdicts
 * (icmp_mtu_floor, a note on a translated error, is counted beside it).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "xlb_structs.h"
#include "xlb_maps.h"
#include "parsing.h"
#include "lb.h"
#include "conntrack.h"
#include "nat.h"
#include "forward.h"
#include "rst.h"
#include "synproxy.h"
#include "handshake.h"
#include "icmp.h"
#include "icmp_reply.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* A packet of ours that forwarding would expire: answered like a router. */
static __always_inline struct outcome expired(struct xdp_md *ctx, struct packet *pkt)
{
	if (!icmp_answerable(pkt))
		return verdict(XDP_DROP, XLB_CNT_DROP_TTL);
	if (!budget_take(XLB_BUDGET_ICMP))
		return verdict(XDP_DROP, XLB_CNT_DROP_ICMP_LIMIT);
	if (icmp_reply(ctx, pkt, XLB_ICMP_TIME_EXCEEDED, 0, 0))
		return verdict(XDP_DROP, XLB_CNT_DROP_TTL);
	return verdict(bounce(ctx, ingress_iface(ctx)), XLB_CNT_TTL_EXCEEDED);
}

/* A packet of ours too big for the egress link: a DF packet is answered like
 * a router answers it, so the sender lowers its path MTU; one that may be
 * fragmented is dropped all the same (XDP cannot fragment). */
static __always_inline struct outcome too_big(struct xdp_md *ctx, struct packet *pkt, __u16 mtu)
{
	if (!(pkt->ip->frag_off & bpf_htons(XLB_IP_DF)) || !icmp_answerable(pkt))
		return verdict(XDP_DROP, XLB_CNT_DROP_FIB);
	if (!budget_take(XLB_BUDGET_ICMP))
		return verdict(XDP_DROP, XLB_CNT_DROP_ICMP_LIMIT);
	if (icmp_reply(ctx, pkt, XLB_ICMP_DEST_UNREACH, XLB_ICMP_FRAG_NEEDED, mtu))
		return verdict(XDP_DROP, XLB_CNT_DROP_FIB);
	return verdict(bounce(ctx, ingress_iface(ctx)), XLB_CNT_FRAG_NEEDED);
}

/* A packet for a listened port that belongs to no connection XLB knows (it
 * expired, or was never seen): with unknown_flow: rst it is answered with a
 * RST, within its budget, so a client whose connection was forgotten
 * reconnects at once instead of retransmitting into silence. A RST is never
 * answered. */
static __always_inline struct outcome unknown_flow(struct xdp_md *ctx, struct packet *pkt)
{
	if (!(config.flags & XLB_F_UNKNOWN_RST) || (tcp_flags(pkt->tcp) & XLB_TCP_RST))
		return verdict(XDP_DROP, XLB_CNT_DROP_NO_FLOW);
	if (!budget_take(XLB_BUDGET_RST))
		return verdict(XDP_DROP, XLB_CNT_DROP_RST_LIMIT);
	if (tcp_reset(ctx, pkt))
		return verdict(XDP_DROP, XLB_CNT_DROP_NO_FLOW);
	return verdict(bounce(ctx, ingress_iface(ctx)), XLB_CNT_UNKNOWN_FLOW_RST);
}

/* Whether the segment's TCP checksum is a seed its sender (local, on an
 * interface in generic mode, `in`) left to offload: it cannot be checked. */
static __always_inline int offload_seed(struct xdp_md *ctx, const struct iface *in,
					const struct packet *pkt)
{
	return is_generic(in) && tcp_csum_is_seed(ctx, pkt);
}

/* Sends a packet of a tracked connection on, rewritten to f's NAT tuple. The
 * route is found before the rewrite: a packet that cannot go on is answered
 * about what its sender sent. */
static __always_inline struct outcome nat_forward(struct xdp_md *ctx, struct packet *pkt,
						  struct flow *f, __u64 now, __u32 sent)
{
	struct bpf_fib_lookup fib = {};
	const struct iface *in = ingress_iface(ctx);
	int seed = offload_seed(ctx, in, pkt);
	long rc;

	/* A RST ends the connection for XLB too: only one whose checksum
	 * holds may (a seed left to offload cannot be checked here; its
	 * sender is local). Its receiver would drop a corrupt one anyway. */
	if (tcp_flags(pkt->tcp) & XLB_TCP_RST) {
		if (!seed && !tcp_csum_verifies(ctx, pkt))
			return verdict(XDP_DROP, XLB_CNT_DROP_RST_CSUM);
		/* Nor does one a blind attacker guessed (RFC 5961). */
		if (!rst_acceptable(f, pkt))
			return verdict(XDP_DROP, XLB_CNT_DROP_RST_WINDOW);
	}
	rc = route(ctx, pkt, f->nat_saddr, f->nat_daddr, in, &fib, now);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return too_big(ctx, pkt, fib.mtu_result);
	if (f->dir == XLB_DIR_TO_CLIENT)
		handshake_note(f, pkt);
	flow_touch(f, pkt, now);
	nat_rewrite(pkt, f, seed);
	return transmit(ctx, pkt, rc, &fib, in, sent);
}

/* While draining, a new connection is refused at once, within its budget,
 * so the client retries elsewhere; tracked connections keep flowing. */
static __always_inline struct outcome drain_refuse(struct xdp_md *ctx, struct packet *pkt)
{
	if (!budget_take(XLB_BUDGET_DRAIN_RST))
		return verdict(XDP_DROP, XLB_CNT_DROP_DRAIN_LIMIT);
	if (tcp_reset(ctx, pkt))
		return verdict(XDP_DROP, XLB_CNT_DRAIN_RST);
	return verdict(bounce(ctx, ingress_iface(ctx)), XLB_CNT_DRAIN_RST);
}

/* A client's ACK of no connection that may answer a SYN cookie: if it
 * does, the connection is created now and the ACK goes on as the backend's
 * SYN; if not, it is a packet of no known connection. */
static __always_inline struct outcome synproxy_open(struct xdp_md *ctx, struct packet *pkt,
						    const struct flow_key *key, __u16 remote_port,
						    __u64 now)
{
	__u32 isn = bpf_ntohl(pkt->tcp->seq) - 1;
	__u32 cookie = bpf_ntohl(pkt->tcp->ack_seq) - 1;
	const struct backend *be;
	struct flow *f;
	int why;

	/* A local sender's checksum left to offload cannot be rewritten into
	 * a segment of XLB's own: such a client is not proxied. */
	if (offload_seed(ctx, ingress_iface(ctx), pkt))
		return unknown_flow(ctx, pkt);
	if (!synproxy_cookie_ok(pkt)) {
		count(XLB_CNT_SYNPROXY_FAILED);
		return unknown_flow(ctx, pkt);
	}
	count(XLB_CNT_SYNPROXY_VALID);
	if (config.flags & XLB_F_DRAIN)
		return drain_refuse(ctx, pkt);
	be = pick_backend(key);
	if (!be)
		return verdict(XDP_DROP, XLB_CNT_DROP_NO_BACKEND);
	if (synproxy_as_syn(ctx, pkt, isn))
		return verdict(XDP_DROP, XLB_CNT_DROP_SYNPROXY_WAIT);
	f = ct_create(key, be, remote_port, isn, now, &why);
	if (!f)
		return verdict(XDP_DROP, why);
	ct_mark_proxy(f, isn, cookie);
	return nat_forward(ctx, pkt, f, now, XLB_CNT_FWD_TO_BACKEND);
}

/* A client segment of a proxied connection the backend has not answered
 * yet. The client's first segments after the handshake (its ACK again, its
 * first data, or its FIN) send the backend's SYN again, in case it was lost
 * (a backend whose accept queue is full drops SYNs), and are themselves
 * sent again by the client later; anything further on waits for that, and
 * a RST goes through. */
static __always_inline struct outcome synproxy_waiting(struct xdp_md *ctx, struct packet *pkt,
						       struct flow *f, __u64 now)
{
	__u8 flags = tcp_flags(pkt->tcp);

	if (flags & XLB_TCP_RST)
		return nat_forward(ctx, pkt, f, now, XLB_CNT_FWD_TO_BACKEND);
	if ((flags & XLB_TCP_SYN) || bpf_ntohl(pkt->tcp->seq) != f->client_isn + 1)
		return verdict(XDP_DROP, XLB_CNT_DROP_SYNPROXY_WAIT);
	if (synproxy_as_syn(ctx, pkt, f->client_isn))
		return verdict(XDP_DROP, XLB_CNT_DROP_SYNPROXY_WAIT);
	return nat_forward(ctx, pkt, f, now, XLB_CNT_SYNPROXY_RESENT);
}

/* The backend's SYN-ACK for a proxied connection (f: its reverse entry),
 * first or retransmitted: its ISN fixes the translation, and it is answered
 * with the ACK that completes the backend's handshake. The client already
 * has its connection: it gets nothing. */
static __always_inline struct outcome
synproxy_backend_answered(struct xdp_md *ctx, struct packet *pkt, struct flow *f, __u64 now)
{
	if ((tcp_flags(pkt->tcp) & (XLB_TCP_SYN | XLB_TCP_ACK | XLB_TCP_RST)) !=
		    (XLB_TCP_SYN | XLB_TCP_ACK) ||
	    bpf_ntohl(pkt->tcp->ack_seq) != f->client_isn + 1)
		return verdict(XDP_DROP, XLB_CNT_DROP_NO_FLOW);
	handshake_note(f, pkt);
	flow_touch(f, pkt, now);
	if (!(f->tcp_flags & XLB_CT_ESTABLISHED))
		ct_proxy_ready(f, bpf_ntohl(pkt->tcp->seq));
	if (synproxy_ack_backend(ctx, pkt, f->client_isn))
		return verdict(XDP_DROP, XLB_CNT_DROP_NO_FLOW);
	return verdict(bounce(ctx, ingress_iface(ctx)), XLB_CNT_SYNPROXY_ACKED);
}

/* Whether a bare SYN on the tuple of f (the forward entry) starts a new
 * connection: the old one is over (the client reused its port), or never
 * got going, and this SYN has another ISN (the client gave up on it and
 * its kernel gave the port to a new socket) and the backend the old one
 * went to has left the table meanwhile (a health verdict): balanced afresh,
 * it goes elsewhere. While the backend is still in the table, such a SYN
 * goes on as before, so a forged one cannot undo a connection in progress;
 * a SYN proxy's pair is never undone (its client completed a handshake). */
static __always_inline int syn_starts_anew(const struct flow_key *key, const struct flow *f,
					   const struct packet *pkt)
{
	const struct backend *be;

	if (ct_closed(f))
		return 1;
	if ((f->tcp_flags &
	     (XLB_TCP_ACK | XLB_TCP_FIN | XLB_TCP_RST | XLB_CT_ESTABLISHED | XLB_CT_PROXY)) ||
	    !(f->tcp_flags & XLB_CT_SEQ) || bpf_ntohl(pkt->tcp->seq) == f->client_isn)
		return 0;
	be = pick_backend(key);
	return be && be->addr != f->nat_daddr;
}

/* A client packet to listen_ip:local_port. */
static __always_inline struct outcome to_backend(struct xdp_md *ctx, struct packet *pkt,
						 const struct flow_key *key, __u16 remote_port)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	const struct backend *be;
	struct flow *f;
	__u32 seq;
	int bare_syn, why;

	if (pkt->ip->ttl <= 1)
		return expired(ctx, pkt);
	f = bpf_map_lookup_elem(&conntrack, key);
	bare_syn = (tcp_flags(pkt->tcp) &
		    (XLB_TCP_SYN | XLB_TCP_ACK | XLB_TCP_RST | XLB_TCP_FIN)) == XLB_TCP_SYN;

	/* A packet of a tracked connection, a retransmitted SYN included. A
	 * SYN that starts a new connection on the tuple of an old one is
	 * treated like a SYN without an entry. */
	if (f && !(bare_syn && syn_starts_anew(key, f, pkt))) {
		if ((f->tcp_flags & (XLB_CT_PROXY | XLB_CT_ESTABLISHED)) == XLB_CT_PROXY)
			return synproxy_waiting(ctx, pkt, f, now);
		return nat_forward(ctx, pkt, f, now, XLB_CNT_FWD_TO_BACKEND);
	}
	/* Only a bare SYN opens a connection, or an ACK answering a SYN
	 * cookie; anything else without an entry belongs to no connection we
	 * know. */
	if (!bare_syn) {
		if (!f && (config.flags & XLB_F_SYN_COOKIES) &&
		    (tcp_flags(pkt->tcp) &
		     (XLB_TCP_SYN | XLB_TCP_ACK | XLB_TCP_RST | XLB_TCP_FIN)) == XLB_TCP_ACK)
			return synproxy_open(ctx, pkt, key, remote_port, now);
		return unknown_flow(ctx, pkt);
	}
	if (config.flags & XLB_F_DRAIN)
		return drain_refuse(ctx, pkt);
	be = pick_backend(key);
	if (!be)
		return verdict(XDP_DROP, XLB_CNT_DROP_NO_BACKEND);
	/* Under a SYN flood: no state until the client answers a cookie (a
	 * local sender's, whose checksum is left to offload, excepted). */
	if (!f && (config.flags & XLB_F_SYN_PROXY) &&
	    !(offload_seed(ctx, ingress_iface(ctx), pkt))) {
		if (synproxy_answer(ctx, pkt))
			return verdict(XDP_DROP, XLB_CNT_DROP_NO_FLOW);
		return verdict(bounce(ctx, ingress_iface(ctx)), XLB_CNT_SYNPROXY_COOKIE);
	}
	/* A corrupt SYN would open a connection its backend never answers
	 * (which passive health checking would hold against the backend). */
	if (tcp_csum_checkable(pkt) && !(offload_seed(ctx, ingress_iface(ctx), pkt)) &&
	    !tcp_csum_verifies(ctx, pkt))
		return verdict(XDP_DROP, XLB_CNT_DROP_SYN_CSUM);
	seq = bpf_ntohl(pkt->tcp->seq);
	if (f)
		f = ct_reopen(key, f, be, remote_port, seq, now, &why);
	else
		f = ct_create(key, be, remote_port, seq, now, &why);
	if (!f)
		return verdict(XDP_DROP, why);
	return nat_forward(ctx, pkt, f, now, XLB_CNT_FWD_TO_BACKEND);
}

/* Whether a backend's reply (f: its reverse entry) arrived on the interface
 * through which the backend is routed: XDP runs before rp_filter, and a
 * reply forged on another link must not reach a connection. The answer is
 * kept in the entry, so only a reply on a different interface than the last
 * (a route change, or a forgery) costs a route lookup. A frame on an
 * interface XLB did not attach is a test run (BPF_PROG_TEST_RUN), which
 * injects every frame on one interface: not checked. */
static __always_inline int reply_on_its_route(struct xdp_md *ctx, struct packet *pkt,
					      struct flow *f)
{
	/* No MTU check (tot_len 0): only the interface is asked, and a
	 * forged reply's size must not decide it. */
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.l4_protocol = IPPROTO_TCP,
		.ipv4_src = pkt->ip->daddr,
		.ipv4_dst = pkt->ip->saddr,
		.ifindex = pkt->l3_ifindex,
	};
	long rc;

	if (f->reply_ifindex == pkt->l3_ifindex || !ingress_iface(ctx))
		return 1;
	count(XLB_CNT_NEXTHOP_MISS);
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    fib.ifindex != pkt->l3_ifindex)
		return 0;
	f->reply_ifindex = pkt->l3_ifindex;
	return 1;
}

/* A packet to snat_ip:nat_port: a backend's reply if we have its entry. */
static __always_inline struct outcome to_client(struct xdp_md *ctx, struct packet *pkt,
						const struct flow_key *key)
{
	struct flow *f = bpf_map_lookup_elem(&conntrack, key);
	__u64 now;

	if (!f)
		return verdict(XDP_PASS, XLB_CNT_PASS_NOT_OURS);
	now = bpf_ktime_get_coarse_ns();
	if (!reply_on_its_route(ctx, pkt, f))
		return verdict(XDP_DROP, XLB_CNT_DROP_REPLY_IFACE);
	if ((f->tcp_flags & XLB_CT_PROXY) && (tcp_flags(pkt->tcp) & XLB_TCP_SYN))
		return synproxy_backend_answered(ctx, pkt, f, now);
	if (pkt->ip->ttl <= 1)
		return expired(ctx, pkt);
	return nat_forward(ctx, pkt, f, now, XLB_CNT_FWD_TO_CLIENT);
}

static __always_inline struct outcome handle(struct xdp_md *ctx, struct packet *pkt)
{
	struct flow_key key = {};
	__u16 remote_port;
	int reason;

	reason = parse_tcp4(ctx, pkt);
	if ((reason < 0 || reason == XLB_CNT_PASS_NOT_TCP) && known_l2(ctx, pkt))
		return verdict(XDP_PASS, XLB_CNT_PASS_VLAN);
	if (reason == XLB_CNT_PASS_NOT_TCP)
		return icmp_error(ctx, pkt);
	if (reason >= 0)
		return verdict(XDP_PASS, reason);

	flow_key_of(&key, pkt);
	if (key.daddr == config.listen_addr) {
		remote_port = remote_port_of(key.dport);
		if (remote_port)
			return to_backend(ctx, pkt, &key, remote_port);
	}
	if (in_nat_range(key.dport) && is_snat_addr(key.daddr))
		return to_client(ctx, pkt, &key);
	return verdict(XDP_PASS, XLB_CNT_PASS_NOT_OURS);
}

SEC("xdp")
int xlb_xdp(struct xdp_md *ctx)
{
	struct packet pkt = {};
	struct outcome o = handle(ctx, &pkt);

	count(o.counter);
	return o.action;
}
