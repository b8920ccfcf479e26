"""Identity stitching rules, in memory: identifiers of events, limits, priority, junk, and the
order-independence property against an independent reference implementation."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.identity import domain
from services.identity.domain import (
    MERGED,
    REFUSED,
    Decision,
    Extractor,
    Graph,
    Ident,
    Key,
    Observed,
    OverlayLoader,
    Rules,
    StaleOverlay,
    profile_id,
)

SPACE = "s1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def key(minute: int, mid: str, src: str = "src") -> Key:
    return (T0 + timedelta(minutes=minute), mid, src)


# ---------------------------------------------------------------------------------------------
# A memory store that loads graph slices exactly as the Postgres store does: only what a batch
# touches, then whole components when something goes late.


@dataclass
class _Row:
    profile: str
    component: int | None
    birth: Key
    isolated: bool = False


@dataclass
class MemoryStore:
    idents: dict[Ident, _Row] = field(default_factory=dict)
    links: dict[bytes, domain.LinkState] = field(default_factory=dict)
    comps: dict[int, domain.ComponentState] = field(default_factory=dict)
    log: dict[int, Decision] = field(default_factory=dict)
    superseded: set[int] = field(default_factory=set)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _ident(self, graph: Graph, x: Ident) -> None:
        r = self.idents[x]
        graph.load_ident(x, r.profile, r.component, r.birth, r.isolated)
        if r.component is not None:
            c = self.comps[r.component]
            graph.load_component(r.component, c.max_key, c.size)

    async def load_idents(self, graph: Graph, idents: Sequence[Ident]) -> None:
        pids = {self.idents[x].profile for x in idents if x in self.idents}
        for y, r in self.idents.items():
            if r.profile in pids:
                self._ident(graph, y)

    async def load_links(self, graph: Graph, keys: Sequence[bytes]) -> None:
        for k in keys:
            if k in self.links:
                ln = self.links[k]
                graph.load_link(k, ln.idents, ln.first, ln.cut, ln.component)

    async def load_components(self, graph: Graph, cids: Sequence[int]) -> None:
        wanted = set(cids)
        for y, r in self.idents.items():
            if r.component in wanted:
                self._ident(graph, y)
        for k, ln in self.links.items():
            if ln.component in wanted:
                graph.load_link(k, ln.idents, ln.first, ln.cut, ln.component)

    async def load_decisions(self, graph: Graph, keys: Sequence[Key]) -> None:
        wanted = set(keys)
        for i, d in self.log.items():
            if i not in self.superseded and d.key in wanted:
                graph.recorded.setdefault(d, i)

    def write(self, graph: Graph) -> None:
        for old in graph.alias:
            new = graph.find(old)
            for r in self.idents.values():
                if r.component == old:
                    r.component = new
            for ln in self.links.values():
                if ln.component == old:
                    ln.component = new
        for c in graph.removed_components:
            self.comps.pop(c, None)
        for c in graph.changed_components:
            if c in graph.components:
                s = graph.components[c]
                self.comps[c] = domain.ComponentState(s.max_key, s.size)
        for x in graph.removed_idents:
            del self.idents[x]
        # Exactly what the Postgres store writes: the changed identifiers (it also writes the
        # observed ones, but only their last-seen time changes then).
        for x in graph.changed_identifiers():
            if x in graph.removed_idents:
                continue
            self.idents[x] = _Row(
                graph.profile_of(x), graph.root_of(x), graph.birth_of(x), x in graph.isolated
            )
        for k in graph.removed_links:
            self.links.pop(k, None)
        for k in graph.changed_links:
            ln = graph.links[k]
            comp = None if ln.component is None else graph.find(ln.component)
            self.links[k] = domain.LinkState(ln.idents, ln.first, ln.cut, comp)
        ids = graph.decision_ids or [next(self.ids) for _ in graph.decisions]
        for d, i in zip(graph.decisions, ids, strict=True):
            assert i not in self.log
            self.log[i] = d
        self.superseded.update(graph.superseded)

    def apply(self, rules: Rules, batch: Sequence[Observed]) -> None:
        graph = Graph(SPACE, rules)
        asyncio.run(domain.apply(graph, self, batch))
        self.write(graph)

    def apply_pipelined(self, rules: Rules, batches: Sequence[Sequence[Observed]]) -> int:
        """Applies batches as the consumer pipelines them: each batch is prepared whole (its
        fast path, then settle, its decisions numbered) over an overlay of the previous batch's
        final graph *before* that graph is written; then the previous write lands. Returns how
        many batches the overlay could not serve (prepared again on the store after the write)."""

        async def run() -> int:
            prev: Graph | None = None
            again = 0
            for batch in batches:
                graph: Graph | None = Graph(SPACE, rules)
                assert graph is not None
                loader = self if prev is None else OverlayLoader(self, prev)
                try:
                    await domain.observe_batch(graph, loader, batch)
                    await domain.settle(graph, loader)
                except StaleOverlay:
                    graph = None
                if prev is not None:
                    self.write(prev)  # the previous batch commits
                if graph is None:
                    again += 1
                    graph = Graph(SPACE, rules)
                    await domain.apply(graph, self, batch)
                graph.number([next(self.ids) for _ in graph.decisions])
                prev = graph
            if prev is not None:
                self.write(prev)
            return again

        return asyncio.run(run())

    def partition(self) -> dict[Ident, str]:
        return {x: r.profile for x, r in self.idents.items()}

    def current_log(self) -> set[Decision]:
        return {d for i, d in self.log.items() if i not in self.superseded}


def observed(k: Key, idents: Sequence[Ident], rules: Rules) -> Observed:
    return Observed(SPACE, k, tuple(sorted(set(idents), key=rules.order)))


# ---------------------------------------------------------------------------------------------
# The reference: the rules written out plainly, over all events sorted, from scratch, with no
# links, components or recomputation.


def reference(
    events: Sequence[tuple[Key, tuple[Ident, ...]]], rules: Rules
) -> tuple[dict[Ident, str], set[Decision]]:
    def prio(x: Ident) -> tuple[object, ...]:
        r = rules.rank(x[0])
        return (r, x[1])

    birth: dict[Ident, Key] = {}
    group_of: dict[Ident, int] = {}
    groups: dict[int, set[Ident]] = {}
    fresh = itertools.count()
    linked: set[frozenset[Ident]] = set()
    log: set[Decision] = set()

    def name(g: int) -> str:
        return profile_id(SPACE, min(groups[g], key=lambda m: (birth[m], prio(m))))

    def fits(members: set[Ident]) -> str:
        bad = []
        for kind in {m[0] for m in members}:
            if sum(1 for m in members if m[0] == kind) > rules.limit(kind):
                bad.append(kind)
        return min(bad, key=rules.rank) if bad else ""

    for k, ids in sorted(events):
        for x in ids:
            if x not in group_of:
                birth[x] = k
                g = next(fresh)
                group_of[x] = g
                groups[g] = {x}
        if len(set(ids)) < 2:
            continue
        first = frozenset(ids) not in linked
        linked.add(frozenset(ids))
        s = sorted(set(ids), key=prio)
        limit_kind = ""
        n = len(s)
        while True:
            gs = {group_of[x] for x in s[:n]}
            bad = fits(set().union(*(groups[g] for g in gs)))
            if not bad:
                break
            limit_kind = limit_kind or bad
            n -= 1
        kept, dropped = s[:n], s[n:]
        gs = {group_of[x] for x in kept}
        before = {g: name(g) for g in gs}
        existed = {g for g in gs if birth[min(groups[g], key=lambda m: (birth[m], prio(m)))] < k}
        target = min(gs, key=lambda g: min((birth[m], prio(m)) for m in groups[g]))
        for g in gs - {target}:
            for m in groups.pop(g):
                group_of[m] = target
                groups[target].add(m)
        if len(gs) > 1 and target in existed and len(existed) > 1:
            others = tuple(sorted(before[g] for g in existed if g != target))
            if first:
                log.add(Decision(MERGED, "", "", name(target), others, tuple(kept), k))
        for x in dropped:
            kinds = [m[0] for m in groups[target]]
            if birth[x] == k and len(groups[group_of[x]]) == 1 and kinds.count(x[0]) < rules.limit(x[0]):
                g = group_of[x]
                groups.pop(g)
                group_of[x] = target
                groups[target].add(x)
        refused = tuple(x for x in dropped if group_of[x] != target)
        if refused and first:
            others = tuple(sorted({name(group_of[x]) for x in refused}))
            log.add(Decision(REFUSED, "LIMIT_EXCEEDED", limit_kind, name(target), others, refused, k))
    return {x: name(g) for x, g in group_of.items()}, log


# ---------------------------------------------------------------------------------------------
# The property: any arrival order, any batching, gives the reference's partition, names and log.

IDENTS: list[Ident] = [
    *(("user_id", f"u{i}") for i in range(3)),
    *(("anonymous_id", f"a{i}") for i in range(4)),
    *(("email", f"e{i}@x.io") for i in range(2)),
    *(("device_id", f"d{i}") for i in range(2)),
]

event_strategy = st.tuples(
    st.integers(min_value=0, max_value=6),  # minute: ties on time are common
    st.lists(st.sampled_from(IDENTS), min_size=1, max_size=4, unique=True),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(event_strategy, min_size=1, max_size=14),
    data=st.data(),
    tight=st.booleans(),
)
def test_partition_is_independent_of_arrival_order(raw, data, tight) -> None:
    rules = Rules({"user_id": 1, "anonymous_id": 2, "device_id": 1} if tight else None)
    events = [(key(minute, f"m{i:02d}"), tuple(ids)) for i, (minute, ids) in enumerate(raw)]
    expected, expected_log = reference(events, rules)

    arrival = data.draw(st.permutations(events), label="arrival")
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(events) - 1))), label="batches"))
    store = MemoryStore()
    for lo, hi in itertools.pairwise([0, *cuts, len(arrival)]):
        store.apply(rules, [observed(k, ids, rules) for k, ids in arrival[lo:hi]])

    assert store.partition() == expected
    assert store.current_log() == expected_log


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(event_strategy, min_size=1, max_size=14),
    data=st.data(),
    tight=st.booleans(),
)
def test_pipelined_batches_give_the_reference_partition(raw, data, tight) -> None:
    """The consumer prepares a batch over the previous batch's graph while that one is still
    being written: any arrival order and batching still gives the reference's result."""
    rules = Rules({"user_id": 1, "anonymous_id": 2, "device_id": 1} if tight else None)
    events = [(key(minute, f"m{i:02d}"), tuple(ids)) for i, (minute, ids) in enumerate(raw)]
    expected, expected_log = reference(events, rules)
    arrival = data.draw(st.permutations(events), label="arrival")
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(events) - 1))), label="batches"))
    store = MemoryStore()
    store.apply_pipelined(
        rules,
        [
            [observed(k, ids, rules) for k, ids in arrival[lo:hi]]
            for lo, hi in itertools.pairwise([0, *cuts, len(arrival)])
        ],
    )
    assert store.partition() == expected
    assert store.current_log() == expected_log


def test_pipelined_batches_are_served_by_the_overlay() -> None:
    """People whose events span consecutive batches (anonymous visits, a login, more devices,
    some late): every batch is prepared over the previous one's graph, none again."""
    rules = Rules()
    events = []
    for p in range(30):
        ids = [
            [("anonymous_id", f"a{p}-0")],
            [("anonymous_id", f"a{p}-1")],
            [("user_id", f"u{p}"), ("anonymous_id", f"a{p}-0"), ("email", f"p{p}@x.io")],
            [("user_id", f"u{p}"), ("anonymous_id", f"a{p}-1")],
            [("user_id", f"u{p}"), ("anonymous_id", f"a{p}-2")],
        ]
        for k, xs in enumerate(ids):
            late = 10 if (p * 5 + k) % 17 == 0 else 0
            events.append((key(p * 2 + k * 3 - late, f"m{p}-{k}"), tuple(xs)))
    expected, expected_log = reference(events, rules)
    arrival = sorted(
        events, key=lambda e: e[0][0] + timedelta(minutes=10 if e[0][1].endswith(("0", "5")) else 0)
    )
    batches = [[observed(k, ids, rules) for k, ids in arrival[i : i + 7]] for i in range(0, len(arrival), 7)]
    store = MemoryStore()
    assert store.apply_pipelined(rules, batches) == 0
    assert store.partition() == expected
    assert store.current_log() == expected_log
    assert len(set(expected.values())) == 30


def test_a_batch_supersedes_a_decision_the_previous_batch_is_still_writing() -> None:
    """Batch 1 refuses to merge two users' profiles through a shared browser; batch 2, prepared
    while batch 1 is still being written, brings an earlier event that changes who the browser
    went to. Its settle recomputes the component over the overlay: the refusal batch 1 made
    (its merge log id reserved before its write) is superseded, the new one recorded."""
    rules = Rules()
    events = [
        (key(10, "e1"), (("user_id", "A"), ("anonymous_id", "1"))),
        (key(11, "e2"), (("user_id", "B"), ("anonymous_id", "2"))),
        (key(12, "e3"), (("anonymous_id", "1"), ("anonymous_id", "2"))),
        (key(5, "e0"), (("user_id", "B"), ("anonymous_id", "1"))),
    ]
    expected, expected_log = reference(events, rules)
    batches = [[observed(k, ids, rules) for k, ids in events[:3]], [observed(*events[3], rules)]]
    store = MemoryStore()
    assert store.apply_pipelined(rules, batches) == 0  # both prepared over the overlay
    assert store.partition() == expected
    assert store.current_log() == expected_log
    # Batch 1's refusal (e3) was written, then superseded by batch 2 by its reserved id.
    (first,) = [i for i, d in store.log.items() if d.key == key(12, "e3")]
    assert first in store.superseded
    assert {d.key for d in store.current_log()} == {key(10, "e1")}


def test_two_arrival_orders_with_a_late_event_agree() -> None:
    """The shared-device case that Segment's arrival-order rule gets wrong: A and B both use
    device d; B's event arrives first but happened later, so A keeps the device."""
    rules = Rules()
    ea = (key(1, "ma"), (("user_id", "A"), ("device_id", "d")))
    eb = (key(2, "mb"), (("user_id", "B"), ("device_id", "d")))
    results = []
    for order in ([ea, eb], [eb, ea]):
        store = MemoryStore()
        for k, ids in order:
            store.apply(rules, [observed(k, ids, rules)])
        results.append((store.partition(), store.current_log()))
    assert results[0] == results[1]
    part, log = results[0]
    assert part[("device_id", "d")] == part[("user_id", "A")] != part[("user_id", "B")]
    (refusal,) = log
    assert refusal.action == REFUSED and refusal.limit_kind == "user_id"
    assert refusal.key == eb[0] and refusal.idents == (("device_id", "d"),)


# ---------------------------------------------------------------------------------------------
# The greedy rule, case by case


def stitch(rules: Rules, *events: tuple[int, Sequence[Ident]]) -> MemoryStore:
    store = MemoryStore()
    for i, (minute, ids) in enumerate(events):
        store.apply(rules, [observed(key(minute, f"m{i}"), ids, rules)])
    return store


def test_two_user_ids_never_share_a_profile() -> None:
    store = stitch(
        Rules(),
        (1, [("user_id", "A"), ("anonymous_id", "x")]),
        (2, [("user_id", "B"), ("anonymous_id", "x")]),
        (3, [("user_id", "B"), ("email", "b@x.io"), ("anonymous_id", "x")]),
    )
    p = store.partition()
    assert p[("user_id", "A")] == p[("anonymous_id", "x")]
    assert p[("user_id", "B")] == p[("email", "b@x.io")] != p[("user_id", "A")]


def test_limit_per_kind_refuses_the_sixth_anonymous_id() -> None:
    events = [(i, [("user_id", "A"), ("anonymous_id", f"x{i}")]) for i in range(6)]
    store = stitch(Rules(), *events)
    p = store.partition()
    assert {x for x, pid in p.items() if pid == p[("user_id", "A")]} == {
        ("user_id", "A"),
        *(("anonymous_id", f"x{i}") for i in range(5)),
    }
    (refusal,) = [d for d in store.current_log() if d.action == REFUSED]
    assert refusal.limit_kind == "anonymous_id" and refusal.idents == (("anonymous_id", "x5"),)


def test_lowest_priority_identifier_is_dropped_first() -> None:
    """B logs in on A's browser (x) with a fresh device id: the shared browser id is kept out,
    the device born with this event joins B."""
    store = stitch(
        Rules(),
        (1, [("user_id", "A"), ("anonymous_id", "x")]),
        (2, [("user_id", "B"), ("anonymous_id", "x"), ("device_id", "d")]),
    )
    p = store.partition()
    assert p[("device_id", "d")] == p[("user_id", "B")] != p[("anonymous_id", "x")]
    (refusal,) = store.current_log()
    assert refusal.idents == (("anonymous_id", "x"),) and refusal.others == (p[("user_id", "A")],)


def test_profile_is_named_after_its_oldest_identifier() -> None:
    store = stitch(
        Rules(),
        (1, [("anonymous_id", "x")]),
        (2, [("user_id", "A"), ("email", "a@x.io")]),
        (3, [("user_id", "A"), ("anonymous_id", "x")]),
    )
    assert set(store.partition().values()) == {profile_id(SPACE, ("anonymous_id", "x"))}
    (merge,) = store.current_log()
    assert merge.action == MERGED and merge.others == (profile_id(SPACE, ("user_id", "A")),)


def test_priority_is_configurable() -> None:
    rules = Rules(priority=("user_id", "device_id", "email"))
    assert rules.rank("device_id") < rules.rank("email") < rules.rank("crm_id") < rules.rank("anonymous_id")


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Rules({"email": 0})
    assert domain.parse_limits("user_id=1, email=3") == {"user_id": 1, "email": 3}
    with pytest.raises(ValueError):
        domain.parse_limits("email")


def test_detached_identifier_and_cut_link_are_recomputed() -> None:
    rules = Rules()
    store = stitch(
        rules,
        (1, [("user_id", "A"), ("anonymous_id", "x")]),
        (2, [("anonymous_id", "x"), ("anonymous_id", "y")]),
        (3, [("anonymous_id", "y"), ("email", "y@x.io")]),
    )
    assert len(set(store.partition().values())) == 1
    graph = Graph(SPACE, rules)
    bad = observed(key(2, "m1"), [("anonymous_id", "x"), ("anonymous_id", "y")], rules)
    sk = domain.set_key(bad.idents)
    asyncio.run(store.load_links(graph, [sk]))
    asyncio.run(store.load_idents(graph, bad.idents))
    root = graph.cut(sk)
    assert root is not None
    graph.dirty.add(root)
    asyncio.run(domain.settle(graph, store))
    store.write(graph)
    p = store.partition()
    assert (
        p[("anonymous_id", "y")] == p[("email", "y@x.io")] != p[("user_id", "A")] == p[("anonymous_id", "x")]
    )
    # The cut stays cut: the same set again links nothing.
    store.apply(rules, [observed(key(9, "m9"), bad.idents, rules)])
    assert store.partition() == p
    # Detach x from A: it becomes its own profile.
    graph = Graph(SPACE, rules)
    asyncio.run(store.load_idents(graph, [("anonymous_id", "x")]))
    root = graph.detach(("anonymous_id", "x"))
    assert root is not None
    graph.dirty.add(root)
    asyncio.run(domain.settle(graph, store))
    store.write(graph)
    p = store.partition()
    assert p[("anonymous_id", "x")] == profile_id(SPACE, ("anonymous_id", "x")) != p[("user_id", "A")]
    store.apply(rules, [observed(key(10, "m10"), [("user_id", "A"), ("anonymous_id", "x")], rules)])
    assert store.partition()[("anonymous_id", "x")] != store.partition()[("user_id", "A")]


def test_a_graph_is_freed_by_reference_counting_alone() -> None:
    """The consumer keeps the cyclic collector off while it builds and writes batches
    (stitcher._no_cyclic_gc) and counts on reference counting to free each batch's graph: a
    cycle among its nodes and profiles would keep every batch in memory until a full
    collection walked them all (half the consumer's CPU at a million events)."""
    rules = Rules()
    events = [
        (key(1, "m1"), [("user_id", "A"), ("anonymous_id", "x")]),
        (key(2, "m2"), [("email", "e@x.io"), ("anonymous_id", "y")]),
        (key(3, "m3"), [("anonymous_id", "x"), ("anonymous_id", "y")]),  # merges two profiles
        (key(4, "m4"), [("user_id", "B"), ("anonymous_id", "y")]),  # refused: one user_id
    ]
    late = (key(0, "m0"), [("user_id", "B"), ("device_id", "d"), ("anonymous_id", "x")])
    gc.collect()
    gc.disable()
    try:
        graph = Graph(SPACE, rules)
        for k, ids in events:
            graph.observe(ids, k, device={"model": "p"})
        graph.observe(late[1], late[0])  # earlier than its component: recomputed
        assert graph.dirty
        for root in sorted(graph.dirty):
            graph.recompute(root)
        assert {d.action for d in graph.decisions} == {MERGED, REFUSED}
        assert graph.changed_identifiers()
        del graph
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_new_identifiers_join_a_profile_without_one_of_their_own() -> None:
    """An event's new identifiers join the one existing profile of its other identifiers (or
    make one together) with no profile of their own made and merged away (Partition.join); when
    a limit would be broken, or two existing profiles meet, the greedy rule runs as for any
    link, with the same result and the same profile names."""
    rules = Rules({"user_id": 1})
    graph = Graph(SPACE, rules)
    part = graph.part
    graph.observe([("anonymous_id", "a")], key(1, "m1"))
    assert len(part.plist) == 1  # a page view: its new anonymous id is a profile of its own
    graph.observe([("user_id", "u"), ("anonymous_id", "a"), ("email", "u@x.io")], key(2, "m2"))
    assert len(part.plist) == 1  # the login: user id and email join it, no profile made for them
    named = profile_id(SPACE, ("anonymous_id", "a"))
    assert {graph.profile_of(x) for x in part.nodes} == {named}
    assert part.plist[0].counts == {"anonymous_id": 1, "user_id": 1, "email": 1}
    assert not graph.decisions
    # All new together: one profile, named after the identifier of the highest priority.
    graph.observe([("anonymous_id", "b"), ("user_id", "v")], key(3, "m3"))
    assert len(part.plist) == 2
    assert graph.profile_of(("anonymous_id", "b")) == profile_id(SPACE, ("user_id", "v"))
    # A second user id for the first profile: refused by the rule, the new one kept apart.
    graph.observe([("anonymous_id", "a"), ("user_id", "w")], key(4, "m4"))
    assert graph.profile_of(("user_id", "w")) == profile_id(SPACE, ("user_id", "w"))
    assert [(d.action, d.idents) for d in graph.decisions] == [(REFUSED, (("user_id", "w"),))]
    # Every node has a profile that holds it.
    for n in part.nodes.values():
        assert n.p >= 0 and n in part.plist[n.p].members


# ---------------------------------------------------------------------------------------------
# Identifiers of an event


def idents_of(extractor: Extractor | None = None, rules: Rules | None = None, **kw: object) -> list[Ident]:
    args: dict[str, object] = {
        "user_id": None,
        "anonymous_id": None,
        "previous_id": None,
        "traits": None,
        "context": None,
    }
    args.update(kw)
    usable, _ = (extractor or Extractor()).identifiers(rules or Rules(), **args)  # type: ignore[arg-type]
    return usable


def test_identifiers_of_an_event_in_priority_order() -> None:
    got = idents_of(
        Extractor(trait_keys=("crm_id",)),
        user_id="u1",
        anonymous_id="a1",
        traits={"email": "  Jane.Doe@Example.COM ", "phone": "(650) 253-0000", "crm_id": 42},
        context={
            "traits": {"email": "other@example.com"},
            "device": {"id": "dev-1", "advertisingId": "idfa-1", "token": "push-1"},
            "externalIds": [{"id": "cus_9", "type": "stripe_customer_id", "collection": "users"}],
        },
    )
    assert got == [
        ("user_id", "u1"),
        ("email", "jane.doe@example.com"),
        ("email", "other@example.com"),
        ("phone", "+16502530000"),
        ("crm_id", "42"),
        ("stripe_customer_id", "cus_9"),
        ("anonymous_id", "a1"),
        ("advertising_id", "idfa-1"),
        ("device_id", "dev-1"),
        ("push_token", "push-1"),
    ]


def test_phone_in_e164_with_the_default_region() -> None:
    assert idents_of(Extractor(default_region="GB"), traits={"phone": "020 7946 0958"}) == [
        ("phone", "+442079460958")
    ]
    assert idents_of(traits={"phone": "+1 650 555 1212"}) == [("phone", "+16505551212")]
    assert idents_of(traits={"phone": "12345"}) == []


@pytest.mark.parametrize(
    "junk",
    ["", "0", "-1", "null", "NULL", "None", "undefined", "anonymous", "Guest", "[object Object]", "NaN"],
)
def test_junk_values_are_never_identifiers(junk: str) -> None:
    usable, blocked = Extractor().identifiers(
        Rules(),
        user_id=None,
        anonymous_id=junk or None,
        previous_id=None,
        traits={"email": junk},
        context={"device": {"id": junk}},
    )
    assert usable == []
    if junk:
        assert ("device_id", junk) in blocked


def test_blocked_pattern_and_bad_emails() -> None:
    rules = Rules(blocked_pattern=r"^test-|@example\.invalid$")
    assert idents_of(
        rules=rules, user_id="test-123", anonymous_id="a1", traits={"email": "x@example.invalid"}
    ) == [("anonymous_id", "a1")]
    assert idents_of(traits={"email": "not-an-email"}) == []


def test_alias_links_previous_id_to_user_id() -> None:
    assert idents_of(user_id="u1", previous_id="a1") == [("user_id", "u1"), ("anonymous_id", "a1")]


def test_page_tokens_round_trip_and_reject_garbage() -> None:
    token = domain.encode_token("2026-01-01T00:00:00+00:00", "m1", "src")
    assert domain.decode_token(token, 3) == ["2026-01-01T00:00:00+00:00", "m1", "src"]
    assert domain.decode_token("garbage!", 3) is None
    assert domain.decode_token(token, 2) is None


def test_new_component_ids_grow_with_time_and_never_repeat() -> None:
    # Ids that grow put a batch's new index entries at the right edge of the indexes on
    # component ids (cheap inserts); they must stay positive bigints and unique in a process.
    ids = [domain.new_component_id() for _ in range(10_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0] > 0 and ids[-1] < 2**63
    now_us = time.time_ns() // 1000 - 1_577_836_800_000_000  # since 2020-01-01
    assert abs((ids[-1] >> 12) - now_us) < 60_000_000  # the high bits are the clock (µs)
