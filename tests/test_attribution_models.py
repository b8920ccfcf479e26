"""Correctness of the attribution models: the PRODUCT.md fixture exactly, the rule-based models and
Shapley against marketing-attribution-models, Markov against an exact rational reference written
here and against ChannelAttribution's simulation, and shares that sum to 1 under every model."""

from __future__ import annotations

import random
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.attribution import models as m

# --------------------------------------------------------------------------------------------
# An independent exact reference: the absorbing chain in rationals, Gauss-Jordan elimination.


def _solve_rational(a: list[list[Fraction]], b: list[Fraction]) -> list[Fraction]:
    n = len(b)
    rows = [[*a[i], b[i]] for i in range(n)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        pv = rows[col][col]
        rows[col] = [x / pv for x in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                f = rows[r][col]
                rows[r] = [x - f * y for x, y in zip(rows[r], rows[col], strict=True)]
    return [rows[i][n] for i in range(n)]


def reference_markov(
    paths: Sequence[tuple[str, ...]],
    conv: Sequence[int],
    value: Sequence[Fraction | int],
    null: Sequence[int],
    order: int = 1,
) -> tuple[Fraction, dict[str, Fraction], dict[str, Fraction]]:
    """P(conversion), removal effects on conversions and on value, exactly."""
    counts: dict[tuple[object, object], Fraction] = {}
    value_in: dict[object, Fraction] = {}
    conv_in: dict[object, Fraction] = {}

    def add(s: object, d: object, w: Fraction) -> None:
        counts[(s, d)] = counts.get((s, d), Fraction(0)) + w

    for path, c, v, n in zip(paths, conv, value, null, strict=True):
        prev: object = "(start)"
        for i in range(len(path)):
            state = tuple(path[max(0, i - order + 1) : i + 1])
            add(prev, state, Fraction(c + n))
            prev = state
        add(prev, "(conv)", Fraction(c))
        add(prev, "(null)", Fraction(n))
        value_in[prev] = value_in.get(prev, Fraction(0)) + Fraction(v)
        conv_in[prev] = conv_in.get(prev, Fraction(0)) + Fraction(c)
    states = sorted({s for s, _ in counts} | {d for _, d in counts if d not in ("(conv)", "(null)")}, key=str)
    out_total = {s: sum((w for (a, _), w in counts.items() if a == s), Fraction(0)) for s in states}

    def solve(removed: str | None) -> tuple[Fraction, Fraction]:
        live = [s for s in states if s == "(start)" or removed is None or removed not in s]  # type: ignore[operator]
        index = {s: i for i, s in enumerate(live)}
        size = len(live)
        a = [[Fraction(int(i == j)) for j in range(size)] for i in range(size)]
        b = [Fraction(0)] * size
        bv = [Fraction(0)] * size
        for (s, d), w in counts.items():
            if s not in index or out_total[s] == 0:
                continue
            p = w / out_total[s]
            if d == "(conv)":
                b[index[s]] += p
                mean = value_in[s] / conv_in[s] if conv_in.get(s) else Fraction(0)
                bv[index[s]] += p * mean
            elif d in index:
                a[index[s]][index[d]] -= p
        return _solve_rational(a, b)[index["(start)"]], _solve_rational(a, bv)[index["(start)"]]

    p_conv, e_value = solve(None)
    labels = sorted({label for p in paths for label in p})
    re: dict[str, Fraction] = {}
    rev: dict[str, Fraction] = {}
    for label in labels:
        pc, ev = solve(label)
        re[label] = 1 - pc / p_conv
        rev[label] = 1 - ev / e_value if e_value else Fraction(0)
    return p_conv, re, rev


# --------------------------------------------------------------------------------------------
# The PRODUCT.md fixture

FIXTURE_PATHS = [("A", "B", "C"), ("A", "C"), ("B",), ("C", "A"), ("A", "B")]
FIXTURE_CONV = [1, 1, 0, 1, 0]
FIXTURE_VALUE = [10, 20, 0, 5, 0]
FIXTURE_NULL = [2, 0, 3, 1, 4]


def fixture_paths() -> m.Paths:
    return m.Paths.from_sequences(FIXTURE_PATHS, FIXTURE_CONV, FIXTURE_VALUE, FIXTURE_NULL)


def test_fixture_markov_exact() -> None:
    p_conv, re, _ = reference_markov(FIXTURE_PATHS, FIXTURE_CONV, FIXTURE_VALUE, FIXTURE_NULL)
    assert p_conv == Fraction(3, 13)
    # The rounded figures of PRODUCT.md.
    for label, expected in {"A": 0.6778, "B": 0.3793, "C": 0.7333}.items():
        assert float(re[label]) == pytest.approx(expected, abs=1e-4)
    total = sum(re.values())
    exact_credit = {label: 3 * re[label] / total for label in re}
    for label, expected in {"A": 1.1357, "B": 0.6356, "C": 1.2288}.items():
        assert float(exact_credit[label]) == pytest.approx(expected, abs=1e-4)

    result = m.markov(fixture_paths())
    assert result.p_conversion == pytest.approx(3 / 13, abs=1e-12)
    got = dict(zip(result.labels, result.removal_effects, strict=True))
    credit = result.attribution().as_dict()
    for label in "ABC":
        assert got[label] == pytest.approx(float(re[label]), abs=1e-9)
        assert credit[label][0] == pytest.approx(float(exact_credit[label]), abs=1e-9)
    assert sum(c for c, _ in credit.values()) == pytest.approx(3.0, abs=1e-9)
    assert sum(v for _, v in credit.values()) == pytest.approx(35.0, abs=1e-9)


def test_fixture_rule_based_by_hand() -> None:
    p = fixture_paths()
    expected: dict[m.Model, dict[str, Fraction | int]] = {
        m.Model.FIRST_TOUCH: {"A": 2, "B": 0, "C": 1},
        m.Model.LAST_TOUCH: {"A": 1, "B": 0, "C": 2},
        m.Model.LAST_NON_DIRECT: {"A": 1, "B": 0, "C": 2},
        m.Model.LINEAR: {"A": Fraction(4, 3), "B": Fraction(1, 3), "C": Fraction(4, 3)},
        m.Model.POSITION_BASED: {"A": Fraction(7, 5), "B": Fraction(1, 5), "C": Fraction(7, 5)},
    }
    for model, by_label in expected.items():
        got = m.heuristic(p, model).as_dict()
        for label, value in by_label.items():
            assert got[label][0] == pytest.approx(float(value), abs=1e-9), (model, label)


def test_markov_order1_value_removal_effects_match_reference() -> None:
    _, _, rev = reference_markov(FIXTURE_PATHS, FIXTURE_CONV, FIXTURE_VALUE, FIXTURE_NULL)
    result = m.markov(fixture_paths())
    for label, x in zip(result.labels, result.value_removal_effects, strict=True):
        assert x == pytest.approx(float(rev[label]), abs=1e-9)


# --------------------------------------------------------------------------------------------
# Random data


def random_journeys(
    seed: int, n: int, channels: Sequence[str] = ("A", "B", "C", "D", "direct"), max_len: int = 6
) -> tuple[list[tuple[str, ...]], list[int], list[int], list[int]]:
    rng = random.Random(seed)
    paths, conv, value, null = [], [], [], []
    for _ in range(n):
        length = rng.randint(1, max_len)
        path = tuple(rng.choice(channels) for _ in range(length))
        converted = rng.random() < 0.2 + 0.1 * ("A" in path) + 0.05 * length
        paths.append(path)
        conv.append(int(converted))
        value.append(rng.randint(1, 100) if converted else 0)
        null.append(int(not converted))
    return paths, conv, value, null


@pytest.mark.parametrize("order", [1, 2, 3])
def test_markov_matches_exact_reference_on_random_data(order: int) -> None:
    paths, conv, value, null = random_journeys(order, 60, ("A", "B", "C", "D"), max_len=4)
    p_conv, re, rev = reference_markov(paths, conv, value, null, order)
    result = m.markov(m.Paths.from_sequences(paths, conv, value, null), order)
    assert result.p_conversion == pytest.approx(float(p_conv), abs=1e-9)
    for label, x, xv in zip(result.labels, result.removal_effects, result.value_removal_effects, strict=True):
        assert x == pytest.approx(float(re[label]), abs=1e-9), label
        assert xv == pytest.approx(float(rev[label]), abs=1e-9), label


def _mam(
    paths: list[tuple[str, ...]], conv: list[int], value: list[int] | None, ages: Sequence[Sequence[float]]
) -> Any:
    import mam
    import polars

    df = polars.DataFrame(
        {
            "jid": [str(i) for i in range(len(paths))],
            "path": [" > ".join(p) for p in paths],
            "hours": [" > ".join(repr(a / 3600.0) for a in ages_) for ages_ in ages],
            "conv": [bool(c) for c in conv],
            **({"val": [float(v) for v in value]} if value is not None else {}),
        }
    )
    return mam.MAM(
        df,
        format_type="journey",
        channels_colname="path",
        journey_with_conv_colname="conv",
        user_id_colname="jid",
        time_till_conv_colname="hours",
        conversion_value_colname="val" if value is not None else None,
    )


def _as_map(result: Any) -> dict[str, float]:
    d = result.to_dict()
    return {str(k): float(v) for k, v in zip(d["channels"], d["attribution"], strict=True)}


@pytest.mark.parametrize("with_value", [False, True])
def test_rule_based_models_equal_marketing_attribution_models(with_value: bool) -> None:
    rng = random.Random(7)
    paths, conv, value, _ = random_journeys(11, 400)
    # Only converting journeys carry credit; ages in whole seconds before the conversion.
    keep = [i for i, c in enumerate(conv) if c]
    paths = [paths[i] for i in keep]
    value = [value[i] for i in keep]
    conv = [1] * len(keep)
    ages = [sorted((rng.randint(0, 40 * 86400) for _ in p), reverse=True) for p in paths]
    lib = _mam(paths, conv, value if with_value else None, ages)
    ours = m.Paths.from_sequences(paths, conv, value, None, ages=ages)
    pick = 1 if with_value else 0
    pairs = {
        m.Model.FIRST_TOUCH: lib.run_first_click(),
        m.Model.LAST_TOUCH: lib.run_last_click(),
        m.Model.LINEAR: lib.run_linear(),
        m.Model.POSITION_BASED: lib.run_position_based(),
        m.Model.TIME_DECAY: lib.run_time_decay(half_life_hours=7 * 24),
    }
    for model, theirs in pairs.items():
        got = {k: v[pick] for k, v in m.heuristic(ours, model).as_dict().items()}
        expected = _as_map(theirs)
        for label in set(got) | set(expected):
            assert got.get(label, 0.0) == pytest.approx(expected.get(label, 0.0), abs=1e-9), (model, label)


def test_position_based_is_configurable_and_short_paths_follow_the_rule() -> None:
    settings_ = m.ModelSettings(position_first=0.3, position_last=0.5)
    p = m.Paths.from_sequences([("A",), ("A", "B"), ("A", "B", "C", "D")], aggregate=False)
    w = m.touch_weights(p, m.Model.POSITION_BASED, settings_)
    assert w.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.3, 0.1, 0.1, 0.5])


def test_last_non_direct_skips_direct_unless_all_direct() -> None:
    p = m.Paths.from_sequences(
        [("A", "direct", "direct"), ("direct", "direct"), ("B", "A", "direct"), ("direct", "C")],
        aggregate=False,
    )
    w = m.touch_weights(p, m.Model.LAST_NON_DIRECT)
    assert w.tolist() == [1, 0, 0, 0, 1, 0, 1, 0, 0, 1]


def test_time_decay_halves_per_half_life() -> None:
    day = m.DAY_SECONDS
    p = m.Paths.from_sequences([("A", "B", "C")], ages=[(14 * day, 7 * day, 0.0)], aggregate=False)
    w = m.touch_weights(p, m.Model.TIME_DECAY)
    assert w.tolist() == pytest.approx([1 / 7, 2 / 7, 4 / 7], abs=1e-12)
    short = m.touch_weights(p, m.Model.TIME_DECAY, m.ModelSettings(half_life_seconds=day))
    assert short[2] / short[1] == pytest.approx(2**7)


def test_linear_repeated_channels_add_up() -> None:
    got = m.heuristic(m.Paths.from_sequences([("A", "B", "A", "A")]), m.Model.LINEAR).as_dict()
    assert got["A"][0] == pytest.approx(0.75) and got["B"][0] == pytest.approx(0.25)


def test_lookback_window() -> None:
    day = m.DAY_SECONDS
    t = [0.0, 10 * day, 25 * day, 31 * day, 40 * day]
    mask = m.lookback_mask(t, 40 * day, 30 * day)
    assert mask.tolist() == [False, True, True, True, True]
    assert m.clamp_lookback_days(200) == 90 and m.clamp_lookback_days(0) == 30


def test_path_transforms() -> None:
    path = ["D", "A", "B", "B", "C", "D", "C", "C"]
    assert m.transform_labels(path, "unique") == tuple(path)
    assert m.transform_labels(path, "exposure") == ("D", "A", "B", "C", "D", "C")
    assert m.transform_labels(path, "first") == ("D", "A", "B", "C")
    assert m.transform_labels(path, "frequency") == ("D(2)", "A(1)", "B(2)", "C(3)")
    assert m.transform_path(path, "exposure")[2] == ("B", [2, 3])


def test_markov_removal_effects_equal_marketing_attribution_models() -> None:
    paths, conv, value, _ = random_journeys(5, 300)
    ages = [[0.0] * len(p) for p in paths]
    lib = _mam(paths, conv, None, ages).run_markov()
    theirs = lib.metadata["removal_effect"]["removal_effect"].to_dict()
    result = m.markov(m.Paths.from_sequences(paths, conv, value, [1 - c for c in conv]))
    for label, x in zip(result.labels, result.removal_effects, strict=True):
        assert x == pytest.approx(theirs[label], abs=1e-9), label


def test_shapley_equals_marketing_attribution_models() -> None:
    paths, conv, value, _ = random_journeys(9, 500, ("A", "B", "C", "D"))
    ages = [[0.0] * len(p) for p in paths]
    for with_value in (False, True):
        lib = _mam(paths, conv, value if with_value else None, ages)
        expected = _as_map(lib.run_shapley(max_size=10))
        ours = m.Paths.from_sequences(paths, conv, value, [1 - c for c in conv])
        got = m.shapley(ours).attribution(ours).as_dict()
        for label in set(got) | set(expected):
            assert got.get(label, (0.0, 0.0))[int(with_value)] == pytest.approx(
                expected.get(label, 0.0), abs=1e-9
            ), label


def test_markov_within_channelattribution_simulation_tolerance() -> None:
    import ChannelAttribution as ca  # GPL: test and bench only
    import pandas as pd

    paths, conv, value, null = random_journeys(3, 2000, ("A", "B", "C", "D"), max_len=5)
    ours = m.markov(m.Paths.from_sequences(paths, conv, value, null))
    data = pd.DataFrame({"path": [">".join(p) for p in paths], "c": conv, "v": value, "n": null})
    res = ca.markov_model(
        data, "path", "c", var_value="v", var_null="n", out_more=True, verbose=False,
        flg_pro=False, nsim_start=1e6, max_step=200, seed=1,
    )  # fmt: skip
    theirs = res["removal_effects"].set_index("channel_name")["removal_effects_conversion"].to_dict()
    theirs_v = res["removal_effects"].set_index("channel_name")["removal_effects_conversion_value"].to_dict()
    for label, x, xv in zip(ours.labels, ours.removal_effects, ours.value_removal_effects, strict=True):
        # A million simulated journeys: a few thousandths of Monte-Carlo noise on these rates.
        assert x == pytest.approx(theirs[label], abs=0.01), label
        assert xv == pytest.approx(theirs_v[label], abs=0.02), label
    credit = res["result"].set_index("channel_name")["total_conversions"].to_dict()
    for label, (c, _) in ours.attribution().as_dict().items():
        assert c == pytest.approx(credit[label], rel=0.02), label


# --------------------------------------------------------------------------------------------
# Every conversion's credits sum to 1 under every model

labels_st = st.sampled_from(["A", "B", "C", "D", "direct"])
path_st = st.lists(labels_st, min_size=1, max_size=7).map(tuple)
journeys_st = st.lists(
    st.tuples(path_st, st.booleans(), st.integers(0, 1000), st.lists(st.floats(0, 90 * 86400), min_size=7)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(journeys=journeys_st, order=st.integers(1, 3), transform=st.sampled_from(list(m.Transform)))
def test_every_conversion_sums_to_one_under_every_model(
    journeys: list[tuple[tuple[str, ...], bool, int, list[float]]], order: int, transform: m.Transform
) -> None:
    paths = [m.transform_labels(p, transform) for p, _, _, _ in journeys]
    conv = [1 if c else 0 for _, c, _, _ in journeys]
    value = [v if c else 0 for _, c, v, _ in journeys]
    null = [1 - c for c in conv]
    ages = [a[: len(p)] for p, (_, _, _, a) in zip(paths, journeys, strict=True)]
    flat = m.Paths.from_sequences(paths, conv, value, null, ages=ages)
    settings_ = m.ModelSettings(markov_order=order)
    for model in m.ALL_MODELS:
        fitted = m.fit(flat, model, settings_)
        w = m.touch_weights(flat, model, settings_, fitted)
        sums = np.add.reduceat(w, flat.offsets[:-1])
        assert sums == pytest.approx(np.ones(flat.n_paths), abs=1e-9), model
        credit = m.attribute(flat, model, settings_)
        assert credit.conversions.sum() == pytest.approx(sum(conv), abs=1e-9), model
        assert credit.values.sum() == pytest.approx(sum(value), abs=1e-6), model
