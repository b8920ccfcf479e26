"""Several replicas of a consumer against one Postgres: no event applied twice, and the same
results as one replica."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import grpc
import orjson
import pytest

from services.identity.app import IdentitySettings, start_identity
from services.ingest import store
from services.ingest.app import IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.events.v1 import event_pb2 as ev
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from touchpoint.platform.db import create_pool
from touchpoint.platform.eventlog import LogConsumer, LogEvent
from touchpoint.platform.testing import create_database, eventually


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


def _track(src: str, message_id: str, user: str) -> tuple[object, ...]:
    now = datetime.now(UTC)
    return ("default", src, message_id, "track", user, None, None, None, "E", None, now, None, None, now,
            None, None, None, None, None, None)  # fmt: skip


async def test_partitioned_replicas_split_the_log_and_take_over(pool: asyncpg.Pool) -> None:
    """Four partitions, two replicas: each leases two and applies only its own; each event is
    applied once; when one replica leaves, the other takes every partition over."""
    app = await start_ingest(pool, IngestSettings.for_tests())
    await app.stop()
    await pool.execute("create schema if not exists replica_test")
    await pool.execute(
        """create table if not exists replica_test.split_applied (
               consumer text, message_id text, replica text not null, primary key (consumer, message_id))"""
    )
    name = "split_" + secrets.token_hex(3)
    src = "src_" + secrets.token_hex(3)

    def apply_as(replica: str):
        async def apply(conn: asyncpg.Connection, events: list[asyncpg.Record]) -> None:
            await asyncio.sleep(0.002)  # a little work per batch, so the replicas overlap in time
            await conn.executemany(
                "insert into replica_test.split_applied values ($1, $2, $3)",
                [(name, e["message_id"], replica) for e in events if e["source_id"] == src],
            )

        return apply

    def replica(member: str) -> LogConsumer:
        return LogConsumer(
            pool, schema="replica_test", name=name, apply=apply_as(member), batch_size=40, idle_wait=0.05,
            columns="source_id, message_id", decode=None, partitions=4, lease_ttl=0.9, member=member,
        )  # fmt: skip

    a, b = replica("replica-a"), replica("replica-b")
    await a.ensure()
    await b.ensure()
    tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    try:
        await eventually(lambda: len(a.owned) == 2 and len(b.owned) == 2, timeout=10)
        assert sorted(a.owned + b.owned) == [0, 1, 2, 3]
        async with pool.acquire() as conn:
            for chunk in range(10):
                await store.write_rows(conn, [_track(src, f"s{chunk}-{i}", f"user{i}") for i in range(100)])

        async def applied() -> int:
            return await pool.fetchval(
                "select count(*) from replica_test.split_applied where consumer = $1", name
            )

        await eventually(lambda: _eq(applied(), 1000), timeout=30)
        by_replica = dict(
            await pool.fetch(
                """select replica, count(*) from replica_test.split_applied where consumer = $1
                   group by replica""",
                name,
            )
        )
        # Both worked, on disjoint partitions (200 users hash into all four).
        assert by_replica.get("replica-a", 0) > 0 and by_replica.get("replica-b", 0) > 0, by_replica

        b.stop()
        await tasks[1]
        await eventually(lambda: a.owned == [0, 1, 2, 3], timeout=10, message="a never took b's partitions")
        async with pool.acquire() as conn:
            await store.write_rows(conn, [_track(src, f"late-{i}", f"user{i}") for i in range(300)])
        await eventually(lambda: _eq(applied(), 1300), timeout=30)
        late = await pool.fetchval(
            """select count(*) from replica_test.split_applied
               where consumer = $1 and message_id like 'late-%' and replica = 'replica-a'""",
            name,
        )
        assert late == 300
        assert (await a.lag())[0] == 0
    finally:
        a.stop()
        b.stop()
        await asyncio.gather(*tasks)


async def _eq(value: object, expected: object) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_partition_count_can_grow_from_one_but_not_change_after(pool: asyncpg.Pool) -> None:
    app = await start_ingest(pool, IngestSettings.for_tests())
    await app.stop()
    await pool.execute("create schema if not exists replica_test")
    name = "grow_" + secrets.token_hex(3)
    src = "src_" + secrets.token_hex(3)
    seen: list[str] = []

    async def apply(conn: asyncpg.Connection, events: list[LogEvent]) -> None:
        seen.extend(e.message_id for e in events if e.source_id == src)

    async with pool.acquire() as conn:
        await store.write_rows(conn, [_track(src, f"g{i}", f"user{i}") for i in range(50)])
    one = LogConsumer(pool, schema="replica_test", name=name, apply=apply, partitions=1)
    await one.ensure()
    await one.catch_up()
    assert len(seen) == 50
    async with pool.acquire() as conn:
        await store.write_rows(conn, [_track(src, f"h{i}", f"user{i}") for i in range(50)])
    three = LogConsumer(pool, schema="replica_test", name=name, apply=apply, partitions=3)
    await three.ensure()  # splits: every partition continues from the single position
    await three.catch_up()
    assert sorted(seen) == sorted([f"g{i}" for i in range(50)] + [f"h{i}" for i in range(50)])
    with pytest.raises(RuntimeError, match="cannot be changed"):
        await LogConsumer(pool, schema="replica_test", name=name, apply=apply, partitions=2).ensure()


# What each consumer leaves behind, in forms that do not depend on the order in which the
# replicas happened to apply the log: identity's partition of identifiers into profiles and their
# traits, attribution's touches and conversions, export's clicks.
REPLICA_EFFECTS = {
    "identity profiles": """select (select array_agg(i2.kind || ':' || i2.value order by i2.kind, i2.value)
            from identity.identifiers i2 where i2.profile_id = i.profile_id) as members
        from identity.identifiers i group by profile_id order by members""",
    "identity traits": """select space_id, kind, value, key, value_json::text, "time", message_id
        from identity.traits order by space_id, kind, value, key""",
    "attribution touches": """select * from attribution.touches
        order by space_id, generation, source_id, message_id""",
    "attribution conversions": """select * from attribution.conversions
        order by space_id, generation, conversion_id""",
    "export clicks": """select space_id, holder_kind, holder, kind, value, first_seen, campaign::text
        from export.clicks order by space_id, holder_kind, holder, kind, value""",
}


def _with_clicks(events: list[ev.Event]) -> list[ev.Event]:
    """The fault tests' journeys plus ad clicks (gclid, fbclid) landing on some devices."""
    out = list(events)
    t0 = datetime(2026, 3, 2, tzinfo=UTC)
    for u in range(0, 150, 3):
        e = ev.Event(type=ev.EVENT_TYPE_PAGE, anonymous_id=f"anon-{u}-laptop", message_id=f"{u}-click")
        kind = "gclid" if u % 2 else "fbclid"
        e.context_json = orjson.dumps(
            {"page": {"url": f"https://shop.example/?{kind}=c{u}&utm_source=ads&utm_campaign=spring"}}
        )
        e.original_timestamp.FromDatetime(t0 + timedelta(minutes=u))
        out.append(e)
    return out


@pytest.mark.timeout(110)
async def test_two_replicas_of_every_consumer_end_like_one(
    pg_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same log into two databases: one replica of identity, attribution and export on the
    first; two replicas of each, splitting the log into four partitions, on the second."""
    from services.attribution.app import AttributionSettings, start_attribution
    from services.export.app import ExportSettings, start_export
    from tests.test_faults import journeys, write_log

    events = _with_clicks(journeys(users=150))
    key = "wk_rep_" + secrets.token_hex(6)
    one_url = await create_database(pg_server_url, "tp_replicas_one")
    two_url = await create_database(pg_server_url, "tp_replicas_two")
    one_pool = await create_pool(one_url, max_size=8)
    two_pool = await create_pool(two_url, max_size=12)
    try:

        async def run_stack(
            pool: asyncpg.Pool,
            replicas: int,
            before_log: Callable[[list[LogConsumer]], Awaitable[None]] | None = None,
        ) -> dict[str, list[tuple[Any, ...]]]:
            ingest = await start_ingest(pool, IngestSettings.for_tests())
            apps: list[Any] = []
            consumers: list[LogConsumer] = []  # the event log's consumers of every replica
            for _ in range(replicas):
                identity = await start_identity(pool, IdentitySettings.for_tests(ingest.address))
                attribution = await start_attribution(pool, AttributionSettings.for_tests())
                export = await start_export(pool, ExportSettings.for_tests(deliver=False))
                apps += [identity, attribution, export]
                assert export.clicks is not None
                consumers += [identity.stitcher.consumer, attribution.consumer, export.clicks]
            try:
                if before_log is not None:
                    await before_log(consumers)
                await ingest.stop()
                await write_log(pool, key, events)
                for c in consumers:
                    await eventually(partial(_zero_lag, c), timeout=60, message=f"{c.name} never caught up")
                if replicas > 1:
                    by_name: dict[str, list[int]] = {}
                    for c in consumers:
                        by_name.setdefault(c.name, []).append(c.applied_total)
                    for name, totals in by_name.items():
                        # Each replica applied part of the log, and together each event once.
                        assert all(t > 0 for t in totals), (name, totals)
                return {k: [tuple(r) for r in await pool.fetch(sql)] for k, sql in REPLICA_EFFECTS.items()}
            finally:
                for a in apps:
                    await a.stop()
                await ingest.stop()

        async def split_evenly(consumers: list[LogConsumer]) -> None:
            await eventually(
                lambda: all(len(c.owned) == 2 for c in consumers), timeout=30, message="leases never split"
            )

        monkeypatch.setenv("TOUCHPOINT_LOG_PARTITIONS", "1")
        one = await run_stack(one_pool, 1)
        monkeypatch.setenv("TOUCHPOINT_LOG_PARTITIONS", "4")
        monkeypatch.setenv("TOUCHPOINT_LOG_LEASE_SECONDS", "1.5")
        two = await run_stack(two_pool, 2, split_evenly)
    finally:
        await one_pool.close()
        await two_pool.close()
    for name in REPLICA_EFFECTS:
        assert one[name], f"{name}: nothing to compare"
        assert two[name] == one[name], f"{name} differ between two replicas and one"


async def _zero_lag(consumer: LogConsumer) -> bool:
    return (await consumer.lag())[0] == 0


@pytest.mark.timeout(110)
async def test_recompute_with_a_partitioned_live_consumer_misses_and_repeats_nothing(
    pg_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two attribution replicas over three partitions: each partition stands at its own position
    when a recomputation starts, and events keep arriving while it replays. The new generation
    must hold every touch and conversion exactly once."""
    from services.attribution.app import AttributionSettings, start_attribution
    from tests.test_attribution_service import D0, H, page, query, track, utm, write
    from touchpoint.attribution.v1 import attribution_service_pb2 as apb
    from touchpoint.attribution.v1 import attribution_service_pb2_grpc as apb_grpc

    monkeypatch.setenv("TOUCHPOINT_LOG_PARTITIONS", "3")
    monkeypatch.setenv("TOUCHPOINT_LOG_LEASE_SECONDS", "1.5")
    url = await create_database(pg_server_url, "tp_replicas_recompute")
    pool = await create_pool(url, max_size=12)
    ingest = await start_ingest(pool, IngestSettings.for_tests())
    replicas = [await start_attribution(pool, AttributionSettings.for_tests()) for _ in range(2)]
    space, key = "rp", "wk_rp_" + secrets.token_hex(4)
    await create_source(pool, write_key=key, name="rp", space_id=space)

    def visitor(i: int) -> list[ev.Event]:
        medium = ("news", "email", "paid-social")[i % 3]
        return [
            page(D0 + i * H / 10, utm(f"src{i % 3}", medium), anonymous_id=f"v{i}"),
            track(D0 + i * H / 10 + H, "Order Completed", {"order_id": f"o{i}", "revenue": 10}, anonymous_id=f"v{i}"),
        ]  # fmt: skip

    async def generation_rows(table: str) -> int:
        return await pool.fetchval(
            f"""select count(*) from attribution.{table} t join attribution.spaces s
                on s.space_id = t.space_id and s.active_generation = t.generation where t.space_id = $1""",
            space,
        )

    try:
        await eventually(
            lambda: all(len(r.consumer.owned) in (1, 2) for r in replicas), timeout=20, message="no split"
        )
        async with (
            grpc.aio.insecure_channel(ingest.address) as ich,
            grpc.aio.insecure_channel(replicas[0].address) as ach,
        ):
            istub = pb_grpc.IngestServiceStub(ich)
            stub = apb_grpc.AttributionServiceStub(ach)
            for i in range(0, 60, 10):
                await write(istub, key, [e for v in range(i, i + 10) for e in visitor(v)])
            await eventually(lambda: _total(stub, space, 60), timeout=30)
            positions = await pool.fetch(
                "select xid, seq from attribution.log_positions where consumer like 'live#%'"
            )
            assert len({(p["xid"], p["seq"]) for p in positions}) == 3  # each partition elsewhere

            job = await stub.RecomputeAttribution(apb.RecomputeAttributionRequest(space_id=space))
            # More visitors while the job replays: the live consumers write them to both generations.
            for i in range(60, 90, 10):
                await write(istub, key, [e for v in range(i, i + 10) for e in visitor(v)])

            async def done() -> apb.RecomputeJob | None:
                j = await stub.GetRecomputeJob(apb.GetRecomputeJobRequest(name=job.name))
                assert j.state != apb.JOB_STATE_FAILED, j.error
                return j if j.state == apb.JOB_STATE_SUCCEEDED else None

            finished = await eventually(done, timeout=30)
            assert finished.processed_events == finished.total_events >= 120
            await eventually(lambda: _total(stub, space, 90), timeout=30)
            report = await stub.GetCampaignReport(
                apb.GetCampaignReportRequest(
                    query=query(space, group_by=[apb.DIMENSION_MEDIUM]), model=apb.MODEL_LAST_TOUCH
                )
            )
            assert {r.dimensions.medium: r.conversions for r in report.rows} == {
                "news": 30.0,
                "email": 30.0,
                "paid-social": 30.0,
            }
            assert await generation_rows("touches") == 90
            assert await generation_rows("conversions") == 90
            assert (
                await pool.fetchval(
                    "select count(*) from attribution.log_positions where consumer like 'recompute_%'"
                )
                == 0
            )  # the replay's positions are gone with the job
    finally:
        for r in replicas:
            await r.stop()
        await ingest.stop()
        await pool.close()


async def _total(stub: Any, space: str, conversions: int) -> bool:
    from tests.test_attribution_service import query
    from touchpoint.attribution.v1 import attribution_service_pb2 as apb

    r = await stub.GetCampaignReport(
        apb.GetCampaignReportRequest(query=query(space), model=apb.MODEL_LAST_TOUCH)
    )
    return bool(r.totals.conversions == conversions)
