"""policyd's PolicyService through the generated stubs, failing the way vpnctl fails.

The friendly verbs know the API they speak, so they use the compiled stubs rather than
reflection; errors still come out as :class:`ConnectError` (socket unusable) and
:class:`RpcFailure` (non-OK status), exactly as ``vpnctl call`` reports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from vpnr.core.client import socket_target
from vpnr.v1 import policy_pb2_grpc
from vpnr.vpnctl.reflection import ConnectError, VpnctlError, probe_socket, rpc_failure

Reply = TypeVar("Reply", bound=Message)
MAX_PAGES = 100_000  # a server that never ends its pages must not hang vpnctl forever


class PolicyClient:
    """One connection to policyd; every call carries the same deadline."""

    def __init__(self, path: Path, timeout: float | None) -> None:
        reason = probe_socket(path, timeout)
        if reason is not None:
            raise ConnectError("policyd", path, reason)
        self.path, self.timeout = path, timeout
        self.channel = grpc.insecure_channel(socket_target(path))
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def call(self, method: str, request: Message, reply_type: type[Reply]) -> Reply:
        """Call one unary method by name; RpcFailure on a non-OK status."""
        try:
            reply = getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise rpc_failure(exc) from exc
        if not isinstance(reply, reply_type):  # the stub is untyped: keep mypy honest
            raise VpnctlError(f"{method} answered {type(reply).__name__}, "
                              f"expected {reply_type.__name__}")
        return reply

    def list_all(self, method: str, request: Message, reply_type: type[Message],
                 items: str, page_size: int = 0) -> list[Any]:
        """Every item of a paged List call, following ``next_page_token`` to the end."""
        found: list[Any] = []
        seen_tokens: set[str] = set()
        page: Any = cast(Any, request).page  # every List request has one; Message has not
        page.page_size = page_size
        for _ in range(MAX_PAGES):
            reply: Any = self.call(method, request, reply_type)
            found.extend(getattr(reply, items))
            token = reply.page.next_page_token
            if not token:
                return found
            if token in seen_tokens:
                raise VpnctlError(f"{method} returned the page token {token!r} twice")
            seen_tokens.add(token)
            page.page_token = token
        raise VpnctlError(f"{method} did not end after {MAX_PAGES} pages")
