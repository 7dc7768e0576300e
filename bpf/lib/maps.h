/* Every map of the XDP RBAC program, declared in one place.
 *
 * Pinned maps (BPF_TABLE_PINNED) outlive policyd: a restarted or upgraded policyd reuses
 * them, so counters and policy survive. VPNR_PIN_DIR is passed by policyd as a -D flag. */
#ifndef VPNR_MAPS_H
#define VPNR_MAPS_H

#ifndef VPNR_PIN_DIR
#error "VPNR_PIN_DIR must name the instance pin directory"
#endif

#define VPNR_STATS_MAX_ENTRIES 4096

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

/* Written once by policyd after loading; read by the program on every packet. The build id
 * lets a restarted policyd recognise a program it may adopt instead of reloading. */
struct vpnr_settings {
	__u8 build_id[32];
	__u64 policy_version;
	__u32 flags;
	__u32 reserved;
};

BPF_TABLE_PINNED("percpu_hash", struct vpnr_stats_key, struct vpnr_counter, xdp_stats,
		 VPNR_STATS_MAX_ENTRIES, VPNR_PIN_DIR "/xdp_stats");

BPF_ARRAY(vpnr_settings, struct vpnr_settings, 1);

/* Defined by each entry file (see xdp_rbac.c for why). */
static __always_inline struct vpnr_counter *vpnr_stats_row(struct vpnr_stats_key *key,
							   struct vpnr_counter *zero);
static __always_inline struct vpnr_settings *vpnr_settings_get(void);

#endif /* VPNR_MAPS_H */
