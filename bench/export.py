"""bench/export: offline conversions from intake to the platform's receiver.

    python -m bench.export [--n 100000] [--batch 1000] [--uploaders 4] [--split]

The export service runs as its own process (``python -m services.export``, as in production) on
a fresh Postgres. The bench uploads N conversions (email, phone, names, address, a gclid: the
full normalisation and hashing path) with UploadOfflineConversions in batches from a few
concurrent clients, while a local Meta Conversions API receiver records when each event arrives.
It prints conversions/s from the first upload to the last delivery, intake-only conversions/s,
and p50/p99 intake-to-delivery latency (from the upload's acknowledgement to the receiver).

Baseline, measured in the same run: the same receiver fed the same number of events directly
(batches of 1,000 over HTTP, no service, no database): the ceiling of the transport on this
machine. The ratio export/baseline says how much of it the service keeps. Target: ≥ 5,000
conversions/s at N = 100,000.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import UTC, datetime, timedelta

import aiohttp
import grpc
import orjson
from aiohttp import web

from bench.common import bench_postgres, free_port, percentile, start_service, stop, wait_grpc
from services.export.credentials import SecretBox
from touchpoint.export.v1 import export_service_pb2 as pb
from touchpoint.export.v1 import export_service_pb2_grpc as pb_grpc
from touchpoint.platform.testing import create_database


class Receiver:
    """A Meta-like endpoint that only records when each event id arrives (first time)."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.requests = 0
        self.done = asyncio.Event()
        self.expected = 0
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{version}/{dataset}/events", self._events)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"

    async def _events(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        now = time.monotonic()
        self.requests += 1
        for e in body["data"]:
            self.arrived.setdefault(e["event_id"], now)
        if self.expected and len(self.arrived) >= self.expected:
            self.done.set()
        return web.json_response({"events_received": len(body["data"])})

    def reset(self, expected: int) -> None:
        self.arrived.clear()
        self.requests = 0
        self.expected = expected
        self.done.clear()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def conversions(start: int, count: int, when: datetime) -> list[pb.OfflineConversion]:
    out = []
    for i in range(start, start + count):
        c = pb.OfflineConversion(
            order_id=f"o-{i:08d}",
            value=10 + i % 90,
            currency="USD",
            email=f"Buyer.{i}@Example.com",
            phone=f"+1 650 555 {i % 10000:04d}",
            first_name="Mary",
            last_name="Smith",
            city="San Francisco",
            state="CA",
            zip="94107",
            country="US",
            store_id=f"store-{i % 50}",
            gclid=f"gclid-{i}",
            time_zone="America/Los_Angeles",
        )
        c.event_time.FromDatetime(when)
        out.append(c)
    return out


async def baseline(receiver: Receiver, n: int, batch: int) -> float:
    """Events/s of posting N events straight to the receiver, batches of `batch`, 4 at a time."""
    receiver.reset(n)
    event = {"event_name": "Purchase", "event_time": 0, "action_source": "physical_store",
             "user_data": {"em": "0" * 64, "ph": "1" * 64}, "custom_data": {"value": 10.0, "currency": "usd"}}  # fmt: skip
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        sem = asyncio.Semaphore(4)

        async def post(start: int) -> None:
            data = [{**event, "event_id": f"b-{i}"} for i in range(start, min(n, start + batch))]
            async with (
                sem,
                session.post(f"{receiver.base_url}/v24.0/1/events", data=orjson.dumps({"data": data})) as r,
            ):
                await r.read()

        await asyncio.gather(*(post(s) for s in range(0, n, batch)))
    return n / (time.monotonic() - started)


async def run(n: int, batch: int, uploaders: int, split: bool) -> None:
    url, handle = bench_postgres()
    database_url = await create_database(url, prefix="tp_bench_export")
    receiver = Receiver()
    await receiver.start()
    base = await baseline(receiver, n, 1000)

    address = f"127.0.0.1:{free_port()}"
    env = {
        "TOUCHPOINT_DATABASE_URL": database_url,
        "TOUCHPOINT_EXPORT_METRICS_PORT": "0",
        "TOUCHPOINT_EXPORT_SECRET_KEY": SecretBox.new_key(),
        "TOUCHPOINT_EXPORT_CONSUME_CLICKS": "false",
        "TOUCHPOINT_EXPORT_POLL_SECONDS": "0.2",
        "TOUCHPOINT_DB_POOL_SIZE": "12",
        "TOUCHPOINT_EXPORT_CONCURRENCY": os.environ.get("TOUCHPOINT_EXPORT_CONCURRENCY", "4"),
    }
    if split:
        # Two replicas: one takes uploads only, the other only delivers (woken by NOTIFY).
        procs = [
            start_service(
                "export", {**env, "TOUCHPOINT_EXPORT_LISTEN": address, "TOUCHPOINT_EXPORT_DELIVER": "false"}
            ),
            start_service("export", {**env, "TOUCHPOINT_EXPORT_LISTEN": f"127.0.0.1:{free_port()}"}),
        ]
    else:
        procs = [start_service("export", {**env, "TOUCHPOINT_EXPORT_LISTEN": address})]
    try:
        await asyncio.to_thread(wait_grpc, address)
        async with grpc.aio.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as ch:
            stub = pb_grpc.ExportServiceStub(ch)
            await stub.CreateDestination(
                pb.CreateDestinationRequest(
                    destination=pb.Destination(
                        kind=pb.DESTINATION_KIND_META_CAPI,
                        base_url=receiver.base_url,
                        settings={"dataset_id": "1"},
                        credentials={"access_token": "bench"},
                        enabled=True,
                        requests_per_second=1000,
                    )
                )
            )
            when = datetime.now(UTC) - timedelta(hours=1)
            # Messages built before the clock starts: the bench measures the service, not itself.
            batches = [conversions(s, min(batch, n - s), when) for s in range(0, n, batch)]
            acked: dict[str, float] = {}
            receiver.reset(n)
            queue: asyncio.Queue[list[pb.OfflineConversion]] = asyncio.Queue()
            for b in batches:
                queue.put_nowait(b)

            async def uploader() -> None:
                while not queue.empty():
                    b = queue.get_nowait()
                    resp = await stub.UploadOfflineConversions(
                        pb.UploadOfflineConversionsRequest(source="bench", conversions=b), timeout=120
                    )
                    now = time.monotonic()
                    assert resp.accepted == len(b), resp.results[0]
                    for c in b:
                        acked[c.order_id] = now

            started = time.monotonic()
            await asyncio.gather(*(uploader() for _ in range(uploaders)))
            intake_done = time.monotonic()
            await asyncio.wait_for(receiver.done.wait(), timeout=max(120.0, n / 500))
            finished = max(receiver.arrived.values())
    finally:
        stop(procs)
        await receiver.stop()
        if handle is not None:
            handle.cleanup()  # type: ignore[attr-defined]

    latencies = [receiver.arrived[o] - t for o, t in acked.items()]
    rate = n / (finished - started)
    print(
        f"bench/export n={n} batch={batch} uploaders={uploaders} {'intake and delivery replicas' if split else 'one process'}"
    )
    print(f"  baseline (receiver fed directly): {base:,.0f} events/s")
    print(f"  intake only: {n / (intake_done - started):,.0f} conversions/s")
    print(
        f"  intake to delivery: {rate:,.0f} conversions/s ({rate / base:.2f} of baseline); "
        f"latency p50 {percentile(latencies, 50) * 1000:,.0f} ms, p99 {percentile(latencies, 99) * 1000:,.0f} ms; "
        f"{receiver.requests} requests"
    )
    print(f"  target >= 5,000 conversions/s: {'met' if rate >= 5000 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description="offline conversions from intake to the receiver")
    parser.add_argument("--n", type=int, default=100_000, help="conversions (default 100,000)")
    parser.add_argument("--batch", type=int, default=1000, help="conversions per upload request")
    parser.add_argument("--uploaders", type=int, default=4, help="concurrent upload clients")
    parser.add_argument("--split", action="store_true", help="an intake replica and a delivery replica")
    args = parser.parse_args()
    asyncio.run(run(args.n, args.batch, args.uploaders, args.split))


if __name__ == "__main__":
    main()
