"""Every SQL statement of the attribution service."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg

from services.attribution import domain
from services.attribution.domain import ChannelRule, ConversionRow, SpaceSettings, SpendRow, TouchRow
from touchpoint.platform.eventlog import LogEvent

IDENTITY_VIEW = "identity.profile_identifiers"


# ------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class SpaceState:
    settings: SpaceSettings
    active_generation: int
    pending_generation: int | None


def _state(row: asyncpg.Record) -> SpaceState:
    return SpaceState(
        SpaceSettings(
            space_id=row["space_id"],
            conversion_events=tuple(row["conversion_events"]),
            lookback_days={str(k): float(v) for k, v in (row["lookback_days"] or {}).items()},
            default_lookback_days=float(row["default_lookback_days"]),
            channel_rules=tuple(ChannelRule.from_dict(r) for r in row["channel_rules"] or []),
            version=int(row["version"]),
        ),
        int(row["active_generation"]),
        row["pending_generation"],
    )


async def space_states(
    conn: asyncpg.Connection | asyncpg.Pool, space_ids: Sequence[str]
) -> dict[str, SpaceState]:
    """The state of each space, creating default rows for spaces not seen before."""
    await conn.execute(
        "insert into attribution.spaces (space_id) select unnest($1::text[]) on conflict do nothing",
        list(space_ids),
    )
    rows = await conn.fetch(
        "select * from attribution.spaces where space_id = any($1::text[])", list(space_ids)
    )
    return {r["space_id"]: _state(r) for r in rows}


async def space_state(conn: asyncpg.Connection | asyncpg.Pool, space_id: str) -> SpaceState:
    return (await space_states(conn, [space_id]))[space_id]


async def save_settings(pool: asyncpg.Pool, s: SpaceSettings) -> SpaceState:
    await space_states(pool, [s.space_id])
    row = await pool.fetchrow(
        """update attribution.spaces set conversion_events = $2, lookback_days = $3,
               default_lookback_days = $4, channel_rules = $5, version = version + 1, updated_at = now()
           where space_id = $1 returning *""",
        s.space_id,
        list(s.conversion_events),
        dict(s.lookback_days),
        s.default_lookback_days,
        [r.as_dict() for r in s.channel_rules],
    )
    assert row is not None
    return _state(row)


# ------------------------------------------------------------------------------------------
# Applying the event log


def _touch_record(ev: LogEvent, generation: int, settings: SpaceSettings) -> tuple[Any, ...] | None:
    facts = domain.touch_of(ev)
    if facts is None:
        return None
    return (
        ev.space_id,
        generation,
        ev.source_id,
        ev.message_id,
        ev.timestamp,
        ev.user_id,
        ev.anonymous_id,
        facts.kind,
        domain.channel_of(facts, settings.channel_rules),
        facts.campaign,
        facts.source,
        facts.medium,
        facts.content,
        facts.term,
        facts.network,
        facts.referrer_domain,
    )


_TOUCH_COLUMNS = (
    "space_id",
    "generation",
    "source_id",
    "message_id",
    "touch_time",
    "user_id",
    "anonymous_id",
    "kind",
    "channel",
    "campaign",
    "source",
    "medium",
    "content",
    "term",
    "network",
    "referrer_domain",
)
_TOUCH_TYPES = (
    "text", "int", "text", "text", "timestamptz", "text", "text", "text", "text", "text", "text",
    "text", "text", "text", "text", "text",
)  # fmt: skip
_CONV_COLUMNS = (
    "space_id",
    "generation",
    "conversion_id",
    "event",
    "conversion_time",
    "value",
    "currency",
    "offline",
    "user_id",
    "anonymous_id",
    "source_id",
    "message_id",
)
_CONV_TYPES = (
    "text", "int", "text", "text", "timestamptz", "float8", "text", "bool", "text", "text", "text", "text",
)  # fmt: skip


def _unnest_insert(table: str, columns: Sequence[str], types: Sequence[str]) -> str:
    cols = ", ".join(columns)
    params = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
    return f"insert into attribution.{table} ({cols}) select * from unnest({params}) on conflict do nothing"


_INSERT_TOUCHES = _unnest_insert("touches", _TOUCH_COLUMNS, _TOUCH_TYPES)
_INSERT_CONVERSIONS = _unnest_insert("conversions", _CONV_COLUMNS, _CONV_TYPES)


async def apply_events(
    conn: asyncpg.Connection,
    events: Sequence[LogEvent],
    *,
    only_space: str | None = None,
    generation: int | None = None,
) -> tuple[int, int]:
    """Writes the touches, conversions and identity links of a batch of the log.

    The live consumer writes each space's active generation (and the pending one while a
    recomputation runs); a recomputation's replay passes `only_space` and `generation`.
    Returns (touches, conversions) written (before dedup)."""
    spaces = sorted({e.space_id for e in events if only_space is None or e.space_id == only_space})
    if not spaces:
        return 0, 0
    states = await space_states(conn, spaces)
    conversion_sets = {k: frozenset(v.settings.conversion_events) for k, v in states.items()}
    touches: list[tuple[Any, ...]] = []
    conversions: list[tuple[Any, ...]] = []
    links: set[tuple[str, str, str]] = set()
    for ev in events:
        state = states.get(ev.space_id)
        if state is None:
            continue
        gens = [generation] if generation is not None else [state.active_generation]
        if generation is None and state.pending_generation is not None:
            gens.append(state.pending_generation)
        for gen in gens:
            t = _touch_record(ev, gen, state.settings)
            if t is not None:
                touches.append(t)
            c = domain.conversion_of(ev, conversion_sets[ev.space_id])
            if c is not None:
                conversions.append(
                    (ev.space_id, gen, c.conversion_id, c.event, ev.timestamp, c.value, c.currency,
                     c.offline, ev.user_id, ev.anonymous_id, ev.source_id, ev.message_id)
                )  # fmt: skip
        if ev.user_id:
            for anon in (ev.anonymous_id, ev.previous_id):
                if anon and anon != ev.user_id:
                    links.add((ev.space_id, anon, ev.user_id))
    if touches:
        await conn.execute(_INSERT_TOUCHES, *(list(col) for col in zip(*touches, strict=True)))
    if conversions:
        # Deduplicated by order id: the first event of an order wins.
        await conn.execute(_INSERT_CONVERSIONS, *(list(col) for col in zip(*conversions, strict=True)))
    if links:
        cols = list(zip(*sorted(links), strict=True))
        await conn.execute(
            """insert into attribution.identity_links (space_id, anonymous_id, user_id)
               select * from unnest($1::text[], $2::text[], $3::text[]) on conflict do nothing""",
            *(list(c) for c in cols),
        )
    return len(touches), len(conversions)


# ------------------------------------------------------------------------------------------
# Reading paths


async def identity_view_exists(conn: asyncpg.Connection | asyncpg.Pool) -> bool:
    return bool(await conn.fetchval("select to_regclass($1) is not null", IDENTITY_VIEW))


async def resolve_profiles(
    conn: asyncpg.Connection | asyncpg.Pool,
    space_id: str,
    ids: set[tuple[str | None, str | None]],
    use_identity_view: bool,
) -> dict[tuple[str | None, str | None], str]:
    """The profile of each (user_id, anonymous_id): the one place that decides whose touches form
    a person's path.

    With the identity service's published view identity.profile_identifiers, a row belongs to the
    profile of its user_id, else of its anonymous_id ("profile:<id>"). Without the view (identity
    not deployed), the fallback stitches here: an anonymousId seen with a userId (same event or an
    alias) belongs to that user (the smallest userId when a device was shared); otherwise a row is
    keyed by its own ids. Switch by creating or dropping the view; nothing else changes. Merges
    and splits apply to the next report: nothing derived from a profile is stored."""
    users = sorted({u for u, _ in ids if u})
    anons = sorted({a for _, a in ids if a})
    by_user: dict[str, str] = {}
    by_anon: dict[str, str] = {}
    if use_identity_view:
        rows = await conn.fetch(
            f"""select kind, value, min(profile_id::text) as profile_id from {IDENTITY_VIEW}
                where space_id = $1 and ((kind = 'user_id' and value = any($2::text[]))
                                         or (kind = 'anonymous_id' and value = any($3::text[])))
                group by kind, value""",
            space_id,
            users,
            anons,
        )
        for r in rows:
            (by_user if r["kind"] == "user_id" else by_anon)[r["value"]] = "profile:" + r["profile_id"]
    else:
        rows = await conn.fetch(
            """select anonymous_id, min(user_id) as user_id from attribution.identity_links
               where space_id = $1 and anonymous_id = any($2::text[]) group by anonymous_id""",
            space_id,
            anons,
        )
        by_anon = {r["anonymous_id"]: "user_id:" + r["user_id"] for r in rows}
    out: dict[tuple[str | None, str | None], str] = {}
    for u, a in ids:
        key = by_user.get(u) if u else None
        if key is None and not use_identity_view and u:
            key = "user_id:" + u
        if key is None and a:
            key = by_anon.get(a)
        if key is None:
            key = "user_id:" + u if u else "anonymous_id:" + (a or "")
        out[(u, a)] = key
    return out


async def load_conversions(
    conn: asyncpg.Connection | asyncpg.Pool,
    space_id: str,
    generation: int,
    start: datetime,
    end: datetime,
    events: Sequence[str],
    use_identity_view: bool,
    conversion_id: str | None = None,
) -> list[ConversionRow]:
    if conversion_id is not None:
        where, arg = "conversion_id = $5", conversion_id
    else:
        where, arg = "event = any($5::text[])", list(events)  # type: ignore[assignment]
    rows = await conn.fetch(
        f"""select conversion_id, event, user_id, anonymous_id,
                   extract(epoch from conversion_time)::float8 as t, value, currency, offline
            from attribution.conversions
            where space_id = $1 and generation = $2 and conversion_time >= $3 and conversion_time < $4
              and {where}
            order by conversion_time, conversion_id""",
        space_id,
        generation,
        start,
        end,
        arg,
    )
    profiles = await resolve_profiles(
        conn, space_id, {(r["user_id"], r["anonymous_id"]) for r in rows}, use_identity_view
    )
    return [
        ConversionRow(
            r["conversion_id"],
            r["event"],
            profiles[(r["user_id"], r["anonymous_id"])],
            r["t"],
            r["value"],
            r["currency"],
            r["offline"],
        )
        for r in rows
    ]


async def load_touches(
    conn: asyncpg.Connection | asyncpg.Pool,
    space_id: str,
    generation: int,
    start: datetime,
    end: datetime,
    use_identity_view: bool,
    campaign_filter: str = "",
) -> list[TouchRow]:
    cond = " and campaign = $5" if campaign_filter else ""
    rows = await conn.fetch(
        f"""select user_id, anonymous_id, extract(epoch from touch_time)::float8 as t,
                   coalesce(campaign, '(none)') as campaign,
                   coalesce(source, case kind when 'direct' then '(direct)'
                                              when 'referrer' then referrer_domain
                                              when 'click_id' then network end, '(none)') as source,
                   coalesce(medium, case kind when 'referrer' then 'referral'
                                              when 'click_id' then 'cpc' end, '(none)') as medium,
                   coalesce(content, '(none)') as content, coalesce(term, '(none)') as term, channel, kind
            from attribution.touches
            where space_id = $1 and generation = $2 and touch_time >= $3 and touch_time <= $4{cond}""",
        space_id,
        generation,
        start,
        end,
        *([campaign_filter] if campaign_filter else []),
    )
    profiles = await resolve_profiles(
        conn, space_id, {(r["user_id"], r["anonymous_id"]) for r in rows}, use_identity_view
    )
    return [
        TouchRow(
            profiles[(r["user_id"], r["anonymous_id"])],
            r["t"],
            (r["campaign"], r["source"], r["medium"], r["content"], r["term"], r["channel"]),
            r["kind"],
            "user_id:" + r["user_id"] if r["user_id"] else "anonymous_id:" + r["anonymous_id"],
        )
        for r in rows
    ]


# ------------------------------------------------------------------------------------------
# Spend


async def request_seen(conn: asyncpg.Connection, space_id: str, request_id: str) -> str | None:
    """Records a request id; the stored result when it was applied before, else None."""
    row = await conn.fetchrow(
        """insert into attribution.requests (space_id, request_id) values ($1, $2)
           on conflict do nothing returning request_id""",
        space_id,
        request_id,
    )
    if row is not None:
        return None
    result = await conn.fetchval(
        "select result from attribution.requests where space_id = $1 and request_id = $2",
        space_id,
        request_id,
    )
    return str(result)


async def set_request_result(conn: asyncpg.Connection, space_id: str, request_id: str, result: str) -> None:
    await conn.execute(
        "update attribution.requests set result = $3 where space_id = $1 and request_id = $2",
        space_id,
        request_id,
        result,
    )


async def upsert_spend(
    conn: asyncpg.Connection, space_id: str, entries: Sequence[tuple[str, date, str, str, str, str, float]]
) -> int:
    """Entries (campaign, day, currency, source, medium, content, amount); a repeated key replaces."""
    latest: dict[tuple[str, date, str, str, str, str], float] = {}
    for *key, amount in entries:
        latest[tuple(key)] = amount  # type: ignore[index]
    ordered = sorted(latest.items())
    cols = list(zip(*[(*k, a) for k, a in ordered], strict=True))
    await conn.execute(
        """insert into attribution.spend (space_id, campaign, day, currency, source, medium, content, amount)
           select $1, * from unnest($2::text[], $3::date[], $4::text[], $5::text[], $6::text[], $7::text[],
                                    $8::float8[])
           on conflict (space_id, campaign, day, currency, source, medium, content)
           do update set amount = excluded.amount, updated_at = now()""",
        space_id,
        *(list(c) for c in cols),
    )
    return len(ordered)


async def load_spend(
    conn: asyncpg.Connection | asyncpg.Pool, space_id: str, start: date, end: date, currency: str
) -> list[SpendRow]:
    rows = await conn.fetch(
        """select campaign, source, medium, content, sum(amount) as amount from attribution.spend
           where space_id = $1 and day >= $2 and day < $3 and currency = $4
           group by campaign, source, medium, content""",
        space_id,
        start,
        end,
        currency,
    )
    return [SpendRow(r["campaign"], r["source"], r["medium"], r["content"], float(r["amount"])) for r in rows]


# ------------------------------------------------------------------------------------------
# Recomputation


LIVE_CONSUMER = "live"


async def start_recompute(pool: asyncpg.Pool, space_id: str) -> asyncpg.Record:
    """Creates a job at the live consumer's current position (locked, so no live batch is
    half-way) and marks the space's next generation as pending."""
    async with pool.acquire() as conn, conn.transaction():
        pos = await conn.fetchrow(
            "select xid, seq from attribution.log_positions where consumer = $1 for update", LIVE_CONSUMER
        )
        assert pos is not None
        await space_states(conn, [space_id])
        space = await conn.fetchrow(
            "select active_generation from attribution.spaces where space_id = $1 for update",
            space_id,
        )
        assert space is not None
        running = await conn.fetchrow(
            "select * from attribution.recompute_jobs where space_id = $1 and state = 'running'", space_id
        )
        if running is not None:
            return running
        generation = int(space["active_generation"]) + 1
        # Leftovers of a failed job of the same generation.
        await conn.execute(
            "delete from attribution.touches where space_id = $1 and generation = $2", space_id, generation
        )
        await conn.execute(
            "delete from attribution.conversions where space_id = $1 and generation = $2",
            space_id,
            generation,
        )
        total = await conn.fetchval(
            """select count(*) from ingest.event_log
               where space_id = $1 and (xid, seq) <= ($2::text::xid8, $3)""",
            space_id,
            str(pos["xid"]),
            pos["seq"],
        )
        job_id = f"rj_{secrets.token_hex(8)}"
        await conn.execute(
            "update attribution.spaces set pending_generation = $2 where space_id = $1", space_id, generation
        )
        row = await conn.fetchrow(
            """insert into attribution.recompute_jobs
                   (id, space_id, generation, stop_xid, stop_seq, total_events)
               values ($1, $2, $3, $4, $5, $6) returning *""",
            job_id,
            space_id,
            generation,
            pos["xid"],
            pos["seq"],
            total,
        )
        assert row is not None
        return row


async def get_job(conn: asyncpg.Connection | asyncpg.Pool, job_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("select * from attribution.recompute_jobs where id = $1", job_id)


async def running_jobs(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "select * from attribution.recompute_jobs where state = 'running' order by created_at"
    )


async def add_job_progress(conn: asyncpg.Connection, job_id: str, processed: int) -> None:
    await conn.execute(
        "update attribution.recompute_jobs set processed_events = processed_events + $2 where id = $1",
        job_id,
        processed,
    )


async def finish_job(pool: asyncpg.Pool, job: asyncpg.Record) -> None:
    """Switches the space to the job's generation and drops the previous one. Holds the live
    consumer's position like a live batch does, so no batch still writes the old generation."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "select 1 from attribution.log_positions where consumer = $1 for update", LIVE_CONSUMER
        )
        old = await conn.fetchval(
            "select active_generation from attribution.spaces where space_id = $1 for update", job["space_id"]
        )
        await conn.execute(
            """update attribution.spaces set active_generation = $2, pending_generation = null
               where space_id = $1""",
            job["space_id"],
            job["generation"],
        )
        for table in ("touches", "conversions"):
            await conn.execute(
                f"delete from attribution.{table} where space_id = $1 and generation = $2",
                job["space_id"],
                old,
            )
        await conn.execute(
            """update attribution.recompute_jobs set state = 'succeeded', ended_at = now(),
                   processed_events = total_events where id = $1""",
            job["id"],
        )
        await conn.execute(
            "delete from attribution.log_positions where consumer = $1", f"recompute_{job['id']}"
        )


async def fail_job(pool: asyncpg.Pool, job: asyncpg.Record, error: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "update attribution.spaces set pending_generation = null where space_id = $1", job["space_id"]
        )
        await conn.execute(
            """update attribution.recompute_jobs set state = 'failed', ended_at = now(), error = $2
               where id = $1""",
            job["id"],
            error[:1000],
        )
