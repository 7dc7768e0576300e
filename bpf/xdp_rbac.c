/* XDP entry of policyd (one program for every configured interface) and the TC entry of
 * tunneld's decap interface: the same RBAC, from the same lib/ code and pinned maps.
 * The logic lives in lib/; this file defines the map accessors and orders the steps. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "lib/codes.h"
#include "lib/maps.h"

/* Map accessors. bcc rewrites map method calls (map.lookup(...)) only in the main source
 * file, so every entry file defines the accessors that the lib/ headers declare. */
static __always_inline struct vpnr_counter *vpnr_stats_row(struct vpnr_stats_key *key,
							   struct vpnr_counter *zero)
{
	return xdp_stats.lookup_or_try_init(key, zero);
}

static __always_inline struct vpnr_settings *vpnr_settings_get(void)
{
	int zero = 0;

	return vpnr_settings.lookup(&zero);
}

static __always_inline __u64 vpnr_active_word(void)
{
	__u32 zero = 0;
	__u64 *word = policy_active.lookup(&zero);

	return word ? *(volatile __u64 *)word : 0; /* one 64-bit load: slot and version agree */
}

static __always_inline struct vpnr_config *vpnr_config_get(void)
{
	__u32 zero = 0;

	return vpnr_config.lookup(&zero);
}

static __always_inline struct vpnr_iface *vpnr_iface_get(__u32 ifindex)
{
	return iface_zones.lookup(&ifindex);
}

/* The binding tries are inner maps (see maps.h): one lookup for the trie in force, one in
 * it. No trie yet (policyd has not written one) reads as "no binding": default deny. */
static __always_inline struct vpnr_binding *vpnr_binding4(struct vpnr_lpm4_key *key)
{
	int zero = 0;
	void *trie = src4_bindings.lookup(&zero);

	return trie ? bpf_map_lookup_elem(trie, key) : NULL;
}

static __always_inline struct vpnr_binding *vpnr_binding6(struct vpnr_lpm6_key *key)
{
	int zero = 0;
	void *trie = src6_bindings.lookup(&zero);

	return trie ? bpf_map_lookup_elem(trie, key) : NULL;
}

static __always_inline __u32 *vpnr_zone4(struct vpnr_lpm4_key *key)
{
	return dst4_zones.lookup(key);
}

static __always_inline __u32 *vpnr_zone6(struct vpnr_lpm6_key *key)
{
	return dst6_zones.lookup(key);
}

static __always_inline struct vpnr_bucket *vpnr_bucket_get(struct vpnr_bucket_key *key)
{
	return rule_buckets.lookup(key);
}

static __always_inline struct vpnr_rule *vpnr_rule_get(__u32 index)
{
	return rule_table.lookup(&index);
}

static __always_inline struct vpnr_roleset *vpnr_roleset_get(__u32 index)
{
	return rolesets.lookup(&index);
}

static __always_inline struct vpnr_traffic *vpnr_binding_traffic(__u32 binding_id)
{
	return binding_traffic.lookup(&binding_id);
}

static __always_inline struct vpnr_traffic *vpnr_roleset_traffic(__u32 roleset_id)
{
	return roleset_traffic.lookup(&roleset_id);
}

static __always_inline struct vpnr_audit_bucket *vpnr_audit_bucket_get(__u32 role)
{
	return audit_buckets.lookup(&role);
}

static __always_inline __u64 *vpnr_audit_lost(__u32 cause)
{
	return audit_lost.lookup(&cause);
}

static __always_inline struct vpnr_audit_event *vpnr_audit_reserve(void)
{
	return audit_ring.ringbuf_reserve(sizeof(struct vpnr_audit_event));
}

static __always_inline void vpnr_audit_submit(struct vpnr_audit_event *event)
{
	audit_ring.ringbuf_submit(event, 0);
}

static __always_inline struct vpnr_tunnel_settings *vpnr_tunnel_settings_get(void)
{
	__u32 zero = 0;

	return tunnel_settings.lookup(&zero);
}

static __always_inline __u32 *vpnr_tunnel_session(__u32 *index)
{
	return tunnel_sessions.lookup(index);
}

static __always_inline struct vpnr_hs_bucket *vpnr_hs_bucket_get(struct vpnr_hs_key *key,
								 struct vpnr_hs_bucket *init)
{
	return handshake_limit.lookup_or_try_init(key, init);
}

#include "lib/audit.h"
#include "lib/handoff.h"
#include "lib/parse.h"
#include "lib/policy.h"
#include "lib/stats.h"
#include "lib/trace.h"
#include "lib/tunnel.h"

/* The decap program's rule-scan stage (a program array holds one program type only). */
BPF_PROG_ARRAY(tc_stages, 1);

static __always_inline struct vpnr_handoff *vpnr_handoff_get(void)
{
	__u32 zero = 0;

	return xdp_handoff.lookup(&zero);
}

/* Counters, accounting and the audit event of a decided packet (not for traced ones). */
static __always_inline void vpnr_record(__u32 ifindex, const struct vpnr_config *cfg,
					struct vpnr_decision *d, const struct vpnr_packet *pkt,
					__u8 source)
{
	vpnr_count(ifindex, d->verdict, d->reason, pkt);
	vpnr_account(d, pkt);
	if (cfg && pkt->ip_version && (d->verdict == VPNR_VERDICT_DENY || cfg->allow_sample_n))
		vpnr_audit(cfg, ifindex, d, pkt, source);
}

static __always_inline int vpnr_finish(struct xdp_md *ctx, const struct vpnr_config *cfg,
				       struct vpnr_decision *d, const struct vpnr_packet *pkt)
{
	__u32 queue = ctx->rx_queue_index;

	if (d->reason == VPNR_REASON_RULE_ALLOW && d->dst_zone == VPNR_ZONE_VPN &&
	    d->src_zone != VPNR_ZONE_VPN) {
		/* VPN zone: only tunneld may carry it; no socket bound, nothing leaves. (Link
		 * infrastructure, e.g. neighbour discovery, stays on the link.) */
		if (xsk_map.lookup(&queue)) {
			d->verdict = VPNR_VERDICT_REDIRECT;
			d->reason = VPNR_REASON_TUNNEL_REDIRECT;
		} else {
			d->verdict = VPNR_VERDICT_DENY;
			d->reason = VPNR_REASON_TUNNEL_NO_SOCKET;
		}
	}
	if (!vpnr_trace(ctx, d))
		vpnr_record(ctx->ingress_ifindex, cfg, d, pkt, VPNR_SOURCE_XDP);
	if (cfg && (cfg->flags & VPNR_CFG_MONITOR))
		return XDP_PASS; /* monitor mode: decided, counted, audited, not enforced */
	if (d->verdict == VPNR_VERDICT_REDIRECT)
		return xsk_map.redirect_map(queue, XDP_DROP);
	return d->verdict == VPNR_VERDICT_ALLOW ? XDP_PASS : XDP_DROP;
}

/* Stage 1, attached to the interfaces: parse, bypass, binding, zones, bucket. */
int xdp_rbac(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct vpnr_packet pkt = {};
	struct vpnr_decision d = {};
	struct vpnr_scan scan = {};
	struct vpnr_handoff *handoff;
	struct vpnr_config *cfg;
	struct vpnr_iface *iface;
	__u8 iface_zone;
	int malformed;

	cfg = vpnr_config_get();
	if (!cfg) {
		/* Never taken in practice; the reference alone makes the kernel list the settings
		 * map (and the build id in it) among our maps, at no per-packet cost. */
		vpnr_settings_get();
		d.verdict = VPNR_VERDICT_DENY;
		d.reason = VPNR_REASON_MAP_ERROR;
		return vpnr_finish(ctx, 0, &d, &pkt);
	}
	d.active = vpnr_active_word();
	iface = vpnr_iface_get(ctx->ingress_ifindex);
	/* An interface policyd did not configure (zone 0) is treated as outside. */
	iface_zone = iface && iface->zone ? iface->zone : VPNR_ZONE_EXTERNAL;
	d.src_zone = iface_zone;

	malformed = vpnr_parse(data, data_end, &pkt);
	if (!malformed && pkt.ip_version)
		d.dst_zone = vpnr_dst_zone(&pkt, d.active & VPNR_ACTIVE_SLOT);
	if (malformed) {
		d.verdict = VPNR_VERDICT_DENY;
		d.reason = malformed;
	} else if (vpnr_infra_bypass(cfg, iface_zone, d.dst_zone, &pkt)) {
		d.verdict = VPNR_VERDICT_ALLOW;
		d.reason = VPNR_REASON_INFRA_BYPASS;
		if (vpnr_is_tunnel_msg(cfg, iface_zone, &pkt)) {
			malformed = vpnr_tunnel_filter(data, data_end, &pkt);
			if (malformed) {
				d.verdict = VPNR_VERDICT_DENY;
				d.reason = malformed;
			}
		}
	} else if (pkt.ip_version) {
		if (vpnr_decide_ip(&pkt, iface_zone, &d, &scan)) {
			handoff = vpnr_handoff_get();
			if (handoff) {
				handoff->pkt = pkt;
				handoff->d = d;
				handoff->scan = scan;
				xdp_stages.call(ctx, VPNR_STAGE_RULES);
			}
			/* Only reached when the tail call failed: never decide without rules. */
			d.verdict = VPNR_VERDICT_DENY;
			d.reason = VPNR_REASON_MAP_ERROR;
		}
	} else {
		d.verdict = VPNR_VERDICT_DENY;
		d.reason = VPNR_REASON_UNSUPPORTED_ETHERTYPE;
	}
	return vpnr_finish(ctx, cfg, &d, &pkt);
}

/* Stage 2, reached by tail call: scan the bucket's rules, then finish like stage 1. */
int xdp_rbac_rules(struct xdp_md *ctx)
{
	struct vpnr_handoff *handoff = vpnr_handoff_get();
	struct vpnr_config *cfg = vpnr_config_get();

	if (!handoff || !cfg)
		return XDP_DROP;
	/* Work on the per-CPU hand-off in place: no copy back to the stack. */
	vpnr_scan_rules(&handoff->pkt, &handoff->scan, &handoff->d);
	return vpnr_finish(ctx, cfg, &handoff->d, &handoff->pkt);
}

/* tunneld's decap interface, TC ingress: decrypted inner packets from the tunnel meet the
 * same RBAC before the kernel routes them. Their source zone is VPN by construction. */
static __always_inline int vpnr_tc_finish(struct __sk_buff *skb, const struct vpnr_config *cfg,
					  struct vpnr_decision *d, const struct vpnr_packet *pkt)
{
	vpnr_record(skb->ifindex, cfg, d, pkt, VPNR_SOURCE_TC_DECAP);
	if (cfg && (cfg->flags & VPNR_CFG_MONITOR))
		return TC_ACT_OK;
	return d->verdict == VPNR_VERDICT_ALLOW ? TC_ACT_OK : TC_ACT_SHOT;
}

int tc_decap(struct __sk_buff *skb)
{
	void *data, *data_end;
	struct vpnr_packet pkt = {};
	struct vpnr_decision d = {};
	struct vpnr_scan scan = {};
	struct vpnr_handoff *handoff;
	struct vpnr_config *cfg;
	int malformed;

	/* tunneld writes each packet in one piece; make sure the headers are linear. */
	if (skb->data_end - skb->data < skb->len && skb->len <= VPNR_MAX_L4_OFFSET)
		bpf_skb_pull_data(skb, skb->len);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	cfg = vpnr_config_get();
	d.src_zone = VPNR_ZONE_VPN;
	if (!cfg) {
		vpnr_settings_get(); /* lists the settings map (build id) among this program's */
		d.verdict = VPNR_VERDICT_DENY;
		d.reason = VPNR_REASON_MAP_ERROR;
		return vpnr_tc_finish(skb, 0, &d, &pkt);
	}
	d.active = vpnr_active_word();
	pkt.len = skb->len; /* a merged (GSO) packet has only its headers in the linear part */
	malformed = vpnr_parse(data, data_end, &pkt);
	if (malformed) {
		d.verdict = VPNR_VERDICT_DENY;
		d.reason = malformed;
	} else if (pkt.ip_version) {
		d.dst_zone = vpnr_dst_zone(&pkt, d.active & VPNR_ACTIVE_SLOT);
		if (vpnr_decide_ip(&pkt, VPNR_ZONE_VPN, &d, &scan)) {
			handoff = vpnr_handoff_get();
			if (handoff) {
				handoff->pkt = pkt;
				handoff->d = d;
				handoff->scan = scan;
				tc_stages.call(skb, VPNR_STAGE_RULES);
			}
			d.verdict = VPNR_VERDICT_DENY;
			d.reason = VPNR_REASON_MAP_ERROR;
		}
	} else {
		d.verdict = VPNR_VERDICT_DENY;
		d.reason = VPNR_REASON_UNSUPPORTED_ETHERTYPE;
	}
	return vpnr_tc_finish(skb, cfg, &d, &pkt);
}

int tc_decap_rules(struct __sk_buff *skb)
{
	struct vpnr_handoff *handoff = vpnr_handoff_get();
	struct vpnr_config *cfg = vpnr_config_get();

	if (!handoff || !cfg)
		return TC_ACT_SHOT;
	vpnr_scan_rules(&handoff->pkt, &handoff->scan, &handoff->d);
	return vpnr_tc_finish(skb, cfg, &handoff->d, &handoff->pkt);
}
