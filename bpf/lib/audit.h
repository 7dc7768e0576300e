/* Audit events into the ring buffer: every DENY, ALLOW sampled 1 in N, each under a per-role
 * token bucket so one flood cannot drown the log; every event not written is counted. */
#ifndef VPNR_AUDIT_H
#define VPNR_AUDIT_H

#include "audit_event.h"
#include "bucket.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"

static __always_inline struct vpnr_audit_event *vpnr_audit_reserve(void);
static __always_inline void vpnr_audit_submit(struct vpnr_audit_event *event);
static __always_inline struct vpnr_audit_bucket *vpnr_audit_bucket_get(__u32 role);
static __always_inline __u64 *vpnr_audit_lost(__u32 cause);
static __always_inline struct vpnr_roleset *vpnr_roleset_get(__u32 index);

static __always_inline void vpnr_audit_count(__u32 cause)
{
	__u64 *lost = vpnr_audit_lost(cause);

	if (lost)
		*lost += 1;
}

/* Token bucket per role and CPU (policyd divides the configured rate by the CPU count). */
static __always_inline int vpnr_audit_admit(const struct vpnr_config *cfg, __u32 role,
					    __u64 now)
{
	struct vpnr_audit_bucket *bucket = vpnr_audit_bucket_get(role);

	if (!bucket)
		return 0;
	return vpnr_bucket_take(&bucket->tokens, &bucket->last_ns, cfg->audit_burst,
				cfg->audit_rate, now);
}

static __always_inline void vpnr_audit(const struct vpnr_config *cfg, __u32 ifindex,
				       const struct vpnr_decision *d,
				       const struct vpnr_packet *pkt, __u8 source)
{
	struct vpnr_audit_event *event;
	struct vpnr_roleset *roleset = 0;
	__u32 bucket_role = d->rule_role;
	__u64 now;

	if (d->verdict != VPNR_VERDICT_DENY) {
		if (!cfg->allow_sample_n || bpf_get_prandom_u32() % cfg->allow_sample_n) {
			vpnr_audit_count(VPNR_AUDIT_SAMPLED_OUT);
			return;
		}
	}
	if (d->flags & VPNR_DECISION_HAS_BINDING) {
		__u32 index = d->roleset_id;

		if (d->active & VPNR_ACTIVE_SLOT)
			index += VPNR_MAX_ROLESETS;
		roleset = vpnr_roleset_get(index);
		/* No rule matched: charge the first role of the source. */
		if (!bucket_role && roleset && roleset->count)
			bucket_role = roleset->roles[0];
	}
	/* The coarse clock (one tick) is plenty for a token bucket and much cheaper; the
	 * event itself gets the precise time. */
	now = bpf_ktime_get_coarse_ns();
	if (!vpnr_audit_admit(cfg, bucket_role & (VPNR_MAX_ROLES - 1), now)) {
		vpnr_audit_count(VPNR_AUDIT_LOST_RATE_LIMIT);
		return;
	}
	event = vpnr_audit_reserve();
	if (!event) {
		vpnr_audit_count(VPNR_AUDIT_LOST_RESERVE);
		return;
	}
	event->ktime_ns = bpf_ktime_get_ns();
	event->policy_version = d->active >> VPNR_ACTIVE_VERSION_SHIFT;
	__builtin_memcpy(event->src, pkt->src, 16);
	__builtin_memcpy(event->dst, pkt->dst, 16);
	event->ifindex = ifindex;
	event->rule_id = d->rule_id;
	event->binding_id = d->binding_id;
	event->roleset_id = d->roleset_id;
	event->pkt_len = pkt->len;
	event->src_port = pkt->src_port;
	event->dst_port = pkt->dst_port;
	event->rule_role = d->rule_role;
	if (roleset) {
		__builtin_memcpy(event->roles, roleset->roles, sizeof(event->roles));
		event->role_count = roleset->count;
	} else {
		__builtin_memset(event->roles, 0, sizeof(event->roles));
		event->role_count = 0;
	}
	event->ip_version = pkt->ip_version;
	event->ip_protocol = pkt->ip_protocol;
	event->verdict = d->verdict;
	event->reason = d->reason;
	event->src_zone = d->src_zone;
	event->dst_zone = d->dst_zone;
	event->source = source;
	event->event_version = VPNR_AUDIT_EVENT_VERSION;
	event->flags = (pkt->flags & VPNR_PKT_FRAGMENT) ? 1 : 0;
	event->icmp_type = (pkt->flags & VPNR_PKT_ICMP) ? pkt->icmp_type : 0xffff;
	vpnr_audit_submit(event);
	vpnr_audit_count(VPNR_AUDIT_EMITTED);
}

#endif /* VPNR_AUDIT_H */
