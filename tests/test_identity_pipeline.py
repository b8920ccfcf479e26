"""The identity consumer's pipeline on a real Postgres: each batch is prepared (identifiers,
graph slice, fast path, settled, its writes planned) while the previous one commits, over an
overlay of that batch's graph; a batch whose graph changed meanwhile is prepared again under the
graph lock."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from prometheus_client import REGISTRY

from services.identity import stitcher as stitcher_module
from services.identity.app import IdentitySettings, start_identity
from services.ingest.app import IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.events.v1 import event_pb2 as ev
from touchpoint.identity.v1 import identity_service_pb2 as pb
from touchpoint.identity.v1 import identity_service_pb2_grpc as pb_grpc
from touchpoint.ingest.v1 import ingest_service_pb2 as ingest_pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc

T0 = datetime(2026, 5, 4, 8, 0, tzinfo=UTC)


def _people(n: int, late_every: int = 7) -> list[ev.Event]:
    """n people as the bench makes them: two anonymous visits, a login with an email, two more
    browsers; people overlap in time, and every `late_every`-th event is 10 minutes early."""
    out = []
    for p in range(n):
        for k in range(5):
            user = f"u{p}" if k >= 2 else ""
            anon = f"a{p}-{k if k < 2 else (0 if k == 2 else k - 2)}"
            e = ev.Event(
                type=ev.EVENT_TYPE_IDENTIFY if k == 2 else ev.EVENT_TYPE_TRACK,
                message_id=f"m{p}-{k}",
                user_id=user,
                anonymous_id=anon,
                event="" if k == 2 else "Viewed",
                traits_json=b'{"email": "p%d@pipe.example"}' % p if k == 2 else b"",
            )
            late = timedelta(minutes=10) if (p * 5 + k) % late_every == 0 else timedelta(0)
            nominal = T0 + timedelta(minutes=p * 0.5 + k)
            e.timestamp.FromDatetime(nominal - late)
            out.append((nominal, e))
    out.sort(key=lambda t: t[0])  # the log's order: late events land after later ones
    return [e for _, e in out]


def _expected(n: int) -> set[frozenset[tuple[str, str]]]:
    return {
        frozenset(
            {("user_id", f"u{p}"), ("email", f"p{p}@pipe.example")}
            | {("anonymous_id", f"a{p}-{k}") for k in range(3)}
        )
        for p in range(n)
    }


async def _profiles(pool: asyncpg.Pool, space: str) -> set[frozenset[tuple[str, str]]]:
    rows = await pool.fetch(
        "select kind, value, profile_id from identity.profile_identifiers where space_id = $1", space
    )
    by: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        by.setdefault(r["profile_id"], set()).add((r["kind"], r["value"]))
    return {frozenset(v) for v in by.values()}


def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_small_batches_pipelined_over_the_overlay_give_one_profile_per_person(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The consumer analyzes the graph's tables as it grows them (every 50 identifiers here).
    monkeypatch.setattr(stitcher_module, "_ANALYZE_ROWS", 50)
    analyzed = _counter("touchpoint_identity_tables_analyzed_total")
    ingest = await start_ingest(pool, IngestSettings.for_tests())
    space = "pipe_" + secrets.token_hex(3)
    key = "wk_" + secrets.token_hex(6)
    await create_source(pool, write_key=key, name="p", space_id=space)
    # Written before the consumer starts, so it finds full batches to pipeline.
    events = _people(60)
    async with grpc.aio.insecure_channel(ingest.address) as ch:
        resp = await ingest_grpc.IngestServiceStub(ch).WriteEvents(
            ingest_pb.WriteEventsRequest(write_key=key, events=events)
        )
    assert resp.accepted == 300
    again = _counter("touchpoint_identity_batches_reprepared_total")
    recomputed = _counter("touchpoint_identity_recomputed_components_total")
    identity = await start_identity(pool, IdentitySettings.for_tests(ingest.address, batch_size=7))
    try:
        await identity.wait_caught_up(60)
        assert await _profiles(pool, space) == _expected(60)
        # Every batch was served by the overlay of the one before it (a single writer).
        assert _counter("touchpoint_identity_batches_reprepared_total") == again
        # Late events made components recompute (settled over the previous batch's graph).
        assert _counter("touchpoint_identity_recomputed_components_total") > recomputed
        # 300 new identifiers: analyzed after the first 50, and again once as many more came
        # (reltuples: the count the last analyze saw; -1 when never analyzed).
        assert _counter("touchpoint_identity_tables_analyzed_total") >= analyzed + 2
        assert (
            await pool.fetchval("select reltuples from pg_class where oid = 'identity.identifiers'::regclass")
            >= 100
        )
    finally:
        await identity.stop()
        await ingest.stop()


async def test_a_split_between_prepare_and_commit_makes_the_batch_prepare_again(pool: asyncpg.Pool) -> None:
    ingest = await start_ingest(pool, IngestSettings.for_tests())
    space = "pipe_" + secrets.token_hex(3)
    key = "wk_" + secrets.token_hex(6)
    await create_source(pool, write_key=key, name="p", space_id=space)
    identity = await start_identity(
        pool, IdentitySettings.for_tests(ingest.address, consume=False, batch_size=1000)
    )
    stitcher = identity.stitcher
    consumer = stitcher.consumer
    try:
        await consumer.catch_up()  # whatever other tests left in the log
        people = _people(4, late_every=1000)
        async with grpc.aio.insecure_channel(ingest.address) as ch:
            ingest_stub = ingest_grpc.IngestServiceStub(ch)
            await ingest_stub.WriteEvents(ingest_pb.WriteEventsRequest(write_key=key, events=people[:10]))
            await consumer.catch_up()
            await ingest_stub.WriteEvents(ingest_pb.WriteEventsRequest(write_key=key, events=people[10:]))
        # Prepare the second half by hand, as the pipeline would...
        pos = await consumer.position()
        rows = await consumer._read(pool, 0, pos)
        assert len(rows) == 10
        batch = await stitcher.prepare(rows, None)
        assert batch.spaces[space].graph is not None
        # ...then a split lands before its commit: the graph's version moved.
        async with grpc.aio.insecure_channel(identity.address) as ch:
            stub = pb_grpc.IdentityServiceStub(ch)
            first = await stub.ResolveProfile(
                pb.ResolveProfileRequest(space_id=space, identifier=ev.Identifier(kind="user_id", value="u0"))
            )
            await stub.SplitProfile(
                pb.SplitProfileRequest(
                    name=first.profile, identifier=ev.Identifier(kind="anonymous_id", value="a0-0")
                )
            )
        again = _counter("touchpoint_identity_batches_reprepared_total")
        assert await consumer._commit(consumer.position_row(0), pos, rows, batch)
        assert _counter("touchpoint_identity_batches_reprepared_total") == again + 1
        got = await _profiles(pool, space)
        want = _expected(4)
        # a0-0 was detached before u0's later events: it stays a profile of its own.
        p0 = next(s for s in want if ("user_id", "u0") in s)
        want = (want - {p0}) | {p0 - {("anonymous_id", "a0-0")}, frozenset({("anonymous_id", "a0-0")})}
        assert got == want
        assert await consumer.position() == (rows[-1]["xid"], rows[-1]["seq"])
    finally:
        await identity.stop()
        await ingest.stop()


def _track(mid: str, minute: int, user: str, anon: str) -> ev.Event:
    e = ev.Event(type=ev.EVENT_TYPE_TRACK, message_id=mid, user_id=user, anonymous_id=anon, event="Viewed")
    e.timestamp.FromDatetime(T0 + timedelta(minutes=minute))
    return e


async def test_a_batch_prepared_over_a_batch_dropped_at_its_commit_is_prepared_again(
    pool: asyncpg.Pool,
) -> None:
    """Batch A is prepared whole (settled, its writes planned), then batch B over A's graph,
    expecting the graph version A's write makes. A DeleteProfile lands before A commits: A is
    prepared again, all its events carry a deleted identifier, and it writes nothing. B must not
    then find the version it expected and write over a graph that was never written."""
    ingest = await start_ingest(pool, IngestSettings.for_tests())
    space = "pipe_" + secrets.token_hex(3)
    key = "wk_" + secrets.token_hex(6)
    await create_source(pool, write_key=key, name="p", space_id=space)
    identity = await start_identity(
        pool, IdentitySettings.for_tests(ingest.address, consume=False, batch_size=1000)
    )
    stitcher = identity.stitcher
    consumer = stitcher.consumer
    row = consumer.position_row(0)
    try:
        await consumer.catch_up()  # whatever other tests left in the log
        async with grpc.aio.insecure_channel(ingest.address) as ch:
            ingest_stub = ingest_grpc.IngestServiceStub(ch)

            async def write(*events: ev.Event) -> None:
                await ingest_stub.WriteEvents(ingest_pb.WriteEventsRequest(write_key=key, events=events))

            await write(_track("x1", 0, "x-u", "x-a"))
            await consumer.catch_up()
            await write(_track("x2", 1, "x-u", "x-b"))
            pos_a = await consumer.position()
            rows_a = await consumer._read(pool, 0, pos_a)
            assert len(rows_a) == 1
            batch_a = await stitcher.prepare(rows_a, None)
            assert batch_a.spaces[space].plan is not None and batch_a.final.is_set()
            await write(_track("x3", 2, "x-u", "x-c"), _track("y1", 3, "y-u", "y-a"))
            pos_b = (rows_a[-1]["xid"], rows_a[-1]["seq"])
            rows_b = await consumer._read(pool, 0, pos_b)
            assert len(rows_b) == 2
            batch_b = await stitcher.prepare(rows_b, batch_a)
            assert batch_b.spaces[space].version == batch_a.spaces[space].version_after
        version = await pool.fetchval(
            "select version from identity.graph_versions where space_id = $1", space
        )
        async with grpc.aio.insecure_channel(identity.address) as ch:
            stub = pb_grpc.IdentityServiceStub(ch)
            x = await stub.ResolveProfile(
                pb.ResolveProfileRequest(
                    space_id=space, identifier=ev.Identifier(kind="user_id", value="x-u")
                )
            )
            await stub.DeleteProfile(pb.DeleteProfileRequest(name=x.profile, reason="test"))
        # The version B expects is the one the deletion made (so only the check below tells).
        assert (
            await pool.fetchval("select version from identity.graph_versions where space_id = $1", space)
            == version + 1
            == batch_b.spaces[space].version
        )
        again = _counter("touchpoint_identity_batches_reprepared_total")
        assert await consumer._commit(row, pos_a, rows_a, batch_a)
        assert await consumer._commit(row, pos_b, rows_b, batch_b)
        assert _counter("touchpoint_identity_batches_reprepared_total") == again + 2
        # Nothing of the deleted person came back (B's plan had x-c join x-u's profile).
        assert await _profiles(pool, space) == {frozenset({("user_id", "y-u"), ("anonymous_id", "y-a")})}
        assert (
            await pool.fetchval(
                "select count(*) from identity.event_refs where space_id = $1 and value like 'x-%'", space
            )
            == 0
        )
        assert await consumer.position() == (rows_b[-1]["xid"], rows_b[-1]["seq"])
    finally:
        await identity.stop()
        await ingest.stop()
