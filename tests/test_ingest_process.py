"""`python -m services.ingest` as operators run it: worker processes behind one port, one
/metrics for all of them, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import asyncpg
import grpc

from bench.common import free_port
from services.ingest.app import IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.events.v1 import event_pb2 as ev
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from touchpoint.platform.testing import eventually

ROOT = Path(__file__).resolve().parents[1]


def metric(body: str, line_prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(line_prefix))


async def test_two_workers_share_the_port_and_the_metrics(pool: asyncpg.Pool, database_url: str) -> None:
    app = await start_ingest(pool, IngestSettings.for_tests())  # migrations, so the source can be made first
    await app.stop()
    key = "wk_" + secrets.token_hex(6)
    sid = await create_source(pool, write_key=key, name="proc")
    port, metrics_port = free_port(), free_port()
    env = dict(
        os.environ,
        TOUCHPOINT_DATABASE_URL=database_url,
        TOUCHPOINT_INGEST_LISTEN=f"127.0.0.1:{port}",
        TOUCHPOINT_INGEST_METRICS_PORT=str(metrics_port),
        TOUCHPOINT_INGEST_WORKERS="2",
        TOUCHPOINT_LOG_LEVEL="WARNING",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.ingest"], cwd=ROOT, env=env)  # noqa: ASYNC220
    try:
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(6)
        ]

        async def write(i: int) -> int:
            stub = pb_grpc.IngestServiceStub(channels[i % len(channels)])
            events = [
                ev.Event(type=ev.EVENT_TYPE_TRACK, event="E", user_id="u", message_id=f"p{i}-{j}")
                for j in range(10)
            ]
            resp = await stub.WriteEvents(
                pb.WriteEventsRequest(write_key=key, events=events), wait_for_ready=True, timeout=30
            )
            return resp.accepted

        assert sum(await asyncio.gather(*(write(i) for i in range(30)))) == 300
        for ch in channels:
            await ch.close()
        assert await pool.fetchval("select count(*) from ingest.events where source_id = $1", sid) == 300

        def scrape() -> str:
            return (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )

        body = await asyncio.to_thread(scrape)
        assert metric(body, 'touchpoint_ingest_messages_total{outcome="accepted"}') == 300
        # The supervisor's /metrics adds up every worker's counters.
        assert metric(body, 'touchpoint_ingest_rpc_handled_total{code="OK",method="WriteEvents"}') == 30
        assert len(_children(proc.pid)) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    assert code == 0
    await eventually(lambda: not _children(proc.pid), timeout=5)


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children() if c.is_running() and c.status() != "zombie"]
    except psutil.NoSuchProcess:
        return []
