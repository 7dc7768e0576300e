"""IdpService: the gRPC face of idpd (thin: checks the request, calls the engine)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc

from vpnr.core import paging
from vpnr.core.daemon import Context, abort, unix_timestamp
from vpnr.idpd.compile import Entry
from vpnr.idpd.discovery import DiscoveryState, refresh
from vpnr.idpd.logins import LoginError, LoginManager
from vpnr.idpd.oauth import IdpRefused, IdpUnavailable
from vpnr.idpd.store import LoginRecord
from vpnr.idpd.sync import SyncEngine
from vpnr.idpd.tokens import TokenError
from vpnr.v1 import idp_pb2, idp_pb2_grpc

if TYPE_CHECKING:
    from vpnr.idpd.main import Idpd

WAIT_MARGIN = 0.5  # answer this long before the caller's deadline
NO_IDP = "no IdP configured: set [idpd] issuer"


def login_message(login: LoginRecord) -> idp_pb2.Login:
    """A login as the API shows it (never a token)."""
    groups = login.claims.get("groups", [])
    return idp_pb2.Login(
        login_id=login.login_id, subject=login.subject, username=login.username,
        address=login.address, groups=[g for g in groups if isinstance(g, str)],
        roles=list(login.roles), state=login.state, flow=login.flow, error=login.error,
        created_at=unix_timestamp(login.created_at),
        refreshed_at=unix_timestamp(login.refreshed_at) if login.refreshed_at else None,
        access_expires_at=(unix_timestamp(login.access_expires_at)
                           if login.access_expires_at else None),
        expires_at=(unix_timestamp(login.access_expires_at)
                    if login.access_expires_at else None))


def binding_message(entry: Entry) -> idp_pb2.IdpBinding:
    """One compiled binding."""
    return idp_pb2.IdpBinding(prefix=entry.prefix, roles=list(entry.roles),
                              subject=entry.subject, origin=entry.origin,
                              username=entry.username, groups=list(entry.groups))


class IdpServicer(idp_pb2_grpc.IdpServiceServicer):
    """The IdpService RPCs.

    Without an IdP (``[idpd] issuer`` empty) the reads answer what there is: Status and
    GetConfig as configured, ListLogins and ListBindings an empty list. Every RPC that needs
    the IdP (TestConnection, SyncNow, ConfirmSync, StartLogin, WaitLogin, CompleteLogin,
    Logout) is FAILED_PRECONDITION with :data:`NO_IDP`: no login can exist, so WaitLogin
    says why rather than NOT_FOUND.
    """

    def __init__(self, app: Idpd) -> None:
        self.app = app

    async def _configured(self, context: Context) -> None:
        if not self.app.config.idpd.issuer:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, NO_IDP)

    async def _engine(self, context: Context) -> SyncEngine:
        """The sync engine, or FAILED_PRECONDITION when no IdP is configured."""
        if self.app.engine is None:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, NO_IDP)
        return self.app.engine

    async def _logins(self, context: Context) -> LoginManager:
        """The login manager, or FAILED_PRECONDITION when no IdP is configured."""
        if self.app.logins is None:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, NO_IDP)
        return self.app.logins

    async def Status(self, request: idp_pb2.IdpStatusRequest,
                     context: Context) -> idp_pb2.IdpStatus:
        app = self.app
        state = app.discovery
        engine = app.engine
        status = idp_pb2.IdpStatus(
            daemon=app.runtime.daemon_info(), issuer=app.config.idpd.issuer,
            discovery_ok=state.ok, discovery_error=state.error,
            discovery_fetched_at=unix_timestamp(state.fetched_at),
            discovered_endpoints=state.endpoints(), warnings=app.warnings())
        if engine is None:
            return status
        sync = engine.state
        status.bindings = len(engine.bound)
        status.active_logins = sum(1 for x in engine.logins.values() if x.active)
        status.directory_entries = len(engine.directory)
        status.staleness_seconds = engine.staleness()
        status.stale = engine.stale
        status.consecutive_failures = sync.consecutive_failures
        status.tokens_rejected = engine.tokens_rejected
        status.policy_version = sync.policy_version
        status.last_result.CopyFrom(sync.last_result)
        for name, when in (("last_sync", sync.last_sync), ("last_good_sync", sync.last_good),
                           ("next_sync", sync.next_sync)):
            stamp = unix_timestamp(when) if when else None
            if stamp is not None:
                getattr(status, name).CopyFrom(stamp)
        if engine.held is not None:
            status.held_sync_id = engine.held.sync_id
            status.held.CopyFrom(engine.held.result)
        return status

    async def GetConfig(self, request: idp_pb2.GetIdpConfigRequest,
                        context: Context) -> idp_pb2.IdpConfig:
        cfg = self.app.config.idpd
        return idp_pb2.IdpConfig(
            issuer=cfg.issuer, client_id=cfg.client_id,
            client_secret_set=bool(self.app.client_secret), scopes=list(cfg.scopes),
            scim_base_url=cfg.scim_base_url,
            sync_interval_seconds=int(cfg.sync_interval_seconds),
            max_delete_share=cfg.max_delete_share,
            claim_mappings=self.app.mapper.describe(),
            allowed_algorithms=list(cfg.allowed_algorithms))

    async def TestConnection(self, request: idp_pb2.TestConnectionRequest,
                             context: Context) -> idp_pb2.TestConnectionResponse:
        await self._configured(context)
        cfg = self.app.config.idpd
        started = time.monotonic()
        reply = idp_pb2.TestConnectionResponse()
        probe = DiscoveryState()
        await refresh(probe, cfg.issuer, cfg.discovery_timeout_seconds)
        reply.discovery_ok = probe.ok
        if not probe.ok:
            reply.errors.append(f"discovery: {probe.error}")
        else:
            try:
                validator = await self.app.fresh_validator(probe.document)
                await validator.jwks.refresh()
                reply.jwks_ok = bool(validator.jwks.kids)
                if not reply.jwks_ok:
                    reply.errors.append("jwks: the key set has no usable signing key")
            except (TokenError, IdpUnavailable) as exc:
                reply.errors.append(f"jwks: {exc}")
            client = self.app.make_client(probe.document)
            try:
                token = await client.client_credentials(cfg.scim_scope if cfg.scim_base_url
                                                        else "")
                reply.token_ok = True
                if cfg.scim_base_url:
                    await client.get_json(cfg.scim_base_url.rstrip("/") + "/Users",
                                          token.access_token, {"count": 1}, "SCIM /Users")
                    reply.scim_ok = True
            except (IdpUnavailable, IdpRefused) as exc:
                reply.errors.append(f"{'scim' if reply.token_ok else 'token'}: {exc}")
            finally:
                await client.aclose()
        reply.latency_seconds = time.monotonic() - started
        return reply

    async def SyncNow(self, request: idp_pb2.SyncNowRequest,
                      context: Context) -> idp_pb2.SyncResult:
        engine = await self._engine(context)
        return await engine.sync("on demand")

    async def ConfirmSync(self, request: idp_pb2.ConfirmSyncRequest,
                          context: Context) -> idp_pb2.SyncResult:
        engine = await self._engine(context)
        if not request.held_sync_id:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "held_sync_id: name the held sync (vpnctl idp status shows it)")
        try:
            return await engine.confirm(request.held_sync_id)
        except LookupError as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))

    async def StartLogin(self, request: idp_pb2.StartLoginRequest,
                         context: Context) -> idp_pb2.LoginChallenge:
        logins = await self._logins(context)
        try:
            login, pending = await logins.start(request.address, request.flow)
        except LoginError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except IdpUnavailable as exc:
            await abort(context, grpc.StatusCode.UNAVAILABLE, f"the IdP is unreachable: {exc}")
        except IdpRefused as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"the IdP refused to start a login: {exc}")
        reply = idp_pb2.LoginChallenge(login_id=login.login_id,
                                       expires_at=unix_timestamp(pending.expires_at))
        if pending.device is not None:
            d = pending.device
            reply.verification_uri = d.verification_uri
            reply.verification_uri_complete = d.verification_uri_complete
            reply.user_code = d.user_code
            reply.interval_seconds = int(d.interval)
        else:
            reply.authorization_url = pending.url
            reply.redirect_uri = self.app.config.idpd.redirect_uri
        return reply

    async def WaitLogin(self, request: idp_pb2.WaitLoginRequest,
                        context: Context) -> idp_pb2.Login:
        logins = await self._logins(context)
        remaining = context.time_remaining()
        timeout = 30.0 if remaining is None else max(0.0, remaining - WAIT_MARGIN)
        try:
            login = await logins.wait(request.login_id, timeout)
        except LookupError as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        return login_message(login)

    async def CompleteLogin(self, request: idp_pb2.CompleteLoginRequest,
                            context: Context) -> idp_pb2.Login:
        logins = await self._logins(context)
        try:
            login = await logins.complete(
                request.login_id, request.code, request.state, request.iss, request.error,
                request.error_description)
        except LookupError as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except LoginError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except IdpUnavailable as exc:
            await abort(context, grpc.StatusCode.UNAVAILABLE, f"the IdP is unreachable: {exc}")
        return login_message(login)

    async def ListLogins(self, request: idp_pb2.ListLoginsRequest,
                         context: Context) -> idp_pb2.ListLoginsResponse:
        # Without an IdP there are no logins: an empty list (the page is still checked).
        found: list[LoginRecord] = []
        if self.app.logins is not None:
            found += [p.login for p in self.app.logins.pending.values()]
        if self.app.engine is not None:
            found += [x for x in self.app.engine.logins.values() if request.all or x.active]
        found.sort(key=lambda x: x.created_at)
        chunk, page = await paging.page_or_abort(context, found, request.page)
        return idp_pb2.ListLoginsResponse(logins=[login_message(x) for x in chunk], page=page)

    async def Logout(self, request: idp_pb2.LogoutRequest,
                     context: Context) -> idp_pb2.LogoutResponse:
        logins = await self._logins(context)
        try:
            result = await logins.logout(request.login_id, request.address)
        except LoginError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except LookupError as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        if result.outcome == idp_pb2.SYNC_OUTCOME_FAILED:
            await abort(context, grpc.StatusCode.UNAVAILABLE,
                         f"logged out, but the binding is not removed yet: {result.error} "
                         "(the next sync retries)")
        return idp_pb2.LogoutResponse(policy_version=result.policy_version)

    async def ListBindings(self, request: idp_pb2.ListIdpBindingsRequest,
                           context: Context) -> idp_pb2.ListIdpBindingsResponse:
        entries = sorted(self.app.engine.bound.values(), key=lambda e: e.prefix) \
            if self.app.engine is not None else []
        chunk, page = await paging.page_or_abort(context, entries, request.page)
        return idp_pb2.ListIdpBindingsResponse(bindings=[binding_message(e) for e in chunk],
                                               page=page)
