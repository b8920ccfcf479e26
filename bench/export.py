"""bench/export: offline conversions from intake to the platform's receiver.

    python -m bench.export [--n 100000] [--batch 1000] [--uploaders 4] [--split] [--workers 1]

The export service runs as its own process (``python -m services.export``, as in production) on
a fresh Postgres. The bench uploads N conversions (email, phone, names, address, a gclid: the
full normalisation and hashing path; every buyer has their own email, phone and last name, first
names, cities and zips repeat as in real customer lists) with UploadOfflineConversions in
batches of 1,000 from a few concurrent clients (one connection each), while a local Meta
Conversions API receiver records when each event arrives. It prints conversions/s from the first
upload to the last delivery, intake-only conversions/s, p50/p99 intake-to-delivery latency (from
the upload's acknowledgement to the receiver), and the CPU each process spent per conversion
(the service, Postgres with all its backends, the bench itself), which moves far less with the
machine's load than the rates do.

Baseline, measured in the same run, before and after: the same receiver fed the same number of
events directly (batches of 1,000 over HTTP, no service, no database): the ceiling of the
transport on this machine. The ratio export/baseline says how much of it the service keeps.
Target: ≥ 5,000 conversions/s at N = 100,000.
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

from bench.common import (
    bench_postgres,
    cpu_seconds,
    free_port,
    percentile,
    postmaster_pid,
    start_service,
    stop,
    wait_grpc,
)
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


FIRST_NAMES = (
    "Mary", "James", "Patricia", "John", "Jennifer", "Robert", "Linda", "Michael", "Elizabeth", "David",
    "Barbara", "William", "Susan", "Richard", "Jessica", "Joseph", "Sarah", "Thomas", "Karen", "Charles",
    "María", "José", "Wei", "Aisha", "Łukasz", "Chloé", "Mohammed", "Priya", "Kenji", "Olga",
)  # fmt: skip
CITIES = (
    ("San Francisco", "CA", 94100), ("Oakland", "CA", 94600), ("San Jose", "CA", 95100),
    ("Los Angeles", "CA", 90000), ("New York", "NY", 10000), ("Brooklyn", "New York", 11200),
    ("Austin", "TX", 78700), ("Houston", "Texas", 77000), ("Seattle", "WA", 98100), ("St. Louis", "MO", 63100),
)  # fmt: skip


def _letters(i: int) -> str:
    """A distinct run of letters per number (a last name no other buyer of the bench has)."""
    out = ""
    while True:
        i, r = divmod(i, 26)
        out += "abcdefghijklmnopqrstuvwxyz"[r]
        if not i:
            return out


def conversions(start: int, count: int, when: datetime) -> list[pb.OfflineConversion]:
    """Buyers as a till sends them: every one with its own email, phone and last name; first
    names, cities, states and zips repeat as they do in real customer lists."""
    out = []
    for i in range(start, start + count):
        city, state, zip_base = CITIES[i % len(CITIES)]
        c = pb.OfflineConversion(
            order_id=f"o-{i:08d}",
            value=10 + i % 90,
            currency="USD",
            email=f"Buyer.{i}@Example.com",
            phone=f"+1 650 {200 + i // 10000 % 800:03d} {i % 10000:04d}",
            first_name=FIRST_NAMES[i * 7 % len(FIRST_NAMES)],
            last_name=f"Smith-{_letters(i).title()}",
            city=city,
            state=state,
            zip=f"{zip_base + i % 97:05d}",
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


async def run(n: int, batch: int, uploaders: int, split: bool, workers: int) -> None:
    url, handle = bench_postgres()
    database_url = await create_database(url, prefix="tp_bench_export")
    receiver = Receiver()
    await receiver.start()
    base_before = await baseline(receiver, n, 1000)

    address = f"127.0.0.1:{free_port()}"
    env = {
        "TOUCHPOINT_DATABASE_URL": database_url,
        "TOUCHPOINT_EXPORT_METRICS_PORT": "0",
        "TOUCHPOINT_EXPORT_SECRET_KEY": SecretBox.new_key(),
        "TOUCHPOINT_EXPORT_CONSUME_CLICKS": "false",
        "TOUCHPOINT_EXPORT_POLL_SECONDS": "0.2",
        "TOUCHPOINT_EXPORT_REFRESH_SECONDS": "0.5",
        "TOUCHPOINT_EXPORT_WORKERS": str(workers),
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
    # Every uploader is its own client, with its own connection.
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    try:
        await asyncio.to_thread(wait_grpc, address)
        async with grpc.aio.insecure_channel(address, options=options) as ch:
            await pb_grpc.ExportServiceStub(ch).CreateDestination(
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
        await asyncio.sleep(1.0)  # every worker's lanes know the destination (reloaded on change)
        when = datetime.now(UTC) - timedelta(hours=1)
        # Messages built before the clock starts: the bench measures the service, not itself.
        batches = [conversions(s, min(batch, n - s), when) for s in range(0, n, batch)]
        acked: dict[str, float] = {}
        receiver.reset(n)
        queue: asyncio.Queue[list[pb.OfflineConversion]] = asyncio.Queue()
        for b in batches:
            queue.put_nowait(b)
        channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(uploaders)]
        for c in channels:
            await c.channel_ready()

        async def uploader(ch: grpc.aio.Channel) -> None:
            stub = pb_grpc.ExportServiceStub(ch)
            while not queue.empty():
                b = queue.get_nowait()
                resp = await stub.UploadOfflineConversions(
                    pb.UploadOfflineConversionsRequest(source="bench", conversions=b), timeout=120
                )
                now = time.monotonic()
                assert resp.accepted == len(b), resp.results[0]
                for c in b:
                    acked[c.order_id] = now

        pids = [p.pid for p in procs] + ([pm] if (pm := postmaster_pid(handle)) else [])
        cpu_before = cpu_seconds(pids)
        own_before = time.process_time()
        started = time.monotonic()
        await asyncio.gather(*(uploader(c) for c in channels))
        intake_done = time.monotonic()
        await asyncio.wait_for(receiver.done.wait(), timeout=max(120.0, n / 500))
        finished = max(receiver.arrived.values())
        cpu_used = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_seconds(pids).items()}
        cpu_used["bench (uploaders and receiver)"] = time.process_time() - own_before
        for c in channels:
            await c.close()
        latencies = [receiver.arrived[o] - t for o, t in acked.items()]
        # The baseline again, after: the machine is shared, and its load moves during a run.
        base_after = await baseline(receiver, n, 1000)
    finally:
        stop(procs)
        await receiver.stop()
        if handle is not None:
            handle.cleanup()  # type: ignore[attr-defined]

    rate = n / (finished - started)
    base = (base_before + base_after) / 2
    mode = "intake and delivery replicas" if split else f"workers={workers}"
    print(
        f"bench/export n={n} batch={batch} uploaders={uploaders} {mode}; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"  baseline (the receiver fed directly, batches of 1,000): {base:,.0f} events/s "
        f"(before {base_before:,.0f}, after {base_after:,.0f})"
    )
    print(f"  intake only: {n / (intake_done - started):,.0f} conversions/s")
    print(
        f"  intake to delivery: {rate:,.0f} conversions/s = {rate / base:.3f} of baseline; "
        f"latency intake ack to receiver p50 {percentile(latencies, 50) * 1000:,.0f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:,.0f} ms; {receiver.requests} requests"
    )
    total = sum(cpu_used.values())
    cores = os.cpu_count() or 1
    print(
        "  CPU µs per conversion: "
        + ", ".join(f"{k} {v / n * 1e6:,.0f}" for k, v in cpu_used.items())
        + f"; all together {total / n * 1e6:,.0f}, i.e. {cores} idle cores would carry"
        f" {cores * n / total:,.0f} conversions/s"
    )
    print(f"  target >= 5,000 conversions/s: {'met' if rate >= 5000 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description="offline conversions from intake to the receiver")
    parser.add_argument("--n", type=int, default=100_000, help="conversions (default 100,000)")
    parser.add_argument("--batch", type=int, default=1000, help="conversions per upload request")
    parser.add_argument("--uploaders", type=int, default=4, help="concurrent upload clients")
    parser.add_argument("--split", action="store_true", help="an intake replica and a delivery replica")
    parser.add_argument("--workers", type=int, default=1, help="export worker processes behind one port")
    args = parser.parse_args()
    asyncio.run(run(args.n, args.batch, args.uploaders, args.split, args.workers))


if __name__ == "__main__":
    main()
