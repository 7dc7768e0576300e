"""AuditService: Query, Follow, Export, Stats, Record and Status over the store and pipeline.

Thin: validation turns bad requests into INVALID_ARGUMENT naming the field; the work is in
the store (SQL over chunks), the pipeline (the drain) and the follow hub.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from vpnr.auditd import query
from vpnr.auditd import records as R
from vpnr.auditd.store import StoreError
from vpnr.core.daemon import Context
from vpnr.v1 import audit_pb2, audit_pb2_grpc, common_pb2

if TYPE_CHECKING:
    from vpnr.auditd.main import Auditd

RESUME_KEY = "vpnr-resume-after-id"
CATCH_UP_PAGE = 1000
EXPORT_CHUNK_BYTES = 1 << 20
MAX_DETAIL_BYTES = 64 * 1024
MAX_TOP = 100


def control_fields(event: audit_pb2.ControlEvent, detail: object) -> tuple[object, ...]:
    """The stored columns (all but the id) of a control record; ``detail`` is the parsed
    ``detail_json``."""
    return (time.time_ns(), R.KIND_CONTROL, *([None] * (R.PACKET_WIDTH - 3)),
            event.daemon, event.action, event.actor, event.version_before,
            event.version_after, int(event.success), json.dumps(detail, sort_keys=True),
            event.error)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """The gRPC face of auditd."""

    def __init__(self, app: Auditd) -> None:
        self.app = app

    async def _filter(self, msg: audit_pb2.AuditFilter, context: Context) -> query.Filter:
        try:
            return query.from_proto(msg)
        except query.FilterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # abort raises; this keeps type checkers informed

    # -- reads ------------------------------------------------------------------------

    async def Query(self, request: audit_pb2.QueryRequest,
                    context: Context) -> audit_pb2.QueryResponse:
        flt = await self._filter(request.filter, context)
        try:
            size = query.page_size(request.page.page_size)
            before = query.page_token(request.page.page_token)
        except query.FilterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        rows = await self.app.store.newest(flt, before, size)
        fmt = self.app.formatter
        token = str(rows[-1][R.ID]) if len(rows) == size else ""
        return audit_pb2.QueryResponse(records=[fmt.to_proto(r) for r in rows],
                                       page=common_pb2.PageResponse(next_page_token=token))

    async def Follow(self, request: audit_pb2.FollowRequest,
                     context: Context) -> AsyncIterator[audit_pb2.FollowResponse]:
        flt = await self._filter(request.filter, context)
        app = self.app
        matches = flt.matcher(app.store.rolesets_with) if flt != query.Filter() else None
        sub = app.hub.subscribe(matches, app.config.auditd.follow_buffer)
        fmt = app.formatter
        try:
            # "From now" starts after the newest committed record: a cut-off client then
            # resumes from a real cursor even if it was sent nothing yet.
            sent = request.after_id or app.pipeline.committed_id
            if request.after_id:
                # Catch up from the store; rows committed meanwhile are also queued, and
                # the id check below drops the overlap.
                for _ in range(1 << 30):
                    rows = await app.store.after(flt, sent, CATCH_UP_PAGE)
                    if rows:
                        yield audit_pb2.FollowResponse(records=[fmt.to_proto(r) for r in rows])
                        sent = rows[-1][R.ID]
                    if len(rows) < CATCH_UP_PAGE:
                        break
            while True:
                await sub.ready.wait()
                if sub.overflowed:
                    context.set_trailing_metadata(((RESUME_KEY, str(sent)),))
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"client fell more than {sub.limit} records behind; resume with "
                        f"after_id={sent}")
                # One message per wake-up: per-message cost in grpc dominates otherwise.
                rows = [row for row in sub.take() if row[R.ID] > sent]
                for start in range(0, len(rows), CATCH_UP_PAGE):
                    part = rows[start:start + CATCH_UP_PAGE]
                    yield audit_pb2.FollowResponse(records=[fmt.to_proto(r) for r in part])
                    sent = part[-1][R.ID]
        finally:
            app.hub.unsubscribe(sub)

    async def Export(self, request: audit_pb2.ExportRequest,
                     context: Context) -> AsyncIterator[audit_pb2.ExportChunk]:
        flt = await self._filter(request.filter, context)
        fmt = self.app.formatter
        after = 0
        lines: list[str] = []
        size = 0
        for _ in range(1 << 30):
            rows = await self.app.store.after(flt, after, query.MAX_PAGE)
            for row in rows:
                line = fmt.to_json(row) + "\n"
                lines.append(line)
                size += len(line)
                if size >= EXPORT_CHUNK_BYTES:
                    yield audit_pb2.ExportChunk(jsonl="".join(lines).encode(),
                                                records=len(lines))
                    lines, size = [], 0
            if len(rows) < query.MAX_PAGE:
                break
            after = rows[-1][R.ID]
        if lines:
            yield audit_pb2.ExportChunk(jsonl="".join(lines).encode(), records=len(lines))

    async def Stats(self, request: audit_pb2.StatsRequest,
                    context: Context) -> audit_pb2.AuditStats:
        try:
            low, high = query.time_range(
                "time", request.time.HasField("start"), request.time.start.ToNanoseconds(),
                request.time.HasField("end"), request.time.end.ToNanoseconds())
            if request.top > MAX_TOP:
                raise query.FilterError("top", f"at most {MAX_TOP}, got {request.top}")
        except query.FilterError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        top = request.top or 10
        store = self.app.store
        flt = query.Filter(time_from=low, time_to=high, kind=R.KIND_PACKET)
        verdicts: Counter[int] = Counter()
        sources: Counter[str] = Counter()
        destinations: Counter[str] = Counter()
        rolesets: Counter[int] = Counter()
        rules: Counter[str] = Counter()
        span: list[int] = []
        for rows in await store.aggregate(flt, "verdict, count(*), min(time_ns), max(time_ns)",
                                          "GROUP BY verdict"):
            for verdict, count, first, last in rows:
                verdicts[int(verdict)] += int(count)
                span += [int(first), int(last)]
        for column, counter in (("src", sources), ("dst", destinations)):
            for rows in await store.aggregate(flt, f"{column}, count(*)", f"GROUP BY {column}"):
                for address, count in rows:
                    counter[R.address_text(address)] += int(count)
        for rows in await store.aggregate(flt, "roleset, count(*)", "GROUP BY roleset"):
            for roleset, count in rows:
                rolesets[int(roleset or 0)] += int(count)
        for rows in await store.aggregate(flt, "rule_id, rule_role, count(*)",
                                          "AND rule_id != 0 GROUP BY rule_id, rule_role"):
            for rule_id, role, count in rows:
                rules[f"{rule_id} ({role})" if role else str(rule_id)] += int(count)
        roles: Counter[str] = Counter()
        for roleset, count in rolesets.items():
            for name in store.rolesets.get(roleset, ()) or ("(no role)",):
                roles[name] += count
        total = sum(verdicts.values())
        start = low if low is not None else min(span, default=0)
        end = high if high is not None else (max(span, default=0) if low is None
                                             else time.time_ns())
        seconds = max((end - start) / 1e9, 1.0)

        def entries(counter: Counter[str]) -> list[audit_pb2.TopEntry]:
            return [audit_pb2.TopEntry(key=k, count=c) for k, c in counter.most_common(top)]
        return audit_pb2.AuditStats(
            events_per_second=total / seconds if total else 0.0,
            allowed=verdicts[1], denied=verdicts[2],
            top_sources=entries(sources), top_destinations=entries(destinations),
            top_roles=entries(roles), top_rules=entries(rules),
            lost_by_cause=self.app.lost_by_cause())

    # -- writes -----------------------------------------------------------------------

    async def Record(self, request: audit_pb2.RecordRequest,
                     context: Context) -> audit_pb2.RecordResponse:
        event = request.event
        problem = ""
        if not event.daemon or not event.action:
            problem = "event.daemon and event.action are required"
        elif len(event.detail_json) > MAX_DETAIL_BYTES:
            problem = f"event.detail_json is larger than {MAX_DETAIL_BYTES} bytes"
        detail: object = {}
        if not problem and event.detail_json:
            try:
                detail = json.loads(event.detail_json)
            except json.JSONDecodeError as exc:
                problem = f"event.detail_json is not valid JSON: {exc}"
        if not problem and not isinstance(detail, dict):
            problem = "event.detail_json must be a JSON object"
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            record_id = await self.app.pipeline.record_control(control_fields(event, detail))
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"not stored: {exc}")
        return audit_pb2.RecordResponse(id=record_id)

    async def Status(self, request: audit_pb2.AuditStatusRequest,
                     context: Context) -> audit_pb2.AuditStatus:
        return await self.app.status()
