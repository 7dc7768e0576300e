"""Run the lab OpenID Provider (deploy/idp/server.mjs) from tests.

``running_idp(tmp_path, data)`` starts a real oidc-provider based OP on
127.0.0.1 and yields a :class:`RunningIdp`.  The module also has small
"browser" helpers that drive the provider's own HTML pages over plain HTTP
(device approval, authorization code login), so tests can act as the user.

Only the standard library and httpx are used.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
IDP_DIR = REPO_ROOT / "deploy" / "idp"
SERVER_SCRIPT = IDP_DIR / "server.mjs"

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
HTTP_TIMEOUT_S = 10.0
MAX_BROWSER_STEPS = 12
SCIM_READ_SCOPE = "scim:read"


class IdpError(RuntimeError):
    """The lab IdP misbehaved (did not start, admin call failed, page unexpected)."""


# --------------------------------------------------------------------- process


@dataclass
class RunningIdp:
    issuer: str
    port: int
    admin_token: str
    data_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    def url(self, path: str) -> str:
        return self.issuer.rstrip("/") + path

    def discovery(self) -> dict[str, Any]:
        r = httpx.get(self.url("/.well-known/openid-configuration"), timeout=HTTP_TIMEOUT_S)
        r.raise_for_status()
        doc: dict[str, Any] = r.json()
        return doc

    def log(self) -> str:
        """The provider's stderr so far (useful in assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = httpx.request(
            method,
            self.url("/admin" + path),
            json=body,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=HTTP_TIMEOUT_S,
        )
        if not r.is_success:
            raise IdpError(f"admin {method} {path}: HTTP {r.status_code}: {r.text}")
        return r.json()

    def users(self) -> list[dict[str, Any]]:
        users: list[dict[str, Any]] = self._admin("GET", "/users")["users"]
        return users

    def set_groups(self, sub: str, groups: Sequence[str]) -> dict[str, Any]:
        user: dict[str, Any] = self._admin(
            "PUT", f"/users/{quote(sub, safe='')}/groups", {"groups": list(groups)}
        )
        return user

    def disable(self, sub: str) -> dict[str, Any]:
        user: dict[str, Any] = self._admin("POST", f"/users/{quote(sub, safe='')}/disable")
        return user

    def enable(self, sub: str) -> dict[str, Any]:
        user: dict[str, Any] = self._admin("POST", f"/users/{quote(sub, safe='')}/enable")
        return user

    def reload(self) -> dict[str, Any]:
        """Re-read the data file (admin changes made since are discarded)."""
        result: dict[str, Any] = self._admin("POST", "/reload")
        return result

    def add_user(self, user: dict[str, Any]) -> dict[str, Any]:
        """Add one user (same shape as in the data file); IdpError on 400/409."""
        created: dict[str, Any] = self._admin("POST", "/users", user)
        return created

    def delete_user(self, sub: str) -> dict[str, Any]:
        result: dict[str, Any] = self._admin("DELETE", f"/users/{quote(sub, safe='')}")
        return result

    def set_ip_addresses(self, sub: str, ip_addresses: Sequence[str]) -> dict[str, Any]:
        user: dict[str, Any] = self._admin(
            "PUT",
            f"/users/{quote(sub, safe='')}/ip_addresses",
            {"ip_addresses": list(ip_addresses)},
        )
        return user

    def set_fault(self, scim: str) -> dict[str, Any]:
        """SCIM fault injection: "none", "http500", "garbage", "truncate" or "slow"."""
        faults: dict[str, Any] = self._admin("POST", "/faults", {"scim": scim})
        return faults

    def scim_url(self, path: str = "") -> str:
        """``{issuer}/scim/v2`` plus ``path`` (e.g. "/Users")."""
        return self.url("/scim/v2" + path)

    def scim_token(self, client_id: str, client_secret: str) -> str:
        """A client_credentials access token (a JWT for urn:vpnr) with scope scim:read."""
        r = httpx.post(
            self.discovery()["token_endpoint"],
            data={"grant_type": "client_credentials", "scope": SCIM_READ_SCOPE},
            auth=(client_id, client_secret),
            timeout=HTTP_TIMEOUT_S,
        )
        if r.status_code != 200:
            raise IdpError(f"client_credentials for {client_id}: HTTP {r.status_code}: {r.text}")
        token: str = r.json()["access_token"]
        return token


def _read_stdout(stream: Any, lines: queue.Queue[bytes | None]) -> None:
    # Hands lines to the starter and keeps draining the pipe afterwards so
    # the server can never block on a full stdout.
    for raw in iter(stream.readline, b""):
        lines.put(raw)
    lines.put(None)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_idp(
    tmp_path: Path,
    data: dict[str, Any],
    port: int | None = None,
    keys: Path | None = None,
    issuer: str | None = None,
    access_token_ttl: int | None = None,
) -> Iterator[RunningIdp]:
    """Start the lab IdP with ``data`` (users/clients) and stop it on exit.

    With ``port=None`` the server binds port 0 and reports the port it got,
    so there is no race for a "free" port.  ``keys`` is a private JWKS file
    (see :func:`generate_keys`); without it the IdP makes a new key each start.
    """
    node = shutil.which("node")
    if node is None:
        raise IdpError("node is not on PATH")
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        raise IdpError(f"oidc-provider is not installed: run `npm ci` in {IDP_DIR}")

    tmp_path.mkdir(parents=True, exist_ok=True)
    data_path = tmp_path / "idp-data.json"
    data_path.write_text(json.dumps(data, indent=2))
    log_path = tmp_path / "idp.log"
    admin_token = secrets.token_urlsafe(24)

    argv = [
        node,
        str(SERVER_SCRIPT),
        "--host",
        "127.0.0.1",
        "--port",
        str(port if port is not None else 0),
        "--data",
        str(data_path),
    ]
    if keys is not None:
        argv += ["--keys", str(keys)]
    if issuer is not None:  # e.g. a proxy in front of the IdP
        argv += ["--issuer", issuer]
    if access_token_ttl is not None:
        argv += ["--access-token-ttl", str(access_token_ttl)]
    env = dict(os.environ)
    env["VPNR_IDP_ADMIN_TOKEN"] = admin_token  # kept out of argv (ps)

    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=IDP_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=_read_stdout, args=(proc.stdout, lines), daemon=True).start()
        ready = _wait_ready(proc, lines, log_path)
        yield RunningIdp(
            issuer=str(ready["issuer"]),
            port=int(ready["port"]),
            admin_token=admin_token,
            data_path=data_path,
            log_path=log_path,
            process=proc,
        )
    finally:
        _stop(proc)


def generate_keys(path: Path) -> Path:
    """Write a private RS256 JWKS to ``path`` with the IdP's own ``--gen-keys``."""
    node = shutil.which("node")
    if node is None:
        raise IdpError("node is not on PATH")
    subprocess.run([node, str(SERVER_SCRIPT), "--gen-keys", str(path)], cwd=IDP_DIR,
                   check=True, capture_output=True, timeout=60)
    return path


def _wait_ready(
    proc: subprocess.Popen[bytes], lines: queue.Queue[bytes | None], log_path: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise IdpError(
                f"IdP not ready within {READY_TIMEOUT_S}s ({_proc_state(proc.pid)}); "
                f"log:\n{_tail(log_path)}"
            )
        try:
            raw = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            if proc.poll() is not None:
                raise IdpError(
                    f"IdP exited with {proc.returncode}; log:\n{_tail(log_path)}"
                ) from None
            continue
        if raw is None:
            proc.wait(timeout=STOP_TIMEOUT_S)
            raise IdpError(f"IdP exited with {proc.returncode}; log:\n{_tail(log_path)}")
        with contextlib.suppress(ValueError):
            msg = json.loads(raw)
            if isinstance(msg, dict) and msg.get("ready") is True:
                return msg


def _proc_state(pid: int) -> str:
    """Linux scheduler state of ``pid``, for timeout messages."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return "process state unavailable"
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (
        f"state={fields[0]} wchan={wchan or '-'} "
        f"cpu={(int(fields[11]) + int(fields[12])) / ticks:.2f}s"
    )


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no log>"


# --------------------------------------------------------------------- browser


@dataclass
class HtmlForm:
    action: str
    method: str
    id: str | None
    fields: dict[str, str]


class _FormParser(HTMLParser):
    def __init__(self, base_url: str) -> None:
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.forms: list[HtmlForm] = []
        self._current: HtmlForm | None = None
        self._late: list[tuple[str, str, str]] = []  # (form id, name, value)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = HtmlForm(
                action=urljoin(self.base_url, a.get("action") or self.base_url),
                method=(a.get("method") or "get").upper(),
                id=a.get("id"),
                fields={},
            )
            self.forms.append(self._current)
        elif tag == "input" and a.get("name"):
            if a.get("type", "text") in ("submit", "button", "image", "reset"):
                return
            if "form" in a:
                self._late.append((a["form"], a["name"], a.get("value", "")))
            elif self._current is not None:
                self._current.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None

    def result(self) -> list[HtmlForm]:
        for form_id, name, value in self._late:
            for form in self.forms:
                if form.id == form_id:
                    form.fields[name] = value
        return self.forms


def parse_forms(html: str, base_url: str) -> list[HtmlForm]:
    parser = _FormParser(base_url)
    parser.feed(html)
    parser.close()
    return parser.result()


def find_form(resp: httpx.Response, *, form_id: str | None = None) -> HtmlForm:
    forms = parse_forms(resp.text, str(resp.url))
    if form_id is not None:
        forms = [f for f in forms if f.id == form_id]
    if not forms:
        raise IdpError(
            f"no form{' #' + form_id if form_id else ''} on {resp.url} "
            f"(HTTP {resp.status_code}):\n{resp.text[:2000]}"
        )
    return forms[0]


def submit(
    browser: httpx.Client, form: HtmlForm, overrides: dict[str, str] | None = None
) -> httpx.Response:
    fields = {**form.fields, **(overrides or {})}
    if form.method == "POST":
        return browser.post(form.action, data=fields)
    return browser.get(form.action, params=fields)


def approve_device(
    verification_uri_complete: str,
    username: str,
    password: str,
    *,
    abort: bool = False,
) -> httpx.Response:
    """Act as the user: open the verification URI, confirm the code, sign in.

    Returns the final page (the provider's "Sign-in Success" page).
    """
    with httpx.Client(follow_redirects=True, timeout=HTTP_TIMEOUT_S) as browser:
        # 1. verification_uri_complete renders a self-submitting form
        #    carrying the user_code and an anti-CSRF token.
        page = browser.get(verification_uri_complete)
        page = submit(browser, find_form(page))
        # 2. The confirmation page ("is this the code on your device?").
        confirm = find_form(page, form_id="op.deviceConfirmForm")
        if abort:
            return submit(browser, confirm, {"abort": "yes"})
        page = submit(browser, confirm)
        # 3. The login page (consent is granted automatically).
        login = find_form(page, form_id="login")
        page = submit(browser, login, {"username": username, "password": password})
        if page.status_code != 200 or "Sign-in Success" not in page.text:
            raise IdpError(f"device approval failed at {page.url}:\n{page.text[:2000]}")
        return page


def browser_authorize(
    authorize_url: str, redirect_uri: str, username: str, password: str
) -> dict[str, str]:
    """Follow an authorization request through login; return the callback query.

    The redirect to ``redirect_uri`` is not followed (nothing listens there);
    its query parameters (``code``, ``state``, ``iss`` or ``error``) are returned.
    """
    with httpx.Client(follow_redirects=False, timeout=HTTP_TIMEOUT_S) as browser:
        resp = browser.get(authorize_url)
        for _ in range(MAX_BROWSER_STEPS):
            if resp.is_redirect:
                location = urljoin(str(resp.url), resp.headers["location"])
                if location.startswith(redirect_uri):
                    query = parse_qs(urlsplit(location).query)
                    return {k: v[0] for k, v in query.items()}
                resp = browser.get(location)
                continue
            login = find_form(resp, form_id="login")
            resp = submit(browser, login, {"username": username, "password": password})
        raise IdpError(f"authorization did not reach {redirect_uri} in {MAX_BROWSER_STEPS} steps")


# --------------------------------------------------------------------- tokens


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, payload) of a compact JWS, *without* verifying it."""

    def b64json(seg: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
        return value

    header, payload, _sig = token.split(".")
    return b64json(header), b64json(payload)
