"""Consuming the event log: a durable position per consumer that never skips and never
double-applies an event.

The log is the view ``ingest.event_log`` that the ingest service publishes. Each row carries the
id of the transaction that wrote it (``xid``, a ``xid8``) and a sequence number (``seq``).
Sequence numbers are handed out at insert time but transactions commit in another order, so a
reader remembering "the last seq I saw" would skip a row whose transaction committed after a
higher seq was read. Instead:

* the log is read in ``(xid, seq)`` order, and
* only rows with ``xid < pg_snapshot_xmin(pg_current_snapshot())`` are read: every transaction
  below that horizon has finished (committed or rolled back), so no row can ever appear behind a
  position ``(xid, seq)`` that a consumer has passed.

A consumer's position lives in its own service's schema (``<schema>.log_positions``) and is
updated in the same transaction as the consumer's effects, so after a crash the effects and the
position roll back together: each event applies exactly once. The position row is locked
(``FOR UPDATE``) for the batch, so two replicas of one consumer never apply the same batch.

The price: an open write transaction anywhere in the cluster holds the horizon back, so the
log's readers lag by the age of the oldest open transaction. Keep write transactions short
(ingest's are milliseconds); ``lag()`` reports the lag in events and seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge

from touchpoint.platform.settings import env_float, env_int

log = logging.getLogger(__name__)

LAG_EVENTS = Gauge(
    "touchpoint_eventlog_consumer_lag_events",
    "Events of the log a consumer has not applied yet (capped at 100k).",
    ["consumer"],
    multiprocess_mode="max",
)
LAG_SECONDS = Gauge(
    "touchpoint_eventlog_consumer_lag_seconds",
    "Age of the oldest event a consumer has not applied yet.",
    ["consumer"],
    multiprocess_mode="max",
)
OWNED = Gauge(
    "touchpoint_eventlog_consumer_partitions_owned",
    "Partitions of the log this replica of a consumer holds a lease on.",
    ["consumer"],
    multiprocess_mode="livesum",
)
APPLIED = Counter("touchpoint_eventlog_consumer_applied_total", "Events applied, by consumer.", ["consumer"])

NOTIFY_CHANNEL = "touchpoint_event_log"

EVENT_TYPES = ("", "identify", "track", "page", "screen", "group", "alias")

# Every column of the log, in LogEvent's order (after xid and seq, which every read selects).
ALL_COLUMNS = """space_id, source_id, message_id, type, user_id, anonymous_id, previous_id, group_id,
    event, name, timestamp, received_at, properties, traits, context, campaign, click_ids"""


def read_batch_sql(columns: str = ALL_COLUMNS, log: str = "ingest.event_log") -> str:
    """The next batch after a position, below the horizon.

    Qualified names matter: the output column "xid" is a bigint alias, and ordering by it would
    sort the whole remaining log on every batch instead of reading the (xid, seq) index in order.
    """
    select = "e.xid::text::bigint as xid, e.seq" + (f", {columns}" if columns.strip() else "")
    return f"""select {select} from {log} e
    where (e.xid, e.seq) > ($1::text::xid8, $2)
      and e.xid < pg_snapshot_xmin(pg_current_snapshot())
    order by e.xid, e.seq
    limit $3"""


READ_BATCH = read_batch_sql()


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One event of the log, as consumers see it. JSON objects are already parsed."""

    xid: int
    seq: int
    space_id: str
    source_id: str
    message_id: str
    type: str
    user_id: str | None
    anonymous_id: str | None
    previous_id: str | None
    group_id: str | None
    event: str | None
    name: str | None
    timestamp: datetime
    received_at: datetime
    properties: dict[str, Any]
    traits: dict[str, Any]
    context: dict[str, Any]
    campaign: dict[str, Any]
    click_ids: list[dict[str, str]]

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> LogEvent:
        return cls(
            r["xid"],
            r["seq"],
            r["space_id"],
            r["source_id"],
            r["message_id"],
            r["type"],
            r["user_id"],
            r["anonymous_id"],
            r["previous_id"],
            r["group_id"],
            r["event"],
            r["name"],
            r["timestamp"],
            r["received_at"],
            r["properties"] or {},
            r["traits"] or {},
            r["context"] or {},
            r["campaign"] or {},
            r["click_ids"] or [],
        )


# apply(conn, events), or apply(conn, prepared) with `prepare`.
ApplyFn = Callable[[asyncpg.Connection, Any], Awaitable[None]]
# prepare(events, previous): the work of a batch that needs no transaction, done while the
# previous batch (`previous`: what prepare returned for it, None when there is none in flight)
# commits. What it returns is what apply(conn, ...) then gets.
PrepareFn = Callable[[list[Any], Any], Awaitable[Any]]

# The key that splits a log between replicas. On the event log it is the event's own device or
# user key, so one device's events stay in order within one partition.
DEFAULT_PARTITION_KEYS = {"ingest.event_log": "coalesce(e.anonymous_id, e.user_id, e.message_id)"}


def partition_sql(key: str, partitions: int) -> str:
    """The SQL expression giving a row's partition (0 … partitions-1) from its key."""
    return f"((hashtext({key}) & 2147483647) % {int(partitions)})"


def partitions_from_env(schema: str) -> int:
    """TOUCHPOINT_<SCHEMA>_LOG_PARTITIONS, else TOUCHPOINT_LOG_PARTITIONS, else 1."""
    specific = f"TOUCHPOINT_{schema.upper()}_LOG_PARTITIONS"
    if os.environ.get(specific):
        return env_int(specific, 1, minimum=1)
    return env_int("TOUCHPOINT_LOG_PARTITIONS", 1, minimum=1)


async def lock_positions(conn: asyncpg.Connection, schema: str, name: str) -> dict[int, tuple[int, int]]:
    """Locks every position row of a consumer (all its partitions, in a fixed order) until the
    transaction ends, so no batch of it is half-way; returns partition → (xid, seq)."""
    rows = await conn.fetch(
        f"""select consumer, xid, seq, partitions from {schema}.log_positions
            where split_part(consumer, '#', 1) = $1 order by consumer for update""",
        name,
    )
    base = next((r for r in rows if r["consumer"] == name), None)
    if base is None:
        raise RuntimeError(f"consumer {name} has no position row; call ensure() first")
    if base["partitions"] == 1:
        return {0: (base["xid"], base["seq"])}
    return {int(r["consumer"].rsplit("#", 1)[1]): (r["xid"], r["seq"]) for r in rows if r["consumer"] != name}


# Seconds after its commit that a pipelined batch is freed (see _step_pipelined).
FREE_AFTER = 0.05


class LogConsumer:
    """Applies the event log, in order, to one consumer's state.

    ``apply(conn, events)`` runs inside the transaction that also moves the position: it must do
    all its writes on ``conn``. If it raises, nothing of the batch is kept and the batch is retried.

    By default ``events`` are ``LogEvent`` objects with every column. A consumer that needs less
    passes ``columns`` (an SQL select list over the view, alias ``e``) and ``decode=None``: it then
    gets the asyncpg records themselves (``xid`` and ``seq`` always included), which saves the
    decoding of columns it never reads.

    ``log`` names another relation read the same way: any view a service publishes with an
    ``xid xid8`` column of the writing transaction, a ``seq`` bigint and a ``received_at``
    timestamptz (for example ``export.offline_conversions``).

    **Replicas.** With ``partitions`` > 1 the log is split by a hash of ``partition_key`` (on the
    event log: the anonymousId, else the userId), each partition with its own position row
    ``<name>#<k>``. Replicas of the consumer register in ``<schema>.log_members`` and lease
    partitions in ``<schema>.log_leases``: each live replica takes its fair share (the first
    ``partitions % replicas`` of them by member id one more), renews its leases every
    ``lease_ttl / 3`` seconds (``TOUCHPOINT_LOG_LEASE_SECONDS``, default 10), gives surplus ones back when a replica joins, and takes the
    partitions of a replica whose leases expired. The lease only spreads the work; exactly-once
    comes from the position row, locked (``FOR UPDATE``) for each batch and moved in the batch's
    transaction, so even two replicas that both believe they own a partition for a moment apply
    each of its events once. A consumer started with one partition can later be split (every
    partition continues from the single position); other changes of the count are refused.
    Partitions are applied concurrently by different replicas, so ``apply`` must be safe to run
    concurrently with itself on other partitions (row locks, ``on conflict``, or an advisory
    lock around the part that is not).

    **Pipelining.** With ``prepare``, a batch is read and ``prepare(events, previous)`` runs
    *outside* any transaction while the previous batch of the same partition commits (up to
    ``pipeline`` batches per step); ``apply(conn, prepared)`` then runs in the batch's
    transaction, which first checks that the position is still the one the batch was read from
    (else another replica moved it: the prepared batch is dropped, nothing is applied). A chain
    of full batches goes on for up to ``chain_seconds`` (renewing the leases on its way) or
    ``pipeline`` batches: each break costs one commit and one prepare that do not overlap.
    Within a chain the batch after the next is read while the next is prepared, and a committed
    batch is freed a little after the next commit starts (freeing many objects holds the event
    loop), so one commit follows another with no gap. The batch after a chain's last is read and
    prepared during that last commit too, and the partition's next step starts by committing it
    (when the position has not moved meanwhile; else it is dropped).
    Between chains run() rebalances and exports the lag (counting it costs the database a few
    microseconds per event behind, so a chain does not). A
    consumer whose work is mostly CPU overlaps it with the database's work on the previous
    batch this way; ``prepare`` must yield to the event loop now and then so that the commit in
    flight keeps moving, and must not write. If a commit fails, the batch prepared after it is
    dropped and the error raised.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        schema: str,
        name: str,
        apply: ApplyFn,
        batch_size: int = 1000,
        idle_wait: float = 0.25,
        lag_interval: float = 5.0,
        columns: str = ALL_COLUMNS,
        decode: Callable[[asyncpg.Record], Any] | None = LogEvent.from_record,
        log: str = "ingest.event_log",
        partitions: int | None = None,
        partition_key: str | None = None,
        lease_ttl: float | None = None,
        member: str | None = None,
        prepare: PrepareFn | None = None,
        pipeline: int = 1000,
        chain_seconds: float | None = None,
    ) -> None:
        if "#" in name:
            raise ValueError("a consumer name may not contain '#'")
        self.pool = pool
        self.schema = schema
        self.name = name
        self.apply = apply
        self.prepare = prepare
        self.pipeline = max(1, pipeline)
        self.chain_seconds = chain_seconds
        self.batch_size = batch_size
        self.idle_wait = idle_wait
        self.lag_interval = lag_interval
        if decode is LogEvent.from_record and columns != ALL_COLUMNS:
            raise ValueError("LogEvent needs every column: pass decode=None with a narrower select list")
        self.decode = decode
        self.log = log
        self.partitions = partitions if partitions is not None else partitions_from_env(schema)
        if self.partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.partition_key = partition_key or DEFAULT_PARTITION_KEYS.get(log, "e.seq::text")
        self.lease_ttl = (
            lease_ttl if lease_ttl is not None else env_float("TOUCHPOINT_LOG_LEASE_SECONDS", 10.0)
        )
        if self.chain_seconds is None:
            # Rebalancing (a replica that joins gets its share) waits for the chain to end.
            self.chain_seconds = 3 * self.lease_ttl
        self.member = member or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        read = read_batch_sql(columns, log)
        if self.partitions > 1:
            read = read.replace(
                "order by e.xid, e.seq",
                f"and {partition_sql(self.partition_key, self.partitions)} = $4\n    order by e.xid, e.seq",
            )
        self._read_sql = read
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        # Partition -> (position, rows, prepared): the batch a chain prepared after its last
        # commit, for the next step of that partition.
        self._carried: dict[int, tuple[tuple[Any, int], list[asyncpg.Record], Any]] = {}
        self.applied_total = 0
        # The partitions this replica holds a lease on (all of them until run() rebalances).
        self.owned: list[int] = list(range(self.partitions))
        # Set while run() waits with nothing to apply (for operators' status and for tests).
        self.idle = asyncio.Event()

    def position_row(self, partition: int) -> str:
        return self.name if self.partitions == 1 else f"{self.name}#{partition}"

    async def ensure(self) -> None:
        """Creates the positions, leases and members tables and this consumer's rows (at the
        start of the log), or splits a one-partition consumer into ``partitions``."""
        s = self.schema
        async with self.pool.acquire() as conn, conn.transaction():
            # Replicas starting together: one at a time (DDL "if not exists" races otherwise).
            await conn.execute("select pg_advisory_xact_lock(hashtext($1))", f"{s}.log_positions")
            await conn.execute(
                f"""create table if not exists {s}.log_positions (
                    consumer text primary key,
                    xid bigint not null default 0,
                    seq bigint not null default 0,
                    updated_at timestamptz not null default now())"""
            )
            await conn.execute(
                f"alter table {s}.log_positions add column if not exists partitions int not null default 1"
            )
            await conn.execute(
                f"""create table if not exists {s}.log_leases (
                    consumer text not null,
                    partition int not null,
                    owner text,
                    expires_at timestamptz not null default '-infinity',
                    primary key (consumer, partition))"""
            )
            await conn.execute(
                f"""create table if not exists {s}.log_members (
                    consumer text not null,
                    member text not null,
                    seen_at timestamptz not null default now(),
                    primary key (consumer, member))"""
            )
            await conn.execute(
                f"""insert into {s}.log_positions (consumer, partitions) values ($1, $2)
                    on conflict do nothing""",
                self.name,
                self.partitions,
            )
            base = await conn.fetchrow(
                f"select xid, seq, partitions from {s}.log_positions where consumer = $1 for update",
                self.name,
            )
            assert base is not None
            if base["partitions"] != self.partitions:
                if base["partitions"] != 1:
                    raise RuntimeError(
                        f"consumer {s}.{self.name} runs with {base['partitions']} partitions; it cannot "
                        f"be changed to {self.partitions} (only a one-partition consumer can be split)"
                    )
                await conn.execute(
                    f"update {s}.log_positions set partitions = $2, updated_at = now() where consumer = $1",
                    self.name,
                    self.partitions,
                )
            if self.partitions > 1:
                # Every partition starts where the consumer stood (the start of the log when new).
                await conn.execute(
                    f"""insert into {s}.log_positions (consumer, xid, seq, partitions)
                        select $1 || '#' || k, $2, $3, $4 from generate_series(0, $4 - 1) k
                        on conflict do nothing""",
                    self.name,
                    base["xid"],
                    base["seq"],
                    self.partitions,
                )
            await conn.execute(
                f"""insert into {s}.log_leases (consumer, partition)
                    select $1, k from generate_series(0, $2 - 1) k on conflict do nothing""",
                self.name,
                self.partitions,
            )

    async def position(self, partition: int | None = None) -> tuple[int, int]:
        """The position of one partition, or of the consumer: the partition furthest behind."""
        names = [self.position_row(k) for k in (range(self.partitions) if partition is None else [partition])]
        rows = await self.pool.fetch(
            f"select xid, seq from {self.schema}.log_positions where consumer = any($1::text[])", names
        )
        assert len(rows) == len(names), "call ensure() first"
        return min((r["xid"], r["seq"]) for r in rows)

    async def step(self, partitions: Iterable[int] | None = None) -> int:
        """Applies at most one batch of each partition (all of them unless given); returns how
        many events it applied."""
        total = 0
        for k in range(self.partitions) if partitions is None else partitions:
            total += await self._step(k)
        return total

    async def _read(self, conn: Any, partition: int, pos: tuple[Any, int]) -> list[asyncpg.Record]:
        args: tuple[Any, ...] = (str(pos[0]), pos[1], self.batch_size)
        if self.partitions > 1:
            args += (partition,)
        return list(await conn.fetch(self._read_sql, *args))

    async def _step(self, partition: int) -> int:
        if self.prepare is not None:
            return await self._step_pipelined(partition)
        row_name = self.position_row(partition)
        async with self.pool.acquire() as conn, conn.transaction():
            pos = await conn.fetchrow(
                f"select xid, seq from {self.schema}.log_positions where consumer = $1 for update",
                row_name,
            )
            if pos is None:
                raise RuntimeError(f"consumer {row_name} has no position row; call ensure() first")
            args: tuple[Any, ...] = (str(pos["xid"]), pos["seq"], self.batch_size)
            if self.partitions > 1:
                args += (partition,)
            rows = await conn.fetch(self._read_sql, *args)
            if not rows:
                return 0
            decode = self.decode
            events = rows if decode is None else [decode(r) for r in rows]
            await self.apply(conn, events)
            last = rows[-1]
            await conn.execute(
                f"update {self.schema}.log_positions set xid = $2, seq = $3, updated_at = now() "
                "where consumer = $1",
                row_name,
                last["xid"],
                last["seq"],
            )
        self.applied_total += len(events)
        APPLIED.labels(self.name).inc(len(events))
        return len(events)

    async def _step_pipelined(self, partition: int) -> int:
        assert self.prepare is not None
        row_name = self.position_row(partition)
        pos_row = await self.pool.fetchrow(
            f"select xid, seq from {self.schema}.log_positions where consumer = $1", row_name
        )
        if pos_row is None:
            raise RuntimeError(f"consumer {row_name} has no position row; call ensure() first")
        pos = (pos_row["xid"], pos_row["seq"])
        decode = self.decode
        carried = self._carried.pop(partition, None)
        if carried is not None and carried[0] == pos:
            # Prepared while the last commit of this partition's previous chain ran.
            _, rows, prepared = carried
        else:
            rows = await self._read(self.pool, partition, pos)
            if not rows:
                return 0
            prepared = await self.prepare(rows if decode is None else [decode(r) for r in rows], None)
        total = 0
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + self.lease_ttl / 3
        end_at = loop.time() + (self.chain_seconds or 0.0)
        # The read of the batch after the next, sent before the next is prepared: the database
        # reads it while this process prepares (its rows arrive at prepare's yields), so the
        # next step starts preparing as soon as its commit starts.
        ahead: asyncio.Future[list[asyncpg.Record]] | None = None
        try:
            for i in range(self.pipeline):
                if loop.time() >= renew_at:
                    # run() renews between steps; a long chain of batches renews on its way.
                    await self._renew()
                    renew_at = loop.time() + self.lease_ttl / 3
                commit = asyncio.create_task(self._commit(row_name, pos, rows, prepared))
                nxt: tuple[tuple[Any, int], list[asyncpg.Record], Any] | None = None
                # When the chain ends after this batch (its time or its batches are up), the
                # next batch is still read and prepared while this one commits, and carried to
                # the next step, which starts with its commit if nothing moved the position.
                last = not self._go_on(i, rows, end_at)
                try:
                    if not last or self._go_on(0, rows, math.inf):
                        npos = (rows[-1]["xid"], rows[-1]["seq"])
                        read, ahead = (
                            ahead or asyncio.ensure_future(self._read(self.pool, partition, npos)),
                            None,
                        )
                        nrows = await read
                        if nrows:
                            if self._go_on(i + 1, nrows, end_at):
                                after = (nrows[-1]["xid"], nrows[-1]["seq"])
                                ahead = asyncio.ensure_future(self._read(self.pool, partition, after))
                            events = nrows if decode is None else [decode(r) for r in nrows]
                            nxt = (npos, nrows, await self.prepare(events, prepared))
                except BaseException:
                    # The commit in flight ends (committed or rolled back) before the error goes up.
                    with contextlib.suppress(Exception):
                        if await commit:
                            self.applied_total += len(rows)
                            APPLIED.labels(self.name).inc(len(rows))
                    raise
                done = await commit
                if not done:
                    return total  # another replica moved the position: drop what was prepared
                total += len(rows)
                self.applied_total += len(rows)
                APPLIED.labels(self.name).inc(len(rows))
                if nxt is None:
                    break
                if last:
                    self._carried[partition] = nxt
                    break
                # The committed batch is freed a little later, while the next one commits:
                # freeing many objects holds the event loop a while (~0.1 s for 20,000 identity
                # events), which would otherwise delay the next commit's start, the database
                # idle meanwhile.
                loop.call_later(FREE_AFTER, [rows, prepared].clear)
                pos, rows, prepared = nxt
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
        return total

    def _go_on(self, i: int, rows: list[asyncpg.Record], end_at: float) -> bool:
        """Whether the chain goes on after its batch i (these rows): a full batch, within the
        chain's batches and time, and the consumer not stopping."""
        return (
            i + 1 < self.pipeline
            and asyncio.get_running_loop().time() < end_at
            and len(rows) == self.batch_size
            and not self._stopping.is_set()
        )

    async def _renew(self) -> None:
        """Extends this replica's leases and its membership (no partition changes hands)."""
        ttl = timedelta(seconds=self.lease_ttl)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"""update {self.schema}.log_members set seen_at = now()
                    where consumer = $1 and member = $2""",
                self.name,
                self.member,
            )
            await conn.execute(
                f"""update {self.schema}.log_leases set expires_at = now() + $3::interval
                    where consumer = $1 and owner = $2""",
                self.name,
                self.member,
                ttl,
            )

    async def _commit(
        self, row_name: str, pos: tuple[Any, int], rows: list[asyncpg.Record], prepared: Any
    ) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            now = await conn.fetchrow(
                f"select xid, seq from {self.schema}.log_positions where consumer = $1 for update",
                row_name,
            )
            if now is None or (now["xid"], now["seq"]) != pos:
                return False
            await self.apply(conn, prepared)
            last = rows[-1]
            await conn.execute(
                f"update {self.schema}.log_positions set xid = $2, seq = $3, updated_at = now() "
                "where consumer = $1",
                row_name,
                last["xid"],
                last["seq"],
            )
        return True

    async def catch_up(self) -> int:
        """Applies batches until nothing is left below the horizon; returns how many applied."""
        total = 0
        while n := await self.step():
            total += n
        return total

    async def lag(self, cap: int = 100_000) -> tuple[int, float]:
        """(events not yet applied in any partition, capped; seconds since the oldest of them was
        received)."""
        rows = await self.pool.fetch(
            f"select consumer, xid, seq from {self.schema}.log_positions where consumer = any($1::text[])",
            [self.position_row(k) for k in range(self.partitions)],
        )
        by_name = {r["consumer"]: (r["xid"], r["seq"]) for r in rows}
        where = ""
        if self.partitions > 1:
            where = f"and {partition_sql(self.partition_key, self.partitions)} = $4"
        events, seconds = 0, 0.0
        for k in range(self.partitions):
            xid, seq = by_name[self.position_row(k)]
            args: tuple[Any, ...] = (str(xid), seq, cap)
            if self.partitions > 1:
                args += (k,)
            row = await self.pool.fetchrow(
                f"""select count(*) as n, extract(epoch from now() - min(received_at))::float8 as age
                   from (select e.received_at from {self.log} e
                         where (e.xid, e.seq) > ($1::text::xid8, $2) {where} limit $3) t""",
                *args,
            )
            assert row is not None
            events += int(row["n"])
            seconds = max(seconds, float(row["age"] or 0.0))
        events = min(events, cap)
        LAG_EVENTS.labels(self.name).set(events)
        LAG_SECONDS.labels(self.name).set(seconds)
        return events, seconds

    async def rebalance(self) -> list[int]:
        """Registers this replica, renews its leases and takes or gives back partitions so that
        every live replica holds its fair share; returns the partitions it now owns."""
        s, ttl = self.schema, timedelta(seconds=self.lease_ttl)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"""insert into {s}.log_members (consumer, member) values ($1, $2)
                    on conflict (consumer, member) do update set seen_at = now()""",
                self.name,
                self.member,
            )
            await conn.execute(
                f"delete from {s}.log_members where consumer = $1 and seen_at < now() - $2::interval * 10",
                self.name,
                ttl,
            )
            live = [
                r["member"]
                for r in await conn.fetch(
                    f"""select member from {s}.log_members
                        where consumer = $1 and seen_at > now() - $2::interval order by member""",
                    self.name,
                    ttl,
                )
            ]
            rank = live.index(self.member) if self.member in live else 0
            n = max(len(live), 1)
            fair = self.partitions // n + (1 if rank < self.partitions % n else 0)
            mine = sorted(
                r["partition"]
                for r in await conn.fetch(
                    f"""update {s}.log_leases set expires_at = now() + $3::interval
                        where consumer = $1 and owner = $2 returning partition""",
                    self.name,
                    self.member,
                    ttl,
                )
            )
            if len(mine) > fair:
                surplus, mine = mine[fair:], mine[:fair]
                await conn.execute(
                    f"""update {s}.log_leases set owner = null, expires_at = '-infinity'
                        where consumer = $1 and owner = $2 and partition = any($3::int[])""",
                    self.name,
                    self.member,
                    surplus,
                )
            elif len(mine) < fair:
                taken = await conn.fetch(
                    f"""update {s}.log_leases l set owner = $2, expires_at = now() + $3::interval
                        from (select partition from {s}.log_leases
                              where consumer = $1 and (owner is null or expires_at < now())
                              order by partition limit $4 for update skip locked) f
                        where l.consumer = $1 and l.partition = f.partition
                        returning l.partition""",
                    self.name,
                    self.member,
                    ttl,
                    fair - len(mine),
                )
                mine = sorted(mine + [r["partition"] for r in taken])
        self.owned = mine
        OWNED.labels(self.name).set(len(mine))
        return mine

    async def leave(self) -> None:
        """Gives this replica's leases back and deregisters it, so others take over at once."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"""update {self.schema}.log_leases set owner = null, expires_at = '-infinity'
                    where consumer = $1 and owner = $2""",
                self.name,
                self.member,
            )
            await conn.execute(
                f"delete from {self.schema}.log_members where consumer = $1 and member = $2",
                self.name,
                self.member,
            )
        self.owned = []

    async def run(self) -> None:
        """Applies the log until stop(); wakes on NOTIFY from ingest, else polls. Holds leases
        on its share of the partitions while it runs."""
        listener: asyncpg.Connection | None = None

        def on_notify(*_: Any) -> None:
            self._wake.set()

        next_lag = 0.0
        next_rebalance = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                if loop.time() >= next_rebalance:
                    await self.rebalance()
                    next_rebalance = loop.time() + self.lease_ttl / 3
                if loop.time() >= next_lag:
                    next_lag = loop.time() + self.lag_interval
                    await self.lag()  # exported as metrics
                if listener is None or listener.is_closed():
                    listener = await self.pool.acquire()
                    await listener.add_listener(NOTIFY_CHANNEL, on_notify)
                self._wake.clear()
                applied = await self.step(self.owned)
                if applied == 0:
                    self.idle.set()
                    wait = min(self.idle_wait, max(next_rebalance - loop.time(), 0.0))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    self.idle.clear()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consumer step failed; retrying", extra={"consumer": self.name})
                if listener is not None:
                    with contextlib.suppress(Exception):
                        await self.pool.release(listener)
                    listener = None
                await asyncio.sleep(1.0)
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.remove_listener(NOTIFY_CHANNEL, on_notify)
                await self.pool.release(listener)
        with contextlib.suppress(Exception):
            await self.leave()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
