"""bench/statements: the per-statement profile the benches use to say where Postgres' time goes."""

from __future__ import annotations

import asyncpg
import pytest

from bench.statements import StatementProfile, backend_cpu, label

HEAVY = "select count(*) from generate_series(1, 4000000)"
LIGHT = "select 1"


async def test_statements_are_counted_timed_and_charged_their_backend_cpu(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        pid = conn.get_server_pid()
    on_this_machine = backend_cpu(pid) is not None
    await pool.execute("create temp table if not exists bench_statements_t (a int, b text)")
    with StatementProfile() as prof:
        assert await pool.fetchval(HEAVY) == 4_000_000
        for _ in range(20):
            await pool.fetchval(LIGHT)
        async with pool.acquire() as conn:
            await conn.execute("create temp table if not exists bench_statements_c (a int, b text)")
            await conn.copy_records_to_table("bench_statements_c", records=[(i, str(i)) for i in range(100)])
    assert prof.calls[HEAVY] == 1
    assert prof.calls[LIGHT] == 20
    assert prof.calls["COPY bench_statements_c"] == 1
    assert prof.wall[HEAVY] > prof.wall[LIGHT] / 20
    assert prof.cpu_known is on_this_machine
    if on_this_machine:
        # Counting four million rows costs the backend a tenth of a second or more; twenty
        # `select 1` cost it next to nothing (whole clock ticks: at most one of them).
        assert prof.cpu[HEAVY] >= 0.05
        assert prof.cpu[LIGHT] <= 0.011
    report = prof.report(events=1000)
    assert report.splitlines()[0].endswith(HEAVY)
    assert "COPY bench_statements_c" in report
    assert report.splitlines()[-1].startswith("all statements: Postgres CPU")


async def test_uninstall_puts_asyncpg_back(pool: asyncpg.Pool) -> None:
    before = {
        name: getattr(asyncpg.Connection, name) for name in ("fetch", "execute", "copy_records_to_table")
    }
    prof = StatementProfile()
    prof.install()
    with pytest.raises(RuntimeError):
        prof.install()
    assert asyncpg.Connection.fetch is not before["fetch"]
    prof.uninstall()
    assert {name: getattr(asyncpg.Connection, name) for name in before} == before
    await pool.fetchval(LIGHT)
    assert prof.calls[LIGHT] == 0


def test_labels() -> None:
    assert label("copy_records_to_table", ("identifiers",), {}) == "COPY identifiers"
    assert label("copy_to_table", (), {"table_name": "links"}) == "COPY links"
    assert label("fetch", ("select  a,\n   b from t",), {}) == "select a, b from t"
    assert len(label("execute", ("x" * 500,), {})) == 72
