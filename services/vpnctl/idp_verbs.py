"""``vpnctl idp ...``: idpd's IdpService without writing JSON.

``status``, ``config``, ``test-connection``, ``sync`` (and ``sync --confirm``), ``logins``,
``bindings`` and ``logout`` are one call each; ``login`` runs a user's sign-in for a device
address, either with the device grant (RFC 8628: a code to enter on another device, then
WaitLogin until it completes) or with code + PKCE (RFC 7636/8252: vpnctl listens on idpd's
loopback redirect URI, the browser comes back to it, and CompleteLogin hands idpd what it
brought). Text comes from :mod:`vpnr.vpnctl.idp_view`; the wait loop
(:func:`wait_for_login`) and the loopback listener (:class:`RedirectListener`,
:func:`receive_redirect`) are plain code over callables and sockets so that they can be
tested without idpd. Tokens never reach vpnctl, and the authorization code the browser
brings back is passed to idpd, never printed.
"""

from __future__ import annotations

import argparse
import errno
import html
import ipaddress
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from google.protobuf.message import Message

from vpnr.v1 import idp_pb2, idp_pb2_grpc
from vpnr.vpnctl.commandline import (
    DEFAULT_TIMEOUT,
    Handler,
    Subcommands,
    add_group,
    add_verb,
    emit,
    examples_epilog,
)
from vpnr.vpnctl.exitcodes import EXIT_FAILURE
from vpnr.vpnctl.idp_view import (
    bindings_text,
    config_text,
    confirm_command,
    connection_failed,
    connection_text,
    document,
    login_text,
    logins_text,
    state_label,
    status_text,
    sync_lines,
)
from vpnr.vpnctl.output import human_duration, render
from vpnr.vpnctl.policy_verbs import address_arg
from vpnr.vpnctl.reflection import (
    RpcFailure,
    UsageError,
    VpnctlError,
    socket_path,
)
from vpnr.vpnctl.service_client import Reply, ServiceClient

EXIT_OK = 0
# A sync held by the mass-deletion guard needs an operator: vpnctl has no separate code
# for "needs attention", so it exits like any failure (1), with the way out on stdout.
EXIT_HELD = EXIT_FAILURE

# Deadlines of the calls that talk to the IdP behind idpd (the default 5 s is for calls
# idpd answers from memory); --timeout overrides them as it does every call's.
SYNC_TIMEOUT = 120.0
TEST_CONNECTION_TIMEOUT = 60.0
COMPLETE_LOGIN_TIMEOUT = 30.0
# WaitLogin: each call asks idpd to hold it this long at most (idpd answers early when the
# login ends or its own deadline nears); vpnctl calls again while the login is pending.
WAIT_CALL_SECONDS = 30.0
MIN_WAIT_CALL_SECONDS = 1.0
DEFAULT_POLL_INTERVAL = 5.0
# Device flow without --timeout: until the code expires, plus this for idpd to say so.
EXPIRY_GRACE_SECONDS = 5.0
DEVICE_WAIT_FALLBACK = 900.0    # a challenge without expires_at (idpd should send one)
PKCE_DEFAULT_TIMEOUT = 300.0
REDIRECT_REQUEST_TIMEOUT = 10.0  # one browser connection may not hold the listener longer

FLOWS = {"device": idp_pb2.LOGIN_FLOW_DEVICE, "pkce": idp_pb2.LOGIN_FLOW_CODE_PKCE}
ENDED_MESSAGES = {
    idp_pb2.LOGIN_STATE_DENIED: "the sign-in was denied",
    idp_pb2.LOGIN_STATE_EXPIRED: "the login expired before the sign-in completed",
    idp_pb2.LOGIN_STATE_REVOKED: "the login was revoked",
    idp_pb2.LOGIN_STATE_FAILED: "the login failed",
}


def seconds_arg(text: str) -> float:
    """A number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


# ------------------------------------------------------------------------------ client

class IdpClient(ServiceClient):
    """One connection to idpd; calls carry the client's deadline unless told otherwise."""

    daemon = "idpd"
    stub_class = idp_pb2_grpc.IdpServiceStub

    def call_within(self, method: str, request: Message, reply_type: type[Reply],
                    timeout: float | None) -> Reply:
        """One unary call with its own deadline."""
        saved, self.timeout = self.timeout, timeout
        try:
            return self.call(method, request, reply_type)
        finally:
            self.timeout = saved


def connect(args: argparse.Namespace, default_timeout: float = DEFAULT_TIMEOUT) -> IdpClient:
    """A client on the instance's idpd socket: --timeout if given (0: none), else
    ``default_timeout``."""
    if args.timeout is None:
        timeout: float | None = default_timeout
    else:
        timeout = float(args.timeout) or None
    return IdpClient(socket_path(args.run_dir, args.instance, "idpd"), timeout)


def now_utc() -> datetime:
    """The wall clock, timezone-aware."""
    return datetime.now(UTC)


# ---------------------------------------------------------------------- plain verbs

def cmd_idp_status(args: argparse.Namespace) -> int:
    """Status."""
    with connect(args) as client:
        status = client.call("Status", idp_pb2.IdpStatusRequest(), idp_pb2.IdpStatus)
    emit(status_text(status, now_utc(), args.output))
    return EXIT_OK


def cmd_idp_config(args: argparse.Namespace) -> int:
    """GetConfig (the client secret is never sent, only whether one is set)."""
    with connect(args) as client:
        config = client.call("GetConfig", idp_pb2.GetIdpConfigRequest(), idp_pb2.IdpConfig)
    emit(config_text(config, args.output))
    return EXIT_OK


def cmd_idp_test_connection(args: argparse.Namespace) -> int:
    """TestConnection; exit 1 when idpd reports an error or discovery is not ok."""
    with connect(args, TEST_CONNECTION_TIMEOUT) as client:
        reply = client.call("TestConnection", idp_pb2.TestConnectionRequest(),
                            idp_pb2.TestConnectionResponse)
    emit(connection_text(reply, args.output))
    return EXIT_FAILURE if connection_failed(reply) else EXIT_OK


def sync_exit_code(result: idp_pb2.SyncResult) -> int:
    """0 applied or unchanged; :data:`EXIT_HELD` held; 1 failed (or an unknown outcome)."""
    if result.outcome in (idp_pb2.SYNC_OUTCOME_APPLIED, idp_pb2.SYNC_OUTCOME_UNCHANGED):
        return EXIT_OK
    if result.outcome == idp_pb2.SYNC_OUTCOME_HELD:
        return EXIT_HELD
    return EXIT_FAILURE


def cmd_idp_sync(args: argparse.Namespace) -> int:
    """SyncNow, or ConfirmSync of a held sync with --confirm."""
    with connect(args, SYNC_TIMEOUT) as client:
        if args.confirm:
            result = client.call("ConfirmSync",
                                 idp_pb2.ConfirmSyncRequest(held_sync_id=args.confirm),
                                 idp_pb2.SyncResult)
        else:
            result = client.call("SyncNow", idp_pb2.SyncNowRequest(), idp_pb2.SyncResult)
    if args.output == "table":
        emit("\n".join(sync_lines(result)))
    else:
        emit(document(result, args.output))
        if result.outcome == idp_pb2.SYNC_OUTCOME_HELD:
            print(f"sync {result.sync_id} is held; to apply it: "
                  f"{confirm_command(result.sync_id or 'ID')}", file=sys.stderr)
    if result.outcome == idp_pb2.SYNC_OUTCOME_FAILED:
        print(f"error: sync failed: {result.error or 'no reason given'} "
              "(the last good set stays in force)", file=sys.stderr)
    return sync_exit_code(result)


def cmd_idp_logins(args: argparse.Namespace) -> int:
    """ListLogins (active ones, or every one with --all)."""
    with connect(args) as client:
        logins = client.list_all("ListLogins", idp_pb2.ListLoginsRequest(all=args.all),
                                 idp_pb2.ListLoginsResponse, "logins")
    emit(logins_text(logins, args.output))
    return EXIT_OK


def cmd_idp_bindings(args: argparse.Namespace) -> int:
    """ListBindings: the compiled set last pushed to policyd."""
    with connect(args) as client:
        bindings = client.list_all("ListBindings", idp_pb2.ListIdpBindingsRequest(),
                                   idp_pb2.ListIdpBindingsResponse, "bindings")
    emit(bindings_text(bindings, args.output))
    return EXIT_OK


def cmd_idp_logout(args: argparse.Namespace) -> int:
    """Logout by login id or device address."""
    request = idp_pb2.LogoutRequest(login_id=args.login or "", address=args.address or "")
    with connect(args) as client:
        reply = client.call("Logout", request, idp_pb2.LogoutResponse)
    which = f"login {args.login}" if args.login else f"address {args.address}"
    if args.output == "table":
        emit(f"logged out {which} (policy version {reply.policy_version})")
    else:
        data = {"login_id": args.login or "", "address": args.address or "",
                "policy_version": reply.policy_version}
        emit(render(data, args.output))
    return EXIT_OK


# ------------------------------------------------------------------------------ login

def wait_for_login(wait: Callable[[float], idp_pb2.Login], bound: float | None,
                   interval: float = DEFAULT_POLL_INTERVAL,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> idp_pb2.Login | None:
    """Call ``wait(deadline_seconds)`` (one WaitLogin) until the login is no longer
    pending; None when it still is after ``bound`` seconds (None: no bound).

    Each call gets :data:`WAIT_CALL_SECONDS`, less when the bound is nearer (never under
    :data:`MIN_WAIT_CALL_SECONDS`). A call that ends in DEADLINE_EXCEEDED counts as
    "still pending"; any other error propagates. A call that comes back sooner than
    ``interval`` is followed by a pause, so a server that answers at once is polled, not
    hammered.
    """
    deadline = None if bound is None else clock() + bound
    while True:
        remaining = None if deadline is None else deadline - clock()
        if remaining is not None and remaining <= 0:
            return None
        budget = WAIT_CALL_SECONDS if remaining is None else \
            max(min(WAIT_CALL_SECONDS, remaining), MIN_WAIT_CALL_SECONDS)
        started = clock()
        try:
            login = wait(budget)
        except RpcFailure as failure:
            if failure.code != "DEADLINE_EXCEEDED":
                raise
        else:
            if login.state != idp_pb2.LOGIN_STATE_PENDING:
                return login
        pause = interval - (clock() - started)
        if deadline is not None:
            pause = min(pause, deadline - clock())
        if pause > 0:
            sleep(pause)


def say(args: argparse.Namespace, line: str) -> None:
    """An instruction for the person at the terminal: on stdout with the table format (and
    flushed at once: a script may read it line by line), on stderr with JSON/YAML so that
    stdout stays one document."""
    stream = sys.stdout if args.output == "table" else sys.stderr
    print(line, file=stream, flush=True)


def finish_login(args: argparse.Namespace, login: idp_pb2.Login | None, login_id: str,
                 waited: float | None) -> int:
    """Print a login that ended (or why it did not end in time); the exit code."""
    if login is None:
        within = f" within {human_duration(waited)}" if waited is not None else ""
        raise VpnctlError(f"login {login_id} was not completed{within}; it is still pending "
                          "(see vpnctl idp logins)")
    if login.state == idp_pb2.LOGIN_STATE_ACTIVE:
        emit(login_text(login, now_utc(), args.output))
        return EXIT_OK
    if args.output != "table":
        emit(login_text(login, now_utc(), args.output))
    reason = ENDED_MESSAGES.get(login.state, f"the login ended {state_label(login.state)}")
    detail = f": {login.error}" if login.error else ""
    raise VpnctlError(f"login {login.login_id or login_id} "
                      f"{state_label(login.state)}: {reason}{detail}")


def device_wait_bound(args: argparse.Namespace, challenge: idp_pb2.LoginChallenge
                      ) -> float | None:
    """--timeout (0: none), else until the code expires."""
    if args.timeout is not None:
        return float(args.timeout) or None
    if not challenge.HasField("expires_at"):
        return DEVICE_WAIT_FALLBACK
    left = (challenge.expires_at.ToDatetime(tzinfo=UTC) - now_utc()).total_seconds()
    return max(left, 0.0) + EXPIRY_GRACE_SECONDS


def login_device(args: argparse.Namespace, client: IdpClient) -> int:
    """Device grant: show the code, then wait for the sign-in unless --no-wait."""
    challenge = client.call("StartLogin", idp_pb2.StartLoginRequest(
        address=args.address, flow=idp_pb2.LOGIN_FLOW_DEVICE), idp_pb2.LoginChallenge)
    say(args, f"Open {challenge.verification_uri} and enter code {challenge.user_code}")
    if challenge.verification_uri_complete:
        say(args, f"or open {challenge.verification_uri_complete}")
    if args.no_wait:
        if args.output != "table":
            emit(document(challenge, args.output))
        print(f"login {challenge.login_id} started; it completes once the code is entered "
              "(see vpnctl idp logins)", file=sys.stderr, flush=True)
        return EXIT_OK
    bound = device_wait_bound(args, challenge)
    until = f" (up to {human_duration(bound)})" if bound is not None else ""
    print(f"waiting for the sign-in of login {challenge.login_id}{until}; Ctrl-C to stop "
          "waiting", file=sys.stderr, flush=True)
    request = idp_pb2.WaitLoginRequest(login_id=challenge.login_id)
    login = wait_for_login(
        lambda budget: client.call_within("WaitLogin", request, idp_pb2.Login, budget),
        bound, float(challenge.interval_seconds or DEFAULT_POLL_INTERVAL))
    return finish_login(args, login, challenge.login_id, bound)


def login_pkce(args: argparse.Namespace, client: IdpClient) -> int:
    """Code + PKCE: listen on the loopback redirect, send the user to the authorization
    URL, hand idpd what the browser brings back."""
    bound = PKCE_DEFAULT_TIMEOUT if args.timeout is None else float(args.timeout) or None
    started = time.monotonic()
    challenge = client.call("StartLogin", idp_pb2.StartLoginRequest(
        address=args.address, flow=idp_pb2.LOGIN_FLOW_CODE_PKCE), idp_pb2.LoginChallenge)
    if not challenge.authorization_url or not challenge.redirect_uri:
        raise VpnctlError(f"idpd started login {challenge.login_id} without an authorization "
                          "URL and redirect URI: use --flow device")
    query = receive_redirect(
        challenge.redirect_uri, bound,
        lambda _url: say(args, f"Open this URL in a browser: {challenge.authorization_url}"))
    request = idp_pb2.CompleteLoginRequest(
        login_id=challenge.login_id, code=query.get("code", ""), state=query.get("state", ""),
        iss=query.get("iss", ""), error=query.get("error", ""),
        error_description=query.get("error_description", ""))
    login = client.call_within("CompleteLogin", request, idp_pb2.Login,
                               COMPLETE_LOGIN_TIMEOUT)
    if login.state == idp_pb2.LOGIN_STATE_PENDING:  # idpd finishes the exchange later
        left = None if bound is None else max(bound - (time.monotonic() - started), 0.0)
        wait_request = idp_pb2.WaitLoginRequest(login_id=challenge.login_id)
        found = wait_for_login(
            lambda budget: client.call_within("WaitLogin", wait_request, idp_pb2.Login,
                                              budget),
            left, float(challenge.interval_seconds or DEFAULT_POLL_INTERVAL))
        return finish_login(args, found, challenge.login_id, bound)
    return finish_login(args, login, challenge.login_id, bound)


def cmd_idp_login(args: argparse.Namespace) -> int:
    """StartLogin, then the device or PKCE flow."""
    if args.no_wait and args.flow != "device":
        raise UsageError("--no-wait only applies to --flow device (with pkce, vpnctl itself "
                         "receives the browser's redirect)")
    # The per-call deadlines are fixed here: --timeout bounds the whole login.
    path = socket_path(args.run_dir, args.instance, "idpd")
    with IdpClient(path, DEFAULT_TIMEOUT) as client:
        if args.flow == "pkce":
            return login_pkce(args, client)
        return login_device(args, client)


# ------------------------------------------------------------- loopback redirect (PKCE)

SIGNED_IN_PAGE = "Signed in, you can close this window."
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>vpnr sign-in</title></head>
<body style="font-family: sans-serif; margin: 3em"><h1>{title}</h1><p>{body}</p></body></html>
"""


def loopback_address(host: str, port: int) -> str:
    """``127.0.0.1:8765``, ``[::1]:8765``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _RedirectServer(ThreadingHTTPServer):
    """The one-shot HTTP server; the first redirect carrying ``code`` or ``error`` wins."""

    daemon_threads = True
    expected_path: str
    query: dict[str, str] | None
    arrived: threading.Event
    lock: threading.Lock

    def claim(self, query: dict[str, str]) -> bool:
        """Keep ``query`` unless one came already; whether it was kept. The waiter is only
        woken by :meth:`release`, once the browser has its answer: vpnctl may exit soon
        after, and the page must not be cut off."""
        with self.lock:
            if self.query is not None:
                return False
            self.query = query
        return True

    def release(self) -> None:
        """Wake the waiter: the claimed redirect was answered."""
        self.arrived.set()


class _RedirectServer6(_RedirectServer):
    address_family = socket.AF_INET6


class _RedirectHandler(BaseHTTPRequestHandler):
    """Answers the browser: 404 off the redirect path, 400 without code or error, else a
    small page saying whether the sign-in came back with a code or an error."""

    server: _RedirectServer
    timeout = REDIRECT_REQUEST_TIMEOUT  # socket timeout of one connection

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != self.server.expected_path:
            self.answer(404, "Not found", "This is not the sign-in redirect.")
            return
        query: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            query.setdefault(key, value)  # a repeated parameter: the first one counts
        if "code" not in query and "error" not in query:
            self.answer(400, "Bad request", "The redirect carries neither a code nor an error.")
            return
        if not self.server.claim(query):
            self.answer(409, "Already done", "vpnctl already received a sign-in redirect; "
                        "you can close this window.")
            return
        try:
            if query.get("error"):
                detail = query["error"]
                if query.get("error_description"):
                    detail += f": {query['error_description']}"
                self.answer(200, "Sign-in failed", detail)
            else:
                self.answer(200, "Signed in", SIGNED_IN_PAGE)
            self.wfile.flush()
        finally:  # the query counts even when the browser went away before the answer
            self.server.release()

    def answer(self, status: int, title: str, body: str) -> None:
        """A small HTML page that no cache or referrer keeps."""
        page = PAGE.format(title=html.escape(title), body=html.escape(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the request line holds the authorization code."""


class RedirectListener:
    """A one-shot HTTP listener on the loopback redirect URI of a code + PKCE login.

    It listens as soon as it is made (before the user is sent to the browser) and serves
    until :meth:`close`. :meth:`wait` returns the query parameters of the first GET to the
    redirect path that carries ``code`` or ``error`` (each parameter's first value). Only
    ``http`` URIs on a loopback host with an explicit port are accepted (port 0 picks a free
    one: see :attr:`url`). A busy port is a VpnctlError naming the address.
    """

    def __init__(self, redirect_uri: str) -> None:
        parts = urlsplit(redirect_uri)
        try:
            port = parts.port
        except ValueError:
            port = None
        host = parts.hostname or ""
        if parts.scheme != "http" or port is None or not _is_loopback(host):
            raise VpnctlError(f"idpd's redirect URI {redirect_uri!r} is not a loopback "
                              "http://HOST:PORT/PATH URL vpnctl can listen on")
        bind_host = "127.0.0.1" if host == "localhost" else host
        server_class = _RedirectServer6 if ":" in bind_host else _RedirectServer
        try:
            server = server_class((bind_host, port), _RedirectHandler)
        except OSError as exc:
            where = loopback_address(bind_host, port)
            if exc.errno == errno.EADDRINUSE:
                reason = "the address is already in use (another vpnctl idp login?)"
            else:
                reason = exc.strerror or str(exc)
            raise VpnctlError(f"cannot listen on {where} for the sign-in redirect "
                              f"{redirect_uri}: {reason}") from exc
        server.expected_path = parts.path or "/"
        server.query = None
        server.arrived = threading.Event()
        server.lock = threading.Lock()
        self.server = server
        self.host, self.port = bind_host, int(server.server_address[1])
        self.url = urlunsplit(("http", loopback_address(host, self.port),
                               server.expected_path, "", ""))
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                        name="vpnctl-redirect", daemon=True)
        self._thread.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def wait(self, timeout: float | None) -> dict[str, str] | None:
        """The redirect's query parameters, or None after ``timeout`` seconds (None:
        wait as long as it takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # short slices: Ctrl-C is handled between them
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if self.server.arrived.wait(0.2 if left is None else min(left, 0.2)):
                return self.server.query

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self._thread.join()
        self.server.server_close()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def receive_redirect(redirect_uri: str, timeout: float | None,
                     on_listening: Callable[[str], None] | None = None) -> dict[str, str]:
    """Listen on ``redirect_uri`` (see :class:`RedirectListener`), call
    ``on_listening(url)`` once the port is bound (``url``: the redirect URI with the port
    actually bound), and return the query parameters of the browser's redirect. Waiting
    longer than ``timeout`` seconds (None: no limit) is a VpnctlError."""
    with RedirectListener(redirect_uri) as listener:
        if on_listening is not None:
            on_listening(listener.url)
        query = listener.wait(timeout)
    if query is None:
        within = f"{timeout:g}s" if timeout is not None else "the time allowed"
        raise VpnctlError(f"no browser came back to {listener.url} within {within} "
                          "(--timeout SECONDS to wait longer)")
    return query


# ------------------------------------------------------------------------ registration

SYNC_NOTES = """\
Without --confirm: SyncNow, a directory sync at once. A sync that would remove more of the
entries than the configured share is held by the mass-deletion guard: nothing changes until
an operator confirms it with --confirm and the held sync's id.
exit codes: 0 applied or unchanged, 1 failed (the last good set stays in force) or held
(the held id and the command to confirm it are printed), 2 usage error"""

TEST_CONNECTION_NOTES = """\
Checks discovery, JWKS, the client-credentials grant and SCIM without changing state. A
part shows ok, FAILED (an error names it) or - (not configured, or not tried).
exit codes: 0 every configured part works, 1 idpd reported an error (or discovery failed)"""

LOGIN_NOTES = """\
Binds a user's sign-in to a device address. --flow device (the default, RFC 8628) prints
  Open <verification URI> and enter code <user code>
  or open <verification URI with the code>
then waits until the sign-in completes, is denied or the code expires. --flow pkce
(RFC 7636) listens on idpd's loopback redirect URI (e.g. http://127.0.0.1:8765/callback),
prints the URL to open in a browser on this machine and waits for the browser to come back.
With -o json/yaml the instructions go to stderr and stdout holds only the login.
exit codes: 0 the login is active (or started, with --no-wait), 1 it was denied, expired,
failed or revoked, did not complete within the timeout, or the redirect port is busy,
2 usage error, 130 interrupted (the login stays pending until it expires)"""


def add_login_verb(verbs: Subcommands, common: argparse.ArgumentParser,
                   handler: Handler) -> argparse.ArgumentParser:
    """``idp login``: like :func:`add_verb`, but its --timeout bounds the whole login, so
    it takes the common options except the per-call --timeout."""
    parser: argparse.ArgumentParser = verbs.add_parser(
        "login", help="sign a user in for a device address (device grant or code + PKCE)",
        description="sign a user in for a device address (device grant or code + PKCE)",
        epilog=examples_epilog([
            "vpnctl idp login --address 10.1.0.10",
            "vpnctl idp login --address 10.1.0.10 --flow pkce",
            "vpnctl idp login --address fd00:1::10 --no-wait",
            "vpnctl idp login --address 10.1.0.10 --timeout 120 -o json"], LOGIN_NOTES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for action in common._actions:  # the shared actions, as parents=[common] would add
        if "--timeout" not in action.option_strings:
            parser._add_action(action)
    parser.add_argument("--timeout", type=seconds_arg, metavar="SECONDS",
                        default=argparse.SUPPRESS,
                        help="give up waiting after this long (default: until the code "
                             f"expires with device, {PKCE_DEFAULT_TIMEOUT:g} with pkce; "
                             "0: no limit)")
    parser.set_defaults(handler=handler)
    return parser


def add_commands(commands: Subcommands, common: argparse.ArgumentParser) -> None:
    """Register ``idp`` with its verbs."""
    idp = add_group(commands, common, "idp",
                    "the identity provider link of idpd: status, sync, logins, bindings", [
                        "vpnctl idp status",
                        "vpnctl idp sync",
                        "vpnctl idp login --address 10.1.0.10",
                        "vpnctl idp logins --all"])
    add_verb(idp, common, "status",
             "issuer, discovery, sync freshness, counts, held sync, last result", [
                 "vpnctl idp status", "vpnctl --instance b idp status -o json"],
             cmd_idp_status)
    add_verb(idp, common, "config", "the OIDC/SCIM configuration idpd runs with (no secrets)",
             ["vpnctl idp config", "vpnctl idp config -o yaml"], cmd_idp_config)
    add_verb(idp, common, "test-connection",
             "check discovery, JWKS, the token grant and SCIM against the IdP", [
                 "vpnctl idp test-connection", "vpnctl idp test-connection -o json"],
             cmd_idp_test_connection, notes=TEST_CONNECTION_NOTES)
    verb = add_verb(idp, common, "sync", "sync the directory now, or confirm a held sync", [
        "vpnctl idp sync", "vpnctl idp sync --confirm 7f3c2a",
        "vpnctl idp sync -o json"], cmd_idp_sync, notes=SYNC_NOTES)
    verb.add_argument("--confirm", metavar="HELD_ID",
                      help="apply the sync held back by the mass-deletion guard")
    verb = add_login_verb(idp, common, cmd_idp_login)
    verb.add_argument("--address", type=address_arg, required=True, metavar="IP",
                      help="the device address the login is bound to")
    verb.add_argument("--flow", choices=tuple(FLOWS), default="device",
                      help="device grant (default) or code + PKCE with a loopback redirect")
    verb.add_argument("--no-wait", action="store_true",
                      help="device flow: print the code and return at once")
    verb = add_verb(idp, common, "logout", "end a login, by device address or login id", [
        "vpnctl idp logout --address 10.1.0.10", "vpnctl idp logout --login 5b1e9d"],
                    cmd_idp_logout)
    which = verb.add_mutually_exclusive_group(required=True)
    which.add_argument("--address", type=address_arg, metavar="IP",
                       help="the device address whose login ends")
    which.add_argument("--login", metavar="ID", help="the login id (see vpnctl idp logins)")
    verb = add_verb(idp, common, "logins", "active logins (with --all, ended ones too)", [
        "vpnctl idp logins", "vpnctl idp logins --all -o json"], cmd_idp_logins)
    verb.add_argument("--all", action="store_true", help="also logins that ended")
    add_verb(idp, common, "bindings",
             "address-to-role bindings idpd last pushed to policyd", [
                 "vpnctl idp bindings", "vpnctl idp bindings -o yaml"], cmd_idp_bindings)

