"""The lab's starting policy for one site, as a PolicyDocument.

Host 1 is an engineer (ICMP, SSH and the 5000-5999 service range on the router, DNS, and
everything at the other site through the tunnel), host 2 is in sales (ICMP and DNS; SSH is
explicitly denied), further hosts have no binding and are denied. The site's own LAN is the
INTERNAL zone, the other site's LAN the VPN zone. The other site's hosts have the same
roles here, so the decap program judges what the tunnel brings in by this site's rules
(engineers may reach this site, except telnet). The underlay may reach the router's WAN
address (the IdP's answers); tunnel messages pass by the tunnel port's own check.
"""

from __future__ import annotations

from vpnr.lab.topology import UNDERLAY_V4, LabSpec, Site
from vpnr.v1 import codes_pb2, policy_pb2

ALLOW, DENY = policy_pb2.ACTION_ALLOW, policy_pb2.ACTION_DENY
TCP, UDP = codes_pb2.PROTOCOL_TCP, codes_pb2.PROTOCOL_UDP
ICMP, ICMPV6 = codes_pb2.PROTOCOL_ICMP, codes_pb2.PROTOCOL_ICMPV6
SSH_PORT, DNS_PORT, TELNET_PORT, SERVICE_PORTS = 22, 53, 23, (5000, 5999)


def _rule(rule_id: int, action: policy_pb2.Action,
          protocol: codes_pb2.Protocol = codes_pb2.PROTOCOL_ANY,
          dst: str = "", ports: tuple[int, int] = (0, 0), description: str = "",
          priority: int = 10) -> policy_pb2.Rule:
    return policy_pb2.Rule(id=rule_id, priority=priority, action=action, protocol=protocol,
                           dst_prefix=dst, dst_port_from=ports[0], dst_port_to=ports[1],
                           description=description)


def site_policy(spec: LabSpec, site: Site) -> policy_pb2.PolicyDocument:
    """Roles eng and sales, bindings for hosts 1 and 2, zones for both sites."""
    other = next(s for s in spec.sites if s.letter != site.letter)
    router4, router6 = f"{site.router_lan_v4}/32", f"{site.router_lan_v6}/128"
    eng = policy_pb2.Role(name="eng", description="engineering", rules=[
        _rule(10, ALLOW, ICMP, description="ping anything"),
        _rule(11, ALLOW, ICMPV6, description="ping6 anything"),
        _rule(12, ALLOW, TCP, router4, (SSH_PORT, SSH_PORT), "ssh to the router"),
        _rule(13, ALLOW, TCP, router4, SERVICE_PORTS, "router services"),
        _rule(14, ALLOW, UDP, router4, (DNS_PORT, DNS_PORT), "dns"),
        _rule(15, ALLOW, TCP, router6, (SSH_PORT, SSH_PORT), "ssh to the router (v6)"),
        _rule(16, ALLOW, dst=other.lan_v4, description="the other site"),
        _rule(17, ALLOW, dst=other.lan_v6, description="the other site (v6)"),
        # Arriving through the tunnel from the other site's engineers (the decap program):
        _rule(18, ALLOW, dst=site.lan_v4, description="this site, from the other site"),
        _rule(19, ALLOW, dst=site.lan_v6, description="this site, from the other site (v6)"),
        _rule(25, DENY, TCP, site.lan_v4, (TELNET_PORT, TELNET_PORT),
              "no telnet into this site", priority=0),
    ])
    sales = policy_pb2.Role(name="sales", description="sales", rules=[
        _rule(20, ALLOW, ICMP, description="ping anything"),
        _rule(21, ALLOW, ICMPV6, description="ping6 anything"),
        _rule(22, DENY, TCP, router4, (SSH_PORT, SSH_PORT), "no ssh", priority=0),
        _rule(23, ALLOW, UDP, router4, (DNS_PORT, DNS_PORT), "dns"),
    ])
    underlay = policy_pb2.Role(name="underlay", description="the WAN's routers and IdP",
                               rules=[_rule(30, ALLOW, dst=f"{site.router_wan_v4}/32",
                                            description="to this router's WAN address")])
    bindings = [policy_pb2.Binding(prefix=UNDERLAY_V4, roles=["underlay"], source="lab",
                                   subject="underlay")]
    # Both sites' people: each router enforces its own rules on what the tunnel brings in.
    for where in (site, other):
        for n, role in ((1, "eng"), (2, "sales")):
            if n <= spec.hosts_per_site:
                subject = f"host{n}" if where is site else f"site-{where.letter}-host{n}"
                bindings.append(policy_pb2.Binding(prefix=f"{where.host_v4(n)}/32",
                                                   roles=[role], source="lab", subject=subject))
                bindings.append(policy_pb2.Binding(prefix=f"{where.host_v6(n)}/128",
                                                   roles=[role], source="lab", subject=subject))
    zones = [policy_pb2.ZoneAssignment(prefix=site.lan_v4, zone=codes_pb2.ZONE_INTERNAL),
             policy_pb2.ZoneAssignment(prefix=site.lan_v6, zone=codes_pb2.ZONE_INTERNAL),
             policy_pb2.ZoneAssignment(prefix=other.lan_v4, zone=codes_pb2.ZONE_VPN),
             policy_pb2.ZoneAssignment(prefix=other.lan_v6, zone=codes_pb2.ZONE_VPN)]
    return policy_pb2.PolicyDocument(roles=[eng, sales, underlay], bindings=bindings,
                                   zones=zones)
