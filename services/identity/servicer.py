"""IdentityService: the gRPC surface. Validates, calls the store and the stitcher, maps errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import grpc
import orjson

from services.identity import domain, store
from services.identity.domain import DEVICE_KINDS, Ident
from services.identity.stitcher import Stitcher
from services.ingest.domain import row_to_event
from touchpoint.events.v1 import event_pb2
from touchpoint.identity.v1 import identity_service_pb2 as pb
from touchpoint.identity.v1 import identity_service_pb2_grpc as pb_grpc
from touchpoint.platform.errors import ServiceError, Violation, invalid_argument, not_found

MAX_BATCH = 1000
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_SPACE_CHARS = 200
MAX_TEXT_CHARS = 1000
# Pooled connections the API keeps between ResolveProfile calls (see _KeptConnections).
KEPT_CONNECTIONS = 2

T = TypeVar("T")

_ACTIONS = {
    "merged": pb.MERGE_ACTION_MERGED,
    "refused": pb.MERGE_ACTION_REFUSED,
    "split": pb.MERGE_ACTION_SPLIT,
}


def _ts(value: datetime | None) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    if value is not None:
        t.FromDatetime(value)
    return t


def _ident_pb(x: Ident) -> event_pb2.Identifier:
    return event_pb2.Identifier(kind=x[0], value=x[1])


def entry_pb(r: asyncpg.Record) -> pb.MergeLogEntry:
    e = pb.MergeLogEntry(
        id=r["id"],
        action=_ACTIONS[r["action"]],
        reason=r["reason"],
        limit_kind=r["limit_kind"],
        profile=f"profiles/{r['profile_id']}",
        other_profiles=[f"profiles/{p}" for p in r["other_profile_ids"]],
        identifiers=[_ident_pb(domain.decode_ident(t)) for t in r["identifiers"]],
        note=r["note"],
    )
    if r["source_id"]:
        e.event.source_id = r["source_id"]
        e.event.message_id = r["message_id"]
    if r["event_time"] is not None:
        e.event_time.FromDatetime(r["event_time"])
    e.record_time.FromDatetime(r["record_time"])
    if r["superseded_time"] is not None:
        e.superseded_time.FromDatetime(r["superseded_time"])
    return e


class _KeptConnections:
    """A few of the pool's connections, kept by the API between ResolveProfile calls.

    Taking a connection from the asyncpg pool and giving it back costs ~70 µs of CPU per call (a
    task per release, a timer, a proxy object): as much as the lookup's own round trip, and a
    tenth of the API's CPU per resolve (bench/identity). A call takes a kept connection when one
    is free, keeps one more (up to `size`) when none is, and otherwise goes through the pool as
    before. A connection whose call failed or was cancelled goes back to the pool, which resets
    or replaces it; the answers, errors included, are those of the pool path."""

    def __init__(self, pool: asyncpg.Pool, size: int) -> None:
        self.pool = pool
        self.size = size
        self.free: list[Any] = []
        self.kept = 0
        self.closed = False

    async def run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """work(connection or pool)."""
        conn = None
        while conn is None and self.free:
            conn = self.free.pop()
            if not _open(conn):  # closed meanwhile: the pool has it back and replaces it
                await self._give_back(conn)
                conn = None
        if conn is None:
            if self.kept >= self.size or self.closed:
                return await work(self.pool)
            self.kept += 1
            try:
                conn = await self.pool.acquire()
            except BaseException:
                self.kept -= 1
                raise
        try:
            result = await work(conn)
        except BaseException:
            await self._give_back(conn)
            raise
        if self.closed:
            await self._give_back(conn)
        else:
            self.free.append(conn)
        return result

    async def _give_back(self, conn: Any) -> None:
        self.kept -= 1
        await self.pool.release(conn)  # nothing to do if it closed (asyncpg released it then)

    async def close(self) -> None:
        """Gives every kept connection back (calls still running give theirs back when done)."""
        self.closed = True
        while self.free:
            await self._give_back(self.free.pop())


def _open(conn: Any) -> bool:
    """Whether a kept connection can still run a query: asyncpg hands a pooled connection that
    closed (a restart, pg_terminate_backend) back to its pool, after which its proxy refuses
    every call."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


class _Check:
    """Collects field violations; raises them all at once."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.bad: list[Violation] = []

    def add(self, field: str, reason: str, description: str) -> None:
        self.bad.append(Violation(field, reason, description))

    def space(self, value: str, field: str = "space_id") -> str:
        if not value:
            self.add(field, "REQUIRED", f"{field} is required")
        elif len(value) > MAX_SPACE_CHARS:
            self.add(field, "TOO_LONG", f"{field} is longer than {MAX_SPACE_CHARS} characters")
        return value

    def identifier(self, ident: event_pb2.Identifier, field: str) -> Ident:
        kind = ident.kind
        if not kind:
            self.add(f"{field}.kind", "REQUIRED", "the identifier's kind is required")
        elif not domain.KIND_RE.match(kind):
            self.add(
                f"{field}.kind", "INVALID_KIND", "a kind is 1-64 lower-case letters, digits, '_', '.' or '-'"
            )
        if not ident.value.strip():
            self.add(f"{field}.value", "REQUIRED", "the identifier's value is required")
            return kind, ""
        value = domain.normalise(kind, ident.value, self.region)
        if value is None:
            what = {"email": "an email address", "phone": "a valid phone number"}.get(
                kind, "a usable identifier"
            )
            self.add(f"{field}.value", "INVALID_VALUE", f"the value is not {what}")
            return kind, ""
        return kind, value

    def name(self, value: str, field: str = "name") -> str:
        prefix, _, pid = value.partition("/")
        if not value:
            self.add(field, "REQUIRED", f"{field} is required")
        elif prefix != "profiles" or not domain.PROFILE_ID_RE.match(pid):
            self.add(field, "INVALID_NAME", f"{field} must be profiles/{{profile}}, got {value[:120]!r}")
        return pid

    def page_size(self, value: int) -> int:
        if value < 0:
            self.add("page_size", "NEGATIVE", "page_size must not be negative")
        return DEFAULT_PAGE if value <= 0 else min(value, MAX_PAGE)

    def token(self, value: str, name: str, n: int) -> list[Any] | None:
        if not value:
            return None
        parts = domain.decode_token(value, n + 1)
        if parts is None or parts[0] != name:
            self.add("page_token", "INVALID_TOKEN", "page_token is not a token of this request")
            return None
        return parts[1:]

    def text(self, value: str, field: str) -> str:
        if len(value) > MAX_TEXT_CHARS:
            self.add(field, "TOO_LONG", f"{field} is longer than {MAX_TEXT_CHARS} characters")
        return value

    def done(self) -> None:
        if self.bad:
            raise invalid_argument("INVALID_REQUEST", "the request is invalid", self.bad)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


class IdentityServicer(pb_grpc.IdentityServiceServicer):
    def __init__(self, pool: asyncpg.Pool, stitcher: Stitcher, *, default_region: str) -> None:
        self.pool = pool
        self.kept = _KeptConnections(pool, KEPT_CONNECTIONS)
        self.stitcher = stitcher
        self.region = default_region
        self.rules = stitcher.base_rules

    async def close(self) -> None:
        """Gives the connections kept for ResolveProfile back to the pool (after the server has
        stopped taking calls)."""
        await self.kept.close()

    def _check(self) -> _Check:
        return _Check(self.region)

    async def _space_of(self, pid: str) -> str:
        space = await store.profile_space(self.pool, pid)
        if space is None:
            if await store.tombstone(self.pool, pid) is not None:
                raise not_found("PROFILE_DELETED", f"profiles/{pid} was deleted", profile=f"profiles/{pid}")
            raise not_found("PROFILE_NOT_FOUND", f"profiles/{pid} does not exist", profile=f"profiles/{pid}")
        return space

    async def ResolveProfile(
        self, request: pb.ResolveProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveProfileResponse:
        check = self._check()
        space = check.space(request.space_id)
        if not request.HasField("identifier"):
            check.add("identifier", "REQUIRED", "identifier is required")
            check.done()
        ident = check.identifier(request.identifier, "identifier")
        check.done()
        found = await self.kept.run(lambda conn: store.resolve(conn, space, [ident]))
        if ident not in found:
            raise not_found("IDENTIFIER_NOT_FOUND", "no profile holds this identifier", kind=ident[0])
        return pb.ResolveProfileResponse(profile=f"profiles/{found[ident]}", identifier=_ident_pb(ident))

    async def BatchResolveProfiles(
        self, request: pb.BatchResolveProfilesRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchResolveProfilesResponse:
        check = self._check()
        space = check.space(request.space_id)
        if len(request.identifiers) > MAX_BATCH:
            check.add(
                "identifiers", "TOO_MANY", f"at most {MAX_BATCH} identifiers, got {len(request.identifiers)}"
            )
            check.done()
        if not request.identifiers:
            check.add("identifiers", "REQUIRED", "at least one identifier is required")
        idents = [check.identifier(x, f"identifiers[{i}]") for i, x in enumerate(request.identifiers)]
        check.done()
        found = await store.resolve(self.pool, space, sorted(set(idents)))
        # Filled in place: building each result as a message of its own and the response from
        # their list copied every one of them (a third of the call's CPU for 1,000).
        response = pb.BatchResolveProfilesResponse()
        add = response.results.add
        for kind, value in idents:
            pid = found.get((kind, value))
            identifier = add(profile="" if pid is None else f"profiles/{pid}").identifier
            identifier.kind = kind
            identifier.value = value
        return response

    async def GetProfile(
        self, request: pb.GetProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetProfileResponse:
        check = self._check()
        pid = check.name(request.name)
        check.done()
        space = await self._space_of(pid)
        rows = await store.profile_identifiers(self.pool, pid)
        if not rows:
            raise not_found("PROFILE_NOT_FOUND", f"profiles/{pid} does not exist", profile=f"profiles/{pid}")
        rows.sort(key=lambda r: self.rules.order((r["kind"], r["value"])))
        profile = pb.Profile(name=f"profiles/{pid}", space_id=space)
        for r in rows:
            profile.identifiers.add(
                identifier=_ident_pb((r["kind"], r["value"])),
                first_seen_time=_ts(r["first_time"]),
                last_seen_time=_ts(r["last_time"]),
            )
        devices = sorted(
            (r for r in rows if r["kind"] in DEVICE_KINDS), key=lambda r: r["last_time"], reverse=True
        )
        for r in devices:
            attrs = r["attrs"] or {}
            profile.devices.add(
                identifier=_ident_pb((r["kind"], r["value"])),
                type=attrs.get("type", ""),
                manufacturer=attrs.get("manufacturer", ""),
                model=attrs.get("model", ""),
                os_name=attrs.get("os_name", ""),
                os_version=attrs.get("os_version", ""),
                user_agent=attrs.get("user_agent", ""),
                last_seen_time=_ts(r["last_time"]),
            )
        for t in await store.profile_traits(self.pool, pid):
            profile.traits.add(
                key=t["key"],
                value_json=orjson.dumps(t["value_json"]),
                update_time=_ts(t["time"]),
                event=event_pb2.EventRef(source_id=t["source_id"], message_id=t["message_id"]),
                identifier=_ident_pb((t["kind"], t["value"])),
            )
        profile.first_seen_time.FromDatetime(min(r["first_time"] for r in rows))
        profile.last_seen_time.FromDatetime(max(r["last_time"] for r in rows))
        return pb.GetProfileResponse(profile=profile)

    async def ListProfileEvents(
        self, request: pb.ListProfileEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListProfileEventsResponse:
        check = self._check()
        pid = check.name(request.name)
        size = check.page_size(request.page_size)
        start = request.start_time.ToDatetime(UTC) if request.HasField("start_time") else None
        end = request.end_time.ToDatetime(UTC) if request.HasField("end_time") else None
        if start is not None and end is not None and end < start:
            check.add("end_time", "BEFORE_START", "end_time is before start_time")
        token = check.token(request.page_token, request.name, 3)
        after = None
        if token is not None:
            try:
                after = (_time(token[0]), str(token[1]), str(token[2]))
            except (TypeError, ValueError):
                check.add("page_token", "INVALID_TOKEN", "page_token is not a token of this request")
        check.done()
        await self._space_of(pid)
        refs = await store.profile_event_refs(self.pool, pid, start, end, after, size + 1)
        page, more = refs[:size], len(refs) > size
        bodies = await store.event_bodies(self.pool, [(r["source_id"], r["message_id"]) for r in page])
        resp = pb.ListProfileEventsResponse()
        for r in page:
            body = bodies.get((r["source_id"], r["message_id"]))
            if body is not None:  # deleted from the log since
                resp.events.append(row_to_event(body))
        if more:
            last = page[-1]
            resp.next_page_token = domain.encode_token(
                request.name, last["time"].isoformat(), last["message_id"], last["source_id"]
            )
        return resp

    async def ListProfileMerges(
        self, request: pb.ListProfileMergesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListProfileMergesResponse:
        check = self._check()
        pid = check.name(request.name)
        size = check.page_size(request.page_size)
        token = check.token(request.page_token, request.name, 2)
        after = None
        if token is not None:
            try:
                after = (_time(token[0]), int(token[1]))
            except (TypeError, ValueError):
                check.add("page_token", "INVALID_TOKEN", "page_token is not a token of this request")
        check.done()
        space = await self._space_of(pid)
        # Every profile merged into this one was named after one of its identifiers.
        names = {pid} | {
            domain.profile_id(space, (r["kind"], r["value"]))
            for r in await store.profile_identifiers(self.pool, pid)
        }
        rows = await store.merges(
            self.pool, space, sorted(names), after, size + 1, request.include_superseded
        )
        page, more = rows[:size], len(rows) > size
        resp = pb.ListProfileMergesResponse(entries=[entry_pb(r) for r in page])
        if more:
            last = page[-1]
            resp.next_page_token = domain.encode_token(
                request.name, last["sort_time"].isoformat(), last["id"]
            )
        return resp

    async def SplitProfile(
        self, request: pb.SplitProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.SplitProfileResponse:
        check = self._check()
        pid = check.name(request.name)
        has_ident, has_link = request.HasField("identifier"), request.HasField("link")
        ident = link = None
        if has_ident == has_link:
            check.add("identifier", "ONE_OF", "give exactly one of identifier and link")
        elif has_ident:
            ident = check.identifier(request.identifier, "identifier")
        else:
            if not request.link.source_id:
                check.add("link.source_id", "REQUIRED", "link.source_id is required")
            if not request.link.message_id:
                check.add("link.message_id", "REQUIRED", "link.message_id is required")
            link = (request.link.source_id, request.link.message_id)
        check.text(request.reason, "reason")
        check.text(request.request_id, "request_id")
        check.done()
        profiles, entry = await self.stitcher.split(
            pid, ident=ident, link=link, note=request.reason, request_id=request.request_id
        )
        return pb.SplitProfileResponse(profiles=[f"profiles/{p}" for p in profiles], entry=entry_pb(entry))

    async def DeleteProfile(
        self, request: pb.DeleteProfileRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteProfileResponse:
        check = self._check()
        pid = check.name(request.name)
        check.text(request.reason, "reason")
        check.text(request.request_id, "request_id")
        check.done()
        try:
            tomb, deleted = await self.stitcher.delete_profile(pid, request.reason)
        except grpc.aio.AioRpcError as exc:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "INGEST_UNAVAILABLE",
                "the ingest service did not confirm the suppression or deletion; retry the call",
                metadata={"ingest_code": exc.code().name},
            ) from exc
        resp = pb.DeleteProfileResponse(
            events_deleted=deleted, identifiers_deleted=tomb["identifiers_deleted"]
        )
        resp.delete_time.FromDatetime(tomb["deleted_time"])
        return resp
