"""Every SQL statement of the ingest service."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.ingest.domain import Source
from touchpoint.platform.eventlog import NOTIFY_CHANNEL

# The columns of a prepared row (domain.prepare), in order. Instants are domain.PgTime and JSON
# objects jsonb bytes: write_rows takes a connection prepared by use_row_codecs.
EVENT_COLUMNS = (
    "space_id",
    "source_id",
    "message_id",
    "type",
    "user_id",
    "anonymous_id",
    "previous_id",
    "group_id",
    "event",
    "name",
    "timestamp",
    "original_timestamp",
    "sent_at",
    "received_at",
    "properties",
    "traits",
    "context",
    "integrations",
    "campaign",
    "click_ids",
)
SOURCE_ID, MESSAGE_ID, RECEIVED_AT = 1, 2, 13
_KEY_COLUMNS = ("source_id", "message_id", "received_at")


async def create_source(
    pool: asyncpg.Pool,
    *,
    write_key: str,
    name: str,
    space_id: str = "default",
    enabled: bool = True,
    source_id: str | None = None,
) -> str:
    """Creates a source (idempotent on write_key); returns its id."""
    sid = source_id or f"src_{secrets.token_hex(6)}"
    row = await pool.fetchrow(
        """insert into ingest.sources (id, space_id, name, write_key, enabled)
           values ($1, $2, $3, $4, $5)
           on conflict (write_key) do update set write_key = excluded.write_key
           returning id""",
        sid,
        space_id,
        name,
        write_key,
        enabled,
    )
    assert row is not None
    return str(row["id"])


async def set_source_enabled(pool: asyncpg.Pool, source_id: str, enabled: bool) -> None:
    await pool.execute("update ingest.sources set enabled = $2 where id = $1", source_id, enabled)


async def source_by_write_key(pool: asyncpg.Pool, write_key: str) -> Source | None:
    row = await pool.fetchrow(
        "select id, space_id, enabled from ingest.sources where write_key = $1", write_key
    )
    return None if row is None else Source(row["id"], row["space_id"], row["enabled"])


async def use_row_codecs(conn: asyncpg.Connection) -> None:
    """Makes a connection take rows' values as they are: timestamptz as (microseconds since
    2000-01-01,) and jsonb as bytes that start with the version byte (domain.PgTime). The
    encoders are C built-ins that return their argument, so COPY encodes a row with no Python
    call per value. Such a connection must not go back to the pool for others to use."""
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=bytes, decoder=bytes, format="binary")
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", encoder=tuple, decoder=tuple, format="tuple"
    )


async def write_rows(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> set[tuple[str, str]]:
    """Stores the rows whose (source_id, message_id) was not seen before, in one transaction.
    The values must suit the connection's codecs: prepared rows (PgTime, jsonb bytes) on a
    connection prepared by use_row_codecs, as the writer does; datetimes and JSON objects on
    any pool connection (tests and tools that write events directly).

    Returns the keys not stored because they were stored before (duplicates). The rows must
    not repeat a key. Dedup keys go in sorted order so that concurrent writers lock them in the
    same order and cannot deadlock; the events keep the order they came in (a batch's identify
    before its track), so the log's (xid, seq) order is the clients' order.

    The dedup keys are written with COPY, the cheapest insert there is (about half the database
    CPU of INSERT ... ON CONFLICT, which must probe and insert speculatively), as the first
    statement of the transaction. A key stored before (or by a concurrent transaction that
    commits first) fails that COPY with a unique violation, which rolls back nothing else; only
    then is the batch written again in a new transaction whose dedup insert uses ON CONFLICT DO
    NOTHING to learn which keys are new.
    """
    keys = sorted((r[SOURCE_ID], r[MESSAGE_ID], r[RECEIVED_AT]) for r in rows)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "message_ids", schema_name="ingest", columns=_KEY_COLUMNS, records=keys
            )
            await _copy_events(conn, rows)
        return set()
    except asyncpg.UniqueViolationError as exc:
        if exc.table_name != "message_ids":
            raise
    async with conn.transaction():
        fresh = await conn.fetch(
            """insert into ingest.message_ids (source_id, message_id, received_at)
               select * from unnest($1::text[], $2::text[], $3::timestamptz[])
               on conflict do nothing
               returning source_id, message_id""",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )
        stored = {(f["source_id"], f["message_id"]) for f in fresh}
        duplicates = {(k[0], k[1]) for k in keys} - stored
        if stored:
            await _copy_events(conn, [r for r in rows if (r[SOURCE_ID], r[MESSAGE_ID]) in stored])
    return duplicates


async def _copy_events(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    await conn.copy_records_to_table("events", schema_name="ingest", columns=EVENT_COLUMNS, records=rows)
    await conn.execute(f"notify {NOTIFY_CHANNEL}")


async def get_events(pool: asyncpg.Pool, source_id: str, message_ids: Sequence[str]) -> list[asyncpg.Record]:
    rows = await pool.fetch(
        """select * from ingest.event_log
           where source_id = $1 and message_id = any($2::text[])""",
        source_id,
        list(message_ids),
    )
    by_id = {r["message_id"]: r for r in rows}
    return [by_id[m] for m in message_ids if m in by_id]


async def ensure_partitions(pool: asyncpg.Pool, months_ahead: int = 2) -> None:
    await pool.execute("select ingest.ensure_partitions($1)", months_ahead)


async def prune_message_ids(pool: asyncpg.Pool, older_than: datetime, limit: int = 10_000) -> int:
    """Deletes dedup keys older than the window, a small batch at a time; returns how many."""
    result = await pool.execute(
        """delete from ingest.message_ids where ctid = any(array(
               select ctid from ingest.message_ids where received_at < $1 limit $2))""",
        older_than,
        limit,
    )
    return int(result.split()[-1])


async def delete_events(pool: asyncpg.Pool, refs: Sequence[tuple[str, str]]) -> int:
    result = await pool.execute(
        """delete from ingest.events e
           using unnest($1::text[], $2::text[]) as d(source_id, message_id)
           where e.source_id = d.source_id and e.message_id = d.message_id""",
        [r[0] for r in refs],
        [r[1] for r in refs],
    )
    return int(result.split()[-1])


async def suppress(pool: asyncpg.Pool, space_id: str, idents: Sequence[tuple[str, str]], reason: str) -> int:
    result = await pool.execute(
        """insert into ingest.suppressions (space_id, kind, value, reason)
           select $1, k, v, $4 from unnest($2::text[], $3::text[]) as t(k, v)
           on conflict do nothing""",
        space_id,
        [i[0] for i in idents],
        [i[1] for i in idents],
        reason,
    )
    return int(result.split()[-1])


async def suppressions(pool: asyncpg.Pool, space_id: str) -> frozenset[tuple[str, str]]:
    rows = await pool.fetch("select kind, value from ingest.suppressions where space_id = $1", space_id)
    return frozenset((r["kind"], r["value"]) for r in rows)
