"""Bad configuration files are refused with one clear message and exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import BIN, router_toml

GOOD_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def base(tmp: Path) -> str:
    return router_toml("cfgtest", tmp)


# (case id, how to break a valid file, key the message must name, words it must contain)
BAD = [
    ("not-toml", lambda t: base(t) + "[policyd\n", "", "not valid TOML"),
    ("unknown-section", lambda t: base(t) + "[firewalld]\nx = 1\n", "firewalld",
     "unknown key"),
    ("unknown-key", lambda t: base(t).replace("[router]\n", '[router]\ninstanse = "x"\n'),
     "router.instanse", "unknown key"),
    ("wrong-type", lambda t: base(t) + 'metrics_port = "9100"\n', "policyd.metrics_port",
     "expected an integer"),
    ("bool-for-int", lambda t: base(t) + "metrics_port = true\n", "policyd.metrics_port",
     "expected an integer"),
    ("cidr-prefix-too-long", lambda t: base(t) + (
        '[[tunneld.peers]]\nname = "b"\npublic_key = "' + GOOD_KEY + '"\n'
        'allowed_prefixes = ["10.2.0.0/33"]\n'), "tunneld.peers[0].allowed_prefixes[0]",
     "expected a CIDR prefix"),
    ("cidr-host-bits", lambda t: base(t) + (
        '[[tunneld.peers]]\nname = "b"\npublic_key = "' + GOOD_KEY + '"\n'
        'allowed_prefixes = ["10.2.0.1/24"]\n'), "tunneld.peers[0].allowed_prefixes[0]",
     "host bits set"),
    ("port-range", lambda t: base(t) + "[tunneld]\nlisten_port = 70000\n",
     "tunneld.listen_port", "1-65535"),
    ("bad-instance", lambda t: base(t).replace('"cfgtest"', '"Bad Name"'), "router.instance",
     "expected 1-24 characters"),
    ("missing-required", lambda t: base(t).replace('instance = "cfgtest"\n', ""),
     "router.instance", "missing required key"),
    ("missing-section", lambda t: base(t).split("[policyd]")[0], "policyd",
     "missing required key"),
    ("bad-enum", lambda t: base(t).replace('zone = "internal"}',
                                            'zone = "internal", xdp_mode = "turbo"}'),
     "policyd.interfaces[0].xdp_mode", "one of 'native', 'generic'"),
    ("metrics-not-loopback", lambda t: base(t) + 'metrics_address = "0.0.0.0"\n',
     "policyd.metrics_address", "loopback"),
    ("duplicate-interface", lambda t: base(t).replace(
        'interfaces = [{name = "lo", zone = "internal"}]',
        'interfaces = [{name = "lo", zone = "internal"}, {name = "lo", zone = "external"}]'),
     "policyd.interfaces[1].name", "listed twice"),
    ("bad-public-key", lambda t: base(t) + (
        '[[tunneld.peers]]\nname = "b"\npublic_key = "c2hvcnQ="\n'
        'allowed_prefixes = ["10.2.0.0/24"]\n'), "tunneld.peers[0].public_key", "32-byte"),
    ("duplicate-metrics-port", lambda t: base(t) + "metrics_port = 9500\n[auditd]\n"
     "metrics_port = 9500\n", "auditd.metrics_port", "already used by policyd"),
    ("empty-interfaces", lambda t: base(t).replace(
        'interfaces = [{name = "lo", zone = "internal"}]', "interfaces = []"),
     "policyd.interfaces", "at least one entry"),
    ("relative-run-dir", lambda t: base(t).replace(f'run_dir = "{t}/run"',
                                                   'run_dir = "run"'),
     "router.run_dir", "absolute path"),
]


@pytest.mark.parametrize(("case", "make", "key", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_refused(tmp_path: Path, case: str, make: object, key: str,
                               words: str) -> None:
    path = tmp_path / f"{case}.toml"
    path.write_text(make(tmp_path))  # type: ignore[operator]
    proc = subprocess.run([str(BIN / "policyd"), "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message  # one clear line, no traceback
    assert str(path) in message
    assert key in message
    assert words in message


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    proc = subprocess.run([str(BIN / "policyd"), "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "cannot read" in proc.stderr


@pytest.mark.parametrize("daemon", ["policyd", "tunneld", "auditd", "idpd"])
def test_every_daemon_refuses_to_run_on_bad_config(tmp_path: Path, daemon: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(base(tmp_path) + "[idpd]\nissuer = \"ftp://nowhere\"\n")
    proc = subprocess.run([str(BIN / daemon), "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "idpd.issuer" in proc.stderr and "http(s) URL" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or created


def test_valid_config_passes_check(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(base(tmp_path) + (
        '[[tunneld.peers]]\nname = "b"\npublic_key = "' + GOOD_KEY + '"\n'
        'allowed_prefixes = ["10.2.0.0/24", "fd00:2::/64"]\nendpoint = "198.51.100.2:51820"\n'))
    proc = subprocess.run([str(BIN / "policyd"), "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "configuration is valid" in proc.stdout
