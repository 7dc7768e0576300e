/* Per-CPU verdict counters and per-identity accounting. */
#ifndef VPNR_STATS_H
#define VPNR_STATS_H

#include "maps.h"
#include "parse.h"
#include "policy.h"

static __always_inline struct vpnr_counter *vpnr_stats_row(struct vpnr_stats_key *key,
							   struct vpnr_counter *zero);
static __always_inline struct vpnr_traffic *vpnr_binding_traffic(__u32 binding_id);
static __always_inline struct vpnr_traffic *vpnr_roleset_traffic(__u32 roleset_id);

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

static __always_inline void vpnr_traffic_add(struct vpnr_traffic *t, int direction,
					     int denied, __u32 len)
{
	/* Constant indexes only: the verifier then needs no bounds proof. */
	if (direction) {
		if (denied) {
			t->packets[1][1] += 1;
			t->bytes[1][1] += len;
		} else {
			t->packets[1][0] += 1;
			t->bytes[1][0] += len;
		}
	} else if (denied) {
		t->packets[0][1] += 1;
		t->bytes[0][1] += len;
	} else {
		t->packets[0][0] += 1;
		t->bytes[0][0] += len;
	}
}

/* Bytes and packets per binding and per role set, by verdict and direction. */
static __always_inline void vpnr_account(const struct vpnr_decision *d,
					 const struct vpnr_packet *pkt)
{
	struct vpnr_traffic *t;
	int direction = d->src_zone != VPNR_ZONE_INTERNAL;
	int denied = d->verdict == VPNR_VERDICT_DENY;

	if (!(d->flags & VPNR_DECISION_HAS_BINDING))
		return;
	t = vpnr_binding_traffic(d->binding_id);
	if (t)
		vpnr_traffic_add(t, direction, denied, pkt->len);
	t = vpnr_roleset_traffic(d->roleset_id);
	if (t)
		vpnr_traffic_add(t, direction, denied, pkt->len);
}

#endif /* VPNR_STATS_H */
