/* Bounded packet parsing: Ethernet (one 802.1Q tag), IPv4, IPv6, L4 protocol. */
#ifndef VPNR_PARSE_H
#define VPNR_PARSE_H

#include "codes.h"

#define VPNR_ETH_P_IP 0x0800
#define VPNR_ETH_P_IPV6 0x86DD
#define VPNR_ETH_P_ARP 0x0806
#define VPNR_ETH_P_8021Q 0x8100
#define VPNR_IPPROTO_ICMPV6 58

struct vpnr_packet {
	__u16 ethertype;   /* host order, after the VLAN tag */
	__u8 ip_version;
	__u8 ip_protocol;
	__u32 l3_offset;
	__u32 len;
};

struct vpnr_vlan_hdr {
	__be16 tci;
	__be16 encapsulated_proto;
};

/* Returns 0 and fills pkt, or a VPNR_REASON_MALFORMED_* code. */
static __always_inline int vpnr_parse(void *data, void *data_end, struct vpnr_packet *pkt)
{
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);

	pkt->len = (__u32)(data_end - data);
	if ((void *)(eth + 1) > data_end)
		return VPNR_REASON_MALFORMED_L2;
	pkt->ethertype = bpf_ntohs(eth->h_proto);
	if (pkt->ethertype == VPNR_ETH_P_8021Q) {
		struct vpnr_vlan_hdr *vlan = data + off;

		if ((void *)(vlan + 1) > data_end)
			return VPNR_REASON_MALFORMED_L2;
		pkt->ethertype = bpf_ntohs(vlan->encapsulated_proto);
		off += sizeof(*vlan);
	}
	pkt->l3_offset = off;
	if (pkt->ethertype == VPNR_ETH_P_IP) {
		struct iphdr *ip4 = data + off;

		if ((void *)(ip4 + 1) > data_end)
			return VPNR_REASON_MALFORMED_L3;
		if (ip4->version != 4 || ip4->ihl < 5)
			return VPNR_REASON_MALFORMED_L3;
		if ((void *)ip4 + ip4->ihl * 4 > data_end)
			return VPNR_REASON_MALFORMED_L3;
		pkt->ip_version = 4;
		pkt->ip_protocol = ip4->protocol;
	} else if (pkt->ethertype == VPNR_ETH_P_IPV6) {
		struct ipv6hdr *ip6 = data + off;

		if ((void *)(ip6 + 1) > data_end)
			return VPNR_REASON_MALFORMED_L3;
		if (ip6->version != 6)
			return VPNR_REASON_MALFORMED_L3;
		pkt->ip_version = 6;
		pkt->ip_protocol = ip6->nexthdr;
	}
	return 0;
}

#endif /* VPNR_PARSE_H */
