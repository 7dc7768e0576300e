"""What a daemon needs from the host, checked once at start and reported in one message.

Without these checks a missing piece shows up later as an errno deep inside a load or a
pin ("No such file or directory" from bcc, EPERM from a map create). Each check names what
is missing and how to fix it; a daemon lists every problem it found, not only the first.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from vpnr.core import bpfsys
from vpnr.core.daemon import StartupError

BPFFS = Path("/sys/fs/bpf")
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
MIN_KERNEL = (5, 15)  # XDP BPF links with BPF_F_REPLACE, ring buffers, batch map ops
ARRAY = 2


def _bpffs() -> str:
    if BPFFS.is_mount():
        return ""
    return (f"bpffs is not mounted at {BPFFS}: pinned programs and maps live there "
            f"(mount -t bpf bpf {BPFFS}; deploy/setup-host.sh does it)")


def _btf() -> str:
    if VMLINUX_BTF.exists():
        return ""
    return (f"the kernel exposes no BTF ({VMLINUX_BTF} is missing): build it with "
            "CONFIG_DEBUG_INFO_BTF=y")


def _headers() -> str:
    build = Path("/lib/modules") / os.uname().release / "build"
    if (build / "include").is_dir():
        return ""
    return (f"no kernel headers at {build}: bcc compiles the BPF programs against them "
            "(install linux-headers; deploy/setup-host.sh links Debian's)")


def _kernel() -> str:
    release = os.uname().release
    try:
        major, minor = (int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        return ""  # an unusual release string: let the loads speak for themselves
    if (major, minor) >= MIN_KERNEL:
        return ""
    return (f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}, which vpnr "
            "needs (XDP links with atomic replace, ring buffers, batch map operations)")


def _bpf_syscall() -> str:
    try:
        fd = bpfsys.map_create(ARRAY, 4, 4, 1, name="vpnr_preflight")
    except bpfsys.BpfError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return ("the bpf() system call is not permitted: run as root or with "
                    "CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (see deploy/systemd)")
        if exc.errno == errno.ENOSYS:
            return "this kernel has no bpf() system call (CONFIG_BPF_SYSCALL=y is needed)"
        return f"the bpf() system call fails: {exc.strerror}"
    os.close(fd)
    return ""


CHECKS: dict[str, Callable[[], str]] = {
    "kernel": _kernel,
    "bpf": _bpf_syscall,
    "bpffs": _bpffs,
    "btf": _btf,
    "headers": _headers,
}


def problems(needs: Iterable[str]) -> list[str]:
    """Everything missing among ``needs`` (names of :data:`CHECKS`), in a stable order."""
    wanted = set(needs)
    unknown = wanted - CHECKS.keys()
    if unknown:
        raise ValueError(f"unknown host checks: {sorted(unknown)}")
    found = (check() for name, check in CHECKS.items() if name in wanted)
    return [problem for problem in found if problem]


def message(daemon: str, found: list[str]) -> str:
    """One start-up error naming every problem."""
    return (f"this host cannot run {daemon}: " + "; ".join(found)
            + " (docs/troubleshooting.md)")


def require(daemon: str, needs: Iterable[str]) -> None:
    """Refuse to start (one :class:`StartupError` naming every problem) unless the host
    has everything in ``needs``."""
    found = problems(needs)
    if found:
        raise StartupError(message(daemon, found))
