/* Tunnel messages on the WAN, checked before userspace sees them (tunneld's half of the XDP
 * program; policyd's bypass lets the tunnel port through, this decides what of it may pass).
 *
 * Enforced only once tunneld has written tunnel_settings (VPNR_TUNNEL_ENFORCE): before
 * that the port is bypassed as the policy model says.
 *   - data messages must name a receiver index in tunnel_sessions (tunneld keeps it equal
 *     to its live keypairs), else TUNNEL_UNKNOWN_SESSION;
 *   - handshake messages (types 1-4) spend a token of the source address's bucket, else
 *     HANDSHAKE_RATE_LIMIT;
 *   - anything else on the port is not a tunnel message: MALFORMED_L4.
 * Message layout: docs/protocol.md. */
#ifndef VPNR_TUNNEL_H
#define VPNR_TUNNEL_H

#include "bucket.h"
#include "codes.h"
#include "maps.h"
#include "parse.h"

#define VPNR_TUNNEL_MSG_COOKIE_REPLY 4
#define VPNR_TUNNEL_MSG_DATA 5
#define VPNR_TUNNEL_DATA_MIN 32     /* header 16 + tag 16: a keepalive */
#define VPNR_TUNNEL_HANDSHAKE_MIN 24 /* the cookie reply, the shortest handshake message */

static __always_inline struct vpnr_tunnel_settings *vpnr_tunnel_settings_get(void);
static __always_inline __u32 *vpnr_tunnel_session(__u32 *index);
static __always_inline struct vpnr_hs_bucket *vpnr_hs_bucket_get(struct vpnr_hs_key *key,
								 struct vpnr_hs_bucket *init);

static __always_inline int vpnr_is_tunnel_msg(const struct vpnr_config *cfg, __u8 iface_zone,
					      const struct vpnr_packet *pkt)
{
	return iface_zone == VPNR_ZONE_EXTERNAL && pkt->ip_protocol == VPNR_IPPROTO_UDP &&
	       cfg->tunnel_port && pkt->dst_port == cfg->tunnel_port &&
	       !(pkt->flags & VPNR_PKT_FRAGMENT);
}

/* Token bucket per source address (a new source starts with a full bucket). */
static __always_inline int vpnr_handshake_admit(const struct vpnr_tunnel_settings *ts,
						const struct vpnr_packet *pkt)
{
	struct vpnr_hs_key key = {};
	struct vpnr_hs_bucket init = {}, *bucket;

	if (!ts->handshake_rate)
		return 1;
	__builtin_memcpy(key.addr, pkt->src, 16);
	bucket = vpnr_hs_bucket_get(&key, &init); /* last_ns 0: the first use fills it */
	if (!bucket)
		return 0; /* fail closed: a handshake can be retried, a flood cannot be let in */
	return vpnr_bucket_take(&bucket->tokens, &bucket->last_ns, ts->handshake_burst,
				ts->handshake_rate, bpf_ktime_get_coarse_ns());
}

/* 0: let it through to tunneld; else the drop reason. */
static __always_inline int vpnr_tunnel_filter(void *data, void *data_end,
					      const struct vpnr_packet *pkt)
{
	struct vpnr_tunnel_settings *ts = vpnr_tunnel_settings_get();
	__u32 off = pkt->l4_off + 8; /* after the UDP header */
	__u8 *msg;
	__u32 index;

	if (!ts || !(ts->flags & VPNR_TUNNEL_ENFORCE))
		return 0;
	if (off > VPNR_MAX_L4_OFFSET + 8)
		return VPNR_REASON_MALFORMED_L4;
	msg = data + off;
	if ((void *)(msg + 8) > data_end)
		return VPNR_REASON_MALFORMED_L4;
	if (msg[0] == VPNR_TUNNEL_MSG_DATA) {
		if ((void *)(msg + VPNR_TUNNEL_DATA_MIN) > data_end)
			return VPNR_REASON_MALFORMED_L4;
		__builtin_memcpy(&index, msg + 4, 4); /* little-endian on the wire and here */
		return vpnr_tunnel_session(&index) ? 0 : VPNR_REASON_TUNNEL_UNKNOWN_SESSION;
	}
	if (msg[0] == 0 || msg[0] > VPNR_TUNNEL_MSG_COOKIE_REPLY ||
	    (void *)(msg + VPNR_TUNNEL_HANDSHAKE_MIN) > data_end)
		return VPNR_REASON_MALFORMED_L4;
	return vpnr_handshake_admit(ts, pkt) ? 0 : VPNR_REASON_HANDSHAKE_RATE_LIMIT;
}

#endif /* VPNR_TUNNEL_H */
