/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Checksum arithmetic, nothing else: RFC 1624 incremental updates,
 * HC' = ~(~HC + ~m + m'), on 16-bit words as they sit in the packet. */
#ifndef XLB_CSUM_H
#define XLB_CSUM_H

#include <linux/types.h>

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline void csum_replace2(__u16 *check, __u16 from, __u16 to)
{
	__u64 sum = (__u16) ~*check;

	sum += (__u16)~from;
	sum += to;
	*check = ~csum_fold(sum);
}

static __always_inline void csum_replace4(__u16 *check, __u32 from, __u32 to)
{
	__u64 sum = (__u16) ~*check;

	sum += (__u16) ~(from & 0xffff);
	sum += (__u16) ~(from >> 16);
	sum += to & 0xffff;
	sum += to >> 16;
	*check = ~csum_fold(sum);
}

#endif
