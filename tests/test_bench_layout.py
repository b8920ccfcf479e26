"""bench/layout: the two ways of planning identifier rows it times make the same rows."""

from __future__ import annotations

import gc

from bench.layout import Batch, run


def test_both_layouts_plan_the_same_rows_and_every_measure_is_reported() -> None:
    batch = Batch(3000, seed=5)
    from_dicts, from_records = batch.rows_from_dicts(), batch.rows_from_records()
    assert len(from_dicts) == 3000
    assert sorted(from_dicts) == sorted(from_records)
    # Each identifier's own fields, not another's.
    first = batch.idents[0]
    row = next(r for r in from_records if (r[1], r[2]) == first)
    assert row[3] == batch.prof[first] and row[5:8] == batch.birth[first]
    assert (
        batch.lookups(batch.shuffled) == batch.lookups(batch.in_order) == sum(map(len, batch.prof.values()))
    )

    enabled = gc.isenabled()
    res = run(2000, rounds=2)
    assert gc.isenabled() is enabled
    for key in ("random", "ordered", "dicts", "records", "random/ordered", "dicts/records"):
        assert len(res[key]) == 2 and all(v > 0 for v in res[key]), key
    assert res["dicts/records"][0] == res["dicts"][0] / res["records"][0]
