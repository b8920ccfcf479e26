"""Every SQL statement of the identity service."""

from __future__ import annotations

import asyncio
import operator
import weakref
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from services.identity.domain import (
    Decision,
    Graph,
    Ident,
    Key,
    Observed,
    decode_ident,
    encode_ident,
)
from touchpoint.platform.db import jsonb
from touchpoint.platform.eventlog import lock_positions

_SEP = "\x1e"  # identifier values never hold control characters (domain.normalise)


def _copy_encoder() -> Any:
    """services.identity._copybin (C, built by `make native` with the compiled modules), or None
    when it is not built or TOUCHPOINT_NATIVE=0: asyncpg's own encoder then encodes the rows."""
    try:
        from services.identity import _copybin
    except ImportError:
        return None
    return _copybin


_COPYBIN: Any = _copy_encoder()

_LINK_COLUMNS = (
    "l.set_key, l.idents, l.first_time, l.first_message_id, l.first_source_id, l.cut, l.component_id"
)
# A link's identifiers ("kind:value" joined by _SEP, migration 0005) as an array: the expression
# of the links_loose index, which a query must spell the same way to use it.
_LINK_IDENTS = "string_to_array(l.idents, E'\\x1e')"
_IDENT_COLUMNS = """i.kind, i.value, i.profile_id, i.component_id, i.first_time, i.first_message_id,
    i.first_source_id, i.isolated, c.max_time, c.max_message_id, c.max_source_id, c.size"""


# Identifiers as one text parameter, "value\x1fkind" joined by \x1e (pack_idents): a batch's
# thousands of identifiers cost one string to encode instead of two arrays checked element by
# element.
_UNPACK_IDENTS = """(select split_part(p, E'\\x1f', 2) as kind, split_part(p, E'\\x1f', 1) as value
    from unnest(string_to_array({}::text, E'\\x1e')) as p) as u"""


# PgLoader.load_idents: the identifiers of a batch ($2, packed), the other members of their
# profiles, and their components' rows. One index probe per identifier, per profile found and per
# component, whatever the planner believes: LIMIT/OFFSET keep each lateral subquery a subquery.
# Left to itself, with statistics that lag the growing tables (none yet for `value` until
# autovacuum comes), it estimated the probes at hundreds of rows each and scanned every identifier
# of the space and every component for each batch (66 µs/event at 200k identifiers, and growing).
LOAD_IDENTS_SQL = f"""with hit as (
        select distinct h.profile_id
        from {_UNPACK_IDENTS.format("$2")}
        cross join lateral (
            select i.profile_id from identity.identifiers i
            where i.space_id = $1 and i.kind = u.kind and i.value = u.value
            limit 1) h)
    select {_IDENT_COLUMNS}
    from hit
    cross join lateral (
        select * from identity.identifiers i where i.profile_id = hit.profile_id offset 0) i
    left join lateral (
        select * from identity.components c where c.component_id = i.component_id limit 1) c on true"""


# PgLoader.load_links: the links of these set keys ($2: the 16-byte keys concatenated, one bytea
# to encode where a bytea[] costs two isinstance checks per element), one index probe each.
LOAD_LINKS_SQL = f"""select {_LINK_COLUMNS}
    from generate_series(0, length($2::bytea) / 16 - 1) as g
    cross join lateral (
        select * from identity.links l
        where l.space_id = $1 and l.set_key = substring($2::bytea from g * 16 + 1 for 16)
        limit 1) l"""


def pack_idents(idents: Iterable[Ident]) -> str:
    """The identifiers as LOAD_IDENTS_SQL takes them, in the order of the identifiers' key (value,
    kind, space: migration 0007), so that the probes walk the index in order (sorting the packed
    strings costs half what sorting the tuples does)."""
    return _SEP.join(sorted([f"{v}\x1f{k}" for k, v in idents]))


def _key_columns(key: Key | None) -> tuple[Any, Any, Any]:
    return (None, None, None) if key is None else (key[0], key[1], key[2])


def _key(t: datetime | None, mid: str | None, src: str | None) -> Key | None:
    return None if t is None else (t, mid or "", src or "")


def _load_ident_rows(graph: Graph, rows: Iterable[asyncpg.Record]) -> None:
    for r in rows:
        cid = r["component_id"]
        graph.load_ident(
            (r["kind"], r["value"]),
            r["profile_id"],
            cid,
            (r["first_time"], r["first_message_id"], r["first_source_id"]),
            r["isolated"],
        )
        if cid is not None and r["size"] is not None:
            graph.load_component(cid, _key(r["max_time"], r["max_message_id"], r["max_source_id"]), r["size"])


def _load_link_rows(graph: Graph, rows: Iterable[asyncpg.Record]) -> None:
    for r in rows:
        graph.load_link(
            bytes(r["set_key"]),
            tuple(decode_ident(t) for t in r["idents"].split(_SEP)),
            (r["first_time"], r["first_message_id"], r["first_source_id"]),
            r["cut"],
            r["component_id"],
        )


class PgLoader:
    """Loads slices of one space's graph on a connection (inside the caller's transaction)."""

    def __init__(self, conn: asyncpg.Connection, space_id: str) -> None:
        self.conn = conn
        self.space_id = space_id

    async def load_idents(self, graph: Graph, idents: Sequence[Ident]) -> None:
        if not idents:
            return
        rows = await self.conn.fetch(
            LOAD_IDENTS_SQL,
            self.space_id,
            pack_idents(idents),
        )
        _load_ident_rows(graph, rows)

    async def load_links(self, graph: Graph, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        rows = await self.conn.fetch(LOAD_LINKS_SQL, self.space_id, b"".join(sorted(keys)))
        _load_link_rows(graph, rows)

    async def load_components(self, graph: Graph, cids: Sequence[int]) -> None:
        if not cids:
            return
        rows = await self.conn.fetch(
            f"""select {_IDENT_COLUMNS}
                from unnest($1::bigint[]) as u(cid)
                join identity.identifiers i on i.component_id = u.cid
                left join identity.components c on c.component_id = i.component_id""",
            list(cids),
        )
        _load_ident_rows(graph, rows)
        links = await self.conn.fetch(
            """select set_key, idents, first_time, first_message_id, first_source_id, cut, component_id
               from unnest($1::bigint[]) as u(cid)
               join identity.links l on l.component_id = u.cid""",
            list(cids),
        )
        _load_link_rows(graph, links)

    async def load_decisions(self, graph: Graph, keys: Sequence[Key]) -> None:
        if not keys:
            return
        rows = await self.conn.fetch(
            """select m.id, m.action, m.reason, m.limit_kind, m.profile_id, m.other_profile_ids,
                      m.identifiers, m.event_time, m.source_id, m.message_id
               from unnest($2::timestamptz[], $3::text[], $4::text[]) as k(t, mid, src)
               join identity.merge_log m
                 on m.source_id = k.src and m.message_id = k.mid and m.event_time = k.t
               where m.space_id = $1 and m.superseded_time is null and m.action <> 'split'""",
            graph.space_id,
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
        )
        for r in rows:
            d = Decision(
                r["action"],
                r["reason"],
                r["limit_kind"],
                r["profile_id"],
                tuple(r["other_profile_ids"]),
                tuple(decode_ident(t) for t in r["identifiers"]),
                (r["event_time"], r["message_id"], r["source_id"]),
            )
            graph.recorded.setdefault(d, r["id"])

    async def links_containing(
        self, graph: Graph, idents: Sequence[Ident], components: Sequence[int], scan: bool
    ) -> list[tuple[Ident, ...]]:
        """Loads every link that holds one of the identifiers (which are in `components`);
        returns their identifier sets. `scan`: some are detached or blocked, so links outside
        their components may hold them too: scan every link of the space (a rare case)."""
        wanted = [encode_ident(x) for x in idents]
        rows = list(
            await self.conn.fetch(
                f"""select {_LINK_COLUMNS} from identity.links l
                    where l.space_id = $1 and l.component_id is null and {_LINK_IDENTS} && $2::text[]
                    union all
                    select {_LINK_COLUMNS} from unnest($3::bigint[]) as u(cid)
                    join identity.links l on l.component_id = u.cid
                    where {_LINK_IDENTS} && $2::text[]""",
                self.space_id,
                wanted,
                list(components),
            )
        )
        if scan:
            rows += await self.conn.fetch(
                f"""select {_LINK_COLUMNS} from identity.links l
                    where l.space_id = $1 and l.component_id is not null
                      and {_LINK_IDENTS} && $2::text[]""",
                self.space_id,
                wanted,
            )
        _load_link_rows(graph, rows)
        return [tuple(decode_ident(t) for t in r["idents"].split(_SEP)) for r in rows]


async def write(conn: asyncpg.Connection, graph: Graph, observed: Sequence[Observed] = ()) -> None:
    """Writes a graph's changes, and the events observed (refs, traits, last seen)."""
    await number(conn, graph)
    await (await plan_write(graph, observed)).run(conn)


async def number(conn: asyncpg.Connection, graph: Graph) -> None:
    """Reserves merge log ids for the graph's new decisions (`Graph.number`): the write gives
    its entries these ids, and the next batch, prepared over this graph before the write
    commits, supersedes them by id like any other entry."""
    n = len(graph.decisions)
    if n and len(graph.decision_ids) != n:
        graph.number(
            await conn.fetchval(
                "select array(select nextval('identity.merge_log_id_seq') from generate_series(1, $1))", n
            )
        )


class WritePlan:
    """The statements that write a graph's changes, with every argument already computed: the
    graph may change (or be read by the next batch) while they run."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[tuple[bool, str, Any, dict[str, Any]]] = []

    def execute(self, sql: str, *args: Any) -> None:
        self.ops.append((False, sql, args, {}))

    def copy(self, table: str, records: list[tuple[Any, ...]]) -> None:
        """A COPY of rows into one of COPIES' tables."""
        self.ops.append((True, table, records, {}))

    async def run(self, conn: asyncpg.Connection) -> None:
        await _ensure_stages(conn)
        for is_copy, what, args, _ in self.ops:
            if is_copy:
                await copy_rows(conn, what, args)
            else:
                await conn.execute(what, *args)


# What the store COPYs: table -> (schema, columns (None: all, in order), a letter per column for
# _copybin). tests/test_identity_copy.py checks the letters against the tables' column types.
COPIES: dict[str, tuple[str | None, tuple[str, ...] | None, str]] = {
    "components": (
        "identity",
        ("component_id", "space_id", "max_time", "max_message_id", "max_source_id", "size"),
        "qtTtti",
    ),
    "identity_stage_components": (None, None, "qTtti"),
    "identifiers": (
        "identity",
        (
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
        "ttttqTttT?j",
    ),
    "identity_stage_identifiers": (None, None, "tttqTttT?j"),
    "links": (
        "identity",
        (
            "space_id",
            "set_key",
            "idents",
            "first_time",
            "first_message_id",
            "first_source_id",
            "cut",
            "component_id",
        ),
        "tbtTtt?q",
    ),
    "merge_log": (
        "identity",
        (
            "id",
            "space_id",
            "action",
            "reason",
            "limit_kind",
            "profile_id",
            "other_profile_ids",
            "identifiers",
            "event_time",
            "message_id",
            "source_id",
        ),
        "qtttttAATtt",
    ),
    "event_refs": ("identity", ("space_id", "kind", "value", "time", "message_id", "source_id"), "tttTtt"),
    "traits": (
        "identity",
        ("space_id", "kind", "value", "key", "value_json", "time", "message_id", "source_id"),
        "ttttjTtt",
    ),
    "identity_stage_traits": (None, None, "tttjTtt"),
}


async def copy_rows(conn: asyncpg.Connection, table: str, records: list[tuple[Any, ...]]) -> None:
    """COPY rows into one of COPIES' tables in Postgres' binary format, encoded by _copybin in one
    pass of C: asyncpg's encoder calls a codec for each value (15 % of the consumer's CPU,
    bench/RESULTS.md stop 18). Without _copybin, or for values it does not take (the datetimes
    of a pool without raw_times: SplitProfile's and DeleteProfile's writes), asyncpg encodes."""
    schema, columns, types = COPIES[table]
    enc = _COPYBIN
    if enc is not None:
        data: bytes | None
        try:
            data = enc.encode(records, types)
        except TypeError:
            data = None
        if data is not None:
            # A memoryview: asyncpg takes bytes for a file's path.
            await conn.copy_to_table(
                table, source=memoryview(data), columns=columns, schema_name=schema, format="binary"
            )
            return
    await conn.copy_records_to_table(table, records=records, columns=columns, schema_name=schema)


async def plan_write(graph: Graph, observed: Sequence[Observed] = ()) -> WritePlan:
    """What `write` runs (see WritePlan). Every write of a space's graph moves its version.
    The graph's decisions must be numbered (`number`). Yields to the event loop between its
    parts: the consumer plans a batch while the previous one commits on the same loop, and
    that commit sends its next statement at each yield."""
    conn = WritePlan()
    conn.execute(_BUMP_VERSION, graph.space_id)
    _plan_components(conn, graph)
    await asyncio.sleep(0)
    await _plan_identifiers(conn, graph)
    await _plan_links(conn, graph)
    _plan_merge_log(conn, graph)
    if observed:
        await _write_observations(conn, graph, observed)
    return conn


# Rows planned between two yields of plan_write (a few milliseconds).
PLAN_YIELD_EVERY = 2000


def _plan_components(conn: WritePlan, graph: Graph) -> None:
    space = graph.space_id
    # Components merged into others: move their rows first, the upserts below then win.
    if graph.alias:
        olds = list(graph.alias)
        news = [graph.find(c) for c in olds]
        for table in ("identifiers", "links"):
            conn.execute(
                f"""update identity.{table} t set component_id = m.new
                    from unnest($1::bigint[], $2::bigint[]) as m(old, new)
                    where t.component_id = m.old""",
                olds,
                news,
            )
    gone = [c for c in graph.removed_components if c not in graph.new_components]
    if gone:
        conn.execute(
            """delete from identity.components c using unnest($1::bigint[]) as u(cid)
               where c.component_id = u.cid""",
            gone,
        )
    comps = graph.components
    fresh = [c for c in graph.new_components if c in comps]
    changed = [c for c in graph.changed_components if c in comps and c not in graph.new_components]
    # By COPY, not unnest()ed arrays: asyncpg checks each array element against three ABCs.
    if fresh:
        fresh.sort()  # ids grow with time: the index's right edge
        conn.copy("components", [(c, space, *_key_columns(comps[c].max_key), comps[c].size) for c in fresh])
    if changed:
        conn.copy(
            "identity_stage_components",
            [(c, *_key_columns(comps[c].max_key), comps[c].size) for c in changed],
        )
        conn.execute(
            """update identity.components c
               set max_time = u.t, max_message_id = u.mid, max_source_id = u.src, size = u.size
               from identity_stage_components u
               where c.component_id = u.id and c.space_id = $1""",
            space,
        )


async def _plan_identifiers(conn: WritePlan, graph: Graph) -> None:
    """What changed, and when each identifier the batch saw was last seen (with the device
    details of its latest event that had any: Graph.observe keeps both on the node)."""
    space = graph.space_id
    if graph.removed_idents:
        rm = list(graph.removed_idents)
        conn.execute(
            """delete from identity.identifiers i using unnest($2::text[], $3::text[]) as u(kind, value)
               where i.space_id = $1 and i.kind = u.kind and i.value = u.value""",
            space,
            [x[0] for x in rm],
            [x[1] for x in rm],
        )
    isolated = graph.isolated
    alias, find = graph.alias, graph.find
    # New identifiers go straight in by COPY; rows that exist are updated in place (a HOT
    # update when only the last-seen time changes). One pass over the nodes, in the order the
    # graph made them (removed ones are gone from it).
    inserts = []
    updates = []
    plist = graph.part.plist
    encoded: dict[int, bytes] = {}  # device details, serialised once per event (by its dict)
    k = 0
    for n in graph.part.nodes.values():
        k += 1
        if k % PLAN_YIELD_EVERY == 0:
            await asyncio.sleep(0)
        lt = n.last
        if not n.changed and lt is None:
            continue
        a = n.attrs
        attrs: bytes | None = None
        if a is not None:
            attrs = encoded.get(id(a))
            if attrs is None:
                attrs = encoded[id(a)] = jsonb(a)
        b = n.birth
        c = n.comp
        if c is not None and c in alias:
            c = find(c)
        iso = bool(isolated) and n.ident in isolated
        if n.new:
            inserts.append(
                (space, n.kind, n.value, plist[n.p].pid, c, b[0], b[1], b[2],
                 b[0] if lt is None else lt, iso, attrs)
            )  # fmt: skip
        else:
            updates.append((n.kind, n.value, plist[n.p].pid, c, b[0], b[1], b[2], lt, iso, attrs))
    if inserts:
        # In key order (value, kind): consecutive inserts land on the same index pages (a third
        # cheaper in Postgres than one at a random place each).
        _sort_by(inserts, 2, 1)
        conn.copy("identifiers", inserts)
    if updates:
        conn.copy("identity_stage_identifiers", updates)
        conn.execute(
            """update identity.identifiers i set
                   profile_id = s.profile_id,
                   component_id = s.component_id,
                   first_time = s.ft,
                   first_message_id = s.fm,
                   first_source_id = s.fs,
                   last_time = greatest(i.last_time, s.lt),
                   isolated = s.isolated,
                   attrs = case when s.attrs is not null and s.lt >= i.last_time
                                then s.attrs else i.attrs end
               from identity_stage_identifiers s
               where i.space_id = $1 and i.kind = s.kind and i.value = s.value""",
            space,
        )


async def _plan_links(conn: WritePlan, graph: Graph) -> None:
    space = graph.space_id
    if graph.removed_links:
        conn.execute(
            """delete from identity.links l using unnest($2::bytea[]) as u(sk)
               where l.space_id = $1 and l.set_key = u.sk""",
            space,
            list(graph.removed_links),
        )
    if graph.changed_links:
        find = graph.find
        fresh_links = graph.new_links - graph.removed_links
        link_inserts = []
        link_updates = []
        for k, sk in enumerate(graph.changed_links, 1):
            if k % PLAN_YIELD_EVERY == 0:
                await asyncio.sleep(0)
            ln = graph.links[sk]
            cid = None if ln.component is None else find(ln.component)
            if sk in fresh_links:
                link_inserts.append(
                    (space, sk, _SEP.join([f"{k}:{v}" for k, v in ln.idents]), ln.first[0], ln.first[1],
                     ln.first[2], ln.cut, cid)
                )  # fmt: skip
            else:
                link_updates.append((sk, ln.first[0], ln.first[1], ln.first[2], ln.cut, cid))
        if link_inserts:
            link_inserts.sort(key=_SET_KEY)
            conn.copy("links", link_inserts)
        if link_updates:
            conn.execute(
                """update identity.links l set
                       first_time = u.ft, first_message_id = u.fm, first_source_id = u.fs,
                       cut = u.cut, component_id = u.cid
                   from unnest($2::bytea[], $3::timestamptz[], $4::text[], $5::text[], $6::bool[],
                               $7::bigint[]) as u(sk, ft, fm, fs, cut, cid)
                   where l.space_id = $1 and l.set_key = u.sk""",
                space,
                *(list(col) for col in zip(*link_updates, strict=True)),
            )


def _plan_merge_log(conn: WritePlan, graph: Graph) -> None:
    space = graph.space_id
    if graph.superseded:
        conn.execute(
            """update identity.merge_log m set superseded_time = now()
               from unnest($1::bigint[]) as u(id) where m.id = u.id""",
            graph.superseded,
        )
    if graph.decisions:
        if len(graph.decision_ids) != len(graph.decisions):
            raise ValueError("the graph's decisions have no merge log ids: number() it first")
        conn.copy(
            "merge_log",
            [
                (i, space, d.action, d.reason, d.limit_kind, d.profile, list(d.others),
                 [f"{k}:{v}" for k, v in d.idents], d.key[0], d.key[1], d.key[2])
                for d, i in zip(graph.decisions, graph.decision_ids, strict=True)
            ],
        )  # fmt: skip


_SET_KEY = operator.itemgetter(1)
_ITEM = [operator.itemgetter(i) for i in range(4)]


def _sort_by(rows: list[Any], *columns: int) -> None:
    """Sorts rows by these str columns in order, one stable sort per column from the last: on
    str keys alone timsort compares without the generic comparison, which makes this a third
    of the cost of one sort on a tuple of the columns (1 µs a row for 20,000 rows here)."""
    for i in reversed(columns):
        rows.sort(key=_ITEM[i])


# Per-connection staging tables for bulk upserts: COPY in, then one INSERT ... ON CONFLICT.
_STAGES = """
create temp table if not exists identity_stage_components (
    id bigint, t timestamptz, mid text, src text, size int) on commit delete rows;
create temp table if not exists identity_stage_identifiers (
    kind text collate "C", value text collate "C", profile_id text collate "C", component_id bigint,
    ft timestamptz, fm text, fs text, lt timestamptz, isolated bool, attrs jsonb) on commit delete rows;
create temp table if not exists identity_stage_traits (
    kind text collate "C", value text collate "C", key text collate "C", value_json jsonb,
    t timestamptz, mid text, src text) on commit delete rows;
"""


_STAGED: weakref.WeakSet[Any] = weakref.WeakSet()


async def _ensure_stages(conn: asyncpg.Connection) -> None:
    # Temporary tables live as long as the connection: create them once per connection.
    raw = getattr(conn, "_con", conn)  # the connection behind a pool's proxy
    if raw not in _STAGED:
        await conn.execute(_STAGES)
        _STAGED.add(raw)


async def _write_observations(conn: WritePlan, graph: Graph, observed: Sequence[Observed]) -> None:
    """Event references, and the latest value of each trait per anchor. The graph's new
    identifiers have no traits yet: theirs go straight in by COPY."""
    space = graph.space_id
    nodes = graph.part.nodes
    # By anchor, as the index is (value, kind; its time within it matters little: an anchor's
    # rows of a batch are adjacent either way).
    refs = [(space, o.idents[0][0], o.idents[0][1], o.key[0], o.key[1], o.key[2]) for o in observed]
    _sort_by(refs, 2, 1)
    conn.copy("event_refs", refs)
    await asyncio.sleep(0)
    latest: dict[tuple[Ident, str], tuple[Key, Any]] = {}
    for i, o in enumerate(observed, 1):
        if i % PLAN_YIELD_EVERY == 0:
            await asyncio.sleep(0)
        if not o.traits:
            continue
        anchor = o.idents[0]
        for k, v in o.traits.items():
            slot = (anchor, k)
            prev = latest.get(slot)
            if prev is None or o.key > prev[0]:
                latest[slot] = (o.key, v)
    if not latest:
        return
    fresh = []
    known = []
    await asyncio.sleep(0)
    for (anchor, name), (when, v) in latest.items():
        n = nodes.get(anchor)
        j = jsonb(v)
        if n is not None and n.new:
            fresh.append((space, anchor[0], anchor[1], name, j, when[0], when[1], when[2]))
        else:
            known.append((anchor[0], anchor[1], name, j, when[0], when[1], when[2]))
    if fresh:
        # No row can exist (an identifier's traits go with it): a plain COPY, in key order.
        _sort_by(fresh, 2, 1, 3)  # the key's order: value, kind, (space,) key
        conn.copy("traits", fresh)
    if known:
        conn.copy("identity_stage_traits", known)
        conn.execute(
            """insert into identity.traits as t (space_id, kind, value, key, value_json, "time",
                   message_id, source_id)
               select $1, kind, value, key, value_json, t, mid, src from identity_stage_traits
               order by value, kind, key
               on conflict (space_id, kind, value, key) do update set
                   value_json = excluded.value_json, "time" = excluded."time",
                   message_id = excluded.message_id, source_id = excluded.source_id
               where (excluded."time", excluded.message_id, excluded.source_id)
                     > (t."time", t.message_id, t.source_id)""",
            space,
        )


# ---------------------------------------------------------------------------------------------
# Rules, deletions, locks


async def space_rules(
    conn: asyncpg.Connection | asyncpg.Pool, space_ids: Sequence[str]
) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(
        """select space_id, limits, default_limit, priority, blocked_pattern
           from identity.space_rules where space_id = any($1::text[])""",
        list(space_ids),
    )
    return {r["space_id"]: dict(r) for r in rows}


async def any_deleted(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("select exists(select 1 from identity.deleted_identifiers)"))


async def deleted_digests(
    conn: asyncpg.Connection, space_id: str, digests: Sequence[bytes]
) -> dict[bytes, str]:
    """Which of the digests are of deleted identifiers, with the profile each belonged to ('' when
    deleted before that was recorded)."""
    rows = await conn.fetch(
        """select d.digest, d.profile_id from unnest($2::bytea[]) as u(digest)
           join identity.deleted_identifiers d on d.space_id = $1 and d.digest = u.digest""",
        space_id,
        list(digests),
    )
    return {bytes(r["digest"]): r["profile_id"] or "" for r in rows}


async def queue_deletions(
    conn: asyncpg.Connection, space_id: str, refs: Sequence[tuple[str, str, str]], *, count_for: str = ""
) -> None:
    """Queues events (source id, message id, profile id) for deletion at ingest and, for each one
    not queued yet, writes its erasure to identity.erased_events in the same transaction, so that
    other services drop what they derived from it. `count_for`: the profile whose DeleteProfile
    counts these deletions (its drain reports them)."""
    unique = list({(s, m): (s, m, p) for s, m, p in refs}.values())
    if not unique:
        return
    await conn.execute(
        """with queued as (
               insert into identity.deletion_queue (source_id, message_id, space_id, profile_id)
               select u.s, u.m, $1, $5 from unnest($2::text[], $3::text[]) as u(s, m)
               on conflict do nothing
               returning source_id, message_id)
           insert into identity.erasures (space_id, source_id, message_id, profile_id)
           select $1, u.s, u.m, u.p
           from unnest($2::text[], $3::text[], $4::text[]) as u(s, m, p)
           join queued q on q.source_id = u.s and q.message_id = u.m""",
        space_id,
        [r[0] for r in unique],
        [r[1] for r in unique],
        [r[2] for r in unique],
        count_for,
    )


async def lock_consumer(conn: asyncpg.Connection, consumer: str) -> None:
    """Waits for the consumer's batches in flight (every partition's) and keeps the next ones
    out until commit."""
    await lock_positions(conn, "identity", consumer)


_BUMP_VERSION = """insert into identity.graph_versions (space_id, version) values ($1, 1)
    on conflict (space_id) do update set version = identity.graph_versions.version + 1"""


async def bump_version(conn: asyncpg.Connection, space_id: str) -> None:
    """Moves the space's graph version without writing the graph (see the stitcher's apply)."""
    await conn.execute(_BUMP_VERSION, space_id)


async def graph_version(conn: asyncpg.Connection | asyncpg.Pool, space_id: str) -> int:
    """The space's graph version (see migration 0004); 0 when nothing was ever written."""
    v = await conn.fetchval("select version from identity.graph_versions where space_id = $1", space_id)
    return int(v or 0)


async def lock_graph(conn: asyncpg.Connection, space_id: str) -> None:
    """Serialises changes to one space's graph until commit: replicas applying different
    partitions of the log may meet in the same component (the rest of a batch runs in parallel)."""
    await conn.execute("select pg_advisory_xact_lock(hashtextextended('identity.graph:' || $1, 0))", space_id)


# ---------------------------------------------------------------------------------------------
# Reads for the API


# One identifier's profile: an index-only lookup in the identifiers' key (which carries the
# profile id), once the table's pages are all-visible.
RESOLVE_SQL = "select profile_id from identity.identifiers where space_id = $1 and kind = $2 and value = $3"


async def resolve(
    pool: asyncpg.Pool | asyncpg.Connection, space_id: str, idents: Sequence[Ident]
) -> dict[Ident, str]:
    """(kind, value) -> profile id of the identifiers that belong to a profile; `pool` may be a
    connection (the API keeps a few for ResolveProfile)."""
    if len(idents) == 1:
        pid = await pool.fetchval(
            RESOLVE_SQL,
            space_id,
            idents[0][0],
            idents[0][1],
        )
        return {} if pid is None else {idents[0]: pid}
    # The identifiers go as one JSON parameter: asyncpg's encoding of two text[] of 1,000
    # elements cost more CPU than the lookups' rows.
    rows = await pool.fetch(
        """select i.kind, i.value, i.profile_id
           from json_to_recordset($2::json) as u(k text, v text)
           join identity.identifiers i on i.space_id = $1 and i.kind = u.k and i.value = u.v""",
        space_id,
        orjson.dumps([{"k": k, "v": v} for k, v in idents]).decode(),
    )
    return {(r[0], r[1]): r[2] for r in rows}


async def profile_space(conn: asyncpg.Connection | asyncpg.Pool, profile: str) -> str | None:
    space = await conn.fetchval(
        "select space_id from identity.identifiers where profile_id = $1 limit 1", profile
    )
    return None if space is None else str(space)


async def profile_identifiers(conn: asyncpg.Connection | asyncpg.Pool, profile: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            """select kind, value, first_time, last_time, attrs
               from identity.identifiers where profile_id = $1""",
            profile,
        )
    )


PROFILE_TRAITS_SQL = """select distinct on (t.key) t.key, t.value_json, t."time", t.message_id, t.source_id,
        t.kind, t.value
    from identity.identifiers i
    join identity.traits t on t.space_id = i.space_id and t.kind = i.kind and t.value = i.value
    where i.profile_id = $1
    order by t.key, t."time" desc, t.message_id desc, t.source_id desc"""


async def profile_traits(pool: asyncpg.Pool, profile: str) -> list[asyncpg.Record]:
    return list(await pool.fetch(PROFILE_TRAITS_SQL, profile))


PROFILE_EVENT_REFS_SQL = """select r."time", r.message_id, r.source_id
    from identity.identifiers i
    join identity.event_refs r on r.space_id = i.space_id and r.kind = i.kind and r.value = i.value
    where i.profile_id = $1
      and ($2::timestamptz is null or r."time" >= $2)
      and ($3::timestamptz is null or r."time" < $3)
      and ($4::timestamptz is null or (r."time", r.message_id, r.source_id) > ($4, $5, $6))
    order by r."time", r.message_id, r.source_id
    limit $7"""


async def profile_event_refs(
    pool: asyncpg.Pool,
    profile: str,
    start: datetime | None,
    end: datetime | None,
    after: Key | None,
    limit: int,
) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            PROFILE_EVENT_REFS_SQL,
            profile,
            start,
            end,
            after[0] if after else None,
            after[1] if after else "",
            after[2] if after else "",
            limit,
        )
    )


async def event_bodies(
    pool: asyncpg.Pool, refs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], asyncpg.Record]:
    """Events of the published log ingest.event_log, by (source_id, message_id)."""
    if not refs:
        return {}
    rows = await pool.fetch(
        """select e.type, e.message_id, e.user_id, e.anonymous_id, e.previous_id, e.group_id, e.event,
                  e.name, e.source_id, e.space_id, e.properties, e.traits, e.context, e.integrations,
                  e."timestamp", e.received_at, e.original_timestamp, e.sent_at, e.campaign, e.click_ids
           from unnest($1::text[], $2::text[]) as u(source_id, message_id)
           join ingest.event_log e on e.source_id = u.source_id and e.message_id = u.message_id""",
        [r[0] for r in refs],
        [r[1] for r in refs],
    )
    return {(r["source_id"], r["message_id"]): r for r in rows}


async def event_for_link(conn: asyncpg.Connection, source_id: str, message_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """select space_id, source_id, message_id, type, user_id, anonymous_id, previous_id, "timestamp",
                  traits, context
           from ingest.event_log where source_id = $1 and message_id = $2 limit 1""",
        source_id,
        message_id,
    )


async def link_exists(conn: asyncpg.Connection, space_id: str, sk: bytes) -> bool:
    return bool(
        await conn.fetchval("select 1 from identity.links where space_id = $1 and set_key = $2", space_id, sk)
    )


async def link_by_first_event(
    conn: asyncpg.Connection, space_id: str, source_id: str, message_id: str
) -> bytes | None:
    sk = await conn.fetchval(
        """select set_key from identity.links
           where first_source_id = $2 and first_message_id = $3 and space_id = $1""",
        space_id,
        source_id,
        message_id,
    )
    return None if sk is None else bytes(sk)


_MERGE_COLUMNS = """id, action, reason, limit_kind, profile_id, other_profile_ids, identifiers,
    event_time, source_id, message_id, record_time, superseded_time, note"""


MERGES_SQL = f"""select {_MERGE_COLUMNS}, coalesce(event_time, record_time) as sort_time
    from identity.merge_log
    where space_id = $1
      and (profile_id = any($2::text[]) or other_profile_ids && $2::text[])
      and ($3 or superseded_time is null)
      and ($4::timestamptz is null or (coalesce(event_time, record_time), id) > ($4, $5))
    order by coalesce(event_time, record_time), id
    limit $6"""


async def merges(
    pool: asyncpg.Pool,
    space_id: str,
    profiles: Sequence[str],
    after: tuple[datetime | None, int] | None,
    limit: int,
    include_superseded: bool,
) -> list[asyncpg.Record]:
    """Merge log entries naming any of the profiles, by event time (splits by record time)."""
    return list(
        await pool.fetch(
            MERGES_SQL,
            space_id,
            list(profiles),
            include_superseded,
            after[0] if after else None,
            after[1] if after else 0,
            limit,
        )
    )


async def largest_first(conn: asyncpg.Connection, profiles: Sequence[str]) -> list[str]:
    """The profiles that exist among these, the one with the most identifiers first."""
    rows = await conn.fetch(
        """select i.profile_id from unnest($1::text[]) as u(p)
           join identity.identifiers i on i.profile_id = u.p
           group by i.profile_id order by count(*) desc, i.profile_id""",
        list(profiles),
    )
    return [r["profile_id"] for r in rows]


async def split_by_request(conn: asyncpg.Connection, request_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"select {_MERGE_COLUMNS} from identity.merge_log where request_id = $1 and action = 'split'",
        request_id,
    )


async def record_split(
    conn: asyncpg.Connection,
    *,
    space_id: str,
    reason: str,
    profile: str,
    others: Sequence[str],
    idents: Sequence[Ident],
    event: Key | None,
    note: str,
    request_id: str | None,
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""insert into identity.merge_log (space_id, action, reason, profile_id, other_profile_ids,
                identifiers, event_time, message_id, source_id, note, request_id)
            values ($1, 'split', $2, $3, $4, $5, $6, $7, $8, $9, $10)
            returning {_MERGE_COLUMNS}""",
        space_id,
        reason,
        profile,
        list(others),
        [encode_ident(x) for x in idents],
        event[0] if event else None,
        event[1] if event else None,
        event[2] if event else None,
        note,
        request_id,
    )
    assert row is not None
    return row


# ---------------------------------------------------------------------------------------------
# GDPR deletion


async def tombstone(conn: asyncpg.Connection | asyncpg.Pool, profile: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """select profile_id, space_id, deleted_time, identifiers_deleted, events_deleted
           from identity.profile_tombstones where profile_id = $1""",
        profile,
    )


async def forget_profile_rows(
    conn: asyncpg.Connection, space_id: str, profile: str, idents: Sequence[Ident], former: Sequence[str]
) -> list[tuple[str, str]]:
    """Deletes what identity keeps about the identifiers except the graph rows (written by
    `write`), queues their events for deletion at ingest, and remembers their digests.
    Returns the events queued."""
    kinds = [x[0] for x in idents]
    values = [x[1] for x in idents]
    refs = await conn.fetch(
        """delete from identity.event_refs r using unnest($2::text[], $3::text[]) as u(kind, value)
           where r.space_id = $1 and r.kind = u.kind and r.value = u.value
           returning r.source_id, r.message_id""",
        space_id,
        kinds,
        values,
    )
    out = [(r["source_id"], r["message_id"]) for r in refs]
    await queue_deletions(conn, space_id, [(s, m, profile) for s, m in out], count_for=profile)
    await conn.execute(
        """delete from identity.traits t using unnest($2::text[], $3::text[]) as u(kind, value)
           where t.space_id = $1 and t.kind = u.kind and t.value = u.value""",
        space_id,
        kinds,
        values,
    )
    # Entries naming the identifiers or the profiles they formed: they would keep personal data.
    await conn.execute(
        """delete from identity.merge_log
           where space_id = $1
             and (identifiers && $2::text[] or profile_id = any($3::text[]) or other_profile_ids && $3::text[])""",
        space_id,
        [encode_ident(x) for x in idents],
        list(former),
    )
    return out


async def record_deletion(
    conn: asyncpg.Connection, space_id: str, profile: str, digests: Sequence[bytes], reason: str, count: int
) -> asyncpg.Record:
    await conn.execute(
        """insert into identity.deleted_identifiers (space_id, digest, profile_id)
           select $1, d, $3 from unnest($2::bytea[]) as d on conflict do nothing""",
        space_id,
        list(digests),
        profile,
    )
    row = await conn.fetchrow(
        """insert into identity.profile_tombstones (profile_id, space_id, reason, identifiers_deleted)
           values ($1, $2, $3, $4)
           on conflict (profile_id) do update set reason = identity.profile_tombstones.reason
           returning profile_id, space_id, deleted_time, identifiers_deleted, events_deleted""",
        profile,
        space_id,
        reason,
        count,
    )
    assert row is not None
    return row


async def queued_deletions(pool: asyncpg.Pool, profile: str | None, limit: int) -> list[tuple[str, str]]:
    rows = await pool.fetch(
        """select source_id, message_id from identity.deletion_queue
           where ($1::text is null or profile_id = $1) order by queued_time limit $2""",
        profile,
        limit,
    )
    return [(r["source_id"], r["message_id"]) for r in rows]


async def dequeue_deletions(pool: asyncpg.Pool, refs: Sequence[tuple[str, str]]) -> None:
    await pool.execute(
        """delete from identity.deletion_queue q using unnest($1::text[], $2::text[]) as u(s, m)
           where q.source_id = u.s and q.message_id = u.m""",
        [r[0] for r in refs],
        [r[1] for r in refs],
    )


async def count_events_deleted(pool: asyncpg.Pool, profile: str, n: int) -> None:
    await pool.execute(
        "update identity.profile_tombstones set events_deleted = events_deleted + $2 where profile_id = $1",
        profile,
        n,
    )


# ---------------------------------------------------------------------------------------------
# Metrics


async def profile_size_counts(pool: asyncpg.Pool) -> Mapping[int, int]:
    rows = await pool.fetch(
        """select n, count(*) as c
           from (select count(*) as n from identity.identifiers group by profile_id) t group by n"""
    )
    return {r["n"]: r["c"] for r in rows}
