"""The decap interface: a TAP device through which decrypted inner packets enter the kernel,
with the RBAC program on its TC ingress.

- Packets carry a virtio-net header (``IFF_VNET_HDR``), so a run of one TCP flow's
  segments is written as one large packet (coalesce.py); reads start with that header too.
- The TAP is persistent: when tunneld is down it stays, with no carrier, so the routes to
  the peers' prefixes keep pointing at it and nothing meant for the tunnel takes another
  route in clear text.
- ``tc_decap`` (bpf/xdp_rbac.c) is policyd's RBAC with the source zone VPN, built from the
  same lib/ code against policyd's pinned maps, auditing as source TC_DECAP. It is built in
  a child process (vpnr.policyd.build: bcc stays out of tunneld), pinned with its build id,
  and adopted without a rebuild when tunneld restarts. Before an upgrade,
  ``python -m vpnr.tunneld.decap --config FILE`` run from the new build compiles and pins
  the new program while the old tunneld still carries traffic; the new tunneld adopts it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vpnr.core import bpfsys
from vpnr.core.config import ConfigError, load_config
from vpnr.policyd.datapath import BPF_DIR, BUILD_TIMEOUT, ENTRY_FILE, XdpDatapath
from vpnr.tunneld.coalesce import NO_GSO, coalesce

log = logging.getLogger("vpnr.tunneld.decap")

TUNSETIFF, TUNSETPERSIST = 0x400454CA, 0x400454CB
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
ENTRY, STAGE = "tc_decap", "tc_decap_rules"
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
SOURCE_MAC = bytes.fromhex("020000000001")  # locally administered: "the tunnel"


class DecapError(Exception):
    """The decap interface or its program cannot be set up; says what to fix."""


@dataclass
class DecapInterface:
    """The TAP device, its fd, and the TC program on its ingress."""

    name: str
    fd: int = -1
    ifindex: int = 0
    mac: bytes = b""
    prog_id: int = 0
    adopted: bool = False
    write_errors: Counter[str] = field(default_factory=Counter)

    def open(self, mtu: int) -> None:
        """Create or re-attach the persistent TAP and bring it up with ``mtu``."""
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            request = struct.pack("16sH", self.name.encode(),
                                  IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, request)
            fcntl.ioctl(self.fd, TUNSETPERSIST, 1)
        except OSError as exc:
            self.close()
            raise DecapError(f"cannot open TAP {self.name!r}: {exc.strerror}") from exc
        with IPRoute() as ipr:
            self.ifindex = int(ipr.link_lookup(ifname=self.name)[0])
            # No ARP (the kernel sends routed packets without asking), no IPv6 link-local
            # chatter, and the inner MTU: the kernel itself answers oversize packets.
            ipr.link("set", index=self.ifindex, mtu=mtu, state="up")
            ipr.link("set", index=self.ifindex, flags=0x80, mask=0x80)  # IFF_NOARP
            self.mac = bytes.fromhex(
                ipr.get_links(self.ifindex)[0].get_attr("IFLA_ADDRESS").replace(":", ""))
        self.header4 = self.mac + SOURCE_MAC + struct.pack("!H", ETH_P_IP)
        self.header6 = self.mac + SOURCE_MAC + struct.pack("!H", ETH_P_IPV6)

    def route(self, prefixes: list[str]) -> None:
        """Route ``prefixes`` to the TAP (replacing routes to elsewhere)."""
        with IPRoute() as ipr:
            for prefix in prefixes:
                family = 10 if ":" in prefix else 2
                ipr.route("replace", dst=prefix, oif=self.ifindex, family=family)

    def unroute(self, prefixes: list[str]) -> None:
        """Remove the routes of a removed peer."""
        with IPRoute() as ipr:
            for prefix in prefixes:
                family = 10 if ":" in prefix else 2
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", dst=prefix, oif=self.ifindex, family=family)

    def write(self, inner: bytes) -> None:
        """Hand one decrypted inner packet to the kernel (through the TC program)."""
        os.writev(self.fd, (NO_GSO, self.header4 if inner[0] >> 4 == 4 else self.header6,
                            inner))

    def write_batch(self, packets: list[bytes]) -> int:
        """Hand a batch to the kernel, runs of one TCP flow merged (coalesce.py); returns
        the number of writes."""
        writes = 0
        for vnet, packet in coalesce(packets):
            try:
                os.writev(self.fd, (vnet, self.header4 if packet[0] >> 4 == 4
                                    else self.header6, packet))
            except OSError as exc:
                self.write_errors[errno.errorcode.get(exc.errno or 0, "?")] += 1
                continue
            writes += 1
        return writes

    def close(self) -> None:
        """Close our fd; the persistent device stays."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def destroy(self) -> None:
        """Delete the device (peers removed, or the router is torn down)."""
        self.close()
        with IPRoute() as ipr, contextlib.suppress(NetlinkError, IndexError):
            ipr.link("del", index=ipr.link_lookup(ifname=self.name)[0])

    # -- the TC program -------------------------------------------------------------------

    def attach_program(self, pin_dir: Path, ring_bytes: int) -> None:
        """Adopt the pinned decap program when its build id matches, else build it; then
        make it the TAP's TC ingress filter (replacing an older one atomically)."""
        prog_fd, self.adopted, prog_pin, stages_pin = prepare_program(pin_dir, ring_bytes)
        try:
            self._attach(prog_fd)
            self.prog_id = bpfsys.prog_info(prog_fd).id
        finally:
            os.close(prog_fd)
        for stale in pin_dir.glob(f"{ENTRY}_*"):
            if stale != prog_pin:
                stale.unlink(missing_ok=True)
        for stale in pin_dir.glob("tc_stages_*"):
            if stale != stages_pin:
                stale.unlink(missing_ok=True)

    def _attach(self, prog_fd: int) -> None:
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", self.ifindex)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise DecapError(f"clsact on {self.name}: {exc}") from exc
            try:
                ipr.tc("replace-filter", "bpf", self.ifindex, ":1", fd=prog_fd, name=ENTRY,
                       parent="ffff:fff2", classid=1, direct_action=True, prio=1)
            except NetlinkError as exc:
                raise DecapError(f"TC filter on {self.name}: {exc}") from exc


def prepare_program(pin_dir: Path, ring_bytes: int) -> tuple[int, bool, Path, Path]:
    """This build's decap program, pinned under its build id: adopted from the pin when
    there, else compiled and pinned. Returns (program fd, adopted, program pin, stages
    pin); attaches nothing, so it may run while another build's tunneld carries traffic."""
    datapath = XdpDatapath(pin_dir, (), ring_bytes)
    build_id = hashlib.sha256(datapath.compute_build_id() + ENTRY.encode()).digest()
    prog_pin = pin_dir / f"{ENTRY}_{build_id.hex()[:16]}"
    stages_pin = pin_dir / f"tc_stages_{build_id.hex()[:16]}"
    if prog_pin.exists() and stages_pin.exists():
        prog_fd = bpfsys.obj_get(str(prog_pin))
        if XdpDatapath._program_build_id(prog_fd) == build_id:
            return prog_fd, True, prog_pin, stages_pin
        os.close(prog_fd)
    return _build(datapath, build_id, prog_pin, stages_pin), False, prog_pin, stages_pin


def _build(datapath: XdpDatapath, build_id: bytes, prog_pin: Path, stages_pin: Path) -> int:
    for path in (prog_pin, stages_pin):
        path.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "vpnr.policyd.build", "--source",
            str(BPF_DIR / ENTRY_FILE), "--function", ENTRY, "--prog-type", "sched_cls",
            "--stages-table", "tc_stages", f"--stage-function={STAGE}",
            "--build-id", build_id.hex(), "--staging", str(prog_pin),
            "--stages", str(stages_pin)]
    argv += [f"--cflag={flag}" for flag in datapath.cflags()]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                          check=False)
    if proc.returncode != 0:
        raise DecapError(f"cannot build the decap program from {BPF_DIR / ENTRY_FILE}:\n"
                         f"{proc.stderr.strip()[-4000:]}")
    return bpfsys.obj_get(str(prog_pin))


def main(argv: list[str] | None = None) -> int:
    """``python -m vpnr.tunneld.decap --config FILE``: before an upgrade, run from the new
    build while the old tunneld still runs. It compiles and pins the new build's decap
    program beside the running one, so the new tunneld adopts it at start instead of
    compiling it while the tunnel is down. Prints the program id."""
    parser = argparse.ArgumentParser(prog="python -m vpnr.tunneld.decap",
                                     description=main.__doc__)
    parser.add_argument("--config", required=True, help="the router's TOML file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        prog_fd, adopted, _, _ = prepare_program(config.router.pin_dir,
                                                 config.policyd.audit_ring_mib << 20)
    except (ConfigError, DecapError, bpfsys.BpfError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps({"prog_id": bpfsys.prog_info(prog_fd).id, "adopted": adopted}))
    finally:
        os.close(prog_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
