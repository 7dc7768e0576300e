/* Bounded packet parsing: Ethernet (one 802.1Q tag), IPv4 (options, fragments), IPv6 (with
 * hop-by-hop, routing, fragment, destination options and AH extension headers), and the
 * TCP, UDP, ICMP and ICMPv6 headers. Anything truncated or inconsistent gets its own
 * MALFORMED_* reason: nothing passes unchecked. */
#ifndef VPNR_PARSE_H
#define VPNR_PARSE_H

#include "codes.h"

#define VPNR_ETH_P_IP 0x0800
#define VPNR_ETH_P_IPV6 0x86DD
#define VPNR_ETH_P_ARP 0x0806
#define VPNR_ETH_P_8021Q 0x8100

#define VPNR_IPPROTO_HOPOPTS 0
#define VPNR_IPPROTO_ICMP 1
#define VPNR_IPPROTO_TCP 6
#define VPNR_IPPROTO_UDP 17
#define VPNR_IPPROTO_ROUTING 43
#define VPNR_IPPROTO_FRAGMENT 44
#define VPNR_IPPROTO_AH 51
#define VPNR_IPPROTO_ICMPV6 58
#define VPNR_IPPROTO_DSTOPTS 60

#define VPNR_IPV6_MAX_EXT 6        /* extension headers walked before giving up */
#define VPNR_MAX_L3_OFFSET 64      /* Ethernet + VLAN, generously */
#define VPNR_MAX_L4_OFFSET 1024    /* keeps offsets bounded for the verifier */

#define VPNR_PKT_FRAGMENT (1 << 0)   /* a non-first fragment: no L4 header, no ports */
#define VPNR_PKT_HAS_PORTS (1 << 1)  /* TCP or UDP header parsed */
#define VPNR_PKT_ICMP (1 << 2)       /* ICMP or ICMPv6 header parsed */

struct vpnr_packet {
	__u32 src[4];      /* network order; IPv4 in word 0, the rest zero */
	__u32 dst[4];
	__u32 len;
	__u16 ethertype;   /* host order, after the VLAN tag */
	__u16 src_port;    /* host order */
	__u16 dst_port;
	__u8 ip_version;
	__u8 ip_protocol;  /* the upper-layer protocol after extension headers */
	__u8 icmp_type;
	__u8 hop_limit;    /* IPv4 TTL or IPv6 hop limit */
	__u8 flags;        /* VPNR_PKT_* */
	__u8 reserved;
	__u16 l4_off;      /* offset of the TCP/UDP/ICMP header from the frame start */
	__u16 reserved2;
};

struct vpnr_vlan_hdr {
	__be16 tci;
	__be16 encapsulated_proto;
};

struct vpnr_ipv6_ext {
	__u8 nexthdr;
	__u8 hdrlen;
	__be16 frag_off;   /* fragment header only: offset << 3 | M flag */
};

/* TCP, UDP, ICMP, ICMPv6 after the network header. Returns 0 or VPNR_REASON_MALFORMED_L4. */
static __always_inline int vpnr_parse_l4(void *data, void *data_end, __u32 off,
					 struct vpnr_packet *pkt)
{
	if (off > VPNR_MAX_L4_OFFSET)
		return VPNR_REASON_MALFORMED_L4;
	pkt->l4_off = off;
	if (pkt->ip_protocol == VPNR_IPPROTO_TCP) {
		struct tcphdr *tcp = data + off;

		if ((void *)(tcp + 1) > data_end || tcp->doff < 5)
			return VPNR_REASON_MALFORMED_L4;
		if ((void *)tcp + tcp->doff * 4 > data_end)
			return VPNR_REASON_MALFORMED_L4;
		pkt->src_port = bpf_ntohs(tcp->source);
		pkt->dst_port = bpf_ntohs(tcp->dest);
		pkt->flags |= VPNR_PKT_HAS_PORTS;
	} else if (pkt->ip_protocol == VPNR_IPPROTO_UDP) {
		struct udphdr *udp = data + off;

		if ((void *)(udp + 1) > data_end || bpf_ntohs(udp->len) < sizeof(*udp))
			return VPNR_REASON_MALFORMED_L4;
		pkt->src_port = bpf_ntohs(udp->source);
		pkt->dst_port = bpf_ntohs(udp->dest);
		pkt->flags |= VPNR_PKT_HAS_PORTS;
	} else if (pkt->ip_protocol == VPNR_IPPROTO_ICMP ||
		   pkt->ip_protocol == VPNR_IPPROTO_ICMPV6) {
		__u8 *icmp = data + off;

		if ((void *)(icmp + 8) > data_end) /* every ICMP message has an 8-byte header */
			return VPNR_REASON_MALFORMED_L4;
		pkt->icmp_type = icmp[0];
		pkt->flags |= VPNR_PKT_ICMP;
	}
	return 0;
}

static __always_inline int vpnr_parse_ipv4(void *data, void *data_end, __u32 off,
					   struct vpnr_packet *pkt)
{
	struct iphdr *ip4 = data + off;
	__u16 frag;
	__u32 hlen;

	if ((void *)(ip4 + 1) > data_end)
		return VPNR_REASON_MALFORMED_L3;
	hlen = ip4->ihl * 4;
	if (ip4->version != 4 || hlen < sizeof(*ip4))
		return VPNR_REASON_MALFORMED_L3;
	if ((void *)ip4 + hlen > data_end)
		return VPNR_REASON_MALFORMED_L3;
	/* The IP length must cover the header and fit the frame (Ethernet may pad past it). */
	if (bpf_ntohs(ip4->tot_len) < hlen || off + bpf_ntohs(ip4->tot_len) > pkt->len)
		return VPNR_REASON_MALFORMED_L3;
	pkt->ip_version = 4;
	pkt->ip_protocol = ip4->protocol;
	pkt->hop_limit = ip4->ttl;
	pkt->src[0] = ip4->saddr;
	pkt->dst[0] = ip4->daddr;
	frag = bpf_ntohs(ip4->frag_off) & 0x1fff;
	if (frag) {
		/* RFC 1858: a fragment at offset 8 bytes can rewrite the TCP flags/ports of the
		 * first one; no legitimate stack sends it. */
		if (frag == 1 && ip4->protocol == VPNR_IPPROTO_TCP)
			return VPNR_REASON_MALFORMED_L4;
		pkt->flags |= VPNR_PKT_FRAGMENT;
		return 0;
	}
	return vpnr_parse_l4(data, data_end, off + hlen, pkt);
}

static __always_inline int vpnr_parse_ipv6(void *data, void *data_end, __u32 off,
					   struct vpnr_packet *pkt)
{
	struct ipv6hdr *ip6 = data + off;
	struct vpnr_ipv6_ext *ext;
	__u8 nexthdr;
	int i;

	if ((void *)(ip6 + 1) > data_end)
		return VPNR_REASON_MALFORMED_L3;
	if (ip6->version != 6)
		return VPNR_REASON_MALFORMED_L3;
	if (off + sizeof(*ip6) + bpf_ntohs(ip6->payload_len) > pkt->len)
		return VPNR_REASON_MALFORMED_L3;
	pkt->ip_version = 6;
	pkt->hop_limit = ip6->hop_limit;
	__builtin_memcpy(pkt->src, &ip6->saddr, 16);
	__builtin_memcpy(pkt->dst, &ip6->daddr, 16);
	nexthdr = ip6->nexthdr;
	off += sizeof(*ip6);

#pragma unroll
	for (i = 0; i < VPNR_IPV6_MAX_EXT; i++) {
		if (nexthdr != VPNR_IPPROTO_HOPOPTS && nexthdr != VPNR_IPPROTO_ROUTING &&
		    nexthdr != VPNR_IPPROTO_FRAGMENT && nexthdr != VPNR_IPPROTO_DSTOPTS &&
		    nexthdr != VPNR_IPPROTO_AH)
			break;
		/* RFC 8200 4.3: hop-by-hop options only directly after the fixed header. */
		if (nexthdr == VPNR_IPPROTO_HOPOPTS && i > 0)
			return VPNR_REASON_MALFORMED_L3;
		if (off > VPNR_MAX_L4_OFFSET)
			return VPNR_REASON_MALFORMED_L3;
		ext = data + off;
		if ((void *)(ext + 1) > data_end)
			return VPNR_REASON_MALFORMED_L3;
		if (nexthdr == VPNR_IPPROTO_FRAGMENT) {
			nexthdr = ext->nexthdr;
			off += 8;
			if (bpf_ntohs(ext->frag_off) >> 3) {
				pkt->ip_protocol = nexthdr;
				pkt->flags |= VPNR_PKT_FRAGMENT;
				return 0;
			}
		} else if (nexthdr == VPNR_IPPROTO_AH) {
			nexthdr = ext->nexthdr;
			off += ((__u32)ext->hdrlen + 2) * 4; /* RFC 4302: length in 4-byte units - 2 */
		} else {
			nexthdr = ext->nexthdr;
			off += ((__u32)ext->hdrlen + 1) * 8; /* RFC 8200: 8-byte units, first excluded */
		}
		if (data + off > data_end)
			return VPNR_REASON_MALFORMED_L3;
	}
	if (nexthdr == VPNR_IPPROTO_HOPOPTS || nexthdr == VPNR_IPPROTO_ROUTING ||
	    nexthdr == VPNR_IPPROTO_FRAGMENT || nexthdr == VPNR_IPPROTO_DSTOPTS ||
	    nexthdr == VPNR_IPPROTO_AH)
		return VPNR_REASON_IPV6_EXT_LIMIT;
	pkt->ip_protocol = nexthdr;
	return vpnr_parse_l4(data, data_end, off, pkt);
}

/* Returns 0 and fills pkt, or a VPNR_REASON_MALFORMED_* / IPV6_EXT_LIMIT code.
 * pkt->len may be preset to the whole packet's length when only its head is linear (a
 * GSO packet on the TC hook): headers are read within data_end, lengths checked against
 * pkt->len. Left 0 (XDP: the frame is all there), it is the frame's length. */
static __always_inline int vpnr_parse(void *data, void *data_end, struct vpnr_packet *pkt)
{
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);

	if (!pkt->len)
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
	if (pkt->ethertype == VPNR_ETH_P_IP)
		return vpnr_parse_ipv4(data, data_end, off, pkt);
	if (pkt->ethertype == VPNR_ETH_P_IPV6)
		return vpnr_parse_ipv6(data, data_end, off, pkt);
	return 0;
}

#endif /* VPNR_PARSE_H */
