"""Builds and starts the export service: the one place its parts are wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from services.export import store
from services.export.credentials import SecretBox
from services.export.matching import Matcher, ProfileDirectory, ViewProfileDirectory
from services.export.outbox import Deliverer, DeliverySettings
from services.export.servicer import ExportServicer
from touchpoint.export.v1 import export_service_pb2, export_service_pb2_grpc
from touchpoint.platform.db import migrate
from touchpoint.platform.eventlog import LogConsumer
from touchpoint.platform.server import ServerHandle, start_server
from touchpoint.platform.settings import env_float, env_int, env_str

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# Published by the identity service: events erased for GDPR.
ERASURE_LOG = "identity.erased_events"
SERVICE_NAME = export_service_pb2.DESCRIPTOR.services_by_name["ExportService"].full_name


@dataclass(frozen=True)
class ExportSettings:
    # gRPC listen address.
    listen: str = "0.0.0.0:50054"
    # Port of the Prometheus /metrics endpoint (None: none).
    metrics_port: int | None = 9104
    # Fernet key for stored destination credentials (TOUCHPOINT_EXPORT_SECRET_KEY); empty: only
    # credentials referenced from the environment can be used.
    secret_key: str = ""
    # Region for phone numbers written without a country code (ISO 3166-1 alpha-2).
    default_phone_region: str = "US"
    # Days before a purchase in which a profile's ad clicks are attached to it (at most 90).
    click_window_days: int = 90
    # Whether this replica runs delivery workers (intake-only replicas are possible).
    deliver: bool = True
    # Whether this replica keeps export.clicks from the event log.
    consume_clicks: bool = True
    # Whether this replica drops what export derived from events identity erased (GDPR,
    # identity.erased_events). Waits for the view when identity has not created it yet.
    consume_erasures: bool = True
    # Seconds between checks for identity.erased_events while it does not exist yet.
    erasures_wait_seconds: float = 5.0
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    # Worker processes sharing the port (SO_REUSEPORT: the kernel spreads client connections over
    # them), each with its own intake and delivery lanes. Intake's per-row work is CPU-bound
    # Python, so where one process is the bottleneck and cores are free, more raise throughput.
    workers: int = 1

    @classmethod
    def from_env(cls) -> ExportSettings:
        d = DeliverySettings()
        return cls(
            listen=env_str("TOUCHPOINT_EXPORT_LISTEN", cls.listen),
            metrics_port=env_int("TOUCHPOINT_EXPORT_METRICS_PORT", 9104, minimum=0),
            secret_key=env_str("TOUCHPOINT_EXPORT_SECRET_KEY", ""),
            default_phone_region=env_str("TOUCHPOINT_EXPORT_PHONE_REGION", "US").upper(),
            click_window_days=env_int("TOUCHPOINT_EXPORT_CLICK_WINDOW_DAYS", 90, minimum=1),
            deliver=env_str("TOUCHPOINT_EXPORT_DELIVER", "true").lower() in ("1", "true", "yes"),
            consume_clicks=env_str("TOUCHPOINT_EXPORT_CONSUME_CLICKS", "true").lower()
            in ("1", "true", "yes"),
            consume_erasures=env_str("TOUCHPOINT_EXPORT_CONSUME_ERASURES", "true").lower()
            in ("1", "true", "yes"),
            delivery=DeliverySettings(
                poll_interval_seconds=env_float("TOUCHPOINT_EXPORT_POLL_SECONDS", d.poll_interval_seconds),
                lease_seconds=env_float("TOUCHPOINT_EXPORT_LEASE_SECONDS", d.lease_seconds),
                request_timeout_seconds=env_float(
                    "TOUCHPOINT_EXPORT_REQUEST_TIMEOUT_SECONDS", d.request_timeout_seconds
                ),
                retry_base_seconds=env_float("TOUCHPOINT_EXPORT_RETRY_BASE_SECONDS", d.retry_base_seconds),
                retry_cap_seconds=env_float("TOUCHPOINT_EXPORT_RETRY_CAP_SECONDS", d.retry_cap_seconds),
                max_attempts=env_int("TOUCHPOINT_EXPORT_MAX_ATTEMPTS", d.max_attempts, minimum=1),
                default_requests_per_second=env_float(
                    "TOUCHPOINT_EXPORT_REQUESTS_PER_SECOND", d.default_requests_per_second
                ),
                concurrency_per_destination=env_int(
                    "TOUCHPOINT_EXPORT_CONCURRENCY", d.concurrency_per_destination, minimum=1
                ),
                refresh_seconds=env_float("TOUCHPOINT_EXPORT_REFRESH_SECONDS", d.refresh_seconds),
                maintenance_seconds=env_float("TOUCHPOINT_EXPORT_MAINTENANCE_SECONDS", d.maintenance_seconds),
                handoff_max_rows=env_int("TOUCHPOINT_EXPORT_HANDOFF_MAX_ROWS", d.handoff_max_rows, minimum=0),
            ),
            workers=env_int("TOUCHPOINT_EXPORT_WORKERS", 1, minimum=1),
        )

    @classmethod
    def for_tests(cls, **overrides: Any) -> ExportSettings:
        delivery = DeliverySettings(
            poll_interval_seconds=0.1,
            lease_seconds=5.0,
            request_timeout_seconds=5.0,
            retry_base_seconds=0.05,
            retry_cap_seconds=0.5,
            default_requests_per_second=1000.0,
            refresh_seconds=0.5,
            maintenance_seconds=0.2,
        )
        base = cls(listen="127.0.0.1:0", metrics_port=None, secret_key=SecretBox.new_key(), delivery=delivery)
        return replace(base, **overrides)


@dataclass
class ExportApp:
    handle: ServerHandle
    deliverer: Deliverer | None
    clicks: LogConsumer | None
    erasures: LogConsumer | None
    tasks: list[asyncio.Task[None]]
    # Set by stop(): ends the wait for identity's erasure log.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str:
        return self.handle.address

    async def stop(self, grace: float = 1.0) -> None:
        """Drains in-flight calls, lets in-flight deliveries record their results, stops."""
        await self.handle.stop(grace)
        self.stopping.set()
        for consumer in (self.clicks, self.erasures):
            if consumer is not None:
                consumer.stop()
        if self.deliverer is not None:
            await self.deliverer.stop()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, grace)


async def start_export(
    pool: asyncpg.Pool, settings: ExportSettings, directory: ProfileDirectory | None = None
) -> ExportApp:
    """Migrates, starts the click consumer, the delivery workers and the gRPC server.

    `directory` is where buyers are resolved to profiles: identity's published view unless
    another is given (e.g. one calling IdentityService).
    """
    await migrate(pool, "export", MIGRATIONS)
    box = SecretBox(settings.secret_key)
    tasks: list[asyncio.Task[None]] = []
    clicks = None
    if settings.consume_clicks and await store.relation_exists(pool, "ingest.event_log"):
        clicks = LogConsumer(pool, schema="export", name="export-clicks", apply=store.apply_click_events)
        await clicks.ensure()
        tasks.append(asyncio.create_task(clicks.run(), name="export-clicks"))
    elif settings.consume_clicks:
        log.warning("ingest.event_log does not exist: no clicks will be matched until it does")
    stopping = asyncio.Event()
    erasures = None
    if settings.consume_erasures:
        erasures = LogConsumer(
            pool,
            schema="export",
            name="export-erasures",
            log=ERASURE_LOG,
            columns="space_id, source_id, message_id, profile_id",
            decode=None,
            apply=store.apply_erasures,
        )
        tasks.append(
            asyncio.create_task(
                _consume_erasures(pool, erasures, stopping, settings.erasures_wait_seconds),
                name="export-erasures",
            )
        )
    deliverer = None
    if settings.deliver:
        deliverer = Deliverer(pool, settings.delivery, box)
        await deliverer.start()
    matcher = Matcher(directory or ViewProfileDirectory(), settings.click_window_days)
    servicer = ExportServicer(
        pool,
        matcher,
        box,
        default_region=settings.default_phone_region,
        on_enqueued=deliverer.wake if deliverer else (lambda: None),
        on_destinations_changed=deliverer.reload if deliverer else (lambda: None),
        handoff=deliverer,
    )

    def register(server: grpc.aio.Server) -> None:
        export_service_pb2_grpc.add_ExportServiceServicer_to_server(servicer, server)

    handle = await start_server(
        service="export",
        register=register,
        service_names=[SERVICE_NAME],
        listen=settings.listen,
        metrics_port=settings.metrics_port,
        reuse_port=settings.workers > 1,
    )
    return ExportApp(handle, deliverer, clicks, erasures, tasks, stopping)


async def _consume_erasures(
    pool: asyncpg.Pool, consumer: LogConsumer, stopping: asyncio.Event, wait: float
) -> None:
    """Runs the erasure consumer once identity has published its log (services start in any
    order): erasures must not be missed, so this waits instead of giving up."""
    warned = False
    while not await store.relation_exists(pool, ERASURE_LOG):
        if not warned:
            log.warning("%s does not exist yet: erasures wait for the identity service", ERASURE_LOG)
            warned = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), wait)
        if stopping.is_set():
            return
    await consumer.ensure()
    if not stopping.is_set():
        await consumer.run()
