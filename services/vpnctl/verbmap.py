"""Which friendly verb calls which RPC: the one place that says so.

tests/test_vpnctl_verbs.py checks this table both ways: every method of every vpnr service
in the generated descriptors has a verb here, and every verb here is a real command of
``vpnctl``. docs/vpnctl.md shows it. ``vpnctl call SERVICE/METHOD`` reaches any method too.
"""

from __future__ import annotations

POLICY = "vpnr.v1.PolicyService"
TUNNEL = "vpnr.v1.TunnelService"
AUDIT = "vpnr.v1.AuditService"
IDP = "vpnr.v1.IdpService"

# "vpnctl VERB ..." (without "vpnctl") -> the RPCs it calls, "Service/Method".
VERB_RPCS: dict[str, tuple[str, ...]] = {
    "status": (f"{POLICY}/Status", f"{TUNNEL}/Status", f"{AUDIT}/Status", f"{IDP}/Status"),
    # policyd
    "policy status": (f"{POLICY}/Status",),
    "policy import": (f"{POLICY}/ReplacePolicy",),
    "policy export": (f"{POLICY}/GetPolicy",),
    "policy show": (f"{POLICY}/GetPolicy",),
    "policy check": (f"{POLICY}/TestDecision",),
    "policy test": (f"{POLICY}/TestDecision",),
    "role list": (f"{POLICY}/ListRoles",),
    "role get": (f"{POLICY}/GetRole",),
    "role create": (f"{POLICY}/CreateRole",),
    "role update": (f"{POLICY}/GetRole", f"{POLICY}/UpdateRole"),
    "role delete": (f"{POLICY}/DeleteRole",),
    "rule list": (f"{POLICY}/ListRules",),
    "rule get": (f"{POLICY}/GetRule",),
    "rule add": (f"{POLICY}/CreateRule",),
    "rule update": (f"{POLICY}/GetRule", f"{POLICY}/UpdateRule"),
    "rule delete": (f"{POLICY}/DeleteRule",),
    "binding list": (f"{POLICY}/ListBindings",),
    "binding get": (f"{POLICY}/GetBinding",),
    "binding add": (f"{POLICY}/CreateBinding",),
    "binding update": (f"{POLICY}/GetBinding", f"{POLICY}/UpdateBinding"),
    "binding replace": (f"{POLICY}/ReplaceBindings",),
    "binding delete": (f"{POLICY}/DeleteBinding",),
    "zone list": (f"{POLICY}/ListZones",),
    "zone get": (f"{POLICY}/GetZone",),
    "zone set": (f"{POLICY}/CreateZone", f"{POLICY}/UpdateZone"),
    "zone delete": (f"{POLICY}/DeleteZone",),
    "snapshot create": (f"{POLICY}/CreateSnapshot",),
    "snapshot list": (f"{POLICY}/ListSnapshots",),
    "snapshot diff": (f"{POLICY}/DiffSnapshots",),
    "snapshot restore": (f"{POLICY}/RestoreSnapshot",),
    "snapshot delete": (f"{POLICY}/DeleteSnapshot",),
    # tunneld
    "tunnel status": (f"{TUNNEL}/Status",),
    "tunnel rotate-key": (f"{TUNNEL}/RotateStaticKey",),
    "peer list": (f"{TUNNEL}/ListPeers",),
    "peer get": (f"{TUNNEL}/GetPeer",),
    "peer add": (f"{TUNNEL}/AddPeer",),
    "peer update": (f"{TUNNEL}/GetPeer", f"{TUNNEL}/UpdatePeer"),
    "peer remove": (f"{TUNNEL}/RemovePeer",),
    "peer revoke": (f"{TUNNEL}/RevokePeer",),
    "session list": (f"{TUNNEL}/ListSessions",),
    "session create": (f"{TUNNEL}/CreateSession",),
    "session delete": (f"{TUNNEL}/DeleteSession",),
    "session rotate": (f"{TUNNEL}/RotateSession",),
    # auditd
    "audit status": (f"{AUDIT}/Status",),
    "audit events": (f"{AUDIT}/Query", f"{AUDIT}/Follow"),
    "audit export": (f"{AUDIT}/Export",),
    "audit stats": (f"{AUDIT}/Stats",),
    "audit record": (f"{AUDIT}/Record",),
    # idpd
    "idp status": (f"{IDP}/Status",),
    "idp config": (f"{IDP}/GetConfig",),
    "idp test-connection": (f"{IDP}/TestConnection",),
    "idp sync": (f"{IDP}/SyncNow", f"{IDP}/ConfirmSync"),
    "idp login": (f"{IDP}/StartLogin", f"{IDP}/WaitLogin", f"{IDP}/CompleteLogin"),
    "idp logins": (f"{IDP}/ListLogins",),
    "idp logout": (f"{IDP}/Logout",),
    "idp bindings": (f"{IDP}/ListBindings",),
}


def verbs_of(rpc: str) -> list[str]:
    """The verbs that call ``rpc`` ("Service/Method")."""
    return [verb for verb, rpcs in VERB_RPCS.items() if rpc in rpcs]
