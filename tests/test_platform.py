"""libs/platform: migrations, the server bootstrap (health, reflection, metrics, errors,
graceful shutdown) and settings."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from touchpoint.platform.db import jsonb, migrate, sibling_pool
from touchpoint.platform.errors import Violation, details_of, invalid_argument
from touchpoint.platform.server import start_server
from touchpoint.platform.settings import SettingsError, env_int

SERVICE = pb.DESCRIPTOR.services_by_name["IngestService"].full_name


class StandIn(pb_grpc.IngestServiceServicer):
    """A real gRPC servicer whose behaviour each test steers through the write key."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def WriteEvents(
        self, request: pb.WriteEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.WriteEventsResponse:
        if request.write_key == "slow":
            self.started.set()
            await self.release.wait()
            return pb.WriteEventsResponse(accepted=7)
        if request.write_key == "bad":
            raise invalid_argument("BAD", "bad input", [Violation("events[0].userId", "REQUIRED", "needed")])
        if request.write_key == "boom":
            raise RuntimeError("secret internals")
        return pb.WriteEventsResponse(accepted=1)


def make_standin() -> StandIn:
    return StandIn()  # type: ignore[abstract]  # the RPCs these tests do not call stay unimplemented


async def started(servicer: StandIn, metrics_port: int | None = None):
    return await start_server(
        service="platformtest",
        register=lambda s: pb_grpc.add_IngestServiceServicer_to_server(servicer, s),
        service_names=[SERVICE],
        listen="127.0.0.1:0",
        metrics_port=metrics_port,
    )


async def test_health_reflection_and_metrics() -> None:
    handle = await started(make_standin(), metrics_port=0)
    try:
        async with grpc.aio.insecure_channel(handle.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for name in ("", SERVICE):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            names: list[str] = []
            async for answer in refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                names += [s.name for s in answer.list_services_response.service]
            assert SERVICE in names and "grpc.health.v1.Health" in names
            await pb_grpc.IngestServiceStub(ch).WriteEvents(pb.WriteEventsRequest(write_key="ok"))
        assert handle.metrics_port
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics").read().decode()
        )
        assert 'touchpoint_platformtest_rpc_handled_total{code="OK",method="WriteEvents"}' in body
        assert "touchpoint_platformtest_rpc_duration_seconds_bucket" in body
    finally:
        await handle.stop(0)


async def test_errors_carry_rich_status_and_hide_internals() -> None:
    handle = await started(make_standin())
    try:
        async with grpc.aio.insecure_channel(handle.address) as ch:
            stub = pb_grpc.IngestServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.WriteEvents(pb.WriteEventsRequest(write_key="bad"))
            d = details_of(err.value)
            assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BAD")
            assert d.violations == [("events[0].userId", "REQUIRED: needed")]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.WriteEvents(pb.WriteEventsRequest(write_key="boom"))
            d = details_of(err.value)
            assert d.code == grpc.StatusCode.INTERNAL and "secret" not in d.message
    finally:
        await handle.stop(0)


async def test_graceful_shutdown_drains_in_flight_calls_and_refuses_new_ones() -> None:
    servicer = make_standin()
    handle = await started(servicer)
    async with grpc.aio.insecure_channel(handle.address) as ch:
        stub = pb_grpc.IngestServiceStub(ch)
        in_flight = asyncio.ensure_future(stub.WriteEvents(pb.WriteEventsRequest(write_key="slow")))
        await asyncio.wait_for(servicer.started.wait(), 5)
        stopping = asyncio.ensure_future(handle.stop(grace=5.0))
        health = health_pb2_grpc.HealthStub(ch)

        async def not_serving() -> bool:
            try:
                r = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                return r.status == health_pb2.HealthCheckResponse.NOT_SERVING
            except grpc.aio.AioRpcError:
                return True

        from touchpoint.platform.testing import eventually

        await eventually(not_serving, timeout=5)
        servicer.release.set()
        resp = await in_flight  # the in-flight call completed, not cancelled
        assert resp.accepted == 7
        await stopping
    async with grpc.aio.insecure_channel(handle.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.IngestServiceStub(ch).WriteEvents(pb.WriteEventsRequest(write_key="ok"), timeout=2)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_migrations_apply_once_under_concurrency_and_refuse_edits(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    service = "mig_" + secrets.token_hex(3)
    (tmp_path / "0001_first.sql").write_text(f"create table public.{service}_t (id int primary key);")
    (tmp_path / "0002_second.sql").write_text(f"insert into public.{service}_t values (1);")
    results = await asyncio.gather(*(migrate(pool, service, tmp_path) for _ in range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, 2]  # one runner applied both, the others none
    assert await pool.fetchval(f"select count(*) from public.{service}_t") == 1
    (tmp_path / "0002_second.sql").write_text(f"insert into public.{service}_t values (2);")
    with pytest.raises(RuntimeError, match="edited after it was applied"):
        await migrate(pool, service, tmp_path)
    (tmp_path / "3_bad.sql").write_text("select 1;")
    with pytest.raises(ValueError, match="NNNN_lower_snake"):
        await migrate(pool, service, tmp_path)


async def test_failed_migration_leaves_nothing_half_applied(pool: asyncpg.Pool, tmp_path: Path) -> None:
    service = "migfail_" + secrets.token_hex(3)
    (tmp_path / "0001_broken.sql").write_text(
        f"create table public.{service}_t (id int); select nonsense_column;"
    )
    with pytest.raises(asyncpg.PostgresError):
        await migrate(pool, service, tmp_path)
    assert await pool.fetchval("select to_regclass($1)", f"public.{service}_t") is None
    assert (
        await pool.fetchval("select count(*) from platform.schema_migrations where service = $1", service)
        == 0
    )


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHPOINT_X", "abc")
    with pytest.raises(SettingsError, match="TOUCHPOINT_X must be an integer"):
        env_int("TOUCHPOINT_X", 1)
    monkeypatch.setenv("TOUCHPOINT_X", "3")
    with pytest.raises(SettingsError, match="at least 7"):
        env_int("TOUCHPOINT_X", 7, minimum=7)
    monkeypatch.delenv("TOUCHPOINT_X")
    assert env_int("TOUCHPOINT_X", 9) == 9


async def test_sibling_pool_with_raw_times_reads_and_writes_postgres_microseconds(pool: asyncpg.Pool) -> None:
    table = "raw_" + secrets.token_hex(3)
    await pool.execute(f"create table public.{table} (t timestamptz, doc jsonb)")
    raw = await sibling_pool(pool, max_size=2, raw_times=True)
    try:
        # The same database: a table made through one pool is there through the other.
        await raw.execute(f"insert into public.{table} values ('2000-01-01 00:00:01.5+00', '{{\"a\": 1}}')")
        t, doc = await raw.fetchrow(f"select t, doc from public.{table}")
        assert t == (1_500_000,)  # microseconds since 2000-01-01 UTC
        assert doc == {"a": 1}  # the jsonb codec is the same as the process pool's
        # Written back raw (COPY and parameters), read as datetimes through the ordinary pool.
        async with raw.acquire() as conn:
            await conn.copy_records_to_table(table, schema_name="public", records=[((86_400_000_000,), None)])
        await raw.execute(f"insert into public.{table} (t) values ($1)", (-1,))
        got = [r["t"] for r in await pool.fetch(f"select t from public.{table} order by t")]
        assert got == [
            datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
            datetime(2000, 1, 1, 0, 0, 1, 500_000, tzinfo=UTC),
            datetime(2000, 1, 2, tzinfo=UTC),
        ]
        # Raw times order as the instants do.
        ordered = [r["t"] for r in await raw.fetch(f"select t from public.{table} order by t")]
        assert ordered == sorted(ordered) and ordered[0] < ordered[-1]
    finally:
        await raw.close()


async def test_the_jsonb_codec_takes_objects_json_bytes_and_jsonb_bytes(pool: asyncpg.Pool) -> None:
    table = "doc_" + secrets.token_hex(3)
    await pool.execute(f"create table public.{table} (i int, doc jsonb)")
    ua = 'Mozilla/5.0 \u00e9 "quoted"'
    records = [
        (1, {"user_agent": ua, "n": [1, 2]}),  # an object: serialised by the codec
        (2, b'{"user_agent": "x"}'),  # JSON text as bytes: passed through
        (3, jsonb({"user_agent": ua})),  # already in the binary format: passed through as is
        (4, jsonb("just a string")),
    ]
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(table, schema_name="public", records=records)
    await pool.execute(f"insert into public.{table} values (5, $1)", jsonb({"k": None}))
    got = {r["i"]: r["doc"] for r in await pool.fetch(f"select i, doc from public.{table}")}
    assert got == {
        1: {"user_agent": ua, "n": [1, 2]},
        2: {"user_agent": "x"},
        3: {"user_agent": ua},
        4: "just a string",
        5: {"k": None},
    }
    assert jsonb([1]) == b"\x01[1]"
    with pytest.raises(asyncpg.InvalidTextRepresentationError):  # bytes that are not JSON
        await pool.execute(f"insert into public.{table} values (6, $1)", b"not json")


def test_a_temporary_embedded_server_leaves_no_folder_behind(tmp_path: Path) -> None:
    # Tests and benches start one in a mkdtemp folder with delete_on_exit: the server removes
    # its data at exit, and the folder around it must go too (each run used to leave one).
    parent = tmp_path / "tp-pg-temp"
    parent.mkdir()
    code = (
        "import sys, asyncio, asyncpg; from pathlib import Path;"
        "from touchpoint.platform.embedded import start_embedded;"
        "url, _ = start_embedded(Path(sys.argv[1]) / 'data', delete_on_exit=True);"
        "print(asyncio.run(asyncpg.connect(url)).__class__.__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(parent)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Connection" in done.stdout
    assert not parent.exists()
    # A folder that holds anything else is left alone.
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "other").write_text("x")
    done = subprocess.run(
        [sys.executable, "-c", code, str(keep)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert (keep / "other").read_text() == "x"
    assert not (keep / "data").exists()
