/* The audit event: what the data path writes into the audit ring buffer for a decision.
 *
 * The one definition of the record. auditd decodes it with the struct in
 * services/policyd/layout.py (AUDIT_EVENT, decode_audit_event); tests/test_struct_layout.py compiles this header and fails
 * if the two disagree on any size or offset. Append fields only; never reorder.
 */
#ifndef VPNR_AUDIT_EVENT_H
#define VPNR_AUDIT_EVENT_H

#define VPNR_MAX_ROLES_PER_EVENT 16
#define VPNR_AUDIT_EVENT_VERSION 1

/* Who produced the event. */
#define VPNR_SOURCE_XDP 1       /* policyd's XDP program, interface ingress */
#define VPNR_SOURCE_TC_DECAP 2  /* tunneld's TC program on the decap interface */

/* Index of the audit_lost per-CPU counters. */
#define VPNR_AUDIT_LOST_RESERVE 0      /* ring buffer full: the event could not be reserved */
#define VPNR_AUDIT_LOST_RATE_LIMIT 1   /* the role's token bucket was empty */
#define VPNR_AUDIT_SAMPLED_OUT 2       /* an allowed packet not picked by 1-in-N sampling */
#define VPNR_AUDIT_EMITTED 3           /* events written to the ring */
#define VPNR_AUDIT_LOST_MAX 4

struct vpnr_audit_event {
	__u64 ktime_ns;          /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 policy_version;    /* version of the policy slot that decided */
	__u8 src[16];            /* IPv4 in the first 4 bytes, network order */
	__u8 dst[16];
	__u32 ifindex;
	__u32 rule_id;           /* 0: no rule matched */
	__u32 binding_id;        /* 0: no binding */
	__u32 roleset_id;
	__u32 pkt_len;
	__u16 src_port;          /* host order; 0 when the packet has no ports */
	__u16 dst_port;
	__u16 rule_role;         /* role id owning rule_id */
	__u16 roles[VPNR_MAX_ROLES_PER_EVENT];
	__u8 role_count;
	__u8 ip_version;
	__u8 ip_protocol;
	__u8 verdict;            /* enum vpnr_verdict */
	__u8 reason;             /* enum vpnr_reason */
	__u8 src_zone;           /* enum vpnr_zone */
	__u8 dst_zone;
	__u8 source;             /* VPNR_SOURCE_* */
	__u8 event_version;      /* VPNR_AUDIT_EVENT_VERSION */
	__u8 flags;              /* bit 0: non-first fragment */
	__u16 icmp_type;         /* ICMP/ICMPv6 type, 0xffff when not ICMP */
};

#endif /* VPNR_AUDIT_EVENT_H */
