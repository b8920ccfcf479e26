"""Attribution models: pure, exact and vectorised. No I/O.

Vocabulary
----------
* A *touch* is one marketing contact (a label: a channel, or a campaign/source/medium key).
* A *path* is the ordered touches before one outcome. Converting paths end in a conversion (with a
  value); the others end in *null* (the journey stopped). ``Paths`` holds many paths at once as flat
  numpy arrays (``ids`` of every touch, ``offsets`` where each path starts) with, per path, its
  ``conversions``, conversion ``values`` and ``nulls`` (journeys that did not convert). Identical
  paths are aggregated first (``Paths.from_sequences``) so that the models work on unique paths.

Two kinds of results
--------------------
* ``touch_weights(paths, model, ...)`` gives every touch its share of its path's conversion; the
  shares of one path sum to 1 under every model. This is the *per-conversion* allocation that
  conversion paths and heuristic reports use.
* ``attribute(paths, model, ...)`` gives each label its credited conversions and value. For the
  rule-based models and Shapley it is the sum of the per-conversion shares. For the Markov model it
  is the **global-share allocation** (as ChannelAttribution and the literature do): each label
  gets ``total conversions × RE_c / Σ RE`` and ``total value × REv_c / Σ REv`` where ``RE`` are the
  removal effects computed on conversions and ``REv`` those computed on value. A Markov credit can
  therefore land on a label for conversions whose own path did not contain it (the chain says the
  label raises the conversion probability of the whole system). ``touch_weights`` under Markov
  splits one conversion by the removal effects of its own labels (the "path share"); summed, the
  path shares generally differ from the global shares, and reports say which one they show.

The Markov chain
----------------
Order k (1–3): the state after touch i is the tuple of the last ≤ k labels (shorter at the start of
a path). Transitions are counted with each path's weight (conversions + nulls); the last state goes
to ``conv`` with the conversions and to ``null`` with the nulls. Absorption probabilities are
solved exactly: ``(I − Q) h = r``. Removing label c turns every state that contains c into null.
``RE_c = 1 − P(conv | c removed) / P(conv)``. The value chain replaces ``r`` by ``r ⊙ v̄`` where
``v̄_s`` is the mean value of the conversions whose last state is s. At order 1 a self-transition
(A > A) does not change any absorption probability, so repeated touches need no special rule.

Shapley
-------
Coalition value v(S) = conversion rate of the journeys whose set of distinct labels is exactly S
(0 when none). For each distinct label set S of a converting path, the Shapley values of S's labels
in the game restricted to the subsets of S; the conversions of the paths with set S are split in
proportion (their sum is v(S) > 0, by efficiency). This is the definition of the Shapley model in
marketing-attribution-models. A label set larger than ``shapley_max_labels`` is split equally.
Shapley values can be negative (a label whose presence lowers the conversion rate).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from itertools import chain
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import scipy.sparse.linalg as spla

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

K = TypeVar("K", bound=Hashable)

DIRECT = "direct"
DAY_SECONDS = 86_400.0
DEFAULT_LOOKBACK_DAYS = 30
MAX_LOOKBACK_DAYS = 90


class Model(StrEnum):
    FIRST_TOUCH = "first_touch"
    LAST_TOUCH = "last_touch"
    LAST_NON_DIRECT = "last_non_direct"
    LINEAR = "linear"
    POSITION_BASED = "position_based"
    TIME_DECAY = "time_decay"
    MARKOV = "markov"
    SHAPLEY = "shapley"


HEURISTIC_MODELS = (
    Model.FIRST_TOUCH,
    Model.LAST_TOUCH,
    Model.LAST_NON_DIRECT,
    Model.LINEAR,
    Model.POSITION_BASED,
    Model.TIME_DECAY,
)
DATA_DRIVEN_MODELS = (Model.MARKOV, Model.SHAPLEY)
ALL_MODELS = HEURISTIC_MODELS + DATA_DRIVEN_MODELS


class Transform(StrEnum):
    """Path transforms (as in Google's Fractribution), applied before a model sees a path.

    unique: the path as it is.  exposure: consecutive repeats collapse into one (A A B A -> A B A).
    first: only the first occurrence of each label (A A B A -> A B).  frequency: first occurrences,
    each labelled with its count (A A B A -> A(3) B(1)).
    """

    UNIQUE = "unique"
    EXPOSURE = "exposure"
    FIRST = "first"
    FREQUENCY = "frequency"


@dataclass(frozen=True)
class ModelSettings:
    """The tunable parts of the models."""

    # Position-based shares of the first and the last touch; the middle shares the rest.
    position_first: float = 0.4
    position_last: float = 0.4
    # Time-decay half-life in seconds (weight 2^(−Δt/H), Δt = conversion time − touch time).
    half_life_seconds: float = 7 * DAY_SECONDS
    # Markov chain order, 1 to 3.
    markov_order: int = 1
    # Label sets larger than this are split equally by Shapley (2^n coalitions each).
    shapley_max_labels: int = 12
    # The label that last-non-direct skips unless the whole path is direct.
    direct_label: str = DIRECT

    def validate(self) -> list[tuple[str, str]]:
        """(field, problem) for every unusable setting."""
        bad = []
        if not (0 <= self.position_first <= 1 and 0 <= self.position_last <= 1):
            bad.append(("position_first", "position shares must be between 0 and 1"))
        if self.position_first + self.position_last > 1 + 1e-12:
            bad.append(("position_last", "first + last position shares must be at most 1"))
        if not self.half_life_seconds > 0:
            bad.append(("half_life", "the half-life must be positive"))
        if self.markov_order not in (1, 2, 3):
            bad.append(("markov_order", "the Markov order must be 1, 2 or 3"))
        if self.shapley_max_labels < 1 or self.shapley_max_labels > 16:
            bad.append(("shapley_max_labels", "must be between 1 and 16"))
        return bad


# --------------------------------------------------------------------------------------------
# Path helpers


def _factorize(items: Sequence[K]) -> tuple[IntArray, list[K]]:
    """(index of each item among the unique ones, the unique items in first-seen order)."""
    unique = list(dict.fromkeys(items))
    position = {k: i for i, k in enumerate(unique)}
    return np.fromiter(map(position.__getitem__, items), np.int64, len(items)), unique


def _bincount(index: IntArray, weights: npt.ArrayLike, size: int) -> FloatArray:
    return np.bincount(index, weights, minlength=size).astype(np.float64, copy=False)


def lookback_mask(touch_times: npt.ArrayLike, conversion_time: float, window_seconds: float) -> Any:
    """Which touches count for a conversion: those in [t_conversion − window, t_conversion]."""
    t = np.asarray(touch_times, dtype=np.float64)
    return (t >= conversion_time - window_seconds) & (t <= conversion_time)


def clamp_lookback_days(days: float) -> float:
    if days <= 0:
        return float(DEFAULT_LOOKBACK_DAYS)
    return float(min(days, MAX_LOOKBACK_DAYS))


def transform_path(labels: Sequence[str], transform: Transform | str) -> list[tuple[str, list[int]]]:
    """The steps of a transformed path: (state label, indices of the original touches it stands
    for). A model's credit for a step is shared equally by those touches."""
    t = Transform(transform)
    if t is Transform.UNIQUE:
        return [(label, [i]) for i, label in enumerate(labels)]
    if t is Transform.EXPOSURE:
        steps: list[tuple[str, list[int]]] = []
        for i, label in enumerate(labels):
            if steps and steps[-1][0] == label:
                steps[-1][1].append(i)
            else:
                steps.append((label, [i]))
        return steps
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    if t is Transform.FIRST:
        return [(label, idx) for label, idx in groups.items()]
    return [(f"{label}({len(idx)})", idx) for label, idx in groups.items()]


def transform_labels(labels: Sequence[str], transform: Transform | str) -> tuple[str, ...]:
    return tuple(label for label, _ in transform_path(labels, transform))


# --------------------------------------------------------------------------------------------
# Paths


@dataclass
class Paths:
    """Many paths as flat arrays. ``labels[ids[offsets[p]:offsets[p+1]]]`` is path p."""

    labels: list[str]
    ids: IntArray
    offsets: IntArray
    conversions: FloatArray
    values: FloatArray
    nulls: FloatArray
    # Seconds between each touch and its path's conversion (time decay); None when unknown.
    ages: FloatArray | None = None
    # Which touches are direct (last non-direct); None: those labelled settings.direct_label.
    direct: npt.NDArray[np.bool_] | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_paths(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> IntArray:
        return np.diff(self.offsets)

    @property
    def path_index(self) -> IntArray:
        """The path of every touch."""
        if "pidx" not in self._cache:
            self._cache["pidx"] = np.repeat(np.arange(self.n_paths, dtype=np.int64), self.lengths)
        return self._cache["pidx"]  # type: ignore[no-any-return,unused-ignore]

    @property
    def position(self) -> IntArray:
        """The position of every touch in its path (0 = first)."""
        if "pos" not in self._cache:
            self._cache["pos"] = np.arange(len(self.ids), dtype=np.int64) - self.offsets[self.path_index]
        return self._cache["pos"]  # type: ignore[no-any-return,unused-ignore]

    def path(self, p: int) -> tuple[str, ...]:
        return tuple(self.labels[i] for i in self.ids[self.offsets[p] : self.offsets[p + 1]])

    def label_id(self, label: str) -> int | None:
        try:
            return self.labels.index(label)
        except ValueError:
            return None

    @classmethod
    def from_sequences(
        cls,
        paths: Iterable[Sequence[str]],
        conversions: Iterable[float] | None = None,
        values: Iterable[float] | None = None,
        nulls: Iterable[float] | None = None,
        *,
        ages: Iterable[Sequence[float]] | None = None,
        aggregate: bool = True,
    ) -> Paths:
        """Builds Paths from label sequences. Empty paths are dropped. With ``aggregate`` (and no
        ages) identical paths are merged, adding up their conversions, values and nulls."""
        path_list = [p if isinstance(p, tuple) else tuple(p) for p in paths]
        n = len(path_list)
        conv = np.ones(n) if conversions is None else np.fromiter(conversions, np.float64, n)
        val = np.zeros(n) if values is None else np.fromiter(values, np.float64, n)
        nul = np.zeros(n) if nulls is None else np.fromiter(nulls, np.float64, n)
        age_list = None if ages is None else [tuple(a) for a in ages]
        if aggregate and age_list is None:
            inverse, keys = _factorize(path_list)
            u = len(keys)
            conv = _bincount(inverse, conv, u)
            val = _bincount(inverse, val, u)
            nul = _bincount(inverse, nul, u)
            path_list = keys
        lengths = np.fromiter(map(len, path_list), np.int64, len(path_list))
        if not lengths.all():
            keep = np.flatnonzero(lengths)
            path_list = [path_list[i] for i in keep]
            conv, val, nul, lengths = conv[keep], val[keep], nul[keep], lengths[keep]
            if age_list is not None:
                age_list = [age_list[i] for i in keep]
        # Label ids and the flat touch array at C speed (dict and map, no Python loop body).
        label_index = {label: i for i, label in enumerate(dict.fromkeys(chain.from_iterable(path_list)))}
        total = int(lengths.sum())
        flat = np.fromiter(map(label_index.__getitem__, chain.from_iterable(path_list)), np.int64, total)
        offsets = np.zeros(len(path_list) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        age_arr = None
        if age_list is not None:
            age_arr = np.fromiter(chain.from_iterable(age_list), np.float64, total)
        return cls(list(label_index), flat, offsets, conv, val, nul, age_arr)

    @classmethod
    def from_strings(
        cls,
        paths: Sequence[str],
        conversions: npt.ArrayLike,
        values: npt.ArrayLike | None = None,
        nulls: npt.ArrayLike | None = None,
        *,
        sep: str = ">",
    ) -> Paths:
        """Builds aggregated Paths from "A > B > C" strings (ChannelAttribution's input): identical
        strings are merged first, and only the unique ones are split."""
        conv = np.asarray(conversions, dtype=np.float64)
        val = np.zeros(len(paths)) if values is None else np.asarray(values, dtype=np.float64)
        nul = np.zeros(len(paths)) if nulls is None else np.asarray(nulls, dtype=np.float64)
        inverse, unique = _factorize(paths)
        u = len(unique)
        uconv = _bincount(inverse, conv, u)
        uval = _bincount(inverse, val, u)
        unul = _bincount(inverse, nul, u)
        split = [tuple(map(str.strip, s.split(sep))) for s in unique]
        return cls.from_sequences(split, uconv, uval, unul, aggregate=False)

    def map_labels(self, labels: Sequence[str]) -> FloatArray:
        """A 0/1 mask over self.labels of those in `labels`."""
        wanted = set(labels)
        return np.array([1.0 if label in wanted else 0.0 for label in self.labels])


# --------------------------------------------------------------------------------------------
# Per-touch weights


def _last_where(paths: Paths, mask: npt.NDArray[np.bool_]) -> IntArray:
    """For every path, the index of its last touch where mask holds, or -1."""
    cand = np.where(mask, np.arange(len(mask), dtype=np.int64), -1)
    return np.maximum.reduceat(cand, paths.offsets[:-1]) if paths.n_paths else cand[:0]


def _heuristic_weights(paths: Paths, model: Model, s: ModelSettings) -> FloatArray:
    n_touch = len(paths.ids)
    lengths = paths.lengths
    pidx = paths.path_index
    pos = paths.position
    n = lengths[pidx]
    if model is Model.FIRST_TOUCH:
        return (pos == 0).astype(np.float64)
    if model is Model.LAST_TOUCH:
        return (pos == n - 1).astype(np.float64)
    if model is Model.LINEAR:
        return 1.0 / n.astype(np.float64)
    if model is Model.POSITION_BASED:
        middle = (1.0 - s.position_first - s.position_last) / np.maximum(n - 2, 1)
        w = np.where(pos == 0, s.position_first, np.where(pos == n - 1, s.position_last, middle))
        w = np.where(n == 2, 0.5, w)
        return np.where(n == 1, 1.0, w).astype(np.float64)
    if model is Model.LAST_NON_DIRECT:
        last = paths.offsets[1:] - 1
        if paths.direct is not None:
            is_direct = paths.direct
        else:
            direct = paths.label_id(s.direct_label)
            is_direct = paths.ids == (direct if direct is not None else -1)
        found = _last_where(paths, ~is_direct)
        chosen = np.where(found >= 0, found, last)
        w = np.zeros(n_touch)
        w[chosen] = 1.0
        return w
    if model is Model.TIME_DECAY:
        if paths.ages is None:
            raise ValueError("time decay needs the age of every touch")
        age = np.maximum(paths.ages, 0.0)
        # Relative to the path's most recent touch: the common factor cancels when normalising
        # and long-past touches do not underflow to 0/0.
        youngest = np.minimum.reduceat(age, paths.offsets[:-1]) if paths.n_paths else age[:0]
        raw = np.exp2(-(age - youngest[pidx]) / s.half_life_seconds)
        total = np.add.reduceat(raw, paths.offsets[:-1]) if paths.n_paths else raw[:0]
        return raw / total[pidx]  # type: ignore[no-any-return,unused-ignore]
    raise ValueError(f"{model} is not a rule-based model")


def _share_weights(paths: Paths, share: FloatArray) -> FloatArray:
    """Per-touch weights from a per-label share: a path's conversion is split over its distinct
    labels in proportion to `share`, and a label's part is split equally over its touches. Paths
    whose labels all have share 0 are split equally over their touches."""
    n_labels = len(paths.labels)
    pidx = paths.path_index
    key = pidx * n_labels + paths.ids
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    per_touch_count = counts[inverse]
    s = share[paths.ids]
    # Each distinct (path, label) pair once: weight s / count summed over its touches = s.
    path_total = np.bincount(pidx, s / per_touch_count, minlength=paths.n_paths)
    denom = path_total[pidx]
    equal = 1.0 / paths.lengths[pidx]
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(denom != 0, s / per_touch_count / np.where(denom != 0, denom, 1.0), equal)
    return w.astype(np.float64)


def touch_weights(
    paths: Paths,
    model: Model | str,
    settings: ModelSettings = ModelSettings(),
    fitted: FittedModel | None = None,
) -> FloatArray:
    """Each touch's share of its path's conversion; the shares of every path sum to 1.

    Data-driven models need ``fitted`` (from ``fit``), usually fitted on more paths (non-converting
    ones too) than those being weighted."""
    model = Model(model)
    if model in HEURISTIC_MODELS:
        return _heuristic_weights(paths, model, settings)
    if fitted is None:
        raise ValueError(f"{model} needs a fitted model")
    if model is Model.MARKOV:
        assert isinstance(fitted, MarkovResult)
        return _share_weights(paths, fitted.share_for(paths.labels))
    assert isinstance(fitted, ShapleyResult)
    return fitted.touch_weights(paths)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Attribution:
    """Credited conversions and value per label."""

    labels: list[str]
    conversions: FloatArray
    values: FloatArray

    def as_dict(self) -> dict[str, tuple[float, float]]:
        return {
            label: (float(c), float(v))
            for label, c, v in zip(self.labels, self.conversions, self.values, strict=True)
        }


def credit_from_weights(paths: Paths, weights: FloatArray) -> Attribution:
    """Sums per-touch shares into per-label credit (conversions and value)."""
    pidx = paths.path_index
    n = len(paths.labels)
    conv = _bincount(paths.ids, weights * paths.conversions[pidx], n)
    val = _bincount(paths.ids, weights * paths.values[pidx], n)
    return Attribution(list(paths.labels), conv, val)


def heuristic(paths: Paths, model: Model | str, settings: ModelSettings = ModelSettings()) -> Attribution:
    return credit_from_weights(paths, _heuristic_weights(paths, Model(model), settings))


def all_heuristics(paths: Paths, settings: ModelSettings = ModelSettings()) -> dict[Model, Attribution]:
    models = [m for m in HEURISTIC_MODELS if m is not Model.TIME_DECAY or paths.ages is not None]
    return {m: heuristic(paths, m, settings) for m in models}


# --------------------------------------------------------------------------------------------
# Markov


@dataclass
class MarkovResult:
    """An exactly solved absorbing Markov chain and its removal effects."""

    labels: list[str]
    order: int
    p_conversion: float
    removal_effects: FloatArray
    expected_value: float
    value_removal_effects: FloatArray
    total_conversions: float
    total_value: float

    @property
    def share(self) -> FloatArray:
        total = self.removal_effects.sum()
        return self.removal_effects / total if total > 0 else np.zeros_like(self.removal_effects)

    @property
    def value_share(self) -> FloatArray:
        total = self.value_removal_effects.sum()
        if total > 0:
            return self.value_removal_effects / total
        return self.share

    def attribution(self) -> Attribution:
        """The global-share allocation (module docstring)."""
        return Attribution(
            list(self.labels), self.total_conversions * self.share, self.total_value * self.value_share
        )

    def share_for(self, labels: Sequence[str]) -> FloatArray:
        by_label = dict(zip(self.labels, self.removal_effects, strict=True))
        return np.array([by_label.get(label, 0.0) for label in labels], dtype=np.float64)


def _markov_order1(paths: Paths) -> MarkovResult:
    """Order 1: states 0 = start, 1..L = labels, L+1 = conv, L+2 = null; counted with bincount
    and solved densely (one batched solve for every removal)."""
    n_labels = len(paths.labels)
    size = n_labels + 3
    conv_state, null_state = n_labels + 1, n_labels + 2
    weight = paths.conversions + paths.nulls
    pidx = paths.path_index
    states = paths.ids + 1
    starts = paths.offsets[:-1]
    lasts = paths.offsets[1:] - 1
    inner = np.ones(len(states), dtype=bool)
    inner[lasts] = False
    src = np.concatenate([np.zeros(len(starts), dtype=np.int64), states[inner], states[lasts], states[lasts]])
    dst = np.concatenate(
        [
            states[starts],
            states[1:][inner[:-1]] if len(states) else states,
            np.full(len(lasts), conv_state),
            np.full(len(lasts), null_state),
        ]
    )
    w = np.concatenate([weight, weight[pidx][inner], paths.conversions, paths.nulls])
    counts = np.bincount(src * size + dst, w, minlength=size * size).reshape(size, size)
    value_in = np.bincount(states[lasts], paths.values, minlength=size)
    transient = n_labels + 1
    row = counts[:transient].sum(axis=1)
    row[row == 0] = 1.0
    p = counts[:transient] / row[:, None]
    q = p[:, :transient]
    r = p[:, conv_state]
    conv_into = counts[:transient, conv_state]
    mean_value = np.divide(value_in[:transient], conv_into, out=np.zeros(transient), where=conv_into > 0)
    # N = (I − Q)^-1. Removing label c makes its state absorb into null; for every other state j
    # h_j = h^(c)_j + f_jc h_c with f_jc = N_jc / N_cc the chance to reach c from j, so each
    # removal is exact from N without another solve.
    fundamental = np.linalg.inv(np.eye(transient) - q)
    h = fundamental @ r
    g = fundamental @ (r * mean_value)
    p_conv, e_value = float(h[0]), float(g[0])
    reach = fundamental[0, 1:] / np.diag(fundamental)[1:]
    removed_h = h[0] - reach * h[1:]
    removed_g = g[0] - reach * g[1:]
    re = 1.0 - removed_h / p_conv if p_conv > 0 else np.zeros(n_labels)
    rev = 1.0 - removed_g / e_value if e_value > 0 else np.zeros(n_labels)
    return MarkovResult(
        list(paths.labels),
        1,
        p_conv,
        np.clip(re, 0.0, None),
        e_value,
        np.clip(rev, 0.0, None),
        float(paths.conversions.sum()),
        float(paths.values.sum()),
    )


def _markov_order_k(paths: Paths, order: int) -> MarkovResult:
    """Order k: states are tuples of the last ≤ k label ids; sparse exact solves."""
    state_ids: dict[tuple[int, ...], int] = {(): 0}
    src: list[int] = []
    dst: list[int] = []
    wts: list[float] = []
    last_state = np.empty(paths.n_paths, dtype=np.int64)
    ids = paths.ids.tolist()
    offsets = paths.offsets.tolist()
    weights = (paths.conversions + paths.nulls).tolist()
    for p in range(paths.n_paths):
        seq = ids[offsets[p] : offsets[p + 1]]
        prev = 0
        for i in range(len(seq)):
            key = tuple(seq[max(0, i - order + 1) : i + 1])
            s = state_ids.setdefault(key, len(state_ids))
            src.append(prev)
            dst.append(s)
            wts.append(weights[p])
            prev = s
        last_state[p] = prev
    n_states = len(state_ids)
    counts = sp.csr_matrix((np.asarray(wts), (np.asarray(src), np.asarray(dst))), shape=(n_states, n_states))
    to_conv = np.bincount(last_state, paths.conversions, minlength=n_states)
    to_null = np.bincount(last_state, paths.nulls, minlength=n_states)
    value_in = np.bincount(last_state, paths.values, minlength=n_states)
    row = np.asarray(counts.sum(axis=1)).ravel() + to_conv + to_null
    row[row == 0] = 1.0
    q = sp.diags(1.0 / row) @ counts
    r = to_conv / row
    mean_value = np.divide(value_in, to_conv, out=np.zeros(n_states), where=to_conv > 0)
    rhs = np.stack([r, r * mean_value], axis=1)
    a = (sp.identity(n_states, format="csc") - q).tocsc()

    def solve(keep: npt.NDArray[np.bool_]) -> tuple[float, float]:
        idx = np.flatnonzero(keep)
        sub = a[idx][:, idx].tocsc()
        h = spla.splu(sub).solve(rhs[idx])
        return float(h[0, 0]), float(h[0, 1])  # state 0 (start) is always kept

    p_conv, e_value = solve(np.ones(n_states, dtype=bool))
    contains = np.zeros((len(paths.labels), n_states), dtype=bool)
    for key, s in state_ids.items():
        for label in set(key):
            contains[label, s] = True
    re = np.zeros(len(paths.labels))
    rev = np.zeros(len(paths.labels))
    for c in range(len(paths.labels)):
        pc, ev = solve(~contains[c])
        re[c] = 1.0 - pc / p_conv if p_conv > 0 else 0.0
        rev[c] = 1.0 - ev / e_value if e_value > 0 else 0.0
    return MarkovResult(
        list(paths.labels),
        order,
        p_conv,
        np.clip(re, 0.0, None),
        e_value,
        np.clip(rev, 0.0, None),
        float(paths.conversions.sum()),
        float(paths.values.sum()),
    )


def markov(paths: Paths, order: int = 1) -> MarkovResult:
    """The exact absorbing-chain Markov model of the given order (module docstring)."""
    if order not in (1, 2, 3):
        raise ValueError("the Markov order must be 1, 2 or 3")
    if paths.n_paths == 0:
        return MarkovResult([], order, 0.0, np.zeros(0), 0.0, np.zeros(0), 0.0, 0.0)
    return _markov_order1(paths) if order == 1 else _markov_order_k(paths, order)


# --------------------------------------------------------------------------------------------
# Shapley


@lru_cache(maxsize=32)
def _shapley_matrix(n: int) -> tuple[npt.NDArray[np.bool_], FloatArray]:
    """For n players: membership of every non-empty coalition (mask 1..2^n−1) and the matrix W
    with φ = v @ W (v over those coalitions)."""
    masks = np.arange(1, 1 << n)
    member = ((masks[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
    size = member.sum(axis=1)
    fact = [math.factorial(k) for k in range(n + 1)]
    w_in = np.array([fact[s - 1] * fact[n - s] / fact[n] for s in size])
    w_out = np.array([fact[s] * fact[n - s - 1] / fact[n] if s < n else 0.0 for s in size])
    weights = np.where(member, w_in[:, None], -w_out[:, None])
    return member, weights


@dataclass
class ShapleyResult:
    """Shapley shares per distinct label set of the converting paths."""

    labels: list[str]
    # frozenset of labels -> {label: share of that set's conversions} (shares sum to 1).
    shares: dict[frozenset[str], dict[str, float]]
    conversion_rate: dict[frozenset[str], float]

    def touch_weights(self, paths: Paths) -> FloatArray:
        out = np.empty(len(paths.ids))
        for p in range(paths.n_paths):
            lo, hi = int(paths.offsets[p]), int(paths.offsets[p + 1])
            seq = [paths.labels[i] for i in paths.ids[lo:hi]]
            out[lo:hi] = self.path_weights(seq)
        return out

    def path_weights(self, seq: Sequence[str]) -> list[float]:
        key = frozenset(seq)
        share = self.shares.get(key)
        if share is None:
            share = shapley_shares(key, self.conversion_rate, len(key) + 1)
        counts = Counter(seq)
        return [share[label] / counts[label] for label in seq]

    def attribution(self, paths: Paths) -> Attribution:
        return credit_from_weights(paths, self.touch_weights(paths))


def shapley_shares(
    labels: frozenset[str], rate: Mapping[frozenset[str], float], max_labels: int
) -> dict[str, float]:
    """Shapley shares of one label set in the game v(S) = rate[S] restricted to its subsets;
    normalised to sum to 1 (equal shares when too large or when v(set) is 0)."""
    players = sorted(labels)
    n = len(players)
    if n == 0:
        return {}
    # By efficiency the Shapley values add up to v(set): a set that never converted has nothing
    # to split by, and its shares would be rounding noise.
    if n > max_labels or not rate.get(labels, 0.0) > 0:
        return dict.fromkeys(players, 1.0 / n)
    member, weights = _shapley_matrix(n)
    v = np.array([rate.get(frozenset(np.asarray(players)[m].tolist()), 0.0) for m in member])
    phi = v @ weights
    total = phi.sum()
    if not total > 0:
        return dict.fromkeys(players, 1.0 / n)
    return {p: float(x / total) for p, x in zip(players, phi, strict=True)}


def shapley(paths: Paths, settings: ModelSettings = ModelSettings()) -> ShapleyResult:
    """Fits the Shapley model (module docstring) on converting and non-converting paths."""
    conv: dict[frozenset[str], float] = {}
    total: dict[frozenset[str], float] = {}
    for p in range(paths.n_paths):
        key = frozenset(paths.path(p))
        conv[key] = conv.get(key, 0.0) + float(paths.conversions[p])
        total[key] = total.get(key, 0.0) + float(paths.conversions[p] + paths.nulls[p])
    rate = {k: conv[k] / total[k] for k in conv if total[k] > 0}
    shares = {key: shapley_shares(key, rate, settings.shapley_max_labels) for key, c in conv.items() if c > 0}
    return ShapleyResult(list(paths.labels), shares, rate)


# --------------------------------------------------------------------------------------------
# One entry point

FittedModel = MarkovResult | ShapleyResult


def fit(paths: Paths, model: Model | str, settings: ModelSettings = ModelSettings()) -> FittedModel | None:
    """Fits a data-driven model on paths (converting and not); None for rule-based models."""
    model = Model(model)
    if model is Model.MARKOV:
        return markov(paths, settings.markov_order)
    if model is Model.SHAPLEY:
        return shapley(paths, settings)
    return None


def attribute(paths: Paths, model: Model | str, settings: ModelSettings = ModelSettings()) -> Attribution:
    """Credit per label under one model (Markov: global share; others: per-conversion sums)."""
    model = Model(model)
    if model is Model.MARKOV:
        return markov(paths, settings.markov_order).attribution()
    if model is Model.SHAPLEY:
        return shapley(paths, settings).attribution(paths)
    return heuristic(paths, model, settings)


def group_sum(keys: Sequence[Hashable], amounts: npt.ArrayLike) -> dict[Hashable, float]:
    """Adds up amounts by key (a helper for reports)."""
    out: dict[Hashable, float] = {}
    for k, a in zip(keys, np.asarray(amounts, dtype=np.float64).tolist(), strict=True):
        out[k] = out.get(k, 0.0) + a
    return out
