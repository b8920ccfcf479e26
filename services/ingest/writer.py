"""Group commit: rows of concurrent requests share one transaction.

Each request hands its rows to the writer and waits for the commit. While a flush is in
flight, new requests queue up; the next free flush slot takes everything queued (up to
`max_rows`) at once. No artificial delay is added: under light load a request is flushed alone
at once, under heavy load batches grow by themselves, which is what raises throughput (one
transaction, one COPY and one dedup insert for many requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
from prometheus_client import Counter, Gauge, Histogram

from services.ingest import store
from touchpoint.platform.errors import ServiceError, resource_exhausted

log = logging.getLogger(__name__)

FLUSH_ROWS = Histogram(
    "touchpoint_ingest_flush_rows",
    "Rows written per group commit.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
FLUSH_SECONDS = Histogram(
    "touchpoint_ingest_flush_duration_seconds",
    "Time of one group commit (dedup insert + COPY + commit).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EXPIRED = Counter(
    "touchpoint_ingest_expired_rows_total",
    "Rows dropped before writing because their call's deadline passed.",
)
QUEUED_ROWS = Gauge(
    "touchpoint_ingest_queued_rows", "Rows waiting for a group commit.", multiprocess_mode="livesum"
)

Key = tuple[str, str]

# Seconds a writer connection may stay unused before it is closed (see BatchWriter._connection):
# under load commits follow each other within milliseconds and keep it; an idle writer must not
# hold connections that other users of the pool wait for.
IDLE_SECONDS = 0.25


@dataclass(slots=True)
class _Pending:
    rows: list[tuple[Any, ...]]
    future: asyncio.Future[set[Key]]
    # Keys of rows that another request of the same group commit holds (answered duplicate).
    taken: set[Key] = field(default_factory=set)
    # Loop time after which the caller has given up (its gRPC deadline); None: no deadline.
    deadline: float | None = None


class BatchWriter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_rows: int = 2000,
        concurrency: int = 2,
        max_queued_rows: int = 50_000,
    ) -> None:
        self.pool = pool
        self.max_rows = max_rows
        self.max_queued_rows = max_queued_rows
        self._slots = asyncio.Semaphore(concurrency)
        self._queue: list[_Pending] = []
        self._queued_rows = 0
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._closing = False
        # Connections kept between group commits: (pool they came from, connection, loop time
        # of their last use); see _connection.
        self._idle: list[tuple[asyncpg.Pool, asyncpg.Connection, float]] = []
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingest-writer")

    async def stop(self) -> None:
        """Flushes what is queued, then stops."""
        self._closing = True
        self._work.set()
        if self._task is not None:
            await self._task
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        while self._idle:
            owner, conn, _ = self._idle.pop()
            await _discard(owner, conn)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of `self.pool` with the row codecs (store.use_row_codecs).

        It is kept for the next commit while commits keep coming: handing it back costs a
        round trip that resets the session, once per commit. After an error, at stop, or once
        unused for IDLE_SECONDS, it is closed and given back, so that the pool never hands a
        connection with these codecs to anyone else, and an idle writer holds none of the
        pool's connections."""
        pool = self.pool
        conn = None
        while self._idle:
            owner, idle, _ = self._idle.pop()
            if owner is pool and not idle.is_closed():
                conn = idle
                break
            await _discard(owner, idle)
        if conn is None:
            conn = await pool.acquire()
            try:
                await store.use_row_codecs(conn)
            except BaseException:
                await _discard(pool, conn)
                raise
        try:
            yield conn
        except BaseException:
            await _discard(pool, conn)
            raise
        if self._closing:
            await _discard(pool, conn)
            return
        self._idle.append((pool, conn, asyncio.get_running_loop().time()))
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap(), name="ingest-writer-reaper")

    async def _reap(self) -> None:
        """Closes the connections unused for IDLE_SECONDS; ends when none is left."""
        loop = asyncio.get_running_loop()
        try:
            while self._idle:
                await asyncio.sleep(IDLE_SECONDS)
                cutoff = loop.time() - IDLE_SECONDS
                stale = [entry for entry in self._idle if entry[2] <= cutoff]
                self._idle = [entry for entry in self._idle if entry[2] > cutoff]
                for owner, conn, _ in stale:
                    await _discard(owner, conn)
        finally:
            self._reaper = None

    async def write(self, rows: list[tuple[Any, ...]], timeout: float | None = None) -> set[Key]:
        """Stores rows (distinct keys); returns the keys of the rows not stored because their
        message was stored before (duplicates; usually none). Raises when shedding load or when
        the database fails (nothing of this call is then committed)."""
        if self._closing:
            raise resource_exhausted("SHUTTING_DOWN", "ingest is shutting down; retry", 1.0)
        if self._queued_rows + len(rows) > self.max_queued_rows:
            raise resource_exhausted(
                "OVERLOADED", f"ingest has {self._queued_rows} rows waiting to be written; retry later", 1.0
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[set[Key]] = loop.create_future()
        deadline = None if timeout is None else loop.time() + timeout
        self._queue.append(_Pending(rows, future, deadline=deadline))
        self._queued_rows += len(rows)
        QUEUED_ROWS.set(self._queued_rows)
        self._work.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self._queue:
                await self._slots.acquire()
                batch: list[_Pending] = []
                n = 0
                now = asyncio.get_running_loop().time()
                while self._queue and (not batch or n + len(self._queue[0].rows) <= self.max_rows):
                    p = self._queue.pop(0)
                    if p.deadline is not None and p.deadline <= now:
                        # The caller gave up before its turn: it will retry, so storing its rows
                        # now would only add work under overload (nothing was committed).
                        self._queued_rows -= len(p.rows)
                        EXPIRED.inc(len(p.rows))
                        if not p.future.done():
                            p.future.set_exception(
                                ServiceError(
                                    grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "EXPIRED",
                                    "the call's deadline passed before its rows were written",
                                )
                            )
                        continue
                    batch.append(p)
                    n += len(p.rows)
                if not batch:
                    self._slots.release()
                    QUEUED_ROWS.set(self._queued_rows)
                    continue
                self._queued_rows -= n
                QUEUED_ROWS.set(self._queued_rows)
                task = asyncio.create_task(self._flush(batch))
                self._flushes.add(task)
                task.add_done_callback(self._flushes.discard)
            if self._closing and not self._queue:
                return

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            try:
                await self._write(batch)
            except asyncpg.PostgresError as exc:
                if len(batch) == 1 or isinstance(exc, _CONNECTION_ERRORS):
                    raise
                # A data error fails the whole transaction: retry each request alone so that only
                # the request at fault fails.
                log.warning("group commit failed; retrying requests one by one", extra={"error": repr(exc)})
                for p in batch:
                    try:
                        await self._write([p])
                    except Exception as one:
                        if not p.future.done():
                            p.future.set_exception(one)
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            self._slots.release()

    async def _write(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            rows = batch[0].rows
            batch[0].taken = set()
        else:
            owned: set[Key] = set()
            rows = []
            for p in batch:
                p.taken = set()
                for r in p.rows:
                    key = (r[store.SOURCE_ID], r[store.MESSAGE_ID])
                    if key in owned:
                        # The same message in two concurrent requests: the first one owns it.
                        p.taken.add(key)
                        continue
                    owned.add(key)
                    rows.append(r)
        with FLUSH_SECONDS.time():
            async with self._connection() as conn:
                duplicates = await _write_retrying(conn, rows)
        FLUSH_ROWS.observe(len(rows))
        for p in batch:
            if not p.future.done():
                if duplicates:
                    mine = {(r[store.SOURCE_ID], r[store.MESSAGE_ID]) for r in p.rows}
                    p.future.set_result((mine & duplicates) | p.taken)
                else:
                    p.future.set_result(p.taken)


async def _discard(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    conn.terminate()
    await pool.release(conn)


_CONNECTION_ERRORS = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)


async def _write_retrying(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> set[Key]:
    for attempt in range(3):
        try:
            return await store.write_rows(conn, rows)
        except asyncpg.exceptions.DeadlockDetectedError:
            # Keys are locked in sorted order, so this needs a writer outside ingest; retry.
            if attempt == 2:
                raise
            await asyncio.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")
