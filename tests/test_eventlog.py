"""The event-log consumer: never skips a late commit, never applies an event twice."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from services.ingest import store
from services.ingest.app import IngestSettings, start_ingest
from touchpoint.platform.eventlog import LogConsumer, LogEvent
from touchpoint.platform.testing import eventually


@pytest.fixture(scope="module")
async def log_pool(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    app = await start_ingest(pool, IngestSettings.for_tests())  # applies ingest's migrations
    await pool.execute("create schema if not exists consumer_test")
    await pool.execute(
        "create table if not exists consumer_test.applied (consumer text, message_id text, unique (consumer, message_id))"
    )
    yield pool
    await app.stop()


def row(source_id: str, message_id: str) -> tuple[object, ...]:
    now = datetime.now(UTC)
    return ("default", source_id, message_id, "track", "u1", None, None, None, "E", None, now, None, None, now,
            None, None, None, None, None, None)  # fmt: skip


def recorder(name: str, seen: list[str], source_id: str | None = None):
    """Records the events (of one source, when given) a consumer applies; applying one twice
    fails the batch on the unique constraint."""

    async def apply(conn: asyncpg.Connection, events: list[LogEvent]) -> None:
        mine = [e for e in events if source_id is None or e.source_id == source_id]
        await conn.executemany(
            "insert into consumer_test.applied values ($1, $2)", [(name, e.message_id) for e in mine]
        )
        seen.extend(e.message_id for e in mine)

    return apply


async def mine(pool: asyncpg.Pool, name: str, source_id: str) -> list[str]:
    rows = await pool.fetch(
        "select a.message_id from consumer_test.applied a join ingest.events e on e.message_id = a.message_id "
        "where a.consumer = $1 and e.source_id = $2",
        name,
        source_id,
    )
    return sorted(r["message_id"] for r in rows)


@pytest.mark.parametrize("partitions", [1, 3])
async def test_late_commit_is_not_skipped(log_pool: asyncpg.Pool, partitions: int) -> None:
    src = "src_" + secrets.token_hex(4)
    name = "late_" + secrets.token_hex(4)
    seen: list[str] = []
    consumer = LogConsumer(
        log_pool, schema="consumer_test", name=name, apply=recorder(name, seen, src), partitions=partitions
    )
    await consumer.ensure()
    await consumer.catch_up()  # skip past whatever other tests wrote
    seen.clear()

    slow = await log_pool.acquire()
    fast = await log_pool.acquire()
    try:
        tx_slow = slow.transaction()
        await tx_slow.start()
        await store.write_rows(slow, [row(src, "slow-first")])  # gets the lower seq, commits late
        tx_fast = fast.transaction()
        await tx_fast.start()
        await store.write_rows(fast, [row(src, "fast-second")])
        await tx_fast.commit()
        seqs = {
            r["message_id"]: r["seq"]
            for r in await log_pool.fetch(
                "select message_id, seq from ingest.events where source_id = $1", src
            )
        }
        assert list(seqs) == ["fast-second"]  # only the committed one is visible

        # While the slow transaction is open, a consumer must not move past it.
        await consumer.catch_up()
        assert "fast-second" not in seen, "read past an open transaction: a late commit would be skipped"

        await tx_slow.commit()
    finally:
        await log_pool.release(slow)
        await log_pool.release(fast)
    await consumer.catch_up()
    assert seen == ["slow-first", "fast-second"]  # (xid, seq) order: the earlier transaction first
    assert await mine(log_pool, name, src) == ["fast-second", "slow-first"]


@pytest.mark.parametrize("partitions", [1, 3])
async def test_crash_mid_batch_applies_each_event_once(log_pool: asyncpg.Pool, partitions: int) -> None:
    src = "src_" + secrets.token_hex(4)
    name = "crash_" + secrets.token_hex(4)
    async with log_pool.acquire() as conn:
        await store.write_rows(conn, [row(src, f"c{i:03d}") for i in range(25)])
    seen: list[str] = []
    ok = recorder(name, seen, src)
    calls = 0

    async def crashing(conn: asyncpg.Connection, events: list[LogEvent]) -> None:
        nonlocal calls
        calls += 1
        await ok(conn, events)  # effects written ...
        if calls == 2:
            raise RuntimeError("process died before commit")  # ... and lost with the position

    consumer = LogConsumer(
        log_pool, schema="consumer_test", name=name, apply=crashing, batch_size=10, partitions=partitions
    )
    await consumer.ensure()
    with pytest.raises(RuntimeError):
        await consumer.catch_up()
    # A new consumer process with the same name resumes from the durable position.
    restarted = LogConsumer(
        log_pool, schema="consumer_test", name=name, apply=ok, batch_size=10, partitions=partitions
    )
    await restarted.catch_up()
    applied = [m for m in await mine(log_pool, name, src)]
    assert applied == [f"c{i:03d}" for i in range(25)]  # unique constraint: none applied twice


async def test_run_wakes_on_notify_and_reports_lag(log_pool: asyncpg.Pool) -> None:
    src = "src_" + secrets.token_hex(4)
    name = "run_" + secrets.token_hex(4)
    seen: list[str] = []
    consumer = LogConsumer(
        log_pool, schema="consumer_test", name=name, apply=recorder(name, seen, src), idle_wait=5.0
    )
    await consumer.ensure()
    await consumer.catch_up()
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(consumer.idle.wait(), 10)
        async with log_pool.acquire() as conn:
            await store.write_rows(conn, [row(src, "n1")])
        # idle_wait is 5 s: seeing the event well before it shows that NOTIFY woke the consumer.
        await eventually(lambda: "n1" in seen, timeout=2.5, message="NOTIFY did not wake the consumer")
        events, _ = await consumer.lag()
        assert events == 0
    finally:
        consumer.stop()
        await task
    async with log_pool.acquire() as conn:
        await store.write_rows(conn, [row(src, "n2")])
    lagging, age = await consumer.lag()
    assert lagging == 1 and age >= 0.0  # n2 arrived after the consumer stopped


async def test_reading_a_batch_is_an_ordered_index_read_not_a_sort(log_pool: asyncpg.Pool) -> None:
    """Catching up must cost the same per batch whatever the log's size (no sort of the rest)."""
    from touchpoint.platform.eventlog import READ_BATCH

    src = "src_" + secrets.token_hex(4)
    async with log_pool.acquire() as conn:
        await store.write_rows(conn, [row(src, f"plan{i}") for i in range(3000)])
    await log_pool.execute("analyze ingest.events")
    plan = "\n".join(r[0] for r in await log_pool.fetch("explain " + READ_BATCH, "0", 0, 1000))
    assert "Index Scan" in plan, plan
    assert "Sort  (" not in plan and "Sort Key" not in plan.split("Merge Append")[0], plan


async def test_pipelined_batches_apply_once_and_a_failed_commit_drops_the_next(
    log_pool: asyncpg.Pool,
) -> None:
    """With prepare=, the next batch is prepared while one commits; a commit that fails leaves
    its position, and the batch prepared after it is not applied."""
    src = "src_" + secrets.token_hex(4)
    name = "pipe_" + secrets.token_hex(4)
    seen: list[str] = []
    inner = recorder(name, seen, src)
    prepared: list[tuple[int, bool]] = []
    fail_on: set[str] = set()

    async def prepare(events: list[LogEvent], previous: object) -> list[LogEvent]:
        prepared.append((len(events), previous is not None))
        await asyncio.sleep(0)
        return events

    async def apply(conn: asyncpg.Connection, events: list[LogEvent]) -> None:
        await inner(conn, events)
        if fail_on.intersection(e.message_id for e in events):
            raise RuntimeError("this batch fails")

    consumer = LogConsumer(
        log_pool, schema="consumer_test", name=name, apply=apply, prepare=prepare, batch_size=10
    )
    await consumer.ensure()
    await consumer.catch_up()  # skip past whatever other tests wrote
    seen.clear()
    prepared.clear()
    async with log_pool.acquire() as conn:
        await store.write_rows(conn, [row(src, f"p{i:03d}") for i in range(45)])
    # The third batch (p020..p029) fails: the first two commit, the fourth (prepared while the
    # third committed) is dropped.
    fail_on.add("p025")
    before = await consumer.position()
    with pytest.raises(RuntimeError, match="this batch fails"):
        await consumer.step()
    assert await mine(log_pool, name, src) == [f"p{i:03d}" for i in range(20)]
    assert any(chained for _, chained in prepared)  # batches were prepared while one committed
    assert await consumer.position() > before
    # Once the failure is gone, everything else is applied exactly once.
    fail_on.clear()
    await consumer.catch_up()
    assert await mine(log_pool, name, src) == [f"p{i:03d}" for i in range(45)]


async def test_a_pipelined_chain_reads_the_batch_after_next_while_it_prepares(
    log_pool: asyncpg.Pool,
) -> None:
    """While batch k+1 is prepared (batch k committing), batch k+2 is already being read, so
    the step after starts preparing as soon as its commit starts; the batch after a chain's
    last is prepared during that commit and carried to the next step; every event is applied
    once."""
    src = "src_" + secrets.token_hex(4)
    name = "ahead_" + secrets.token_hex(4)
    seen: list[str] = []
    apply = recorder(name, seen, src)
    reads = 0
    reads_when_prepared: list[int] = []

    async def prepare(events: list[LogEvent], previous: object) -> list[LogEvent]:
        reads_when_prepared.append(reads)
        await asyncio.sleep(0)
        return events

    consumer = LogConsumer(
        log_pool, schema="consumer_test", name=name, apply=apply, prepare=prepare, batch_size=10, pipeline=4
    )
    await consumer.ensure()
    await consumer.catch_up()  # skip past whatever other tests wrote
    seen.clear()
    reads_when_prepared.clear()
    read = consumer._read

    def counting_read(conn: Any, partition: int, pos: tuple[Any, int]) -> Awaitable[list[asyncpg.Record]]:
        nonlocal reads
        reads += 1  # when the read is sent for, not when its task first runs
        return read(conn, partition, pos)

    consumer._read = counting_read  # type: ignore[method-assign,assignment]
    async with log_pool.acquire() as conn:
        await store.write_rows(conn, [row(src, f"a{i:03d}") for i in range(55)])
    assert await consumer.step() == 40  # one chain: four batches
    # Batch 1 (prepared first, alone) was read by then; batch 2 is prepared with batch 3's read
    # sent, and so on; the chain ends after batch 4, but batch 5 is still read and prepared
    # while batch 4 commits, and carried to the next step.
    assert reads_when_prepared == [1, 3, 4, 4, 5]
    assert reads == 5
    assert await mine(log_pool, name, src) == [f"a{i:03d}" for i in range(40)]
    # The next step starts by committing the carried batch (no read again), then the last.
    assert await consumer.step() == 15
    assert reads_when_prepared == [1, 3, 4, 4, 5, 6]
    assert reads == 6
    assert await mine(log_pool, name, src) == [f"a{i:03d}" for i in range(55)]


async def test_a_carried_batch_is_dropped_when_another_replica_moved_the_position(
    log_pool: asyncpg.Pool,
) -> None:
    src = "src_" + secrets.token_hex(4)
    name = "carry_" + secrets.token_hex(4)
    seen: list[str] = []
    apply = recorder(name, seen, src)

    async def prepare(events: list[LogEvent], previous: object) -> list[LogEvent]:
        await asyncio.sleep(0)
        return events

    def replica() -> LogConsumer:
        return LogConsumer(
            log_pool,
            schema="consumer_test",
            name=name,
            apply=apply,
            prepare=prepare,
            batch_size=10,
            pipeline=2,
        )

    a, b = replica(), replica()
    await a.ensure()
    await a.catch_up()  # skip past whatever other tests wrote
    async with log_pool.acquire() as conn:
        await store.write_rows(conn, [row(src, f"c{i:03d}") for i in range(35)])
    assert await a.step() == 20  # two batches; the third is prepared and carried
    assert await b.step() == 15  # the other replica applies the rest meanwhile
    assert await a.step() == 0  # the carried batch no longer follows the position: dropped
    assert await mine(log_pool, name, src) == [f"c{i:03d}" for i in range(35)]
