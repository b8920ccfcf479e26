"""`python -m services.identity` with worker processes: the first applies the event log off the
shared port, the others answer the API on it, and the supervisor's /metrics adds them up."""

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
import psutil

from bench.common import free_port
from services.ingest.app import IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.events.v1 import event_pb2 as ev
from touchpoint.identity.v1 import identity_service_pb2 as pb
from touchpoint.identity.v1 import identity_service_pb2_grpc as pb_grpc
from touchpoint.ingest.v1 import ingest_service_pb2 as ingest_pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from touchpoint.platform.testing import eventually

ROOT = Path(__file__).resolve().parents[1]


def metric(body: str, line_prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(line_prefix))


async def test_workers_share_the_port_and_one_applies_the_log(pool: asyncpg.Pool, database_url: str) -> None:
    ingest = await start_ingest(pool, IngestSettings.for_tests())
    space, key = "sp_" + secrets.token_hex(4), "wk_" + secrets.token_hex(6)
    await create_source(pool, write_key=key, name="web", space_id=space)
    port, metrics_port = free_port(), free_port()
    env = dict(
        os.environ,
        TOUCHPOINT_DATABASE_URL=database_url,
        TOUCHPOINT_INGEST_ADDR=ingest.address,
        TOUCHPOINT_IDENTITY_LISTEN=f"127.0.0.1:{port}",
        TOUCHPOINT_IDENTITY_METRICS_PORT=str(metrics_port),
        TOUCHPOINT_IDENTITY_WORKERS="3",
        TOUCHPOINT_LOG_LEVEL="WARNING",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.identity"], cwd=ROOT, env=env)  # noqa: ASYNC220
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(6)
    ]
    try:
        people = 20
        events = []
        for i in range(people):
            e = ev.Event(
                type=ev.EVENT_TYPE_IDENTIFY, user_id=f"u{i}", anonymous_id=f"a{i}", message_id=f"m{i}"
            )
            e.timestamp.GetCurrentTime()
            events.append(e)
        async with grpc.aio.insecure_channel(ingest.address) as ch:
            resp = await ingest_grpc.IngestServiceStub(ch).WriteEvents(
                ingest_pb.WriteEventsRequest(write_key=key, events=events)
            )
        assert resp.accepted == people

        async def resolve(i: int) -> str:
            stub = pb_grpc.IdentityServiceStub(channels[i % len(channels)])
            got = await stub.ResolveProfile(
                pb.ResolveProfileRequest(
                    space_id=space, identifier=ev.Identifier(kind="anonymous_id", value=f"a{i}")
                ),
                wait_for_ready=True,
                timeout=30,
            )
            return got.profile

        async def stitched() -> bool:
            try:
                await resolve(people - 1)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                raise
            return True

        await eventually(stitched, timeout=30, message="the log was not applied")
        profiles = await asyncio.gather(*(resolve(i) for i in range(people)))
        by_user = await asyncio.gather(
            *(
                pb_grpc.IdentityServiceStub(channels[i % len(channels)]).ResolveProfile(
                    pb.ResolveProfileRequest(
                        space_id=space, identifier=ev.Identifier(kind="user_id", value=f"u{i}")
                    )
                )
                for i in range(people)
            )
        )
        assert profiles == [r.profile for r in by_user] and len(set(profiles)) == people

        # One worker applies the log: one connection of the service listens for its wake-ups,
        # and it is not on the port (two API workers took every call).
        listeners = await pool.fetchval(
            """select count(*) from pg_stat_activity
               where datname = current_database() and query ilike 'listen%touchpoint_event_log%'"""
        )
        assert listeners == 1
        on_port = {}
        for child in psutil.Process(proc.pid).children():
            index = child.environ()["TOUCHPOINT_WORKER_INDEX"]
            on_port[index] = any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")
            )
        assert on_port == {"0": False, "1": True, "2": True}

        def scrape() -> str:
            return (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )

        body = await asyncio.to_thread(scrape)
        assert (
            metric(body, 'touchpoint_identity_rpc_handled_total{code="OK",method="ResolveProfile"}')
            == 2 * people + 1  # and the one that saw the log applied
        )
        assert metric(body, 'touchpoint_eventlog_consumer_applied_total{consumer="identity"}') == people
    finally:
        for ch in channels:
            await ch.close()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        await ingest.stop()
    assert code == 0


async def test_the_api_frees_grpcs_leftovers_in_small_collections(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """grpc.aio leaves a small reference cycle behind every call; the service's young threshold
    (services.identity.__main__.API_GC_YOUNG) has the collector free them a few hundred calls
    at a time, not 10,000 at once (a 34-77 ms pause for every call in flight). Read from the
    process's own collector counters on /metrics."""
    from services.identity.__main__ import API_GC_YOUNG

    ingest = await start_ingest(pool, IngestSettings.for_tests())
    space, key = "sp_" + secrets.token_hex(4), "wk_" + secrets.token_hex(6)
    await create_source(pool, write_key=key, name="web", space_id=space)
    port, metrics_port = free_port(), free_port()
    env = dict(
        os.environ,
        TOUCHPOINT_DATABASE_URL=database_url,
        TOUCHPOINT_INGEST_ADDR=ingest.address,
        TOUCHPOINT_IDENTITY_LISTEN=f"127.0.0.1:{port}",
        TOUCHPOINT_IDENTITY_METRICS_PORT=str(metrics_port),
        TOUCHPOINT_LOG_LEVEL="WARNING",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("TOUCHPOINT_IDENTITY_WORKERS", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.identity"], cwd=ROOT, env=env)  # noqa: ASYNC220
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        e = ev.Event(type=ev.EVENT_TYPE_IDENTIFY, user_id="u1", anonymous_id="a1", message_id="m1")
        e.timestamp.GetCurrentTime()
        async with grpc.aio.insecure_channel(ingest.address) as ch:
            resp = await ingest_grpc.IngestServiceStub(ch).WriteEvents(
                ingest_pb.WriteEventsRequest(write_key=key, events=[e])
            )
        assert resp.accepted == 1
        stub = pb_grpc.IdentityServiceStub(channel)
        request = pb.ResolveProfileRequest(
            space_id=space, identifier=ev.Identifier(kind="user_id", value="u1")
        )

        async def stitched() -> bool:
            try:
                await stub.ResolveProfile(request, wait_for_ready=True, timeout=30)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return False
                raise
            return True

        await eventually(stitched, timeout=30, message="the log was not applied")

        def scrape() -> tuple[float, float]:
            body = (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )
            return (
                metric(body, 'python_gc_collections_total{generation="0"}'),
                metric(body, 'python_gc_objects_collected_total{generation="0"}'),
            )

        runs0, freed0 = await asyncio.to_thread(scrape)
        calls = 3000

        async def caller(n: int) -> None:
            for _ in range(n):
                await stub.ResolveProfile(request, timeout=30)

        await asyncio.gather(*(caller(calls // 8) for _ in range(8)))
        runs1, freed1 = await asyncio.to_thread(scrape)
        runs, freed = runs1 - runs0, freed1 - freed0
        # Thousands of objects were left to collect (five a call), in several collections of
        # about API_GC_YOUNG each (a collection starts once the young generation holds one object
        # more, and frees those of them that are garbage); with tune_gc's default (50,000) there
        # would be none yet.
        assert freed >= 2 * calls, (runs, freed)
        assert runs > 0 and freed / runs <= 1.25 * API_GC_YOUNG, (runs, freed)
    finally:
        await channel.close()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        await ingest.stop()
    assert code == 0
