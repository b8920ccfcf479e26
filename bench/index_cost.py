"""bench/index_cost: what each index of a table costs Postgres per row inserted.

    python -m bench.index_cost [--scenario identifiers|event_refs|merge_log|all]
                               [--base N] [--insert M] [--batch B] [--rounds R]

For each scenario, a table shaped like one of identity's is filled with N rows (by default the
size bench/identity's million events leave: 800,000 identifiers or event references, 200,000
merge log entries), then M more (200,000; 50,000 merge log entries) go in by COPY, B rows a
transaction (default 20,000, in the order the consumer sends them), once per variant of the
table's indexes. The figure is
the CPU of the Postgres backend per row of those M (from /proc: a server on this machine), and
the ratio against the variant with the heap alone, measured in the same round: these machines
are noisy, and each round runs every variant one after the other. What a variant adds to the
heap alone is what its indexes cost.

The identity consumer writes about one identifier, one event reference and 0.2 merge log
entries per event (bench/identity), so these per-row figures are most of its Postgres CPU per
event. Variants "(0002)", "(0007)"... are the migrations that introduced them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from bench.common import bench_postgres
from bench.statements import backend_cpu

UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
_T0 = datetime(2026, 1, 1, tzinfo=UTC)


def profile_of(person: int) -> str:
    return "p" + hashlib.md5(str(person).encode()).hexdigest()[:20]


def ident(i: int) -> tuple[str, str, int]:
    """(kind, value, person) of the i-th identifier: 5 a person, as bench/identity's."""
    k, person = i % 5, i // 5
    if k == 0:
        return "user_id", f"u{person}", person
    if k == 1:
        return "email", f"p{person}@bench.example", person
    return "anonymous_id", f"a{person}-{k - 2}", person


@dataclass
class Scenario:
    table: str  # "create table t (...)"
    columns: tuple[str, ...]
    rows: Callable[[int, int], list[tuple[Any, ...]]]  # rows [lo, hi), in the consumer's order
    variants: dict[str, list[str]]  # name -> index statements; the first is the heap alone
    base: int = 800_000  # rows there before (the size bench/identity's 1M events leave)
    insert: int = 200_000
    note: str = ""


def _identifier_rows(lo: int, hi: int) -> list[tuple[Any, ...]]:
    attrs = orjson.dumps({"user_agent": UA}).decode()
    out = []
    for i in range(lo, hi):
        kind, value, person = ident(i)
        t = _T0 + timedelta(seconds=i)
        out.append(
            ("s1", kind, value, profile_of(person), person + 1, t, f"m{i}", "src", t, False,
             attrs if kind == "anonymous_id" else None)
        )  # fmt: skip
    out.sort(key=lambda r: (r[2], r[1]))  # store.plan_write: by value, kind
    return out


def _ref_rows(lo: int, hi: int) -> list[tuple[Any, ...]]:
    out = []
    for i in range(lo, hi):
        kind, value, _ = ident(i)
        anchor = int.from_bytes(
            hashlib.blake2b(f"s1\x1f{kind}\x1f{value}".encode(), digest_size=8).digest(), "big"
        )
        out.append((anchor - (1 << 63), "s1", kind, value, _T0 + timedelta(seconds=i), f"m{i}", "src"))
    out.sort(key=lambda r: (r[3], r[2]))
    return out


def _merge_rows(lo: int, hi: int) -> list[tuple[Any, ...]]:
    return [
        ("s1", "merged", profile_of(i), [profile_of(i + 10**8)], [f"user_id:u{i}", f"anonymous_id:a{i}-1"],
         _T0 + timedelta(seconds=i), f"m{i}-3", "src")
        for i in range(lo, hi)
    ]  # fmt: skip


def collate_c(*columns: str) -> str:
    """A variant's first statement: these text columns of t compare byte by byte (identity's
    migration 0009), not by the database's collation (the embedded server's is C.UTF-8, which
    Postgres compares through strcoll). Not an index: `index_statements` leaves it out."""
    return "alter table t " + ", ".join(f'alter column {c} type text collate "C"' for c in columns)


def index_statements(statements: Sequence[str]) -> list[str]:
    """The statements of a variant that make an index (each holds every row)."""
    return [s for s in statements if not s.startswith("alter table t alter column")]


SCENARIOS: dict[str, Scenario] = {
    "identifiers": Scenario(
        table="""create table t (space_id text not null, kind text not null, value text not null,
            profile_id text not null, component_id bigint, first_time timestamptz not null,
            first_message_id text not null, first_source_id text not null,
            last_time timestamptz not null, isolated boolean not null default false, attrs jsonb)
            with (fillfactor = 80)""",
        columns=(
            "space_id",
            "kind",
            "value",
            "profile_id",
            "component_id",
            "first_time",
            "first_message_id",
            "first_source_id",
            "last_time",
            "isolated",
            "attrs",
        ),
        rows=_identifier_rows,
        variants={
            "heap alone": [],
            "key (space_id, kind, value) (0002)": [
                "alter table t add primary key (space_id, kind, value) include (profile_id)"
            ],
            "key (value, kind, space_id) (0007)": [
                "alter table t add primary key (value, kind, space_id) include (profile_id)"
            ],
            "(0007) + hash (profile_id)": [
                "alter table t add primary key (value, kind, space_id) include (profile_id)",
                "create index on t using hash (profile_id)",
            ],
            "(0007) + hash (profile_id) + btree (component_id)": [
                "alter table t add primary key (value, kind, space_id) include (profile_id)",
                "create index on t using hash (profile_id)",
                "create index on t (component_id) where component_id is not null",
            ],
            'the same, text keys collate "C" (0009): the table': [
                collate_c("space_id", "kind", "value", "profile_id"),
                "alter table t add primary key (value, kind, space_id) include (profile_id)",
                "create index on t using hash (profile_id)",
                "create index on t (component_id) where component_id is not null",
            ],
        },
    ),
    "event_refs": Scenario(
        table="""create table t (anchor bigint, space_id text not null, kind text not null,
            value text not null, "time" timestamptz not null, message_id text not null,
            source_id text not null)""",
        columns=("anchor", "space_id", "kind", "value", "time", "message_id", "source_id"),
        rows=_ref_rows,
        variants={
            "heap alone": [],
            "btree (space_id, kind, value, time) (0002)": [
                'create index on t (space_id, kind, value, "time")'
            ],
            "btree (value, kind, space_id, time) (0007)": [
                'create index on t (value, kind, space_id, "time")'
            ],
            'the same, text keys collate "C" (0009): the table': [
                collate_c("space_id", "kind", "value", "message_id", "source_id"),
                'create index on t (value, kind, space_id, "time")',
            ],
            "btree (a 64-bit digest, time)": ['create index on t (anchor, "time")'],
        },
        note="the anchor column (a digest of the identifier) is filled in every variant",
    ),
    "merge_log": Scenario(
        table="""create table t (id bigint generated always as identity primary key,
            space_id text not null, action text not null, reason text not null default '',
            limit_kind text not null default '', profile_id text not null,
            other_profile_ids text[] not null default '{}', identifiers text[] not null default '{}',
            event_time timestamptz, source_id text, message_id text,
            record_time timestamptz not null default now(), superseded_time timestamptz,
            note text not null default '', request_id text)""",
        columns=(
            "space_id",
            "action",
            "profile_id",
            "other_profile_ids",
            "identifiers",
            "event_time",
            "message_id",
            "source_id",
        ),
        rows=_merge_rows,
        base=200_000,  # 0.2 entries an event
        insert=50_000,
        variants={
            "heap alone (and its primary key)": [],
            "+ event, request": [
                "create index on t (message_id, source_id) where superseded_time is null",
                "create unique index on t (request_id) where request_id is not null",
            ],
            "+ btree (profile_id) (0001)": [
                "create index on t (message_id, source_id) where superseded_time is null",
                "create unique index on t (request_id) where request_id is not null",
                "create index on t (profile_id)",
            ],
            "+ hash (profile_id) (0008)": [
                "create index on t (message_id, source_id) where superseded_time is null",
                "create unique index on t (request_id) where request_id is not null",
                "create index on t using hash (profile_id)",
            ],
            "+ hash (profile_id) + gin (other_profile_ids): the table": [
                "create index on t (message_id, source_id) where superseded_time is null",
                "create unique index on t (request_id) where request_id is not null",
                "create index on t using hash (profile_id)",
                "create index on t using gin (other_profile_ids)",
            ],
        },
    ),
}


@dataclass
class Result:
    scenario: str
    rows: int
    # variant -> µs of backend CPU per row inserted, one figure per round
    per_row: dict[str, list[float]] = field(default_factory=dict)
    # variant -> index entries in the table after each round (rows x indexes: what was measured)
    entries: dict[str, int] = field(default_factory=dict)

    def report(self) -> str:
        names = list(self.per_row)
        lines = [f"{self.scenario}: backend CPU per row COPYed ({self.rows:,} rows, each round):"]
        for name in names:
            figures = " / ".join(f"{x:.2f}" for x in self.per_row[name])
            ratios = " / ".join(
                f"{x / h:.2f}" if h > 0 else "-"
                for x, h in zip(self.per_row[name], self.per_row[names[0]], strict=True)
            )
            lines.append(f"  {name:58s} {figures} µs   (x heap alone: {ratios})")
        return "\n".join(lines)


async def _index_entries(conn: asyncpg.Connection) -> int:
    """Entries in t's indexes (pg_class.reltuples after the analyze that vacuum runs)."""
    await conn.execute("vacuum (analyze) t")
    return int(
        await conn.fetchval(
            """select coalesce(sum(c.reltuples), 0)::bigint from pg_index i
               join pg_class c on c.oid = i.indexrelid where i.indrelid = 't'::regclass"""
        )
    )


async def measure(
    conn: asyncpg.Connection, name: str, scenario: Scenario, base: int, insert: int, batch: int, rounds: int
) -> Result:
    """Runs the scenario on `conn`, in a table `t` of the connection's database (dropped at the
    end)."""
    pid = conn.get_server_pid()
    result = Result(name, insert)
    for r in range(rounds):
        for variant, indexes in scenario.variants.items():
            await conn.execute("drop table if exists t")
            await conn.execute(scenario.table)
            for sql in indexes:
                await conn.execute(sql)
            for lo in range(0, base, 100_000):
                await conn.copy_records_to_table(
                    "t", records=scenario.rows(lo, min(base, lo + 100_000)), columns=scenario.columns
                )
            # As a table that has been there a while: vacuumed, its pages written out.
            await conn.execute("vacuum (analyze) t")
            await conn.execute("checkpoint")
            first = base + r * insert  # new rows each round: no round finds its keys in the cache
            used = 0.0
            for lo in range(first, first + insert, batch):
                rows = scenario.rows(lo, min(first + insert, lo + batch))
                before = backend_cpu(pid)
                async with conn.transaction():
                    await conn.copy_records_to_table("t", records=rows, columns=scenario.columns)
                after = backend_cpu(pid)
                if before is None or after is None:
                    raise RuntimeError("the Postgres backend's CPU is not readable here (/proc)")
                used += after - before
            result.per_row.setdefault(variant, []).append(used / insert * 1e6)
            result.entries[variant] = await _index_entries(conn)
        await conn.execute("drop table if exists t")
    return result


async def main(args: argparse.Namespace) -> None:
    url, _handle = bench_postgres()
    conn = await asyncpg.connect(url)
    try:
        names: Sequence[str] = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
        for name in names:
            sc = SCENARIOS[name]
            result = await measure(
                conn, name, sc, args.base or sc.base, args.insert or sc.insert, args.batch, args.rounds
            )
            print(result.report(), flush=True)
            if SCENARIOS[name].note:
                print(f"  ({SCENARIOS[name].note})")
    finally:
        await conn.close()


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    p.add_argument("--base", type=int, default=0, help="rows there before (default: the scenario's)")
    p.add_argument("--insert", type=int, default=0, help="rows measured (default: the scenario's)")
    p.add_argument("--batch", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
