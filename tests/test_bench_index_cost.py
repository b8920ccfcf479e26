"""bench/index_cost: each variant of a table's indexes is built as named, filled, and charged the
CPU its backend used. Real Postgres; small sizes (the figures themselves are the bench's)."""

from __future__ import annotations

import asyncpg

from bench.index_cost import SCENARIOS, index_statements, measure


async def test_each_variant_is_built_filled_and_measured(pool: asyncpg.Pool) -> None:
    base, insert = 3_000, 6_000
    async with pool.acquire() as conn:
        for name in ("identifiers", "event_refs"):
            scenario = SCENARIOS[name]
            result = await measure(conn, name, scenario, base, insert, batch=2_000, rounds=1)
            assert list(result.per_row) == list(scenario.variants)
            total = base + insert
            for variant, indexes in scenario.variants.items():
                # Every index of the variant holds every row (their partial ones included: each
                # row has a component): the variant measured is the one named.
                assert result.entries[variant] == total * len(index_statements(indexes)), variant
                assert all(x >= 0 for x in result.per_row[variant])
            # 6,000 rows through five or four tables cost the backend whole clock ticks.
            assert sum(sum(v) for v in result.per_row.values()) > 0
            report = result.report()
            assert report.splitlines()[0].startswith(f"{name}: backend CPU per row")
            assert "x heap alone: 1.00" in report.splitlines()[1]
        assert await conn.fetchval("select to_regclass('t')") is None  # dropped
        # The collation variant is built as named: its keys compare byte by byte.
        statements = SCENARIOS["identifiers"].variants['the same, text keys collate "C" (0009): the table']
        await conn.execute(SCENARIOS["identifiers"].table)
        try:
            for sql in statements:
                await conn.execute(sql)
            keys = await conn.fetch(
                """select a.attname, c.collname from pg_attribute a join pg_collation c on c.oid = a.attcollation
                   where a.attrelid = 't'::regclass and a.attname in ('space_id', 'kind', 'value', 'profile_id',
                       'first_message_id')"""
            )
            assert dict((r["attname"], r["collname"]) for r in keys) == {
                "space_id": "C", "kind": "C", "value": "C", "profile_id": "C", "first_message_id": "default"
            }  # fmt: skip
        finally:
            await conn.execute("drop table if exists t")
