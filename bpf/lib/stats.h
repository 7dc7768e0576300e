/* Per-CPU verdict counters. */
#ifndef VPNR_STATS_H
#define VPNR_STATS_H

#include "maps.h"

static __always_inline void vpnr_count(__u32 ifindex, __u8 verdict, __u8 reason,
				       const struct vpnr_packet *pkt)
{
	struct vpnr_stats_key key = {
		.ifindex = ifindex,
		.verdict = verdict,
		.reason = reason,
		.ip_version = pkt->ip_version,
		.ip_protocol = pkt->ip_protocol,
	};
	struct vpnr_counter zero = {}, *counter;

	counter = vpnr_stats_row(&key, &zero);
	if (!counter)
		return; /* table full: Status reports the fill level */
	counter->packets += 1;
	counter->bytes += pkt->len;
}

#endif /* VPNR_STATS_H */
