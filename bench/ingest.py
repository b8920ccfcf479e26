"""bench/ingest: raw COPY vs IngestService batch writes vs the gateway's /v1/batch, one run.

    python -m bench.ingest [--events N] [--concurrency C] [--rounds R] [--workers W]

(a) one COPY of N prepared event rows into a table shaped like ingest.events (LIKE ... INCLUDING
ALL: same columns, defaults and indexes), the physical limit; (b) IngestService.WriteEvents with
100 messages per call from C concurrent clients, once with protobuf Events and once (b_json)
with the lean form of messages_json; (c) POST /v1/batch with 100 messages per
request from C concurrent HTTP clients through the gateway. Ingest and the gateway run as their
own processes, as in production. Request bodies are built before the clock starts, so the
figures measure the server side. Prints events/s of each, b/a, c/a, and p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import secrets
import statistics
import time
from datetime import UTC, datetime

import aiohttp
import asyncpg
import grpc
import orjson

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
from services.ingest import domain
from services.ingest.store import EVENT_COLUMNS, create_source
from touchpoint.events.v1 import event_pb2
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.platform.db import create_pool
from touchpoint.platform.testing import create_database

BATCH = 100
SENT_AT = "2026-11-29T10:00:01.000Z"


def message(i: int, run: str) -> dict[str, object]:
    """A realistic analytics.js-style track call (≈ 600 bytes of JSON)."""
    return {
        "type": "track",
        "messageId": f"{run}-{i}",
        "anonymousId": f"anon-{i % 5000}",
        "userId": f"user-{i % 2000}" if i % 3 == 0 else None,
        "event": "Product Viewed",
        "properties": {"product_id": f"sku-{i % 700}", "price": 19.99, "currency": "USD", "position": i % 10},
        "context": {
            "ip": "203.0.113.7",
            "userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15",
            "library": {"name": "analytics.js", "version": "2.11.1"},
            "locale": "en-US",
            "page": {
                "url": f"https://shop.example/p/{i % 700}?utm_campaign=national-toastday&utm_source=facebook"
                "&utm_medium=paid-social&fbclid=IwAR0abc",
                "path": f"/p/{i % 700}",
                "referrer": "https://www.facebook.com/",
                "title": "Toaster",
            },
        },
        "timestamp": "2026-11-29T10:00:00.000Z",
    }


def to_event(m: dict[str, object]) -> event_pb2.Event:
    e = event_pb2.Event(
        type=event_pb2.EVENT_TYPE_TRACK,
        message_id=str(m["messageId"]),
        anonymous_id=str(m["anonymousId"]),
        user_id=str(m["userId"] or ""),
        event=str(m["event"]),
        properties_json=orjson.dumps(m["properties"]),
        context_json=orjson.dumps(m["context"]),
    )
    e.original_timestamp.FromJsonString(str(m["timestamp"]))
    return e


def as_plain_values(row: tuple[object, ...]) -> tuple[object, ...]:
    """A prepared row with datetimes and plain JSON bytes, as any asyncpg client would send it
    (ingest's writer takes the binary forms, see domain.PgTime): the baseline stays the same."""
    return tuple(
        domain.from_pg_time(v) if type(v) is tuple else v[1:] if type(v) is bytes else v for v in row
    )


async def phase_copy(pool: asyncpg.Pool, n: int, run: str) -> float:
    await pool.execute("drop table if exists public.bench_copy")
    await pool.execute("create table public.bench_copy (like ingest.events including all)")
    source = domain.Source("bench", "default", True)
    now = datetime.now(UTC)
    rows = []
    for i in range(n):
        prepared = domain.prepare(to_event(message(i, run)), source=source, received_at=now, client_ip="")
        assert isinstance(prepared, domain.Prepared)
        rows.append(as_plain_values(prepared.row))
    async with pool.acquire() as conn:
        start = time.perf_counter()
        await conn.copy_records_to_table("bench_copy", columns=EVENT_COLUMNS, records=rows)
        elapsed = time.perf_counter() - start
    await pool.execute("drop table public.bench_copy")
    return n / elapsed


async def phase_grpc(
    addresses: list[str], write_key: str, n: int, run: str, concurrency: int, form: str = "events"
) -> tuple[float, list[float]]:
    """form "events": protobuf Events (typed clients); "json": the lean form (messages_json,
    one Segment JSON object per message, as the gateway sends). Either way the client asks for
    the exceptions only (omit_accepted_results), as a batch client that counts does."""
    bodies = []
    for start in range(0, n, BATCH):
        ids = range(start, min(n, start + BATCH))
        if form == "json":
            req = pb.WriteEventsRequest(
                write_key=write_key,
                messages_json=[orjson.dumps({**message(i, run), "sentAt": SENT_AT}) for i in ids],
                omit_accepted_results=True,
            )
        else:
            req = pb.WriteEventsRequest(
                write_key=write_key,
                events=[to_event(message(i, run)) for i in ids],
                omit_accepted_results=True,
            )
        bodies.append(req.SerializeToString())
    latencies: list[float] = []
    # Several connections, so that SO_REUSEPORT spreads them over ingest's worker processes.
    channels = [
        grpc.aio.insecure_channel(a, options=[("grpc.use_local_subchannel_pool", 1)])
        for a in addresses
        for _ in range(8)
    ]
    try:
        calls = [
            ch.unary_unary(
                "/touchpoint.ingest.v1.IngestService/WriteEvents",
                request_serializer=None,
                response_deserializer=pb.WriteEventsResponse.FromString,
            )
            for ch in channels
        ]
        queue = list(reversed(bodies))
        accepted = 0

        async def worker(k: int) -> None:
            nonlocal accepted
            call = calls[k % len(calls)]
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                resp = await call(body)
                latencies.append(time.perf_counter() - t0)
                accepted += resp.accepted

        t = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t
    finally:
        for ch in channels:
            await ch.close()
    assert accepted == n, f"gRPC phase stored {accepted} of {n}"
    return n / elapsed, latencies


async def phase_http(
    url: str, write_key: str, n: int, run: str, concurrency: int
) -> tuple[float, list[float]]:
    bodies = []
    for start in range(0, n, BATCH):
        batch = [message(i, run) for i in range(start, min(n, start + BATCH))]
        bodies.append(json.dumps({"batch": batch, "sentAt": SENT_AT}).encode())
    auth = "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()
    headers = {"Authorization": auth, "Content-Type": "application/json"}
    latencies: list[float] = []
    queue = list(reversed(bodies))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"gateway answered {resp.status}: {await resp.text()}")
                latencies.append(time.perf_counter() - t0)

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t
    return n / elapsed, latencies


def cpu_used(pids: list[int], postmaster: int | None) -> dict[str, float]:
    """cpu_seconds(), plus the CPU of the postmaster's backends that have exited (its children
    times): ingest closes idle writer connections, so backends come and go between phases."""
    import psutil

    out = cpu_seconds(pids)
    if postmaster is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(postmaster).cpu_times()
            out["postgres"] = out.get("postgres", 0.0) + t.children_user + t.children_system
    return out


async def count(pool: asyncpg.Pool, run: str) -> int:
    return int(await pool.fetchval("select count(*) from ingest.events where message_id like $1", run + "-%"))


def ms(values: list[float], p: float) -> str:
    return f"{percentile(values, p) * 1000:.1f} ms"


async def main(args: argparse.Namespace) -> None:
    server_url, handle = bench_postgres()
    url = await create_database(server_url, "tp_bench")
    ingest_port, gateway_port = free_port(), free_port()
    env = {"TOUCHPOINT_DATABASE_URL": url, "TOUCHPOINT_INGEST_LISTEN": f"127.0.0.1:{ingest_port}",
           "TOUCHPOINT_INGEST_METRICS_PORT": str(free_port())}  # fmt: skip
    env["TOUCHPOINT_INGEST_WORKERS"] = str(args.workers)
    procs = [start_service("ingest", env)]
    ingest_addrs = [f"127.0.0.1:{ingest_port}"]
    try:
        for addr in ingest_addrs:
            wait_grpc(addr)
        if args.gateway:
            procs.append(start_service("gateway", {
                "TOUCHPOINT_GATEWAY_LISTEN": f"127.0.0.1:{gateway_port}",
                "TOUCHPOINT_INGEST_ADDR": f"127.0.0.1:{ingest_port}",
            }))  # fmt: skip
            await wait_http(f"http://127.0.0.1:{gateway_port}/health")
        pool = await create_pool(url, max_size=4)
        key = "bench_" + secrets.token_hex(6)
        await create_source(pool, write_key=key, name="bench")
        pm = postmaster_pid(handle)
        pids = [p.pid for p in procs] + ([pm] if pm else [])
        # The phases are interleaved over several rounds (a b c a b c ...) and each phase's median
        # is used: on a shared machine, load from elsewhere then falls on every phase alike.
        n = args.events // args.rounds
        rates: dict[str, list[float]] = {"a": [], "b": [], "b_json": [], "c": []}
        for r in range(1, args.rounds + 1):
            a = await phase_copy(pool, n, "copy-" + secrets.token_hex(3))
            rates["a"].append(a)
            print(f"round {r}  (a) raw COPY                {a:10,.0f} events/s")

            for label, form in (("b", "events"), ("b_json", "json")):
                run_b = "grpc-" + secrets.token_hex(3)
                before = cpu_used(pids, pm)
                b, lat_b = await phase_grpc(ingest_addrs, key, n, run_b, args.concurrency, form)
                used = {k: v - before.get(k, 0.0) for k, v in cpu_used(pids, pm).items()}
                rates[label].append(b)
                stored_b = await count(pool, run_b)
                name = f"({label}) IngestService {form}"
                print(f"round {r}  {name:26s}{b:10,.0f} events/s   p50 {ms(lat_b, 50)}  p99 {ms(lat_b, 99)}"
                      f"   stored {stored_b}/{n}")  # fmt: skip
                print(
                    "          CPU µs per event: "
                    + ", ".join(f"{k} {v / n * 1e6:.1f}" for k, v in used.items())
                )

            if args.gateway:
                run_c = "http-" + secrets.token_hex(3)
                before = cpu_used(pids, pm)
                c, lat_c = await phase_http(
                    f"http://127.0.0.1:{gateway_port}/v1/batch", key, n, run_c, args.concurrency
                )
                used = {k: v - before.get(k, 0.0) for k, v in cpu_used(pids, pm).items()}
                rates["c"].append(c)
                stored_c = await count(pool, run_c)
                print(f"round {r}  (c) gateway /v1/batch       {c:10,.0f} events/s   p50 {ms(lat_c, 50)}  p99 {ms(lat_c, 99)}"
                      f"   stored {stored_c}/{n}")  # fmt: skip
                print(
                    "          CPU µs per event: "
                    + ", ".join(f"{k} {v / n * 1e6:.1f}" for k, v in used.items())
                )
        med = {k: statistics.median(v) for k, v in rates.items() if v}
        print(
            f"medians over {args.rounds} rounds: "
            + ", ".join(f"({k}) {v:,.0f} events/s" for k, v in med.items())
        )
        print(f"b/a = {med['b'] / med['a']:.2f}   (target >= 0.5; protobuf Events)")
        print(f"b_json/a = {med['b_json'] / med['a']:.2f}   (target >= 0.5; the lean JSON form)")
        if "c" in med:
            print(f"c/a = {med['c'] / med['a']:.2f}   (target >= 0.25)")
        await pool.close()
    finally:
        stop(procs)
        if handle is not None:
            handle.cleanup()  # type: ignore[attr-defined]


async def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer 200")
            await asyncio.sleep(0.1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=300_000, help="events per phase, over all rounds")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-gateway", dest="gateway", action="store_false")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three phases")
    parser.add_argument(
        "--workers", type=int, default=2, help="ingest worker processes (TOUCHPOINT_INGEST_WORKERS)"
    )
    import uvloop

    uvloop.run(main(parser.parse_args()))
