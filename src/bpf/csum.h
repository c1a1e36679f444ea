/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Checksum arithmetic, nothing else: RFC 1624 incremental updates,
 * HC' = ~(~HC + ~m + m'), on 16-bit words as they sit in the packet. */
#ifndef XLB_CSUM_H
#define XLB_CSUM_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* The difference rewriting the word pair `from` to `to` makes to a sum
 * (~m + m'), unfolded: several add up, and one sum fixes both the IP and
 * the TCP checksum (csum_apply, csum_seed_apply). */
static __always_inline __u64 csum_diff4(__u32 from, __u32 to)
{
	return (__u16) ~(from & 0xffff) + (__u16) ~(from >> 16) + (to & 0xffff) + (to >> 16);
}

static __always_inline __u64 csum_diff2(__u16 from, __u16 to)
{
	return (__u16)~from + to;
}

/* HC' = ~(~HC + diff), diff from csum_diff4/csum_diff2. */
static __always_inline void csum_apply(__u16 *check, __u64 diff)
{
	*check = ~csum_fold((__u16) ~*check + diff);
}

static __always_inline void csum_replace2(__u16 *check, __u16 from, __u16 to)
{
	csum_apply(check, csum_diff2(from, to));
}

static __always_inline void csum_replace4(__u16 *check, __u32 from, __u32 to)
{
	csum_apply(check, csum_diff4(from, to));
}

/* A TCP checksum the sender left to offload (the kernel's CHECKSUM_PARTIAL)
 * is a seed: the field holds the folded pseudo-header sum, not a complement,
 * and the device sums the segment into it on the way out. Changing an
 * address changes the seed by the same difference: the RFC 1624 update with
 * the complement taken before and after, which is adding the difference.
 * Ports are not in the seed. */
static __always_inline void csum_seed_apply(__u16 *seed, __u64 diff)
{
	*seed = csum_fold(*seed + diff);
}

/* The folded IPv4 pseudo-header sum: what a seed holds. */
static __always_inline __u16 csum_pseudo4(__u32 saddr, __u32 daddr, __u8 proto, __u16 len)
{
	__u64 sum = (saddr & 0xffff) + (saddr >> 16) + (daddr & 0xffff) + (daddr >> 16);

	sum += bpf_htons(proto);
	sum += bpf_htons(len);
	return csum_fold(sum);
}

#endif
