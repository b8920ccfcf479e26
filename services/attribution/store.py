"""Every SQL statement of the attribution service."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import asyncpg
import orjson

from services.attribution import domain
from services.attribution.domain import ChannelRule, ConversionRow, SpaceSettings, SpendRow, TouchRow
from touchpoint.platform.eventlog import DEFAULT_PARTITION_KEYS, lock_positions, partition_sql

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

# Track events whose properties a rule reads: engagement events and conversion events (the
# defaults, which a space not seen before has, and every space's configured ones).
_TRACK_WANTED = (
    "e.event = any('{"
    + ",".join(f'"{x}"' for x in (*domain.ENGAGEMENT_EVENTS, *domain.DEFAULT_CONVERSION_EVENTS))
    + "}'::text[]) or e.event in (select unnest(s.conversion_events) from attribution.spaces s)"
)

# A campaign touch_of takes as it is (a name, source or medium that is a non-blank string or a
# number): the page and referrer of such an event are never looked at.
_CAMPAIGN_DECIDES = " or ".join(
    f"(jsonb_typeof(e.campaign -> '{k}') in ('string', 'number') and btrim(e.campaign ->> '{k}') <> '')"
    for k in ("name", "source", "medium")
)

# What the consumer reads of each log row: the columns the touch and conversion rules look at,
# and JSON only where a rule can use it, as text that Python parses only when it needs it.
# Properties of a track event no rule reads come as '' (not sent; see apply_rows).
# apply_rows unpacks the records positionally, in this order (after xid and seq).
LOG_COLUMNS = f"""e.space_id, e.source_id, e.message_id, e.type, e.user_id, e.anonymous_id,
    e.previous_id, e.event, e."timestamp"::text as "timestamp",
    case when e.campaign <> '{{}}'::jsonb then e.campaign::text end as campaign,
    case when e.click_ids <> '[]'::jsonb then e.click_ids::text end as click_ids,
    case when e.type = 'track' then case when {_TRACK_WANTED} then e.properties::text else '' end
    end as properties,
    case when e.type = 'page' and not coalesce({_CAMPAIGN_DECIDES}, false)
         then (e.context -> 'page')::text end as page,
    case when e.type = 'page' and not coalesce({_CAMPAIGN_DECIDES}, false)
         then (e.context -> 'referrer')::text end as referrer,
    case when e.type = 'track' then (e.context -> 'channel')::text end as channel"""


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


def _json_insert(table: str, columns: Sequence[str], types: Sequence[str], on_conflict: bool = True) -> str:
    """An insert of rows passed as one JSON array of arrays: asyncpg encodes a big text[]
    parameter element by element with an isinstance check each, which costs more than the
    insert itself; orjson writes the whole batch in one call and Postgres parses it in C."""
    cols = ", ".join(columns)
    values = ", ".join(f"(r ->> {i})::{t}" for i, t in enumerate(types))
    return f"""insert into attribution.{table} ({cols})
        select {values} from jsonb_array_elements($1::json::jsonb) r""" + (
        " on conflict do nothing" if on_conflict else ""
    )


_INSERT_TOUCHES = _json_insert("touches", _TOUCH_COLUMNS, _TOUCH_TYPES)
# Without the conflict check: about a third cheaper, and a touch is almost never a duplicate.
_INSERT_NEW_TOUCHES = _json_insert("touches", _TOUCH_COLUMNS, _TOUCH_TYPES, on_conflict=False)


def _json_insert_earliest(columns: Sequence[str], types: Sequence[str]) -> str:
    """Conversions passed as a JSON array, deduplicated by order id so that the earliest event
    of an order wins (by conversion time, then source and message id), within the batch and
    against what is stored. The rule does not depend on the order rows arrive in, so replicas
    applying partitions of the log in any order, and the offline and online consumers racing,
    end with the same row."""
    cols = ", ".join(columns)
    at = {c: i for i, c in enumerate(columns)}
    values = ", ".join(f"(r ->> {i})::{t}" for i, t in enumerate(types))
    key = f"r ->> {at['space_id']}, (r ->> {at['generation']})::int, r ->> {at['conversion_id']}"
    first = f"(r ->> {at['conversion_time']})::timestamptz, r ->> {at['source_id']}, r ->> {at['message_id']}"
    updated = [
        c for c in (*_CONV_COLUMNS, "profile_id") if c not in ("space_id", "generation", "conversion_id")
    ]
    sets = ", ".join(f"{c} = excluded.{c}" for c in updated)
    stored = "attribution.conversions"
    return f"""insert into {stored} ({cols})
        select distinct on ({key}) {values} from jsonb_array_elements($1::json::jsonb) r
        order by {key}, {first}
        on conflict (space_id, generation, conversion_id) do update set {sets}
        where (excluded.conversion_time, excluded.source_id, excluded.message_id)
            < ({stored}.conversion_time, {stored}.source_id, {stored}.message_id)"""


_INSERT_CONVERSIONS = _json_insert_earliest(_CONV_COLUMNS, _CONV_TYPES)
_INSERT_NEW_CONVERSIONS = _json_insert("conversions", _CONV_COLUMNS, _CONV_TYPES, on_conflict=False)
_INSERT_LINKS = _json_insert(
    "identity_links", ("space_id", "anonymous_id", "user_id"), ("text", "text", "text")
)


def _json_rows(rows: Sequence[tuple[Any, ...]]) -> str:
    return orjson.dumps(rows).decode()


class LinkMemo:
    """The identity links one consumer has stored, so that a batch inserts only new ones (most
    events of a logged-in user repeat a link already stored).

    A batch's links count as stored once the transaction that inserted them is known to have
    committed (pg_xact_status): a batch that rolled back, or is retried, inserts them again.
    This holds with any number of partitions and replicas of the consumer."""

    def __init__(self, limit: int = 500_000) -> None:
        self.limit = limit
        self.stored: set[tuple[str, str, str]] = set()
        # (writing transaction id, links it inserted) not yet known to be committed.
        self._pending: list[tuple[str, set[tuple[str, str, str]]]] = []

    async def fresh(
        self, conn: asyncpg.Connection, links: set[tuple[str, str, str]]
    ) -> set[tuple[str, str, str]]:
        if self._pending:
            rows = await conn.fetch(
                "select x, pg_xact_status(x::xid8) as status from unnest($1::text[]) x",
                [x for x, _ in self._pending],
            )
            status = {r["x"]: r["status"] for r in rows}
            still = []
            for xid, pending in self._pending:
                if status.get(xid) == "committed":
                    if len(self.stored) + len(pending) > self.limit:
                        self.stored.clear()
                    self.stored |= pending
                elif status.get(xid) == "in progress":
                    still.append((xid, pending))
            self._pending = still
        return links - self.stored

    def inserted(self, xid: str, links: set[tuple[str, str, str]]) -> None:
        self._pending.append((xid, links))

    def forget(self) -> None:
        """After links were deleted (an erasure): insert every link again."""
        self.stored.clear()
        self._pending.clear()


@dataclass
class ApplyMemo:
    """What one consumer remembers between batches (one per consumer and database)."""

    facts: domain.RowFacts = field(default_factory=domain.RowFacts)
    links: LinkMemo | None = field(default_factory=LinkMemo)


# Taken shared by every batch that derives touches and conversions, alone by an erasure: an
# erasure never runs between a batch's tombstone check and its commit.
_ERASURE_LOCK = "hashtext('attribution.erasures')"


async def _insert_new(conn: asyncpg.Connection, plain: str, skipping: str, data: str) -> None:
    """The plain insert (about a third cheaper) in a savepoint; when a row exists already (a
    message seen before ingest's dedup window, a repeated order id), the one that skips them."""
    try:
        async with conn.transaction():
            await conn.execute(plain, data)
    except asyncpg.UniqueViolationError:
        await conn.execute(skipping, data)


async def _erased_among(conn: asyncpg.Connection, ids: set[tuple[str, str]]) -> set[tuple[str, str]]:
    rows = await conn.fetch(
        """select r ->> 0 as source_id, r ->> 1 as message_id from jsonb_array_elements($1::json::jsonb) r
           where exists (select 1 from attribution.erased_events x
                         where x.source_id = r ->> 0 and x.message_id = r ->> 1)""",
        _json_rows(sorted(ids)),
    )
    return {(r["source_id"], r["message_id"]) for r in rows}


async def _withheld_properties(conn: asyncpg.Connection, source_id: str, message_id: str) -> str | None:
    """Properties the read left out because the event was not a conversion event when it read
    (settings changed between the read and the apply): rare, so one query each."""
    value = await conn.fetchval(
        """select properties::text from ingest.event_log where source_id = $1 and message_id = $2
           order by xid, seq limit 1""",
        source_id,
        message_id,
    )
    return None if value is None else str(value)


async def apply_rows(
    conn: asyncpg.Connection,
    rows: Sequence[asyncpg.Record],
    *,
    only_space: str | None = None,
    generation: int | None = None,
    memo: ApplyMemo | None = None,
) -> tuple[int, int]:
    """Writes the touches, conversions and identity links of a batch of the log, read with
    LOG_COLUMNS.

    The live consumer writes each space's active generation (and the pending one while a
    recomputation runs); a recomputation's replay passes `only_space` and `generation`.
    Returns (touches, conversions) written (before dedup)."""
    spaces = sorted({r[2] for r in rows} if only_space is None else {only_space} & {r[2] for r in rows})
    if not spaces:
        return 0, 0
    # The batch's effects and the consumer's position commit together, so a commit lost in a
    # crash rolls both back and the batch is applied again: no need to wait for the flush.
    # The shared lock orders batches against erasures (apply_erasures), which take it alone.
    await conn.execute(
        f"set local synchronous_commit to off; select pg_advisory_xact_lock_shared({_ERASURE_LOCK})"
    )
    states = await space_states(conn, spaces)
    gens_of: dict[str, list[int]] = {}
    for space_id, state in states.items():
        gens = [generation] if generation is not None else [state.active_generation]
        if generation is None and state.pending_generation is not None:
            gens.append(state.pending_generation)
        gens_of[space_id] = gens
    conversion_sets = {k: frozenset(v.settings.conversion_events) for k, v in states.items()}
    settings_of = {k: v.settings for k, v in states.items()}
    memo = memo or ApplyMemo(links=None)
    facts_of = memo.facts
    touches: list[tuple[Any, ...]] = []
    conversions: list[tuple[Any, ...]] = []
    links: set[tuple[str, str, str]] = set()
    for (_, _, space_id, source_id, message_id, type_, user_id, anon, prev, event, ts, campaign, click_ids,
         props, page, referrer, channel) in rows:  # fmt: skip
        if space_id not in gens_of:
            continue
        gens = gens_of[space_id]
        if user_id:
            if anon and anon != user_id:
                links.add((space_id, anon, user_id))
            if prev and prev != user_id:
                links.add((space_id, prev, user_id))
        found = facts_of.touch(
            settings_of[space_id], type_, event, campaign, click_ids, props, page, referrer
        )
        if found is not None:
            facts, ch = found
            for gen in gens:
                touches.append(
                    (space_id, gen, source_id, message_id, ts, user_id, anon, facts.kind, ch, facts.campaign,
                     facts.source, facts.medium, facts.content, facts.term, facts.network,
                     facts.referrer_domain)
                )  # fmt: skip
        if type_ == "track" and event in conversion_sets[space_id]:
            if props == "":  # not sent: not a conversion event when the batch was read
                props = await _withheld_properties(conn, source_id, message_id)
            ev = domain.narrow_event(space_id, source_id, message_id, type_, user_id, anon, event,
                                     campaign, click_ids, props, page, referrer, channel)  # fmt: skip
            c = domain.conversion_of(ev, conversion_sets[space_id])
            if c is not None:
                for gen in gens:
                    conversions.append(
                        (space_id, gen, c.conversion_id, c.event, ts, c.value, c.currency, c.offline,
                         user_id, anon, source_id, message_id)
                    )  # fmt: skip
    if (touches or conversions) and await conn.fetchval(
        "select exists (select 1 from attribution.erased_events)"
    ):
        erased = await _erased_among(
            conn, {(t[2], t[3]) for t in touches} | {(c[10], c[11]) for c in conversions}
        )
        touches = [t for t in touches if (t[2], t[3]) not in erased]
        conversions = [c for c in conversions if (c[10], c[11]) not in erased]
    if touches:
        await _insert_new(conn, _INSERT_NEW_TOUCHES, _INSERT_TOUCHES, _json_rows(touches))
    if conversions:
        # Deduplicated by order id: the earliest event of an order wins (a batch with a repeated
        # order takes the slower upsert).
        await _insert_new(conn, _INSERT_NEW_CONVERSIONS, _INSERT_CONVERSIONS, _json_rows(conversions))
    if memo.links is not None and links:
        links = await memo.links.fresh(conn, links)
    if links:
        xid = await conn.fetchval(
            f"with i as ({_INSERT_LINKS}) select pg_current_xact_id()::text", _json_rows(sorted(links))
        )
        if memo.links is not None:
            memo.links.inserted(str(xid), links)
    return len(touches), len(conversions)


# ------------------------------------------------------------------------------------------
# Offline conversions (export.offline_conversions)

OFFLINE_LOG = "export.offline_conversions"
# The source_id of offline conversions (their message_id is export's conversion id).
OFFLINE_SOURCE = "export.offline_conversions"
OFFLINE_COLUMNS = """e.conversion_id::text as conversion_id, e.space_id, e.order_id, e.event_name,
    e.event_time::text as event_time, e.value::float8 as value, e.currency, e.profile_id, e.match_status"""
_OFFLINE_TYPES = (*_CONV_TYPES, "text")
_INSERT_OFFLINE = _json_insert_earliest((*_CONV_COLUMNS, "profile_id"), _OFFLINE_TYPES)


async def apply_offline(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> int:
    """Matched offline conversions become conversions (offline, deduplicated by order id against
    online ones: the earliest of an order wins), in each space's active and pending generation.

    A conversion carries the user id of the profile export matched it to (else one of its
    anonymous ids), so that reports put it on that profile's path across devices and follow
    later merges; the profile id is kept for profiles without either. Returns how many."""
    matched = [r for r in rows if r["match_status"] == "matched" and r["profile_id"]]
    if not matched:
        return 0
    await conn.execute(f"select pg_advisory_xact_lock_shared({_ERASURE_LOCK})")
    spaces = sorted({r["space_id"] for r in matched})
    await space_states(conn, spaces)
    # Shared row locks: a recomputation starting now waits for this batch, then copies it.
    gens = await conn.fetch(
        """select space_id, active_generation, pending_generation from attribution.spaces
           where space_id = any($1::text[]) order by space_id for share""",
        spaces,
    )
    gens_of = {
        g["space_id"]: [
            g["active_generation"],
            *([g["pending_generation"]] if g["pending_generation"] is not None else []),
        ]
        for g in gens
    }
    if await conn.fetchval("select to_regclass('identity.deleted_profiles') is not null"):
        # Profiles deleted (GDPR) after export matched them: nothing of them is kept.
        gone = await conn.fetch(
            """select space_id, profile_id::text as profile_id from identity.deleted_profiles
               where space_id = any($1::text[]) and profile_id::text = any($2::text[])""",
            spaces,
            sorted({r["profile_id"] for r in matched}),
        )
        deleted = {(g["space_id"], g["profile_id"]) for g in gone}
        matched = [r for r in matched if (r["space_id"], r["profile_id"]) not in deleted]
    ids: dict[tuple[str, str], tuple[str | None, str | None]] = {}
    if matched and await identity_view_exists(conn):
        found = await conn.fetch(
            f"""select i.space_id, i.profile_id::text as profile_id,
                       min(i.value) filter (where i.kind = 'user_id') as user_id,
                       min(i.value) filter (where i.kind = 'anonymous_id') as anonymous_id
                from {IDENTITY_VIEW} i
                join (select r ->> 0 as space_id, r ->> 1 as profile_id
                      from jsonb_array_elements($1::json::jsonb) r) p
                  on i.space_id = p.space_id and i.profile_id::text = p.profile_id
                where i.kind in ('user_id', 'anonymous_id')
                group by 1, 2""",
            _json_rows(sorted({(r["space_id"], r["profile_id"]) for r in matched})),
        )
        ids = {(f["space_id"], f["profile_id"]): (f["user_id"], f["anonymous_id"]) for f in found}
    out: list[tuple[Any, ...]] = []
    for r in matched:
        user, anon = ids.get((r["space_id"], r["profile_id"]), (None, None))
        if user:
            anon = None
        currency = (r["currency"] or "USD").strip().upper() or "USD"
        for gen in gens_of[r["space_id"]]:
            out.append(
                (r["space_id"], gen, r["order_id"], r["event_name"], r["event_time"], r["value"] or 0.0,
                 currency, True, user, anon, OFFLINE_SOURCE, r["conversion_id"], r["profile_id"])
            )  # fmt: skip
    if out:
        await conn.execute(_INSERT_OFFLINE, _json_rows(out))
    return len(matched)


# ------------------------------------------------------------------------------------------
# Erasures (identity.erased_events)

ERASURE_LOG = "identity.erased_events"
ERASURE_COLUMNS = "e.space_id, e.source_id, e.message_id, e.profile_id"


async def apply_erasures(conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> tuple[int, int, int]:
    """Drops what attribution derived from erased events, in every generation: their touches and
    conversions, the offline conversions matched to the erased profiles, and the identity links
    of the user ids on those events; remembers the events so that a consumer reaching one later
    derives nothing from it. Returns (touches, conversions, links) deleted."""
    if not rows:
        return 0, 0, 0
    await conn.execute(f"select pg_advisory_xact_lock({_ERASURE_LOCK})")
    data = _json_rows(
        sorted({(r["space_id"], r["source_id"], r["message_id"], r["profile_id"]) for r in rows})
    )
    erased = """(select distinct r ->> 0 as space_id, r ->> 1 as source_id, r ->> 2 as message_id,
                        r ->> 3 as profile_id from jsonb_array_elements($1::json::jsonb) r) e"""
    await conn.execute(
        f"""insert into attribution.erased_events (source_id, message_id)
            select e.source_id, e.message_id from {erased} on conflict do nothing""",
        data,
    )
    touches = await conn.fetch(
        f"""delete from attribution.touches t using {erased}
            where t.space_id = e.space_id and t.source_id = e.source_id and t.message_id = e.message_id
            returning t.space_id, t.user_id""",
        data,
    )
    conversions = await conn.fetch(
        f"""delete from attribution.conversions c using {erased}
            where c.space_id = e.space_id and ((c.source_id = e.source_id and c.message_id = e.message_id)
                                               or (c.offline and c.profile_id = e.profile_id))
            returning c.space_id, c.user_id""",
        data,
    )
    users = {(r["space_id"], r["user_id"]) for r in (*touches, *conversions) if r["user_id"]}
    if await conn.fetchval("select to_regclass('ingest.event_log') is not null"):
        # The erased events themselves, while ingest has not deleted them yet.
        logged = await conn.fetch(
            f"""select l.space_id, l.user_id from ingest.event_log l join {erased}
                  on l.source_id = e.source_id and l.message_id = e.message_id
                where l.user_id is not null""",
            data,
        )
        users |= {(r["space_id"], r["user_id"]) for r in logged}
    links = "DELETE 0"
    if users:
        links = await conn.execute(
            """delete from attribution.identity_links l
               using (select r ->> 0 as space_id, r ->> 1 as user_id from jsonb_array_elements($1::json::jsonb) r) u
               where l.space_id = u.space_id and l.user_id = u.user_id""",
            _json_rows(sorted(users)),
        )
    return len(touches), len(conversions), int(links.split()[-1])


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


def _profile_of(alias: str, use_identity_view: bool, profile_id: bool = False) -> tuple[str, str]:
    """(joins, expression): the profile of each row of `alias`, exactly as resolve_profiles
    (and load_conversions for offline ones) decide it, for reports that resolve every row in
    one statement ($1 is the space)."""
    user = f"nullif({alias}.user_id, '')"
    anon = f"nullif({alias}.anonymous_id, '')"
    matched = (
        f"when {user} is null and {anon} is null and {alias}.profile_id is not null "
        f"then 'profile:' || {alias}.profile_id "
        if profile_id
        else ""
    )
    own = (
        f"case when {user} is not null then 'user_id:' || {user} {matched}"
        f"else 'anonymous_id:' || coalesce({alias}.anonymous_id, '') end"
    )
    if use_identity_view:
        joins = f"""left join (select value, min(profile_id::text) as p from {IDENTITY_VIEW}
                       where space_id = $1 and kind = 'user_id' group by value) pu on pu.value = {user}
            left join (select value, min(profile_id::text) as p from {IDENTITY_VIEW}
                       where space_id = $1 and kind = 'anonymous_id' group by value) pa on pa.value = {anon}"""
        return joins, f"coalesce('profile:' || pu.p, 'profile:' || pa.p, {own})"
    joins = f"""left join (select anonymous_id, min(user_id) as u from attribution.identity_links
                   where space_id = $1 group by anonymous_id) la on la.anonymous_id = {anon}"""
    return joins, f"case when {user} is null and la.u is not null then 'user_id:' || la.u else {own} end"


_DIMENSION_SQL = (
    "coalesce(x.campaign, '(none)')",
    """coalesce(x.source, case x.kind when 'direct' then '(direct)' when 'referrer' then x.referrer_domain
                                      when 'click_id' then x.network end, '(none)')""",
    "coalesce(x.medium, case x.kind when 'referrer' then 'referral' when 'click_id' then 'cpc' end, '(none)')",
    "coalesce(x.content, '(none)')",
    "coalesce(x.term, '(none)')",
    "x.channel",
)


@dataclass
class ReportRows:
    """What a report reads: touches (profile, unix seconds, label, direct) in the lookback
    range and conversions in the report's range, their profiles resolved in SQL."""

    touch_profiles: list[str]
    touch_times: list[float]
    touch_labels: list[str]
    touch_direct: list[bool]
    conversions: list[asyncpg.Record]


async def load_report_rows(
    conn: asyncpg.Connection,
    space_id: str,
    generation: int,
    start: datetime,
    end: datetime,
    touches_from: datetime,
    events: Sequence[str],
    group_by: Sequence[int],
    use_identity_view: bool,
    campaign_filter: str = "",
) -> ReportRows:
    # Hash joins against the grouped identifiers: without statistics on freshly written
    # touches the planner may pick a nested loop that aggregates them again for every touch.
    await conn.execute("set local enable_nestloop to off")
    joins, profile = _profile_of("x", use_identity_view)
    label = "concat_ws(E'\\x1f', " + ", ".join(_DIMENSION_SQL[g] for g in group_by) + ")"
    cond = " and x.campaign = $5" if campaign_filter else ""
    touches = await conn.fetch(
        f"""select {profile} as profile, extract(epoch from x.touch_time)::float8 as t,
                   {label} as label, x.channel = 'direct' as direct
            from attribution.touches x {joins}
            where x.space_id = $1 and x.generation = $2 and x.touch_time >= $3 and x.touch_time <= $4{cond}""",
        space_id,
        generation,
        touches_from,
        end,
        *([campaign_filter] if campaign_filter else []),
    )
    joins, profile = _profile_of("x", use_identity_view, profile_id=True)
    conversions = await conn.fetch(
        f"""select x.conversion_id, x.event, {profile} as profile,
                   extract(epoch from x.conversion_time)::float8 as t, x.value, x.currency, x.offline
            from attribution.conversions x {joins}
            where x.space_id = $1 and x.generation = $2 and x.conversion_time >= $3
              and x.conversion_time < $4 and x.event = any($5::text[])
            order by x.conversion_time, x.conversion_id""",
        space_id,
        generation,
        start,
        end,
        list(events),
    )
    if touches:
        p, t, lab, d = (list(c) for c in zip(*touches, strict=True))
    else:
        p, t, lab, d = [], [], [], []
    return ReportRows(p, t, lab, d, conversions)


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
        f"""select conversion_id, event, user_id, anonymous_id, profile_id,
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
            # An offline conversion of a profile without user or anonymous ids: export's match.
            "profile:" + r["profile_id"]
            if r["profile_id"] and not r["user_id"] and not r["anonymous_id"]
            else profiles[(r["user_id"], r["anonymous_id"])],
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
        # Every partition's position, locked: no live batch is half-way while the job is made.
        positions = await lock_positions(conn, "attribution", LIVE_CONSUMER)
        stops = [positions[k] for k in range(len(positions))]
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
        # Offline conversions do not come from the event log the job replays: they move over.
        cols = ", ".join(c for c in (*_CONV_COLUMNS, "profile_id") if c != "generation")
        await conn.execute(
            f"""insert into attribution.conversions (generation, {cols})
                select $3, {cols} from attribution.conversions
                where space_id = $1 and generation = $2 and source_id = $4""",
            space_id,
            space["active_generation"],
            generation,
            OFFLINE_SOURCE,
        )
        part = partition_sql(DEFAULT_PARTITION_KEYS["ingest.event_log"], len(stops))
        total = await conn.fetchval(
            f"""select count(*) from ingest.event_log e
                join (select k - 1 as k, (s ->> 0)::bigint as xid, (s ->> 1)::bigint as seq
                      from jsonb_array_elements($2::json::jsonb) with ordinality as t(s, k)) p
                  on {part} = p.k
               where e.space_id = $1 and (e.xid, e.seq) <= (p.xid::text::xid8, p.seq)""",
            space_id,
            _json_rows(stops),
        )
        job_id = f"rj_{secrets.token_hex(8)}"
        await conn.execute(
            "update attribution.spaces set pending_generation = $2 where space_id = $1", space_id, generation
        )
        row = await conn.fetchrow(
            """insert into attribution.recompute_jobs
                   (id, space_id, generation, stop_xid, stop_seq, total_events, stops)
               values ($1, $2, $3, $4, $5, $6, $7::json::jsonb) returning *""",
            job_id,
            space_id,
            generation,
            min(stops)[0],
            min(stops)[1],
            total,
            _json_rows(stops),
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
    consumer's positions (every partition's) like a live batch does, so no batch still writes the
    old generation."""
    async with pool.acquire() as conn, conn.transaction():
        await lock_positions(conn, "attribution", LIVE_CONSUMER)
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
        await forget_replay(conn, job)


async def forget_replay(conn: asyncpg.Connection, job: asyncpg.Record) -> None:
    """Drops the replay consumer's positions, leases and members (every partition's)."""
    name = f"recompute_{job['id']}"
    await conn.execute("delete from attribution.log_positions where split_part(consumer, '#', 1) = $1", name)
    for table in ("log_leases", "log_members"):
        if await conn.fetchval("select to_regclass($1) is not null", f"attribution.{table}"):
            await conn.execute(f"delete from attribution.{table} where consumer = $1", name)


def job_stops(job: asyncpg.Record) -> list[tuple[int, int]]:
    """The job's stop position per partition of the live consumer (one for jobs made before
    partitions existed)."""
    if job["stops"] is None:
        return [(int(job["stop_xid"]), int(job["stop_seq"]))]
    stops = job["stops"]
    return [(int(x), int(s)) for x, s in (orjson.loads(stops) if isinstance(stops, str | bytes) else stops)]


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
        await forget_replay(conn, job)
