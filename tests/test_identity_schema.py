"""The identity graph's schema changes keep what was stored and the indexes the store's queries
need: links keep their identifiers as one text (migration 0005), and a profile's identifiers
are found through a hash index (0006). Real Postgres."""

from __future__ import annotations

import shutil
from pathlib import Path

import asyncpg

from services.identity import store
from services.identity.app import MIGRATIONS
from services.identity.domain import Graph, Rules, set_key
from services.identity.store import PgLoader
from touchpoint.platform.db import create_pool, migrate
from touchpoint.platform.testing import create_database

SPACE = "links-text"


async def test_links_written_before_the_migration_read_back_the_same(
    pg_server_url: str, tmp_path: Path
) -> None:
    before = tmp_path / "migrations"
    before.mkdir()
    for f in sorted(MIGRATIONS.glob("*.sql")):
        if f.name < "0005":
            shutil.copy(f, before / f.name)
    pool = await create_pool(await create_database(pg_server_url, "tp_links"), max_size=2)
    try:
        await migrate(pool, "identity", before)
        idents = (("user_id", "u:1"), ("email", "a@b.example"), ("anonymous_id", "a 1"))
        loose = (("user_id", "u2"), ("anonymous_id", "a2"))
        for ids, cid in ((idents, 7), (loose, None)):
            await pool.execute(
                """insert into identity.links (space_id, set_key, idents, first_time, first_message_id,
                       first_source_id, component_id)
                   values ($1, $2, $3::text[], now(), 'm', 's', $4)""",
                SPACE,
                set_key(ids),
                [f"{k}:{v}" for k, v in ids],
                cid,
            )
        assert "0005_link_idents_as_text.sql" in await migrate(pool, "identity", MIGRATIONS)
        async with pool.acquire() as conn:
            graph = Graph(SPACE, Rules())
            await PgLoader(conn, SPACE).load_links(graph, [set_key(idents), set_key(loose)])
            assert graph.links[set_key(idents)].idents == idents
            assert graph.links[set_key(loose)].idents == loose
            # A loose link, found by one of its identifiers (DeleteProfile's lookup).
            found = await PgLoader(conn, SPACE).links_containing(
                Graph(SPACE, Rules()), [("anonymous_id", "a2")], [], scan=False
            )
            assert found == [loose]
            found = await PgLoader(conn, SPACE).links_containing(
                Graph(SPACE, Rules()), [("user_id", "u:1")], [], scan=True
            )
            assert found == [idents]
            # The store's expression is the index's: the index answers the && itself (without the
            # space, no other index fits).
            await conn.execute("set enable_seqscan = off")
            plan = "\n".join(
                r[0]
                for r in await conn.fetch(
                    f"""explain select l.set_key from identity.links l
                        where l.component_id is null
                          and {store._LINK_IDENTS} && array['anonymous_id:a2']"""
                )
            )
            assert "links_loose" in plan, plan
            assert any("Index Cond" in line and "&&" in line for line in plan.split("\n")), plan
    finally:
        await pool.close()


async def test_a_profiles_identifiers_are_found_through_the_hash_index(pool: asyncpg.Pool) -> None:
    await migrate(pool, "identity", MIGRATIONS)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("set local enable_seqscan = off")
        for sql in (
            "explain select kind, value from identity.identifiers where profile_id = 'p1'",
            # load_idents: every member of the profiles a batch's identifiers belong to.
            """explain select i.kind from identity.identifiers i
               where i.profile_id in (select unnest(array['p1', 'p2']))""",
        ):
            plan = "\n".join(r[0] for r in await conn.fetch(sql))
            assert "identifiers_profile" in plan, plan
        method = await conn.fetchval(
            """select am.amname from pg_class c join pg_am am on am.oid = c.relam
               where c.oid = 'identity.identifiers_profile'::regclass"""
        )
        assert method == "hash"


async def test_a_profiles_merges_are_found_through_its_indexes(pool: asyncpg.Pool) -> None:
    # ListProfileMerges' query (store.merges): the profile's own entries through the hash index
    # on profile_id (0008), the ones that merged it away through the GIN index.
    await migrate(pool, "identity", MIGRATIONS)
    await pool.execute(
        """insert into identity.merge_log (space_id, action, profile_id, other_profile_ids, event_time,
               source_id, message_id)
           select 's', 'merged', 'p' || n, array['q' || n], now(), 'src', 'm' || n
           from generate_series(1, 20000) n;
           analyze identity.merge_log"""
    )
    async with pool.acquire() as conn, conn.transaction():
        sql = store.MERGES_SQL.replace("$1", "'s'").replace("$2", "array['p1', 'p2']")
        sql = sql.replace("$3", "false").replace("$4", "null").replace("$5", "0").replace("$6", "100")
        plan = "\n".join(r[0] for r in await conn.fetch("explain " + sql))
        assert "merge_log_profile" in plan and "merge_log_others" in plan, plan
        method = await conn.fetchval(
            """select am.amname from pg_class c join pg_am am on am.oid = c.relam
               where c.oid = 'identity.merge_log_profile'::regclass"""
        )
        assert method == "hash"


async def test_the_graphs_keys_compare_byte_by_byte(pool: asyncpg.Pool) -> None:
    # Migration 0009: every text key of the graph's indexes has the collation "C" (a comparison
    # is a memcmp, not the C library's strcoll), whatever the database's collation; rows sort as
    # the consumer sorts its COPYs (Python's str order); the published views came back.
    await migrate(pool, "identity", MIGRATIONS)
    rows = await pool.fetch(
        """select t.relname as tab, c.relname as idx, coalesce(a.attname, '(expression)') as col,
                  coll.collname
           from pg_index i
           join pg_class c on c.oid = i.indexrelid
           join pg_class t on t.oid = i.indrelid
           join pg_namespace n on n.oid = t.relnamespace and n.nspname = 'identity'
           cross join lateral unnest(i.indkey::int2[], i.indcollation::oid[]) as k(attnum, collid)
           left join pg_attribute a on a.attrelid = t.oid and a.attnum = k.attnum
           join pg_collation coll on coll.oid = k.collid
           where t.relname = any($1::text[])""",
        ["identifiers", "event_refs", "traits", "links", "merge_log", "deletion_queue"],
    )
    keys = {(r["tab"], r["col"]): r["collname"] for r in rows}
    for key in (
        ("identifiers", "value"),
        ("identifiers", "kind"),
        ("identifiers", "space_id"),
        ("identifiers", "profile_id"),
        ("event_refs", "value"),
        ("traits", "key"),
        ("links", "(expression)"),
        ("merge_log", "other_profile_ids"),
        ("merge_log", "message_id"),
        ("deletion_queue", "message_id"),
    ):
        assert key in keys, (key, sorted(keys))
    assert {k: v for k, v in keys.items() if v != "C"} == {}
    values = ["b", "B", "a", "\u00e9", "z", "\u00e4", "_x", "Z", "a b", "a-b", "\u4e2d"]
    await pool.execute(
        """insert into identity.identifiers (space_id, kind, value, profile_id, first_time,
               first_message_id, first_source_id, last_time)
           select 'order', 'anonymous_id', v, 'p', now(), 'm', 's', now() from unnest($1::text[]) v""",
        values,
    )
    got = await pool.fetch(
        "select value from identity.identifiers where space_id = 'order' order by value, kind, space_id"
    )
    assert [r["value"] for r in got] == sorted(values)
    views = await pool.fetch(
        "select table_name from information_schema.views where table_schema = 'identity' order by 1"
    )
    assert [r["table_name"] for r in views] == [
        "deleted_profiles",
        "erased_events",
        "identifies",
        "profile_identifiers",
        "users",
    ]


async def test_reads_go_through_the_keys_with_the_value_first(pool: asyncpg.Pool) -> None:
    # Migration 0007 reordered the graph's keys (value, kind, space_id): the store's reads by
    # identifier still find them, a resolve without visiting the table.
    await migrate(pool, "identity", MIGRATIONS)
    await pool.execute(
        """insert into identity.identifiers (space_id, kind, value, profile_id, component_id,
               first_time, first_message_id, first_source_id, last_time)
           select 'k', (array['user_id', 'email', 'anonymous_id'])[n % 3 + 1], 'v' || n, 'p' || (n / 5),
                  n / 5, now(), 'm' || n, 's', now()
           from generate_series(0, 29999) n;
           insert into identity.event_refs (space_id, kind, value, "time", message_id, source_id)
           select 'k', (array['user_id', 'email', 'anonymous_id'])[n % 3 + 1], 'v' || (n % 30000),
                  now() - n * interval '1 second', 'm' || n, 's'
           from generate_series(0, 59999) n;
           insert into identity.traits (space_id, kind, value, key, value_json, "time", message_id, source_id)
           select 'k', (array['user_id', 'email', 'anonymous_id'])[n % 3 + 1], 'v' || n, 'plan', '"free"',
                  now(), 'm', 's'
           from generate_series(0, 29999) n;
           insert into identity.links (space_id, set_key, idents, first_time, first_message_id,
               first_source_id, component_id)
           select 'k', decode(md5(n::text), 'hex'), 'user_id:v' || n, now(), 'm', 's', n
           from generate_series(0, 19999) n"""
    )
    for table in ("identifiers", "event_refs", "traits", "links"):
        await pool.execute(f"vacuum (analyze) identity.{table}")
    async with pool.acquire() as conn, conn.transaction():
        # The plan a prepared statement settles on, whatever the values.
        await conn.execute("set local plan_cache_mode = force_generic_plan")
        for sql, args, wanted in (
            (store.RESOLVE_SQL, ("k", "user_id", "v3"), "Index Only Scan using identifiers_pkey"),
            (store.PROFILE_EVENT_REFS_SQL, ("p1", None, None, None, "", "", 100), "event_refs_anchor"),
            (store.PROFILE_TRAITS_SQL, ("p1",), "traits_pkey"),
            (store.LOAD_LINKS_SQL, ("k", bytes(16)), "links_pkey"),
        ):
            plan = "\n".join(r[0] for r in await conn.fetch("explain " + sql, *args))
            assert wanted in plan, plan
            assert "Seq Scan" not in plan, plan
    key = await pool.fetchval("select pg_get_indexdef('identity.identifiers_pkey'::regclass)")
    assert "(value, kind, space_id) INCLUDE (profile_id)" in key, key


async def test_a_batchs_identifiers_are_probed_by_index_whatever_the_statistics(
    pg_server_url: str,
) -> None:
    # 100,000 identifiers in 20,000 profiles, and the statistics a consumer may have before
    # autovacuum comes: its own analyze of the space and kind columns only, none for `value`.
    # Planned on those, a plain join scanned every identifier and component for each batch.
    pool = await create_pool(await create_database(pg_server_url, "tp_probe"), max_size=2)
    try:
        await migrate(pool, "identity", MIGRATIONS)
        await pool.execute("alter table identity.identifiers set (autovacuum_enabled = false)")
        await pool.execute("alter table identity.components set (autovacuum_enabled = false)")
        await pool.execute(
            """insert into identity.components (component_id, space_id, size)
               select c, 'probe', 5 from generate_series(1, 20000) c;
               insert into identity.identifiers (space_id, kind, value, profile_id, component_id,
                   first_time, first_message_id, first_source_id, last_time)
               select 'probe', 'anonymous_id', 'a' || n, 'p' || (n / 5), n / 5 + 1, now(), 'm', 's', now()
               from generate_series(0, 99999) n;
               analyze identity.identifiers (space_id, kind)"""
        )
        # A batch's probes: some known identifiers, most new.
        known = [("anonymous_id", f"a{n}") for n in range(0, 100000, 7)]
        new = [("anonymous_id", f"new{n}") for n in range(20000)]
        packed = store.pack_idents(known + new)
        async with pool.acquire() as conn, conn.transaction():
            for mode in ("force_generic_plan", "force_custom_plan"):
                await conn.execute(f"set local plan_cache_mode = {mode}")
                plan = "\n".join(
                    r[0] for r in await conn.fetch("explain " + store.LOAD_IDENTS_SQL, "probe", packed)
                )
                assert "Seq Scan" not in plan, plan
            graph = Graph("probe", Rules())
            await PgLoader(conn, "probe").load_idents(graph, known + new)
            # Every member of the profiles found, and nothing else.
            assert len(graph.part.nodes) == len({int(v[1:]) // 5 for _, v in known}) * 5
    finally:
        await pool.close()
