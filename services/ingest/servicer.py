"""IngestService: the gRPC surface. Validates, calls the domain and the writer, maps errors."""

from __future__ import annotations

import time
from datetime import UTC, datetime

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
_SUPPRESSED = pb.OUTCOME_SUPPRESSED
_MAX_BULK = 10_000
_MAX_GET = 1000


class SourceCache:
    """Write key -> source, kept `ttl` seconds so that a request does not cost a query.
    Disabling a source takes effect within `ttl`; unknown keys are not cached."""

    def __init__(self, pool: asyncpg.Pool, ttl: float) -> None:
        self.pool = pool
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Source]] = {}

    async def get(self, write_key: str) -> Source | None:
        if "\x00" in write_key:
            return None  # Postgres text cannot hold NUL, so no source has such a key
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


class SuppressionCache:
    """Suppressed identifiers per space, kept `ttl` seconds; this replica's own suppressions
    apply at once, other replicas' within `ttl`."""

    def __init__(self, pool: asyncpg.Pool, ttl: float) -> None:
        self.pool = pool
        self.ttl = ttl
        self._cache: dict[str, tuple[float, frozenset[tuple[str, str]]]] = {}

    async def get(self, space_id: str) -> frozenset[tuple[str, str]]:
        now = time.monotonic()
        hit = self._cache.get(space_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await store.suppressions(self.pool, space_id)
        self._cache[space_id] = (now + self.ttl, value)
        return value

    def invalidate(self, space_id: str) -> None:
        self._cache.pop(space_id, None)


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(
        self, pool: asyncpg.Pool, writer: BatchWriter, sources: SourceCache, suppressions: SuppressionCache
    ) -> None:
        self.pool = pool
        self.writer = writer
        self.sources = sources
        self.suppressions = suppressions

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

        suppressed_ids = await self.suppressions.get(source.space_id)
        received_at = datetime.now(UTC)
        outcomes: list[pb.Outcome.ValueType] = [_DUPLICATE] * count
        ids: list[str] = [""] * count
        violations: dict[int, list[pb.FieldViolation]] = {}
        rows = []
        row_index: dict[str, int] = {}
        for i, msg in enumerate(request.events):
            prepared = domain.prepare(
                msg,
                source=source,
                received_at=received_at,
                client_ip=request.client_ip,
                collect_identifiers=bool(suppressed_ids),
            )
            if isinstance(prepared, list):
                outcomes[i] = _REJECTED
                ids[i] = msg.message_id
                violations[i] = prepared
                for v in prepared:
                    REJECTIONS.labels(v.field, v.reason).inc()
                continue
            ids[i] = prepared.message_id
            if suppressed_ids and not suppressed_ids.isdisjoint(prepared.identifiers):
                outcomes[i] = _SUPPRESSED
                continue
            if prepared.message_id in row_index:
                continue  # repeated within the request: stored once, answered duplicate
            row_index[prepared.message_id] = i
            rows.append(prepared.row)

        if rows:
            stored = await self.writer.write(rows, timeout=context.time_remaining())
            for _, message_id in stored:
                outcomes[row_index[message_id]] = _ACCEPTED

        response = pb.WriteEventsResponse()
        tally = {_ACCEPTED: 0, _DUPLICATE: 0, _REJECTED: 0, _SUPPRESSED: 0}
        for i in range(count):
            outcome = outcomes[i]
            tally[outcome] += 1
            if outcome == _REJECTED:
                response.results.add(message_id=ids[i], outcome=outcome, violations=violations[i])
            else:
                response.results.add(message_id=ids[i], outcome=outcome)
        response.accepted = tally[_ACCEPTED]
        response.duplicates = tally[_DUPLICATE]
        response.rejected = tally[_REJECTED]
        response.suppressed = tally[_SUPPRESSED]
        for outcome, label in ((_ACCEPTED, "accepted"), (_DUPLICATE, "duplicate"),
                               (_REJECTED, "rejected"), (_SUPPRESSED, "suppressed")):  # fmt: skip
            MESSAGES.labels(label).inc(tally[outcome])
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

    async def DeleteEvents(
        self, request: pb.DeleteEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteEventsResponse:
        if len(request.events) > _MAX_BULK:
            raise invalid_argument(
                "TOO_MANY", "too many events", [Violation("events", "TOO_MANY", f"at most {_MAX_BULK}")]
            )
        bad = [
            Violation(f"events[{i}]", "REQUIRED", "source_id and message_id are required")
            for i, ref in enumerate(request.events)
            if not ref.source_id or not ref.message_id
        ]
        if bad:
            raise invalid_argument("INVALID_REQUEST", "some event references are incomplete", bad)
        deleted = await store.delete_events(self.pool, [(r.source_id, r.message_id) for r in request.events])
        return pb.DeleteEventsResponse(deleted=deleted)

    async def SuppressIdentifiers(
        self, request: pb.SuppressIdentifiersRequest, context: grpc.aio.ServicerContext
    ) -> pb.SuppressIdentifiersResponse:
        bad = []
        if not request.space_id:
            bad.append(Violation("space_id", "REQUIRED", "space_id is required"))
        if len(request.identifiers) > _MAX_BULK:
            bad.append(Violation("identifiers", "TOO_MANY", f"at most {_MAX_BULK}"))
        idents = []
        for i, ident in enumerate(request.identifiers):
            if not ident.kind or not ident.value.strip():
                bad.append(Violation(f"identifiers[{i}]", "REQUIRED", "kind and value are required"))
                continue
            value = domain.normalise_email(ident.value) if ident.kind == "email" else ident.value.strip()
            idents.append((ident.kind, value))
        if bad:
            raise invalid_argument("INVALID_REQUEST", "the request is invalid", bad)
        n = await store.suppress(self.pool, request.space_id, idents, request.reason)
        self.suppressions.invalidate(request.space_id)
        return pb.SuppressIdentifiersResponse(suppressed=n)
