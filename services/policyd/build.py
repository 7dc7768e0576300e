"""Compile and load the XDP program in a short-lived child process.

bcc brings LLVM with it (~130 MB resident that is never given back), so policyd itself never
imports bcc: this module runs as ``python -m vpnr.policyd.build``, loads the program, stamps
its build id into the settings map, pins it at a staging path and exits. policyd then opens
the pin. A compiler or verifier error is printed on stderr and gives exit code 1.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from collections.abc import Sequence

from vpnr.core import bpfsys

SETTINGS_MAP = "vpnr_settings"
SETTINGS = struct.Struct("=32sQII")  # struct vpnr_settings in bpf/lib/maps.h


def settings_map_fd(prog_fd: int) -> int | None:
    """The fd of the program's settings map, found among the maps it uses."""
    for map_id in bpfsys.prog_info(prog_fd).map_ids:
        fd = bpfsys.fd_by_id("map", map_id)
        if bpfsys.map_info(fd).name == SETTINGS_MAP:
            return fd
        os.close(fd)
    return None


def build(source: str, function: str, cflags: list[str], build_id: bytes, staging: str,
          stages: str = "", stage_functions: Sequence[str] = (), prog_type: str = "xdp",
          stages_table: str = "xdp_stages") -> None:
    """Compile, load, stamp and pin; raises on any failure.

    ``stage_functions`` are loaded into the program array ``stages_table`` (tail calls), which
    is pinned at ``stages``: the kernel empties a program array once no file or pin holds it.
    ``prog_type``: ``xdp`` (policyd) or ``sched_cls`` (tunneld's decap program).
    """
    import ctypes

    from bcc import BPF

    kind = {"xdp": BPF.XDP, "sched_cls": BPF.SCHED_CLS}[prog_type]
    program = BPF(src_file=source, cflags=cflags)
    loaded = program.load_func(function, kind)
    if stage_functions:
        table = program.get_table(stages_table)
        for index, name in enumerate(stage_functions):
            stage = program.load_func(name, kind)
            table[ctypes.c_int(index)] = ctypes.c_int(stage.fd)
        bpfsys.obj_pin(table.map_fd, stages)
    settings_fd = settings_map_fd(loaded.fd)
    if settings_fd is None:
        raise RuntimeError(f"{source}: program has no {SETTINGS_MAP} map")
    try:
        bpfsys.map_update(settings_fd, struct.pack("=I", 0), SETTINGS.pack(build_id, 0, 0, 0))
    finally:
        os.close(settings_fd)
    bpfsys.obj_pin(loaded.fd, staging)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the build child."""
    parser = argparse.ArgumentParser(prog="python -m vpnr.policyd.build")
    parser.add_argument("--source", required=True)
    parser.add_argument("--function", required=True)
    parser.add_argument("--cflag", action="append", default=[])
    parser.add_argument("--build-id", required=True, help="hex")
    parser.add_argument("--staging", required=True, help="bpffs path to pin the program at")
    parser.add_argument("--stages", default="", help="bpffs path to pin the tail-call array at")
    parser.add_argument("--stage-function", action="append", default=[])
    parser.add_argument("--prog-type", choices=("xdp", "sched_cls"), default="xdp")
    parser.add_argument("--stages-table", default="xdp_stages")
    args = parser.parse_args(argv)
    try:
        build(args.source, args.function, args.cflag, bytes.fromhex(args.build_id),
              args.staging, args.stages, args.stage_function, args.prog_type,
              args.stages_table)
    except Exception as exc:  # noqa: BLE001 - bcc raises bare Exception; report and fail
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
