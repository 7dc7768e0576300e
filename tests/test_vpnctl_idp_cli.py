"""vpnctl's idp verbs without idpd: the command line of every verb, the clear error when
idpd's socket is missing, the WaitLogin loop over an in-memory source and a fake clock, the
text of idpd's answers, and the PKCE loopback listener with real HTTP requests from another
thread. End-to-end tests against a real idpd live elsewhere.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from vpnr.v1 import common_pb2, idp_pb2
from vpnr.vpnctl.idp_verbs import (
    EXIT_HELD,
    RedirectListener,
    receive_redirect,
    sync_exit_code,
    wait_for_login,
)
from vpnr.vpnctl.idp_view import (
    bindings_text,
    config_text,
    connection_failed,
    connection_text,
    login_text,
    logins_text,
    part_states,
    status_text,
    sync_lines,
)
from vpnr.vpnctl.main import main, parse_args
from vpnr.vpnctl.reflection import RpcFailure, VpnctlError

VPNCTL = Path(sys.executable).parent / "vpnctl"
NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
VERBS = ["status", "config", "test-connection", "sync", "login", "logout", "logins",
         "bindings"]


def stamp(text: str) -> Timestamp:
    """A Timestamp from RFC 3339 text."""
    result = Timestamp()
    result.FromJsonString(text)
    return result


def vpnctl(tmp_path: Path, capsys: pytest.CaptureFixture[str],
           *argv: str) -> tuple[int, str, str]:
    """vpnctl in-process against an instance with no daemon: exit code, stdout, stderr."""
    code = main(["--instance", "nosuch", "--run-dir", str(tmp_path / "run"), *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------- command line

@pytest.mark.parametrize("argv", [["idp"], *(["idp", verb] for verb in VERBS)], ids=" ".join)
def test_help_of_every_idp_verb_ends_with_examples(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n" in out
    last = out.rstrip().splitlines()[-1].strip()
    assert last.startswith("vpnctl ") and " idp " in last
    if len(argv) > 1:
        assert f"idp {argv[1]}" in out.split("\nexamples:\n")[1]


def test_top_level_help_lists_idp_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "idp" in out.split("examples:")[0]
    assert "vpnctl idp login --address 10.1.0.10" in out


def test_login_help_as_a_console_script() -> None:
    done = subprocess.run([str(VPNCTL), "idp", "login", "--help"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert "--flow {device,pkce}" in done.stdout
    assert "--no-wait" in done.stdout
    assert "give up waiting after this long" in done.stdout  # the login's own --timeout
    assert "vpnctl idp login --address 10.1.0.10 --flow pkce" in done.stdout


def test_parsed_arguments() -> None:
    args = parse_args(["idp", "login", "--address", "fd00:1:0::10"], environ={})
    assert (args.address, args.flow, args.no_wait, args.timeout) == \
        ("fd00:1::10", "device", False, None)
    args = parse_args(["idp", "login", "--address", "10.1.0.10", "--flow", "pkce",
                       "--timeout", "90", "-o", "json"], environ={})
    assert (args.flow, args.timeout, args.output) == ("pkce", 90.0, "json")
    assert parse_args(["idp", "sync"], environ={}).confirm is None
    assert parse_args(["idp", "sync", "--confirm", "h1"], environ={}).confirm == "h1"
    assert parse_args(["idp", "logins", "--all"], environ={}).all is True
    args = parse_args(["idp", "logout", "--login", "L1"], environ={})
    assert (args.login, args.address) == ("L1", None)
    # The other verbs keep the per-call --timeout, before or after the verb.
    assert parse_args(["idp", "status", "--timeout", "2"], environ={}).timeout == 2.0
    assert parse_args(["--timeout", "3", "idp", "bindings"], environ={}).timeout == 3.0


@pytest.mark.parametrize(("argv", "message"), [
    (["login"], "the following arguments are required: --address"),
    (["login", "--address", "10.1.0.300"], "argument --address: expected an IPv4 or IPv6"),
    (["login", "--address", "10.1.0.10", "--flow", "saml"], "argument --flow: invalid choice"),
    (["login", "--address", "10.1.0.10", "--timeout", "-1"],
     "argument --timeout: expected a number of seconds >= 0"),
    (["login", "--address", "10.1.0.10", "--timeout", "soon"],
     "argument --timeout: expected a number of seconds"),
    (["logout"], "one of the arguments --address --login is required"),
    (["logout", "--address", "10.1.0.10", "--login", "L1"],
     "argument --login: not allowed with argument --address"),
    (["sync", "--confirm"], "argument --confirm: expected one argument"),
    (["status", "extra"], "unrecognized arguments: extra"),
    (["whoami"], "invalid choice: 'whoami'"),
])
def test_bad_arguments_exit_2_naming_the_option(argv: list[str], message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = vpnctl(tmp_path, capsys, "idp", *argv)
    assert (code, out) == (2, "")
    assert message in err


def test_no_wait_with_pkce_is_a_usage_error_before_any_rpc(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = vpnctl(tmp_path, capsys, "idp", "login", "--address", "10.1.0.10",
                            "--flow", "pkce", "--no-wait")
    assert (code, out) == (2, "")
    assert err.startswith("error: --no-wait only applies to --flow device")


@pytest.mark.parametrize("argv", [
    ["status"], ["config"], ["test-connection"], ["sync"], ["sync", "--confirm", "h1"],
    ["login", "--address", "10.1.0.10"], ["login", "--address", "10.1.0.10", "--no-wait"],
    ["login", "--address", "10.1.0.10", "--flow", "pkce"],
    ["logout", "--address", "10.1.0.10"], ["logout", "--login", "L1"],
    ["logins"], ["logins", "--all"], ["bindings"], ["status", "-o", "json"],
], ids=" ".join)
def test_down_idpd_names_the_socket(argv: list[str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = vpnctl(tmp_path, capsys, "idp", *argv)
    assert (code, out) == (3, "")  # 3: daemon unreachable
    socket_file = tmp_path / "run" / "nosuch" / "idpd.sock"
    assert err == f"error: cannot reach idpd at {socket_file}: no socket\n"


def test_stale_idpd_socket_as_a_console_script(tmp_path: Path) -> None:
    instance = tmp_path / "run" / "b"
    instance.mkdir(parents=True)
    path = instance / "idpd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: nobody answers
    done = subprocess.run([str(VPNCTL), "--run-dir", str(tmp_path / "run"), "--instance", "b",
                           "idp", "login", "--address", "10.1.0.10"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout) == (3, "")  # 3: daemon unreachable
    assert done.stderr == (f"error: cannot reach idpd at {path}: "
                           "unavailable (stale socket: nobody is listening)\n")


# ------------------------------------------------------------------------ wait loop

class FakeClock:
    """monotonic() and sleep() that only move when told to."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


def login(state: idp_pb2.LoginState, error: str = "", username: str = "") -> idp_pb2.Login:
    """A Login in ``state``."""
    return idp_pb2.Login(state=state, error=error, username=username)


def scripted(clock: FakeClock, answers: list[tuple[float, idp_pb2.Login | RpcFailure]],
             budgets: list[float]) -> Callable[[float], idp_pb2.Login]:
    """A WaitLogin that takes the given time and answers (or fails) as scripted."""
    steps = iter(answers)

    def wait(budget: float) -> idp_pb2.Login:
        budgets.append(round(budget, 6))
        took, answer = next(steps)
        clock.now += took
        if isinstance(answer, RpcFailure):
            raise answer
        return answer

    return wait


def test_wait_returns_the_login_once_it_is_no_longer_pending() -> None:
    clock, budgets = FakeClock(), list[float]()
    pending = login(idp_pb2.LOGIN_STATE_PENDING)
    active = login(idp_pb2.LOGIN_STATE_ACTIVE, username="alice")
    wait = scripted(clock, [(29.5, pending), (12.0, active)], budgets)
    found = wait_for_login(wait, 600.0, 5.0, clock.clock, clock.sleep)
    assert found is not None and found.username == "alice"
    assert budgets == [30.0, 30.0]
    assert clock.sleeps == []  # the server held each call: nothing to pace


def test_wait_paces_a_server_that_answers_pending_at_once() -> None:
    clock, budgets = FakeClock(), list[float]()
    pending = login(idp_pb2.LOGIN_STATE_PENDING)
    wait = scripted(clock, [(0.5, pending), (0.0, pending),
                            (0.1, login(idp_pb2.LOGIN_STATE_DENIED, error="access_denied"))],
                    budgets)
    found = wait_for_login(wait, 600.0, 5.0, clock.clock, clock.sleep)
    assert found is not None and found.state == idp_pb2.LOGIN_STATE_DENIED
    assert clock.sleeps == [4.5, 5.0]


def test_wait_treats_deadline_exceeded_as_pending_and_gives_up_at_the_bound() -> None:
    clock, budgets = FakeClock(), list[float]()
    late = RpcFailure("DEADLINE_EXCEEDED", "Deadline Exceeded")
    wait = scripted(clock, [(30.0, late), (30.0, late), (10.0, late)], budgets)
    assert wait_for_login(wait, 70.0, 5.0, clock.clock, clock.sleep) is None
    assert budgets == [30.0, 30.0, 10.0]  # the last call only gets what is left
    assert clock.now == 170.0


def test_wait_propagates_other_errors() -> None:
    clock, budgets = FakeClock(), list[float]()
    wait = scripted(clock, [(0.0, RpcFailure("NOT_FOUND", "no login L9"))], budgets)
    with pytest.raises(RpcFailure, match="NOT_FOUND: no login L9"):
        wait_for_login(wait, None, 5.0, clock.clock, clock.sleep)


def test_wait_with_a_bound_already_past_asks_nothing() -> None:
    clock, budgets = FakeClock(), list[float]()
    assert wait_for_login(scripted(clock, [], budgets), 0.0, 5.0, clock.clock,
                          clock.sleep) is None
    assert budgets == []


# ------------------------------------------------------------------------ rendering

HELD = idp_pb2.SyncResult(outcome=idp_pb2.SYNC_OUTCOME_HELD, sync_id="h42", added=1,
                          removed=30, changed=0, total=40)
APPLIED = idp_pb2.SyncResult(outcome=idp_pb2.SYNC_OUTCOME_APPLIED, sync_id="s7", added=2,
                             removed=1, changed=3, total=41, policy_version=9,
                             duration_seconds=1.25, warnings=["role 'x' unknown to policyd"])
FAILED = idp_pb2.SyncResult(outcome=idp_pb2.SYNC_OUTCOME_FAILED, sync_id="s8",
                            error="SCIM: connection refused")


def test_sync_outcomes_lines_and_exit_codes() -> None:
    assert sync_lines(APPLIED) == [
        "sync s7: applied (added 2, removed 1, changed 3, total 41), policy version 9, "
        "1.250s", "warning: role 'x' unknown to policyd"]
    assert sync_lines(HELD) == [
        "sync h42 held by the mass-deletion guard: added 1, removed 30, changed 0, total 40",
        "held sync id: h42", "to apply it: vpnctl idp sync --confirm h42"]
    assert sync_lines(FAILED)[-1] == "error: SCIM: connection refused"
    unchanged = idp_pb2.SyncResult(outcome=idp_pb2.SYNC_OUTCOME_UNCHANGED)
    assert [sync_exit_code(r) for r in (APPLIED, unchanged, HELD, FAILED)] == \
        [0, 0, EXIT_HELD, 1]
    assert EXIT_HELD != 0


def test_status_table_and_json() -> None:
    status = idp_pb2.IdpStatus(
        daemon=common_pb2.DaemonInfo(daemon="idpd"), issuer="https://idp.example/realms/a",
        discovery_ok=True, discovery_fetched_at=stamp("2026-11-21T11:59:00Z"),
        last_sync=stamp("2026-11-21T11:55:00Z"), last_good_sync=stamp("2026-11-21T11:50:00Z"),
        staleness_seconds=600, stale=True, consecutive_failures=2,
        next_sync=stamp("2026-11-21T12:01:00Z"), bindings=12, active_logins=3,
        directory_entries=40, tokens_rejected=5, held_sync_id="h42", held=HELD,
        last_result=FAILED, policy_version=9,
        warnings=[common_pb2.Warning(code="stale", message="last sync failed")])
    text = status_text(status, NOW, "table")
    for expected in ("issuer:", "https://idp.example/realms/a",
                     "discovery:", "ok (fetched 2026-11-21T11:59:00Z (1m00s ago))",
                     "2026-11-21T11:55:00Z (5m00s ago)", "staleness:", "10m00s",
                     "yes: the last sync failed", "2026-11-21T12:01:00Z (in 1m00s)",
                     "tokens rejected:", "held sync:", "  id:", "h42",
                     "vpnctl idp sync --confirm h42", "last result:", "failed",
                     "SCIM: connection refused", "stale: last sync failed"):
        assert expected in text, expected
    data = yaml.safe_load(status_text(status, NOW, "json"))
    assert data["held_sync_id"] == "h42" and data["held"]["removed"] == 30
    assert data["last_result"]["outcome"] == "SYNC_OUTCOME_FAILED"
    idle = status_text(idp_pb2.IdpStatus(discovery_error="HTTP 503"), NOW, "table")
    assert "error: HTTP 503" in idle and "none yet" in idle
    assert yaml.safe_load(status_text(idp_pb2.IdpStatus(), NOW, "yaml"))["stale"] is False


def test_config_never_shows_a_secret() -> None:
    config = idp_pb2.IdpConfig(issuer="https://idp.example", client_id="vpnr",
                               client_secret_set=True, scopes=["openid", "groups"],
                               sync_interval_seconds=300, max_delete_share=0.2,
                               claim_mappings=["groups =~ ^eng- -> engineer"])
    text = config_text(config, "table")
    assert "client secret:" in text and "set" in text
    assert "5m00s (300s)" in text and "20%" in text
    assert "groups =~ ^eng- -> engineer" in text
    assert config_text(idp_pb2.IdpConfig(), "table").count("not set") == 1


def test_connection_parts_and_failure() -> None:
    good = idp_pb2.TestConnectionResponse(discovery_ok=True, jwks_ok=True, token_ok=True,
                                          latency_seconds=0.0421)
    assert part_states(good) == {"discovery": "ok", "jwks": "ok", "token": "ok", "scim": "-"}
    assert not connection_failed(good)
    assert "0.042s" in connection_text(good, "table")
    bad = idp_pb2.TestConnectionResponse(discovery_ok=True, jwks_ok=True,
                                         errors=["token endpoint: HTTP 401 invalid_client"])
    assert part_states(bad)["token"] == "FAILED" and connection_failed(bad)
    assert connection_failed(idp_pb2.TestConnectionResponse())
    assert yaml.safe_load(connection_text(bad, "json"))["token_ok"] is False


def test_login_logins_and_bindings_text() -> None:
    alice = idp_pb2.Login(login_id="L1", subject="0c6f", username="alice",
                          address="10.1.0.10", groups=["eng-core"], roles=["engineer"],
                          state=idp_pb2.LOGIN_STATE_ACTIVE, flow=idp_pb2.LOGIN_FLOW_DEVICE,
                          expires_at=stamp("2026-11-21T20:00:00Z"))
    text = login_text(alice, NOW, "table")
    for expected in ("alice", "0c6f", "10.1.0.10", "engineer", "eng-core", "active",
                     "2026-11-21T20:00:00Z (in 8h00m)"):
        assert expected in text
    lines = logins_text([alice], "table").splitlines()
    assert lines[0].split() == ["LOGIN", "USERNAME", "ADDRESS", "STATE", "ROLES", "EXPIRES"]
    assert lines[1].split() == ["L1", "alice", "10.1.0.10", "active", "engineer",
                                "2026-11-21T20:00:00Z"]
    assert logins_text([], "table") == "(no logins)"
    assert yaml.safe_load(logins_text([alice], "yaml"))[0]["username"] == "alice"
    binding = idp_pb2.IdpBinding(prefix="10.1.0.10/32", roles=["engineer", "ops"],
                                 subject="0c6f", origin="login", username="alice",
                                 groups=["eng-core"])
    lines = bindings_text([binding], "table").splitlines()
    assert lines[0].split() == ["PREFIX", "ROLES", "USERNAME", "SUBJECT", "ORIGIN", "GROUPS"]
    assert "10.1.0.10/32  engineer, ops  alice" in lines[1]
    assert bindings_text([], "json") == "[]"


# ------------------------------------------------------------ loopback redirect (PKCE)

@pytest.fixture
def listener() -> Iterator[RedirectListener]:
    with RedirectListener("http://127.0.0.1:0/callback") as opened:
        yield opened


def get(url: str, **params: str) -> httpx.Response:
    return httpx.get(url, params=params, timeout=5, follow_redirects=False)


def test_listener_returns_the_query_and_answers_signed_in(listener: RedirectListener) -> None:
    assert listener.url == f"http://127.0.0.1:{listener.port}/callback"
    assert listener.port != 0
    reply = get(listener.url, code="abc", state="xyz", iss="https://idp.example")
    assert reply.status_code == 200
    assert "Signed in, you can close this window." in reply.text
    assert reply.headers["cache-control"] == "no-store"
    assert listener.wait(1) == {"code": "abc", "state": "xyz", "iss": "https://idp.example"}


def test_listener_wrong_path_is_404_and_keeps_waiting(listener: RedirectListener) -> None:
    base = f"http://127.0.0.1:{listener.port}"
    assert get(base + "/favicon.ico").status_code == 404
    assert get(base + "/callback/x", code="abc").status_code == 404
    assert get(listener.url, state="no-code").status_code == 400
    assert listener.wait(0.1) is None
    assert get(listener.url, code="c2", state="s2").status_code == 200
    assert listener.wait(1) == {"code": "c2", "state": "s2"}
    assert get(listener.url, code="late").status_code == 409  # the first one counts


def test_receive_redirect_with_a_browser_in_another_thread() -> None:
    replies: list[httpx.Response] = []

    def browser(url: str) -> None:
        thread = threading.Thread(target=lambda: replies.append(
            get(url, error="access_denied", error_description="The user <b>said no</b>",
                state="xyz")))
        thread.start()

    query = receive_redirect("http://127.0.0.1:0/cb", 5, browser)
    assert query == {"error": "access_denied", "error_description": "The user <b>said no</b>",
                     "state": "xyz"}
    for _ in range(50):
        if replies:
            break
        threading.Event().wait(0.1)
    assert replies[0].status_code == 200
    assert "Sign-in failed" in replies[0].text
    assert "access_denied: The user &lt;b&gt;said no&lt;/b&gt;" in replies[0].text


def test_receive_redirect_times_out_with_the_address() -> None:
    urls: list[str] = []
    with pytest.raises(VpnctlError, match=r"no browser came back to http://127\.0\.0\.1:"
                                          r"\d+/callback within 0\.2s"):
        receive_redirect("http://127.0.0.1:0/callback", 0.2, urls.append)
    assert len(urls) == 1


def test_busy_port_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(VpnctlError) as failure:
            RedirectListener(f"http://127.0.0.1:{port}/callback")
    message = str(failure.value)
    assert f"cannot listen on 127.0.0.1:{port}" in message
    assert "already in use" in message


@pytest.mark.parametrize("uri", ["https://127.0.0.1:8765/callback",
                                 "http://idp.example:8765/callback",
                                 "http://10.1.0.1:8765/callback",
                                 "http://127.0.0.1/callback", "not a url"])
def test_only_loopback_http_redirects_are_listened_on(uri: str) -> None:
    with pytest.raises(VpnctlError, match="is not a loopback"):
        RedirectListener(uri)


def test_listener_port_is_free_again_after_close() -> None:
    with RedirectListener("http://127.0.0.1:0/callback") as first:
        port = first.port
    with RedirectListener(f"http://127.0.0.1:{port}/callback") as second:
        assert second.port == port
