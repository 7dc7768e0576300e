/* Every map of the XDP RBAC program, declared in one place.
 *
 * All policy maps are pinned under VPNR_PIN_DIR (passed by policyd as a -D flag): a
 * restarted or upgraded policyd reuses them, so policy and counters survive, and tunneld's
 * TC program reads the same policy. docs/ebpf.md describes each map.
 *
 * Atomic policy replacement: every policy map holds two slots. policy_active says which
 * slot is live (bit 0) together with the policy version (the other bits), in one 64-bit
 * word the program reads once per packet. policyd fills the idle slot, then flips the word:
 * a packet sees the old or the new policy, never a mix.
 */
#ifndef VPNR_MAPS_H
#define VPNR_MAPS_H

#include "audit_event.h"

#ifndef VPNR_PIN_DIR
#error "VPNR_PIN_DIR must name the instance pin directory"
#endif
#ifndef VPNR_AUDIT_RING_BYTES
#define VPNR_AUDIT_RING_BYTES (8 << 20)
#endif

#define VPNR_STATS_MAX_ENTRIES 4096
#define VPNR_MAX_BINDINGS 131072   /* per family and slot; also the binding id space */
#define VPNR_MAX_ROLESETS 65536    /* distinct role combinations, per slot */
#define VPNR_MAX_ROLES 4096        /* role ids 1..4095; 0 is "no role" */
#define VPNR_MAX_BUCKETS 262144    /* rule buckets, both slots */
#define VPNR_RULE_TABLE_HALF 131072 /* compiled rule entries per slot */
#define VPNR_MAX_CANDIDATES 512    /* 16 roles x 32 rules: every rule one packet may meet */
#define VPNR_MAX_ZONES 4096        /* destination zone prefixes per family, both slots */
#define VPNR_MAX_IFINDEX 65536     /* iface_zones is indexed by ifindex */
#define VPNR_MAX_QUEUES 64

/* policy_active word */
#define VPNR_ACTIVE_SLOT 1ULL
#define VPNR_ACTIVE_VERSION_SHIFT 1

/* vpnr_config.flags */
#define VPNR_CFG_MONITOR (1U << 0)       /* decide, count and audit, but pass everything */
#define VPNR_CFG_BYPASS_ARP (1U << 1)
#define VPNR_CFG_BYPASS_DHCP (1U << 2)
#define VPNR_CFG_BYPASS_ND (1U << 3)
#define VPNR_CFG_BYPASS_TUNNEL (1U << 4)

/* vpnr_rule.flags */
#define VPNR_RULE_SRC_ANY (1 << 0)
#define VPNR_RULE_DST_ANY (1 << 1)
#define VPNR_RULE_ALLOW_DST_ANY (1 << 2) /* an ALLOW without a destination prefix */

/* vpnr_bucket_key.kind: bit 0 slot, bit 1 IPv6, bits 2-3 bucket type */
#define VPNR_BUCKET_IPV6 (1 << 1)
#define VPNR_BUCKET_EXACT (0 << 2)   /* TCP/UDP with this destination port */
#define VPNR_BUCKET_DEFAULT (1 << 2) /* TCP/UDP, a port without an exact bucket */
#define VPNR_BUCKET_NOPORT (2 << 2)  /* no ports: other protocols, non-first fragments */

#define VPNR_ACTION_ALLOW 1
#define VPNR_ACTION_DENY 2

/* Key of the per-CPU verdict counters: one row per interface, verdict, reason, family and
 * IP protocol, so an operator can tell ICMP echo from ARP on one interface. */
struct vpnr_stats_key {
	__u32 ifindex;
	__u8 verdict;
	__u8 reason;
	__u8 ip_version;  /* 4, 6, or 0 for non-IP */
	__u8 ip_protocol; /* IANA number, 0 for non-IP */
};

struct vpnr_counter {
	__u64 packets;
	__u64 bytes;
};

/* Per-identity accounting, per binding id and per role set: [direction][allowed, denied].
 * Direction 0: arrived on an INTERNAL interface (sent by the identity at this site);
 * direction 1: arrived on an EXTERNAL interface or the tunnel. */
struct vpnr_traffic {
	__u64 packets[2][2];
	__u64 bytes[2][2];
};

/* Written once by the build child; read on every packet so the kernel ties this unpinned
 * map, and the build id in it, to the program. */
struct vpnr_settings {
	__u8 build_id[32];
	__u64 reserved0;
	__u32 reserved1;
	__u32 reserved2;
};

/* Router-wide knobs, written by policyd from its config. */
struct vpnr_config {
	__u32 flags;              /* VPNR_CFG_* */
	__u32 allow_sample_n;     /* audit 1 in N allowed packets; 0: none */
	__u64 audit_rate;         /* audit events per second per role and CPU */
	__u64 audit_burst;        /* token bucket depth, events */
	__u16 tunnel_port;        /* UDP port of tunnel messages on EXTERNAL interfaces */
	__u16 reserved0;
	__u32 reserved1;
};

/* ifindex -> what policyd configured for that interface */
struct vpnr_iface {
	__u8 zone;                /* enum vpnr_zone */
	__u8 reserved[3];
};

/* Source binding: LPM key is the slot byte followed by the address, so both slots live in
 * one trie and prefixlen counts the slot's 8 bits. */
struct vpnr_lpm4_key {
	__u32 prefixlen;
	__u8 slot;
	__u8 addr[4];
	__u8 pad[3];
};

struct vpnr_lpm6_key {
	__u32 prefixlen;
	__u8 slot;
	__u8 addr[16];
	__u8 pad[3];
};

struct vpnr_binding {
	__u32 binding_id;         /* per-identity accounting row */
	__u32 roleset_id;         /* the binding's role combination */
};

/* Role set: the role ids of one combination, for audit events and Test/Explain. Indexed
 * by slot * VPNR_MAX_ROLESETS + id. */
struct vpnr_roleset {
	__u16 count;
	__u16 roles[VPNR_MAX_ROLES_PER_EVENT];
	__u16 reserved;
};

/* Rules that can apply to one (role set, family, protocol, port): a run of compiled rule
 * entries, denies first then allows, each in (priority, id) order, so the first match is
 * the answer. Evaluation cost follows the rules that can apply, not the policy size. */
struct vpnr_bucket_key {
	__u32 roleset;
	__u16 dport;              /* host order; 0 unless VPNR_BUCKET_EXACT */
	__u8 proto;               /* 6, 17, 1, 58, or 0 for any other protocol */
	__u8 kind;                /* slot | VPNR_BUCKET_IPV6 | VPNR_BUCKET_* */
};

struct vpnr_bucket {
	__u32 start;              /* index into rule_table, within the slot's half */
	__u32 count;
};

/* One compiled rule. Addresses and masks in network order; IPv4 uses word 0 and leaves the
 * other words zero; an "any" prefix has a zero mask. */
struct vpnr_rule {
	__u32 src_net[4];
	__u32 src_mask[4];
	__u32 dst_net[4];
	__u32 dst_mask[4];
	__u32 rule_id;
	__u16 role_id;
	__u16 port_from;          /* port-less rules: 0-65535 */
	__u16 port_to;
	__u8 action;              /* VPNR_ACTION_* */
	__u8 flags;               /* VPNR_RULE_* */
	__u32 reserved;
};

/* Per-role, per-CPU token bucket for audit events (tokens in event-nanoseconds). */
struct vpnr_audit_bucket {
	__u64 tokens;
	__u64 last_ns;
};

/* Destination zones: same slot-prefixed LPM layout as bindings; value is enum vpnr_zone. */

#define VPNR_PIN(name) VPNR_PIN_DIR "/" #name

BPF_TABLE_PINNED("percpu_hash", struct vpnr_stats_key, struct vpnr_counter, xdp_stats,
		 VPNR_STATS_MAX_ENTRIES, VPNR_PIN(xdp_stats));
BPF_TABLE_PINNED("array", __u32, __u64, policy_active, 1, VPNR_PIN(policy_active));
BPF_TABLE_PINNED("array", __u32, struct vpnr_config, vpnr_config, 1, VPNR_PIN(vpnr_config));
/* An array indexed by ifindex, not a hash: one of the per-packet lookups, ~17 ns cheaper. */
BPF_TABLE_PINNED("array", __u32, struct vpnr_iface, iface_zones, VPNR_MAX_IFINDEX,
		 VPNR_PIN(iface_zones));
/* Source bindings grow with the IdP: each family's LPM trie sits in slot 0 of a pinned
 * one-element array of maps. policyd creates the trie at the size it needs, and when it
 * passes 80% full creates a larger one, copies every entry and swaps the outer element: one
 * pointer store, so a packet looks up the old trie or the new one, both complete. The
 * templates below only give the verifier the inner maps' key and value shapes. */
BPF_F_TABLE("lpm_trie", struct vpnr_lpm4_key, struct vpnr_binding, src4_bindings_shape, 1,
	    BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct vpnr_lpm6_key, struct vpnr_binding, src6_bindings_shape, 1,
	    BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array_of_maps$src4_bindings_shape", int, int, src4_bindings, 1,
		 VPNR_PIN(src4_bindings));
BPF_TABLE_PINNED("array_of_maps$src6_bindings_shape", int, int, src6_bindings, 1,
		 VPNR_PIN(src6_bindings));
BPF_TABLE_PINNED("lpm_trie", struct vpnr_lpm4_key, __u32, dst4_zones, VPNR_MAX_ZONES,
		 VPNR_PIN(dst4_zones), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct vpnr_lpm6_key, __u32, dst6_zones, VPNR_MAX_ZONES,
		 VPNR_PIN(dst6_zones), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, struct vpnr_roleset, rolesets, 2 * VPNR_MAX_ROLESETS,
		 VPNR_PIN(rolesets));
BPF_TABLE_PINNED("hash", struct vpnr_bucket_key, struct vpnr_bucket, rule_buckets,
		 VPNR_MAX_BUCKETS, VPNR_PIN(rule_buckets));
BPF_TABLE_PINNED("array", __u32, struct vpnr_rule, rule_table, 2 * VPNR_RULE_TABLE_HALF,
		 VPNR_PIN(rule_table));
BPF_TABLE_PINNED("percpu_array", __u32, struct vpnr_traffic, binding_traffic,
		 VPNR_MAX_BINDINGS, VPNR_PIN(binding_traffic));
BPF_TABLE_PINNED("percpu_array", __u32, struct vpnr_traffic, roleset_traffic,
		 VPNR_MAX_ROLESETS, VPNR_PIN(roleset_traffic));
BPF_TABLE_PINNED("percpu_array", __u32, struct vpnr_audit_bucket, audit_buckets,
		 VPNR_MAX_ROLES, VPNR_PIN(audit_buckets));
BPF_TABLE_PINNED("percpu_array", __u32, __u64, audit_lost, VPNR_AUDIT_LOST_MAX,
		 VPNR_PIN(audit_lost));

/* tunneld's half of the WAN check (lib/tunnel.h): written by tunneld, read by XDP. */
#define VPNR_TUNNEL_ENFORCE (1 << 0)
#define VPNR_MAX_TUNNEL_SESSIONS 65536
#define VPNR_MAX_HANDSHAKE_SOURCES 65536

struct vpnr_tunnel_settings {
	__u32 flags;              /* VPNR_TUNNEL_* */
	__u32 handshake_rate;     /* handshake messages per second per source address */
	__u32 handshake_burst;    /* bucket depth, messages */
	__u32 reserved;
};

struct vpnr_hs_key {
	__u8 addr[16];            /* IPv4 in the first 4 bytes */
};

struct vpnr_hs_bucket {
	__u64 tokens;             /* 1e9 per message */
	__u64 last_ns;
};

BPF_TABLE_PINNED("array", __u32, struct vpnr_tunnel_settings, tunnel_settings, 1,
		 VPNR_PIN(tunnel_settings));
/* receiver index (as the 4 wire bytes) -> peer id; tunneld's live keypairs */
BPF_TABLE_PINNED("hash", __u32, __u32, tunnel_sessions, VPNR_MAX_TUNNEL_SESSIONS,
		 VPNR_PIN(tunnel_sessions));
BPF_TABLE("lru_hash", struct vpnr_hs_key, struct vpnr_hs_bucket, handshake_limit,
	  VPNR_MAX_HANDSHAKE_SOURCES);

/* bcc has no pinned ring buffer or XSK map macro: the same struct its macros declare, with
 * the pin path in the section name. */
struct audit_ring_table_t {
	int key;
	__u32 leaf;
	void *(*ringbuf_reserve)(__u64);
	void (*ringbuf_submit)(void *, __u64);
	void (*ringbuf_discard)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" VPNR_PIN(audit_ring))))
struct audit_ring_table_t audit_ring = { .max_entries = VPNR_AUDIT_RING_BYTES };

/* tunneld binds its AF_XDP sockets here, one per receive queue (the tunnel issue). */
struct xsk_map_table_t {
	__u32 key;
	int leaf;
	int *(*lookup)(__u32 *);
	__u64 (*redirect_map)(int, int);
	__u32 max_entries;
};
__attribute__((section("maps/xskmap:" VPNR_PIN(xsk_map))))
struct xsk_map_table_t xsk_map = { .max_entries = VPNR_MAX_QUEUES };

BPF_ARRAY(vpnr_settings, struct vpnr_settings, 1);

/* The rule scan runs as a tail call: verified on its own, from one entry state, the
 * 512-candidate loop stays far below the verifier's budget. The build pins this array
 * (xdp_stages_<build id>), since the kernel empties a program array nobody holds open. */
BPF_PROG_ARRAY(xdp_stages, 1);
#define VPNR_STAGE_RULES 0

/* xdp_handoff, the per-CPU state passed to the rule scan, is in handoff.h. */

#endif /* VPNR_MAPS_H */
