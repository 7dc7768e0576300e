/* XDP entry of policyd: one program for every configured interface.
 * The logic lives in lib/; this file only orders the steps. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "lib/codes.h"
#include "lib/maps.h"

/* Map accessors. bcc rewrites map method calls (map.lookup(...)) only in the main source
 * file, so every entry file defines the accessors that the lib/ headers call. */
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

#include "lib/parse.h"
#include "lib/stats.h"

static __always_inline int vpnr_finish(struct xdp_md *ctx, __u8 verdict, __u8 reason,
				       const struct vpnr_packet *pkt)
{
	vpnr_count(ctx->ingress_ifindex, verdict, reason, pkt);
	return verdict == VPNR_VERDICT_DENY ? XDP_DROP : XDP_PASS;
}

int xdp_rbac(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct vpnr_packet pkt = {};
	int malformed;

	/* Read on every packet so the kernel ties the settings map (and its build id) to us. */
	if (!vpnr_settings_get())
		return vpnr_finish(ctx, VPNR_VERDICT_DENY, VPNR_REASON_MAP_ERROR, &pkt);

	malformed = vpnr_parse(data, data_end, &pkt);
	if (malformed)
		return vpnr_finish(ctx, VPNR_VERDICT_DENY, malformed, &pkt);

	/* if/else, not switch: a switch may become a jump table, which BPF cannot run. */
	if (pkt.ethertype == VPNR_ETH_P_ARP)
		return vpnr_finish(ctx, VPNR_VERDICT_ALLOW, VPNR_REASON_INFRA_BYPASS, &pkt);
	if (pkt.ip_version)
		/* Role-based evaluation arrives with the policy maps; until then: count only. */
		return vpnr_finish(ctx, VPNR_VERDICT_ALLOW, VPNR_REASON_NOT_ENFORCED, &pkt);
	return vpnr_finish(ctx, VPNR_VERDICT_DENY, VPNR_REASON_UNSUPPORTED_ETHERTYPE, &pkt);
}
