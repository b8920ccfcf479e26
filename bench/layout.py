"""bench/layout: what the identity consumer's data layout costs on this machine's memory.

    python -m bench.layout [--idents N] [--rounds R]

The consumer's Python (bench/identity (b)) spent its time reading entries of big dicts keyed by
(kind, value) tuples, in an order unrelated to where they sit in memory; this measured what that
layout cost, and the identity graph now keeps one record per identifier (domain.Node). Two
measures, each a ratio against a baseline timed in the same round (this machine's speed moves by
a third within minutes):

(1) lookup order: N lookups in a dict of N identifiers, in random order against the order the
    identifiers were made and entered in. Their ratio is what the cache misses of scattered
    entries cost here.
(2) layout: the loop that plans the identifiers' rows (services.identity.store._plan_identifiers)
    written two ways over the same N identifiers: the way it was, each field of an identifier an
    entry of its own dict (profile, birth, component, last seen, attributes, new, isolated) and
    the identifiers visited in a set's order; and with one record per identifier holding those
    fields, visited in a list. The ratio is what a record per identifier would save this loop.

Both run with the collector off and the identifiers made among other allocations and frees, as
in a batch; pure Python (not the compiled consumer): the ratios are the point, not the times.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

Ident = tuple[str, str]


class Record:
    """Everything the write plan reads of one identifier."""

    __slots__ = ("attrs", "birth", "comp", "ident", "isolated", "last", "new", "prof")

    def __init__(self, ident: Ident, prof: str, birth: tuple[Any, ...], comp: int | None, last: Any) -> None:
        self.ident = ident
        self.prof = prof
        self.birth = birth
        self.comp = comp
        self.last = last
        self.attrs: bytes | None = None
        self.new = True
        self.isolated = False


class Batch:
    """N identifiers, their fields both ways."""

    def __init__(self, n: int, seed: int) -> None:
        rng = random.Random(seed)
        # Made in the order the consumer meets them, among other short-lived objects (as it
        # decodes and extracts a batch), then entered in the dicts in that order.
        made: list[Ident] = []
        churn: list[dict[str, Any]] = []
        for i in range(n):
            made.append(("anonymous_id", f"a{rng.randrange(10**12):012d}-1"))
            churn.append({"i": i, "v": [i]})
            if len(churn) > 5000:
                del churn[::2]
        self.idents = made
        self.prof: dict[Ident, str] = {}
        self.birth: dict[Ident, tuple[Any, ...]] = {}
        self.comp: dict[Ident, int | None] = {}
        self.last: dict[Ident, tuple[int]] = {}
        self.attrs: dict[Ident, bytes] = {}
        self.new: set[Ident] = set()
        self.isolated: set[Ident] = set()
        self.records: list[Record] = []
        for i, x in enumerate(self.idents):
            self.prof[x] = f"p{i:020x}"
            self.birth[x] = ((800_000_000 + i,), f"m{i}", "src")
            self.comp[x] = i if i % 3 else None
            self.last[x] = (800_000_000 + i,)
            self.new.add(x)
            self.records.append(Record(x, self.prof[x], self.birth[x], self.comp[x], self.last[x]))
        self.todo = set(self.idents)
        self.in_order = list(self.prof)
        self.shuffled = self.in_order[:]
        rng.shuffle(self.shuffled)

    def lookups(self, keys: list[Ident]) -> int:
        prof = self.prof
        n = 0
        for x in keys:
            n += len(prof[x])
        return n

    def rows_from_dicts(self) -> list[tuple[Any, ...]]:
        prof, birth, comp, last, attrs = self.prof, self.birth, self.comp, self.last, self.attrs
        new, isolated = self.new, self.isolated
        rows = []
        for x in self.todo:
            b = birth[x]
            if x in new:
                rows.append(
                    ("space", x[0], x[1], prof[x], comp.get(x), b[0], b[1], b[2],
                     last.get(x, b[0]), x in isolated, attrs.get(x))
                )  # fmt: skip
        return rows

    def rows_from_records(self) -> list[tuple[Any, ...]]:
        rows = []
        for r in self.records:
            b, x = r.birth, r.ident
            if r.new:
                rows.append(
                    ("space", x[0], x[1], r.prof, r.comp, b[0], b[1], b[2],
                     r.last or b[0], r.isolated, r.attrs)
                )  # fmt: skip
        return rows


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(n: int, rounds: int, seed: int = 1) -> dict[str, list[float]]:
    """Per round: ns per identifier of each variant, and the two ratios."""
    batch = Batch(n, seed)
    assert sorted(batch.rows_from_dicts()) == sorted(batch.rows_from_records())
    out: dict[str, list[float]] = {k: [] for k in ("random", "ordered", "dicts", "records")}
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            out["random"].append(timed(lambda: batch.lookups(batch.shuffled)) / n * 1e9)
            out["ordered"].append(timed(lambda: batch.lookups(batch.in_order)) / n * 1e9)
            out["dicts"].append(timed(batch.rows_from_dicts) / n * 1e9)
            out["records"].append(timed(batch.rows_from_records) / n * 1e9)
    finally:
        if was:
            gc.enable()
    out["random/ordered"] = [r / o for r, o in zip(out["random"], out["ordered"], strict=True)]
    out["dicts/records"] = [d / r for d, r in zip(out["dicts"], out["records"], strict=True)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--idents", type=int, default=40_000, help="identifiers (a batch holds 20,000-40,000)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    res = run(args.idents, args.rounds)

    def spread(key: str, unit: str = " ns") -> str:
        v = res[key]
        return f"{min(v):,.0f}-{max(v):,.0f}{unit} (median {statistics.median(v):,.0f})"

    def ratio(key: str) -> str:
        v = res[key]
        return f"{min(v):.2f}-{max(v):.2f} (median {statistics.median(v):.2f})"

    print(f"{args.idents:,} identifiers, {args.rounds} rounds, ns per identifier:")
    print(f"(1) a lookup in random order     {spread('random')}")
    print(f"    a lookup in insertion order  {spread('ordered')}")
    print(f"    random / ordered             {ratio('random/ordered')}")
    print(f"(2) plan rows from 7 dicts, sets {spread('dicts')}")
    print(f"    plan rows from records       {spread('records')}")
    print(f"    dicts / records              {ratio('dicts/records')}")


if __name__ == "__main__":
    main()
