"""auditd's AuditService for the ``vpnctl audit`` verbs: paged queries, a follow that
survives being cut off, and exports.

The loops are plain functions over callables (:func:`query_records`, :func:`follow_records`,
:func:`write_export`) so that their rules (page sizes, resume without loss or duplicates,
counting) hold whatever moves the bytes; :class:`AuditClient` binds them to the stub and turns
gRPC errors into vpnctl's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import grpc

from vpnr.v1 import audit_pb2, audit_pb2_grpc
from vpnr.vpnctl.audit_request import PAGE_SIZE_MAX
from vpnr.vpnctl.reflection import RpcFailure, VpnctlError, rpc_failure
from vpnr.vpnctl.service_client import ServiceClient, follow_pages

RESUME_METADATA_KEY = "vpnr-resume-after-id"
# Cut off again and again without receiving a record: auditd cannot catch this client up,
# so stop instead of reconnecting in a tight loop.
MAX_RESUMES_WITHOUT_PROGRESS = 5

OpenStream = Callable[[int], Iterable[audit_pb2.AuditRecord]]


class FollowCutOff(Exception):
    """auditd ended a Follow stream with RESOURCE_EXHAUSTED because the client fell behind.

    ``resume_after_id`` is the last id it sent (trailing metadata ``vpnr-resume-after-id``),
    None when the metadata was missing or not a number; ``failure`` is the status itself.
    """

    def __init__(self, resume_after_id: int | None, failure: RpcFailure) -> None:
        super().__init__(str(failure))
        self.resume_after_id, self.failure = resume_after_id, failure


def query_records(fetch: Callable[[audit_pb2.QueryRequest], audit_pb2.QueryResponse],
                  request: audit_pb2.QueryRequest,
                  limit: int | None) -> Iterator[audit_pb2.AuditRecord]:
    """Up to ``limit`` records (None: every one) of a Query, page after page, newest first.

    Each page asks for what is still missing, at most :data:`PAGE_SIZE_MAX`; paging stops
    at the last page or once ``limit`` records were yielded. ``request`` is not changed.
    """
    page_request = audit_pb2.QueryRequest()
    page_request.CopyFrom(request)
    remaining = limit

    def fetch_page(token: str) -> audit_pb2.QueryResponse:
        page_request.page.page_token = token
        page_request.page.page_size = min(remaining, PAGE_SIZE_MAX) if remaining is not None \
            else PAGE_SIZE_MAX
        return fetch(page_request)

    for reply in follow_pages("Query", fetch_page):
        for record in reply.records:
            if remaining is not None:
                if remaining <= 0:
                    return
                remaining -= 1
            yield record
        if remaining == 0:
            return


def follow_records(open_stream: OpenStream, after_id: int,
                   on_resume: Callable[[int], None]) -> Iterator[audit_pb2.AuditRecord]:
    """Every record of a Follow, across the reconnects auditd asks for.

    ``open_stream(after_id)`` starts one Follow (0: from now) and raises
    :class:`FollowCutOff` when auditd cuts it off. The loop then reconnects after the last
    record the server sent (the greater of its trailing metadata and the last id received,
    so nothing is lost or repeated), calling ``on_resume(after_id)`` first. Records at or
    below the cursor are dropped as duplicates. It returns when a stream ends with OK;
    any other error propagates.
    """
    cursor = after_id
    stalled = 0
    while True:
        progressed = False
        try:
            for record in open_stream(cursor):
                if cursor and record.id <= cursor:
                    continue
                cursor, progressed = record.id, True
                yield record
            return
        except FollowCutOff as cut:
            stalled = 0 if progressed else stalled + 1
            if stalled >= MAX_RESUMES_WITHOUT_PROGRESS:
                raise VpnctlError(f"auditd cut the Follow stream off {stalled} times without "
                                  f"sending a record: {cut.failure}") from cut
            if cut.resume_after_id is None and not cursor:
                # From "now" with nothing received: reconnecting from a new "now" could
                # skip records, so report instead of guessing.
                raise VpnctlError(f"{cut.failure} (without {RESUME_METADATA_KEY} "
                                  "to resume from)") from cut
            cursor = max(cut.resume_after_id or 0, cursor)
            on_resume(cursor)


def write_export(chunks: Iterable[audit_pb2.ExportChunk], out: BinaryIO) -> int:
    """Write each chunk's JSON lines to ``out`` as it arrives; the number of records."""
    records = 0
    for chunk in chunks:
        out.write(chunk.jsonl)
        records += chunk.records
    out.flush()
    return records


def resume_after_id(error: grpc.RpcError) -> int | None:
    """The ``vpnr-resume-after-id`` trailing metadata of a failed stream as a number, None
    when absent or not a number."""
    # A stream's error is also its grpc.Call, which holds the metadata; the stubs of
    # types-grpcio cannot say so.
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RESUME_METADATA_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return int(text) if text.isdigit() else None
    return None


class AuditClient(ServiceClient):
    """One connection to auditd. Unary calls carry the command's deadline; streams carry
    ``stream_timeout`` (None: they run until they end or are interrupted)."""

    daemon = "auditd"
    stub_class = audit_pb2_grpc.AuditServiceStub

    def __init__(self, path: Path, timeout: float | None, stream_timeout: float | None
                 ) -> None:
        super().__init__(path, timeout)
        self.stream_timeout = stream_timeout

    def query_page(self, request: audit_pb2.QueryRequest) -> audit_pb2.QueryResponse:
        """One Query page."""
        return self.call("Query", request, audit_pb2.QueryResponse)

    def stats(self, request: audit_pb2.StatsRequest) -> audit_pb2.AuditStats:
        """Stats."""
        return self.call("Stats", request, audit_pb2.AuditStats)

    def follow_once(self, request: audit_pb2.FollowRequest,
                    after_id: int) -> Iterator[audit_pb2.AuditRecord]:
        """One Follow stream from ``after_id``; FollowCutOff when auditd cuts it off for
        falling behind, RpcFailure for any other error."""
        attempt = audit_pb2.FollowRequest()
        attempt.CopyFrom(request)
        attempt.after_id = after_id
        stream = self.stub.Follow(attempt, timeout=self.stream_timeout)
        try:
            for response in stream:
                yield from response.records
        except grpc.RpcError as exc:
            failure = rpc_failure(exc)
            if failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED.name:
                raise FollowCutOff(resume_after_id(exc), failure) from exc
            raise failure from exc
        finally:
            stream.cancel()  # a no-op once the stream ended; frees it when abandoned

    def follow(self, request: audit_pb2.FollowRequest,
               on_resume: Callable[[int], None]) -> Iterator[audit_pb2.AuditRecord]:
        """Every record of a Follow from ``request.after_id``, resuming as auditd asks
        (see :func:`follow_records`)."""
        return follow_records(lambda after_id: self.follow_once(request, after_id),
                              request.after_id, on_resume)

    def export(self, request: audit_pb2.ExportRequest) -> Iterator[audit_pb2.ExportChunk]:
        """The Export stream's chunks; RpcFailure on a non-OK status."""
        try:
            yield from self.stub.Export(request, timeout=self.stream_timeout)
        except grpc.RpcError as exc:
            raise rpc_failure(exc) from exc
