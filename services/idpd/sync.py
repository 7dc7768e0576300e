"""The sync engine: IdP state in, one atomic ReplaceBindings out, never a wipe-out.

A *full sync* asks the IdP about every login (refresh when the access token is near expiry,
then userinfo for fresh claims) and reads the directory, compiles the complete binding set
and pushes it to policyd as one versioned replace of the bindings whose source is ``idpd``.
A *local push* recompiles from what idpd already knows (a login just completed, a logout)
without asking the IdP.

Failure rules:

- The IdP unreachable or answering garbage (:class:`IdpUnavailable`): nothing changes, the
  last good set stays in force, Status says how stale it is, retries back off.
- The IdP refusing one login (``invalid_grant``, userinfo 401): that login ends and its
  binding goes with the sync.
- A sync removing more than ``max_delete_share`` of the bindings is held, with everything it
  would change (logins ended included) until an operator confirms it or a later sync no
  longer trips the guard. Refreshed tokens are kept at once either way: a rotated refresh
  token must never be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vpnr.core.auditrec import AuditRecorder
from vpnr.core.config import IdpdConfig
from vpnr.core.daemon import unix_timestamp
from vpnr.idpd.compile import Compiled, Diff, Entry, compile_bindings, diff
from vpnr.idpd.directory import DirectoryEntry, DirectoryRead, read_directory
from vpnr.idpd.mapping import RoleMapper
from vpnr.idpd.oauth import IdpClient, IdpRefused, IdpUnavailable
from vpnr.idpd.store import IdpStore, LoginRecord
from vpnr.idpd.tokens import REASONS, TokenError, TokenValidator
from vpnr.v1 import audit_pb2, idp_pb2, policy_pb2, policy_pb2_grpc

log = logging.getLogger("vpnr.idpd.sync")

SOURCE = "idpd"
LOGIN_CONCURRENCY = 16
AUDIT_LIST_LIMIT = 100
CLAIMS_KEPT = ("sub", "preferred_username", "email", "name", "groups")
POLICY_TIMEOUT = 10.0


class PolicydUnavailable(Exception):
    """policyd could not be asked or did not take the change."""


@dataclass
class Plan:
    """What a full sync found: the logins as they should become and the directory."""

    logins: dict[str, LoginRecord]
    directory: list[DirectoryEntry]
    compiled: Compiled
    diff: Diff
    current: dict[str, Entry]


@dataclass
class Held:
    """A sync held by the mass-deletion guard."""

    sync_id: str
    plan: Plan
    result: idp_pb2.SyncResult


@dataclass
class SyncState:
    """What Status reports about syncing."""

    last_sync: float = 0.0
    last_good: float = 0.0
    synced: bool = False            # a full sync succeeded since this start
    consecutive_failures: int = 0
    next_sync: float = 0.0
    policy_version: int = 0
    last_result: idp_pb2.SyncResult = field(default_factory=idp_pb2.SyncResult)


def entry_json(e: Entry) -> dict[str, Any]:
    """An entry as stored and audited (no secrets in it)."""
    return {"prefix": e.prefix, "roles": list(e.roles), "subject": e.subject,
            "username": e.username, "origin": e.origin, "groups": list(e.groups)}


def entry_from_json(d: dict[str, Any]) -> Entry:
    """Inverse of :func:`entry_json`."""
    return Entry(d["prefix"], tuple(d["roles"]), d["subject"], d["username"], d["origin"],
                 tuple(d.get("groups", ())))


def kept_claims(claims: dict[str, Any], mapper: RoleMapper) -> dict[str, Any]:
    """The claims worth storing: identity basics and whatever the mapping reads."""
    keep = set(CLAIMS_KEPT) | set(mapper.claims)
    return {k: v for k, v in claims.items() if k in keep}


class Metrics:
    """Prometheus series of the sync engine."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.syncs = Counter("vpnr_idp_syncs", "Syncs by result.", ["result"],
                             registry=registry)
        self.duration = Histogram("vpnr_idp_sync_duration_seconds", "Duration of full syncs.",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                  registry=registry)
        self.bindings = Gauge("vpnr_idp_bindings", "Bindings idpd holds at policyd.",
                              ["origin"], registry=registry)
        self.staleness = Gauge("vpnr_idp_staleness_seconds",
                               "Seconds since the last good sync (0 before the first).",
                               registry=registry)
        self.stale = Gauge("vpnr_idp_stale",
                           "1 when the bindings in force are not confirmed by the IdP (the "
                           "last full sync failed, or none succeeded since start).",
                           registry=registry)
        self.logins = Gauge("vpnr_idp_active_logins", "Active logins.", registry=registry)
        self.rejected = Counter("vpnr_idp_tokens_rejected", "Tokens refused by validation.",
                                ["reason"], registry=registry)
        for result in ("applied", "unchanged", "held", "failed"):
            self.syncs.labels(result)
        for origin in ("login", "directory"):
            self.bindings.labels(origin)
        for reason in sorted(REASONS):
            self.rejected.labels(reason)


class SyncEngine:
    """Owns the logins, the directory read and the binding set idpd keeps at policyd."""

    def __init__(self, cfg: IdpdConfig, store: IdpStore, mapper: RoleMapper,
                 recorder: AuditRecorder, policyd_socket: str, registry: CollectorRegistry,
                 client: Callable[[], Awaitable[IdpClient]],
                 validator: Callable[[], Awaitable[TokenValidator]]) -> None:
        self.cfg = cfg
        self.store = store
        self.mapper = mapper
        self.recorder = recorder
        self.policyd_socket = policyd_socket
        self.client = client
        self.validator = validator
        self.metrics = Metrics(registry)
        self.metrics.staleness.set_function(self.staleness)
        self.metrics.stale.set_function(lambda: float(self.stale))
        self.logins: dict[str, LoginRecord] = {}
        self.directory: list[DirectoryEntry] = []
        self.bound: dict[str, Entry] = {}           # the last set pushed (or found) at policyd
        self.state = SyncState()
        self.held: Held | None = None
        self.tokens_rejected = 0
        self.lock = asyncio.Lock()
        self.reschedule = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None

    # -- state ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Restore logins and the last good set from the database."""
        for login in await self.store.load_logins():
            if login.state == idp_pb2.LOGIN_STATE_PENDING:
                login.state = idp_pb2.LOGIN_STATE_FAILED
                login.error = "idpd restarted before the login completed"
                login.ended_at = time.time()
                await self.store.save_login(login)
            self.logins[login.login_id] = login
        good = await self.store.get("last_good", {})
        self.bound = {e["prefix"]: entry_from_json(e) for e in good.get("entries", [])}
        self.state.last_good = float(await self.store.get("last_good_at", 0.0))
        self.state.policy_version = int(good.get("policy_version", 0))
        self.directory = [DirectoryEntry(d["id"], d["username"], tuple(d["addresses"]),
                                         d["claims"])
                          for d in await self.store.get("directory", [])]
        self._gauges()

    def staleness(self) -> float:
        """Seconds since the last good sync; 0 before the first."""
        return time.time() - self.state.last_good if self.state.last_good else 0.0

    @property
    def stale(self) -> bool:
        """The set in force is not confirmed by the IdP: the last full sync failed, or
        none succeeded since this start (the set was restored from the database)."""
        return self.state.consecutive_failures > 0 or not self.state.synced

    def _gauges(self) -> None:
        for origin in ("login", "directory"):
            self.metrics.bindings.labels(origin).set(
                sum(1 for e in self.bound.values() if e.origin == origin))
        self.metrics.logins.set(sum(1 for x in self.logins.values() if x.active))

    # -- policyd -------------------------------------------------------------------------

    def _policy(self) -> policy_pb2_grpc.PolicyServiceStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix:{self.policyd_socket}")
        return policy_pb2_grpc.PolicyServiceStub(self._channel)

    async def close(self) -> None:
        """Close the policyd channel."""
        if self._channel is not None:
            await self._channel.close()

    async def _policy_view(self) -> tuple[set[str], dict[str, Entry], dict[str, str], int]:
        """(roles defined, idpd's bindings, other owners' prefixes, version) at policyd."""
        try:
            doc = await self._policy().GetPolicy(policy_pb2.GetPolicyRequest(),
                                                 timeout=POLICY_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise PolicydUnavailable(f"policyd: {exc.code().name}: {exc.details()}") from None
        ours: dict[str, Entry] = {}
        foreign: dict[str, str] = {}
        for b in doc.bindings:
            if b.source == SOURCE:
                known = self.bound.get(b.prefix)
                ours[b.prefix] = Entry(b.prefix, tuple(b.roles), b.subject,
                                       known.username if known else "",
                                       known.origin if known else "",
                                       known.groups if known else ())
            else:
                foreign[b.prefix] = b.source or "admin"
        return {r.name for r in doc.roles}, ours, foreign, doc.version

    async def _push(self, entries: dict[str, Entry], reason: str) -> int:
        request = policy_pb2.ReplaceBindingsRequest(
            source=SOURCE, reason=reason,
            bindings=[policy_pb2.Binding(prefix=e.prefix, roles=list(e.roles), source=SOURCE,
                                         subject=e.subject) for e in entries.values()])
        try:
            reply = await self._policy().ReplaceBindings(request, timeout=POLICY_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise PolicydUnavailable(f"policyd refused the bindings: {exc.code().name}: "
                                     f"{exc.details()}") from None
        return int(reply.version)

    # -- full sync -----------------------------------------------------------------------

    async def sync(self, trigger: str) -> idp_pb2.SyncResult:
        """One full sync (serialized with every other change)."""
        async with self.lock:
            return await self._sync(trigger)

    async def _sync(self, trigger: str) -> idp_pb2.SyncResult:
        started = time.time()
        t0 = time.monotonic()
        sync_id = f"s-{int(started)}-{secrets.token_hex(3)}"
        self.state.last_sync = started
        result = idp_pb2.SyncResult(sync_id=sync_id, started_at=unix_timestamp(started))
        try:
            plan = await self._plan()
            result.warnings.extend(plan.compiled.warnings)
            self._count(result, plan)
            if self._guard_trips(plan):
                result.outcome = idp_pb2.SYNC_OUTCOME_HELD
                result.error = (f"would remove {len(plan.diff.removed)} of "
                                f"{len(plan.current)} bindings (more than "
                                f"{self.cfg.max_delete_share:.0%}); held until confirmed: "
                                f"vpnctl idp sync --confirm {sync_id}")
                self.held = Held(sync_id, plan, result)
                self.state.consecutive_failures = 0
                self.state.last_good = started
            else:
                self.held = None
                await self._apply(plan, result, f"idp sync {sync_id} ({trigger})")
                self.state.consecutive_failures = 0
                self.state.last_good = started
            self.state.synced = True
        except (IdpUnavailable, PolicydUnavailable) as exc:
            result.outcome = idp_pb2.SYNC_OUTCOME_FAILED
            result.error = str(exc)
            self.state.consecutive_failures += 1
        result.duration_seconds = time.monotonic() - t0
        self.metrics.duration.observe(result.duration_seconds)
        await self._finish(result, trigger)
        return result

    def _count(self, result: idp_pb2.SyncResult, plan: Plan) -> None:
        result.added = len(plan.diff.added)
        result.removed = len(plan.diff.removed)
        result.changed = len(plan.diff.changed)
        result.total = len(plan.compiled.entries)

    def _guard_trips(self, plan: Plan) -> bool:
        current = len(plan.current)
        return (current >= max(1, self.cfg.guard_min_bindings)
                and len(plan.diff.removed) > self.cfg.max_delete_share * current)

    async def _plan(self) -> Plan:
        client = await self.client()
        validator = await self.validator()
        staged = await self._refresh_logins(client, validator)
        if self.cfg.scim_base_url:
            read = await self._read_directory(client)
        else:
            read = DirectoryRead([], 0, [])
        roles, current, foreign, _version = await self._policy_view()
        logins = {**self.logins, **staged}
        compiled = compile_bindings(logins.values(), read.entries, self.mapper, roles, foreign)
        compiled.warnings[:0] = read.warnings
        return Plan(staged, read.entries, compiled, diff(current, compiled.entries), current)

    async def _read_directory(self, client: IdpClient) -> DirectoryRead:
        try:
            token = await client.client_credentials(self.cfg.scim_scope)
        except IdpRefused as exc:
            raise IdpUnavailable(f"directory token refused: {exc}") from None
        try:
            return await read_directory(
                lambda url, params, where: client.get_json(url, token.access_token, params,
                                                           where),
                self.cfg.scim_base_url, page_size=self.cfg.scim_page_size,
                address_attribute=self.cfg.scim_address_attribute)
        except IdpRefused as exc:
            raise IdpUnavailable(f"directory read refused: {exc}") from None

    async def _refresh_logins(self, client: IdpClient,
                              validator: TokenValidator) -> dict[str, LoginRecord]:
        """New versions of the active logins (tokens are saved at once, states staged)."""
        gate = asyncio.Semaphore(LOGIN_CONCURRENCY)

        async def one(login: LoginRecord) -> tuple[str, LoginRecord]:
            async with gate:
                return login.login_id, await self._refresh_one(client, validator, login)

        active = [x for x in self.logins.values() if x.active]
        return dict(await asyncio.gather(*(one(x) for x in active)))

    async def _refresh_one(self, client: IdpClient, validator: TokenValidator,
                           login: LoginRecord) -> LoginRecord:
        refreshed = False
        try:
            if login.access_expires_at - time.time() <= self.cfg.refresh_margin_seconds:
                await self.refresh_tokens(client, validator, login)
                refreshed = True
            try:
                info = await client.userinfo(login.access_token)
            except IdpRefused:
                if refreshed:
                    raise
                # The access token may just have been revoked or expired early: one refresh
                # decides whether the login itself is over.
                await self.refresh_tokens(client, validator, login)
                info = await client.userinfo(login.access_token)
        except IdpRefused as exc:
            return self.ended(login, idp_pb2.LOGIN_STATE_REVOKED,
                              f"the IdP refused the login ({exc}): user disabled or removed, "
                              "or the token was revoked")
        except TokenError as exc:
            return self.ended(login, idp_pb2.LOGIN_STATE_FAILED,
                              f"the IdP sent an invalid ID token ({exc.reason})")
        if info.get("sub") != login.subject:
            return self.ended(login, idp_pb2.LOGIN_STATE_FAILED,
                              "userinfo names another subject than the login")
        claims = kept_claims(info, self.mapper)
        return dataclasses.replace(login, claims=claims, roles=self.mapper.roles(claims),
                                   username=str(info.get("preferred_username")
                                                or login.username))

    async def refresh_tokens(self, client: IdpClient, validator: TokenValidator,
                             login: LoginRecord) -> None:
        """Refresh ``login``'s tokens and save them at once (raises IdpRefused, TokenError)."""
        if not login.refresh_token:
            raise IdpRefused("no_refresh_token", "the IdP gave no refresh token "
                                                 "(offline_access not granted)")
        tokens = await client.refresh(login.refresh_token)
        if tokens.id_token:
            claims = await self.check_id_token(validator, tokens.id_token, login.login_id)
            if claims.get("sub") != login.subject:
                raise IdpRefused("subject_changed", "refreshed ID token names another subject")
        login.access_token = tokens.access_token
        login.refresh_token = tokens.refresh_token
        login.access_expires_at = tokens.expires_at
        login.refreshed_at = time.time()
        await self.store.save_login(login)

    async def check_id_token(self, validator: TokenValidator, token: str, login_id: str,
                             nonce: str | None = None) -> dict[str, Any]:
        """Validate an ID token; a rejection is counted and audited (never the token)."""
        try:
            return await validator.validate_id_token(token, nonce=nonce)
        except TokenError as exc:
            self.tokens_rejected += 1
            self.metrics.rejected.labels(exc.reason).inc()
            self.audit("idp.token_rejected", False, str(exc),
                       {"reason": exc.reason, "token": "id_token", "login_id": login_id,
                        "issuer": self.cfg.issuer})
            log.warning("ID token rejected", extra={"reason": exc.reason, "login": login_id})
            raise

    @staticmethod
    def ended(login: LoginRecord, state: idp_pb2.LoginState, error: str) -> LoginRecord:
        """A copy of ``login`` in a final state."""
        return dataclasses.replace(login, state=state, error=error, ended_at=time.time())

    async def _apply(self, plan: Plan, result: idp_pb2.SyncResult, reason: str) -> None:
        """Push the plan (when it changes anything) and make it the committed state."""
        version = self.state.policy_version
        if not plan.diff.empty:
            version = await self._push(plan.compiled.entries, reason)
            result.outcome = idp_pb2.SYNC_OUTCOME_APPLIED
        else:
            result.outcome = idp_pb2.SYNC_OUTCOME_UNCHANGED
        result.policy_version = version
        for login_id, login in plan.logins.items():
            before = self.logins.get(login_id)
            self.logins[login_id] = login
            if before is None or before.state != login.state or before.roles != login.roles \
                    or before.claims != login.claims:
                await self.store.save_login(login)
            if before is not None and before.active and not login.active:
                self.audit("idp.login_ended", True, login.error,
                           {"login_id": login_id, "username": login.username,
                            "address": login.address})
        directory_changed = plan.directory != self.directory
        self.directory = plan.directory
        await self._commit(plan.compiled.entries, version, plan.diff, result, directory_changed)

    async def _commit(self, entries: dict[str, Entry], version: int, change: Diff,
                      result: idp_pb2.SyncResult, directory_changed: bool) -> None:
        self.bound = dict(entries)
        self.state.policy_version = version
        # Rewrite the stored set only when it changed (10,000 entries are ~1 MB of JSON).
        if not change.empty or not await self.store.get("last_good"):
            await self.store.put("last_good", {
                "sync_id": result.sync_id, "policy_version": version,
                "entries": [entry_json(e) for e in entries.values()]})
        await self.store.put("last_good_at", time.time())
        if directory_changed:
            await self.store.put("directory", [
                {"id": d.id, "username": d.username, "addresses": list(d.addresses),
                 "claims": d.claims} for d in self.directory])
        if not change.empty:
            self.audit("idp.bindings_replaced", True, "", {
                "sync_id": result.sync_id, "policy_version": version,
                "added": [entry_json(e) for e in change.added[:AUDIT_LIST_LIMIT]],
                "removed": [entry_json(e) for e in change.removed[:AUDIT_LIST_LIMIT]],
                "changed": [{"from": entry_json(a), "to": entry_json(b)}
                            for a, b in change.changed[:AUDIT_LIST_LIMIT]],
                "added_count": len(change.added), "removed_count": len(change.removed),
                "changed_count": len(change.changed), "total": len(entries)})
        self._gauges()

    async def _finish(self, result: idp_pb2.SyncResult, trigger: str) -> None:
        self.state.last_result = result
        outcome = idp_pb2.SyncOutcome.Name(result.outcome).removeprefix("SYNC_OUTCOME_").lower()
        self.metrics.syncs.labels(outcome).inc()
        detail = {"sync_id": result.sync_id, "trigger": trigger, "outcome": outcome,
                  "added": result.added, "removed": result.removed, "changed": result.changed,
                  "total": result.total, "warnings": list(result.warnings)[:20],
                  "duration_seconds": round(result.duration_seconds, 4)}
        ok = result.outcome != idp_pb2.SYNC_OUTCOME_FAILED
        self.audit("idp.sync_held" if result.outcome == idp_pb2.SYNC_OUTCOME_HELD
                   else "idp.sync", ok, result.error, detail)
        level = logging.INFO if ok else logging.WARNING
        log.log(level, "sync %s", outcome, extra={k: v for k, v in detail.items()
                                                  if k != "warnings"} | {"error": result.error})

    # -- confirm, local pushes -----------------------------------------------------------

    async def confirm(self, sync_id: str) -> idp_pb2.SyncResult:
        """Apply the held sync ``sync_id`` (raises LookupError when nothing matches)."""
        async with self.lock:
            held = self.held
            if held is None or not sync_id or held.sync_id != sync_id:
                current = held.sync_id if held else "none"
                raise LookupError(f"no held sync {sync_id!r} (held now: {current})")
            t0 = time.monotonic()
            result = idp_pb2.SyncResult()
            result.CopyFrom(held.result)
            result.error = ""
            try:
                await self._apply(held.plan, result, f"idp sync {sync_id} confirmed by operator")
                self.held = None
            except PolicydUnavailable as exc:
                result.outcome = idp_pb2.SYNC_OUTCOME_FAILED
                result.error = str(exc)
            result.duration_seconds = time.monotonic() - t0
            await self._finish(result, "confirm")
            return result

    async def push_local(self, reason: str) -> idp_pb2.SyncResult:
        """Recompile from what idpd knows and push (a login began or ended)."""
        async with self.lock:
            result = idp_pb2.SyncResult(sync_id=f"l-{int(time.time())}-{secrets.token_hex(3)}",
                                        started_at=unix_timestamp(time.time()))
            t0 = time.monotonic()
            try:
                roles, current, foreign, _ = await self._policy_view()
                compiled = compile_bindings(self.logins.values(), self.directory, self.mapper,
                                            roles, foreign)
                plan = Plan({}, self.directory, compiled, diff(current, compiled.entries),
                            current)
                result.warnings.extend(compiled.warnings)
                self._count(result, plan)
                await self._apply(plan, result, reason)
            except PolicydUnavailable as exc:
                result.outcome = idp_pb2.SYNC_OUTCOME_FAILED
                result.error = str(exc)
            result.duration_seconds = time.monotonic() - t0
            self.state.last_result = result
            return result

    # -- audit ---------------------------------------------------------------------------

    def audit(self, action: str, success: bool, error: str, detail: dict[str, Any]) -> None:
        """A control-plane record to auditd (in the background)."""
        self.recorder.record(audit_pb2.ControlEvent(
            daemon="idpd", action=action, actor="idpd", success=success, error=error,
            version_after=self.state.policy_version, detail_json=json.dumps(detail)))

    # -- schedule ------------------------------------------------------------------------

    def next_delay(self) -> float:
        """Seconds to the next scheduled sync: the period with jitter, backoff after
        failures, and earlier when an access token needs refreshing."""
        cfg = self.cfg
        if self.state.consecutive_failures:
            base = min(cfg.backoff_max_seconds, 2.0 ** (self.state.consecutive_failures - 1))
        else:
            base = cfg.sync_interval_seconds
        delay = base * (1 + random.uniform(-cfg.sync_jitter, cfg.sync_jitter))  # noqa: S311
        expiries = [x.access_expires_at for x in self.logins.values() if x.active]
        if expiries:
            delay = min(delay, min(expiries) - cfg.refresh_margin_seconds - time.time())
        return max(1.0, delay)

    async def run(self) -> None:
        """Sync forever: at start, then on schedule or when woken (SyncNow does not go
        through here). A new login only reschedules: its token may expire first."""
        trigger = "start"
        while True:
            await self.sync(trigger)
            trigger = "schedule"
            while True:
                delay = self.next_delay()
                self.state.next_sync = time.time() + delay
                self.reschedule.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.reschedule.wait(), delay)
                    continue
                break
