"""The two-site lab's topology: names and addresses, as data.

    site A hosts --- a-sw (bridge) --- lan0 [a-rtr] wan0 ---+
                                                            ul (underlay bridge, IdP)
    site B hosts --- b-sw (bridge) --- lan0 [b-rtr] wan0 ---+

Every namespace name starts with the lab name, so two labs (or two test runs) never collide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
UNDERLAY_V4 = "198.51.100.0/24"     # TEST-NET-2: only ever inside the lab's namespaces
IDP_ADDRESS = "198.51.100.254"
IDP_PORT = 9000
METRICS_PORTS = {"policyd": 9101, "tunneld": 9102, "auditd": 9103, "idpd": 9104}
DAEMONS = ("policyd", "tunneld", "auditd", "idpd")
IDP_CLIENT_ID = "vpnr-idpd"
IDP_HTTP_TIMEOUT = 3.0          # seconds: the IdP is one bridge away
IDP_SYNC_INTERVAL = 300.0       # idpd's default; tests and the demo sync on demand
# The lab IdP's groups -> the lab policy's roles (services/lab/policy.py defines them).
IDP_ROLE_MAPPINGS = (("eng", "eng"), ("sales", "sales"), ("printers", "printers"))
PRINTER_HOST = 50               # the printer of each site (deploy/idp/lab-data.json): 10.x.0.50


@dataclass(frozen=True)
class Site:
    """One site: its router, switch, hosts and addresses."""

    letter: str          # "a" or "b"
    index: int           # 1 or 2: used in every address of the site
    lab: LabSpec

    @property
    def instance(self) -> str:
        """The router's vpnr instance name."""
        return f"{self.lab.instance_prefix}{self.letter}"

    @property
    def router_ns(self) -> str:
        """Network namespace of the router."""
        return f"{self.lab.name}-{self.letter}-rtr"

    @property
    def switch_ns(self) -> str:
        """Network namespace of the site's LAN switch (a bridge)."""
        return f"{self.lab.name}-{self.letter}-sw"

    def host_ns(self, n: int) -> str:
        """Network namespace of site host ``n`` (1-based)."""
        return f"{self.lab.name}-{self.letter}-h{n}"

    @property
    def host_namespaces(self) -> list[str]:
        """Every host namespace of the site."""
        return [self.host_ns(n) for n in range(1, self.lab.hosts_per_site + 1)]

    @property
    def lan_v4(self) -> str:
        """The site's IPv4 LAN prefix."""
        return f"10.{self.index}.0.0/24"

    @property
    def lan_v6(self) -> str:
        """The site's IPv6 LAN prefix (ULA)."""
        return f"fd00:{self.index}::/64"

    @property
    def router_lan_v4(self) -> str:
        """Router's LAN address."""
        return f"10.{self.index}.0.1"

    @property
    def router_lan_v6(self) -> str:
        """Router's LAN IPv6 address."""
        return f"fd00:{self.index}::1"

    def host_v4(self, n: int) -> str:
        """Address of host ``n``."""
        return f"10.{self.index}.0.{9 + n}"

    def host_v6(self, n: int) -> str:
        """IPv6 address of host ``n``."""
        return f"fd00:{self.index}::{9 + n:x}"

    @property
    def printer_v4(self) -> str:
        """The site's printer, a directory device of the lab IdP (no lab host uses it)."""
        return f"10.{self.index}.0.{PRINTER_HOST}"

    @property
    def printer_v6(self) -> str:
        """The printer's IPv6 address (as written in lab-data.json: ``::50``)."""
        return f"fd00:{self.index}::{PRINTER_HOST}"

    @property
    def router_wan_v4(self) -> str:
        """Router's underlay address."""
        return f"198.51.100.{self.index}"

    @property
    def config_path(self) -> Path:
        """The router's TOML file."""
        return self.lab.lab_dir / f"{self.instance}.toml"

    @property
    def state_dir(self) -> Path:
        """The router's state directory."""
        return self.lab.lab_dir / "state" / self.instance

    @property
    def idp_secret_path(self) -> Path:
        """idpd's client secret at the lab IdP (written 0600 by `up`)."""
        return self.state_dir / "idpd" / "client.secret"

    @property
    def log_dir(self) -> Path:
        """Where the router's daemons write their logs."""
        return self.lab.lab_dir / "logs" / self.instance


@dataclass(frozen=True)
class LabSpec:
    """A lab: its name, where it keeps its files, and its size."""

    name: str = "vpnr"
    instance_prefix: str = ""
    hosts_per_site: int = 2
    base_dir: Path = Path("/var/lib/vpnr-lab")
    run_dir: Path = Path("/run/vpnr")
    bpffs_dir: Path = Path("/sys/fs/bpf/vpnr")
    admin_group: str = "vpnr-admin"
    with_idp: bool = True
    syslog: bool = False   # auditd sends syslog to a Unix socket per site (syslog_socket)

    def __post_init__(self) -> None:
        if not LAB_NAME_RE.fullmatch(self.name):
            raise ValueError(f"lab name {self.name!r}: expected 1-12 of a-z0-9, "
                             "starting with a letter")
        if not 1 <= self.hosts_per_site <= 8:
            raise ValueError("hosts_per_site: expected 1-8")

    @property
    def lab_dir(self) -> Path:
        """Every file the lab writes lives under here."""
        return self.base_dir / self.name

    @property
    def manifest_path(self) -> Path:
        """What `up` created, so `down` removes exactly that."""
        return self.lab_dir / "manifest.json"

    @property
    def underlay_ns(self) -> str:
        """Namespace of the underlay bridge (and the IdP)."""
        return f"{self.name}-ul"

    @property
    def sites(self) -> tuple[Site, Site]:
        """Site A and site B."""
        return Site("a", 1, self), Site("b", 2, self)

    @property
    def issuer(self) -> str:
        """The lab IdP's issuer URL."""
        return f"http://{IDP_ADDRESS}:{IDP_PORT}"

    def site(self, letter: str) -> Site:
        """Site by letter."""
        return {s.letter: s for s in self.sites}[letter]

    def syslog_socket(self, site: Site) -> Path:
        """Where the site's auditd sends syslog when ``syslog`` is on (someone else binds it:
        the tests do)."""
        return self.lab_dir / f"syslog-{site.letter}.sock"

    def static_key_path(self, site: Site) -> Path:
        """The router's tunnel static key (tunneld's default place under its state)."""
        return site.state_dir / "tunneld" / "static.key"

    def router_config(self, site: Site, peer_public_key: str = "") -> str:
        """The router's TOML configuration; ``peer_public_key``: the other router's tunnel
        key (no peer without it)."""
        syslog = (f'[auditd.syslog]\nenabled = true\ntarget = "unix:{self.syslog_socket(site)}"\n'
                  f'hostname = "{site.instance}"\n\n' if self.syslog else "")
        idp = self._idp_config(site) if self.with_idp else ""
        return (
            "# Written by vpnr-lab; removed by `vpnr-lab down`.\n"
            "[router]\n"
            f'instance = "{site.instance}"\n'
            f'run_dir = "{self.run_dir}"\n'
            f'state_dir = "{site.state_dir}"\n'
            f'bpffs_dir = "{self.bpffs_dir}"\n'
            f'admin_group = "{self.admin_group}"\n\n'
            "[policyd]\n"
            f"metrics_port = {METRICS_PORTS['policyd']}\n"
            'interfaces = [{name = "lan0", zone = "internal"}, '
            '{name = "wan0", zone = "external"}]\n\n'
            "[tunneld]\n"
            f"metrics_port = {METRICS_PORTS['tunneld']}\n"
            'wan_interface = "wan0"\n\n'
            + self._peer_config(site, peer_public_key) +
            "[auditd]\n"
            f"metrics_port = {METRICS_PORTS['auditd']}\n\n"
            + syslog +
            "[idpd]\n"
            f"metrics_port = {METRICS_PORTS['idpd']}\n"
            + idp
        )

    def _idp_config(self, site: Site) -> str:
        """idpd's keys: the lab IdP, its SCIM directory and the group -> role mappings."""
        mappings = "".join(f'\n[[idpd.role_mappings]]\nclaim = "groups"\nvalue = "{group}"\n'
                           f'roles = ["{role}"]\n' for group, role in IDP_ROLE_MAPPINGS)
        return (f'issuer = "{self.issuer}"\n'
                f'client_id = "{IDP_CLIENT_ID}"\n'
                f'client_secret_file = "{site.idp_secret_path}"\n'
                f'scim_base_url = "{self.issuer}/scim/v2"\n'
                f"http_timeout_seconds = {IDP_HTTP_TIMEOUT}\n"
                f"sync_interval_seconds = {IDP_SYNC_INTERVAL}\n"
                + mappings)

    def _peer_config(self, site: Site, public_key: str) -> str:
        if not public_key:
            return ""
        other = next(s for s in self.sites if s.letter != site.letter)
        return ("[[tunneld.peers]]\n"
                f'name = "site-{other.letter}"\n'
                f'public_key = "{public_key}"\n'
                f'endpoint = "{other.router_wan_v4}:51820"\n'
                f'allowed_prefixes = ["{other.lan_v4}", "{other.lan_v6}"]\n\n')
