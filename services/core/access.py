"""Who may do what on a daemon's sockets, and the gRPC limits every daemon server runs with.

grpcio does not tell a servicer the uid of a Unix-socket peer, so the permission is the
socket itself. Each daemon serves two sockets in ``/run/vpnr/<instance>/``:

* ``<daemon>.sock``, ``0660 root:<admin_group>``: every RPC;
* ``<daemon>-viewer.sock``, ``0660 root:<viewer_group>``: only the RPCs :data:`METHODS`
  classifies as :data:`READ`. Any other call ends in PERMISSION_DENIED and leaves an
  ``access.denied`` control record in the audit trail (method and socket, never the request).

:data:`METHODS` classifies every RPC of every vpnr service explicitly; a test checks it
against the service descriptors, so a new RPC cannot reach the viewer socket unclassified
(an unclassified method is denied there).

Limits (both sockets): messages up to :data:`MAX_MESSAGE_BYTES` each way,
:data:`MAX_STREAMS_PER_CONNECTION` concurrent streams per connection (the client queues
more), :data:`MAX_CONCURRENT_RPCS` calls in progress per server (more end in
RESOURCE_EXHAUSTED at once), keepalive pings that close connections to vanished clients, and
a bound of :data:`WRITE_TIMEOUT_SECONDS` on every message a streaming call sends: a client
that stops reading is cut off with RESOURCE_EXHAUSTED instead of holding the call forever.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from vpnr.v1 import audit_pb2

log = logging.getLogger("vpnr.access")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_STREAMS_PER_CONNECTION = 64
MAX_CONCURRENT_RPCS = 256
WRITE_TIMEOUT_SECONDS = 10.0
DENIED_ACTION = "access.denied"


class Access(enum.Enum):
    """What an RPC does to the daemon."""

    READ = "read"
    CHANGE = "change"


READ = Access.READ
CHANGE = Access.CHANGE

# Every RPC of every service a daemon serves, by full gRPC method name.
METHODS: dict[str, Access] = {
    # policyd
    "/vpnr.v1.PolicyService/Status": READ,
    "/vpnr.v1.PolicyService/CreateRole": CHANGE,
    "/vpnr.v1.PolicyService/GetRole": READ,
    "/vpnr.v1.PolicyService/ListRoles": READ,
    "/vpnr.v1.PolicyService/UpdateRole": CHANGE,
    "/vpnr.v1.PolicyService/DeleteRole": CHANGE,
    "/vpnr.v1.PolicyService/CreateRule": CHANGE,
    "/vpnr.v1.PolicyService/GetRule": READ,
    "/vpnr.v1.PolicyService/ListRules": READ,
    "/vpnr.v1.PolicyService/UpdateRule": CHANGE,
    "/vpnr.v1.PolicyService/DeleteRule": CHANGE,
    "/vpnr.v1.PolicyService/CreateBinding": CHANGE,
    "/vpnr.v1.PolicyService/GetBinding": READ,
    "/vpnr.v1.PolicyService/ListBindings": READ,
    "/vpnr.v1.PolicyService/UpdateBinding": CHANGE,
    "/vpnr.v1.PolicyService/DeleteBinding": CHANGE,
    "/vpnr.v1.PolicyService/CreateZone": CHANGE,
    "/vpnr.v1.PolicyService/GetZone": READ,
    "/vpnr.v1.PolicyService/ListZones": READ,
    "/vpnr.v1.PolicyService/UpdateZone": CHANGE,
    "/vpnr.v1.PolicyService/DeleteZone": CHANGE,
    "/vpnr.v1.PolicyService/GetPolicy": READ,
    "/vpnr.v1.PolicyService/ReplacePolicy": CHANGE,
    "/vpnr.v1.PolicyService/ReplaceBindings": CHANGE,
    "/vpnr.v1.PolicyService/CreateSnapshot": CHANGE,
    "/vpnr.v1.PolicyService/ListSnapshots": READ,
    "/vpnr.v1.PolicyService/DiffSnapshots": READ,
    "/vpnr.v1.PolicyService/RestoreSnapshot": CHANGE,
    "/vpnr.v1.PolicyService/DeleteSnapshot": CHANGE,
    "/vpnr.v1.PolicyService/TestDecision": READ,
    # tunneld
    "/vpnr.v1.TunnelService/Status": READ,
    "/vpnr.v1.TunnelService/AddPeer": CHANGE,
    "/vpnr.v1.TunnelService/GetPeer": READ,
    "/vpnr.v1.TunnelService/ListPeers": READ,
    "/vpnr.v1.TunnelService/UpdatePeer": CHANGE,
    "/vpnr.v1.TunnelService/RemovePeer": CHANGE,
    "/vpnr.v1.TunnelService/RevokePeer": CHANGE,
    "/vpnr.v1.TunnelService/ListSessions": READ,
    "/vpnr.v1.TunnelService/CreateSession": CHANGE,
    "/vpnr.v1.TunnelService/DeleteSession": CHANGE,
    "/vpnr.v1.TunnelService/RotateSession": CHANGE,
    "/vpnr.v1.TunnelService/RotateStaticKey": CHANGE,
    # auditd
    "/vpnr.v1.AuditService/Status": READ,
    "/vpnr.v1.AuditService/Query": READ,
    "/vpnr.v1.AuditService/Follow": READ,
    "/vpnr.v1.AuditService/Export": READ,
    "/vpnr.v1.AuditService/Record": CHANGE,
    "/vpnr.v1.AuditService/Stats": READ,
    # idpd
    "/vpnr.v1.IdpService/Status": READ,
    "/vpnr.v1.IdpService/GetConfig": READ,
    "/vpnr.v1.IdpService/TestConnection": READ,
    "/vpnr.v1.IdpService/SyncNow": CHANGE,
    "/vpnr.v1.IdpService/ConfirmSync": CHANGE,
    "/vpnr.v1.IdpService/StartLogin": CHANGE,
    "/vpnr.v1.IdpService/WaitLogin": CHANGE,
    "/vpnr.v1.IdpService/CompleteLogin": CHANGE,
    "/vpnr.v1.IdpService/ListLogins": READ,
    "/vpnr.v1.IdpService/Logout": CHANGE,
    "/vpnr.v1.IdpService/ListBindings": READ,
    # every daemon
    "/grpc.health.v1.Health/Check": READ,
    "/grpc.health.v1.Health/Watch": READ,
    "/grpc.health.v1.Health/List": READ,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": READ,
}

# Server options of both sockets. No connection age limit: Follow streams live for days.
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    ("grpc.keepalive_time_ms", 60_000),           # ping a connection quiet for a minute
    ("grpc.keepalive_timeout_ms", 20_000),        # and close it when the ping goes unanswered
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping every 10 s
    ("grpc.http2.max_ping_strikes", 3),           # pinging faster gets the connection closed
    ("grpc.max_connection_idle_ms", 30 * 60_000),  # idle clients reconnect transparently
]


def access_of(method: str) -> Access:
    """How :data:`METHODS` classifies ``method``; an unknown method counts as a change."""
    return METHODS.get(method, CHANGE)


def denied_message(method: str) -> str:
    """What a viewer is told when it calls a change on the viewer socket."""
    return (f"{method} changes state: the viewer socket is read-only; use the admin socket "
            "(a member of the admin group)")


def denied_event(daemon: str, method: str, socket: str) -> audit_pb2.ControlEvent:
    """The control record of one refused call: method and socket, never the request."""
    return audit_pb2.ControlEvent(
        daemon=daemon, action=DENIED_ACTION, actor="viewer-socket", success=False,
        detail_json=json.dumps({"method": method, "socket": socket}, sort_keys=True),
        error="the viewer socket is read-only")


if TYPE_CHECKING:  # grpc's classes are generic only in the type stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]
Record = Callable[[audit_pb2.ControlEvent], None]


def _denying_handler(kind: Handler | None, message: str) -> Handler:
    """A handler of the same shape as ``kind`` that refuses without reading the request."""

    async def refuse(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

    # No deserializer: the request bytes are never parsed.
    if kind is not None and kind.request_streaming and kind.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if kind is not None and kind.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if kind is not None and kind.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class ReadOnlyInterceptor(grpc.aio.ServerInterceptor):
    """The viewer socket's gate: reads pass, every other call is refused and recorded."""

    def __init__(self, daemon: str, socket: str, record: Record) -> None:
        self.daemon, self.socket, self.record = daemon, socket, record
        self.denied = 0

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> Handler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if access_of(method) is READ:
            return handler  # type: ignore[return-value]  # None: grpc answers UNIMPLEMENTED
        self.denied += 1
        log.warning("call refused on the viewer socket",
                    extra={"method": method, "socket": self.socket})
        self.record(denied_event(self.daemon, method, self.socket))
        return _denying_handler(handler, denied_message(method))


def _bounded_stream(behavior: Callable[..., Any], method: str,
                    timeout: float) -> Callable[..., Awaitable[None]]:
    """``behavior`` (a streaming-response handler) with each message's write bounded."""

    async def bounded(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        produced = behavior(request, context)
        if not isinstance(produced, AsyncGenerator):
            await produced  # a coroutine writing through context.write itself
            return
        try:
            async for message in produced:
                try:
                    await asyncio.wait_for(context.write(message), timeout)
                except TimeoutError:
                    log.warning("streaming client stopped reading: cut off",
                                extra={"method": method, "timeout_s": timeout})
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{method}: the client did not read for {timeout:g} s and was cut "
                        "off; call again (Follow: with after_id = the last id received)")
        finally:
            await produced.aclose()  # runs the handler's own clean-up (e.g. unsubscribe)

    return bounded


class WriteTimeoutInterceptor(grpc.aio.ServerInterceptor):
    """Bounds every message a streaming-response call sends by ``timeout`` seconds."""

    def __init__(self, timeout: float = WRITE_TIMEOUT_SECONDS) -> None:
        self.timeout = timeout

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler  # type: ignore[return-value]
        method = handler_call_details.method
        if handler.request_streaming:
            assert handler.stream_stream is not None
            return grpc.stream_stream_rpc_method_handler(
                _bounded_stream(handler.stream_stream, method, self.timeout),
                handler.request_deserializer, handler.response_serializer)
        assert handler.unary_stream is not None
        return grpc.unary_stream_rpc_method_handler(
            _bounded_stream(handler.unary_stream, method, self.timeout),
            handler.request_deserializer, handler.response_serializer)
