"""One TOML file per router, a section per daemon, validated strictly.

Every field is declared once in a frozen dataclass with a docstring-like ``doc``.
Unknown keys, wrong types, bad CIDRs and out-of-range values raise one
:class:`ConfigError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CONFIG = "/etc/vpnr/router.toml"
BINDING_MAP_HARD_LIMIT = 131072  # VPNR_MAX_BINDINGS (bpf/lib/maps.h): the binding id space

_INSTANCE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,23}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_PEER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_CLAIM_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")
_ROLE_RE = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,62}$")
_ASYMMETRIC_JWS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256",
                             "ES384", "ES512", "EdDSA"})
_SYSLOG_RE = re.compile(r"^(unix:/\S+|(udp|tcp)://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):"
                        r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}"
                        r"|655[0-2][0-9]|6553[0-5]))$")


class ConfigError(Exception):
    """A configuration file is unreadable or invalid; the message says where and why."""

    def __init__(self, file: str | Path, key: str, problem: str) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + problem)


def doc(text: str, check: str = "", default: Any = dataclasses.MISSING) -> Any:
    """Declare a config field with its documentation and an optional named check."""
    meta = {"doc": text, "check": check}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults")
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Settings shared by the four daemons of one router."""

    instance: str = doc("Router instance name: sockets, pins and state are named after it.",
                        "instance")
    run_dir: str = doc("Parent directory of the per-instance socket directory.",
                       "abspath", "/run/vpnr")
    state_dir: str = doc("Persistent state; empty means /var/lib/vpnr/<instance>.", "abspath?", "")
    bpffs_dir: str = doc("Parent of the per-instance pin directory on bpffs.", "abspath",
                         "/sys/fs/bpf/vpnr")
    admin_group: str = doc("Local group whose members may use the sockets.", "", "vpnr-admin")
    viewer_group: str = doc("Local group whose members may use the read-only viewer sockets.",
                            "", "vpnr-viewer")
    log_level: Literal["debug", "info", "warning", "error"] = doc("Log threshold.", "", "info")

    @property
    def socket_dir(self) -> Path:
        """Directory holding this instance's daemon sockets."""
        return Path(self.run_dir) / self.instance

    @property
    def state_path(self) -> Path:
        """Directory holding this instance's persistent state."""
        return Path(self.state_dir or f"/var/lib/vpnr/{self.instance}")

    @property
    def pin_dir(self) -> Path:
        """Directory on bpffs holding this instance's pinned programs, links and maps."""
        return Path(self.bpffs_dir) / self.instance

    def socket_path(self, daemon: str) -> Path:
        """Unix socket of one daemon of this instance."""
        return self.socket_dir / f"{daemon}.sock"

    def viewer_socket_path(self, daemon: str) -> Path:
        """Read-only Unix socket of one daemon of this instance (for the viewer group)."""
        return self.socket_dir / f"{daemon}-viewer.sock"


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """Mixin fields: where a daemon serves Prometheus metrics."""

    metrics_port: int = doc("Loopback TCP port for /metrics; 0 disables.", "port0", 0)
    metrics_address: str = doc("Address for /metrics; must be a loopback address.", "loopback",
                               "127.0.0.1")


@dataclass(frozen=True, kw_only=True)
class InterfaceConfig:
    """One interface policyd attaches its XDP program to."""

    name: str = doc("Interface name in the router's network namespace.", "ifname")
    zone: Literal["internal", "external"] = doc(
        "Zone of the network on this interface: internal (LAN) or external (WAN).")
    xdp_mode: Literal["native", "generic"] = doc("XDP attach mode.", "", "native")


@dataclass(frozen=True, kw_only=True)
class PolicydConfig(MetricsConfig):
    """policyd: the XDP RBAC program and the policy maps."""

    interfaces: tuple[InterfaceConfig, ...] = doc("Interfaces to enforce policy on.", "nonempty")
    mode: Literal["enforce", "monitor"] = doc(
        "enforce drops what the policy denies; monitor decides, counts and audits every "
        "packet but lets it pass (for rolling out a policy).", "", "enforce")
    infra_bypass: tuple[Literal["arp", "dhcp", "nd", "tunnel"], ...] = doc(
        "Infrastructure that passes without roles: ARP, DHCP (v4 and v6), ICMPv6 neighbour "
        "discovery (hop limit 255), and the tunnel port on external interfaces.", "",
        ("arp", "dhcp", "nd", "tunnel"))
    database: str = doc("SQLite file of the desired policy; relative paths are under the "
                        "state directory.", "path", "policy.db")
    audit_ring_mib: int = doc("Size of the audit ring buffer in MiB (a power of two).",
                              "pow2", 8)
    audit_allow_sample: int = doc("Audit one in N allowed packets; 0 audits no allowed "
                                  "packet (every denied one is audited).", "nonneg", 0)
    audit_events_per_second: int = doc("Audit events per second per role (token bucket).",
                                       "positive", 1000)
    audit_burst: int = doc("Audit events a role may send in one burst.", "positive", 1000)
    binding_map_entries: int = doc(
        "Starting size of each family's source-binding trie, in entries (both policy "
        "slots count). Above 80% full policyd grows it (double, copy, atomic swap).",
        "positive", 1024)
    binding_map_limit: int = doc(
        "Hard limit of bindings per address family in one policy (at most 131072); the "
        "trie may grow to twice this (both slots). A change beyond it is refused with "
        "RESOURCE_EXHAUSTED.", "positive", 131072)


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """A peer router: its static key and the prefixes behind it."""

    name: str = doc("Peer name.", "peername")
    public_key: str = doc("Base64 X25519 static public key (32 bytes).", "x25519")
    allowed_prefixes: tuple[str, ...] = doc("Prefixes behind the peer (cryptokey routing).",
                                            "cidrs")
    endpoint: str = doc("host:port of the peer; empty for responder-only peers.",
                        "endpoint?", "")
    keepalive_seconds: int = doc("Persistent keepalive interval; 0 disables.", "nonneg", 0)


@dataclass(frozen=True, kw_only=True)
class TunneldConfig(MetricsConfig):
    """tunneld: Noise XX sessions and the AF_XDP data path."""

    listen_port: int = doc("UDP port for tunnel messages.", "port", 51820)
    wan_interface: str = doc("Interface facing the underlay.", "ifname?", "")
    lan_interfaces: tuple[str, ...] = doc(
        "Interfaces whose VPN-zone traffic policyd redirects to tunneld (AF_XDP); empty: "
        "policyd's internal interfaces.", "", ())
    decap_interface: str = doc("TAP device through which decrypted packets enter the kernel "
                               "(TC ingress applies the RBAC).", "ifname", "vpnr0")
    wan_mtu: int = doc("MTU of the underlay path; 0 reads the WAN interface's.", "nonneg", 0)
    static_key_file: str = doc("This router's static key (JSON, 0600), created on first "
                               "start; relative paths are under the state directory.", "path",
                               "tunneld/static.key")
    peer_database: str = doc("SQLite file of peers and revoked keys; relative paths are "
                             "under the state directory.", "path", "tunneld/peers.sqlite")
    rekey_after_seconds: float = doc("Start a new handshake when a session is this old "
                                     "(WireGuard REKEY_AFTER_TIME).", "positive", 120.0)
    reject_after_seconds: float = doc("Never use a keypair older than this "
                                      "(REJECT_AFTER_TIME); must exceed rekey_after_seconds.",
                                      "positive", 180.0)
    rekey_after_messages: int = doc("Start a new handshake after this many messages.",
                                    "positive", 2**60)
    handshake_rate: int = doc("Handshake messages per second one source address may send "
                              "(enforced in XDP); 0 disables the limit.", "nonneg", 20)
    handshake_burst: int = doc("Handshake messages one source may send at once.", "positive",
                               40)
    cookie_threshold: int = doc("Half-done handshakes beyond which initiations must carry a "
                                "cookie (under load).", "positive", 64)
    peers: tuple[PeerConfig, ...] = doc("Peer routers.", "", ())


@dataclass(frozen=True, kw_only=True)
class JsonSinkConfig:
    """auditd's JSON lines file: one record per line, rotated by size and age."""

    enabled: bool = doc("Write the JSON lines file.", "", True)
    path: str = doc("File name; relative paths are under the state directory. Rotated files "
                    "get a .1, .2, ... suffix (.1 is the newest).", "path", "audit.jsonl")
    max_file_mib: int = doc("Rotate when the file reaches this size.", "positive", 100)
    rotate_seconds: int = doc("Rotate when the file is this old; 0 rotates by size only.",
                              "nonneg", 86400)
    keep_files: int = doc("Rotated files kept; older ones are deleted.", "positive", 10)
    buffer_records: int = doc("Records held while the file is slow; beyond this they are "
                              "dropped and counted.", "positive", 200000)


@dataclass(frozen=True, kw_only=True)
class SyslogSinkConfig:
    """auditd's syslog output: RFC 5424 messages, facility local0."""

    enabled: bool = doc("Send records to syslog.", "", False)
    target: str = doc("unix:/dev/log (the local syslog socket), udp://host:port or "
                      "tcp://host:port (RFC 6587 octet counting).", "syslog", "unix:/dev/log")
    hostname: str = doc("HOSTNAME field; empty uses this host's name.", "", "")
    buffer_records: int = doc("Records held while syslog is slow or away; beyond this they "
                              "are dropped and counted.", "positive", 100000)


@dataclass(frozen=True, kw_only=True)
class AuditdConfig(MetricsConfig):
    """auditd: ring buffer drain and sinks."""

    database: str = doc("SQLite catalog file; records live in chunk files in the directory "
                        "<name>.chunks beside it. Relative paths are under the state "
                        "directory.", "path", "audit.sqlite")
    batch_rows: int = doc("Most records written to SQLite in one transaction.", "positive",
                          50000)
    batch_interval_ms: int = doc("How long records may wait to be batched before they are "
                                 "committed (the latency bound of a quiet stream).", "nonneg", 2)
    max_buffered: int = doc("Records held in memory while SQLite falls behind (about 700 "
                            "bytes each); beyond this they are dropped and counted.",
                            "positive", 250000)
    chunk_rows: int = doc("Records per chunk file; a full chunk is sealed and indexed.",
                          "positive", 500000)
    chunk_seconds: int = doc("Seal the open chunk when its first record is this old.",
                             "positive", 3600)
    retention_days: float = doc("Delete chunks whose newest record is older than this.",
                                "positive", 30.0)
    max_disk_mib: int = doc("Delete the oldest chunks while the chunks take more than this; "
                            "0 means no size limit.", "nonneg", 0)
    follow_buffer: int = doc("Records queued for one Follow client; a client that falls this "
                             "far behind is cut off with the cursor to resume from.",
                             "positive", 10000)
    json: JsonSinkConfig = doc("JSON lines file sink.", "", JsonSinkConfig())
    syslog: SyslogSinkConfig = doc("Syslog sink.", "", SyslogSinkConfig())


@dataclass(frozen=True, kw_only=True)
class RoleMappingConfig:
    """One rule turning an IdP claim value into policy roles."""

    claim: str = doc("Claim (or SCIM attribute) holding the values: a string or a list of "
                     "strings, e.g. groups.", "claimname", "groups")
    match: Literal["exact", "prefix", "regex"] = doc(
        "How value is compared with each claim value (regex: Python syntax, whole value).",
        "", "exact")
    value: str = doc("The claim value, prefix or regular expression.", "nonblank")
    roles: tuple[str, ...] = doc("Roles given to an identity with a matching value.",
                                 "rolenames")


@dataclass(frozen=True, kw_only=True)
class IdpdConfig(MetricsConfig):
    """idpd: OIDC identity provider sync."""

    issuer: str = doc("OIDC issuer URL; empty means no IdP configured.", "url?", "")
    client_id: str = doc("OAuth client id of this router at the IdP.", "", "")
    client_secret_file: str = doc("File holding the client secret (mode 0600 or stricter); "
                                  "relative paths are under the state directory; empty for a "
                                  "public client.", "", "")
    scopes: tuple[str, ...] = doc("Scopes asked for at user login.", "",
                                  ("openid", "offline_access", "groups", "email", "profile"))
    allowed_algorithms: tuple[str, ...] = doc(
        "JWS algorithms accepted on ID and access tokens (asymmetric only).", "jwsalgs",
        ("RS256", "PS256", "ES256", "EdDSA"))
    redirect_uri: str = doc("Loopback redirect of the code + PKCE login (vpnctl listens on "
                            "it); must be registered at the IdP.", "loopbackurl",
                            "http://127.0.0.1:8765/callback")
    discovery_timeout_seconds: float = doc("Timeout for the discovery fetch.", "positive", 5.0)
    http_timeout_seconds: float = doc("Timeout of each request to the IdP.", "positive", 10.0)
    sync_interval_seconds: float = doc("Full sync period.", "positive", 300.0)
    sync_jitter: float = doc("Share of the period by which each sync is randomly moved "
                             "(0-0.5), so routers do not all call the IdP at once.", "share",
                             0.1)
    backoff_max_seconds: float = doc("Longest wait between retries after failed syncs "
                                     "(doubling from 1 s).", "positive", 300.0)
    refresh_margin_seconds: float = doc("Refresh a login's access token this long before it "
                                        "expires.", "nonneg", 60.0)
    max_delete_share: float = doc("A sync removing more than this share of the bindings is "
                                  "held until confirmed (vpnctl idp sync --confirm).", "share",
                                  0.3)
    guard_min_bindings: int = doc("The deletion guard applies once at least this many "
                                  "bindings are in force.", "nonneg", 10)
    token_key_file: str = doc("AES-256 key encrypting refresh tokens at rest (created 0600 "
                              "on first start); relative paths are under the state "
                              "directory.", "path", "idpd/token.key")
    database: str = doc("SQLite file of logins and the last good binding set; relative "
                        "paths are under the state directory.", "path", "idpd/idpd.sqlite")
    scim_base_url: str = doc("SCIM 2.0 base URL for directory sync (…/scim/v2); empty "
                             "disables it.", "url?", "")
    scim_scope: str = doc("Scope asked for with the client-credentials token for SCIM.", "",
                          "scim:read")
    scim_page_size: int = doc("Resources per SCIM page.", "positive", 500)
    scim_address_attribute: str = doc(
        "SCIM attribute holding a directory entry's addresses (extension URN, a colon, the "
        "attribute).", "nonblank",
        "urn:vpnr:params:scim:schemas:extension:device:2.0:User:ipAddresses")
    role_mappings: tuple[RoleMappingConfig, ...] = doc(
        "Claim value -> roles; an identity gets the union of every matching rule's roles.",
        "", ())


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole router configuration file."""

    router: RouterConfig = doc("Shared settings.")
    policyd: PolicydConfig = doc("policyd section.")
    tunneld: TunneldConfig = doc("tunneld section.", "", TunneldConfig())
    auditd: AuditdConfig = doc("auditd section.", "", AuditdConfig())
    idpd: IdpdConfig = doc("idpd section.", "", IdpdConfig())
    path: str = field(default="", metadata={"internal": True})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"an array of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, str(tp))


def _check(file: str, key: str, check: str, value: Any) -> None:
    """Apply a named semantic check; ``?`` suffix means the empty string is allowed."""
    if not check:
        return
    if check.endswith("?"):
        if value == "":
            return
        check = check[:-1]

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(file, key, f"expected {expected}, got {value!r}")

    if check == "instance" and not _INSTANCE_RE.fullmatch(value):
        fail("1-24 characters of a-z, 0-9, '_' or '-', starting with a letter or digit")
    elif check == "abspath" and not value.startswith("/"):
        fail("an absolute path")
    elif check == "path" and (not value or "\x00" in value):
        fail("a file path")
    elif check == "ifname" and not _IFNAME_RE.fullmatch(value):
        fail("an interface name (1-15 of A-Z a-z 0-9 _ . -)")
    elif check == "peername" and not _PEER_NAME_RE.fullmatch(value):
        fail("a peer name (a-z, 0-9, '_', '.', '-'; up to 63)")
    elif check == "port" and not 1 <= value <= 65535:
        fail("a port number 1-65535")
    elif check == "port0" and not 0 <= value <= 65535:
        fail("a port number 0-65535 (0 disables)")
    elif check == "nonneg" and value < 0:
        fail("a number >= 0")
    elif check == "positive" and value <= 0:
        fail("a number > 0")
    elif check == "pow2" and not (0 < value <= 1024 and value & (value - 1) == 0):
        fail("a power of two between 1 and 1024")
    elif check == "nonempty" and not value:
        fail("at least one entry")
    elif check == "loopback":
        try:
            if not ipaddress.ip_address(value).is_loopback:
                fail("a loopback address (metrics are never exposed off the host)")
        except ValueError:
            fail("an IP address")
    elif check == "cidrs":
        if not value:
            fail("at least one CIDR prefix")
        for i, prefix in enumerate(value):
            parse_cidr(file, f"{key}[{i}]", prefix)
    elif check == "x25519":
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            fail("base64 of a 32-byte X25519 public key")
        if len(raw) != 32:
            fail(f"base64 of a 32-byte X25519 public key (decoded {len(raw)} bytes)")
    elif check == "endpoint":
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            fail("host:port")
    elif check == "url" and not re.match(r"^https?://[^\s/]+", value):
        fail("an http(s) URL")
    elif check == "share" and not 0 <= value <= 1:
        fail("a share between 0 and 1")
    elif check == "nonblank" and not value.strip():
        fail("a non-empty string")
    elif check == "claimname" and not _CLAIM_RE.fullmatch(value):
        fail("a claim name (letters, digits, _ . : -)")
    elif check == "rolenames":
        if not value:
            fail("at least one role")
        for role in value:
            if not _ROLE_RE.fullmatch(role):
                fail(f"role names like eng or db-admin ({role!r} is not one)")
    elif check == "jwsalgs":
        if not value:
            fail("at least one algorithm")
        for alg in value:
            if alg not in _ASYMMETRIC_JWS:
                fail("asymmetric JWS algorithms among " + ", ".join(sorted(_ASYMMETRIC_JWS))
                     + f" ({alg!r} is not one: 'none' and shared-secret HS* are refused)")
    elif check == "loopbackurl":
        m = re.fullmatch(r"http://(127\.0\.0\.1|\[::1\]|localhost):(\d{1,5})(/\S*)", value)
        if not m or not 1 <= int(m.group(2)) <= 65535:
            fail("an http URL on 127.0.0.1, [::1] or localhost with a port and a path")
    elif check == "syslog" and not _SYSLOG_RE.fullmatch(value):
        fail("unix:/absolute/path, udp://host:port or tcp://host:port")


def parse_cidr(file: str, key: str, value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse a CIDR prefix strictly (no host bits set)."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(file, key, f"expected a CIDR prefix like 10.0.0.0/24, got {value!r}: "
                                     f"{exc}") from exc


def _convert(file: str, key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(file, key, f"expected a table, got {value!r}")
        return _build(file, key, tp, value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(file, f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
        return value
    # bool is a subclass of int in Python: reject it where a number is expected.
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(file, key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(file, key, f"expected a number, got {value!r}")
        return float(value)
    if tp in (str, bool) and not isinstance(value, tp):
        raise ConfigError(file, key, f"expected {_type_name(tp)}, got {value!r}")
    return value


def _build(file: str, section: str, cls: type[Any], table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        where = f"{section}.{unknown[0]}" if section else unknown[0]
        raise ConfigError(file, where, "unknown key (known: " + ", ".join(sorted(fields)) + ")")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{section}.{name}" if section else name
        if name not in table:
            if f.default is dataclasses.MISSING:
                raise ConfigError(file, key, f"missing required key ({_type_name(hints[name])})")
            continue
        value = _convert(file, key, hints[name], table[name])
        _check(file, key, f.metadata.get("check", ""), value)
        kwargs[name] = value
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    file = cfg.path
    names = [i.name for i in cfg.policyd.interfaces]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(file, f"policyd.interfaces[{i}].name",
                              f"interface {name!r} is listed twice")
    peers = [p.name for p in cfg.tunneld.peers]
    for i, name in enumerate(peers):
        if peers.index(name) != i:
            raise ConfigError(file, f"tunneld.peers[{i}].name", f"peer {name!r} is listed twice")
    for i, mapping in enumerate(cfg.idpd.role_mappings):
        if mapping.match == "regex":
            try:
                re.compile(mapping.value)
            except re.error as exc:
                raise ConfigError(file, f"idpd.role_mappings[{i}].value",
                                  f"not a valid regular expression: {exc}") from exc
    if cfg.policyd.binding_map_limit > BINDING_MAP_HARD_LIMIT:
        raise ConfigError(file, "policyd.binding_map_limit",
                          f"at most {BINDING_MAP_HARD_LIMIT} (the binding id space of the "
                          "XDP program)")
    if cfg.policyd.binding_map_entries > 2 * cfg.policyd.binding_map_limit:
        raise ConfigError(file, "policyd.binding_map_entries",
                          f"{cfg.policyd.binding_map_entries} exceeds twice "
                          f"policyd.binding_map_limit ({cfg.policyd.binding_map_limit}), "
                          "the most the trie may hold")
    if cfg.idpd.issuer and not cfg.idpd.client_id:
        raise ConfigError(file, "idpd.client_id", "required when idpd.issuer is set")
    ports: dict[int, str] = {}
    for daemon in ("policyd", "tunneld", "auditd", "idpd"):
        port = getattr(cfg, daemon).metrics_port
        if port and port in ports:
            raise ConfigError(file, f"{daemon}.metrics_port",
                              f"port {port} is already used by {ports[port]}.metrics_port")
        if port:
            ports[port] = daemon


def parse_config(text: str, path: str | Path = "<string>") -> Config:
    """Validate TOML text into a :class:`Config`; raises :class:`ConfigError`."""
    file = str(path)
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"not valid TOML: {exc}") from exc
    cfg = _build(file, "", Config, table)
    cfg = dataclasses.replace(cfg, path=file)
    _cross_checks(cfg)
    return typing.cast(Config, cfg)


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises :class:`ConfigError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not UTF-8 text: {exc}") from exc
    return parse_config(text, path)


def describe(cls: type[Any] = Config, section: str = "") -> list[str]:
    """Reference lines for every key (used by `--help-config` and docs)."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{section}.{f.name}" if section else f.name
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines.append(f"[{key}]  {f.metadata.get('doc', '')}")
            lines.extend(describe(tp, key))
            continue
        default = "" if f.default is dataclasses.MISSING else f" (default {f.default!r})"
        lines.append(f"  {key}: {_type_name(tp)}{default}. {f.metadata.get('doc', '')}")
    return lines

