"""The systemd deployment (deploy/systemd): the units render with this virtualenv's daemons,
pass ``systemd-analyze verify``, keep their ``systemd-analyze security`` exposure at or
below the measured level, and carry the directives the deployment relies on. idpd, the one
unit with a dedicated user, really runs without root: it serves over its socket and keeps
its state under the layout systemd's StateDirectory= gives it.

PID 1 of this machine is not systemd, so no unit is started here; the daemon runs under
setpriv with the user, groups, capabilities and umask its unit gives it.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from conftest import BIN, unique
from vpnr.core.client import is_serving, socket_target
from vpnr.v1 import idp_pb2, idp_pb2_grpc

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
INSTALLER = REPO / "deploy" / "systemd" / "install.sh"
DAEMONS = ("policyd", "auditd", "tunneld", "idpd")
UNITS = ("vpnr.target", *(f"vpnr-{d}.service" for d in DAEMONS))
CONFIG = "/etc/vpnr/router.toml"
IDPD_USER = "vpnr-idpd"  # created by deploy/setup-host.sh
START_TIMEOUT = 30.0

# `systemd-analyze security --offline=yes` exposure measured with systemd 252 (0 is the
# best, 10 the worst); a change that weakens a unit's sandbox fails here.
EXPOSURE_LIMITS = {"policyd": 2.6, "auditd": 2.1, "tunneld": 3.3, "idpd": 1.5}

# Capabilities each root daemon was seen to need (docs/operations.md tells what fails
# without each); idpd has none.
CAPABILITIES = {
    "policyd": {"CAP_SYS_ADMIN", "CAP_CHOWN"},
    "auditd": {"CAP_BPF", "CAP_CHOWN"},
    "tunneld": {"CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_CHOWN"},
    "idpd": set(),
}


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given to it, in order (keys may repeat in units)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def words(unit: dict[str, list[str]], key: str) -> list[str]:
    """The space-separated items of every value of ``key``."""
    return [item for value in unit.get(key, []) for item in value.split()]


@dataclass
class Installed:
    """Units rendered by the installer into a scratch tree."""

    unit_dir: Path
    instance: str

    def path(self, unit: str) -> Path:
        """One rendered unit file."""
        return self.unit_dir / unit

    def analyze(self, *args: str) -> subprocess.CompletedProcess[str]:
        """systemd-analyze with our units first on the unit path (the trailing colon keeps
        the system's units, e.g. network-online.target, behind them)."""
        env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{self.unit_dir}:", "SYSTEMD_COLORS": "0"}
        return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                              env=env, timeout=60)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("sysroot")
    instance = unique("sd")
    done = subprocess.run(["bash", str(INSTALLER), "--bindir", str(BIN), "--instance",
                           instance, "--root", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return Installed(root / "etc" / "systemd" / "system", instance)


def test_installer_renders_every_placeholder(installed: Installed) -> None:
    for name in UNITS:
        text = installed.path(name).read_text()
        assert not re.search(r"@[A-Z]+@", text), f"{name} keeps a placeholder"
        assert stat.S_IMODE(installed.path(name).stat().st_mode) == 0o644
    for daemon in DAEMONS:
        unit = parse_unit(installed.path(f"vpnr-{daemon}.service"))
        assert unit["Service.ExecStart"] == [f"{BIN}/{daemon} --config {CONFIG}"]


def test_installer_refuses_a_bin_dir_without_the_daemons(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(INSTALLER), "--bindir", str(tmp_path), "--instance",
                           "r1", "--root", str(tmp_path / "root")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"{tmp_path}/policyd is missing" in done.stderr
    assert not (tmp_path / "root" / "etc" / "systemd" / "system" / "vpnr.target").exists()


def test_installer_takes_the_instance_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text('[router]\ninstance = "edge-7"\n[policyd]\n'
                      'interfaces = [{name = "lo", zone = "internal"}]\n')
    done = subprocess.run(["bash", str(INSTALLER), "--bindir", str(BIN), "--config",
                           str(config), "--root", str(tmp_path / "root")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    unit = parse_unit(tmp_path / "root/etc/systemd/system/vpnr-idpd.service")
    assert unit["Service.StateDirectory"] == ["vpnr/edge-7/idpd"]


def test_units_pass_systemd_analyze_verify(installed: Installed) -> None:
    done = installed.analyze("verify", "--man=no",
                             *(str(installed.path(unit)) for unit in UNITS))
    output = done.stdout + done.stderr
    print(output)
    assert done.returncode == 0, output
    # verify exits 0 on unknown keys and bad values too: any line about our units fails.
    assert not [line for line in output.splitlines() if "vpnr" in line], output


def test_verify_catches_a_missing_daemon(installed: Installed, tmp_path: Path) -> None:
    """The check above can fail: an ExecStart naming no executable is reported."""
    broken = tmp_path / "vpnr-policyd.service"
    broken.write_text(installed.path("vpnr-policyd.service").read_text().replace(
        f"{BIN}/policyd", f"{tmp_path}/no-such-policyd"))
    done = installed.analyze("verify", "--man=no", str(broken))
    assert done.returncode != 0
    assert "no-such-policyd" in done.stderr


@pytest.mark.parametrize("daemon", DAEMONS)
def test_exposure_score_stays_low(installed: Installed, daemon: str) -> None:
    done = installed.analyze("security", "--offline=yes",
                             str(installed.path(f"vpnr-{daemon}.service")))
    assert done.returncode == 0, done.stderr
    found = re.search(r"Overall exposure level for vpnr-\S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout
    score = float(found.group(1))
    print(f"vpnr-{daemon}.service exposure {score} (limit {EXPOSURE_LIMITS[daemon]})")
    assert score <= EXPOSURE_LIMITS[daemon], done.stdout


@pytest.mark.parametrize("daemon", DAEMONS)
def test_unit_carries_the_required_directives(installed: Installed, daemon: str) -> None:
    unit = parse_unit(installed.path(f"vpnr-{daemon}.service"))
    assert unit["Unit.PartOf"] == ["vpnr.target"]
    assert unit["Install.WantedBy"] == ["vpnr.target"]
    assert "network-online.target" in words(unit, "Unit.After")
    assert "network-online.target" in words(unit, "Unit.Wants")
    # The daemons do not speak sd_notify: exec, so a missing binary fails the start.
    assert unit["Service.Type"] == ["exec"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert unit["Service.LimitMEMLOCK"] == ["infinity"]
    assert unit["Service.NoNewPrivileges"] == ["yes"]
    assert unit["Service.ProtectSystem"] == ["strict"]
    assert unit["Service.ProtectHome"] == ["yes"]
    assert unit["Service.PrivateTmp"] == ["yes"]
    assert unit["Service.ProtectKernelTunables"] == ["yes"]
    assert unit["Service.LockPersonality"] == ["yes"]
    assert unit["Service.RestrictRealtime"] == ["yes"]
    assert unit["Service.SystemCallArchitectures"] == ["native"]
    assert "@system-service" in words(unit, "Service.SystemCallFilter")
    assert ("bpf" in words(unit, "Service.SystemCallFilter")) == (daemon != "idpd")
    assert set(words(unit, "Service.CapabilityBoundingSet")) == CAPABILITIES[daemon]
    assert set(words(unit, "Service.AmbientCapabilities")) == CAPABILITIES[daemon]
    assert "/run/vpnr" in words(unit, "Service.ReadWritePaths")
    families = set(words(unit, "Service.RestrictAddressFamilies"))
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert ("AF_XDP" in families) == (daemon == "tunneld")
    if daemon == "idpd":
        assert unit["Service.User"] == [IDPD_USER]
        assert set(words(unit, "Service.SupplementaryGroups")) == {"vpnr-admin", "vpnr-viewer"}
        # Not the shared /run/vpnr: systemd would chown it, sockets and all, to vpnr-idpd.
        assert "Service.RuntimeDirectory" not in unit
        assert unit["Service.StateDirectory"] == [f"vpnr/{installed.instance}/idpd"]
        assert unit["Service.StateDirectoryMode"] == ["0700"]
    else:
        assert unit["Service.User"] == ["root"]
        assert unit["Service.RuntimeDirectory"] == ["vpnr"]
        assert unit["Service.RuntimeDirectoryPreserve"] == ["yes"]
        assert unit["Service.StateDirectory"] == [f"vpnr/{installed.instance}"]
        assert "/sys/fs/bpf" in words(unit, "Service.ReadWritePaths")


def test_target_groups_the_daemons_in_order(installed: Installed) -> None:
    target = parse_unit(installed.path("vpnr.target"))
    assert set(words(target, "Unit.Wants")) == {f"vpnr-{d}.service" for d in DAEMONS}
    after = {d: set(words(parse_unit(installed.path(f"vpnr-{d}.service")), "Unit.After"))
             for d in DAEMONS}
    assert "vpnr-policyd.service" in after["auditd"]
    for daemon in ("tunneld", "idpd"):
        # policyd first, auditd next so the others' audit records are accepted
        assert {"vpnr-policyd.service", "vpnr-auditd.service"} <= after[daemon]
    assert not any(name.startswith("vpnr-") for name in after["policyd"])


# -- idpd as its dedicated user ----------------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory the unprivileged user can traverse (pytest's tmp dirs are root-only),
    laid out like the host: run/ is /run/vpnr, state/ is /var/lib/vpnr/<instance>."""
    base = Path("/run") / unique("vpnrsd")
    base.mkdir()
    os.chmod(base, 0o755)  # noqa: S103 - world-traversable like /run/vpnr, whatever the umask
    try:
        (base / "run").mkdir(mode=0o755)
        # As the root units' StateDirectory=vpnr/<instance> (StateDirectoryMode=0751) and
        # idpd's StateDirectory=vpnr/<instance>/idpd (vpnr-idpd, 0700) leave it.
        (base / "state").mkdir()
        os.chmod(base / "state", 0o751)  # noqa: S103 - traversable, not listable
        user = pwd.getpwnam(IDPD_USER)
        (base / "state" / "idpd").mkdir(mode=0o700)
        os.chown(base / "state" / "idpd", user.pw_uid, user.pw_gid)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Daemon:
    """One idpd started by the test."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """What it logged."""
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then wait (bounded); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=15)


def as_idpd_user() -> list[str]:
    """What vpnr-idpd.service gives the daemon: its user, the socket groups, no capability
    (inheritable, ambient or bounding) and no new privileges."""
    return ["setpriv", f"--reuid={IDPD_USER}", f"--regid={IDPD_USER}",
            "--groups=vpnr-admin,vpnr-viewer", "--inh-caps=-all", "--ambient-caps=-all",
            "--bounding-set=-all", "--no-new-privs"]


def start_idpd(config: Path, prefix: list[str], sock: Path) -> Daemon:
    """Start idpd (UMask=0027 as in the unit) and wait, bounded, until it serves or exits."""
    log = config.parent / f"idpd-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*prefix, str(BIN / "idpd"), "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, umask=0o027)
    daemon = Daemon(proc, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return daemon
        if sock.exists() and is_serving(sock):
            return daemon
        time.sleep(0.05)
    daemon.stop()
    raise AssertionError(f"idpd not serving after {START_TIMEOUT} s: {daemon.output()}")


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def write_config(scratch: Path, instance: str, idpd: str = "",
                 name: str = "router.toml") -> Path:
    """A router config for ``instance`` under ``scratch``, readable by idpd's user."""
    config = scratch / name
    config.write_text(
        "[router]\n"
        f'instance = "{instance}"\n'
        f'run_dir = "{scratch}/run"\n'
        f'state_dir = "{scratch}/state"\n'
        "[policyd]\n"
        'interfaces = [{name = "lo", zone = "internal"}]\n' + idpd)
    os.chmod(config, 0o644)
    return config


def test_idpd_serves_as_its_dedicated_user(scratch: Path) -> None:
    user = pwd.getpwnam(IDPD_USER)  # KeyError: run deploy/setup-host.sh
    admin, viewer = grp.getgrnam("vpnr-admin").gr_gid, grp.getgrnam("vpnr-viewer").gr_gid
    instance = unique("sd")
    config = write_config(scratch, instance)
    sock_dir = scratch / "run" / instance
    sock = sock_dir / "idpd.sock"

    # /run/vpnr belongs to root: the unprivileged idpd cannot create the instance's
    # socket directory and says who must (policyd starts first under vpnr.target).
    alone = start_idpd(config, as_idpd_user(), sock)
    assert alone.stop() == 1
    assert "start a vpnr daemon that runs as root first" in alone.output()

    # A root daemon creates it (the same code as policyd's), then stops.
    first = start_idpd(config, [], sock)
    assert first.stop() == 0, first.output()
    assert (sock_dir.stat().st_uid, sock_dir.stat().st_gid) == (0, admin)
    assert stat.S_IMODE(sock_dir.stat().st_mode) & (stat.S_ISVTX | stat.S_IWGRP) == \
        stat.S_ISVTX | stat.S_IWGRP

    daemon = start_idpd(config, as_idpd_user(), sock)
    try:
        assert daemon.proc.poll() is None, daemon.output()
        # The process itself: the dedicated user, the socket groups, no capability.
        status = proc_status(daemon.proc.pid)
        assert status["Uid"].split() == [str(user.pw_uid)] * 4
        assert status["Gid"].split() == [str(user.pw_gid)] * 4
        assert set(status["Groups"].split()) == {str(admin), str(viewer)}
        for caps in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, caps
        assert status["NoNewPrivs"] == "1"
        # Its sockets: its own, chgrp'ed to the admin and viewer groups, 0660.
        for path, gid in ((sock, admin), (sock_dir / "idpd-viewer.sock", viewer)):
            info = path.stat()
            assert stat.S_ISSOCK(info.st_mode)
            assert (info.st_uid, info.st_gid) == (user.pw_uid, gid), path
            assert stat.S_IMODE(info.st_mode) == 0o660, path
        with grpc.insecure_channel(socket_target(sock)) as channel:
            answer = idp_pb2_grpc.IdpServiceStub(channel).Status(idp_pb2.IdpStatusRequest(),
                                                                 timeout=10)
        assert answer.daemon.daemon == "idpd"
        assert answer.daemon.instance == instance
        assert answer.daemon.pid == daemon.proc.pid
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()
    # In the sticky directory it may remove its own sockets, and it did.
    assert not sock.exists()
    assert not (sock_dir / "idpd-viewer.sock").exists()


def closed_port() -> int:
    """A loopback TCP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_idpd_keeps_its_secrets_in_its_state_directory(scratch: Path) -> None:
    """With an IdP configured (here down, which idpd survives), the dedicated user creates
    the token key and its database in the directory StateDirectory= gives it."""
    user = pwd.getpwnam(IDPD_USER)
    instance = unique("sd")
    config = write_config(scratch, instance,
                          "[idpd]\n"
                          f'issuer = "http://127.0.0.1:{closed_port()}/realm"\n'
                          'client_id = "vpnr-router"\n')
    sock = scratch / "run" / instance / "idpd.sock"
    # A root daemon creates the socket directory first (the IdP settings are left out: a
    # root idpd would create the state files as root).
    root_first = start_idpd(write_config(scratch, instance, name="root.toml"), [], sock)
    assert root_first.stop() == 0, root_first.output()

    daemon = start_idpd(config, as_idpd_user(), sock)
    try:
        assert daemon.proc.poll() is None, daemon.output()
        with grpc.insecure_channel(socket_target(sock)) as channel:
            answer = idp_pb2_grpc.IdpServiceStub(channel).Status(idp_pb2.IdpStatusRequest(),
                                                                 timeout=10)
        assert answer.discovery_error  # the IdP is down, and idpd says so
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()
    state = scratch / "state" / "idpd"
    key = state / "token.key"
    assert (key.stat().st_uid, stat.S_IMODE(key.stat().st_mode)) == (user.pw_uid, 0o600)
    database = state / "idpd.sqlite"
    assert database.stat().st_uid == user.pw_uid
    assert stat.S_IMODE(database.stat().st_mode) & 0o007 == 0  # UMask=0027
    # Nothing of idpd's landed beside the root daemons' state.
    assert [p.name for p in (scratch / "state").iterdir()] == ["idpd"]
