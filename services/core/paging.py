"""List RPC paging shared by the daemons: the page token is an opaque (base64) offset."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import TypeVar

import grpc

from vpnr.core.daemon import Context, abort
from vpnr.v1 import common_pb2

T = TypeVar("T")
DEFAULT_PAGE = 100
MAX_PAGE = 1000


class PageError(ValueError):
    """A PageRequest is wrong; ``field`` names what."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def page_bounds(page: common_pb2.PageRequest, where: str = "page") -> tuple[int, int]:
    """(offset, size) from a PageRequest."""
    size = page.page_size or DEFAULT_PAGE
    if size > MAX_PAGE:
        raise PageError(f"{where}.page_size", f"at most {MAX_PAGE}, got {size}")
    if not page.page_token:
        return 0, size
    try:
        offset = int(base64.urlsafe_b64decode(page.page_token.encode()).decode())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise PageError(f"{where}.page_token", "not a token from a previous response") \
            from None
    if offset < 0:
        raise PageError(f"{where}.page_token", "not a token from a previous response")
    return offset, size


def page_of(items: Sequence[T], page: common_pb2.PageRequest
            ) -> tuple[Sequence[T], common_pb2.PageResponse]:
    """One page of ``items`` and the response's paging fields."""
    offset, size = page_bounds(page)
    return items[offset:offset + size], page_response(offset, size, len(items))


def page_response(offset: int, size: int, total: int) -> common_pb2.PageResponse:
    """The paging fields after the page at ``offset`` of ``size`` out of ``total``."""
    token = ""
    if offset + size < total:
        token = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
    return common_pb2.PageResponse(next_page_token=token, total_size=total)


async def page_or_abort(context: Context, items: Sequence[T], page: common_pb2.PageRequest
                        ) -> tuple[Sequence[T], common_pb2.PageResponse]:
    """:func:`page_of` for a servicer: a wrong PageRequest ends the RPC with
    INVALID_ARGUMENT naming the field."""
    try:
        return page_of(items, page)
    except PageError as exc:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
