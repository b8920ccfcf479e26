"""bench/load: the gateway (HTTP /v1/batch) and the gRPC API (IngestService.WriteEvents) driven
at a fixed offered rate for a bounded time; achieved throughput, latency and loss.

    python -m bench.load --rate R --seconds S [--batch N] [--workers W]

Open loop: request i of each API is sent at t0 + i/R whether or not the earlier ones have been
answered, so a slow server meets the same offered load as a fast one (no coordinated omission),
and latency is measured from the time a request was due, not from when the client got round to
sending it. Ingest and the gateway run as their own processes on loopback (127.0.0.1), against a
fresh embedded Postgres (or TOUCHPOINT_BENCH_DATABASE_URL). Request bodies are built before the
clock starts; every message has its own messageId.

Loss is counted after the run: every message of a request answered 200 / accepted must be in
ingest.events exactly once. Messages of failed requests (errors, timeouts) are reported apart:
a client would resend them. The exit status is 1 when anything accepted was lost or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import orjson

from bench.common import bench_postgres, free_port, percentile, start_service, stop, wait_grpc
from bench.ingest import message, to_event, wait_http
from services.ingest.store import create_source
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.platform.db import create_pool
from touchpoint.platform.testing import create_database

# Requests of one API in flight at most; past it a due request is counted as shed by the
# client (the load generator itself would be the bottleneck).
MAX_IN_FLIGHT = 4096


@dataclass
class ApiRun:
    """What one API was offered and what it answered."""

    name: str
    bodies: list[bytes]
    ids: list[list[str]]
    latencies: list[float] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    errors: dict[str, int] = field(default_factory=dict)
    shed: int = 0
    in_flight: int = 0
    last_answer: float = 0.0

    def error(self, what: str, ids: list[str]) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        self.failed.update(ids)


def build(run: str, api: str, n: int, batch: int, write_key: str) -> tuple[list[bytes], list[list[str]]]:
    """n request bodies of `batch` messages each, and their messageIds."""
    bodies, ids = [], []
    for i in range(n):
        msgs = [message(j, f"{run}-{api}-{i}") for j in range(batch)]
        ids.append([str(m["messageId"]) for m in msgs])
        if api == "http":
            bodies.append(orjson.dumps({"batch": msgs, "sentAt": "2026-11-29T10:00:01.000Z"}))
        else:
            req = pb.WriteEventsRequest(write_key=write_key, events=[to_event(m) for m in msgs])
            bodies.append(req.SerializeToString())
    return bodies, ids


async def drive(
    run: ApiRun, rate: float, t0: float, send: Callable[[int, float], Coroutine[Any, Any, None]]
) -> None:
    """Sends request i at t0 + i/rate, without waiting for earlier answers."""
    tasks: set[asyncio.Task[None]] = set()
    for i in range(len(run.bodies)):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if run.in_flight >= MAX_IN_FLIGHT:
            run.shed += 1
            run.failed.update(run.ids[i])
            continue
        run.in_flight += 1
        task = asyncio.create_task(send(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=60)


async def http_api(run: ApiRun, url: str, write_key: str, rate: float, t0: float, timeout: float) -> None:
    headers = {
        "Authorization": "Basic " + base64.b64encode(f"{write_key}:".encode()).decode(),
        "Content-Type": "application/json",
    }
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:

        async def send(i: int, due: float) -> None:
            try:
                async with session.post(url, data=run.bodies[i], headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        run.accepted.update(run.ids[i])
                        run.latencies.append(time.perf_counter() - due)
                    else:
                        run.error(f"HTTP {resp.status}", run.ids[i])
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.error(type(exc).__name__, run.ids[i])
            finally:
                run.in_flight -= 1
                run.last_answer = time.perf_counter()

        await drive(run, rate, t0, send)


async def grpc_api(run: ApiRun, address: str, rate: float, t0: float, timeout: float) -> None:
    # Several connections, so that SO_REUSEPORT spreads them over ingest's worker processes.
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)
    ]
    calls = [
        ch.unary_unary(
            "/touchpoint.ingest.v1.IngestService/WriteEvents",
            request_serializer=None,
            response_deserializer=pb.WriteEventsResponse.FromString,
        )
        for ch in channels
    ]
    try:

        async def send(i: int, due: float) -> None:
            try:
                resp = await calls[i % len(calls)](run.bodies[i], timeout=timeout)
                if resp.accepted + resp.duplicates == len(run.ids[i]):
                    run.accepted.update(run.ids[i])
                    run.latencies.append(time.perf_counter() - due)
                else:
                    run.error("not all accepted", run.ids[i])
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                run.error(f"gRPC {code.name if code else exc}", run.ids[i])
            finally:
                run.in_flight -= 1
                run.last_answer = time.perf_counter()

        await drive(run, rate, t0, send)
    finally:
        for ch in channels:
            await ch.close()


async def run_apis(
    runs: dict[str, ApiRun], key: str, rate: float, gateway_port: int, ingest_port: int, timeout: float
) -> float:
    """Drives every API of `runs` at once; returns the start time t0."""
    t0 = time.perf_counter() + 0.2
    jobs = []
    if "http" in runs:
        jobs.append(
            http_api(runs["http"], f"http://127.0.0.1:{gateway_port}/v1/batch", key, rate, t0, timeout)
        )
    if "grpc" in runs:
        jobs.append(grpc_api(runs["grpc"], f"127.0.0.1:{ingest_port}", rate, t0, timeout))
    await asyncio.gather(*jobs)
    return t0


def ms(values: list[float], p: float) -> str:
    return f"{percentile(values, p) * 1000:8.1f}" if values else "       -"


async def main(args: argparse.Namespace) -> int:
    server_url, handle = bench_postgres()
    url = await create_database(server_url, "tp_load")
    ingest_port, gateway_port = free_port(), free_port()
    env = {
        "TOUCHPOINT_DATABASE_URL": url,
        "TOUCHPOINT_INGEST_LISTEN": f"127.0.0.1:{ingest_port}",
        "TOUCHPOINT_INGEST_METRICS_PORT": str(free_port()),
        "TOUCHPOINT_INGEST_WORKERS": str(args.workers),
    }
    procs = [start_service("ingest", env)]
    try:
        wait_grpc(f"127.0.0.1:{ingest_port}")
        procs.append(
            start_service(
                "gateway",
                {
                    "TOUCHPOINT_GATEWAY_LISTEN": f"127.0.0.1:{gateway_port}",
                    "TOUCHPOINT_INGEST_ADDR": f"127.0.0.1:{ingest_port}",
                },
            )
        )
        await wait_http(f"http://127.0.0.1:{gateway_port}/health")
        pool = await create_pool(url, max_size=4)  # ingest has applied its migrations by now
        key = "load_" + secrets.token_hex(6)
        source_id = await create_source(pool, write_key=key, name="bench-load")

        apis = [a for a in ("http", "grpc") if a in args.apis.split(",")]
        # Warm-up, not measured: connections opened, caches and code paths warm, own source.
        warm_key = "load_warm_" + secrets.token_hex(6)
        await create_source(pool, write_key=warm_key, name="bench-load-warmup")
        warm = {api: ApiRun(api, *build("warm", api, 20, args.batch, warm_key)) for api in apis}
        await run_apis(warm, warm_key, 20.0, gateway_port, ingest_port, args.timeout)

        n = max(1, round(args.rate * args.seconds))
        run_id = "load-" + secrets.token_hex(3)
        runs = {api: ApiRun(api, *build(run_id, api, n, args.batch, key)) for api in apis}
        print(
            f"offering {args.rate:g} requests/s x {args.batch} events to each of {', '.join(apis)} "
            f"for {args.seconds:g} s ({n} requests each), open loop"
        )
        t0 = time.perf_counter() + 0.2
        jobs = []
        if "http" in runs:
            jobs.append(
                http_api(
                    runs["http"],
                    f"http://127.0.0.1:{gateway_port}/v1/batch",
                    key,
                    args.rate,
                    t0,
                    args.timeout,
                )
            )
        if "grpc" in runs:
            jobs.append(grpc_api(runs["grpc"], f"127.0.0.1:{ingest_port}", args.rate, t0, args.timeout))
        await asyncio.gather(*jobs)

        stored_rows = await pool.fetch(
            "select message_id, count(*) as n from ingest.events where source_id = $1 group by message_id",
            source_id,
        )
        stored = {r["message_id"] for r in stored_rows}
        duplicated = sum(1 for r in stored_rows if r["n"] > 1)
        await pool.close()

        print(
            f"\n{'api':5} {'offered/s':>10} {'achieved/s':>11} {'events/s':>10} {'ok':>7} {'failed':>7} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'p999 ms':>8} {'accepted':>9} {'lost':>5}"
        )
        lost_total = 0
        for api, r in runs.items():
            ok = len(r.latencies)
            span = max(r.last_answer - t0, args.seconds)
            lost = len(r.accepted - stored)
            lost_total += lost
            failed = sum(r.errors.values()) + r.shed
            print(
                f"{api:5} {args.rate:10.1f} {ok / span:11.1f} {ok * args.batch / span:10.0f} {ok:7d} {failed:7d} "
                f"{ms(r.latencies, 50)} {ms(r.latencies, 99)} {ms(r.latencies, 99.9)} {len(r.accepted):9d} {lost:5d}"
            )
            if r.errors or r.shed:
                details = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items()))
                committed = len(r.failed & stored)
                print(
                    f"      failures: {details}{', shed by the client: ' + str(r.shed) if r.shed else ''}; "
                    f"{committed} of their {len(r.failed)} messages were committed anyway (a retry dedups them)"
                )
        sent = {i for r in runs.values() for ids in r.ids for i in ids}
        strangers = len(stored - sent)
        print(
            f"\nloss (accepted but not stored): {lost_total}; stored twice: {duplicated}; "
            f"stored but never sent: {strangers}"
        )
        return 1 if lost_total or duplicated or strangers else 0
    finally:
        stop(procs)
        if handle is not None:
            handle.cleanup()  # type: ignore[attr-defined]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second offered to each API")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the load is offered")
    parser.add_argument("--batch", type=int, default=20, help="events per request")
    parser.add_argument("--apis", default="http,grpc", help="which APIs to drive: http, grpc or both")
    parser.add_argument(
        "--workers", type=int, default=1, help="ingest worker processes (TOUCHPOINT_INGEST_WORKERS)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds a request may take")
    cli_args = parser.parse_args()
    if cli_args.rate <= 0 or cli_args.seconds <= 0 or cli_args.batch < 1:
        parser.error("--rate and --seconds must be positive, --batch at least 1")
    if cli_args.rate * cli_args.seconds > 1_000_000:
        parser.error("at most a million requests per API")
    import uvloop

    raise SystemExit(uvloop.run(main(cli_args)))
