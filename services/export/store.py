"""Every SQL statement of the export service."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from services.export.domain import EXPORTED_CLICK_KINDS, Click, Prepared
from touchpoint.platform.eventlog import LogEvent

NOTIFY_CHANNEL = "touchpoint_export_outbox"
IDENTITY_VIEW = "identity.profile_identifiers"

# --- destinations ------------------------------------------------------------------------------

_DEST_COLUMNS = """id, display_name, kind, base_url, settings, credential_env, credentials_encrypted,
    credential_keys, event_names, enabled, requests_per_second, max_batch_size, created_at, updated_at"""


async def create_destination(pool: asyncpg.Pool, row: dict[str, Any]) -> tuple[asyncpg.Record, bool]:
    """Inserts a destination; (row, created). An existing id answers the stored row, not created."""
    async with pool.acquire() as conn, conn.transaction():
        inserted = await conn.fetchrow(
            f"""insert into export.destinations (id, display_name, kind, base_url, settings, credential_env,
                   credentials_encrypted, credential_keys, event_names, enabled, requests_per_second,
                   max_batch_size)
               values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
               on conflict (id) do nothing
               returning {_DEST_COLUMNS}""",
            row["id"],
            row["display_name"],
            row["kind"],
            row["base_url"],
            row["settings"],
            row["credential_env"],
            row["credentials_encrypted"],
            row["credential_keys"],
            row["event_names"],
            row["enabled"],
            row["requests_per_second"],
            row["max_batch_size"],
        )
        if inserted is not None:
            return inserted, True
        existing = await conn.fetchrow(
            f"select {_DEST_COLUMNS} from export.destinations where id = $1", row["id"]
        )
        assert existing is not None
        return existing, False


async def get_destination(pool: asyncpg.Pool, dest_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(f"select {_DEST_COLUMNS} from export.destinations where id = $1", dest_id)


async def list_destinations(pool: asyncpg.Pool, after: str = "", limit: int = 1000) -> list[asyncpg.Record]:
    """In creation order (then id), after the (created_at, id) cursor `after` ("" = from the start)."""
    if after:
        ts, _, dest_id = after.partition("|")
        return await pool.fetch(
            f"""select {_DEST_COLUMNS} from export.destinations
                where (created_at, id) > ($1::timestamptz, $2) order by created_at, id limit $3""",
            datetime.fromisoformat(ts),
            dest_id,
            limit,
        )
    return await pool.fetch(
        f"select {_DEST_COLUMNS} from export.destinations order by created_at, id limit $1", limit
    )


async def update_destination(
    pool: asyncpg.Pool, dest_id: str, changes: dict[str, Any]
) -> asyncpg.Record | None:
    allowed = {
        "display_name", "base_url", "settings", "credential_env", "credentials_encrypted", "credential_keys",
        "event_names", "enabled", "requests_per_second", "max_batch_size",
    }  # fmt: skip
    cols = [c for c in changes if c in allowed]
    if not cols:
        return await get_destination(pool, dest_id)
    sets = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(cols))
    return await pool.fetchrow(
        f"update export.destinations set {sets}, updated_at = now() where id = $1 returning {_DEST_COLUMNS}",
        dest_id,
        *[changes[c] for c in cols],
    )


# --- intake --------------------------------------------------------------------------------------


async def existing_orders(
    conn: asyncpg.Connection, space_id: str, source: str, order_ids: Sequence[str]
) -> dict[str, int]:
    rows = await conn.fetch(
        """select order_id, id from export.conversions
           where space_id = $1 and source = $2 and order_id = any($3::text[])""",
        space_id,
        source,
        list(order_ids),
    )
    return {r["order_id"]: r["id"] for r in rows}


@dataclass(slots=True)
class MatchResult:
    profile_id: str | None
    status: str
    reason: str
    google: Click | None = None
    meta_fbc: str | None = None
    campaign: dict[str, Any] | None = None


async def insert_conversions(
    conn: asyncpg.Connection,
    space_id: str,
    source: str,
    rows: Sequence[Prepared],
    matches: Sequence[MatchResult],
    received_at: datetime,
) -> dict[str, int]:
    """Stores conversions whose order id is new; returns order id -> id of those stored now.
    A concurrent transaction storing the same order id first makes this one skip it."""
    if not rows:
        return {}
    # One jsonb parameter unpacked by Postgres (jsonb_to_recordset) costs far less per row than
    # two dozen typed arrays encoded by the driver (orjson writes the datetimes as RFC 3339).
    payload = orjson.dumps(
        [
            {
                "order_id": r.order_id,
                "event_name": r.event_name,
                "event_time": r.event_time,
                "time_zone": r.time_zone,
                "value": r.value,
                "currency": r.currency,
                "store_id": r.store_id,
                "meta_user_data": r.meta_user_data,
                "google_user": r.google_user,
                "gclid": r.gclid,
                "gbraid": r.gbraid,
                "wbraid": r.wbraid,
                "fbclid": r.fbclid,
                "profile_id": m.profile_id,
                "match_status": m.status,
                "match_reason": m.reason,
                "click_kind": m.google.kind if m.google else None,
                "click_value": m.google.value if m.google else None,
                "click_time": m.google.first_seen if m.google else None,
                "fbc": m.meta_fbc,
                "campaign": m.campaign,
            }
            for r, m in zip(rows, matches, strict=True)
        ]
    )
    stored = await conn.fetch(
        """insert into export.conversions (space_id, source, order_id, event_name, event_time, time_zone,
               value, currency, store_id, meta_user_data, google_user, gclid, gbraid, wbraid, fbclid,
               profile_id, match_status, match_reason, click_kind, click_value, click_time, fbc, campaign,
               received_at)
           select $1, $2, t.*, $4 from jsonb_to_recordset($3::jsonb) as t(
               order_id text, event_name text, event_time timestamptz, time_zone text, value numeric,
               currency text, store_id text, meta_user_data jsonb, google_user jsonb, gclid text, gbraid text,
               wbraid text, fbclid text, profile_id text, match_status text, match_reason text,
               click_kind text, click_value text, click_time timestamptz, fbc text, campaign jsonb)
           on conflict (space_id, source, order_id) do nothing
           returning order_id, id""",
        space_id,
        source,
        payload,
        received_at,
    )
    return {r["order_id"]: r["id"] for r in stored}


_COPY_COLUMNS = [
    "space_id", "source", "order_id", "event_name", "event_time", "time_zone", "value", "currency", "store_id",
    "meta_user_data", "google_user", "gclid", "gbraid", "wbraid", "fbclid", "profile_id", "match_status",
    "match_reason", "click_kind", "click_value", "click_time", "fbc", "campaign", "received_at",
]  # fmt: skip


async def copy_conversions(
    conn: asyncpg.Connection,
    space_id: str,
    source: str,
    rows: Sequence[Prepared],
    matches: Sequence[MatchResult],
    received_at: datetime,
) -> dict[str, int]:
    """`insert_conversions` for order ids this transaction has just checked are new: a binary
    COPY, which costs Postgres half as much per row as unpacking a JSON document. Raises
    asyncpg.UniqueViolationError (and the transaction is lost) when a concurrent transaction
    stored one of the order ids meanwhile: the caller then starts again with
    `insert_conversions`. Returns order id -> id."""
    if not rows:
        return {}
    await conn.copy_records_to_table(
        "conversions",
        schema_name="export",
        columns=_COPY_COLUMNS,
        records=[
            (
                space_id,
                source,
                r.order_id,
                r.event_name,
                r.event_time,
                r.time_zone,
                # As text: the driver would write a float's exact binary expansion to numeric
                # (0.1000000000000000055...); repr is the shortest form, as JSON would send.
                None if r.value is None else repr(r.value),
                r.currency,
                r.store_id,
                orjson.dumps(r.meta_user_data),
                orjson.dumps(r.google_user),
                r.gclid,
                r.gbraid,
                r.wbraid,
                r.fbclid,
                m.profile_id,
                m.status,
                m.reason,
                m.google.kind if m.google else None,
                m.google.value if m.google else None,
                m.google.first_seen if m.google else None,
                m.meta_fbc,
                None if m.campaign is None else orjson.dumps(m.campaign),
                received_at,
            )
            for r, m in zip(rows, matches, strict=True)
        ],
    )
    # This transaction's rows, through the (xid, id) index.
    stored = await conn.fetch("select order_id, id from export.conversions where xid = pg_current_xact_id()")
    return {r["order_id"]: r["id"] for r in stored}


@dataclass(slots=True)
class Queued:
    """An outbox row intake has just inserted (lease_token set: leased to a lane of this process)."""

    outbox_id: int
    conversion_id: int
    destination_id: str
    lease_token: int | None


async def enqueue(
    conn: asyncpg.Connection,
    ids: Sequence[int],
    event_names: Sequence[str],
    leases: Mapping[str, int] | None = None,
    lease_seconds: float = 0.0,
) -> list[Queued]:
    """Queues each new conversion for every enabled destination that takes its event name.

    `leases` (destination -> token) are lanes of this process that take the new rows directly:
    those rows are inserted already claimed (state 'sending', first attempt, leased for
    `lease_seconds` with the token), as `claim` would leave them, and due only when the lease runs
    out (so claims do not even look at them before). The others are pending, and a NOTIFY wakes
    the workers.

    `ids` are conversions this transaction has just inserted, so none is queued yet: a plain
    insert (the unique (conversion_id, destination_id) index would refuse a second one; no
    ON CONFLICT, whose speculative insertion costs half as much again per row)."""
    if not ids:
        return []
    leases = leases or {}
    rows = await conn.fetch(
        """insert into export.outbox (conversion_id, destination_id, state, attempts, lease_token, lease_until,
                   next_attempt_at)
           select c.id, d.id, case when h.token is null then 'pending' else 'sending' end,
                  case when h.token is null then 0 else 1 end, h.token,
                  case when h.token is not null then now() + make_interval(secs => $5) end,
                  case when h.token is not null then now() + make_interval(secs => $5) else now() end
           from unnest($1::bigint[], $2::text[]) as c(id, event_name)
           join export.destinations d
             on d.enabled and (cardinality(d.event_names) = 0 or c.event_name = any(d.event_names))
           left join unnest($3::text[], $4::bigint[]) as h(destination_id, token) on h.destination_id = d.id
           returning id, conversion_id, destination_id, lease_token""",
        list(ids),
        list(event_names),
        list(leases),
        list(leases.values()),
        lease_seconds,
    )
    queued = [Queued(*r) for r in rows]
    if any(q.lease_token is None for q in queued):
        await conn.execute(f"notify {NOTIFY_CHANNEL}")
    return queued


# --- matching ------------------------------------------------------------------------------------


async def relation_exists(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> bool:
    return bool(await conn.fetchval("select to_regclass($1) is not null", name))


async def resolve_profiles(
    conn: asyncpg.Connection,
    space_id: str,
    keys: Sequence[tuple[str | None, str | None, str | None]],
) -> dict[int, tuple[str, str]]:
    """Index -> (profile id, identifier kind that matched) through identity's published view,
    trying user_id (the external id), then email, then phone."""
    idx = list(range(len(keys)))
    rows = await conn.fetch(
        f"""with input as (
                select * from unnest($2::int[], $3::text[], $4::text[], $5::text[]) as t(i, ext, email, phone)
            ), cand as (
                select i.i, p.profile_id, 'user_id' as kind, 1 as priority
                  from input i join {IDENTITY_VIEW} p
                    on p.space_id = $1 and p.kind = 'user_id' and p.value = i.ext
                union all
                select i.i, p.profile_id, 'email', 2
                  from input i join {IDENTITY_VIEW} p
                    on p.space_id = $1 and p.kind = 'email' and p.value = i.email
                union all
                select i.i, p.profile_id, 'phone', 3
                  from input i join {IDENTITY_VIEW} p
                    on p.space_id = $1 and p.kind = 'phone' and p.value = i.phone
            )
            select distinct on (i) i, profile_id, kind from cand order by i, priority, profile_id""",
        space_id,
        idx,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
    )
    return {r["i"]: (r["profile_id"], r["kind"]) for r in rows}


async def profile_holders(
    conn: asyncpg.Connection, space_id: str, profile_ids: Sequence[str]
) -> dict[str, list[tuple[str, str]]]:
    """The user_ids and anonymous_ids of each profile: whose clicks count as the profile's."""
    rows = await conn.fetch(
        f"""select profile_id, kind, value from {IDENTITY_VIEW}
            where space_id = $1 and profile_id = any($2::text[]) and kind in ('user_id', 'anonymous_id')""",
        space_id,
        list(set(profile_ids)),
    )
    out: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        out.setdefault(r["profile_id"], []).append((r["kind"], r["value"]))
    return out


async def clicks_of(
    conn: asyncpg.Connection,
    space_id: str,
    holders: Sequence[tuple[int, str, str]],
    since: Sequence[datetime],
    until: Sequence[datetime],
) -> dict[int, list[Click]]:
    """Clicks first seen in [since, until] of each (index, holder kind, holder)."""
    if not holders:
        return {}
    rows = await conn.fetch(
        """select h.i, c.kind, c.value, c.first_seen, c.campaign
           from unnest($2::int[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[])
                as h(i, hk, hv, since, until)
           join export.clicks c
             on c.space_id = $1 and c.holder_kind = h.hk and c.holder = h.hv
            and c.first_seen >= h.since and c.first_seen <= h.until""",
        space_id,
        [h[0] for h in holders],
        [h[1] for h in holders],
        [h[2] for h in holders],
        list(since),
        list(until),
    )
    out: dict[int, list[Click]] = {}
    for r in rows:
        out.setdefault(r["i"], []).append(Click(r["kind"], r["value"], r["first_seen"], r["campaign"]))
    return out


async def apply_click_events(conn: asyncpg.Connection, events: list[LogEvent]) -> None:
    """Event-log consumer step: keeps each exportable click id per holder, first seen time kept,
    and which events it was seen in (export.click_events), skipping events identity erased."""
    rows: dict[tuple[str, str, str, str, str, str], tuple[str, datetime, Any]] = {}
    for e in events:
        if not e.click_ids:
            continue
        for c in e.click_ids:
            kind, value = c.get("kind"), c.get("value")
            if kind not in EXPORTED_CLICK_KINDS or not value:
                continue
            for holder_kind, holder in (("user_id", e.user_id), ("anonymous_id", e.anonymous_id)):
                if not holder:
                    continue
                key = (e.source_id, e.message_id, holder_kind, kind, value, holder)
                if key not in rows or e.timestamp < rows[key][1]:
                    rows[key] = (e.space_id, e.timestamp, e.campaign or None)
    if not rows:
        return
    keys = sorted(rows)
    # The events' sightings first; the clicks are the earliest sighting per (holder, click id)
    # among those kept, so an event already erased adds nothing.
    await conn.execute(
        """with seen as (
               insert into export.click_events as ce
                   (space_id, source_id, message_id, holder_kind, kind, value, holder, seen, campaign)
               select u.sp, u.src, u.mid, u.hk, u.kind, u.value, u.holder, u.seen, u.campaign
               from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                           $7::text[], $8::timestamptz[], $9::jsonb[])
                    as u(src, mid, hk, kind, value, holder, sp, seen, campaign)
               where not exists (select 1 from export.erased_events x
                                 where x.source_id = u.src and x.message_id = u.mid)
               on conflict (source_id, message_id, holder_kind, kind, value) do update
                 set seen = least(ce.seen, excluded.seen)
               returning ce.space_id, ce.holder_kind, ce.holder, ce.kind, ce.value, ce.seen, ce.campaign)
           insert into export.clicks (space_id, holder_kind, holder, kind, value, first_seen, campaign)
           select distinct on (space_id, holder_kind, holder, kind, value)
                  space_id, holder_kind, holder, kind, value, seen, campaign
           from seen
           order by space_id, holder_kind, holder, kind, value, seen
           on conflict (space_id, holder_kind, holder, kind, value) do update
             set first_seen = excluded.first_seen, campaign = excluded.campaign
             where excluded.first_seen < export.clicks.first_seen""",
        *(list(col) for col in zip(*keys, strict=True)),
        [rows[k][0] for k in keys],
        [rows[k][1] for k in keys],
        [rows[k][2] for k in keys],
    )


async def apply_erasures(conn: asyncpg.Connection, erased: list[asyncpg.Record]) -> None:
    """Consumer step of identity.erased_events: drops what export derived from erased events.

    The events' click sightings go; a click of export.clicks seen only in erased events goes, the
    others keep their earliest remaining sighting; conversions matched to an erased click id lose
    the click, its fbc and its campaign (the conversion itself came from the store, not from the
    events, and stays).
    """
    if not erased:
        return
    refs = sorted({(r["source_id"], r["message_id"]) for r in erased})
    srcs, mids = [r[0] for r in refs], [r[1] for r in refs]
    await conn.execute(
        """insert into export.erased_events (source_id, message_id)
           select * from unnest($1::text[], $2::text[]) on conflict do nothing""",
        srcs,
        mids,
    )
    gone = await conn.fetch(
        """delete from export.click_events ce using unnest($1::text[], $2::text[]) as u(src, mid)
           where ce.source_id = u.src and ce.message_id = u.mid
           returning ce.space_id, ce.holder_kind, ce.holder, ce.kind, ce.value""",
        srcs,
        mids,
    )
    if not gone:
        return
    keys = sorted({(r["space_id"], r["holder_kind"], r["holder"], r["kind"], r["value"]) for r in gone})
    cols = [list(col) for col in zip(*keys, strict=True)]
    await conn.execute(
        """delete from export.clicks k
           using unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) as u(sp, hk, h, kind, value)
           where k.space_id = u.sp and k.holder_kind = u.hk and k.holder = u.h and k.kind = u.kind
             and k.value = u.value
             and not exists (select 1 from export.click_events ce
                             where ce.space_id = u.sp and ce.holder_kind = u.hk and ce.holder = u.h
                               and ce.kind = u.kind and ce.value = u.value)""",
        *cols,
    )
    await conn.execute(
        """update export.clicks k set first_seen = f.seen, campaign = f.campaign
           from (select distinct on (ce.space_id, ce.holder_kind, ce.holder, ce.kind, ce.value)
                        ce.space_id, ce.holder_kind, ce.holder, ce.kind, ce.value, ce.seen, ce.campaign
                 from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                      as u(sp, hk, h, kind, value)
                 join export.click_events ce
                   on ce.space_id = u.sp and ce.holder_kind = u.hk and ce.holder = u.h
                  and ce.kind = u.kind and ce.value = u.value
                 order by ce.space_id, ce.holder_kind, ce.holder, ce.kind, ce.value, ce.seen) f
           where k.space_id = f.space_id and k.holder_kind = f.holder_kind and k.holder = f.holder
             and k.kind = f.kind and k.value = f.value
             and (k.first_seen, k.campaign) is distinct from (f.seen, f.campaign)""",
        *cols,
    )
    # A click id names one click: conversions matched to it lose it whoever else saw it. Rare
    # (erased events that carried click ids), so a scan of the space's conversions is affordable.
    clicks = sorted({(k[0], k[3], k[4]) for k in keys})
    google = [c for c in clicks if c[1] != "fbclid"]
    if google:
        await conn.execute(
            """update export.conversions c
               set click_kind = null, click_value = null, click_time = null, campaign = null
               from unnest($1::text[], $2::text[], $3::text[]) as u(sp, kind, value)
               where c.space_id = u.sp and c.click_kind = u.kind and c.click_value = u.value""",
            *(list(col) for col in zip(*google, strict=True)),
        )
    meta = [c for c in clicks if c[1] == "fbclid"]
    if meta:
        # fbc is "fb.1.<ms>.<fbclid>"; one the store sent itself (fbclid set) is the store's.
        await conn.execute(
            """update export.conversions c set fbc = null, campaign = null
               from unnest($1::text[], $2::text[]) as u(sp, value)
               where c.space_id = u.sp and c.fbclid = '' and c.fbc like 'fb.1.%'
                 and right(c.fbc, length(u.value) + 1) = '.' || u.value""",
            [c[0] for c in meta],
            [c[2] for c in meta],
        )


# --- delivery ------------------------------------------------------------------------------------

_CLAIM_COLUMNS = """o.id as outbox_id, o.attempts, o.retry_base, o.reason, c.id as conversion_id, c.order_id,
    c.event_name, c.event_time, c.time_zone, c.value::float8 as value, c.currency, c.store_id,
    c.meta_user_data, c.google_user, c.gclid, c.gbraid, c.wbraid, c.fbclid, c.click_kind, c.click_value,
    c.click_time, c.fbc, c.received_at"""


async def claim(
    pool: asyncpg.Pool, destination_id: str, limit: int, lease_seconds: float, token: int
) -> list[asyncpg.Record]:
    """Leases up to `limit` due deliveries of a destination to this worker.

    The claim is its own short transaction (FOR UPDATE SKIP LOCKED: replicas never take the same
    rows); the rows stay 'sending' until the lease ends, and sending happens outside any
    transaction, so no transaction stays open across an HTTP call (an open one would hold back
    the event-log horizon of every consumer in the cluster). A row whose lease ran out (its
    worker stopped mid-batch) is taken again; it comes back with reason LEASE_EXPIRED.

    The claim is a HOT update (migration 0002: it changes no indexed column), and the rows are
    reached through their primary key, so its cost does not grow with the outbox's history.

    Delivery bookkeeping commits asynchronously (synchronous_commit off): a claim lost in a
    crash of Postgres only means its rows are claimed again, and sent again at worst, which the
    platforms deduplicate by event_id / order id.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("set local synchronous_commit = off")
        return await conn.fetch(
            f"""with due as (
                    select id from export.outbox
                    where destination_id = $1 and next_attempt_at <= now()
                      and (state = 'pending' or lease_until < now())
                    order by next_attempt_at, id
                    limit $2
                    for update skip locked
                )
                update export.outbox o
                   set state = 'sending', attempts = o.attempts + 1, lease_token = $4,
                       lease_until = now() + make_interval(secs => $3),
                       reason = case when o.state = 'sending' then 'LEASE_EXPIRED' else o.reason end
                  from export.conversions c
                 where o.id = any(array(select id from due)) and c.id = o.conversion_id
                returning {_CLAIM_COLUMNS}""",
            destination_id,
            limit,
            lease_seconds,
            token,
        )


@dataclass(slots=True)
class RowUpdate:
    outbox_id: int
    attempt: int
    # delivered | pending (retry) | dead | skipped
    state: str
    outcome: str
    reason: str
    detail: str
    delay_seconds: float = 0.0


# One statement per group of rows with the same result (usually one group per batch: all
# delivered, or all to retry). The rows are reached by primary key (`= any`), never by a join
# whose plan could turn quadratic. A delivered row's attempt is recorded on the row itself
# (request_id, delivered_at, reason, detail); every other result also gets an attempts row.
_COMPLETE = """with held as (
        update export.outbox
           set state = $3, reason = $5, detail = $6, lease_token = null, lease_until = null,
               request_id = $7,
               next_attempt_at = case when $3 = 'pending' then now() + make_interval(secs => $8) end,
               delivered_at = case when $3 = 'delivered' then now() else delivered_at end,
               dead_at = case when $3 = 'dead' then now() else dead_at end
         where id = any($1::bigint[]) and lease_token = $2 and state = 'sending'
        returning id, attempts
    )
    insert into export.attempts (outbox_id, attempt, request_id, outcome, reason, detail)
    select id, attempts, $7, $4, $5, $6 from held where $3 <> 'delivered'"""


async def complete(
    pool: asyncpg.Pool,
    destination_id: str,
    token: int,
    updates: Sequence[RowUpdate],
    *,
    http_status: int,
    http_requests: int,
    duration_ms: float,
    response: str,
) -> None:
    """Records the results of a claimed batch in one transaction. A row whose lease ran out and
    was taken by another worker is left to it (the lease token no longer matches).

    Committed asynchronously (see `claim`): if Postgres crashes before the commit reaches the
    disk, the rows come back when their lease runs out and are sent again, which the platforms
    deduplicate by event_id / order id; nothing is lost.
    """
    groups: dict[tuple[str, str, str, str, float], list[int]] = {}
    for u in updates:
        groups.setdefault((u.state, u.outcome, u.reason, u.detail, u.delay_seconds), []).append(u.outbox_id)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("set local synchronous_commit = off")
        request_id = None
        if http_requests:
            request_id = await conn.fetchval(
                """insert into export.requests (destination_id, http_status, row_count, http_requests,
                       duration_ms, response)
                   values ($1, $2, $3, $4, $5, $6) returning id""",
                destination_id,
                http_status,
                len(updates),
                http_requests,
                duration_ms,
                response,
            )
        args = [
            (ids, token, state, outcome, reason, detail, request_id, delay)
            for (state, outcome, reason, detail, delay), ids in groups.items()
        ]
        if len(args) == 1:
            await conn.execute(_COMPLETE, *args[0])
        elif args:
            # Pipelined: one round trip whatever the number of groups.
            await conn.executemany(_COMPLETE, args)


async def release(pool: asyncpg.Pool, token: int, outbox_ids: Sequence[int]) -> None:
    """Leased rows this worker will not send after all: pending again, due now, their unsent
    attempt not counted."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("set local synchronous_commit = off")
        result = await conn.execute(
            """update export.outbox
                  set state = 'pending', attempts = attempts - 1, lease_token = null, lease_until = null,
                      next_attempt_at = now()
                where id = any($1::bigint[]) and lease_token = $2 and state = 'sending'""",
            list(outbox_ids),
            token,
        )
        if int(result.split()[-1]):
            await conn.execute(f"notify {NOTIFY_CHANNEL}")


async def outbox_depth(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Per destination: deliveries not yet done (pending or sending) and the age of the oldest.
    Reads only the rows still waiting (the outbox_due index), not the delivered history."""
    return await pool.fetch(
        """select destination_id, count(*) as depth,
                  coalesce(extract(epoch from now() - min(created_at)), 0)::float8 as oldest_age
           from export.outbox where next_attempt_at is not null group by destination_id"""
    )


# --- status, dead letters ------------------------------------------------------------------------


async def conversions_by_ids(pool: asyncpg.Pool, ids: Sequence[int]) -> list[asyncpg.Record]:
    return await pool.fetch("select * from export.conversions where id = any($1::bigint[])", list(ids))


async def conversions_by_orders(
    pool: asyncpg.Pool, space_id: str, source: str, order_ids: Sequence[str]
) -> list[asyncpg.Record]:
    return await pool.fetch(
        """select * from export.conversions
           where space_id = $1 and source = $2 and order_id = any($3::text[])""",
        space_id,
        source,
        list(order_ids),
    )


async def deliveries_of(pool: asyncpg.Pool, conversion_ids: Sequence[int]) -> list[asyncpg.Record]:
    return await pool.fetch(
        """select id, conversion_id, destination_id, state, attempts, reason, detail, delivered_at,
                  next_attempt_at
           from export.outbox where conversion_id = any($1::bigint[])
           order by conversion_id, destination_id""",
        list(conversion_ids),
    )


async def attempts_of(
    pool: asyncpg.Pool, outbox_ids: Sequence[int], per_delivery: int = 50
) -> list[asyncpg.Record]:
    """Every attempt of each delivery (the last `per_delivery`), oldest first: the attempts rows
    and, for a delivered row, the delivering attempt kept on the row itself (migration 0002)."""
    return await pool.fetch(
        """select n.outbox_id, n.attempt, n.at, n.outcome, n.reason, n.detail,
                  coalesce(r.http_status, 0) as http_status, coalesce(r.response, '') as response
           from (
               select t.*, row_number() over (partition by t.outbox_id order by t.attempt desc) as rn
               from (
                   select a.outbox_id, a.attempt, a.at, a.outcome, a.reason, a.detail, a.request_id
                   from export.attempts a where a.outbox_id = any($1::bigint[])
                   union all
                   select o.id, o.attempts, o.delivered_at, 'delivered', o.reason, o.detail, o.request_id
                   from export.outbox o
                   where o.id = any($1::bigint[]) and o.state = 'delivered'
                     and not exists (select 1 from export.attempts a
                                     where a.outbox_id = o.id and a.attempt = o.attempts)
               ) t
           ) n left join export.requests r on r.id = n.request_id
           where n.rn <= $2 order by n.outbox_id, n.attempt""",
        list(outbox_ids),
        per_delivery,
    )


async def dead_letters(
    pool: asyncpg.Pool, destination_id: str | None, after_id: int, limit: int
) -> list[asyncpg.Record]:
    return await pool.fetch(
        """select o.id, o.conversion_id, c.order_id, o.destination_id, o.reason, o.detail, o.attempts,
                  o.dead_at
           from export.outbox o join export.conversions c on c.id = o.conversion_id
           where o.dead_at is not null and o.state = 'dead' and o.id > $2 and ($1::text is null or o.destination_id = $1)
           order by o.id limit $3""",
        destination_id,
        after_id,
        limit,
    )


async def replay_dead(pool: asyncpg.Pool, ids: Sequence[int] | None, destination_id: str | None) -> int:
    """Dead letters back to pending, due now, with a fresh retry budget (attempts keep counting,
    so the history of every attempt stays)."""
    result = await pool.execute(
        """update export.outbox set state = 'pending', next_attempt_at = now(), retry_base = attempts,
                  reason = 'REPLAYED', detail = '', dead_at = null
           where dead_at is not null and state = 'dead' and ($1::bigint[] is null or id = any($1::bigint[]))
             and ($2::text is null or destination_id = $2)""",
        None if ids is None else list(ids),
        destination_id,
    )
    if int(result.split()[-1]):
        await pool.execute(f"notify {NOTIFY_CHANNEL}")
    return int(result.split()[-1])
