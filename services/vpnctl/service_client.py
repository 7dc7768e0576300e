"""One daemon's service through its compiled stub, failing the way vpnctl fails.

The friendly verbs know the API they speak, so they use the compiled stubs rather than
reflection; errors still come out as :class:`ConnectError` (socket unusable) and
:class:`RpcFailure` (non-OK status), exactly as ``vpnctl call`` reports them. Each daemon's
client (:mod:`vpnr.vpnctl.policy_client`, :mod:`vpnr.vpnctl.audit_client`) names its daemon
and stub and adds what its verbs need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar, cast

import grpc
from google.protobuf.message import Message

from vpnr.core.client import socket_target
from vpnr.vpnctl.reflection import VpnctlError, rpc_failure, usable_socket

Reply = TypeVar("Reply", bound=Message)
MAX_PAGES = 100_000  # a server that never ends its pages must not hang vpnctl forever


class ServiceClient:
    """One connection to a daemon; every unary call carries the same deadline."""

    daemon: ClassVar[str]
    # The generated ``*Stub`` class, called with the channel (grpcio-tools types none).
    stub_class: ClassVar[type[Any]]

    def __init__(self, path: Path, timeout: float | None) -> None:
        path = usable_socket(self.daemon, path, timeout)
        self.path, self.timeout = path, timeout
        self.channel = grpc.insecure_channel(socket_target(path))
        self.stub = self.stub_class(self.channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (this also cancels a stream still open on it)."""
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
        """Every item of a paged List call, following ``next_page_token`` to the end
        (``page_size`` 0: the server's default)."""
        page: Any = cast(Any, request).page  # every List request has one; Message has not
        page.page_size = page_size

        def fetch(token: str) -> Message:
            page.page_token = token
            return self.call(method, request, reply_type)

        return [item for reply in follow_pages(method, fetch) for item in getattr(reply, items)]


def follow_pages(method: str, fetch: Callable[[str], Reply]) -> Iterator[Reply]:
    """Each page of a paged call: ``fetch(page_token)`` answers one page, starting from the
    empty token, until a page's ``next_page_token`` is empty. A token the server hands out
    twice, or more than :data:`MAX_PAGES` pages, is a VpnctlError rather than a hang."""
    seen_tokens: set[str] = set()
    token = ""
    for _ in range(MAX_PAGES):
        reply = fetch(token)
        yield reply
        token = cast(Any, reply).page.next_page_token  # every paged reply has one
        if not token:
            return
        if token in seen_tokens:
            raise VpnctlError(f"{method} returned the page token {token!r} twice")
        seen_tokens.add(token)
    raise VpnctlError(f"{method} did not end after {MAX_PAGES} pages")
