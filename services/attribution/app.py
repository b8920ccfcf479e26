"""Builds and starts the attribution service: the one place its parts are wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from prometheus_client import Counter

from services.attribution import store
from services.attribution.servicer import AttributionServicer
from touchpoint.attribution.v1 import attribution_service_pb2, attribution_service_pb2_grpc
from touchpoint.platform.db import migrate
from touchpoint.platform.eventlog import ApplyFn, LogConsumer
from touchpoint.platform.server import ServerHandle, start_server
from touchpoint.platform.settings import env_float, env_int, env_str

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = attribution_service_pb2.DESCRIPTOR.services_by_name["AttributionService"].full_name

EVENTS_APPLIED = Counter("touchpoint_attribution_events_applied_total", "Events of the log applied.")
TOUCHES = Counter("touchpoint_attribution_touches_total", "Touch rows written (before dedup).")
CONVERSIONS = Counter("touchpoint_attribution_conversions_total", "Conversion rows written (before dedup).")
OFFLINE = Counter(
    "touchpoint_attribution_offline_conversions_total", "Matched offline conversions applied (before dedup)."
)
ERASED = Counter(
    "touchpoint_attribution_erased_rows_total",
    "Rows deleted because identity erased their events.",
    ["table"],
)
RECOMPUTES = Counter(
    "touchpoint_attribution_recomputations_total", "Recomputations ended, by state.", ["state"]
)


@dataclass(frozen=True)
class AttributionSettings:
    # gRPC listen address.
    listen: str = "0.0.0.0:50053"
    # Port of the Prometheus /metrics endpoint (None: none).
    metrics_port: int | None = 9103
    # Events of the log applied in at most one transaction. Large so that catching up is fast
    # (1M events: 19 s at 20k, 29 s at 5k); a batch is only this large when the consumer is
    # behind, and then holds the log's horizon back for other readers by about 0.4 s.
    consumer_batch_size: int = 20_000
    # Seconds the consumer waits for a NOTIFY before polling the log again.
    consumer_idle_wait: float = 0.25
    # Seconds between looks for recomputation jobs (a new job is also picked up at once).
    recompute_poll_seconds: float = 2.0
    # Whether matched offline conversions from export.offline_conversions become conversions.
    consume_offline: bool = True
    # Whether what identity erases (identity.erased_events, GDPR) is dropped here too.
    consume_erasures: bool = True
    # Seconds between looks for those logs while their service has not created them yet.
    other_logs_wait_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> AttributionSettings:
        return cls(
            listen=env_str("TOUCHPOINT_ATTRIBUTION_LISTEN", cls.listen),
            metrics_port=env_int("TOUCHPOINT_ATTRIBUTION_METRICS_PORT", 9103, minimum=0),
            consumer_batch_size=env_int("TOUCHPOINT_ATTRIBUTION_BATCH_SIZE", 20_000, minimum=1),
            consumer_idle_wait=env_float("TOUCHPOINT_ATTRIBUTION_IDLE_WAIT_SECONDS", 0.25),
            recompute_poll_seconds=env_float("TOUCHPOINT_ATTRIBUTION_RECOMPUTE_POLL_SECONDS", 2.0),
            consume_offline=env_str("TOUCHPOINT_ATTRIBUTION_CONSUME_OFFLINE", "true").lower()
            in ("1", "true", "yes"),
            consume_erasures=env_str("TOUCHPOINT_ATTRIBUTION_CONSUME_ERASURES", "true").lower()
            in ("1", "true", "yes"),
            other_logs_wait_seconds=env_float("TOUCHPOINT_ATTRIBUTION_OTHER_LOGS_WAIT_SECONDS", 5.0),
        )

    @classmethod
    def for_tests(cls, **overrides: Any) -> AttributionSettings:
        return replace(
            cls(
                listen="127.0.0.1:0", metrics_port=None, consumer_idle_wait=0.05, other_logs_wait_seconds=0.2
            ),
            **overrides,
        )


def live_apply(memo: store.ApplyMemo) -> ApplyFn:
    """The live consumer's apply: every space's active (and pending) generation."""

    async def apply(conn: asyncpg.Connection, events: list[asyncpg.Record]) -> None:
        touches, conversions = await store.apply_rows(conn, events, memo=memo)
        EVENTS_APPLIED.inc(len(events))
        TOUCHES.inc(touches)
        CONVERSIONS.inc(conversions)

    return apply


async def run_recompute(pool: asyncpg.Pool, job: asyncpg.Record, batch_size: int) -> None:
    """Replays the log up to the job's stop positions into the job's generation, then switches.

    With a partitioned live consumer, each partition stood at its own position when the job
    started: the replay reads the log in the same partitions and stops each at its own."""
    stops = store.job_stops(job)
    memo = store.ApplyMemo(links=None)
    space_id, generation, job_id = job["space_id"], int(job["generation"]), job["id"]
    stop = stops[0]

    async def apply(conn: asyncpg.Connection, events: list[asyncpg.Record]) -> None:
        mine = [e for e in events if (e["xid"], e["seq"]) <= stop and e["space_id"] == space_id]
        if mine:
            await store.apply_rows(conn, mine, only_space=space_id, generation=generation, memo=memo)
            await store.add_job_progress(conn, job_id, len(mine))

    replay = LogConsumer(
        pool,
        schema="attribution",
        name=f"recompute_{job_id}",
        apply=apply,
        batch_size=batch_size,
        columns=store.LOG_COLUMNS,
        decode=None,
        partitions=len(stops),
    )
    await replay.ensure()
    try:
        for k, stop in enumerate(stops):
            while await replay.position(k) < stop:
                if await replay.step([k]) == 0:
                    break
        await store.finish_job(pool, job)
        RECOMPUTES.labels("succeeded").inc()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("recomputation failed", extra={"job": job_id})
        await store.fail_job(pool, job, repr(exc))
        RECOMPUTES.labels("failed").inc()


async def recompute_loop(pool: asyncpg.Pool, settings: AttributionSettings, wake: asyncio.Event) -> None:
    while True:
        try:
            for job in await store.running_jobs(pool):
                await run_recompute(pool, job, settings.consumer_batch_size)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recomputation round failed")
        wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), settings.recompute_poll_seconds)


async def consume_when_present(
    pool: asyncpg.Pool, consumer: LogConsumer, stopping: asyncio.Event, wait_seconds: float
) -> None:
    """Applies another service's log once that service has created it (services start in any
    order). Polls instead of LogConsumer.run(): nobody NOTIFYs for these logs, and run() would
    hold a pool connection for LISTEN for nothing. Leases are kept the same way run() keeps them."""
    warned = False
    while not await pool.fetchval("select to_regclass($1) is not null", consumer.log):
        if not warned:
            log.info("waiting for a log to consume", extra={"log": consumer.log, "consumer": consumer.name})
            warned = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), wait_seconds)
        if stopping.is_set():
            return
    await consumer.ensure()
    loop = asyncio.get_running_loop()
    next_rebalance = next_lag = 0.0
    try:
        while not stopping.is_set():
            wait = consumer.idle_wait
            try:
                if loop.time() >= next_rebalance:
                    await consumer.rebalance()
                    next_rebalance = loop.time() + consumer.lease_ttl / 3
                if loop.time() >= next_lag:
                    next_lag = loop.time() + consumer.lag_interval
                    await consumer.lag()  # exported as metrics
                if await consumer.step(consumer.owned):
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("consumer step failed; retrying", extra={"consumer": consumer.name})
                wait = 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), wait)
    finally:
        with contextlib.suppress(Exception):
            await consumer.leave()


def offline_apply() -> ApplyFn:
    async def apply(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
        OFFLINE.inc(await store.apply_offline(conn, rows))

    return apply


def erasure_apply(memo: store.ApplyMemo) -> ApplyFn:
    async def apply(conn: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
        touches, conversions, links = await store.apply_erasures(conn, rows)
        ERASED.labels("touches").inc(touches)
        ERASED.labels("conversions").inc(conversions)
        ERASED.labels("identity_links").inc(links)
        if links and memo.links is not None:
            memo.links.forget()

    return apply


@dataclass
class AttributionApp:
    handle: ServerHandle
    # The live consumer first, then the offline-conversion and erasure consumers.
    consumers: list[LogConsumer]
    # One task per consumer (same order), then the recomputation loop.
    tasks: list[asyncio.Task[None]]
    stopping: asyncio.Event

    @property
    def address(self) -> str:
        return self.handle.address

    @property
    def consumer(self) -> LogConsumer:
        return self.consumers[0]

    async def stop(self, grace: float = 1.0) -> None:
        """Drains in-flight calls, lets the consumers finish their batch and release their
        listener connection (cancelling one would leak it and hang pool.close), then stops."""
        await self.handle.stop(grace)
        self.stopping.set()
        for consumer in self.consumers:
            consumer.stop()
        consumer_tasks = self.tasks[: len(self.consumers)]
        for task in self.tasks[len(self.consumers) :]:
            task.cancel()
        for task in consumer_tasks:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=max(grace, 5.0))
            except TimeoutError:
                task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def start_attribution(pool: asyncpg.Pool, settings: AttributionSettings) -> AttributionApp:
    await migrate(pool, "attribution", MIGRATIONS)
    memo = store.ApplyMemo()
    consumer = LogConsumer(
        pool,
        schema="attribution",
        name=store.LIVE_CONSUMER,
        apply=live_apply(memo),
        batch_size=settings.consumer_batch_size,
        idle_wait=settings.consumer_idle_wait,
        columns=store.LOG_COLUMNS,
        decode=None,
    )
    await consumer.ensure()
    others: list[LogConsumer] = []
    if settings.consume_offline:
        others.append(
            LogConsumer(
                pool,
                schema="attribution",
                name="offline_conversions",
                log=store.OFFLINE_LOG,
                apply=offline_apply(),
                batch_size=settings.consumer_batch_size,
                idle_wait=settings.consumer_idle_wait,
                columns=store.OFFLINE_COLUMNS,
                decode=None,
            )
        )
    if settings.consume_erasures:
        others.append(
            LogConsumer(
                pool,
                schema="attribution",
                name="erasures",
                log=store.ERASURE_LOG,
                apply=erasure_apply(memo),
                batch_size=settings.consumer_batch_size,
                idle_wait=settings.consumer_idle_wait,
                columns=store.ERASURE_COLUMNS,
                decode=None,
            )
        )
    wake = asyncio.Event()
    stopping = asyncio.Event()
    servicer = AttributionServicer(pool, on_recompute=wake.set)

    def register(server: grpc.aio.Server) -> None:
        attribution_service_pb2_grpc.add_AttributionServiceServicer_to_server(servicer, server)

    handle = await start_server(
        service="attribution",
        register=register,
        service_names=[SERVICE_NAME],
        listen=settings.listen,
        metrics_port=settings.metrics_port,
    )
    tasks = [
        asyncio.create_task(consumer.run(), name="attribution-consumer"),
        *(
            asyncio.create_task(
                consume_when_present(pool, c, stopping, settings.other_logs_wait_seconds),
                name=f"attribution-{c.name}",
            )
            for c in others
        ),
        asyncio.create_task(recompute_loop(pool, settings, wake), name="attribution-recompute"),
    ]
    return AttributionApp(handle, [consumer, *others], tasks, stopping)
