"""Campaign reports over many conversions at once: the paths of every conversion and every
non-converting journey assembled from touch arrays, and each model's credit summed, in numpy.

It computes what domain.assemble + domain.compute_credit compute (the reference, kept for one
conversion's path and tested against this module): a conversion's path is its profile's touches
in [t − lookback(event), t]; a non-converting path is a profile's touches in [start, end] after
its last conversion; a conversion without touches is credited to a synthetic direct touch; path
transforms turn touches into steps whose credit their touches share equally. No I/O.

Touches arrive sorted by (profile, time), so every path is a contiguous slice of the touch
arrays and the whole report is a handful of array operations instead of Python per touch.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.attribution import models as m
from services.attribution.domain import DIMENSIONS, DIRECT_DIMS, Credit, SpaceSettings
from services.attribution.store import ReportRows

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass
class TouchArrays:
    """Touches sorted by (profile, time): profile ids (dense ints), unix seconds, label ids into
    ``labels`` and whether the touch's channel is direct."""

    profile: IntArray
    time: FloatArray
    label: IntArray
    direct: BoolArray
    labels: list[str]


@dataclass
class ConversionArrays:
    """Conversions (in report order): profile ids (same ids as the touches'; ids past the
    touches' ones have no touches), unix seconds, lookback seconds, value in the report's
    currency (0 in another currency)."""

    profile: IntArray
    time: FloatArray
    lookback: FloatArray
    value: FloatArray


def label_of(dims: Sequence[str], group_by: Sequence[int]) -> str:
    return "\x1f".join(dims[i] for i in group_by)


def group_dims(label: str, group_by: Sequence[int]) -> dict[str, str]:
    return {DIMENSIONS[g]: v for g, v in zip(group_by, label.split("\x1f"), strict=True)}


def lookback_seconds(settings: SpaceSettings, events: Sequence[str]) -> FloatArray:
    per_event = {e: settings.lookback_seconds(e) for e in set(events)}
    return np.fromiter((per_event[e] for e in events), np.float64, len(events))


@dataclass
class _Segments:
    """Paths as slices [lo, hi) of the touch arrays; an empty slice is one synthetic direct touch."""

    lo: IntArray
    hi: IntArray

    def flat(self) -> tuple[IntArray, IntArray, IntArray]:
        """(touch index of every path position, -1 for the synthetic touch; the path of every
        position; offsets of the paths)."""
        lengths = np.maximum(self.hi - self.lo, 1)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        path = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        idx = np.arange(int(offsets[-1]), dtype=np.int64) - offsets[path] + self.lo[path]
        idx[(self.hi == self.lo)[path]] = -1
        return idx, path, offsets


@dataclass
class Steps:
    """Transformed paths: per step its label id (into ``labels``), the age of its most recent
    touch, whether all its touches are direct and how many touches it stands for; per touch
    position its step."""

    labels: list[str]
    label: IntArray
    offsets: IntArray  # per path, into the steps
    age: FloatArray
    direct: BoolArray
    size: IntArray
    step_of: IntArray  # per touch position
    touch_label: IntArray  # per touch position: the base label id (into TouchArrays.labels + direct)

    @property
    def n_paths(self) -> int:
        return len(self.offsets) - 1


@dataclass
class Report:
    """Every conversion's path and every non-converting path of one report."""

    group_by: tuple[int, ...]
    touches: TouchArrays
    conversions: ConversionArrays
    conv: _Segments
    null: _Segments
    # Base labels: the touches' labels and, last, the direct label of the synthetic touch.
    labels: list[str]
    direct_label: int

    @property
    def n_conversions(self) -> int:
        return len(self.conversions.time)

    @property
    def conversions_without_touches(self) -> int:
        return int(np.count_nonzero(self.conv.hi == self.conv.lo))

    def group_dims(self, label: str) -> dict[str, str]:
        return group_dims(label, self.group_by)

    def steps(self, which: str, transform: m.Transform) -> Steps:
        seg = self.conv if which == "conv" else self.null
        idx, path, offsets = seg.flat()
        t = self.touches
        synthetic = idx < 0
        safe = np.where(synthetic, 0, idx)
        base = np.where(synthetic, self.direct_label, t.label[safe] if len(t.label) else 0)
        direct = np.where(synthetic, True, t.direct[safe] if len(t.direct) else True)
        if which == "conv":
            c_time = self.conversions.time[path]
            age = np.where(synthetic, 0.0, c_time - (t.time[safe] if len(t.time) else 0.0))
        else:
            age = np.zeros(len(idx))
        return _transform(self.labels, base, direct, age, path, offsets, transform)


def _transform(
    labels: list[str],
    base: IntArray,
    direct: BoolArray,
    age: FloatArray,
    path: IntArray,
    offsets: IntArray,
    transform: m.Transform,
) -> Steps:
    n = len(base)
    n_paths = len(offsets) - 1
    if transform is m.Transform.UNIQUE:
        ones = np.ones(n, dtype=np.int64)
        return Steps(labels, base, offsets, age, direct, ones, np.arange(n, dtype=np.int64), base)
    if transform is m.Transform.EXPOSURE:
        starts = np.ones(n, dtype=bool)
        if n:
            starts[1:] = (base[1:] != base[:-1]) | (path[1:] != path[:-1])
    else:
        # First occurrence of each (path, label).
        key = path * (len(labels) + 1) + base
        _, first = np.unique(key, return_index=True)
        starts = np.zeros(n, dtype=bool)
        starts[first] = True
    step_start = np.flatnonzero(starts)
    if transform is m.Transform.EXPOSURE:
        step_of = np.cumsum(starts) - 1
    else:
        key = path * (len(labels) + 1) + base
        order = np.argsort(key[step_start], kind="stable")
        sorted_keys = key[step_start][order]
        step_of = order[np.searchsorted(sorted_keys, key)]
    n_steps = len(step_start)
    size = np.bincount(step_of, minlength=n_steps).astype(np.int64)
    # The step's most recent touch: the smallest age; direct when all of its touches are.
    step_age = np.full(n_steps, np.inf)
    np.minimum.at(step_age, step_of, age)
    step_direct = np.ones(n_steps, dtype=bool)
    np.logical_and.at(step_direct, step_of, direct)
    step_label = base[step_start]
    step_labels = labels
    if transform is m.Transform.FREQUENCY:
        pairs: dict[tuple[int, int], int] = {}
        names: list[str] = []
        ids = np.empty(n_steps, dtype=np.int64)
        for s, (lab, count) in enumerate(zip(step_label.tolist(), size.tolist(), strict=True)):
            k = pairs.get((lab, count))
            if k is None:
                k = pairs[(lab, count)] = len(names)
                names.append(f"{labels[lab]}({count})")
            ids[s] = k
        step_label, step_labels = ids, names
    step_offsets = np.zeros(n_paths + 1, dtype=np.int64)
    np.cumsum(np.bincount(path[step_start], minlength=n_paths), out=step_offsets[1:])
    return Steps(step_labels, step_label, step_offsets, step_age, step_direct, size, step_of, base)


def assemble(
    touches: TouchArrays,
    conversions: ConversionArrays,
    group_by: Sequence[int],
    *,
    null_start: float,
    null_end: float,
) -> Report:
    """Each conversion's path and each profile's non-converting tail (module docstring)."""
    n_profiles = int(max(touches.profile.max(initial=-1), conversions.profile.max(initial=-1))) + 1
    counts = np.bincount(touches.profile, minlength=n_profiles)
    start = np.zeros(n_profiles + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    times = touches.time.tolist()
    lo = np.empty(len(conversions.time), dtype=np.int64)
    hi = np.empty(len(conversions.time), dtype=np.int64)
    starts = start.tolist()
    for k, (p, t, lb) in enumerate(
        zip(
            conversions.profile.tolist(),
            conversions.time.tolist(),
            conversions.lookback.tolist(),
            strict=True,
        )
    ):
        s, e = starts[p], starts[p + 1]
        lo[k] = bisect_left(times, t - lb, s, e)
        hi[k] = bisect_right(times, t, s, e)
    # Non-converting tails: per profile, its touches after its last conversion (and from
    # null_start) up to null_end. Times are sorted within a profile, so "how many are ≤ x" is
    # a per-profile count.
    last = np.full(n_profiles, -np.inf)
    np.maximum.at(last, conversions.profile, conversions.time)
    after = np.maximum(last, null_start - 1e-9)
    n_before = np.bincount(touches.profile[touches.time <= after[touches.profile]], minlength=n_profiles)
    n_upto = np.bincount(touches.profile[touches.time <= null_end], minlength=n_profiles)
    null_lo = start[:-1] + n_before
    null_hi = start[:-1] + n_upto
    keep = (null_hi > null_lo) & (counts > 0)
    labels = list(touches.labels)
    direct_label = label_of(DIRECT_DIMS, group_by)
    if direct_label in labels:
        direct_id = labels.index(direct_label)
    else:
        direct_id = len(labels)
        labels.append(direct_label)
    return Report(
        tuple(group_by),
        touches,
        conversions,
        _Segments(lo, hi),
        _Segments(null_lo[keep], null_hi[keep]),
        labels,
        direct_id,
    )


def _compact(steps: Steps) -> m.Paths:
    """Model paths over the labels the steps use (in first-use order, like Paths.from_sequences)."""
    used, first = np.unique(steps.label, return_index=True)
    used = used[np.argsort(first, kind="stable")]
    remap = np.full(len(steps.labels), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return m.Paths(
        [steps.labels[i] for i in used.tolist()],
        remap[steps.label],
        steps.offsets,
        np.ones(steps.n_paths),
        np.zeros(steps.n_paths),
        np.zeros(steps.n_paths),
        ages=steps.age,
        direct=steps.direct,
    )


def _fit_paths(conv: m.Paths, null: Steps | None) -> m.Paths:
    """Converting and non-converting paths together, as the data-driven models are fitted."""
    if null is None or null.n_paths == 0:
        return m.Paths(
            conv.labels, conv.ids, conv.offsets, conv.conversions, conv.values, np.zeros(conv.n_paths)
        )
    null_paths = _compact(null)
    labels = list(dict.fromkeys([*conv.labels, *null_paths.labels]))
    index = {label: i for i, label in enumerate(labels)}
    null_map = np.array([index[x] for x in null_paths.labels], dtype=np.int64)
    ids = np.concatenate([conv.ids, null_map[null_paths.ids] if len(null_map) else null_paths.ids])
    offsets = np.concatenate([conv.offsets, conv.offsets[-1] + null_paths.offsets[1:]])
    n_c, n_n = conv.n_paths, null_paths.n_paths
    return m.Paths(
        labels,
        ids,
        offsets,
        np.concatenate([np.ones(n_c), np.zeros(n_n)]),
        np.concatenate([conv.values, np.zeros(n_n)]),
        np.concatenate([np.zeros(n_c), np.ones(n_n)]),
    )


def _aggregated(paths: m.Paths) -> m.Paths:
    """Identical label sequences merged (for the fits that loop over paths in Python)."""
    seqs = [paths.path(p) for p in range(paths.n_paths)]
    return m.Paths.from_sequences(seqs, paths.conversions, paths.values, paths.nulls)


def compute_credit(
    r: Report,
    model: m.Model,
    settings: m.ModelSettings,
    transform: m.Transform,
) -> Credit:
    """Credit per label under one model, as domain.compute_credit (per-conversion shares are
    not kept: see domain for one conversion's path)."""
    steps = r.steps("conv", transform)
    values = r.conversions.value
    paths = _compact(steps)
    paths.values = values.astype(np.float64, copy=True)
    fitted = None
    if model in m.DATA_DRIVEN_MODELS:
        fit_on = _fit_paths(paths, r.steps("null", transform))
        if model is m.Model.SHAPLEY or settings.markov_order > 1:
            fit_on = _aggregated(fit_on)
        fitted = m.fit(fit_on, model, settings)
    weights = m.touch_weights(paths, model, settings, fitted) if paths.n_paths else np.zeros(0)
    # Each touch's share: its step's weight split equally among the step's touches.
    share = weights[steps.step_of] / steps.size[steps.step_of] if len(steps.step_of) else np.zeros(0)
    path_of_touch = np.repeat(np.arange(steps.n_paths), np.diff(_touch_offsets(r)))
    n_labels = len(r.labels)
    conv_by = np.bincount(steps.touch_label, share, n_labels)
    rev_by = np.bincount(steps.touch_label, share * values[path_of_touch], n_labels)
    used = np.unique(steps.touch_label)
    conv_credit = {r.labels[i]: float(conv_by[i]) for i in used.tolist()}
    rev_credit = {r.labels[i]: float(rev_by[i]) for i in used.tolist()}
    allocation = "per_conversion"
    if model is m.Model.MARKOV and isinstance(fitted, m.MarkovResult) and fitted.labels:
        allocation = "global_share"
        total_conv = float(r.n_conversions)
        total_value = float(values.sum())
        conv_credit, rev_credit = {}, {}
        for state, s, vs in zip(fitted.labels, fitted.share, fitted.value_share, strict=True):
            label = _base_label(state, transform)
            conv_credit[label] = conv_credit.get(label, 0.0) + total_conv * float(s)
            rev_credit[label] = rev_credit.get(label, 0.0) + total_value * float(vs)
    return Credit(model, allocation, conv_credit, rev_credit, [])


def _touch_offsets(r: Report) -> IntArray:
    lengths = np.maximum(r.conv.hi - r.conv.lo, 1)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _base_label(state: str, transform: m.Transform) -> str:
    if transform is m.Transform.FREQUENCY and state.endswith(")") and "(" in state:
        return state[: state.rindex("(")]
    return state


def touched_conversions(r: Report) -> dict[str, int]:
    """Per label, how many conversions have it on their path."""
    idx, path, _ = r.conv.flat()
    t = r.touches
    lab = np.where(idx < 0, r.direct_label, t.label[np.where(idx < 0, 0, idx)] if len(t.label) else 0)
    pairs = np.unique(path * (len(r.labels) + 1) + lab)
    counts = np.bincount(pairs % (len(r.labels) + 1), minlength=len(r.labels))
    return {r.labels[i]: int(c) for i, c in enumerate(counts.tolist()) if c}


def arrays(rows: ReportRows, settings: SpaceSettings, currency: str) -> tuple[TouchArrays, ConversionArrays]:
    """Dense arrays of what a report read, touches sorted by (profile, time)."""
    profiles: dict[str, int] = {}
    pid = np.fromiter(
        (profiles.setdefault(p, len(profiles)) for p in rows.touch_profiles),
        np.int64,
        len(rows.touch_profiles),
    )
    labels: dict[str, int] = {}
    lab = np.fromiter(
        (labels.setdefault(x, len(labels)) for x in rows.touch_labels), np.int64, len(rows.touch_labels)
    )
    t = np.asarray(rows.touch_times, dtype=np.float64)
    direct = np.asarray(rows.touch_direct, dtype=bool)
    order = np.lexsort((t, pid))
    touches = TouchArrays(pid[order], t[order], lab[order], direct[order], list(labels))
    conv = rows.conversions
    c_pid = np.fromiter((profiles.setdefault(r["profile"], len(profiles)) for r in conv), np.int64, len(conv))
    c_t = np.fromiter((r["t"] for r in conv), np.float64, len(conv))
    c_value = np.fromiter(
        (r["value"] if r["currency"] == currency else 0.0 for r in conv), np.float64, len(conv)
    )
    lookback = lookback_seconds(settings, [r["event"] for r in conv])
    return touches, ConversionArrays(c_pid, c_t, lookback, c_value)
