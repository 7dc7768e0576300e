"""Kernel capability probe: AF_XDP and which ciphers ``bpf_crypto_ctx_create`` accepts.

The crypto part is measured, not guessed: ``bpf/probe_crypto.bpf.c`` is compiled
with clang, loaded through libbpf (ctypes) as a BPF_PROG_TYPE_SYSCALL program
and run once per candidate with BPF_PROG_TEST_RUN; its return value is the
errno the kernel reported (0 = a crypto context was created and released).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
PROBE_SRC = BPF_DIR / "probe_crypto.bpf.c"
AF_XDP = 44
_BTF_KIND_STRUCT, _BTF_KIND_FUNC = 4, 12
_KFUNCS = ("bpf_crypto_ctx_create", "bpf_crypto_ctx_release")
_PARAMS_SIZE = 408  # sizeof(struct bpf_crypto_params) as hand-declared in the .bpf.c
_ERRNO_NAMES = {**errno.errorcode, errno.EOPNOTSUPP: "EOPNOTSUPP"}  # not "ENOTSUP"
_METHOD = "bpf_crypto_ctx_create via BPF_PROG_TYPE_SYSCALL + BPF_PROG_TEST_RUN"


@dataclass(frozen=True)
class Candidate:
    """One (type, algorithm, key length, authsize) tuple to offer the kernel."""

    type: str
    algo: str
    key_len: int
    authsize: int = 0

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``skcipher/cbc(aes)``."""
        return f"{self.type}/{self.algo}"


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("skcipher", "ecb(aes)", 16),
    Candidate("skcipher", "cbc(aes)", 16),
    Candidate("skcipher", "ctr(aes)", 16),
    Candidate("skcipher", "chacha20", 32),
    Candidate("skcipher", "rfc7539(chacha20,poly1305)", 32, 16),
    Candidate("aead", "rfc7539(chacha20,poly1305)", 32, 16),
    Candidate("aead", "gcm(aes)", 16, 16),
)


@dataclass(frozen=True)
class KernelProbeResult:
    """What the running kernel offers the tunnel datapath."""

    af_xdp: bool
    bpf_crypto_kfuncs: bool
    ciphers_accepted: list[str]
    ciphers_refused: list[str]
    method: str
    kernel_release: str
    notes: list[str] = field(default_factory=list)


# fmt: off
class _TestRunOpts(ctypes.Structure):
    """libbpf's ``struct bpf_test_run_opts`` (layout as of libbpf 1.1)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


class _CryptoParams(ctypes.Structure):
    """The kernel's ``struct bpf_crypto_params`` (must be 408 bytes)."""

    _fields_ = [
        ("type", ctypes.c_char * 14), ("reserved", ctypes.c_uint8 * 2),
        ("algo", ctypes.c_char * 128), ("key", ctypes.c_uint8 * 256),
        ("key_len", ctypes.c_uint32), ("authsize", ctypes.c_uint32),
    ]


_vp, _cp, _i32, _u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
_LIBBPF_SIGNATURES: tuple[tuple[str, type | None, list[type]], ...] = (  # name, restype, argtypes
    ("libbpf_set_print", _vp, [_vp]),
    ("btf__load_vmlinux_btf", _vp, []), ("btf__free", None, [_vp]),
    ("btf__find_by_name_kind", _i32, [_vp, _cp, _u32]), ("btf__type_by_id", _vp, [_vp, _u32]),
    ("bpf_object__open_file", _vp, [_cp, _vp]), ("bpf_object__load", _i32, [_vp]),
    ("bpf_object__close", None, [_vp]),
    ("bpf_object__find_program_by_name", _vp, [_vp, _cp]), ("bpf_program__fd", _i32, [_vp]),
    ("bpf_prog_test_run_opts", _i32, [_i32, ctypes.POINTER(_TestRunOpts)]),
)
# fmt: on


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def _errname(code: int) -> str:
    return _ERRNO_NAMES.get(code, f"errno {code}")


def _load_libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    for name, res, args in _LIBBPF_SIGNATURES:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


@contextmanager
def _libbpf_log(lib: ctypes.CDLL, sink: list[str]) -> Iterator[None]:
    """Route libbpf warnings (incl. verifier logs) into ``sink`` instead of stderr."""
    libc = ctypes.CDLL(None)
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    def emit(level: int, fmt: bytes, args: int) -> int:
        if level == 0:  # LIBBPF_WARN; INFO/DEBUG are noise here
            buf = ctypes.create_string_buffer(2048)
            libc.vsnprintf(buf, len(buf), fmt, args)
            sink.append(buf.value.decode(errors="replace").strip())
        return 0

    callback = _PRINT_FN(emit)  # must stay referenced while installed
    old = lib.libbpf_set_print(ctypes.cast(callback, ctypes.c_void_p))
    try:
        yield
    finally:
        lib.libbpf_set_print(old)


def _btf_facts(lib: ctypes.CDLL) -> tuple[bool, int]:
    """(both kfuncs are in vmlinux BTF, sizeof(struct bpf_crypto_params) there or -1)."""
    btf = lib.btf__load_vmlinux_btf()
    if not btf:
        raise RuntimeError(f"cannot load vmlinux BTF: {_errname(ctypes.get_errno())}")
    try:
        funcs = [lib.btf__find_by_name_kind(btf, k.encode(), _BTF_KIND_FUNC) for k in _KFUNCS]
        sid = lib.btf__find_by_name_kind(btf, b"bpf_crypto_params", _BTF_KIND_STRUCT)
        if sid <= 0:
            return all(f > 0 for f in funcs), -1
        btf_type = ctypes.cast(lib.btf__type_by_id(btf, sid), ctypes.POINTER(ctypes.c_uint32))
        return all(f > 0 for f in funcs), btf_type[2]  # {name_off, info, size}
    finally:
        lib.btf__free(btf)


def _compile(tmp: Path, release: str, cache_dir: Path | None, notes: list[str]) -> Path:
    """Compile the probe (or reuse a cached object keyed by source + kernel)."""
    src = PROBE_SRC.read_bytes()
    key = hashlib.sha256(src + b"\0" + release.encode()).hexdigest()[:16]
    cached = cache_dir / f"probe_crypto-{key}.o" if cache_dir else None
    if cached and cached.is_file():
        return cached
    clang = shutil.which("clang") or shutil.which("clang-14")
    if not clang:
        raise RuntimeError("clang not found on PATH")
    obj = tmp / "probe_crypto.bpf.o"
    argv = [clang, "-O2", "-g", "-target", "bpf", "-c", str(PROBE_SRC), "-o", str(obj)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"clang failed: {proc.stderr.strip()[-500:]}")
    if cached:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            part = cached.with_suffix(f".{os.getpid()}.part")
            shutil.copyfile(obj, part)
            os.replace(part, cached)  # atomic: concurrent daemons never see half a file
        except OSError as exc:
            notes.append(f"could not cache probe object in {cache_dir}: {exc}")
    return obj


def _run_candidates(
    lib: ctypes.CDLL, obj_path: Path, log: list[str]
) -> list[tuple[Candidate, int]]:
    """Load the probe and return (candidate, errno) pairs; errno 0 means accepted."""
    obj = lib.bpf_object__open_file(str(obj_path).encode(), None)
    if not obj:
        raise RuntimeError(f"bpf_object__open_file: {_errname(ctypes.get_errno())}")
    try:
        err = lib.bpf_object__load(obj)
        if err:
            raise RuntimeError(f"bpf_object__load: {_errname(-err)}: {' | '.join(log[-6:])}")
        prog_fd = lib.bpf_program__fd(lib.bpf_object__find_program_by_name(obj, b"probe_crypto"))
        results = []
        for cand in CANDIDATES:
            params = _CryptoParams(type=cand.type.encode(), algo=cand.algo.encode())
            params.key_len, params.authsize = cand.key_len, cand.authsize
            params.key[: cand.key_len] = [(i * 37 + 11) & 0xFF for i in range(cand.key_len)]
            ctx_in = ctypes.cast(ctypes.pointer(params), ctypes.c_void_p)
            opts = _TestRunOpts(
                sz=ctypes.sizeof(_TestRunOpts), ctx_in=ctx_in, ctx_size_in=_PARAMS_SIZE
            )
            rc = lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
            if rc:
                raise RuntimeError(f"BPF_PROG_TEST_RUN for {cand.label}: {_errname(-rc)}")
            results.append((cand, -ctypes.c_int32(opts.retval).value))
        return results
    finally:
        lib.bpf_object__close(obj)


def _af_xdp() -> bool:
    try:
        socket.socket(AF_XDP, socket.SOCK_RAW, 0).close()
    except OSError:
        return False
    return True


def probe_kernel(cache_dir: Path | str | None = None) -> KernelProbeResult:
    """Probe the running kernel; never raises (failures are reported in ``notes``).

    ``cache_dir``, if given, keeps the compiled probe object between runs so a
    daemon restart skips clang (keyed by a hash of the source and kernel release).
    """
    release = os.uname().release
    notes: list[str] = []
    accepted: list[str] = []
    refused: list[str] = []
    af_xdp, kfuncs, method = _af_xdp(), False, _METHOD
    if not af_xdp:
        notes.append("socket(AF_XDP, SOCK_RAW, 0) failed")
    try:
        lib = _load_libbpf()
        log: list[str] = []
        with _libbpf_log(lib, log):
            kfuncs, params_size = _btf_facts(lib)
            if not kfuncs:
                notes.append(f"{' / '.join(_KFUNCS)} not both in vmlinux BTF")
            elif params_size != _PARAMS_SIZE:
                notes.append(f"bpf_crypto_params is {params_size} B in BTF, not {_PARAMS_SIZE}")
            else:
                with tempfile.TemporaryDirectory(prefix="vpnr-probe-") as tmp:
                    cache = Path(cache_dir) if cache_dir else None
                    obj = _compile(Path(tmp), release, cache, notes)
                    for cand, code in _run_candidates(lib, obj, log):
                        if code == 0:
                            accepted.append(cand.label)
                        else:
                            refused.append(f"{cand.label}: {_errname(code)}")
    except Exception as exc:  # noqa: BLE001 - runs at daemon start: any failure becomes a note
        notes.append(f"kfunc probe failed: {type(exc).__name__}: {exc}")
    if not accepted and not refused:
        method = "none: kfunc could not be called; no cipher is claimed as accepted"
        refused = [f"{c.label}: UNKNOWN (not probed)" for c in CANDIDATES]
    elif any(r.startswith("aead/") and r.endswith(": ENOENT") for r in refused):
        notes.append("no 'aead' bpf_crypto type registered (ENOENT); only 'skcipher' exists")
    return KernelProbeResult(af_xdp, kfuncs, accepted, refused, method, release, notes)


def _is_chacha_aead(label: str) -> bool:
    # rfc7539(chacha20,poly1305) is an AEAD construction whichever bpf_crypto type carried it.
    return "chacha20" in label and "poly1305" in label


def choose_datapath(result: KernelProbeResult) -> tuple[str, str]:
    """Pick the tunnel datapath mode and give a one-line reason."""
    if any(_is_chacha_aead(c) for c in result.ciphers_accepted):
        return "kernel-aead", "kernel bpf_crypto accepted AEAD chacha20-poly1305"
    if result.af_xdp:
        return "afxdp-userspace-aead", "no kernel ChaCha20-Poly1305 AEAD; AF_XDP is available"
    return "udp-socket", "no kernel ChaCha20-Poly1305 AEAD and no AF_XDP; plain UDP sockets"
