"""Builds and starts the ingest service: the one place its parts are wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from services.ingest import store
from services.ingest.servicer import IngestServicer, SourceCache, SuppressionCache
from services.ingest.writer import BatchWriter
from touchpoint.ingest.v1 import ingest_service_pb2, ingest_service_pb2_grpc
from touchpoint.platform.db import migrate
from touchpoint.platform.server import ServerHandle, start_server
from touchpoint.platform.settings import env_float, env_int, env_str

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name


@dataclass(frozen=True)
class IngestSettings:
    # gRPC listen address.
    listen: str = "0.0.0.0:50051"
    # Port of the Prometheus /metrics endpoint (None: none).
    metrics_port: int | None = 9101
    # Days a message id is remembered for dedup (at least 7).
    dedup_window_days: int = 7
    # Seconds a write key lookup is cached (disabling a source takes effect within it).
    source_cache_seconds: float = 5.0
    # Rows waiting for a commit beyond which requests are refused with RESOURCE_EXHAUSTED.
    max_queued_rows: int = 50_000
    # Rows in one group commit at most.
    flush_max_rows: int = 2000
    # Group commits in flight at once (per worker process). Fewer, larger commits mean fewer
    # round trips per event: 2 measured as fast as 3 with less CPU per event (bench/ingest).
    flush_concurrency: int = 2
    # Seconds between maintenance rounds (partitions ahead, dedup pruning).
    maintenance_interval_seconds: float = 3600.0
    # Worker processes sharing the port (SO_REUSEPORT); per-event Python work is CPU-bound, so
    # on a machine with spare cores more than one raises throughput.
    workers: int = 1

    @classmethod
    def from_env(cls) -> IngestSettings:
        return cls(
            listen=env_str("TOUCHPOINT_INGEST_LISTEN", cls.listen),
            metrics_port=env_int("TOUCHPOINT_INGEST_METRICS_PORT", 9101, minimum=0),
            dedup_window_days=env_int("TOUCHPOINT_DEDUP_WINDOW_DAYS", 7, minimum=7),
            source_cache_seconds=env_float("TOUCHPOINT_SOURCE_CACHE_SECONDS", 5.0),
            max_queued_rows=env_int("TOUCHPOINT_INGEST_MAX_QUEUED_ROWS", 50_000, minimum=2500),
            flush_max_rows=env_int("TOUCHPOINT_INGEST_FLUSH_MAX_ROWS", 2000, minimum=1),
            flush_concurrency=env_int("TOUCHPOINT_INGEST_FLUSH_CONCURRENCY", 2, minimum=1),
            maintenance_interval_seconds=env_float("TOUCHPOINT_INGEST_MAINTENANCE_SECONDS", 3600.0),
            workers=env_int("TOUCHPOINT_INGEST_WORKERS", 1, minimum=1),
        )

    @classmethod
    def for_tests(cls, **overrides: Any) -> IngestSettings:
        return replace(cls(listen="127.0.0.1:0", metrics_port=None, source_cache_seconds=0.0), **overrides)


@dataclass
class IngestApp:
    handle: ServerHandle
    writer: BatchWriter
    maintenance: asyncio.Task[None]

    @property
    def address(self) -> str:
        return self.handle.address

    async def stop(self, grace: float = 1.0) -> None:
        """Drains in-flight calls (their rows get committed), then stops the writer."""
        await self.handle.stop(grace)
        await self.writer.stop()
        self.maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.maintenance


async def maintain(pool: asyncpg.Pool, settings: IngestSettings) -> None:
    """Keeps partitions ahead of time and prunes dedup keys older than the window."""
    while True:
        try:
            await store.ensure_partitions(pool)
            cutoff = datetime.now(UTC) - timedelta(days=settings.dedup_window_days)
            while await store.prune_message_ids(pool, cutoff) > 0:
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("maintenance round failed")
        await asyncio.sleep(settings.maintenance_interval_seconds)


async def start_ingest(pool: asyncpg.Pool, settings: IngestSettings) -> IngestApp:
    await migrate(pool, "ingest", MIGRATIONS)
    await store.ensure_partitions(pool)
    writer = BatchWriter(
        pool,
        max_rows=settings.flush_max_rows,
        concurrency=settings.flush_concurrency,
        max_queued_rows=settings.max_queued_rows,
    )
    writer.start()
    servicer = IngestServicer(
        pool,
        writer,
        SourceCache(pool, settings.source_cache_seconds),
        SuppressionCache(pool, settings.source_cache_seconds),
    )

    def register(server: grpc.aio.Server) -> None:
        ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(servicer, server)

    handle = await start_server(
        service="ingest",
        register=register,
        service_names=[SERVICE_NAME],
        listen=settings.listen,
        metrics_port=settings.metrics_port,
        reuse_port=settings.workers > 1,
    )
    maintenance = asyncio.create_task(maintain(pool, settings), name="ingest-maintenance")
    return IngestApp(handle, writer, maintenance)
