"""Builds and starts the identity service: the one place its parts are wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from services.identity import domain, store
from services.identity.domain import Extractor, Rules
from services.identity.servicer import IdentityServicer
from services.identity.stitcher import Stitcher
from touchpoint.identity.v1 import identity_service_pb2, identity_service_pb2_grpc
from touchpoint.ingest.v1 import ingest_service_pb2_grpc
from touchpoint.platform.db import migrate, sibling_pool
from touchpoint.platform.server import ServerHandle, start_server
from touchpoint.platform.settings import SettingsError, env_float, env_int, env_list, env_str

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICE_NAME = identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name


@dataclass(frozen=True)
class IdentitySettings:
    # gRPC listen address.
    listen: str = "0.0.0.0:50052"
    # Port of the Prometheus /metrics endpoint (None: none).
    metrics_port: int | None = 9102
    # Address of the ingest service (suppressions and event deletion for DeleteProfile).
    ingest_addr: str = "127.0.0.1:50051"
    # Region assumed for phone numbers written without a country code (ISO 3166 alpha-2).
    default_region: str = "US"
    # Trait keys whose values are identifiers too (each key becomes a kind), e.g. crm_id.
    trait_keys: tuple[str, ...] = ()
    # Most identifiers of a kind per profile, kind=N separated by commas (Segment's defaults).
    limits: Mapping[str, int] = field(default_factory=lambda: dict(domain.DEFAULT_LIMITS))
    # The limit of every kind not in `limits`.
    default_limit: int = domain.DEFAULT_LIMIT
    # Kinds ranked first when an identifier must be dropped (the lowest-ranked goes first).
    priority: tuple[str, ...] = domain.DEFAULT_PRIORITY
    # Regular expression of values that never link anything (on top of the junk ids).
    blocked_pattern: str = ""
    # Whether this process applies the event log (false: a replica that only answers the API).
    consume: bool = True
    # Events of the log applied per transaction (at most: a consumer that keeps up applies what
    # is there). Larger batches write each new identifier once with its final profile instead
    # of inserting then moving it, and coalesce last-seen updates (Postgres' CPU per event fell
    # from 81 to 60 µs from 5,000 to 20,000 in bench/identity), but the transaction holds the
    # log's horizon back while it writes (~1.5 s at 20,000 when catching up; the next batch is
    # prepared outside it meanwhile; see touchpoint.platform.eventlog).
    batch_size: int = 20000
    # Seconds a space's rules (identity.space_rules) are cached.
    rules_cache_seconds: float = 10.0
    # Seconds between refreshes of the profile metrics (a scan of identity.identifiers). The
    # consumer's lag is exported by the platform (touchpoint_eventlog_consumer_lag_*).
    profile_stats_interval_seconds: float = 300.0
    # Seconds between retries of event deletions that ingest did not confirm.
    deletion_retry_seconds: float = 30.0
    # Whether this process retries queued event deletions and refreshes the profile metrics (a
    # scan of identity.identifiers). TOUCHPOINT_IDENTITY_MAINTENANCE, by default what `consume`
    # is: replicas that only answer the API add no scans (the consuming replicas export the
    # profile metrics). Worker processes after the first never do.
    maintenance: bool = True
    # Worker processes (SO_REUSEPORT: the kernel spreads connections over those on the port).
    # With more than one, and `consume`, the first applies the log and stays off the port (a
    # batch keeps its event loop busy for tens of milliseconds, which callers would wait for);
    # the others answer the API. One process spends ~0.6 ms of CPU per ResolveProfile when busy
    # and ~0.9-1.1 ms at 500 calls/s (fewer calls per wake-up), mostly in gRPC's Python
    # machinery (bench/identity): past ~1,600 calls/s calls queue behind each other, and more
    # API processes help where cores are free. With more than one worker the profile
    # metrics (touchpoint_identity_profiles, identifiers per profile) are not exported: they
    # are kept per process.
    workers: int = 1

    @classmethod
    def from_env(cls) -> IdentitySettings:
        try:
            limits = domain.parse_limits(env_str("TOUCHPOINT_IDENTITY_LIMITS", "user_id=1"))
            consume = _flag("TOUCHPOINT_IDENTITY_CONSUME", True)
            settings = cls(
                listen=env_str("TOUCHPOINT_IDENTITY_LISTEN", cls.listen),
                metrics_port=env_int("TOUCHPOINT_IDENTITY_METRICS_PORT", 9102, minimum=0),
                ingest_addr=env_str("TOUCHPOINT_INGEST_ADDR", cls.ingest_addr),
                default_region=env_str("TOUCHPOINT_IDENTITY_DEFAULT_REGION", cls.default_region).upper(),
                trait_keys=env_list("TOUCHPOINT_IDENTITY_TRAIT_KEYS"),
                limits=limits,
                default_limit=env_int("TOUCHPOINT_IDENTITY_DEFAULT_LIMIT", domain.DEFAULT_LIMIT, minimum=1),
                priority=env_list("TOUCHPOINT_IDENTITY_PRIORITY", domain.DEFAULT_PRIORITY),
                blocked_pattern=env_str("TOUCHPOINT_IDENTITY_BLOCKED_PATTERN", ""),
                consume=consume,
                maintenance=_flag("TOUCHPOINT_IDENTITY_MAINTENANCE", consume),
                batch_size=env_int("TOUCHPOINT_IDENTITY_BATCH_SIZE", cls.batch_size, minimum=1),
                rules_cache_seconds=env_float("TOUCHPOINT_IDENTITY_RULES_CACHE_SECONDS", 10.0),
                profile_stats_interval_seconds=env_float("TOUCHPOINT_IDENTITY_PROFILE_STATS_SECONDS", 300.0),
                deletion_retry_seconds=env_float("TOUCHPOINT_IDENTITY_DELETION_RETRY_SECONDS", 30.0),
                workers=env_int("TOUCHPOINT_IDENTITY_WORKERS", 1, minimum=1),
            )
            settings.rules()  # fails early on a bad pattern or limit
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
        return settings

    @classmethod
    def for_tests(cls, ingest_addr: str = "127.0.0.1:50051", **overrides: Any) -> IdentitySettings:
        return replace(
            cls(
                listen="127.0.0.1:0",
                metrics_port=None,
                ingest_addr=ingest_addr,
                rules_cache_seconds=0.0,
                profile_stats_interval_seconds=0.5,
                deletion_retry_seconds=0.5,
            ),
            **overrides,
        )

    def rules(self) -> Rules:
        return Rules(self.limits, self.default_limit, self.priority, self.blocked_pattern)


class _ProfileStats(Collector):
    """Profiles and identifiers per profile, from the last refresh (a query per interval, not
    per scrape)."""

    BUCKETS = (1, 2, 3, 5, 8, 13, 21, 50, 100)

    def __init__(self) -> None:
        self.counts: Mapping[int, int] = {}

    def collect(self) -> Iterator[Any]:
        total = sum(self.counts.values())
        yield GaugeMetricFamily("touchpoint_identity_profiles", "Profiles (all spaces).", value=total)
        buckets = []
        for bound in self.BUCKETS:
            running = sum(c for n, c in self.counts.items() if n <= bound)
            buckets.append((str(float(bound)), running))
        buckets.append(("+Inf", total))
        yield HistogramMetricFamily(
            "touchpoint_identity_profile_identifiers",
            "Identifiers per profile.",
            buckets=buckets,
            sum_value=sum(n * c for n, c in self.counts.items()),
        )


_STATS = _ProfileStats()
with contextlib.suppress(ValueError):  # registered once per process
    REGISTRY.register(_STATS)


@dataclass
class IdentityApp:
    handle: ServerHandle
    servicer: IdentityServicer
    stitcher: Stitcher
    channel: grpc.aio.Channel
    tasks: list[asyncio.Task[None]]
    # The consumer's own pool (raw times), when this replica consumes.
    log_pool: asyncpg.Pool | None = None

    @property
    def address(self) -> str:
        return self.handle.address

    async def caught_up(self) -> bool:
        """True when every event committed to the log so far has been applied."""
        n, _ = await self.stitcher.consumer.lag()
        return n == 0

    async def wait_caught_up(self, timeout: float = 10.0) -> None:
        """Waits until the consumer has applied every event committed before the call (tests,
        benches, operators' scripts)."""
        deadline = time.monotonic() + timeout
        while not await self.caught_up():
            if time.monotonic() > deadline:
                raise TimeoutError(f"identity did not catch up with the event log within {timeout}s")
            await asyncio.sleep(0.02)

    async def stop(self, grace: float = 1.0) -> None:
        await self.handle.stop(grace)
        await self.servicer.close()
        self.stitcher.consumer.stop()
        for t in self.tasks:
            if t.get_name() != "identity-consumer":
                t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.channel.close()
        if self.log_pool is not None:
            await self.log_pool.close()


def _flag(name: str, default: bool) -> bool:
    return env_str(name, "true" if default else "false").strip().lower() not in ("0", "false", "no")


async def _profile_stats(pool: asyncpg.Pool, interval: float) -> None:
    # Not at once: a starting replica settles first (the query scans identity.identifiers).
    await asyncio.sleep(min(interval, 15.0))
    while True:
        try:
            _STATS.counts = await store.profile_size_counts(pool)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("refreshing the profile metrics failed")
        await asyncio.sleep(interval)


async def _deletions(stitcher: Stitcher, interval: float) -> None:
    while True:
        try:
            await stitcher.drain()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deleting queued events at ingest failed; retrying")
        await asyncio.sleep(interval)


async def start_identity(pool: asyncpg.Pool, settings: IdentitySettings) -> IdentityApp:
    await migrate(pool, "identity", MIGRATIONS)
    channel = grpc.aio.insecure_channel(settings.ingest_addr)
    # Reads of the log, the batch being prepared and the one committing.
    log_pool = await sibling_pool(pool, max_size=4, raw_times=True) if settings.consume else None
    try:
        stitcher = Stitcher(
            pool,
            log_pool=log_pool,
            extractor=Extractor(settings.default_region, settings.trait_keys),
            rules=settings.rules(),
            ingest=ingest_service_pb2_grpc.IngestServiceStub(channel),
            batch_size=settings.batch_size,
            rules_cache_seconds=settings.rules_cache_seconds,
        )
        await stitcher.consumer.ensure()
        servicer = IdentityServicer(pool, stitcher, default_region=settings.default_region)

        def register(server: grpc.aio.Server) -> None:
            identity_service_pb2_grpc.add_IdentityServiceServicer_to_server(servicer, server)

        handle = await start_server(
            service="identity",
            register=register,
            service_names=[SERVICE_NAME],
            listen=settings.listen,
            metrics_port=settings.metrics_port,
            reuse_port=settings.workers > 1,
        )
        tasks = []
        if settings.maintenance:
            tasks += [
                asyncio.create_task(
                    _profile_stats(pool, settings.profile_stats_interval_seconds), name="identity-stats"
                ),
                asyncio.create_task(
                    _deletions(stitcher, settings.deletion_retry_seconds), name="identity-deletions"
                ),
            ]
        if settings.consume:
            tasks.append(asyncio.create_task(stitcher.consumer.run(), name="identity-consumer"))
        return IdentityApp(handle, servicer, stitcher, channel, tasks, log_pool)
    except BaseException:
        if log_pool is not None:
            await log_pool.close()
        raise
