"""`python -m services.export` with worker processes behind one port, as operators run it: uploads
spread over the workers, each worker's intake hands its rows to its own lanes, every conversion
reaches the platform once, one /metrics for all of them, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest

from bench.common import free_port
from services.export.app import ExportSettings, start_export
from services.export.credentials import SecretBox
from tests.export_receivers import Receivers
from touchpoint.export.v1 import export_service_pb2 as pb
from touchpoint.export.v1 import export_service_pb2_grpc as pb_grpc
from touchpoint.platform.testing import eventually

ROOT = Path(__file__).resolve().parents[1]


def metric(body: str, line_prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(line_prefix))


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children() if c.is_running() and c.status() != "zombie"]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
async def receivers() -> AsyncIterator[Receivers]:
    r = Receivers()
    await r.start()
    yield r
    await r.stop()


async def test_two_workers_share_the_port_deliver_once_and_share_the_metrics(
    pool: asyncpg.Pool, database_url: str, receivers: Receivers
) -> None:
    app = await start_export(pool, ExportSettings.for_tests(deliver=False))  # migrations first
    await app.stop()
    port, metrics_port = free_port(), free_port()
    env = dict(
        os.environ,
        TOUCHPOINT_DATABASE_URL=database_url,
        TOUCHPOINT_EXPORT_LISTEN=f"127.0.0.1:{port}",
        TOUCHPOINT_EXPORT_METRICS_PORT=str(metrics_port),
        TOUCHPOINT_EXPORT_SECRET_KEY=SecretBox.new_key(),
        TOUCHPOINT_EXPORT_WORKERS="2",
        TOUCHPOINT_EXPORT_CONSUME_CLICKS="false",
        TOUCHPOINT_EXPORT_REFRESH_SECONDS="0.2",
        TOUCHPOINT_EXPORT_POLL_SECONDS="0.1",
        TOUCHPOINT_EXPORT_MAINTENANCE_SECONDS="0.2",
        TOUCHPOINT_LOG_LEVEL="WARNING",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.export"], cwd=ROOT, env=env)  # noqa: ASYNC220
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(6)
    ]
    try:
        await pb_grpc.ExportServiceStub(channels[0]).CreateDestination(
            pb.CreateDestinationRequest(
                destination=pb.Destination(
                    kind=pb.DESTINATION_KIND_META_CAPI,
                    base_url=receivers.base_url,
                    settings={"dataset_id": "1"},
                    credentials={"access_token": "meta-token"},
                    enabled=True,
                )
            ),
            wait_for_ready=True,
            timeout=30,
        )
        when = datetime.now(UTC) - timedelta(hours=1)

        async def upload(i: int) -> int:
            convs = []
            for j in range(10):
                c = pb.OfflineConversion(
                    order_id=f"w{i}-{j}", value=5, currency="EUR", email=f"w{i}.{j}@example.com"
                )
                c.event_time.FromDatetime(when)
                convs.append(c)
            resp = await pb_grpc.ExportServiceStub(channels[i % len(channels)]).UploadOfflineConversions(
                pb.UploadOfflineConversionsRequest(source="proc", conversions=convs),
                wait_for_ready=True,
                timeout=30,
            )
            return resp.accepted

        assert sum(await asyncio.gather(*(upload(i) for i in range(30)))) == 300
        keys = {f"Purchase:w{i}-{j}" for i in range(30) for j in range(10)}
        await eventually(lambda: set(receivers.meta.effects) == keys, timeout=15)
        assert all(n == 1 for n in receivers.meta.deliveries.values())
        assert receivers.problems == []

        def scrape() -> str:
            return (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )

        async def counted() -> str | None:
            body = await asyncio.to_thread(scrape)
            return body if metric(body, "touchpoint_export_delivered_total{") == 300 else None

        body = await eventually(counted, timeout=10)
        # The supervisor's /metrics adds up every worker's counters...
        assert metric(body, 'touchpoint_export_conversions_total{outcome="accepted"}') == 300
        handled = 'touchpoint_export_rpc_handled_total{code="OK",method="UploadOfflineConversions"}'
        assert metric(body, handled) == 30
        # ...and keeps one outbox depth per destination, not one per worker.
        assert (
            len([line for line in body.splitlines() if line.startswith("touchpoint_export_outbox_depth{")])
            == 1
        )
        assert len(_children(proc.pid)) == 2
    finally:
        for ch in channels:
            await ch.close()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0
    await eventually(lambda: not _children(proc.pid), timeout=5)
