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
from touchpoint.platform.eventlog import LogConsumer, LogEvent
from touchpoint.platform.server import ServerHandle, start_server
from touchpoint.platform.settings import env_float, env_int, env_str

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = attribution_service_pb2.DESCRIPTOR.services_by_name["AttributionService"].full_name

EVENTS_APPLIED = Counter("touchpoint_attribution_events_applied_total", "Events of the log applied.")
TOUCHES = Counter("touchpoint_attribution_touches_total", "Touch rows written (before dedup).")
CONVERSIONS = Counter("touchpoint_attribution_conversions_total", "Conversion rows written (before dedup).")
RECOMPUTES = Counter(
    "touchpoint_attribution_recomputations_total", "Recomputations ended, by state.", ["state"]
)


@dataclass(frozen=True)
class AttributionSettings:
    # gRPC listen address.
    listen: str = "0.0.0.0:50053"
    # Port of the Prometheus /metrics endpoint (None: none).
    metrics_port: int | None = 9103
    # Events of the log applied in one transaction.
    consumer_batch_size: int = 2000
    # Seconds the consumer waits for a NOTIFY before polling the log again.
    consumer_idle_wait: float = 0.25
    # Seconds between looks for recomputation jobs (a new job is also picked up at once).
    recompute_poll_seconds: float = 2.0

    @classmethod
    def from_env(cls) -> AttributionSettings:
        return cls(
            listen=env_str("TOUCHPOINT_ATTRIBUTION_LISTEN", cls.listen),
            metrics_port=env_int("TOUCHPOINT_ATTRIBUTION_METRICS_PORT", 9103, minimum=0),
            consumer_batch_size=env_int("TOUCHPOINT_ATTRIBUTION_BATCH_SIZE", 2000, minimum=1),
            consumer_idle_wait=env_float("TOUCHPOINT_ATTRIBUTION_IDLE_WAIT_SECONDS", 0.25),
            recompute_poll_seconds=env_float("TOUCHPOINT_ATTRIBUTION_RECOMPUTE_POLL_SECONDS", 2.0),
        )

    @classmethod
    def for_tests(cls, **overrides: Any) -> AttributionSettings:
        return replace(cls(listen="127.0.0.1:0", metrics_port=None, consumer_idle_wait=0.05), **overrides)


async def apply_live(conn: asyncpg.Connection, events: list[LogEvent]) -> None:
    touches, conversions = await store.apply_events(conn, events)
    EVENTS_APPLIED.inc(len(events))
    TOUCHES.inc(touches)
    CONVERSIONS.inc(conversions)


async def run_recompute(pool: asyncpg.Pool, job: asyncpg.Record, batch_size: int) -> None:
    """Replays the log up to the job's stop position into the job's generation, then switches."""
    stop = (int(job["stop_xid"]), int(job["stop_seq"]))
    space_id, generation, job_id = job["space_id"], int(job["generation"]), job["id"]

    async def apply(conn: asyncpg.Connection, events: list[LogEvent]) -> None:
        mine = [e for e in events if (e.xid, e.seq) <= stop and e.space_id == space_id]
        if mine:
            await store.apply_events(conn, mine, only_space=space_id, generation=generation)
            await store.add_job_progress(conn, job_id, len(mine))

    replay = LogConsumer(
        pool, schema="attribution", name=f"recompute_{job_id}", apply=apply, batch_size=batch_size
    )
    await replay.ensure()
    try:
        while await replay.position() < stop:
            if await replay.step() == 0:
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


@dataclass
class AttributionApp:
    handle: ServerHandle
    consumer: LogConsumer
    tasks: list[asyncio.Task[None]]

    @property
    def address(self) -> str:
        return self.handle.address

    async def stop(self, grace: float = 1.0) -> None:
        """Drains in-flight calls, lets the consumer finish its batch and release its listener
        connection (cancelling it would leak the connection and hang pool.close), then stops."""
        await self.handle.stop(grace)
        self.consumer.stop()
        consumer_task, *others = self.tasks
        for task in others:
            task.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(consumer_task), timeout=max(grace, 5.0))
        except TimeoutError:
            consumer_task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def start_attribution(pool: asyncpg.Pool, settings: AttributionSettings) -> AttributionApp:
    await migrate(pool, "attribution", MIGRATIONS)
    consumer = LogConsumer(
        pool,
        schema="attribution",
        name=store.LIVE_CONSUMER,
        apply=apply_live,
        batch_size=settings.consumer_batch_size,
        idle_wait=settings.consumer_idle_wait,
    )
    await consumer.ensure()
    wake = asyncio.Event()
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
        asyncio.create_task(recompute_loop(pool, settings, wake), name="attribution-recompute"),
    ]
    return AttributionApp(handle, consumer, tasks)
