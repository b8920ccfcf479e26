"""IngestService: the gRPC surface. Validates, calls the domain and the writer, maps errors."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

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
        events, messages_json = request.events, request.messages_json
        count = len(events) + len(messages_json)
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
        collect = bool(suppressed_ids)
        received_at = datetime.now(UTC)
        client_ip = request.client_ip
        # Every message starts as accepted; the exceptions are recorded as they are found.
        outcomes: list[pb.Outcome.ValueType] = [_ACCEPTED] * count
        ids: list[str] = [""] * count
        violations: dict[int, list[pb.FieldViolation]] = {}
        rows: list[tuple[Any, ...]] = []
        row_index: dict[str, int] = {}
        i = 0
        # No message can be over its limit when the whole request is not: skip measuring then.
        check_size = size > domain.MAX_MESSAGE_BYTES
        for msg in events:
            from_event = domain.prepare(
                msg,
                source=source,
                received_at=received_at,
                client_ip=client_ip,
                collect_identifiers=collect,
                check_size=check_size,
            )
            self._take(
                from_event if isinstance(from_event, domain.Prepared) else domain.Rejected(msg.message_id, from_event),
                i, outcomes, ids, violations, rows, row_index, suppressed_ids,
            )  # fmt: skip
            i += 1
        if messages_json:
            times: dict[str, domain.PgTime | None] = {}
            for raw in messages_json:
                prepared = domain.prepare_json(
                    raw,
                    source=source,
                    received_at=received_at,
                    client_ip=client_ip,
                    collect_identifiers=collect,
                    times=times,
                )
                self._take(prepared, i, outcomes, ids, violations, rows, row_index, suppressed_ids)
                i += 1

        if rows:
            duplicates = await self.writer.write(rows, timeout=context.time_remaining())
            for _, message_id in duplicates:
                outcomes[row_index[message_id]] = _DUPLICATE

        response = pb.WriteEventsResponse()
        accepted = outcomes.count(_ACCEPTED)
        if request.omit_accepted_results:
            if accepted < count:
                add = response.results.add
                for i, outcome in enumerate(outcomes):
                    if outcome != _ACCEPTED:
                        add(index=i, message_id=ids[i], outcome=outcome, violations=violations.get(i))
        else:
            add = response.results.add
            for i in range(count):
                outcome = outcomes[i]
                if outcome == _REJECTED:
                    add(message_id=ids[i], outcome=outcome, violations=violations[i])
                else:
                    add(message_id=ids[i], outcome=outcome)
        response.accepted = accepted
        response.duplicates = outcomes.count(_DUPLICATE)
        response.rejected = len(violations)
        response.suppressed = outcomes.count(_SUPPRESSED)
        for n, label in ((accepted, "accepted"), (response.duplicates, "duplicate"),
                         (response.rejected, "rejected"), (response.suppressed, "suppressed")):  # fmt: skip
            if n:
                MESSAGES.labels(label).inc(n)
        return response

    @staticmethod
    def _take(
        prepared: domain.Prepared | domain.Rejected,
        i: int,
        outcomes: list[pb.Outcome.ValueType],
        ids: list[str],
        violations: dict[int, list[pb.FieldViolation]],
        rows: list[tuple[Any, ...]],
        row_index: dict[str, int],
        suppressed_ids: frozenset[tuple[str, str]],
    ) -> None:
        """Records what happens to message i: rejected, suppressed, repeated, or a row to write."""
        if type(prepared) is domain.Rejected:
            outcomes[i] = _REJECTED
            ids[i] = prepared.message_id
            violations[i] = prepared.violations
            for v in prepared.violations:
                REJECTIONS.labels(v.field, v.reason).inc()
            return
        assert type(prepared) is domain.Prepared
        message_id = ids[i] = prepared.message_id
        if suppressed_ids and not suppressed_ids.isdisjoint(prepared.identifiers):
            outcomes[i] = _SUPPRESSED
        elif message_id in row_index:
            outcomes[i] = _DUPLICATE  # repeated within the request: stored once, answered duplicate
        else:
            row_index[message_id] = i
            rows.append(prepared.row)

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
