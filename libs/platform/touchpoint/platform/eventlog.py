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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge

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


ApplyFn = Callable[[asyncpg.Connection, list[Any]], Awaitable[None]]


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
    ) -> None:
        self.pool = pool
        self.schema = schema
        self.name = name
        self.apply = apply
        self.batch_size = batch_size
        self.idle_wait = idle_wait
        self.lag_interval = lag_interval
        if decode is LogEvent.from_record and columns != ALL_COLUMNS:
            raise ValueError("LogEvent needs every column: pass decode=None with a narrower select list")
        self.decode = decode
        self.log = log
        self._read_sql = read_batch_sql(columns, log)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.applied_total = 0
        # Set while run() waits with nothing to apply (for operators' status and for tests).
        self.idle = asyncio.Event()

    async def ensure(self) -> None:
        """Creates the positions table and this consumer's row (at the start of the log)."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                f"""create table if not exists {self.schema}.log_positions (
                    consumer text primary key,
                    xid bigint not null default 0,
                    seq bigint not null default 0,
                    updated_at timestamptz not null default now())"""
            )
            await conn.execute(
                f"insert into {self.schema}.log_positions (consumer) values ($1) on conflict do nothing",
                self.name,
            )

    async def position(self) -> tuple[int, int]:
        row = await self.pool.fetchrow(
            f"select xid, seq from {self.schema}.log_positions where consumer = $1", self.name
        )
        assert row is not None, "call ensure() first"
        return row["xid"], row["seq"]

    async def step(self) -> int:
        """Applies at most one batch; returns how many events it applied."""
        async with self.pool.acquire() as conn, conn.transaction():
            pos = await conn.fetchrow(
                f"select xid, seq from {self.schema}.log_positions where consumer = $1 for update",
                self.name,
            )
            if pos is None:
                raise RuntimeError(f"consumer {self.name} has no position row; call ensure() first")
            rows = await conn.fetch(self._read_sql, str(pos["xid"]), pos["seq"], self.batch_size)
            if not rows:
                return 0
            decode = self.decode
            events = rows if decode is None else [decode(r) for r in rows]
            await self.apply(conn, events)
            last = rows[-1]
            await conn.execute(
                f"update {self.schema}.log_positions set xid = $2, seq = $3, updated_at = now() "
                "where consumer = $1",
                self.name,
                last["xid"],
                last["seq"],
            )
        self.applied_total += len(events)
        APPLIED.labels(self.name).inc(len(events))
        return len(events)

    async def catch_up(self) -> int:
        """Applies batches until nothing is left below the horizon; returns how many applied."""
        total = 0
        while n := await self.step():
            total += n
        return total

    async def lag(self, cap: int = 100_000) -> tuple[int, float]:
        """(events not yet applied, capped; seconds since the oldest of them was received)."""
        xid, seq = await self.position()
        row = await self.pool.fetchrow(
            f"""select count(*) as n, extract(epoch from now() - min(received_at))::float8 as age
               from (select received_at from {self.log}
                     where (xid, seq) > ($1::text::xid8, $2) limit $3) t""",
            str(xid),
            seq,
            cap,
        )
        assert row is not None
        events, seconds = int(row["n"]), float(row["age"] or 0.0)
        LAG_EVENTS.labels(self.name).set(events)
        LAG_SECONDS.labels(self.name).set(seconds)
        return events, seconds

    async def run(self) -> None:
        """Applies the log until stop(); wakes on NOTIFY from ingest, else polls."""
        listener: asyncpg.Connection | None = None

        def on_notify(*_: Any) -> None:
            self._wake.set()

        next_lag = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                if loop.time() >= next_lag:
                    next_lag = loop.time() + self.lag_interval
                    await self.lag()  # exported as metrics
                if listener is None or listener.is_closed():
                    listener = await self.pool.acquire()
                    await listener.add_listener(NOTIFY_CHANNEL, on_notify)
                self._wake.clear()
                applied = await self.step()
                if applied == 0:
                    self.idle.set()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.idle_wait)
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

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
