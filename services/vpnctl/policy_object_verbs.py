"""``vpnctl role|rule|binding|zone ...``: one policy object at a time, against policyd.

Each write is its own policy version; ``--expected-version`` makes a delete conditional on
the version the operator last saw. List verbs page through to the last item.
"""

from __future__ import annotations

import argparse
from typing import cast

from vpnr.v1 import codes_pb2, policy_pb2
from vpnr.vpnctl.commandline import Subcommands, add_group, add_verb
from vpnr.vpnctl.output import table_lines
from vpnr.vpnctl.policy_terms import ACTIONS, PROTOCOLS, ZONES, format_ports
from vpnr.vpnctl.policy_verbs import (
    EXIT_OK,
    add_expected_version,
    add_page_size,
    connect,
    ports_arg,
    prefix_arg,
    priority_arg,
    rule_id_arg,
    show,
)
from vpnr.vpnctl.policy_view import (
    binding_view,
    diff_lines,
    diff_view,
    role_row,
    role_view,
    rows_text,
    rule_row,
    rule_view,
    zone_view,
)
from vpnr.vpnctl.reflection import RpcFailure, UsageError

ANY = "any"  # rule update --src/--dst: match every address again


def prefix_or_any(text: str) -> str:
    """A CIDR prefix (normalized), or ``any``."""
    return ANY if text.strip().lower() == ANY else prefix_arg(text)


def _deleted(args: argparse.Namespace, kind: str, name: object,
             reply: policy_pb2.DeleteResponse) -> int:
    show(args, {"deleted": kind, "name": name, "version": reply.version},
         f"deleted {kind} {name} (policy version {reply.version})")
    return EXIT_OK


# ------------------------------------------------------------------------------ roles

def cmd_role_list(args: argparse.Namespace) -> int:
    """Every role with its rule count (ListRoles, all pages)."""
    with connect(args) as client:
        roles = client.list_all("ListRoles", policy_pb2.ListRolesRequest(),
                                policy_pb2.ListRolesResponse, "roles", args.page_size)
    show(args, [role_view(role) for role in roles],
         rows_text([role_row(role) for role in roles], "(no roles)"))
    return EXIT_OK


def cmd_role_get(args: argparse.Namespace) -> int:
    """One role and its rules."""
    with connect(args) as client:
        role = client.call("GetRole", policy_pb2.GetRoleRequest(name=args.name),
                           policy_pb2.Role)
    view = role_view(role)
    table = {**view, "rules": [rule_row(rule) for rule in role.rules]}
    show(args, view, "\n".join(table_lines(table)))
    return EXIT_OK


def cmd_role_create(args: argparse.Namespace) -> int:
    """CreateRole (no rules yet: add them with ``vpnctl rule add``)."""
    request = policy_pb2.CreateRoleRequest(
        role=policy_pb2.Role(name=args.name, description=args.description))
    with connect(args) as client:
        role = client.call("CreateRole", request, policy_pb2.Role)
    view = role_view(role)
    show(args, view, "\n".join(table_lines({**view, "rules": len(role.rules)})))
    return EXIT_OK


def cmd_role_update(args: argparse.Namespace) -> int:
    """UpdateRole: a new description (its rules stay; change them with ``vpnctl rule``)."""
    with connect(args) as client:
        role = client.call("GetRole", policy_pb2.GetRoleRequest(name=args.name),
                           policy_pb2.Role)
        role.description = args.description
        updated = client.call("UpdateRole", policy_pb2.UpdateRoleRequest(
            role=role, expected_version=args.expected_version), policy_pb2.Role)
    view = role_view(updated)
    show(args, view, "\n".join(table_lines({**view, "rules": len(updated.rules)})))
    return EXIT_OK


def cmd_role_delete(args: argparse.Namespace) -> int:
    """DeleteRole."""
    request = policy_pb2.DeleteRoleRequest(name=args.name,
                                           expected_version=args.expected_version)
    with connect(args) as client:
        reply = client.call("DeleteRole", request, policy_pb2.DeleteResponse)
    return _deleted(args, "role", args.name, reply)


# ------------------------------------------------------------------------------ rules

def cmd_rule_list(args: argparse.Namespace) -> int:
    """Every rule, or those of one role (ListRules, all pages)."""
    with connect(args) as client:
        rules = client.list_all("ListRules", policy_pb2.ListRulesRequest(role=args.role),
                                policy_pb2.ListRulesResponse, "rules", args.page_size)
    show(args, [rule_view(rule) for rule in rules],
         rows_text([rule_row(rule) for rule in rules], "(no rules)"))
    return EXIT_OK


def cmd_rule_add(args: argparse.Namespace) -> int:
    """CreateRule in a role; policyd assigns the id unless --id is given."""
    first, last = args.ports
    if (first, last) != (0, 0) and PROTOCOLS[args.protocol] not in (
            codes_pb2.PROTOCOL_TCP, codes_pb2.PROTOCOL_UDP):
        raise UsageError(f"--ports {format_ports(first, last)} needs --protocol tcp or udp")
    rule = policy_pb2.Rule(
        id=args.id or 0, role=args.role, priority=args.priority,
        action=cast(policy_pb2.Action, ACTIONS[args.action]),
        protocol=cast(codes_pb2.Protocol, PROTOCOLS[args.protocol]),
        src_prefix=args.src or "", dst_prefix=args.dst or "", dst_port_from=first, dst_port_to=last,
        description=args.description)
    with connect(args) as client:
        created = client.call("CreateRule", policy_pb2.CreateRuleRequest(rule=rule),
                              policy_pb2.Rule)
    view = rule_view(created)
    show(args, view, "\n".join(table_lines(rule_row(created))))
    return EXIT_OK


def cmd_rule_get(args: argparse.Namespace) -> int:
    """GetRule by id."""
    with connect(args) as client:
        rule = client.call("GetRule", policy_pb2.GetRuleRequest(id=args.id), policy_pb2.Rule)
    show(args, rule_view(rule), "\n".join(table_lines(rule_row(rule))))
    return EXIT_OK


def cmd_rule_update(args: argparse.Namespace) -> int:
    """GetRule, change what the options name, UpdateRule (the rest stays as it was)."""
    with connect(args) as client:
        rule = client.call("GetRule", policy_pb2.GetRuleRequest(id=args.id), policy_pb2.Rule)
        if args.action is not None:
            rule.action = cast(policy_pb2.Action, ACTIONS[args.action])
        if args.protocol is not None:
            rule.protocol = cast(codes_pb2.Protocol, PROTOCOLS[args.protocol])
        if args.src is not None:
            rule.src_prefix = "" if args.src == ANY else args.src
        if args.dst is not None:
            rule.dst_prefix = "" if args.dst == ANY else args.dst
        if args.ports is not None:
            rule.dst_port_from, rule.dst_port_to = args.ports
        if args.priority is not None:
            rule.priority = args.priority
        if args.description is not None:
            rule.description = args.description
        updated = client.call("UpdateRule", policy_pb2.UpdateRuleRequest(
            rule=rule, expected_version=args.expected_version), policy_pb2.Rule)
    show(args, rule_view(updated), "\n".join(table_lines(rule_row(updated))))
    return EXIT_OK


def cmd_rule_delete(args: argparse.Namespace) -> int:
    """DeleteRule by id."""
    request = policy_pb2.DeleteRuleRequest(id=args.id, expected_version=args.expected_version)
    with connect(args) as client:
        reply = client.call("DeleteRule", request, policy_pb2.DeleteResponse)
    return _deleted(args, "rule", args.id, reply)


# --------------------------------------------------------------------------- bindings

def cmd_binding_list(args: argparse.Namespace) -> int:
    """Every binding, optionally of one source or one role (ListBindings, all pages)."""
    request = policy_pb2.ListBindingsRequest(source=args.source, role=args.role)
    with connect(args) as client:
        bindings = client.list_all("ListBindings", request, policy_pb2.ListBindingsResponse,
                                   "bindings", args.page_size)
    views = [binding_view(binding) for binding in bindings]
    show(args, views, rows_text(views, "(no bindings)"))
    return EXIT_OK


def role_names(text: str) -> list[str]:
    """``eng,ops`` -> ["eng", "ops"]."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected role names separated by commas, "
                                         f"got {text!r}")
    return names


def cmd_binding_add(args: argparse.Namespace) -> int:
    """CreateBinding: the prefix's addresses get these roles."""
    binding = policy_pb2.Binding(prefix=args.prefix, roles=args.roles, subject=args.subject)
    with connect(args) as client:
        created = client.call("CreateBinding",
                              policy_pb2.CreateBindingRequest(binding=binding),
                              policy_pb2.Binding)
    view = binding_view(created)
    show(args, view, "\n".join(table_lines(view)))
    return EXIT_OK


def cmd_binding_get(args: argparse.Namespace) -> int:
    """GetBinding by prefix."""
    with connect(args) as client:
        binding = client.call("GetBinding", policy_pb2.GetBindingRequest(prefix=args.prefix),
                              policy_pb2.Binding)
    view = binding_view(binding)
    show(args, view, "\n".join(table_lines(view)))
    return EXIT_OK


def cmd_binding_update(args: argparse.Namespace) -> int:
    """GetBinding, new roles and/or subject, UpdateBinding."""
    if args.roles is None and args.subject is None:
        raise UsageError("nothing to change: give --roles or --subject")
    with connect(args) as client:
        binding = client.call("GetBinding", policy_pb2.GetBindingRequest(prefix=args.prefix),
                              policy_pb2.Binding)
        if args.roles is not None:
            binding.ClearField("roles")
            binding.roles.extend(args.roles)
        if args.subject is not None:
            binding.subject = args.subject
        binding.ClearField("traffic")  # output only
        updated = client.call("UpdateBinding", policy_pb2.UpdateBindingRequest(
            binding=binding, expected_version=args.expected_version), policy_pb2.Binding)
    view = binding_view(updated)
    show(args, view, "\n".join(table_lines(view)))
    return EXIT_OK


def binding_spec(text: str) -> policy_pb2.Binding:
    """``PREFIX=ROLE[,ROLE...][@SUBJECT]`` -> a Binding (source set by the caller)."""
    prefix, equals, rest = text.partition("=")
    roles, _, subject = rest.partition("@")
    if not equals or not roles:
        raise argparse.ArgumentTypeError(f"expected PREFIX=ROLE[,ROLE...][@SUBJECT], "
                                         f"got {text!r}")
    return policy_pb2.Binding(prefix=prefix_arg(prefix), roles=role_names(roles),
                              subject=subject)


def cmd_binding_replace(args: argparse.Namespace) -> int:
    """ReplaceBindings: the bindings of one source become exactly the given ones."""
    if not args.binding and not args.empty:
        raise UsageError(f"no --binding given: add --empty to remove every binding of "
                         f"source {args.source!r}")
    if args.binding and args.empty:
        raise UsageError("--empty and --binding exclude each other")
    bindings = []
    for given in args.binding or []:
        binding = policy_pb2.Binding()
        binding.CopyFrom(given)
        binding.source = args.source
        bindings.append(binding)
    request = policy_pb2.ReplaceBindingsRequest(
        source=args.source, bindings=bindings, expected_version=args.expected_version,
        reason=args.reason or f"vpnctl binding replace --source {args.source}")
    with connect(args) as client:
        reply = client.call("ReplaceBindings", request, policy_pb2.ReplaceResponse)
    show(args, {"source": args.source, "bindings": len(bindings), "version": reply.version,
                "diff": diff_view(reply.diff)},
         "\n".join([f"replaced the bindings of source {args.source} "
                    f"({len(bindings)} now)", *diff_lines(reply.diff)]))
    return EXIT_OK


def cmd_binding_delete(args: argparse.Namespace) -> int:
    """DeleteBinding by prefix."""
    request = policy_pb2.DeleteBindingRequest(prefix=args.prefix,
                                              expected_version=args.expected_version)
    with connect(args) as client:
        reply = client.call("DeleteBinding", request, policy_pb2.DeleteResponse)
    return _deleted(args, "binding", args.prefix, reply)


# ------------------------------------------------------------------------------ zones

def cmd_zone_list(args: argparse.Namespace) -> int:
    """Every zone assignment (ListZones, all pages)."""
    with connect(args) as client:
        zones = client.list_all("ListZones", policy_pb2.ListZonesRequest(),
                                policy_pb2.ListZonesResponse, "zones", args.page_size)
    views = [zone_view(zone) for zone in zones]
    show(args, views, rows_text(views, "(no zones)"))
    return EXIT_OK


def cmd_zone_set(args: argparse.Namespace) -> int:
    """Create the zone assignment, or update it when the prefix already has one."""
    zone = policy_pb2.ZoneAssignment(prefix=args.prefix,
                                     zone=cast(codes_pb2.Zone, ZONES[args.zone]),
                                     description=args.description)
    with connect(args) as client:
        try:
            stored = client.call("CreateZone", policy_pb2.CreateZoneRequest(zone=zone),
                                 policy_pb2.ZoneAssignment)
        except RpcFailure as exc:
            if exc.code != "ALREADY_EXISTS":
                raise
            stored = client.call("UpdateZone", policy_pb2.UpdateZoneRequest(zone=zone),
                                 policy_pb2.ZoneAssignment)
    view = zone_view(stored)
    show(args, view, "\n".join(table_lines(view)))
    return EXIT_OK


def cmd_zone_get(args: argparse.Namespace) -> int:
    """GetZone by prefix."""
    with connect(args) as client:
        zone = client.call("GetZone", policy_pb2.GetZoneRequest(prefix=args.prefix),
                           policy_pb2.ZoneAssignment)
    view = zone_view(zone)
    show(args, view, "\n".join(table_lines(view)))
    return EXIT_OK


def cmd_zone_delete(args: argparse.Namespace) -> int:
    """DeleteZone by prefix."""
    request = policy_pb2.DeleteZoneRequest(prefix=args.prefix,
                                           expected_version=args.expected_version)
    with connect(args) as client:
        reply = client.call("DeleteZone", request, policy_pb2.DeleteResponse)
    return _deleted(args, "zone", args.prefix, reply)


# ----------------------------------------------------------------------- registration

def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register ``role``, ``rule``, ``binding`` and ``zone`` with their verbs."""
    role = add_group(commands, common, "role", "roles: list, get, create, update, delete", [
        "vpnctl role list", "vpnctl role create eng --description engineering",
        "vpnctl role get eng -o yaml"])
    verb = add_verb(role, common, "list", "every role with its rule count", [
        "vpnctl role list", "vpnctl role list -o json"], cmd_role_list)
    add_page_size(verb)
    verb = add_verb(role, common, "get", "one role and its rules", [
        "vpnctl role get eng", "vpnctl role get eng -o yaml"], cmd_role_get)
    verb.add_argument("name", metavar="NAME", help="role name")
    verb = add_verb(role, common, "create", "create a role without rules", [
        "vpnctl role create eng --description engineering"], cmd_role_create)
    verb.add_argument("name", metavar="NAME",
                      help="a-z, 0-9 and _.:- (at most 63), starting a-z or 0-9")
    verb.add_argument("--description", default="", metavar="TEXT", help="what it is for")
    verb = add_verb(role, common, "update", "change a role's description", [
        "vpnctl role update eng --description 'engineering, all sites'"], cmd_role_update)
    verb.add_argument("name", metavar="NAME", help="role name")
    verb.add_argument("--description", required=True, metavar="TEXT", help="what it is for")
    add_expected_version(verb)
    verb = add_verb(role, common, "delete", "delete a role and its rules", [
        "vpnctl role delete eng", "vpnctl role delete eng --expected-version 12"],
                    cmd_role_delete)
    verb.add_argument("name", metavar="NAME", help="role name")
    add_expected_version(verb)

    rule = add_group(commands, common, "rule", "rules of roles: list, get, add, update, delete", [
        "vpnctl rule list --role eng",
        "vpnctl rule add --role eng --action allow --protocol tcp --dst 10.2.0.0/24 "
        "--ports 22"])
    verb = add_verb(rule, common, "list", "every rule, or one role's", [
        "vpnctl rule list", "vpnctl rule list --role eng -o yaml"], cmd_rule_list)
    verb.add_argument("--role", default="", metavar="ROLE", help="only this role's rules")
    add_page_size(verb)
    verb = add_verb(rule, common, "add", "add a rule to a role", [
        "vpnctl rule add --role eng --action allow --protocol tcp --dst 10.2.0.0/24 "
        "--ports 22",
        "vpnctl rule add --role eng --action deny --dst 10.2.0.10/32 --priority 0 --id 99",
        "vpnctl rule add --role ops --action allow --protocol udp --ports 8000-8080"],
                    cmd_rule_add)
    verb.add_argument("--role", required=True, metavar="ROLE", help="owning role")
    verb.add_argument("--action", required=True, choices=tuple(ACTIONS))
    verb.add_argument("--protocol", choices=tuple(PROTOCOLS), default="any",
                      help="default: any")
    # default None, not "": argparse would run prefix_arg on a string default.
    verb.add_argument("--src", type=prefix_arg, metavar="CIDR",
                      help="source prefix (default: any)")
    verb.add_argument("--dst", type=prefix_arg, metavar="CIDR",
                      help="destination prefix (default: any)")
    verb.add_argument("--ports", type=ports_arg, default=(0, 0), metavar="N[-M]",
                      help="destination ports, tcp or udp only (default: any)")
    verb.add_argument("--priority", type=priority_arg, default=0, metavar="N",
                      help="0 ranks first when reporting the matched rule (default: 0)")
    verb.add_argument("--id", type=rule_id_arg, metavar="N",
                      help="rule id (default: policyd assigns one)")
    verb.add_argument("--description", default="", metavar="TEXT")
    verb = add_verb(rule, common, "get", "one rule by id", [
        "vpnctl rule get 10", "vpnctl rule get 10 -o yaml"], cmd_rule_get)
    verb.add_argument("id", type=rule_id_arg, metavar="ID", help="rule id")
    verb = add_verb(rule, common, "update", "change a rule (options not given stay)", [
        "vpnctl rule update 10 --ports 2222",
        "vpnctl rule update 10 --dst any --description 'ssh anywhere'",
        "vpnctl rule update 10 --action deny --expected-version 12"], cmd_rule_update)
    verb.add_argument("id", type=rule_id_arg, metavar="ID", help="rule id")
    verb.add_argument("--action", choices=tuple(ACTIONS))
    verb.add_argument("--protocol", choices=tuple(PROTOCOLS))
    verb.add_argument("--src", type=prefix_or_any, metavar="CIDR|any",
                      help="source prefix, or any")
    verb.add_argument("--dst", type=prefix_or_any, metavar="CIDR|any",
                      help="destination prefix, or any")
    verb.add_argument("--ports", type=ports_arg, metavar="N[-M]",
                      help="destination ports (tcp or udp only)")
    verb.add_argument("--priority", type=priority_arg, metavar="N")
    verb.add_argument("--description", metavar="TEXT")
    add_expected_version(verb)
    verb = add_verb(rule, common, "delete", "delete a rule by id", [
        "vpnctl rule delete 10", "vpnctl rule delete 10 --expected-version 12"],
                    cmd_rule_delete)
    verb.add_argument("id", type=rule_id_arg, metavar="ID", help="rule id")
    add_expected_version(verb)

    binding = add_group(commands, common, "binding",
                        "source prefixes and their roles: list, get, add, update, replace, "
                        "delete", [
                            "vpnctl binding list --role eng",
                            "vpnctl binding add 10.1.0.10/32 --roles eng,ops --subject alice"])
    verb = add_verb(binding, common, "list", "every binding, or those of a source or role", [
        "vpnctl binding list", "vpnctl binding list --source idpd",
        "vpnctl binding list --role eng -o json"], cmd_binding_list)
    verb.add_argument("--source", default="", metavar="SOURCE",
                      help='only bindings owned by SOURCE (e.g. "admin", "idpd")')
    verb.add_argument("--role", default="", metavar="ROLE", help="only bindings with ROLE")
    add_page_size(verb)
    verb = add_verb(binding, common, "add", "give a source prefix roles", [
        "vpnctl binding add 10.1.0.10/32 --roles eng --subject alice",
        "vpnctl binding add 10.1.5.0/24 --roles eng,ops"], cmd_binding_add)
    verb.add_argument("prefix", type=prefix_arg, metavar="PREFIX", help="source CIDR")
    verb.add_argument("--roles", type=role_names, required=True, metavar="ROLE[,ROLE...]")
    verb.add_argument("--subject", default="", metavar="WHO",
                      help="user or device the binding belongs to")
    verb = add_verb(binding, common, "get", "the binding of one prefix", [
        "vpnctl binding get 10.1.0.10/32", "vpnctl binding get 10.1.0.10 -o json"],
                    cmd_binding_get)
    verb.add_argument("prefix", type=prefix_arg, metavar="PREFIX", help="source CIDR")
    verb = add_verb(binding, common, "update", "new roles or subject for a prefix", [
        "vpnctl binding update 10.1.0.10/32 --roles eng,ops",
        "vpnctl binding update 10.1.0.10/32 --subject bob --expected-version 12"],
                    cmd_binding_update)
    verb.add_argument("prefix", type=prefix_arg, metavar="PREFIX", help="source CIDR")
    verb.add_argument("--roles", type=role_names, metavar="ROLE[,ROLE...]")
    verb.add_argument("--subject", metavar="WHO")
    add_expected_version(verb)
    verb = add_verb(binding, common, "replace",
                    "make the bindings of one source exactly these (ReplaceBindings)", [
                        "vpnctl binding replace --source admin "
                        "--binding 10.1.0.10/32=eng@alice --binding 10.1.5.0/24=eng,ops",
                        "vpnctl binding replace --source lab --empty"], cmd_binding_replace,
                    notes="Bindings of other sources are left alone; one policy version for "
                          "the whole change.")
    verb.add_argument("--source", required=True, metavar="SOURCE",
                      help='the owner whose bindings are replaced (e.g. "admin")')
    verb.add_argument("--binding", type=binding_spec, action="append",
                      metavar="PREFIX=ROLE[,ROLE...][@SUBJECT]",
                      help="one binding of the new set (repeat for more)")
    verb.add_argument("--empty", action="store_true",
                      help="remove every binding of the source")
    verb.add_argument("--reason", default="", metavar="TEXT",
                      help="why, for the audit log (default: the command)")
    add_expected_version(verb)
    verb = add_verb(binding, common, "delete", "delete the binding of a prefix", [
        "vpnctl binding delete 10.1.0.10/32"], cmd_binding_delete)
    verb.add_argument("prefix", type=prefix_arg, metavar="PREFIX", help="source CIDR")
    add_expected_version(verb)

    zone = add_group(commands, common, "zone", "zones of prefixes: list, get, set, delete", [
        "vpnctl zone list", "vpnctl zone set 10.2.0.0/16 vpn"])
    verb = add_verb(zone, common, "list", "every zone assignment", [
        "vpnctl zone list", "vpnctl zone list -o yaml"], cmd_zone_list)
    add_page_size(verb)
    verb = add_verb(zone, common, "set", "assign a prefix to a zone (create or update)", [
        "vpnctl zone set 10.2.0.0/16 vpn --description 'site B'",
        "vpnctl zone set 0.0.0.0/0 external"], cmd_zone_set)
    verb.add_argument("prefix", type=prefix_arg, metavar="PREFIX", help="CIDR")
    verb.add_argument("zone", choices=tuple(ZONES), metavar="ZONE",
                      help="one of " + ", ".join(ZONES))
    verb.add_argument("--description", default="", metavar="TEXT")
    verb = add_verb(zone, common, "get", "the zone assignment of one prefix", [
        "vpnctl zone get 10.2.0.0/16", "vpnctl zone get 10.2.0.0/16 -o yaml"], cmd_zone_get)
    verb.add_argument("prefix", type=prefix_arg, metavar="PREFIX", help="CIDR")
    verb = add_verb(zone, common, "delete", "delete the zone assignment of a prefix", [
        "vpnctl zone delete 10.2.0.0/16"], cmd_zone_delete)
    verb.add_argument("prefix", type=prefix_arg, metavar="PREFIX", help="CIDR")
    add_expected_version(verb)
