"""Runs the real kernel probe (root, BPF, clang): no mocks, no skips."""

from __future__ import annotations

import errno
import tempfile
import time
from pathlib import Path

import pytest

from vpnr.tunneld.probe import KernelProbeResult, choose_datapath, probe_kernel

pytestmark = pytest.mark.root

CHACHA_POLY = "rfc7539(chacha20,poly1305)"
ERRNO_NAMES = {*errno.errorcode.values(), "EOPNOTSUPP"}


@pytest.fixture(scope="module")
def result() -> KernelProbeResult:
    """One real probe for the whole module."""
    return probe_kernel()


def _refusal_errno(entry: str) -> str:
    return entry.rsplit(": ", 1)[1]


def test_af_xdp_socket_available(result: KernelProbeResult) -> None:
    assert result.af_xdp is True


def test_bpf_crypto_kfuncs_present(result: KernelProbeResult) -> None:
    assert result.bpf_crypto_kfuncs is True


def test_kfunc_was_really_called(result: KernelProbeResult) -> None:
    assert "BPF_PROG_TEST_RUN" in result.method, result.notes
    assert not any("probe failed" in n for n in result.notes), result.notes


def test_plain_aes_skcipher_accepted(result: KernelProbeResult) -> None:
    assert {"skcipher/ecb(aes)", "skcipher/cbc(aes)"} & set(result.ciphers_accepted), result


def test_chacha20_poly1305_refused_with_errno(result: KernelProbeResult) -> None:
    chacha = [r for r in result.ciphers_refused if CHACHA_POLY in r]
    assert {r.split(": ")[0] for r in chacha} == {f"skcipher/{CHACHA_POLY}", f"aead/{CHACHA_POLY}"}
    for entry in chacha:
        assert _refusal_errno(entry) in ERRNO_NAMES, entry
    assert not any(CHACHA_POLY in a for a in result.ciphers_accepted)


def test_every_candidate_reported_once(result: KernelProbeResult) -> None:
    labels = result.ciphers_accepted + [r.split(": ")[0] for r in result.ciphers_refused]
    assert len(labels) == len(set(labels)) >= 5


def test_kernel_release_matches_uname(result: KernelProbeResult) -> None:
    assert result.kernel_release == Path("/proc/sys/kernel/osrelease").read_text().strip()


def test_choose_datapath_on_this_kernel(result: KernelProbeResult) -> None:
    mode, reason = choose_datapath(result)
    assert mode == "afxdp-userspace-aead"
    assert reason and "\n" not in reason


def test_choose_datapath_branches() -> None:
    base = KernelProbeResult(True, True, [], [], "m", "r", [])
    aead = KernelProbeResult(True, True, [f"aead/{CHACHA_POLY}"], [], "m", "r", [])
    bare = KernelProbeResult(False, False, [], [], "m", "r", [])
    assert choose_datapath(aead)[0] == "kernel-aead"
    assert choose_datapath(base)[0] == "afxdp-userspace-aead"
    assert choose_datapath(bare)[0] == "udp-socket"


def test_cache_dir_reuses_object_and_is_fast(result: KernelProbeResult, tmp_path: Path) -> None:
    first = probe_kernel(cache_dir=tmp_path)
    objects = list(tmp_path.glob("probe_crypto-*.o"))
    assert len(objects) == 1
    mtime = objects[0].stat().st_mtime_ns
    start = time.perf_counter()
    second = probe_kernel(cache_dir=tmp_path)
    elapsed = time.perf_counter() - start
    assert objects[0].stat().st_mtime_ns == mtime
    assert first == second == result
    assert elapsed < 1.0


def test_no_temp_files_left_behind() -> None:
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("vpnr-probe-*"))
    probe_kernel()
    assert set(tmp.glob("vpnr-probe-*")) == before
