"""The C encoder of COPY rows (services/identity/_copybin.c): what Postgres reads back is what
asyncpg's own encoder writes, its letters match the tables' column types, and a value it does
not take is refused by row and column (the store then lets asyncpg encode). Real Postgres."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import asyncpg
import pytest

import services.identity as pkg
from services.identity import store
from services.identity.app import MIGRATIONS
from touchpoint.platform.db import jsonb, migrate, sibling_pool

# Postgres' type of a column -> _copybin's letter.
LETTERS = {
    "text": "t",
    "bytea": "b",
    "jsonb": "j",
    "bigint": "q",
    "integer": "i",
    "boolean": "?",
    "timestamp with time zone": "T",
    "text[]": "A",
}


def _copybin() -> ModuleType:
    """The built extension itself, whether or not TOUCHPOINT_NATIVE loads it for the store."""
    found = sorted(pkg.NATIVE_DIR.glob("_copybin.*.so"))
    assert found, "build/native has no _copybin: run `make native`"
    loader = importlib.machinery.ExtensionFileLoader("services.identity._copybin", str(found[0]))
    spec = importlib.util.spec_from_file_location("services.identity._copybin", found[0], loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


async def test_each_copys_letters_are_its_columns_types(pool: asyncpg.Pool) -> None:
    await migrate(pool, "identity", MIGRATIONS)
    async with pool.acquire() as conn:
        await conn.execute(store._STAGES)
        for table, (schema, columns, letters) in store.COPIES.items():
            rows = await conn.fetch(
                """select attname, format_type(atttypid, atttypmod) as type from pg_attribute
                   where attrelid = $1::regclass and attnum > 0 and not attisdropped order by attnum""",
                f"{schema}.{table}" if schema else table,
            )
            types = {r["attname"]: r["type"] for r in rows}
            names = list(columns) if columns is not None else [r["attname"] for r in rows]
            assert "".join(LETTERS[types[n]] for n in names) == letters, table


TABLE = """create temp table copied (
    t text, b bytea, j jsonb, q bigint, i integer, f boolean, ts timestamptz, a text[])"""
LETTERS_OF_TABLE = "tbjqi?TA"


def _rows() -> list[tuple[Any, ...]]:
    return [
        ("plain", b"\x00\x01\xff", jsonb({"a": [1, 2]}), 1, 2, True, (0,), ["x", "y"]),
        ("é 中 🙂 \x1e", b"", b'{"raw": "json text"}', -(2**63), -(2**31), False, (-1,), []),
        ("", b"k", jsonb("a string"), 2**63 - 1, 2**31 - 1, True, (820_000_000_000_000,), ["", "ü"]),
        (None, None, None, None, None, None, None, None),
        ("x" * 100_000, bytes(range(256)) * 10, jsonb(None), 0, 0, False, (1,), ["a"] * 1000),
    ]


async def test_rows_read_back_as_asyncpg_writes_them(pool: asyncpg.Pool) -> None:
    enc = _copybin()
    raw = await sibling_pool(pool, max_size=1, raw_times=True)
    try:
        async with raw.acquire() as conn:
            await conn.execute(TABLE)
            await conn.copy_records_to_table("copied", records=_rows())
            want = [tuple(r) for r in await conn.fetch("select * from copied order by q nulls last")]
            await conn.execute("truncate copied")
            data = enc.encode(_rows(), LETTERS_OF_TABLE)
            await conn.copy_to_table("copied", source=memoryview(data), format="binary")
            got = [tuple(r) for r in await conn.fetch("select * from copied order by q nulls last")]
            assert got == want
            assert len(got) == 5
            # An empty list of rows is a valid stream (header and trailer).
            await conn.copy_to_table(
                "copied", source=memoryview(enc.encode([], LETTERS_OF_TABLE)), format="binary"
            )
            assert await conn.fetchval("select count(*) from copied") == 5
    finally:
        await raw.close()


@pytest.mark.parametrize(
    ("row", "error", "message"),
    [
        ((1, None), TypeError, "row 1, column 0: expected str, got int"),
        (("a", "not bytes"), TypeError, "row 1, column 1: expected bytes, got str"),
        (["a", b""], TypeError, "row 1: expected a tuple of 2 values"),
        (("a",), TypeError, "row 1: expected a tuple of 2 values"),
    ],
)
def test_a_value_of_another_type_is_refused_by_row_and_column(
    row: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _copybin().encode([("ok", b""), row], "tb")


@pytest.mark.parametrize(
    ("value", "letter", "error", "message"),
    [
        (2**31, "i", OverflowError, "out of range for int4"),
        (2**63, "q", OverflowError, "out of range for int8"),
        (True, "q", TypeError, "expected int, got bool"),
        (1, "?", TypeError, "expected bool, got int"),
        (datetime(2026, 1, 1, tzinfo=UTC), "T", TypeError, r"expected a \(microseconds,\) tuple"),
        ((1, 2), "T", TypeError, r"expected a \(microseconds,\) tuple"),
        ({"a": 1}, "j", TypeError, r"expected bytes \(jsonb\), got dict"),
        (["a", None], "A", TypeError, "NULL in an array"),
        ("abc", "A", TypeError, "expected a list of str"),
        ([1], "A", TypeError, "expected str, got int"),
        ("a", "z", ValueError, "unknown column type z"),
    ],
)
def test_values_out_of_a_columns_type_are_refused(
    value: Any, letter: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _copybin().encode([(value,)], letter)


async def test_the_store_copies_datetimes_through_asyncpg(pool: asyncpg.Pool) -> None:
    # SplitProfile and DeleteProfile write through a pool whose times are datetimes: the C
    # encoder refuses them and asyncpg encodes the rows, whether or not the encoder is built.
    await migrate(pool, "identity", MIGRATIONS)
    when = datetime(2026, 11, 30, 1, 2, 3, 456789, tzinfo=UTC)
    async with pool.acquire() as conn:
        await store.copy_rows(conn, "event_refs", [("copy-space", "user_id", "u1", when, "m1", "s1")])
        row = await conn.fetchrow("select * from identity.event_refs where space_id = 'copy-space'")
    assert tuple(row) == ("copy-space", "user_id", "u1", when, "m1", "s1")
