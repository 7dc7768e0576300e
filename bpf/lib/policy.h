/* The policy decision, DESIGN.md "Policy semantics" in C: infrastructure bypass, source
 * binding by longest prefix, destination zone, then the first matching rule of the bucket
 * that can apply (denies are ordered before allows, so deny wins). */
#ifndef VPNR_POLICY_H
#define VPNR_POLICY_H

#include "maps.h"
#include "parse.h"

struct vpnr_decision {
	__u64 active;          /* the policy_active word this packet was decided with */
	__u32 rule_id;
	__u32 binding_id;
	__u32 roleset_id;      /* meaningful when VPNR_DECISION_HAS_BINDING */
	__u16 rule_role;
	__u8 verdict;
	__u8 reason;
	__u8 src_zone;
	__u8 dst_zone;
	__u8 flags;
	__u8 reserved;
};

#define VPNR_DECISION_HAS_BINDING (1 << 0)

/* Accessors, defined by each entry file (bcc rewrites map calls only in the main file). */
static __always_inline __u64 vpnr_active_word(void);
static __always_inline struct vpnr_config *vpnr_config_get(void);
static __always_inline struct vpnr_iface *vpnr_iface_get(__u32 ifindex);
static __always_inline struct vpnr_binding *vpnr_binding4(struct vpnr_lpm4_key *key);
static __always_inline struct vpnr_binding *vpnr_binding6(struct vpnr_lpm6_key *key);
static __always_inline __u32 *vpnr_zone4(struct vpnr_lpm4_key *key);
static __always_inline __u32 *vpnr_zone6(struct vpnr_lpm6_key *key);
static __always_inline struct vpnr_bucket *vpnr_bucket_get(struct vpnr_bucket_key *key);
static __always_inline struct vpnr_rule *vpnr_rule_get(__u32 index);

/* dst_zone: of an IP packet (ignored for ARP). From outside, infrastructure reaches only
 * the outside and the router: never an INTERNAL or VPN destination. */
static __always_inline int vpnr_infra_bypass(const struct vpnr_config *cfg, __u8 iface_zone,
					     __u8 dst_zone, const struct vpnr_packet *pkt)
{
	__u32 flags = cfg->flags;

	if (pkt->ethertype == VPNR_ETH_P_ARP)
		return flags & VPNR_CFG_BYPASS_ARP;
	if (pkt->flags & VPNR_PKT_FRAGMENT)
		return 0;
	if (iface_zone == VPNR_ZONE_EXTERNAL &&
	    (dst_zone == VPNR_ZONE_INTERNAL || dst_zone == VPNR_ZONE_VPN))
		return 0;
	if ((flags & VPNR_CFG_BYPASS_DHCP) && pkt->ip_protocol == VPNR_IPPROTO_UDP) {
		__u16 s = pkt->src_port, d = pkt->dst_port;

		if (pkt->ip_version == 4 && ((s == 68 && d == 67) || (s == 67 && d == 68)))
			return 1;
		if (pkt->ip_version == 6 && ((s == 546 && d == 547) || (s == 547 && d == 546)))
			return 1;
	}
	/* RFC 4861: neighbour discovery is only valid with hop limit 255 (never routed). */
	if ((flags & VPNR_CFG_BYPASS_ND) && (pkt->flags & VPNR_PKT_ICMP) &&
	    pkt->ip_version == 6 && pkt->ip_protocol == VPNR_IPPROTO_ICMPV6 &&
	    pkt->icmp_type >= 133 && pkt->icmp_type <= 137 && pkt->hop_limit == 255)
		return 1;
	if ((flags & VPNR_CFG_BYPASS_TUNNEL) && iface_zone == VPNR_ZONE_EXTERNAL &&
	    pkt->ip_protocol == VPNR_IPPROTO_UDP && cfg->tunnel_port &&
	    pkt->dst_port == cfg->tunnel_port)
		return 1;
	return 0;
}

static __always_inline __u8 vpnr_dst_zone(const struct vpnr_packet *pkt, __u8 slot)
{
	__u32 *zone;

	if (pkt->ip_version == 4) {
		struct vpnr_lpm4_key key = { .prefixlen = 8 + 32, .slot = slot };

		__builtin_memcpy(key.addr, pkt->dst, 4);
		zone = vpnr_zone4(&key);
	} else {
		struct vpnr_lpm6_key key = { .prefixlen = 8 + 128, .slot = slot };

		__builtin_memcpy(key.addr, pkt->dst, 16);
		zone = vpnr_zone6(&key);
	}
	/* Not declared internal or VPN: somewhere outside. */
	return zone ? (__u8)*zone : VPNR_ZONE_EXTERNAL;
}

static __always_inline struct vpnr_binding *vpnr_src_binding(const struct vpnr_packet *pkt,
							      __u8 slot)
{
	if (pkt->ip_version == 4) {
		struct vpnr_lpm4_key key = { .prefixlen = 8 + 32, .slot = slot };

		__builtin_memcpy(key.addr, pkt->src, 4);
		return vpnr_binding4(&key);
	}
	struct vpnr_lpm6_key key = { .prefixlen = 8 + 128, .slot = slot };

	__builtin_memcpy(key.addr, pkt->src, 16);
	return vpnr_binding6(&key);
}

/* The bucket of rules that can apply to this packet, or NULL when none can. */
static __always_inline struct vpnr_bucket *vpnr_find_bucket(const struct vpnr_packet *pkt,
							    __u32 roleset, __u8 slot)
{
	struct vpnr_bucket_key key = { .roleset = roleset };
	struct vpnr_bucket *bucket;
	__u8 proto = pkt->ip_protocol;

	key.kind = slot | (pkt->ip_version == 6 ? VPNR_BUCKET_IPV6 : 0);
	if (proto != VPNR_IPPROTO_TCP && proto != VPNR_IPPROTO_UDP &&
	    proto != VPNR_IPPROTO_ICMP && proto != VPNR_IPPROTO_ICMPV6)
		proto = 0;
	key.proto = proto;
	if (pkt->flags & VPNR_PKT_HAS_PORTS) {
		key.dport = pkt->dst_port;
		bucket = vpnr_bucket_get(&key);
		if (bucket)
			return bucket;
		key.dport = 0;
		key.kind |= VPNR_BUCKET_DEFAULT;
		return vpnr_bucket_get(&key);
	}
	key.kind |= VPNR_BUCKET_NOPORT;
	return vpnr_bucket_get(&key);
}

/* First half of deciding an IP packet that is not infrastructure: zones, the source's
 * binding and the bucket of rules that can apply. Returns 1 with *scan filled when rules
 * must be scanned (vpnr_scan_rules), 0 when the decision is already made. */
struct vpnr_scan {
	__u32 start;           /* absolute index into rule_table */
	__u32 count;
	__u32 ext_mask;        /* VPNR_RULE_ALLOW_DST_ANY when EXTERNAL -> INTERNAL */
	__u32 reserved;
};

static __always_inline int vpnr_decide_ip(const struct vpnr_packet *pkt, __u8 iface_zone,
					  struct vpnr_decision *d, struct vpnr_scan *scan)
{
	__u8 slot = d->active & VPNR_ACTIVE_SLOT;
	struct vpnr_binding *binding;
	struct vpnr_bucket *bucket;
	int external_to_internal;

	d->src_zone = iface_zone; /* d->dst_zone: set by the caller (vpnr_dst_zone) */
	external_to_internal = iface_zone == VPNR_ZONE_EXTERNAL &&
			       d->dst_zone == VPNR_ZONE_INTERNAL;
	binding = vpnr_src_binding(pkt, slot);
	if (!binding) {
		d->verdict = VPNR_VERDICT_DENY;
		d->reason = external_to_internal ? VPNR_REASON_ZONE_EXTERNAL : VPNR_REASON_NO_ROLE;
		return 0;
	}
	d->flags |= VPNR_DECISION_HAS_BINDING;
	d->binding_id = binding->binding_id;
	d->roleset_id = binding->roleset_id;
	d->verdict = VPNR_VERDICT_DENY;
	d->reason = external_to_internal ? VPNR_REASON_ZONE_EXTERNAL : VPNR_REASON_DEFAULT_DENY;

	bucket = vpnr_find_bucket(pkt, binding->roleset_id, slot);
	if (!bucket || !bucket->count)
		return 0;
	scan->start = bucket->start + slot * VPNR_RULE_TABLE_HALF;
	scan->count = bucket->count;
	scan->ext_mask = external_to_internal ? VPNR_RULE_ALLOW_DST_ANY : 0;
	return 1;
}

/* Second half: the first rule of the bucket that matches decides (denies come first). The
 * match test is branch-free, one conditional jump per candidate. Port-less rules carry the
 * range 0-65535 and "any" prefixes a zero mask, so they always pass those tests. */
static __always_inline void vpnr_scan_rules(const struct vpnr_packet *pkt,
					    const struct vpnr_scan *scan,
					    struct vpnr_decision *d)
{
	__u32 i, start = scan->start, count = scan->count, ext_mask = scan->ext_mask;

	for (i = 0; i < VPNR_MAX_CANDIDATES; i++) {
		struct vpnr_rule *rule;
		__u32 miss;

		/* Keep i and count apart: folded into one down-counter, the verifier loses the
		 * loop bound. */
		asm volatile("" : "+r"(i));
		if (i >= count)
			break;
		rule = vpnr_rule_get(start + i);
		if (!rule)
			break;
		miss = (((__u32)pkt->dst_port - rule->port_from) |
			((__u32)rule->port_to - pkt->dst_port)) >> 31;
		miss |= (pkt->src[0] & rule->src_mask[0]) ^ rule->src_net[0];
		miss |= (pkt->src[1] & rule->src_mask[1]) ^ rule->src_net[1];
		miss |= (pkt->src[2] & rule->src_mask[2]) ^ rule->src_net[2];
		miss |= (pkt->src[3] & rule->src_mask[3]) ^ rule->src_net[3];
		miss |= (pkt->dst[0] & rule->dst_mask[0]) ^ rule->dst_net[0];
		miss |= (pkt->dst[1] & rule->dst_mask[1]) ^ rule->dst_net[1];
		miss |= (pkt->dst[2] & rule->dst_mask[2]) ^ rule->dst_net[2];
		miss |= (pkt->dst[3] & rule->dst_mask[3]) ^ rule->dst_net[3];
		/* EXTERNAL -> INTERNAL needs an ALLOW that names its destination. */
		miss |= rule->flags & ext_mask;
		if (miss)
			continue;
		if (rule->action == VPNR_ACTION_DENY) {
			d->verdict = VPNR_VERDICT_DENY;
			d->reason = VPNR_REASON_RULE_DENY;
		} else {
			d->verdict = VPNR_VERDICT_ALLOW;
			d->reason = VPNR_REASON_RULE_ALLOW;
		}
		d->rule_id = rule->rule_id;
		d->rule_role = rule->role_id;
		return;
	}
}

#endif /* VPNR_POLICY_H */
