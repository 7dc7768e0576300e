"""Build hook: generate the protobuf/gRPC stubs from proto/ with grpcio-tools.

The stubs land in services/v1/ (the package vpnr.v1) and are never committed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def generate_stubs() -> None:
    """Run protoc (from grpcio-tools) over proto/vpnr/v1/*.proto into services/v1/."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    out = ROOT / "services" / "v1"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--pyi_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + " ".join(protos))
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(Path(tmp) / "vpnr" / "v1", out)
    marker = '"""Generated from proto/vpnr/v1 by setup.py; do not edit."""\n'
    (out / "__init__.py").write_text(marker)
    # mypy cannot follow the vpnr -> services mapping: give it a path named vpnr.
    typing_link = ROOT / "build" / "typing" / "vpnr"
    if not typing_link.is_symlink():
        typing_link.parent.mkdir(parents=True, exist_ok=True)
        typing_link.symlink_to(Path("..") / ".." / "services")


# Every setuptools step (egg_info included, which checks that package directories exist)
# runs this file, so the stubs are generated before any of them.
generate_stubs()
setup()
