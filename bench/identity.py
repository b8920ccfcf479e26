"""bench/identity: stitching rate against a plain union-find, and ResolveProfile latency.

    python -m bench.identity [--events N] [--late F] [--batch-size B] [--concurrency C] [--resolves R]
                             [--extra E] [--rate Q] [--rate-seconds S] [--workers W]
                             [--context browser|minimal] [--apply-only] [--statements]

N events (default 1,000,000) of N/5 people go into ingest.events by COPY (this is a bench:
it skips the ingest API). Each person has 5 identifiers (a user id, an email, three browsers'
anonymous ids) and 5 events: two anonymous page views, an identify (user id + first browser +
email), two tracks (user id + the other browsers); so N identifiers stitch into N/5 profiles.
People interleave in time, and a fraction F of the events (default 1 %) carries a timestamp 10
minutes earlier than its place in the log: late events that make their component recompute.
Each event carries the context analytics.js sends from a page (--context browser, 800 bytes of
JSON) or only a library name and a short user agent (--context minimal, the bench before
2026-11-29).

(a) a plain in-memory union-find over the same links (each event's identifiers), the baseline;
(b) the identity consumer applying the log to Postgres (in this process, uvloop and the garbage
    collector's settings as the service runs it): events applied per second, and the ratio b/a.
    The loaded log first gets the VACUUM (ANALYZE) and CHECKPOINT a bulk load ends with (a
    replay reads a log written and maintained before); the consumer's own tables get none;
(c) ResolveProfile p50/p99 (closed loop: C callers back to back, which measures the saturation
    throughput; then open loop: calls sent at a fixed offered rate, --rate (default 500/s), the
    latency a caller sees under that load, counted from each call's scheduled time, and for
    (c1) also from its actual send, the timers' lateness left out) against an
    API replica of the identity service started as its own process (`python -m
    services.identity`, not consuming; --workers W processes behind its port), R calls on
    random identifiers: (c1) alone, then (c2) while a consumer replica (its own process too)
    applies E more events (of other people) loaded after (b). Before (c) the loaded tables get
    the VACUUM (ANALYZE) and CHECKPOINT an operator's bulk load ends with, and the replica's
    first profile-metrics scan is let pass, so that neither lands in the measurement.
CPU is reported per process (this process's consumer, the postgres cluster, the replicas; for
(c1) per call, with what other programs on the machine used meanwhile) so a busy machine shows
as wall time, not as cost; after (b), each process's share of the wall time and the most events/s
the cores allow at that CPU per event. --statements adds, for (b), each statement's calls, wall
time and Postgres CPU per event (bench/statements.py). Targets: (b) >= 20,000 events/s; (c) p99
<= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import orjson
from prometheus_client import REGISTRY

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
from bench.statements import StatementProfile
from services.identity.app import MIGRATIONS as IDENTITY_MIGRATIONS
from services.identity.app import IdentitySettings
from services.identity.domain import Extractor
from services.identity.stitcher import CONSUMER, Stitcher
from services.ingest.app import MIGRATIONS as INGEST_MIGRATIONS
from services.ingest.store import EVENT_COLUMNS, create_source, ensure_partitions
from touchpoint.events.v1 import event_pb2
from touchpoint.identity.v1 import identity_service_pb2 as pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc
from touchpoint.platform.db import create_pool, migrate, sibling_pool
from touchpoint.platform.eventlog import LogConsumer, LogEvent
from touchpoint.platform.server import tune_gc
from touchpoint.platform.testing import create_database

SPACE = "bench"
PER_PERSON = 5
STEP = timedelta(seconds=60)  # between one person's events
CHUNK = 2_000  # rows per COPY transaction, as ingest commits them


def stream(n: int, late: float, seed: int, first: int = 0) -> Iterator[tuple[int, int, datetime, bool]]:
    """(person, step, event time, late) in log order: people start one after another and their
    five events, a minute apart, interleave with the others'. People are numbered from `first`."""
    people = max(1, n // PER_PERSON)
    base = datetime.now(UTC) - timedelta(days=2)
    spacing = timedelta(days=1) / people
    order = sorted((i * spacing + k * STEP, first + i, k) for i in range(people) for k in range(PER_PERSON))
    rng = random.Random(seed)
    for offset, i, k in order[:n]:
        is_late = rng.random() < late
        t = base + offset - (timedelta(minutes=10) if is_late else timedelta(0))
        yield i, k, t, is_late


def identifiers(i: int, k: int) -> tuple[str | None, str, dict[str, str] | None]:
    """(user id, anonymous id, traits) of person i's k-th event."""
    if k < 2:
        return None, f"a{i}-{k}", None
    if k == 2:
        return f"u{i}", f"a{i}-0", {"email": f"p{i}@bench.example", "plan": "free"}
    return f"u{i}", f"a{i}-{k - 2}", None


# The context of each event: "browser" is what analytics.js sends from a page (800 bytes: library,
# page, userAgent and its client hints, locale, campaign, ip, screen), of which identity reads
# only the user agent; "minimal" (what this bench used until 2026-11-29) is the library and a
# short user agent.
CONTEXTS = {
    "browser": {
        "library": {"name": "analytics.js", "version": "next-1.64.0"},
        "page": {
            "path": "/pricing",
            "referrer": "https://www.google.com/",
            "search": "?utm_source=google&utm_medium=cpc&utm_campaign=spring",
            "title": "Pricing - Example",
            "url": "https://www.example.com/pricing?utm_source=google&utm_medium=cpc&utm_campaign=spring",
        },
        "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
        "userAgentData": {
            "brands": [
                {"brand": "Not_A Brand", "version": "8"},
                {"brand": "Chromium", "version": "120"},
                {"brand": "Google Chrome", "version": "120"},
            ],
            "mobile": False,
            "platform": "macOS",
        },
        "locale": "en-US",
        "timezone": "Europe/Berlin",
        "campaign": {"source": "google", "medium": "cpc", "name": "spring"},
        "ip": "203.0.113.7",
        "screen": {"width": 1512, "height": 982, "density": 2},
    },
    "minimal": {"library": {"name": "analytics.js"}, "userAgent": "Mozilla/5.0"},
}


def rows(
    n: int, late: float, seed: int, source_id: str, first: int = 0, context: str = "browser"
) -> Iterator[tuple[object, ...]]:
    received = datetime.now(UTC)
    ctx = orjson.dumps(CONTEXTS[context])
    for i, k, t, _ in stream(n, late, seed, first):
        user, anon, traits = identifiers(i, k)
        kind = "identify" if k == 2 else ("page" if k < 2 else "track")
        yield (
            SPACE, source_id, f"m{i}-{k}", kind, user, anon, None, None,
            "Viewed" if kind == "track" else None, "Home" if kind == "page" else None,
            t, t, None, received, None, orjson.dumps(traits) if traits else None, ctx, None, None, None,
        )  # fmt: skip


def union_find(n: int, late: float, seed: int) -> float:
    """Events per second of a dict union-find with path halving over the same links."""
    links = []
    for i, k, _, _ in stream(n, late, seed):
        user, anon, traits = identifiers(i, k)
        ids = [f"anonymous_id:{anon}"]
        if user:
            ids.append(f"user_id:{user}")
        if traits:
            ids.append(f"email:{traits['email']}")
        links.append(ids)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        p = parent.setdefault(x, x)
        while p != x:
            gp = parent[p]
            parent[x] = gp
            x, p = p, gp
        return x

    start = time.perf_counter()
    for ids in links:
        a = find(ids[0])
        for y in ids[1:]:
            b = find(y)
            if a != b:
                parent[b] = a
    elapsed = time.perf_counter() - start
    roots = {find(x) for x in parent}
    assert len(roots) == max(1, n // PER_PERSON) or n % PER_PERSON, len(roots)
    return n / elapsed


async def resolve_load(
    address: str, people: int, total: int, concurrency: int, seed: int = 7
) -> tuple[float, list[float]]:
    """(calls per second, latencies) of `total` ResolveProfile calls from `concurrency` callers
    on random identifiers of the first `people` people."""
    rng = random.Random(seed)
    kinds = [("user_id", "u{}"), ("anonymous_id", "a{}-1"), ("email", "p{}@bench.example")]
    bodies = []
    for _ in range(total):
        kind, fmt = rng.choice(kinds)
        req = pb.ResolveProfileRequest(
            space_id=SPACE,
            identifier=event_pb2.Identifier(kind=kind, value=fmt.format(rng.randrange(people))),
        )
        bodies.append(req.SerializeToString())
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)
    ]
    calls = [
        ch.unary_unary(
            "/touchpoint.identity.v1.IdentityService/ResolveProfile",
            request_serializer=None,
            response_deserializer=pb.ResolveProfileResponse.FromString,
        )
        for ch in channels
    ]
    latencies: list[float] = []
    queue = list(reversed(bodies))

    async def worker(k: int) -> None:
        call = calls[k % len(calls)]
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            await call(body)
            latencies.append(time.perf_counter() - t0)

    try:
        # Warm the channels and the server's pool first.
        await asyncio.gather(*(calls[k % len(calls)](bodies[k]) for k in range(min(total, 50))))
        t = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t
    finally:
        for ch in channels:
            await ch.close()
    return total / elapsed, latencies


async def resolve_at_rate(
    address: str, people: int, rate: float, seconds: float, seed: int = 9
) -> tuple[float, list[float], list[float], list[float]]:
    """Open loop: call i is sent at t0 + i/rate whatever happened before (so a slow answer cannot
    hold back the load, as callers in other services would not wait for each other). Latency is
    measured from the call's scheduled time, so time spent queued behind a late sender counts too.
    Returns (answered calls per second, latencies, latencies from the moment each call was
    actually sent, how late each was sent): the event loop's timers fire up to a millisecond
    late, which the first measure charges to the server and the second does not."""
    rng = random.Random(seed)
    kinds = [("user_id", "u{}"), ("anonymous_id", "a{}-1"), ("email", "p{}@bench.example")]
    total = int(rate * seconds)
    bodies = []
    for _ in range(total):
        kind, fmt = rng.choice(kinds)
        bodies.append(
            pb.ResolveProfileRequest(
                space_id=SPACE,
                identifier=event_pb2.Identifier(kind=kind, value=fmt.format(rng.randrange(people))),
            ).SerializeToString()
        )
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)
    ]
    calls = [
        ch.unary_unary(
            "/touchpoint.identity.v1.IdentityService/ResolveProfile",
            request_serializer=None,
            response_deserializer=pb.ResolveProfileResponse.FromString,
        )
        for ch in channels
    ]
    latencies: list[float] = []
    from_send: list[float] = []
    late: list[float] = []

    async def one(i: int, due: float) -> None:
        sent = time.perf_counter()
        await calls[i % len(calls)](bodies[i])
        done = time.perf_counter()
        latencies.append(done - due)
        from_send.append(done - sent)
        late.append(sent - due)

    try:
        await asyncio.gather(*(calls[k % len(calls)](bodies[k]) for k in range(min(total, 50))))
        # Only the calls in flight are kept: holding every finished task until the end made
        # each young-generation collection of this process walk thousands of them (20-40 ms
        # pauses that callers' latencies showed), and the final gather over all of them stalled
        # the last calls.
        in_flight: set[asyncio.Task[None]] = set()
        t0 = time.perf_counter()
        for i in range(total):
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        elapsed = time.perf_counter() - t0
    finally:
        for ch in channels:
            await ch.close()
    return len(latencies) / elapsed, latencies, from_send, late


_BUCKETS = ("0.001", "0.0025", "0.005", "0.01", "+Inf")


def server_buckets(metrics_port: int) -> dict[str, float]:
    """The server's cumulative ResolveProfile duration histogram (touchpoint_identity_rpc_duration_seconds),
    and its young generation's collections and the objects they freed (prometheus_client's
    python_gc_* counters) under "gc:collections" and "gc:objects"."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "touchpoint_identity_rpc_duration_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("method") == "ResolveProfile":
                    buckets[sample.labels["le"]] = sample.value
        elif family.name in ("python_gc_collections", "python_gc_objects_collected"):
            for sample in family.samples:
                if sample.labels.get("generation") == "0":
                    buckets["gc:collections" if "collections" in family.name else "gc:objects"] = sample.value
    return buckets


def collector_line(after: dict[str, float], before: dict[str, float]) -> str:
    """The API process's young collections between two snapshots: a collection's pause grows with
    the objects it frees (grpc.aio leaves a small reference cycle behind every call)."""
    runs = after.get("gc:collections", 0.0) - before.get("gc:collections", 0.0)
    freed = after.get("gc:objects", 0.0) - before.get("gc:objects", 0.0)
    each = f", {freed / runs:,.0f} objects freed by each" if runs else ""
    return f"the API's young collections: {runs:,.0f}{each}"


def server_side(after: dict[str, float], before: dict[str, float]) -> str:
    """Share of the calls between two snapshots that the server handled within each bucket."""
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    if not total:
        return "no samples"
    return ", ".join(
        f"{(after[le] - before.get(le, 0.0)) / total:.1%} <= {float(le) * 1000:g} ms"
        for le in _BUCKETS[:-1]
        if le in after
    )


def per_event(used: dict[str, float], n: int) -> str:
    return ", ".join(f"{k} {v / max(1, n) * 1e6:.1f}" for k, v in used.items())


async def copy_events(pool: asyncpg.Pool, records: Iterator[tuple[object, ...]]) -> None:
    batch: list[tuple[object, ...]] = []
    async with pool.acquire() as conn:
        for row in records:
            batch.append(row)
            if len(batch) == CHUNK:
                await conn.copy_records_to_table(
                    "events", schema_name="ingest", columns=EVENT_COLUMNS, records=batch
                )
                batch = []
        if batch:
            await conn.copy_records_to_table(
                "events", schema_name="ingest", columns=EVENT_COLUMNS, records=batch
            )
        await conn.execute("analyze ingest.events")


def resolve_line(
    label: str, rate: float, lat: list[float], args: argparse.Namespace, offered: float = 0
) -> str:
    p50, p99 = percentile(lat, 50) * 1000, percentile(lat, 99) * 1000
    how = (
        f"open loop at {offered:,.0f} calls/s offered"
        if offered
        else f"closed loop, {args.concurrency} callers"
    )
    return (
        f"{label} {rate:12,.0f} calls/s    p50 {p50:.2f} ms  p99 {p99:.2f} ms  ({len(lat):,} calls, "
        f"{how}, measured by the caller; target p99 <= 5 ms)"
    )


async def settle(pool: asyncpg.Pool) -> float:
    """VACUUM (ANALYZE) of every table the load wrote, then a CHECKPOINT, as an operator ends a
    bulk load; returns the seconds it took. Without it autovacuum and autoanalyze of the fresh
    million-row tables, and a checkpoint, run during the measurement; and until a vacuum has set
    the visibility map, a resolve's index-only lookup also visits the table's page, setting its
    hint bits (a WAL record per page with checksums on)."""
    t = time.perf_counter()
    tables = await pool.fetch(
        """select format('%I.%I', n.nspname, c.relname) from pg_class c
           join pg_namespace n on n.oid = c.relnamespace
           where n.nspname in ('identity', 'ingest') and c.relkind = 'r'"""
    )
    async with pool.acquire() as conn:
        await conn.execute("vacuum (analyze) " + ", ".join(r[0] for r in tables))
        await conn.execute("checkpoint")
    return time.perf_counter() - t


def profiles_gauge(metrics_port: int) -> float:
    """touchpoint_identity_profiles of the API replica (0 until its first profile-metrics refresh)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("touchpoint_identity_profiles "):
                return float(line.split()[1])
    return 0.0


class Window:
    """CPU seconds of the API replica, this process (the caller), Postgres and the whole machine
    over a measurement: per call, and what other programs on the machine used meanwhile."""

    def __init__(self, api_pids: list[int], pg_pid: int | None) -> None:
        import psutil

        self.api_pids, self.pg = api_pids, [pg_pid] if pg_pid else []
        self.t0 = time.perf_counter()
        self.api0 = sum(cpu_seconds(api_pids).values())
        self.pg0 = sum(cpu_seconds(self.pg).values())
        self.caller0 = time.process_time()
        self.machine0 = psutil.cpu_times()

    def report(self, calls: int) -> str:
        import psutil

        m1 = psutil.cpu_times()
        wall = time.perf_counter() - self.t0
        busy = sum(
            getattr(m1, f) - getattr(self.machine0, f) for f in ("user", "system", "nice", "irq", "softirq")
        )
        api = sum(cpu_seconds(self.api_pids).values()) - self.api0
        pg = sum(cpu_seconds(self.pg).values()) - self.pg0
        caller = time.process_time() - self.caller0
        other = max(0.0, busy - api - pg - caller)
        per = ", ".join(
            f"{k} {v / max(1, calls) * 1e6:.0f}"
            for k, v in (("api", api), ("caller", caller), ("postgres", pg))
        )
        return (
            f"CPU µs per call: {per}; machine busy {busy / wall:.2f} of {psutil.cpu_count()} cores, "
            f"of which other programs {other / wall:.2f}"
        )


async def main(args: argparse.Namespace) -> None:
    n = args.events
    people = max(1, n // PER_PERSON)
    # Events of other people, applied by a consumer process while (c2) resolves.
    extra = max(PER_PERSON, int(n * args.extra))
    server_url, handle = bench_postgres()
    url = await create_database(server_url, "tp_bench")
    procs = []
    try:
        pool = await create_pool(url, max_size=4)
        await migrate(pool, "ingest", INGEST_MIGRATIONS)
        await ensure_partitions(pool)
        source = await create_source(
            pool, write_key="bench_" + secrets.token_hex(6), name="bench", space_id=SPACE
        )
        t = time.perf_counter()
        await copy_events(pool, rows(n, args.late, args.seed, source, context=args.context))
        print(
            f"loaded {n:,} events of {people:,} people into ingest.events in {time.perf_counter() - t:.1f} s"
        )
        # A replay reads a log written and maintained before: without this, autovacuum's first
        # VACUUM (ANALYZE) of the freshly loaded million events (a gigabyte) ran during (b) for
        # 45 of its 70 s (stop 18).
        print(f"    then VACUUM (ANALYZE) of the loaded log and a CHECKPOINT: {await settle(pool):.1f} s")

        a = union_find(n, args.late, args.seed)
        print(f"(a) in-memory union-find     {a:12,.0f} events/s")

        settings = IdentitySettings(batch_size=args.batch_size)
        await migrate(pool, "identity", IDENTITY_MIGRATIONS)
        channel = grpc.aio.insecure_channel("127.0.0.1:9")  # DeleteProfile only; not called here
        # As start_identity gives the consumer: its own pool, with raw times.
        log_pool = await sibling_pool(pool, max_size=4, raw_times=True)
        stitcher = Stitcher(
            pool,
            log_pool=log_pool,
            extractor=Extractor(settings.default_region, settings.trait_keys),
            rules=settings.rules(),
            ingest=ingest_service_pb2_grpc.IngestServiceStub(channel),
            batch_size=settings.batch_size,
        )
        await stitcher.consumer.ensure()
        tune_gc()  # as services.identity's composition root does
        pm = postmaster_pid(handle)
        pids = [pm] if pm else []
        before = cpu_seconds(pids)
        cpu = time.process_time()
        profile = StatementProfile() if args.statements else None
        if profile is not None:
            profile.install()
        t = time.perf_counter()
        try:
            applied = await stitcher.consumer.catch_up()
        finally:
            if profile is not None:
                profile.uninstall()
        elapsed = time.perf_counter() - t
        used = {"identity consumer (python)": time.process_time() - cpu}
        used.update({k: v - before.get(k, 0.0) for k, v in cpu_seconds(pids).items()})
        await channel.close()
        await log_pool.close()
        b = applied / elapsed
        profiles = await pool.fetchval(
            "select count(distinct profile_id) from identity.identifiers where space_id = $1", SPACE
        )
        idents = await pool.fetchval("select count(*) from identity.identifiers where space_id = $1", SPACE)
        recomputed = REGISTRY.get_sample_value("touchpoint_identity_recomputed_components_total") or 0
        cpu_total = sum(used.values()) / max(1, applied) * 1e6
        print(
            f"(b) identity consumer        {b:12,.0f} events/s   ({applied:,} events in {elapsed:.1f} s, "
            f"batch {args.batch_size}; {idents:,} identifiers -> {profiles:,} profiles; "
            f"{recomputed:,.0f} components recomputed)"
        )
        print(f"    CPU µs per event: {per_event(used, applied)}; total {cpu_total:.1f}")
        # Where the ceiling is: each process's share of the wall time, and the rate the machine's
        # cores would allow at this CPU per event with a perfect schedule (none idle).
        cores = os.cpu_count() or 1
        print(
            "    busy: "
            + ", ".join(f"{k} {v / elapsed:.0%}" for k, v in used.items())
            + f" of a core; {cores} cores allow at most {cores * 1e6 / max(cpu_total, 1e-9):,.0f} events/s"
            " at this CPU per event"
        )
        print(
            f"    b/a = {b / a:.4f}   (union-find {1e6 / a:.1f} µs/event vs consumer {1e6 / b:.1f} µs/event "
            f"wall, {cpu_total:.1f} µs/event CPU; target: b >= 20,000 events/s)"
        )
        if profile is not None:
            print("    (b) by statement, per event (the profile's own cost is in these figures):")
            print("\n".join("      " + line for line in profile.report(applied).splitlines()))
        assert applied == n and profiles == people, (applied, profiles)
        if args.apply_only:
            return

        # Out of the measurement: the bulk load's maintenance, and what (b) left in this process
        # (it calls the API from here: the collector should not walk (b)'s objects).
        settled = await settle(pool)
        del stitcher
        gc.collect()
        gc.freeze()
        print(f"    then VACUUM (ANALYZE) of the loaded tables and a CHECKPOINT: {settled:.1f} s")

        common = {
            "TOUCHPOINT_DATABASE_URL": url,
            # The profile metrics' table scan (consuming replicas only: the API replica of (c)
            # makes none) would land in the middle of (c2): the next comes an hour later.
            "TOUCHPOINT_IDENTITY_PROFILE_STATS_SECONDS": "3600",
            "TOUCHPOINT_IDENTITY_BATCH_SIZE": str(args.batch_size),
        }
        port, metrics_port = free_port(), free_port()
        # An API replica: it answers the calls and applies nothing.
        api = start_service(
            "identity",
            {
                **common,
                "TOUCHPOINT_IDENTITY_LISTEN": f"127.0.0.1:{port}",
                "TOUCHPOINT_IDENTITY_METRICS_PORT": str(metrics_port),
                "TOUCHPOINT_IDENTITY_CONSUME": "false",
                "TOUCHPOINT_IDENTITY_WORKERS": str(args.workers),
            },
        )
        procs.append(api)
        wait_grpc(f"127.0.0.1:{port}")
        address = f"127.0.0.1:{port}"
        # An API-only replica makes no profile-metrics scan (TOUCHPOINT_IDENTITY_MAINTENANCE
        # follows TOUCHPOINT_IDENTITY_CONSUME): nothing of the kind lands in (c1).
        assert profiles_gauge(metrics_port) == 0

        api_pids = [api.pid]  # cpu_seconds counts its workers too
        snap = server_buckets(metrics_port)
        measured = Window(api_pids, pm)
        rate, lat = await resolve_load(address, people, args.resolves, args.concurrency)
        cpu_line = measured.report(len(lat))
        print(resolve_line("(c1) ResolveProfile, alone  ", rate, lat, args))
        after = server_buckets(metrics_port)
        print("     server side: " + server_side(after, snap) + "; " + collector_line(after, snap))
        print(f"     {cpu_line} ({args.workers} API worker(s))")
        capacity = rate
        if args.rate > 0:
            snap = server_buckets(metrics_port)
            measured = Window(api_pids, pm)
            got, lat, sent_lat, late = await resolve_at_rate(address, people, args.rate, args.rate_seconds)
            cpu_line = measured.report(len(lat))
            print(
                resolve_line("(c1) ResolveProfile, alone  ", got, lat, args, offered=args.rate)
                + f"  [{args.rate / capacity:.0%} of the closed loop's rate]"
            )
            print(
                f"     from each call's actual send: p50 {percentile(sent_lat, 50) * 1000:.2f} ms  "
                f"p99 {percentile(sent_lat, 99) * 1000:.2f} ms; the sender was late by p50 "
                f"{percentile(late, 50) * 1000:.2f} ms  p99 {percentile(late, 99) * 1000:.2f} ms "
                "(the event loop's timers)"
            )
            after = server_buckets(metrics_port)
            print("     server side: " + server_side(after, snap) + "; " + collector_line(after, snap))
            print(f"     {cpu_line}")

        # (c2) the same load while a consumer replica applies `extra` events of new people.
        await copy_events(
            pool, rows(extra, args.late, args.seed + 1, source, first=people, context=args.context)
        )
        c_port, c_metrics = free_port(), free_port()
        consumer = start_service(
            "identity",
            {
                **common,
                "TOUCHPOINT_IDENTITY_LISTEN": f"127.0.0.1:{c_port}",
                "TOUCHPOINT_IDENTITY_METRICS_PORT": str(c_metrics),
                "TOUCHPOINT_IDENTITY_CONSUME": "true",
            },
        )
        procs.append(consumer)
        wait_grpc(f"127.0.0.1:{c_port}")
        watch = {
            "identity consumer": [consumer.pid],
            "identity api": api_pids,
            **({"postgres": [pm]} if pm else {}),
        }
        log_lag = LogConsumer(pool, schema="identity", name=CONSUMER, apply=_nothing)
        start_pos = await log_lag.position()
        cpu_w = {k: cpu_seconds(p) for k, p in watch.items()}
        t = time.perf_counter()
        snap = server_buckets(metrics_port)
        rate, lat = await resolve_load(address, people, args.resolves, args.concurrency, seed=8)
        open_loop: tuple[float, list[float], list[float], list[float]] | None = None
        if args.rate > 0:
            open_loop = await resolve_at_rate(address, people, args.rate, args.rate_seconds, seed=10)
        window = time.perf_counter() - t
        after = server_buckets(metrics_port)
        behind, _ = await log_lag.lag()
        end_pos = await log_lag.position()
        moved = await pool.fetchval(
            """select count(*) from ingest.event_log
               where (xid, seq) > ($1::text::xid8, $2) and (xid, seq) <= ($3::text::xid8, $4)""",
            str(start_pos[0]),
            start_pos[1],
            str(end_pos[0]),
            end_pos[1],
        )
        cpu_used = {k: sum(cpu_seconds(p).values()) - sum(cpu_w[k].values()) for k, p in watch.items()}
        print(resolve_line("(c2) ResolveProfile, with the consumer", rate, lat, args))
        if open_loop is not None:
            print(
                resolve_line(
                    "(c2) ResolveProfile, with the consumer",
                    open_loop[0],
                    open_loop[1],
                    args,
                    offered=args.rate,
                )
            )
        print("     server side (both loads): " + server_side(after, snap))
        print(
            f"     meanwhile the consumer process applied {moved:,} events ({moved / window:,.0f} events/s; "
            f"{behind:,} still to apply at the end: {'busy throughout' if behind else 'it finished early'}); "
            "CPU s during the window: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu_used.items())
        )
        await pool.close()
    finally:
        stop(procs)
        if handle is not None:
            handle.cleanup()  # type: ignore[attr-defined]


async def _nothing(conn: asyncpg.Connection, events: list[LogEvent]) -> None:
    raise AssertionError("the bench reads the consumer's position only")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="events (and identifiers) to stitch")
    parser.add_argument("--late", type=float, default=0.01, help="fraction of events that arrive late")
    parser.add_argument(
        "--batch-size", type=int, default=IdentitySettings.batch_size, help="events per consumer transaction"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent ResolveProfile callers")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes of the API replica (TOUCHPOINT_IDENTITY_WORKERS)"
    )
    parser.add_argument("--resolves", type=int, default=20_000, help="ResolveProfile calls (each of c1, c2)")
    parser.add_argument(
        "--extra", type=float, default=0.2, help="events applied during (c2), as a fraction of --events"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=500.0,
        help="offered ResolveProfile calls/s of the open-loop runs (0: closed loop only)",
    )
    parser.add_argument("--rate-seconds", type=float, default=15.0, help="length of each open-loop run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--apply-only", action="store_true", help="run (a) and (b) only, no resolves")
    parser.add_argument(
        "--statements",
        action="store_true",
        help="in (b), each statement's calls, wall time and Postgres CPU per event (bench/statements.py)",
    )
    parser.add_argument(
        "--context", choices=sorted(CONTEXTS), default="browser", help="each event's context (see CONTEXTS)"
    )
    import uvloop

    uvloop.run(main(parser.parse_args()))
