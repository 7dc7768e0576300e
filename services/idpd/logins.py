"""User logins for device addresses: device grant (RFC 8628) and code + PKCE (RFC 7636).

A login binds one address (a /32 or /128) to the roles of the user who completed it, for
as long as the login stays valid: refreshes succeed and userinfo still knows the user. A
new login for an address replaces the previous one there. Pending logins live in memory
only; their device codes and PKCE verifiers are never stored or logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from vpnr.idpd.oauth import DeviceChallenge, IdpClient, IdpRefused, IdpUnavailable, TokenSet
from vpnr.idpd.store import LoginRecord
from vpnr.idpd.sync import SyncEngine, kept_claims
from vpnr.idpd.tokens import TokenError, TokenValidator
from vpnr.v1 import idp_pb2

log = logging.getLogger("vpnr.idpd.logins")

PKCE_TTL = 600.0
MAX_PENDING = 64
SLOW_DOWN_STEP = 5.0  # RFC 8628 3.5


class LoginError(Exception):
    """A login request is wrong; ``field`` names what."""

    def __init__(self, field_name: str, message: str) -> None:
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


@dataclass
class Pending:
    """Secrets and waiters of a login in progress (memory only)."""

    login: LoginRecord
    expires_at: float
    device: DeviceChallenge | None = None
    state: str = field(default="", repr=False)
    nonce: str = field(default="", repr=False)
    verifier: str = field(default="", repr=False)
    url: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def host_prefix(address: str) -> str:
    """A single IPv4 or IPv6 address as its /32 or /128 prefix."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        raise LoginError("address", f"expected one IPv4 or IPv6 address, got {address!r}"
                         ) from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise LoginError("address", f"{ip} cannot be a device address")
    return f"{ip}/{ip.max_prefixlen}"


class LoginManager:
    """Starts, completes, waits for and ends logins."""

    def __init__(self, engine: SyncEngine, client: Callable[[], Awaitable[IdpClient]],
                 validator: Callable[[], Awaitable[TokenValidator]]) -> None:
        self.engine = engine
        self.client = client
        self.validator = validator
        self.pending: dict[str, Pending] = {}

    async def start(self, address: str, flow: idp_pb2.LoginFlow) -> tuple[LoginRecord, Pending]:
        """Begin a login; the caller shows the user the challenge."""
        prefix = host_prefix(address)
        if flow == idp_pb2.LOGIN_FLOW_UNSPECIFIED:
            flow = idp_pb2.LOGIN_FLOW_DEVICE
        if flow not in (idp_pb2.LOGIN_FLOW_DEVICE, idp_pb2.LOGIN_FLOW_CODE_PKCE):
            raise LoginError("flow", f"unknown login flow {flow}")
        for entry in self.engine.directory:
            if prefix in entry.addresses:
                raise LoginError("address", f"{prefix} is the directory entry "
                                            f"{entry.username!r}'s address")
        self._expire_pending()
        if len(self.pending) >= MAX_PENDING:
            raise LoginError("address", f"{MAX_PENDING} logins are already pending; retry "
                                        "when some complete or expire")
        client = await self.client()
        now = time.time()
        login = LoginRecord(login_id="L" + secrets.token_hex(8), flow=flow, address=prefix,
                            created_at=now)
        if flow == idp_pb2.LOGIN_FLOW_DEVICE:
            challenge = await client.device_authorization()
            pending = Pending(login, challenge.expires_at, device=challenge)
            pending.task = asyncio.create_task(self._poll(pending))
        else:
            url, state, nonce, verifier = client.authorization_url()
            pending = Pending(login, now + PKCE_TTL, state=state, nonce=nonce,
                              verifier=verifier, url=url)
        self.pending[login.login_id] = pending
        self.engine.audit("idp.login_started", True, "", {
            "login_id": login.login_id, "address": prefix,
            "flow": idp_pb2.LoginFlow.Name(flow)})
        return login, pending

    def find(self, login_id: str) -> LoginRecord | None:
        """A pending or known login."""
        pending = self.pending.get(login_id)
        if pending is not None:
            return pending.login
        return self.engine.logins.get(login_id)

    async def wait(self, login_id: str, timeout: float) -> LoginRecord:
        """Wait up to ``timeout`` s for a pending login to finish; return its state."""
        pending = self.pending.get(login_id)
        if pending is None:
            login = self.engine.logins.get(login_id)
            if login is None:
                raise LookupError(f"no login {login_id!r}")
            return login
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pending.done.wait(), max(0.0, timeout))
        return pending.login

    # -- device flow ----------------------------------------------------------------------

    async def _poll(self, pending: Pending) -> None:
        assert pending.device is not None
        interval = pending.device.interval
        try:
            while time.time() < pending.expires_at:
                await asyncio.sleep(interval)
                try:
                    tokens = await (await self.client()).poll_device(pending.device.device_code)
                except IdpRefused as exc:
                    if exc.error == "authorization_pending":
                        continue
                    if exc.error == "slow_down":
                        interval += SLOW_DOWN_STEP
                        continue
                    state = {"access_denied": idp_pb2.LOGIN_STATE_DENIED,
                             "expired_token": idp_pb2.LOGIN_STATE_EXPIRED}.get(
                                 exc.error, idp_pb2.LOGIN_STATE_FAILED)
                    await self._end(pending, state, f"the IdP answered {exc}")
                    return
                except IdpUnavailable as exc:
                    log.warning("device poll failed; retrying", extra={"reason": str(exc)})
                    continue
                await self._activate(pending, tokens, nonce=None)
                return
            await self._end(pending, idp_pb2.LOGIN_STATE_EXPIRED,
                            "the user did not complete the login in time")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("device login failed")
            await self._end(pending, idp_pb2.LOGIN_STATE_FAILED, f"{type(exc).__name__}")

    # -- code + PKCE ----------------------------------------------------------------------

    async def complete(self, login_id: str, code: str, state: str, iss: str, error: str,
                       error_description: str) -> LoginRecord:
        """Finish a code + PKCE login with what reached the loopback redirect."""
        pending = self.pending.get(login_id)
        if pending is None or pending.login.flow != idp_pb2.LOGIN_FLOW_CODE_PKCE:
            raise LookupError(f"no pending code + PKCE login {login_id!r}")
        if not secrets.compare_digest(state, pending.state):
            await self._end(pending, idp_pb2.LOGIN_STATE_FAILED,
                            "state does not match the login's (a forged or stale redirect)")
            return pending.login
        if iss and iss != self.engine.cfg.issuer:
            await self._end(pending, idp_pb2.LOGIN_STATE_FAILED,
                            f"redirect names issuer {iss!r}, not the configured one (RFC 9207)")
            return pending.login
        if error:
            denied = error == "access_denied"
            await self._end(pending, idp_pb2.LOGIN_STATE_DENIED if denied
                            else idp_pb2.LOGIN_STATE_FAILED,
                            f"the IdP answered {error}: {error_description}".rstrip(": "))
            return pending.login
        if not code:
            raise LoginError("code", "the redirect carried neither a code nor an error")
        try:
            tokens = await (await self.client()).exchange_code(code, pending.verifier)
        except IdpRefused as exc:
            await self._end(pending, idp_pb2.LOGIN_STATE_FAILED, f"the IdP refused the code "
                                                                  f"({exc})")
            return pending.login
        await self._activate(pending, tokens, nonce=pending.nonce)
        return pending.login

    # -- common ---------------------------------------------------------------------------

    async def _activate(self, pending: Pending, tokens: TokenSet, nonce: str | None) -> None:
        engine = self.engine
        login = pending.login
        if not tokens.id_token:
            await self._end(pending, idp_pb2.LOGIN_STATE_FAILED,
                            "the IdP returned no ID token (is 'openid' among the scopes?)")
            return
        try:
            claims = await engine.check_id_token(await self.validator(), tokens.id_token,
                                                 login.login_id, nonce=nonce)
        except TokenError as exc:
            await self._end(pending, idp_pb2.LOGIN_STATE_FAILED,
                            f"ID token rejected ({exc.reason}): {exc}")
            return
        info: dict[str, Any] = dict(claims)
        with contextlib.suppress(IdpUnavailable, IdpRefused):
            fresh = await (await self.client()).userinfo(tokens.access_token)
            if fresh.get("sub") == claims.get("sub"):
                info.update(fresh)
        kept = kept_claims(info, engine.mapper)
        login.subject = str(claims["sub"])
        login.username = str(info.get("preferred_username") or info.get("email")
                             or login.subject)
        login.claims = kept
        login.roles = engine.mapper.roles(kept)
        login.access_token = tokens.access_token
        login.refresh_token = tokens.refresh_token
        login.access_expires_at = tokens.expires_at
        login.refreshed_at = time.time()
        login.state = idp_pb2.LOGIN_STATE_ACTIVE
        async with engine.lock:
            for other in engine.logins.values():
                if other.active and other.address == login.address:
                    other.state = idp_pb2.LOGIN_STATE_REVOKED
                    other.error = f"replaced by login {login.login_id}"
                    other.ended_at = time.time()
                    await engine.store.save_login(other)
            engine.logins[login.login_id] = login
            await engine.store.save_login(login)
        self.pending.pop(login.login_id, None)
        engine.audit("idp.login", True, "", {
            "login_id": login.login_id, "username": login.username, "subject": login.subject,
            "address": login.address, "roles": list(login.roles),
            "groups": list(kept.get("groups", []))})
        engine.reschedule.set()   # its token may expire before the next sync
        result = await engine.push_local(f"login {login.login_id} of {login.username}")
        if result.outcome == idp_pb2.SYNC_OUTCOME_FAILED:
            log.warning("login recorded but not yet pushed", extra={"error": result.error})
        pending.done.set()

    async def _end(self, pending: Pending, state: idp_pb2.LoginState, error: str) -> None:
        login = pending.login
        login.state = state
        login.error = error
        login.ended_at = time.time()
        self.pending.pop(login.login_id, None)
        self.engine.logins[login.login_id] = login
        await self.engine.store.save_login(login)
        self.engine.audit("idp.login", False, error, {
            "login_id": login.login_id, "address": login.address,
            "state": idp_pb2.LoginState.Name(state)})
        pending.done.set()

    def _expire_pending(self) -> None:
        now = time.time()
        for login_id, pending in list(self.pending.items()):
            if pending.expires_at < now and pending.device is None:
                pending.login.state = idp_pb2.LOGIN_STATE_EXPIRED
                pending.login.error = "the login was not completed in time"
                pending.done.set()
                del self.pending[login_id]

    async def logout(self, login_id: str, address: str) -> idp_pb2.SyncResult:
        """End active logins by id or address, revoke their refresh tokens, push."""
        prefix = host_prefix(address) if address else ""
        if not login_id and not prefix:
            raise LoginError("login_id", "name the login (login_id) or the address")
        targets = [x for x in self.engine.logins.values() if x.active
                   and ((login_id and x.login_id == login_id) or (prefix and x.address == prefix))]
        if not targets:
            raise LookupError(f"no active login {'for ' + prefix if prefix else login_id!r}")
        try:
            client: IdpClient | None = await self.client()
        except IdpUnavailable:
            client = None  # logging out never waits for the IdP; revocation is best effort
        for login in targets:
            if client is not None and login.refresh_token:
                await client.revoke(login.refresh_token)
            login.state = idp_pb2.LOGIN_STATE_REVOKED
            login.error = "logged out"
            login.ended_at = time.time()
            login.refresh_token = ""
            login.access_token = ""
            await self.engine.store.save_login(login)
            self.engine.audit("idp.logout", True, "", {"login_id": login.login_id,
                                                       "username": login.username,
                                                       "address": login.address})
        return await self.engine.push_local(
            "logout " + ", ".join(x.login_id for x in targets))

    async def close(self) -> None:
        """Stop device polls."""
        for pending in self.pending.values():
            if pending.task is not None:
                pending.task.cancel()
