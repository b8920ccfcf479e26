"""IngestService: the gRPC surface. Validates, calls the domain and the writer, maps errors."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import asyncpg
import grpc
from prometheus_client import Counter

from services.ingest import domain, store
from services.ingest.domain import Source
from services.ingest.writer import BatchWriter
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from touchpoint.platform.errors import Violation, invalid_argument, unauthenticated

MESSAGES = Counter("touchpoint_ingest_messages_total", "Messages by outcome.", ["outcome"])
REJECTIONS = Counter(
    "touchpoint_ingest_rejections_total", "Rejected messages by field and reason.", ["field", "reason"]
)
REQUESTS_REFUSED = Counter(
    "touchpoint_ingest_requests_refused_total", "Whole requests refused, by reason.", ["reason"]
)

_ACCEPTED = pb.OUTCOME_ACCEPTED
_DUPLICATE = pb.OUTCOME_DUPLICATE
_REJECTED = pb.OUTCOME_REJECTED
_MAX_GET = 1000


class SourceCache:
    """Write key -> source, kept `ttl` seconds so that a request does not cost a query.
    Disabling a source takes effect within `ttl`; unknown keys are not cached."""

    def __init__(self, pool: asyncpg.Pool, ttl: float) -> None:
        self.pool = pool
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Source]] = {}

    async def get(self, write_key: str) -> Source | None:
        now = time.monotonic()
        hit = self._cache.get(write_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        source = await store.source_by_write_key(self.pool, write_key)
        if source is not None and self.ttl > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[write_key] = (now + self.ttl, source)
        return source


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(self, pool: asyncpg.Pool, writer: BatchWriter, sources: SourceCache) -> None:
        self.pool = pool
        self.writer = writer
        self.sources = sources

    async def WriteEvents(
        self, request: pb.WriteEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.WriteEventsResponse:
        if not request.write_key:
            REQUESTS_REFUSED.labels("NO_WRITE_KEY").inc()
            raise unauthenticated("NO_WRITE_KEY", "a write key is required")
        source = await self.sources.get(request.write_key)
        if source is None or not source.enabled:
            reason = "UNKNOWN_WRITE_KEY" if source is None else "SOURCE_DISABLED"
            REQUESTS_REFUSED.labels(reason).inc()
            raise unauthenticated(reason, "the write key is unknown or its source is disabled")
        count = len(request.events)
        if count > domain.MAX_BATCH_MESSAGES:
            REQUESTS_REFUSED.labels("BATCH_TOO_LARGE").inc()
            raise invalid_argument(
                "BATCH_TOO_LARGE",
                f"a batch holds at most {domain.MAX_BATCH_MESSAGES} messages, got {count}",
                [Violation("batch", "TOO_MANY_MESSAGES", f"{count} > {domain.MAX_BATCH_MESSAGES}")],
            )
        size = request.ByteSize()
        if size > domain.MAX_REQUEST_BYTES:
            REQUESTS_REFUSED.labels("REQUEST_TOO_LARGE").inc()
            raise invalid_argument(
                "REQUEST_TOO_LARGE",
                f"a request is at most {domain.MAX_REQUEST_BYTES} bytes, got {size}",
                [Violation("batch", "TOO_LARGE", f"{size} > {domain.MAX_REQUEST_BYTES} bytes")],
            )

        received_at = datetime.now(timezone.utc)
        outcomes: list[int] = [_DUPLICATE] * count
        ids: list[str] = [""] * count
        violations: dict[int, list[pb.FieldViolation]] = {}
        rows = []
        row_index: dict[str, int] = {}
        for i, msg in enumerate(request.events):
            prepared = domain.prepare(msg, source=source, received_at=received_at, client_ip=request.client_ip)
            if isinstance(prepared, list):
                outcomes[i] = _REJECTED
                ids[i] = msg.message_id
                violations[i] = prepared
                for v in prepared:
                    REJECTIONS.labels(v.field, v.reason).inc()
                continue
            ids[i] = prepared.message_id
            if prepared.message_id in row_index:
                continue  # repeated within the request: stored once, answered duplicate
            row_index[prepared.message_id] = i
            rows.append(prepared.row)

        if rows:
            stored = await self.writer.write(rows)
            for (_, message_id) in stored:
                outcomes[row_index[message_id]] = _ACCEPTED

        response = pb.WriteEventsResponse()
        accepted = duplicates = 0
        for i in range(count):
            outcome = outcomes[i]
            if outcome == _ACCEPTED:
                accepted += 1
                response.results.add(message_id=ids[i], outcome=outcome)  # type: ignore[arg-type]
            elif outcome == _DUPLICATE:
                duplicates += 1
                response.results.add(message_id=ids[i], outcome=outcome)  # type: ignore[arg-type]
            else:
                response.results.add(message_id=ids[i], outcome=outcome, violations=violations[i])  # type: ignore[arg-type]
        response.accepted = accepted
        response.duplicates = duplicates
        response.rejected = len(violations)
        MESSAGES.labels("accepted").inc(accepted)
        MESSAGES.labels("duplicate").inc(duplicates)
        MESSAGES.labels("rejected").inc(len(violations))
        return response

    async def GetEvents(
        self, request: pb.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEventsResponse:
        bad = []
        if not request.source_id:
            bad.append(Violation("source_id", "REQUIRED", "source_id is required"))
        if len(request.message_ids) > _MAX_GET:
            bad.append(Violation("message_ids", "TOO_MANY", f"at most {_MAX_GET} message ids"))
        if bad:
            raise invalid_argument("INVALID_REQUEST", "the request is invalid", bad)
        rows = await store.get_events(self.pool, request.source_id, list(request.message_ids))
        return pb.GetEventsResponse(events=[domain.row_to_event(r) for r in rows])
