"""policyd's XDP data path: compile, pin, attach through BPF links, and adopt on restart.

Objects on bpffs under ``<bpffs_dir>/<instance>/``:
- ``xdp_rbac_prog``: the running program (its settings map carries the build id);
- ``link_xdp_<ifname>``: one BPF link per interface; the link keeps the program attached
  while policyd is down, and ``BPF_LINK_UPDATE`` swaps programs atomically on upgrade;
- ``xdp_stages_<build id>``: the tail-call array holding the rule-scan stage;
- the maps of bpf/lib/maps.h (policy, counters, audit ring, XSK map): pinned by the
  program itself (``BPF_TABLE_PINNED``), checked for shape before bcc reuses them.

A restarted policyd whose build id matches the pinned program adopts it without compiling:
nothing is detached or reloaded, so packets never see a gap.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from vpnr.core import bpfsys
from vpnr.core.config import InterfaceConfig
from vpnr.policyd import layout
from vpnr.policyd.build import SETTINGS, settings_map_fd
from vpnr.policyd.kernel import DEFAULT_RING_BYTES, check_pinned

log = logging.getLogger("vpnr.policyd.datapath")

BPF_DIR = Path(os.environ.get("VPNR_BPF_DIR", Path(__file__).resolve().parents[2] / "bpf"))
ENTRY_FILE = "xdp_rbac.c"
ENTRY_FUNCTION = "xdp_rbac"
STAGE_FUNCTIONS = ("xdp_rbac_rules",)  # index = VPNR_STAGE_* in bpf/lib/maps.h
STAGES_PIN_PREFIX = "xdp_stages_"
PROG_PIN = "xdp_rbac_prog"
STAGING_PIN = "xdp_rbac_prog_staging"
BUILD_TIMEOUT = 120.0
STATS_PIN = "xdp_stats"
LINK_PIN_PREFIX = "link_xdp_"

STATS_KEY = layout.STATS_KEY
COUNTER = layout.COUNTER
STATS_MAX_ENTRIES = layout.STATS_MAX_ENTRIES


BUILD_LOGS_KEPT = 10


class DatapathError(Exception):
    """The XDP program cannot be built, attached or adopted; says what to fix."""


class BuildRejected(DatapathError):
    """The compiler or the verifier refused a build; its whole output is saved."""

    def __init__(self, message: str, log_path: Path, build_id: bytes) -> None:
        super().__init__(message)
        self.log_path = log_path
        self.build_id = build_id
        self.at = time.time()


def save_build_log(log_dir: Path, build_id: bytes, output: str) -> Path:
    """Keep a rejected build's compiler/verifier output (the newest few) and return where."""
    log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = log_dir / f"{stamp}-{build_id.hex()[:16]}.log"
    path.write_text(output)
    for old in sorted(log_dir.glob("*.log"))[:-BUILD_LOGS_KEPT]:
        old.unlink()
    return path


def build_error_summary(output: str) -> str:
    """The lines an operator reads first: the failure, and the verifier's last words."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    key = [line for line in lines if "error" in line.lower() or "failed" in line.lower()
           or "invalid" in line.lower() or "denied" in line.lower()]
    picked = (key[:3] + lines[-3:]) if key else lines[-6:]
    seen: list[str] = []
    for line in picked:
        if line not in seen:
            seen.append(line)
    return "\n".join(seen)[-1500:]


@dataclass(frozen=True)
class Counter:
    """One row of the verdict counters, summed over CPUs."""

    ifindex: int
    verdict: int
    reason: int
    ip_version: int
    ip_protocol: int
    packets: int
    bytes: int


@dataclass
class AttachedInterface:
    """An interface with the program attached through a pinned link."""

    config: InterfaceConfig
    ifindex: int
    link_id: int
    mode: str = ""


@dataclass
class XdpDatapath:
    """The pinned program, its links and its maps for one router instance."""

    pin_dir: Path
    interfaces: tuple[InterfaceConfig, ...]
    ring_bytes: int = DEFAULT_RING_BYTES
    log_dir: Path = Path("/var/lib/vpnr/bpf-build")
    build_id: bytes = b""
    running_build_id: bytes = b""
    prog_fd: int = -1
    stats_fd: int = -1
    adopted: bool = False
    build_failure: BuildRejected | None = None
    attached: dict[str, AttachedInterface] = field(default_factory=dict)

    # -- build identity -------------------------------------------------------------------

    def cflags(self) -> list[str]:
        """Compiler flags; part of the build id."""
        return [f'-DVPNR_PIN_DIR="{self.pin_dir}"', f"-DVPNR_AUDIT_RING_BYTES={self.ring_bytes}",
                f"-I{BPF_DIR}"]

    def compute_build_id(self) -> bytes:
        """SHA-256 over the BPF sources, the flags and the kernel release."""
        digest = hashlib.sha256()
        for path in sorted([BPF_DIR / ENTRY_FILE, *(BPF_DIR / "lib").glob("*.h")]):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        digest.update("\0".join(self.cflags()).encode())
        digest.update(os.uname().release.encode())
        return digest.digest()

    # -- start-up -------------------------------------------------------------------------

    def setup(self) -> None:
        """Adopt or build the program, then make every configured interface run it."""
        self.prepare()
        self.attach()

    def prepare(self) -> None:
        """Adopt the pinned program when its build id matches, else build it; nothing is
        attached yet, so policyd can fill the maps before the first packet meets them."""
        if not Path("/sys/fs/bpf").is_mount():
            raise DatapathError("bpffs is not mounted at /sys/fs/bpf "
                                "(mount -t bpf bpf /sys/fs/bpf; deploy/setup-host.sh does it)")
        self.pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.build_id = self.running_build_id = self.compute_build_id()
        pinned = self._open_pinned_program()
        pinned_id = self._program_build_id(pinned) if pinned is not None else b""
        if pinned is not None and pinned_id == self.build_id and self.stages_pin.exists():
            self.prog_fd, self.adopted = pinned, True
            log.info("adopted pinned program", extra={"prog_id": self.prog_info().id})
        else:
            try:
                self.prog_fd = self._build()
            except BuildRejected as exc:
                self.running_build_id = pinned_id
                if pinned is None or not pinned_id or not self.stages_pin.exists():
                    if pinned is not None:
                        os.close(pinned)
                    raise
                # An upgrade the verifier refused: the running program stays in force.
                self.prog_fd, self.adopted, self.build_failure = pinned, True, exc
                log.error("new program rejected; keeping the running one",
                          extra={"prog_id": self.prog_info().id, "log": str(exc.log_path),
                                 "rejected_build_id": exc.build_id.hex()[:16]})
            else:
                if pinned is not None:
                    os.close(pinned)
        self.stats_fd = bpfsys.obj_get(str(self.pin_dir / STATS_PIN))

    def attach(self) -> None:
        """Make every configured interface run the program (atomic swap on upgrade)."""
        with IPRoute() as ipr:
            for iface in self.interfaces:
                self._ensure_link(ipr, iface)
            self._detach_unconfigured()
        if not self.adopted:
            self._replace_pin(self.pin_dir / PROG_PIN, self.prog_fd)
        current = self.stages_pin.name
        for pin in self.pin_dir.glob(f"{STAGES_PIN_PREFIX}*"):
            if pin.name != current:
                pin.unlink()  # the replaced program's tail calls

    @property
    def stages_pin(self) -> Path:
        """Where the running build's tail-call array is pinned."""
        return self.pin_dir / f"{STAGES_PIN_PREFIX}{self.running_build_id.hex()[:16]}"

    def ifindexes(self) -> dict[str, int]:
        """Configured interface name -> ifindex (in policyd's network namespace)."""
        out = {}
        with IPRoute() as ipr:
            for iface in self.interfaces:
                found = ipr.link_lookup(ifname=iface.name)
                if not found:
                    raise DatapathError(f"interface {iface.name!r} does not exist in this "
                                        "network namespace (policyd.interfaces)")
                out[iface.name] = int(found[0])
        return out

    def _open_pinned_program(self) -> int | None:
        path = self.pin_dir / PROG_PIN
        if not path.exists():
            return None
        try:
            return bpfsys.obj_get(str(path))
        except bpfsys.BpfError as exc:
            log.warning("pinned program unusable; rebuilding", extra={"reason": str(exc)})
            return None

    @staticmethod
    def _program_build_id(prog_fd: int) -> bytes:
        fd = settings_map_fd(prog_fd)
        if fd is None:
            return b""
        try:
            raw = bpfsys.map_lookup(fd, struct.pack("=I", 0), SETTINGS.size)
        finally:
            os.close(fd)
        return SETTINGS.unpack(raw)[0] if raw else b""

    def _build(self) -> int:
        """Compile and load in a child process (see build.py); returns our program fd."""
        check_pinned(self.pin_dir, self.ring_bytes)
        staging = self.pin_dir / STAGING_PIN
        with contextlib.suppress(FileNotFoundError):
            self.stages_pin.unlink()
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        argv = [sys.executable, "-m", "vpnr.policyd.build", "--source",
                str(BPF_DIR / ENTRY_FILE), "--function", ENTRY_FUNCTION,
                "--build-id", self.build_id.hex(), "--staging", str(staging),
                "--stages", str(self.stages_pin)]
        for name in STAGE_FUNCTIONS:
            argv.append(f"--stage-function={name}")
        for flag in self.cflags():
            argv.append(f"--cflag={flag}")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                              check=False)
        if proc.returncode != 0:
            path = save_build_log(self.log_dir, self.build_id, proc.stderr)
            raise BuildRejected(f"cannot build {BPF_DIR / ENTRY_FILE} (whole compiler and "
                                f"verifier output in {path}):\n"
                                f"{build_error_summary(proc.stderr)}", path, self.build_id)
        prog_fd = bpfsys.obj_get(str(staging))
        staging.unlink()
        log.info("built program", extra={"prog_id": bpfsys.prog_info(prog_fd).id})
        return prog_fd

    def _ensure_link(self, ipr: IPRoute, iface: InterfaceConfig) -> None:
        found = ipr.link_lookup(ifname=iface.name)
        if not found:
            raise DatapathError(f"interface {iface.name!r} does not exist in this network "
                                "namespace (policyd.interfaces)")
        ifindex = int(found[0])
        link_pin = self.pin_dir / f"{LINK_PIN_PREFIX}{iface.name}"
        link_fd = None
        if link_pin.exists():
            link_fd = bpfsys.obj_get(str(link_pin))
            info = bpfsys.link_info(link_fd)
            if info.ifindex != ifindex:
                log.warning("pinned link is defunct or names another device; relinking",
                            extra={"interface": iface.name, "link_ifindex": info.ifindex})
                os.close(link_fd)
                link_pin.unlink()
                link_fd = None
        try:
            if link_fd is None:
                link_fd = self._create_link(iface, ifindex)
                bpfsys.obj_pin(link_fd, str(link_pin))
            else:
                self._swap_program(link_fd, iface)
            info = bpfsys.link_info(link_fd)
            self.attached[iface.name] = AttachedInterface(iface, ifindex, info.id,
                                                          attach_mode(ipr, ifindex))
        finally:
            if link_fd is not None:
                os.close(link_fd)

    def _create_link(self, iface: InterfaceConfig, ifindex: int) -> int:
        flags = bpfsys.XDP_FLAGS_DRV_MODE if iface.xdp_mode == "native" \
            else bpfsys.XDP_FLAGS_SKB_MODE
        try:
            return bpfsys.link_create_xdp(self.prog_fd, ifindex, flags)
        except bpfsys.BpfError as exc:
            if exc.errno in (errno.EBUSY, errno.EEXIST):
                raise DatapathError(
                    f"interface {iface.name!r} already runs an XDP program not attached by "
                    f"vpnr; detach it first (ip link set {iface.name} xdp off)") from exc
            raise DatapathError(f"cannot attach XDP ({iface.xdp_mode}) to {iface.name!r}: "
                                f"{exc.strerror}") from exc

    def _swap_program(self, link_fd: int, iface: InterfaceConfig) -> None:
        """Compare-and-swap: replace what the link runs now by our program, atomically."""
        running_id = bpfsys.link_info(link_fd).prog_id
        if running_id == bpfsys.prog_info(self.prog_fd).id:
            return
        old_fd = bpfsys.fd_by_id("prog", running_id)
        try:
            bpfsys.link_update(link_fd, self.prog_fd, old_fd)
        finally:
            os.close(old_fd)
        log.info("replaced program atomically", extra={"interface": iface.name,
                                                       "old_prog_id": running_id})

    def _detach_unconfigured(self) -> None:
        """Unpinning the last reference to a link detaches it from its interface."""
        wanted = {f"{LINK_PIN_PREFIX}{i.name}" for i in self.interfaces}
        for pin in self.pin_dir.glob(f"{LINK_PIN_PREFIX}*"):
            if pin.name not in wanted:
                log.info("detaching interface no longer configured",
                         extra={"interface": pin.name.removeprefix(LINK_PIN_PREFIX)})
                pin.unlink()

    @staticmethod
    def _replace_pin(path: Path, fd: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        bpfsys.obj_pin(fd, str(path))

    # -- reading --------------------------------------------------------------------------

    def prog_info(self) -> bpfsys.ProgInfo:
        """Info of the program this policyd runs."""
        return bpfsys.prog_info(self.prog_fd)

    def counters(self) -> list[Counter]:
        """Every verdict counter row, summed over CPUs."""
        rows = []
        for key in list(bpfsys.map_keys(self.stats_fd, STATS_KEY.size, STATS_MAX_ENTRIES)):
            values = bpfsys.percpu_lookup(self.stats_fd, key, COUNTER.size)
            if values is None:
                continue  # removed between listing and reading
            packets = sum(COUNTER.unpack(v)[0] for v in values)
            nbytes = sum(COUNTER.unpack(v)[1] for v in values)
            ifindex, verdict, reason, ip_version, ip_protocol = STATS_KEY.unpack(key)
            rows.append(Counter(ifindex, verdict, reason, ip_version, ip_protocol, packets,
                                nbytes))
        return rows

    def close(self) -> None:
        """Close our fds; pinned objects and attachments stay."""
        for fd in (self.prog_fd, self.stats_fd):
            if fd >= 0:
                os.close(fd)
        self.prog_fd = self.stats_fd = -1


def attach_mode(ipr: IPRoute, ifindex: int) -> str:
    """"native" or "generic" from the kernel's IFLA_XDP_ATTACHED, "" when not attached."""
    links: Iterable[Any] = ipr.get_links(ifindex)
    for link in links:
        xdp = link.get_attr("IFLA_XDP")
        if xdp is None:
            return ""
        attached = xdp.get_attr("IFLA_XDP_ATTACHED")
        # pyroute2 decodes XDP_ATTACHED_* to names ("xdp" is the driver, i.e. native, mode)
        return {1: "native", 2: "generic", 3: "offload", 4: "multi", "xdp": "native",
                "xdpgeneric": "generic", "xdpoffload": "offload", "multi": "multi",
                "none": ""}.get(attached, str(attached))
    return ""
