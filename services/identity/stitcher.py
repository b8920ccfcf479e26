"""The identity graph's writers: the event-log consumer, SplitProfile and DeleteProfile.

Each runs in one transaction that holds the consumer's position row, so they never interleave:
a split or a deletion waits for the batch in flight and the next batch waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc
from prometheus_client import Counter

from services.identity import domain, store
from services.identity.domain import (
    Extractor,
    Graph,
    Ident,
    Key,
    Observed,
    OverlayLoader,
    Rules,
    StaleOverlay,
)
from services.identity.store import PgLoader
from touchpoint.events.v1 import event_pb2
from touchpoint.ingest.v1 import ingest_service_pb2 as ingest_pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from touchpoint.platform.errors import ServiceError, Violation, invalid_argument, not_found
from touchpoint.platform.eventlog import LogConsumer

log = logging.getLogger(__name__)

CONSUMER = "identity"
_BULK = 10_000
# Built-in kinds are labels of their own; custom kinds (client-chosen) share one label.
_LABEL_KINDS = frozenset({"user_id", "email", "phone", *domain.LOW_PRIORITY})

EVENTS_SKIPPED = Counter(
    "touchpoint_identity_events_skipped_total",
    "Events of the log not stitched, by reason (NO_IDENTIFIER, DELETED_IDENTIFIER).",
    ["reason"],
)
MERGES = Counter("touchpoint_identity_merges_total", "Merges of two or more existing profiles.")
REFUSED = Counter(
    "touchpoint_identity_refused_merges_total",
    "Merges refused, by reason (LIMIT_EXCEEDED, BLOCKED_VALUE) and identifier kind.",
    ["reason", "kind"],
)
RECOMPUTED = Counter(
    "touchpoint_identity_recomputed_components_total",
    "Components recomputed because of a late event, a split or a deletion.",
)
SPLITS = Counter("touchpoint_identity_splits_total", "Profiles split, by reason.", ["reason"])
DELETIONS = Counter("touchpoint_identity_deletions_total", "Profiles deleted (GDPR).")
REPREPARED = Counter(
    "touchpoint_identity_batches_reprepared_total",
    "Batches (per space) prepared again under the graph lock because the graph changed after they "
    "were prepared (a split, a deletion, another replica) or the overlay did not cover them.",
)
# Events between two yields to the event loop while a batch is prepared: the previous batch's
# commit, in flight meanwhile, moves on at each.
_YIELD_EVERY = domain.YIELD_EVERY
# After a batch of a space had to be prepared again (another writer of the space's graph,
# typically another replica), this many of its next batches skip the fast path in prepare and
# do all of it under the lock: work that would likely be thrown away is not done.
_CONTENDED_BATCHES = 16


# The consumer analyzes the graph's tables after adding this many identifiers, or as many as
# there were.
_ANALYZE_ROWS = 20_000
ANALYZED = Counter(
    "touchpoint_identity_tables_analyzed_total",
    "Times the consumer analyzed the graph's tables after growing them (fresh planner statistics).",
)

_gc_holds = 0
_gc_batches = 0
_GC_EVERY = 64


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Keeps the cyclic garbage collector off while a batch's graph is built (it may nest: the
    next batch is prepared while this one is applied). A batch builds hundreds of thousands of
    small containers that live until it is written and that reference counting frees; the
    collector would only walk them again and again (a tenth of the consumer's CPU in
    bench/identity with touchpoint.platform.server.tune_gc's thresholds)."""
    global _gc_holds, _gc_batches
    _gc_holds += 1
    if _gc_holds == 1:
        gc.disable()
    try:
        yield
    finally:
        _gc_holds -= 1
        if _gc_holds == 0:
            _gc_batches += 1
            if _gc_batches % _GC_EVERY == 0:
                # Now and then a full collection, for the cycles batches may have made (an
                # exception's traceback), then everything alive is set aside again.
                gc.unfreeze()
                gc.collect()
            # What the batches allocated is still alive (the batch in flight) or freed by
            # reference counting: set aside, so that enabling the collector does not make it
            # walk them all at once.
            gc.freeze()
            gc.enable()


@dataclass(slots=True)
class _SpaceBatch:
    rules: Rules
    # The batch's events of the space with identifiers, before and after dropping those that
    # carry deleted identifiers (`drop`: what to queue for deletion at ingest).
    observed_all: list[Observed]
    observed: list[Observed]
    drop: list[tuple[str, str, str]] = field(default_factory=list)
    no_identifier: int = 0
    blocked: list[Ident] = field(default_factory=list)
    # The batch applied and settled against the graph at `version`, and its writes planned
    # (None: to do under the lock).
    graph: Graph | None = None
    version: int | None = None
    plan: store.WritePlan | None = None
    # After apply: whether it wrote the graph, and the version its write moves the graph to.
    wrote: bool = False
    version_after: int = 0


@dataclass(slots=True)
class _Batch:
    spaces: dict[str, _SpaceBatch]
    # Set when every graph of the batch is final (settled, its writes planned: by prepare, or
    # by apply under the lock), or apply failed (`ok` false): the next batch then reads them as
    # its overlay.
    final: asyncio.Event = field(default_factory=asyncio.Event)
    ok: bool = False


def _label(kind: str) -> str:
    return kind if kind in _LABEL_KINDS else "custom"


class Stitcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        extractor: Extractor,
        rules: Rules,
        ingest: ingest_grpc.IngestServiceStub,
        batch_size: int = 2000,
        rules_cache_seconds: float = 10.0,
        log_pool: asyncpg.Pool | None = None,
    ) -> None:
        """`log_pool`: the consumer's (reading the log, preparing and writing batches; `pool`
        when not given). A pool made with raw_times=True carries event times as Postgres has
        them, (microseconds,) tuples, from the log to the graph's rows: the graph only compares
        and stores them, and a datetime costs 1 µs to decode and 2 µs each of the four times
        an event's time is written. SplitProfile and DeleteProfile use `pool`."""
        self.pool = pool
        self.extractor = extractor
        self.base_rules = rules
        self.ingest = ingest
        self.rules_cache_seconds = rules_cache_seconds
        self._rules: dict[str, tuple[float, Rules]] = {}
        # Space -> batches left to prepare without the fast path (see _CONTENDED_BATCHES).
        self._contended: dict[str, int] = {}
        # Identifiers the consumer added since it last analyzed the graph's tables, and how
        # many there were then (None: not analyzed by this process yet).
        self._grown = 0
        self._analyzed_rows: int | None = None
        # Only the columns stitching reads, as raw records: decoding whole LogEvents cost more
        # than a third of the graph step.
        self.consumer = LogConsumer(
            log_pool or pool,
            schema="identity",
            name=CONSUMER,
            apply=self.apply,
            prepare=self.prepare,
            batch_size=batch_size,
            columns=domain.LOG_COLUMNS,
            decode=None,
        )

    # -- rules ----------------------------------------------------------------------------
    async def rules_for(self, conn: asyncpg.Connection, spaces: Sequence[str]) -> dict[str, Rules]:
        now = time.monotonic()
        out: dict[str, Rules] = {}
        missing = []
        for s in spaces:
            hit = self._rules.get(s)
            if hit is not None and hit[0] > now:
                out[s] = hit[1]
            else:
                missing.append(s)
        if missing:
            configs = await store.space_rules(conn, missing)
            for s in missing:
                try:
                    rules = Rules.from_config(configs.get(s), self.base_rules)
                except (ValueError, TypeError):
                    log.exception("bad rules in identity.space_rules; using the defaults", extra={"space": s})
                    rules = self.base_rules
                out[s] = rules
                if self.rules_cache_seconds > 0:
                    self._rules[s] = (now + self.rules_cache_seconds, rules)
        return out

    # -- the consumer ---------------------------------------------------------------------
    # A batch is prepared outside any transaction while the previous batch commits: its
    # identifiers extracted, its slice of the graph loaded (over the previous batch's final
    # graph, OverlayLoader), its events applied, what went late recomputed (settle), its merge
    # log ids reserved and its writes planned. apply() then, under the space's graph lock,
    # checks that nothing else wrote the graph since and runs the planned writes; a batch whose
    # graph moved is prepared again there. See LogConsumer's "Pipelining".
    async def prepare(self, events: list[asyncpg.Record], previous: _Batch | None) -> _Batch:
        with _no_cyclic_gc():
            return await self._prepare(events, previous)

    async def _prepare(self, events: list[asyncpg.Record], previous: _Batch | None) -> _Batch:
        by_space: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for ev in events:
            by_space[ev[2]].append(ev)  # space_id (LOG_COLUMNS)
        batch = _Batch({})
        async with self.consumer.pool.acquire() as conn:  # reads only
            await self._analyze_if_grown(conn)
            rules = await self.rules_for(conn, list(by_space))
            check_deleted = await store.any_deleted(conn)
            extractor = self.extractor
            n = 0
            for space, evs in sorted(by_space.items()):
                r = rules[space]
                sb = _SpaceBatch(r, [], [])
                for ev in evs:
                    n += 1
                    if n % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)
                    o = domain.observe_row(extractor, r, ev)
                    if o is None:
                        sb.no_identifier += 1
                        continue
                    if o.blocked:
                        sb.blocked.extend(o.blocked)
                    sb.observed_all.append(o)
                sb.observed = sb.observed_all
                if check_deleted and sb.observed:
                    sb.observed, sb.drop = await self._find_deleted(conn, space, sb.observed)
                batch.spaces[space] = sb
            if previous is not None:
                await previous.final.wait()
                if not previous.ok:
                    return batch  # its commit fails: this batch is dropped
            for space, sb in batch.spaces.items():
                if not sb.observed:
                    continue
                left = self._contended.get(space, 0)
                if left:
                    self._contended[space] = left - 1
                    continue
                before = previous.spaces.get(space) if previous is not None else None
                loader: domain.GraphLoader
                if before is not None and before.wrote:
                    assert before.graph is not None
                    loader = OverlayLoader(PgLoader(conn, space), before.graph)
                    version = before.version_after
                else:
                    loader, version = PgLoader(conn, space), await store.graph_version(conn, space)
                graph = Graph(space, sb.rules)
                try:
                    await domain.observe_batch(graph, loader, sb.observed)
                    await domain.settle(graph, loader)
                except StaleOverlay:
                    log.info("batch prepared again under the lock", exc_info=True)
                    REPREPARED.inc()
                    continue
                await store.number(conn, graph)
                sb.plan = await store.plan_write(graph, sb.observed)
                sb.graph, sb.version = graph, version
                # What the next batch reads as its overlay, unless apply finds the graph moved.
                sb.wrote, sb.version_after = True, version + 1
        if all(sb.plan is not None or not sb.observed for sb in batch.spaces.values()):
            # Every graph is final: the next batch is prepared over them while this one commits.
            batch.ok = True
            batch.final.set()
        return batch

    async def _analyze_if_grown(self, conn: asyncpg.Connection) -> None:
        """Analyzes the graph's tables once the consumer has doubled the identifiers (or added
        _ANALYZE_ROWS), as a bulk load ends with. Autovacuum analyzes them a minute or more
        late; meanwhile the planner, believing a space holds the few hundred identifiers it had
        at the last analyze, scans all of them for each batch (seconds per batch at 1M events).
        Only the space column matters to those plans, which keeps an analyze cheap."""
        if self._grown < max(_ANALYZE_ROWS, self._analyzed_rows or 0):
            return
        self._grown = 0
        # A role that may not analyze them (not their owner, no pg_maintain) gets a warning
        # from Postgres and nothing is analyzed: autovacuum's statistics then have to do.
        await conn.execute(
            "analyze identity.identifiers (space_id, kind), identity.links (space_id), "
            "identity.components (space_id)"
        )
        rows = await conn.fetchval(
            "select reltuples::bigint from pg_class where oid = 'identity.identifiers'::regclass"
        )
        self._analyzed_rows = max(int(rows or 0), 0)
        ANALYZED.inc()

    async def apply(self, conn: asyncpg.Connection, batch: _Batch) -> None:
        # The batch and the consumer's position commit together and the log is durable at
        # ingest: a crash that loses this commit loses the position with it, and the batch is
        # applied again. So the commit need not wait for its WAL flush.
        plans: list[store.WritePlan] = []
        try:
            with _no_cyclic_gc():
                await self._check_or_plan(conn, batch, plans)
            batch.ok = True
        finally:
            batch.final.set()
        for plan in plans:
            await plan.run(conn)

    async def _check_or_plan(
        self, conn: asyncpg.Connection, batch: _Batch, plans: list[store.WritePlan]
    ) -> None:
        """Under each space's graph lock: checks the graph is still the one the batch was
        prepared against and takes its planned writes, else prepares it again (applies,
        settles, plans) on what is committed."""
        await conn.execute("set local synchronous_commit = off")
        for space, sb in sorted(batch.spaces.items()):  # graph locks in one order: no deadlock
            EVENTS_SKIPPED.labels("NO_IDENTIFIER").inc(sb.no_identifier)
            for x in sb.blocked:
                REFUSED.labels("BLOCKED_VALUE", _label(x[0])).inc()
            if not sb.observed_all:
                continue
            await store.lock_graph(conn, space)
            version = await store.graph_version(conn, space)
            graph = sb.graph
            if graph is not None and sb.plan is not None and sb.version == version:
                await store.queue_deletions(conn, space, sb.drop)
                EVENTS_SKIPPED.labels("DELETED_IDENTIFIER").inc(len(sb.drop))
                plans.append(sb.plan)
            else:
                # Prepared against a graph that changed since (or not at all): again, under
                # the lock.
                if graph is not None:
                    REPREPARED.inc()
                    self._contended[space] = _CONTENDED_BATCHES
                speculative = sb.plan is not None
                sb.plan = None
                observed = sb.observed_all
                if observed and await store.any_deleted(conn):
                    observed = await self._drop_deleted(conn, space, observed)
                if not observed:
                    if speculative:
                        # The next batch may be prepared over the graph just dropped, expecting
                        # the version its write would have made: that version must not come
                        # without that write.
                        await store.bump_version(conn, space)
                    sb.wrote = False
                    continue
                graph = Graph(space, sb.rules)
                await domain.apply(graph, PgLoader(conn, space), observed)
                await store.number(conn, graph)
                plans.append(await store.plan_write(graph, observed))
                sb.graph, sb.wrote, sb.version_after = graph, True, version + 1
            self._grown += graph.created
            self._count(graph)

    async def _find_deleted(
        self, conn: asyncpg.Connection, space: str, observed: list[Observed]
    ) -> tuple[list[Observed], list[tuple[str, str, str]]]:
        """(the events without a deleted identifier, (source, message, profile) of the others)."""
        digests = {x: domain.ident_digest(space, x) for o in observed for x in o.idents}
        deleted = await store.deleted_digests(conn, space, list(set(digests.values())))
        if not deleted:
            return observed, []
        keep: list[Observed] = []
        drop: list[tuple[str, str, str]] = []
        for o in observed:
            hit = next((deleted[d] for x in o.idents if (d := digests[x]) in deleted), None)
            if hit is None:
                keep.append(o)
            else:
                drop.append((o.source_id, o.message_id, hit))
        return keep, drop

    async def _drop_deleted(
        self, conn: asyncpg.Connection, space: str, observed: list[Observed]
    ) -> list[Observed]:
        keep, drop = await self._find_deleted(conn, space, observed)
        # Accepted by ingest before the suppression reached it: delete them too.
        await store.queue_deletions(conn, space, drop)
        EVENTS_SKIPPED.labels("DELETED_IDENTIFIER").inc(len(drop))
        return keep

    @staticmethod
    def _count(graph: Graph) -> None:
        for d in graph.decisions:
            if d.action == domain.MERGED:
                MERGES.inc()
            else:
                REFUSED.labels(d.reason, _label(d.limit_kind)).inc()
        if graph.recomputed:
            RECOMPUTED.inc(graph.recomputed)

    # -- SplitProfile ---------------------------------------------------------------------
    async def split(
        self,
        profile: str,
        *,
        ident: Ident | None,
        link: tuple[str, str] | None,
        note: str,
        request_id: str,
    ) -> tuple[list[str], asyncpg.Record]:
        """Detaches an identifier or cuts a link; returns the profiles of the split profile's
        identifiers (largest first) and the merge log entry."""
        async with self.pool.acquire() as conn, conn.transaction():
            await store.lock_consumer(conn, CONSUMER)
            if request_id:
                done = await store.split_by_request(conn, request_id)
                if done is not None:
                    return await store.largest_first(
                        conn, [done["profile_id"], *done["other_profile_ids"]]
                    ), done
            space = await store.profile_space(conn, profile)
            if space is None:
                raise _profile_not_found(profile)
            members = {(r["kind"], r["value"]) for r in await store.profile_identifiers(conn, profile)}
            rules = (await self.rules_for(conn, [space]))[space]
            graph = Graph(space, rules)
            loader = PgLoader(conn, space)
            event: Key | None = None
            detached: list[Ident]
            if ident is not None:
                if ident not in members:
                    raise invalid_argument(
                        "NOT_IN_PROFILE",
                        "the identifier is not one of the profile's",
                        [
                            Violation(
                                "identifier", "NOT_IN_PROFILE", f"not an identifier of profiles/{profile}"
                            )
                        ],
                    )
                if len(members) == 1:
                    raise _failed("NOTHING_TO_SPLIT", "the profile has only this identifier")
                await loader.load_idents(graph, [ident])
                root = graph.detach(ident)
                reason, detached = "IDENTIFIER_DETACHED", [ident]
            else:
                assert link is not None
                sk = await self._find_link(conn, space, rules, link)
                await loader.load_links(graph, [sk])
                ln = graph.links[sk]
                if not members.intersection(ln.idents):
                    raise invalid_argument(
                        "NOT_IN_PROFILE",
                        "the link does not involve the profile",
                        [
                            Violation(
                                "link",
                                "NOT_IN_PROFILE",
                                f"the event links no identifier of profiles/{profile}",
                            )
                        ],
                    )
                if ln.cut:
                    raise _failed("ALREADY_CUT", "the link was cut before")
                await loader.load_idents(graph, ln.idents)
                root = graph.cut(sk)
                reason, detached, event = "LINK_CUT", list(ln.idents), ln.first
            if root is not None:
                graph.dirty.add(root)
            await domain.settle(graph, loader)
            await store.write(conn, graph)
            self._count(graph)
            sizes: dict[str, int] = defaultdict(int)
            for x in members:
                sizes[graph.profile_of(x)] += 1
            after = sorted(sizes, key=lambda p: (-sizes[p], p))
            entry = await store.record_split(
                conn,
                space_id=space,
                reason=reason,
                profile=profile,
                others=[p for p in after if p != profile],
                idents=detached,
                event=event,
                note=note,
                request_id=request_id or None,
            )
        SPLITS.labels(reason).inc()
        return after, entry

    async def _find_link(
        self, conn: asyncpg.Connection, space: str, rules: Rules, ref: tuple[str, str]
    ) -> bytes:
        # The event's identifier set, from the published log (an indexed read)...
        row = await store.event_for_link(conn, *ref)
        if row is not None and row["space_id"] == space:
            usable, _ = self.extractor.identifiers(
                rules,
                user_id=row["user_id"],
                anonymous_id=row["anonymous_id"],
                previous_id=row["previous_id"],
                traits=row["traits"] or {},
                context=row["context"] or {},
            )
            if len(usable) > 1:
                sk = domain.set_key(usable)
                if await store.link_exists(conn, space, sk):
                    return sk
        # ...or, when the event was deleted since, the link it was the first event of (a scan).
        first = await store.link_by_first_event(conn, space, *ref)
        if first is not None:
            return first
        raise not_found(
            "LINK_NOT_FOUND", "no link of this space was made by that event", link=f"{ref[0]}/{ref[1]}"
        )

    # -- DeleteProfile --------------------------------------------------------------------
    async def delete_profile(self, profile: str, reason: str) -> tuple[asyncpg.Record, int]:
        """Deletes a profile (GDPR); returns its tombstone and how many events this call deleted."""
        tomb = await store.tombstone(self.pool, profile)
        if tomb is not None:
            return tomb, await self.drain(profile)
        space = await store.profile_space(self.pool, profile)
        if space is None:
            raise _profile_not_found(profile)
        note = f"delete profiles/{profile}" + (f": {reason}" if reason else "")
        suppressed: set[Ident] = set()
        first = [(r["kind"], r["value"]) for r in await store.profile_identifiers(self.pool, profile)]
        # Suppress first: from now on ingest drops new events carrying these identifiers.
        await self._suppress(space, first, note)
        suppressed.update(first)
        async with self.pool.acquire() as conn, conn.transaction():
            await store.lock_consumer(conn, CONSUMER)
            if await store.profile_space(conn, profile) is None:
                raise _profile_not_found(profile)  # merged into another profile meanwhile
            idents: list[Ident] = sorted(
                (r["kind"], r["value"]) for r in await store.profile_identifiers(conn, profile)
            )
            late = [x for x in idents if x not in suppressed]
            if late:
                await self._suppress(space, late, note)
            rules = (await self.rules_for(conn, [space]))[space]
            graph = Graph(space, rules)
            loader = PgLoader(conn, space)
            await loader.load_idents(graph, idents)
            gone = set(idents)
            comps = sorted({c for x in idents if (c := graph.root_of(x)) is not None})
            scan = rules.pattern is not None or any(x in graph.isolated for x in idents)
            sets = await loader.links_containing(graph, idents, comps, scan)
            rest = [tuple(x for x in s if x not in gone) for s in sets]
            await loader.load_links(graph, [domain.set_key(r) for r in rest if len(r) > 1])
            former = sorted({domain.profile_id(space, x) for x in idents} | {profile})
            await store.forget_profile_rows(conn, space, profile, idents, former)
            graph.forget(gone)
            await domain.settle(graph, loader)
            await store.write(conn, graph)
            self._count(graph)
            tomb = await store.record_deletion(
                conn, space, profile, [domain.ident_digest(space, x) for x in idents], reason, len(idents)
            )
        DELETIONS.inc()
        return tomb, await self.drain(profile)

    async def _suppress(self, space: str, idents: Sequence[Ident], reason: str) -> None:
        for i in range(0, len(idents), _BULK):
            chunk = idents[i : i + _BULK]
            await self.ingest.SuppressIdentifiers(
                ingest_pb.SuppressIdentifiersRequest(
                    space_id=space,
                    identifiers=[event_pb2.Identifier(kind=k, value=v) for k, v in chunk],
                    reason=reason,
                ),
                timeout=30,
            )

    async def drain(self, profile: str | None = None) -> int:
        """Deletes queued events at ingest (a profile's, or all); returns how many were deleted."""
        total = 0
        while refs := await store.queued_deletions(self.pool, profile, _BULK):
            resp = await self.ingest.DeleteEvents(
                ingest_pb.DeleteEventsRequest(
                    events=[event_pb2.EventRef(source_id=s, message_id=m) for s, m in refs]
                ),
                timeout=60,
            )
            await store.dequeue_deletions(self.pool, refs)
            if profile:
                await store.count_events_deleted(self.pool, profile, resp.deleted)
            total += resp.deleted
        return total


def _profile_not_found(profile: str) -> ServiceError:
    return not_found("PROFILE_NOT_FOUND", f"profiles/{profile} does not exist", profile=f"profiles/{profile}")


def _failed(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, reason, message)
