"""The vectorised report engine (reports.py) against the reference assembly and credit of one
path at a time (domain.assemble + domain.compute_credit) on random journeys: every model, every
path transform, several groupings, to 1e-9."""

from __future__ import annotations

import random
from typing import Any

import pytest

from services.attribution import domain as d
from services.attribution import models as m
from services.attribution import reports
from services.attribution.store import ReportRows

DAY = m.DAY_SECONDS
SOURCES = [("google", "cpc"), ("facebook", "paid-social"), ("adroll", "display"), ("(direct)", "(none)")]


def random_journeys(seed: int) -> tuple[list[d.TouchRow], list[d.ConversionRow], d.SpaceSettings]:
    rng = random.Random(seed)
    touches: list[d.TouchRow] = []
    conversions: list[d.ConversionRow] = []
    for p in range(rng.randint(5, 60)):
        profile = f"user_id:u{p}"
        for _ in range(rng.randint(0, 8)):
            source, medium = rng.choice(SOURCES)
            channel = "direct" if source == "(direct)" else medium
            content = rng.choice(["a", "b", "(none)"])
            # Whole days now and then: ties in time, and touches on a window's edge.
            t = float(rng.randint(0, 40)) * DAY if rng.random() < 0.3 else rng.uniform(0, 40 * DAY)
            dims = (rng.choice(["spring", "summer"]), source, medium, content, "(none)", channel)
            touches.append(d.TouchRow(profile, t, dims, "utm", profile))
        for k in range(rng.randint(0, 3)):
            event = rng.choice(["Order Completed", "Signed Up"])
            t = float(rng.randint(0, 40)) * DAY if rng.random() < 0.3 else rng.uniform(0, 40 * DAY)
            currency = "USD" if rng.random() < 0.9 else "EUR"
            conversions.append(
                d.ConversionRow(f"o{p}-{k}", event, profile, t, float(rng.randint(1, 100)), currency, False)
            )
    conversions.sort(key=lambda c: (c.time, c.conversion_id))
    settings = d.SpaceSettings("s", lookback_days={"Signed Up": 7}, default_lookback_days=20)
    return touches, conversions, settings


def engine_input(
    touches: list[d.TouchRow], conversions: list[d.ConversionRow], group_by: tuple[int, ...]
) -> ReportRows:
    convs: Any = [
        {"profile": c.profile, "t": c.time, "value": c.value, "currency": c.currency, "event": c.event}
        for c in conversions
    ]
    return ReportRows(
        [t.profile for t in touches],
        [t.time for t in touches],
        [reports.label_of(t.dims, group_by) for t in touches],
        [t.dims[5] == "direct" for t in touches],
        convs,
    )


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("transform", list(m.Transform))
def test_engine_equals_the_reference_under_every_model(seed: int, transform: m.Transform) -> None:
    touches, conversions, settings = random_journeys(seed)
    group_by = [(5,), (1, 2), (0, 1, 3)][seed % 3]
    null_start, null_end = 10 * DAY, 40 * DAY
    ref = d.assemble(conversions, touches, settings, group_by, null_start=null_start, null_end=null_end)
    report = reports.assemble(
        *reports.arrays(engine_input(touches, conversions, group_by), settings, "USD"),
        group_by,
        null_start=null_start,
        null_end=null_end,
    )
    assert report.n_conversions == len(ref.conversions)
    assert report.conversions_without_touches == sum(1 for p in ref.paths if not p)
    assert reports.touched_conversions(report) == d.touched_conversions(ref)
    ms = m.ModelSettings(half_life_seconds=3 * DAY)
    for model in m.ALL_MODELS:
        want = d.compute_credit(ref, model, ms, transform, "USD")
        got = reports.compute_credit(report, model, ms, transform)
        assert got.allocation == want.allocation, model
        assert set(got.conversions) == set(want.conversions), model
        for label, value in want.conversions.items():
            assert got.conversions[label] == pytest.approx(value, abs=1e-9), (model, label)
            assert got.revenue[label] == pytest.approx(want.revenue[label], abs=1e-9), (model, label)
        if want.allocation == "per_conversion":
            assert sum(got.conversions.values()) == pytest.approx(len(conversions), abs=1e-9)


def test_engine_with_no_touches_credits_direct() -> None:
    conversions = [d.ConversionRow("o", "Order Completed", "user_id:x", 5 * DAY, 10.0, "USD", False)]
    settings = d.SpaceSettings("s")
    report = reports.assemble(
        *reports.arrays(engine_input([], conversions, (1,)), settings, "USD"),
        (1,),
        null_start=0,
        null_end=9 * DAY,
    )
    credit = reports.compute_credit(report, m.Model.LINEAR, m.ModelSettings(), m.Transform.UNIQUE)
    assert credit.conversions == {"(direct)": 1.0} and credit.revenue == {"(direct)": 10.0}
    assert report.conversions_without_touches == 1
