"""Several replicas of a consumer against one Postgres: no event applied twice, and the same
results as one replica."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from services.identity.app import IdentitySettings, start_identity
from services.ingest import store
from services.ingest.app import IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.events.v1 import event_pb2 as ev
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from touchpoint.platform.eventlog import LogConsumer, LogEvent
from touchpoint.platform.testing import eventually


async def test_two_consumer_replicas_apply_each_event_once(pool: asyncpg.Pool) -> None:
    app = await start_ingest(pool, IngestSettings.for_tests())
    await app.stop()
    await pool.execute("create schema if not exists replica_test")
    await pool.execute(
        "create table if not exists replica_test.applied (message_id text primary key, replica int not null)"
    )
    name = "replicas_" + secrets.token_hex(3)
    src = "src_" + secrets.token_hex(3)

    def apply_as(replica: int):
        async def apply(conn: asyncpg.Connection, events: list[LogEvent]) -> None:
            # A primary key: applying an event twice would fail the batch loudly.
            await conn.executemany(
                "insert into replica_test.applied values ($1, $2)",
                [(e.message_id, replica) for e in events if e.source_id == src],
            )

        return apply

    replicas = [
        LogConsumer(pool, schema="replica_test", name=name, apply=apply_as(i), batch_size=50, idle_wait=0.05)
        for i in range(2)
    ]
    for r in replicas:
        await r.ensure()
    tasks = [asyncio.create_task(r.run()) for r in replicas]
    try:
        now = datetime.now(UTC)
        for chunk in range(10):
            rows = [
                (
                    "default",
                    src,
                    f"m{chunk}-{i}",
                    "track",
                    "u",
                    None,
                    None,
                    None,
                    "E",
                    None,
                    now,
                    None,
                    None,
                    now,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                )
                for i in range(100)
            ]
            async with pool.acquire() as conn:
                await store.write_rows(conn, rows)

        async def all_applied() -> bool:
            return await pool.fetchval("select count(*) from replica_test.applied") == 1000

        await eventually(all_applied, timeout=30)
    finally:
        for r in replicas:
            r.stop()
        await asyncio.gather(*tasks)
    assert sum(r.applied_total for r in replicas) >= 1000
    assert await pool.fetchval("select count(distinct message_id) from replica_test.applied") == 1000


async def test_two_identity_replicas_give_the_same_profiles_as_one(pool: asyncpg.Pool) -> None:
    ingest = await start_ingest(pool, IngestSettings.for_tests())
    key = "wk_" + secrets.token_hex(6)
    space = "space_" + secrets.token_hex(3)
    await create_source(pool, write_key=key, name="r", space_id=space)
    a = await start_identity(pool, IdentitySettings.for_tests(ingest_addr=ingest.address))
    b = await start_identity(pool, IdentitySettings.for_tests(ingest_addr=ingest.address))
    try:
        t0 = datetime(2026, 11, 1, tzinfo=UTC)
        events = []
        # 40 people, each with two devices linked by a login, written in 8 concurrent batches.
        for person in range(40):
            for k, anon in enumerate((f"a{person}-laptop", f"a{person}-phone")):
                e = ev.Event(type=ev.EVENT_TYPE_IDENTIFY, anonymous_id=anon, user_id=f"user{person}",
                             message_id=f"i{person}-{k}")  # fmt: skip
                e.original_timestamp.FromDatetime(t0 + timedelta(minutes=person * 3 + k))
                events.append(e)
        async with grpc.aio.insecure_channel(ingest.address) as ch:
            stub = pb_grpc.IngestServiceStub(ch)
            answers = await asyncio.gather(
                *(
                    stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=events[i::8]))
                    for i in range(8)
                )
            )
        assert sum(r.accepted for r in answers) == 80
        await a.wait_caught_up(30)
        await b.wait_caught_up(30)
        rows = await pool.fetch(
            "select kind, value, profile_id from identity.profile_identifiers where space_id = $1", space
        )
    finally:
        await a.stop()
        await b.stop()
        await ingest.stop()
    profiles: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        profiles.setdefault(r["profile_id"], set()).add((r["kind"], r["value"]))
    expected = {
        frozenset(
            {("user_id", f"user{p}"), ("anonymous_id", f"a{p}-laptop"), ("anonymous_id", f"a{p}-phone")}
        )
        for p in range(40)
    }
    assert {frozenset(v) for v in profiles.values()} == expected
