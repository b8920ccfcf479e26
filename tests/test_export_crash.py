"""The export service killed (SIGKILL) in the middle of delivering, then restarted: nothing is
lost, and nothing reaches a platform twice except the rows that were on the wire at the kill,
which the platforms deduplicate by event_id / order id."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from services.export.credentials import SecretBox
from tests.export_receivers import Receivers
from touchpoint.export.v1 import export_service_pb2 as pb
from touchpoint.export.v1 import export_service_pb2_grpc as pb_grpc
from touchpoint.platform.testing import ServiceProcess, eventually

ROOT = Path(__file__).resolve().parent.parent
N = 300
BATCH = 25


@pytest.fixture
async def receivers() -> AsyncIterator[Receivers]:
    r = Receivers()
    await r.start()
    yield r
    await r.stop()


def export_env(database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "TOUCHPOINT_DATABASE_URL": database_url,
        "TOUCHPOINT_EXPORT_LISTEN": "127.0.0.1:0",
        "TOUCHPOINT_EXPORT_METRICS_PORT": "0",
        "TOUCHPOINT_EXPORT_SECRET_KEY": SecretBox.new_key(),
        "TOUCHPOINT_EXPORT_LEASE_SECONDS": "2",
        "TOUCHPOINT_EXPORT_POLL_SECONDS": "0.1",
        "TOUCHPOINT_EXPORT_RETRY_BASE_SECONDS": "0.05",
        "TOUCHPOINT_EXPORT_RETRY_CAP_SECONDS": "0.5",
        "TOUCHPOINT_EXPORT_MAINTENANCE_SECONDS": "0.2",
        "TOUCHPOINT_EXPORT_REQUESTS_PER_SECOND": "1000",
        "TOUCHPOINT_SHUTDOWN_GRACE_SECONDS": "2",
        "TOUCHPOINT_LOG_LEVEL": "INFO",
    }


async def test_killed_mid_batch_and_restarted_loses_nothing_and_sends_once(
    pool: asyncpg.Pool, database_url: str, receivers: Receivers
) -> None:
    r = receivers
    # Slow platforms: batches are on the wire when the kill comes.
    r.meta.delay = 0.15
    r.google.delay = 0.15
    env = export_env(database_url)
    first = ServiceProcess("export", env)
    address = f"127.0.0.1:{await first.start()}"
    second = ServiceProcess("export", env)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ExportServiceStub(channel)
            meta_creds = {"access_token": "meta-token"}
            google_creds = {"access_token": "google-token", "developer_token": "dev-token"}
            for kind, settings, creds in (
                (pb.DESTINATION_KIND_META_CAPI, {"dataset_id": "1"}, meta_creds),
                (
                    pb.DESTINATION_KIND_GOOGLE_ADS,
                    {"customer_id": "1234567890", "conversion_action_id": "9"},
                    google_creds,
                ),
            ):
                await stub.CreateDestination(
                    pb.CreateDestinationRequest(
                        destination=pb.Destination(
                            kind=kind,
                            base_url=r.base_url,
                            settings=settings,
                            credentials=creds,
                            enabled=True,
                            max_batch_size=BATCH,
                        )
                    )
                )
            orders = [f"crash-{i:04d}" for i in range(N)]
            when = datetime.now(UTC) - timedelta(hours=1)
            convs = []
            for o in orders:
                c = pb.OfflineConversion(
                    order_id=o, value=10, currency="EUR", email=f"{o}@example.com", gclid=f"g-{o}"
                )
                c.event_time.FromDatetime(when)
                convs.append(c)
            resp = await stub.UploadOfflineConversions(
                pb.UploadOfflineConversionsRequest(source="pos", conversions=convs)
            )
            assert resp.accepted == N

        # Kill while batches are on the wire, part of the work done.
        await eventually(
            lambda: len(r.meta.effects) >= 2 * BATCH and r.meta.in_flight > 0 and r.google.in_flight > 0,
            timeout=20,
            interval=0.005,
            message="never caught the service mid-batch",
        )
        await first.kill()
        done_at_kill = len(r.meta.effects), len(r.google.effects)
        assert done_at_kill[0] < N and done_at_kill[1] < N, "everything was delivered before the kill"
        leased = await pool.fetchval("select count(*) from export.outbox where state = 'sending'")
        assert leased > 0, "no batch was in flight at the kill"

        await second.start()

        def all_there() -> bool:
            return len(r.meta.effects) == N and len(r.google.effects) == N

        await eventually(all_there, timeout=30, message="conversions lost after the restart")

        async def settled() -> bool:
            return bool(
                await pool.fetchval("select count(*) = 0 from export.outbox where state <> 'delivered'")
            )

        await eventually(settled, timeout=10)
        # Resends happen only for rows that were leased at the kill (on the wire, or handed by intake
        # to a lane and waiting to be sent), at most one each.
        for platform, key in ((r.meta, "Purchase:{}"), (r.google, "{}")):
            resent = {k: n for k, n in platform.deliveries.items() if n > 1}
            assert all(n == 2 for n in resent.values()), resent
            assert len(resent) <= leased
            assert set(platform.effects) == {key.format(o) for o in orders}
        released = await pool.fetchval("select count(*) from export.outbox where attempts > 1")
        assert released == leased  # every leased row was tried again once, no other row
        assert r.problems == []
    finally:
        await second.stop()
        await first.stop()
