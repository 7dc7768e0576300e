"""Policy files: TOML and YAML round trips, and every problem named by its place (pure)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vpnr.v1 import codes_pb2 as codes
from vpnr.v1 import policy_pb2
from vpnr.vpnctl.policy_terms import parse_ports
from vpnr.vpnctl.policyfile import (
    DecisionTest,
    PolicyFileError,
    dump,
    dumps,
    format_of,
    load,
    loads,
)

CANONICAL_TOML = '''\
[[roles]]
name = "eng"
description = "engineering"

  [[roles.rules]]
  id = 10
  priority = 0
  action = "allow"
  protocol = "tcp"
  dst = "10.2.0.0/24"
  ports = "22"
  description = "ssh"

  [[roles.rules]]
  id = 11
  priority = 5
  action = "deny"
  protocol = "udp"
  src = "10.1.0.0/16"
  dst = "10.2.0.0/16"
  ports = "8000-8080"

[[roles]]
name = "ops.v6"

  [[roles.rules]]
  id = 20
  priority = 1
  action = "allow"
  protocol = "icmpv6"
  dst = "fd00:2::/64"

[[roles]]
name = "empty"

[[bindings]]
prefix = "10.1.0.10/32"
roles = ["eng"]
subject = "alice"

[[bindings]]
prefix = "fd00:1::/64"
roles = ["ops.v6", "eng"]
source = "idpd"
expires_at = "2030-01-31T12:00:00Z"

[[zones]]
prefix = "10.2.0.0/16"
zone = "vpn"
description = "site B"

[[zones]]
prefix = "0.0.0.0/0"
zone = "external"

[[tests]]
name = "alice ssh to site B"
src = "10.1.0.10"
dst = "10.2.0.5"
protocol = "tcp"
dst_port = 22
expect = "allow"
expect_reason = "rule_allow"
expect_rule = 10

[[tests]]
name = "v6 ping"
src = "fd00:1::5"
dst = "fd00:2::1"
protocol = "icmpv6"
icmp_type = 128
interface = "lan0"
fragment = true
expect = "redirect"
'''


def problems(text: str, fmt: str = "toml", source: str = "policy.toml") -> list[str]:
    """The problems a file's text is refused with (fails when it is accepted)."""
    with pytest.raises(PolicyFileError) as refused:
        loads(text, fmt, source)
    return refused.value.problems


# ------------------------------------------------------------------------- round trips

def test_toml_round_trip_is_byte_stable() -> None:
    loaded = loads(CANONICAL_TOML, "toml", "policy.toml")
    assert dumps(loaded.policy, loaded.tests) == CANONICAL_TOML


def test_yaml_round_trip_is_stable_and_matches_toml() -> None:
    from_toml = loads(CANONICAL_TOML, "toml", "policy.toml")
    yaml_text = dumps(from_toml.policy, from_toml.tests, "yaml")
    from_yaml = loads(yaml_text, "yaml", "policy.yaml")
    assert dumps(from_yaml.policy, from_yaml.tests, "yaml") == yaml_text
    assert from_yaml.policy == from_toml.policy
    assert from_yaml.tests == from_toml.tests
    assert dumps(from_yaml.policy, from_yaml.tests) == CANONICAL_TOML
    assert "ports: '22'" in yaml_text  # a string, not the integer 22


def test_file_maps_to_the_policy_document() -> None:
    loaded = loads(CANONICAL_TOML, "toml", "policy.toml")
    eng = loaded.policy.roles[0]
    assert (eng.name, eng.description, len(eng.rules)) == ("eng", "engineering", 2)
    assert eng.rules[0] == policy_pb2.Rule(
        id=10, role="eng", priority=0, action=policy_pb2.ACTION_ALLOW,
        protocol=codes.PROTOCOL_TCP, dst_prefix="10.2.0.0/24", dst_port_from=22,
        dst_port_to=22, description="ssh")
    assert (eng.rules[1].dst_port_from, eng.rules[1].dst_port_to) == (8000, 8080)
    assert loaded.policy.roles[1].rules[0].role == "ops.v6"
    binding = loaded.policy.bindings[1]
    assert (binding.source, list(binding.roles)) == ("idpd", ["ops.v6", "eng"])
    assert binding.expires_at.ToJsonString() == "2030-01-31T12:00:00Z"
    assert not loaded.policy.bindings[0].HasField("expires_at")
    assert loaded.policy.zones[0].zone == codes.ZONE_VPN
    assert loaded.policy.version == 0
    assert loaded.tests[0] == DecisionTest(
        name="alice ssh to site B", src="10.1.0.10", dst="10.2.0.5",
        protocol=codes.PROTOCOL_TCP, expect=codes.VERDICT_ALLOW, dst_port=22,
        expect_reason=codes.REASON_RULE_ALLOW, expect_rule=10)
    assert loaded.tests[1].fragment and loaded.tests[1].icmp_type == 128


def test_export_of_a_served_document_leaves_out_what_the_server_assigns() -> None:
    served = loads(CANONICAL_TOML, "toml", "policy.toml").policy
    served.version = 42
    served.updated_at.FromJsonString("2025-01-01T00:00:00Z")
    served.roles[0].id = 3  # kernel role index: policyd's, never the file's
    text = dumps(served)
    assert "42" not in text and "2025" not in text
    again = loads(text, "toml", "export.toml").policy
    served.ClearField("version")
    served.ClearField("updated_at")
    served.roles[0].id = 0
    assert again == served


def test_lenient_input_is_written_canonically_and_then_stable() -> None:
    text = '''
[[roles]]
name = "eng"
rules = [{id = 1, action = "allow", protocol = "tcp", dst = "10.2.0.5", ports = 443, src = ""}]
[[bindings]]
prefix = "fd00:0:0::/48"
roles = ["eng"]
expires_at = 2030-01-31T13:00:00+01:00
'''
    first = dumps(loads(text, "toml", "p.toml").policy)
    assert 'dst = "10.2.0.5/32"' in first
    assert 'ports = "443"' in first
    assert "src" not in first
    assert 'prefix = "fd00::/48"' in first
    assert 'expires_at = "2030-01-31T12:00:00Z"' in first
    assert dumps(loads(first, "toml", "p.toml").policy) == first


@pytest.mark.parametrize("fmt", ["toml", "yaml"])
def test_strings_with_quotes_controls_and_unicode_survive(fmt: str) -> None:
    awkward = 'say "hi"\\ \t tab\nnew line \x01 \x7f caf\u00e9 \u2603'
    policy = policy_pb2.PolicyDocument(roles=[policy_pb2.Role(
        name="eng", description=awkward, rules=[policy_pb2.Rule(
            id=1, role="eng", action=policy_pb2.ACTION_DENY, description=awkward)])])
    text = dumps(policy, fmt=fmt)
    assert loads(text, fmt, f"p.{fmt}").policy == policy


def test_empty_file_is_an_empty_policy_and_comments_are_ignored() -> None:
    for fmt in ("toml", "yaml"):
        empty = loads("", fmt, "p")
        assert empty.policy == policy_pb2.PolicyDocument() and empty.tests == []
    assert dumps(policy_pb2.PolicyDocument()) == ""
    assert dumps(policy_pb2.PolicyDocument(), fmt="yaml") == "{}\n"
    policy = loads(CANONICAL_TOML, "toml", "p.toml").policy
    for fmt in ("toml", "yaml"):
        text = dumps(policy, fmt=fmt, comment="exported from version 7\nsecond line")
        assert text.startswith("# exported from version 7\n# second line\n\n")
        assert loads(text, fmt, "p").policy == policy


def test_files_by_extension_written_atomically_keeping_the_mode(tmp_path: Path) -> None:
    loaded = loads(CANONICAL_TOML, "toml", "policy.toml")
    for name in ("p.toml", "p.yaml", "p.YML"):
        dump(tmp_path / name, loaded.policy, loaded.tests)
        again = load(tmp_path / name)
        assert (again.policy, again.tests) == (loaded.policy, loaded.tests)
    assert (tmp_path / "p.toml").read_text() == CANONICAL_TOML
    assert (tmp_path / "p.yaml").read_text().startswith("roles:\n- name: eng\n")
    os.chmod(tmp_path / "p.toml", 0o640)
    dump(tmp_path / "p.toml", loaded.policy)
    assert stat.S_IMODE((tmp_path / "p.toml").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert format_of("x.yml") == "yaml"
    with pytest.raises(PolicyFileError, match=r"p\.json: cannot tell the format"):
        load(tmp_path / "p.json")
    with pytest.raises(PolicyFileError, match=r"missing\.toml: cannot read: No such file"):
        load(tmp_path / "missing.toml")
    with pytest.raises(PolicyFileError, match="cannot write"):
        dump(tmp_path / "no" / "such" / "dir.toml", loaded.policy)


def test_parse_ports() -> None:
    assert parse_ports("22") == (22, 22)
    assert parse_ports(" 8000-8080 ") == (8000, 8080)
    assert parse_ports("") == (0, 0)
    for bad in ("0", "70000", "22-10", "a", "1-", "-5", "1-2-3"):
        with pytest.raises(ValueError, match="expected \"N\" or \"N-M\""):
            parse_ports(bad)


def test_decision_test_request_and_mismatches() -> None:
    test = loads(CANONICAL_TOML, "toml", "p.toml").tests[0]
    request = test.request()
    assert (request.src, request.dst, request.protocol, request.dst_port) == (
        "10.1.0.10", "10.2.0.5", codes.PROTOCOL_TCP, 22)
    allowed = policy_pb2.Decision(verdict=codes.VERDICT_ALLOW, reason=codes.REASON_RULE_ALLOW,
                                  matched_rule=policy_pb2.Rule(id=10))
    assert test.mismatches(allowed) == []
    denied = policy_pb2.Decision(verdict=codes.VERDICT_DENY, reason=codes.REASON_NO_ROLE)
    assert test.mismatches(denied) == ["verdict deny, expected allow",
                                       "reason no_role, expected rule_allow",
                                       "rule none, expected 10"]
    other_rule = policy_pb2.Decision(verdict=codes.VERDICT_ALLOW,
                                     reason=codes.REASON_RULE_ALLOW,
                                     matched_rule=policy_pb2.Rule(id=11))
    assert test.mismatches(other_rule) == ["rule 11, expected 10"]


# ------------------------------------------------------------------------- bad input

RULE = '[[roles]]\nname = "eng"\n[[roles.rules]]\nid = 1\naction = "allow"\n'
BINDING = '[[bindings]]\nprefix = "10.1.0.0/24"\nroles = ["eng"]\n'
TEST = ('[[tests]]\nname = "t"\nsrc = "10.1.0.1"\ndst = "10.2.0.1"\nprotocol = "tcp"\n'
        'expect = "allow"\n')

BAD_TOML = [
    ("unknown top-level key", 'rolez = []\n',
     'policy.toml: rolez: unknown key (did you mean "roles"?)'),
    ("unknown key, no close match", RULE + 'colour = "red"\n',
     "policy.toml: roles[0].rules[0].colour: unknown key (expected one of: action, "
     "description, dst, id, ports, priority, protocol, src)"),
    ("misspelt key", '[[roles]]\nname = "eng"\ndescripton = "x"\n',
     'policy.toml: roles[0].descripton: unknown key (did you mean "description"?)'),
    ("port out of range", RULE + 'protocol = "tcp"\nports = "70000"\n',
     'policy.toml: roles[0].rules[0].ports: expected "N" or "N-M" with '
     '1 <= N <= M <= 65535, got "70000"'),
    ("reversed port range", RULE + 'protocol = "tcp"\nports = "22-10"\n',
     'policy.toml: roles[0].rules[0].ports: expected "N" or "N-M" with '
     '1 <= N <= M <= 65535, got "22-10"'),
    ("ports without tcp or udp", RULE + 'protocol = "icmp"\nports = "22"\n',
     'policy.toml: roles[0].rules[0].ports: a port range needs protocol "tcp" or "udp", '
     'got "icmp"'),
    ("ports of the wrong type", RULE + 'protocol = "tcp"\nports = [22]\n',
     'policy.toml: roles[0].rules[0].ports: expected "N" or "N-M" with 1 <= N <= M <= 65535, '
     "got a list"),
    ("id of the wrong type", '[[roles]]\nname = "eng"\n[[roles.rules]]\nid = "10"\n'
                             'action = "allow"\n',
     'policy.toml: roles[0].rules[0].id: expected an integer from 1 to 4294967295, '
     'got string "10"'),
    ("id zero", '[[roles]]\nname = "eng"\n[[roles.rules]]\nid = 0\naction = "allow"\n',
     "policy.toml: roles[0].rules[0].id: expected an integer from 1 to 4294967295, got 0"),
    ("missing action", '[[roles]]\nname = "eng"\n[[roles.rules]]\nid = 1\n',
     'policy.toml: roles[0].rules[0].action: missing (expected "allow" or "deny")'),
    ("unknown action", '[[roles]]\nname = "eng"\n[[roles.rules]]\nid = 1\n'
                       'action = "permit"\n',
     'policy.toml: roles[0].rules[0].action: expected "allow" or "deny", '
     'got string "permit"'),
    ("unknown protocol", RULE + 'protocol = "sctp"\n',
     'policy.toml: roles[0].rules[0].protocol: expected one of "any", "tcp", "udp", '
     '"icmp", "icmpv6", got string "sctp"'),
    ("prefix with host bits", RULE + 'dst = "10.2.0.5/24"\n',
     'policy.toml: roles[0].rules[0].dst: "10.2.0.5/24" has host bits set '
     '(the prefix would be "10.2.0.0/24")'),
    ("not a prefix", RULE + 'src = "10.2.0.0/33"\n',
     'policy.toml: roles[0].rules[0].src: expected a CIDR prefix such as "10.2.0.0/24", '
     'got "10.2.0.0/33"'),
    ("families mixed", RULE + 'src = "10.0.0.0/8"\ndst = "fd00::/64"\n',
     "policy.toml: roles[0].rules[0].dst: src and dst mix IPv4 and IPv6: a rule matches "
     "one family"),
    ("icmp with an IPv6 prefix", RULE + 'protocol = "icmp"\ndst = "fd00::/64"\n',
     'policy.toml: roles[0].rules[0].protocol: "icmp" with an IPv6 prefix (use "icmpv6")'),
    ("rule id used twice", RULE + '[[roles]]\nname = "ops"\n[[roles.rules]]\nid = 1\n'
                                  'action = "deny"\n',
     "policy.toml: roles[1].rules[0].id: rule id 1 is already used by roles[0].rules[0]"),
    ("role defined twice", '[[roles]]\nname = "eng"\n[[roles]]\nname = "eng"\n',
     'policy.toml: roles[1].name: role "eng" is already defined at roles[0]'),
    ("bad role name", '[[roles]]\nname = "Eng team"\n',
     "policy.toml: roles[0].name: expected a-z, 0-9 and _.:- (at most 63 characters, "
     'starting a-z or 0-9), got "Eng team"'),
    ("too many rules", '[[roles]]\nname = "eng"\n' + "".join(
        f'[[roles.rules]]\nid = {n}\naction = "allow"\n' for n in range(1, 34)),
     "policy.toml: roles[0].rules: 33 rules, a role has at most 32"),
    ("roles not an array", "roles = 1\n",
     "policy.toml: roles: expected an array of tables, got integer 1"),
    ("rule not a table", '[[roles]]\nname = "eng"\nrules = ["allow all"]\n',
     'policy.toml: roles[0].rules[0]: expected a table, got string "allow all"'),
    ("binding to an unknown role", RULE + BINDING.replace('"eng"', '"engg"'),
     'policy.toml: bindings[0].roles[0]: unknown role "engg" (roles defined in this file: '
     "eng)"),
    ("binding without roles", RULE + '[[bindings]]\nprefix = "10.1.0.0/24"\nroles = []\n',
     "policy.toml: bindings[0].roles: expected a non-empty list of role names, got an "
     "empty list"),
    ("binding role listed twice", RULE + BINDING.replace('["eng"]', '["eng", "eng"]'),
     'policy.toml: bindings[0].roles[1]: role "eng" is listed twice'),
    ("binding with too many roles", "".join(
        f'[[roles]]\nname = "r{n}"\n' for n in range(17)) + '[[bindings]]\n'
        'prefix = "10.1.0.0/24"\nroles = [' + ", ".join(f'"r{n}"' for n in range(17)) + "]\n",
     "policy.toml: bindings[0].roles: 17 roles, a binding has at most 16"),
    ("prefix bound twice", RULE + BINDING
     + '[[bindings]]\nprefix = "10.1.0.0/24"\nroles = ["eng"]\n',
     "policy.toml: bindings[1].prefix: prefix 10.1.0.0/24 is already bound at bindings[0]"),
    ("missing binding prefix", RULE + '[[bindings]]\nroles = ["eng"]\n',
     "policy.toml: bindings[0].prefix: missing (expected a CIDR prefix)"),
    ("expiry that is not a time", RULE + BINDING + 'expires_at = "tomorrow"\n',
     'policy.toml: bindings[0].expires_at: expected an RFC 3339 time with an offset, such as '
     '"2030-01-31T12:00:00Z", got "tomorrow"'),
    ("expiry without offset", RULE + BINDING + "expires_at = 2030-01-31T12:00:00\n",
     "policy.toml: bindings[0].expires_at: 2030-01-31T12:00:00 has no UTC offset (expected "
     'an RFC 3339 time with an offset, such as "2030-01-31T12:00:00Z")'),
    ("unknown zone", '[[zones]]\nprefix = "10.2.0.0/16"\nzone = "dmz"\n',
     'policy.toml: zones[0].zone: expected one of "internal", "vpn", "external", '
     'got string "dmz"'),
    ("zone given twice", '[[zones]]\nprefix = "10.2.0.0/16"\nzone = "vpn"\n'
                         '[[zones]]\nprefix = "10.2.0.0/16"\nzone = "internal"\n',
     "policy.toml: zones[1].prefix: prefix 10.2.0.0/16 already has a zone at zones[0]"),
    ("test without a source", TEST.replace('src = "10.1.0.1"\n', ""),
     "policy.toml: tests[0].src: missing (expected an IPv4 or IPv6 address)"),
    ("test with a bad address", TEST.replace("10.1.0.1", "10.1.0.300"),
     'policy.toml: tests[0].src: expected an IPv4 or IPv6 address such as "10.2.0.5", '
     'got "10.1.0.300"'),
    ("test across families", TEST.replace("10.2.0.1", "fd00::1"),
     "policy.toml: tests[0].dst: src is IPv4 and dst is IPv6"),
    ("test port without tcp or udp", TEST.replace('"tcp"', '"icmp"') + "dst_port = 22\n",
     'policy.toml: tests[0].dst_port: ports need protocol "tcp" or "udp", got "icmp"'),
    ("test port out of range", TEST + "dst_port = 65536\n",
     "policy.toml: tests[0].dst_port: expected an integer from 0 to 65535, got 65536"),
    ("test icmp type without icmp", TEST + "icmp_type = 8\n",
     'policy.toml: tests[0].icmp_type: needs protocol "icmp" or "icmpv6", got "tcp"'),
    ("test unknown verdict", TEST.replace('expect = "allow"', 'expect = "pass"'),
     'policy.toml: tests[0].expect: expected one of "allow", "deny", "redirect", '
     'got string "pass"'),
    ("test unknown reason", TEST + 'expect_reason = "because"\n',
     'policy.toml: tests[0].expect_reason: expected one of "rule_allow", "rule_deny", '
     '"default_deny", "no_role", "infra_bypass", "zone_external", "malformed_l2", '
     '"malformed_l3", "malformed_l4", "ipv6_ext_limit", "unsupported_ethertype", '
     '"tunnel_no_socket", "tunnel_redirect", "tunnel_unknown_session", '
     '"handshake_rate_limit", "not_enforced", "map_error", got string "because"'),
    ("test fragment not a boolean", TEST + 'fragment = "yes"\n',
     'policy.toml: tests[0].fragment: expected true or false, got string "yes"'),
    ("test named twice", TEST + TEST,
     'policy.toml: tests[1].name: test "t" is already defined at tests[0]'),
    ("test without expectation", TEST.replace('expect = "allow"\n', ""),
     'policy.toml: tests[0].expect: missing (expected one of "allow", "deny", "redirect")'),
    ("not TOML", "[[roles]\n",
     "policy.toml: not valid TOML: Expected ']]' at the end of an array declaration "
     "(at line 1, column 8)"),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in BAD_TOML],
                         ids=[case[0] for case in BAD_TOML])
def test_bad_toml_names_the_place(text: str, expected: str) -> None:
    assert expected in problems(text)


BAD_YAML = [
    ("key given twice", "roles:\n- name: a\n  name: b\n",
     "policy.yaml: not valid YAML: line 3, column 3: while reading a mapping found the key "
     "'name' twice (first on line 2)"),
    ("syntax error", "roles: [\n",
     "policy.yaml: not valid YAML: line 2, column 1: while parsing a flow node expected the "
     "node content, but found '<stream end>'"),
    ("top level not a mapping", "- 1\n",
     "policy.yaml: top level: expected a mapping, got a list"),
    ("roles a mapping", "roles: {name: eng}\n",
     "policy.yaml: roles: expected a list, got a mapping"),
    ("YAML 1.1 boolean for a string", "roles:\n- name: eng\n  description: no\n",
     "policy.yaml: roles[0].description: expected a string, got boolean false"),
    ("float port", "roles:\n- name: eng\n  rules:\n  - {id: 1, action: allow, protocol: tcp,"
                   " ports: 22.5}\n",
     'policy.yaml: roles[0].rules[0].ports: expected "N" or "N-M" with 1 <= N <= M <= 65535, '
     "got float 22.5"),
    ("date without time", "roles: [{name: eng}]\nbindings:\n- prefix: 10.1.0.0/24\n"
                          "  roles: [eng]\n  expires_at: 2030-01-31\n",
     'policy.yaml: bindings[0].expires_at: expected an RFC 3339 time with an offset, such as '
     '"2030-01-31T12:00:00Z", got date/time 2030-01-31'),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in BAD_YAML],
                         ids=[case[0] for case in BAD_YAML])
def test_bad_yaml_names_the_place(text: str, expected: str) -> None:
    assert expected in problems(text, "yaml", "policy.yaml")


def test_every_problem_is_reported_at_once() -> None:
    text = ('[[roles]]\nname = "Bad"\n[[roles.rules]]\nid = 0\naction = "x"\n'
            '[[zones]]\nprefix = "nope"\nzone = "vpn"\n' + TEST + 'extra = 1\n')
    found = problems(text)
    assert [line.split(": ")[1] for line in found] == [
        "roles[0].name", "roles[0].rules[0].id", "roles[0].rules[0].action",
        "zones[0].prefix", "tests[0].extra"]
    assert all(line.startswith("policy.toml: ") for line in found)


def test_problem_list_is_capped() -> None:
    text = "".join(f'[[zones]]\nprefix = "bad{n}"\nzone = "vpn"\n' for n in range(80))
    found = problems(text)
    assert len(found) == 51
    assert found[-1] == "policy.toml: ... and 30 more problems"
