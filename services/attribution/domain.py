"""Pure attribution logic around the models: touches and conversions from events, the channel
grouping, the space settings, and assembling conversion paths into report rows. No I/O."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from services.attribution import models as m
from services.ingest.domain import CAMPAIGN_FIELDS, CLICK_ID_NETWORKS, parse_campaign
from touchpoint.platform.eventlog import LogEvent

NONE = "(none)"
DIMENSIONS = ("campaign", "source", "medium", "content", "term", "channel")
DEFAULT_CONVERSION_EVENTS = ("Order Completed", "Signed Up")

# Second-party engagement events that are touches, with the touch kind and the default medium.
ENGAGEMENT_EVENTS = {
    "Email Opened": ("email", "email"),
    "Email Link Clicked": ("email", "email"),
    "Push Notification Opened": ("push", "push"),
    "Deep Link Clicked": ("deep_link", ""),
}
VALUE_KEYS = ("revenue", "value", "total")
OFFLINE_CHANNELS = frozenset({"offline", "store", "pos", "in_store", "in-store"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# ------------------------------------------------------------------------------------------
# The default channel grouping

PAID_NETWORK_CHANNEL = {
    "google": "paid search",
    "microsoft": "paid search",
    "doubleclick": "display",
    "meta": "paid social",
    "tiktok": "paid social",
    "linkedin": "paid social",
    "x": "paid social",
}
SEARCH_DOMAINS = (
    "google.",
    "bing.com",
    "duckduckgo.com",
    "yahoo.",
    "baidu.com",
    "yandex.",
    "ecosia.org",
    "search.brave.com",
    "naver.com",
)
SOCIAL_DOMAINS = (
    "facebook.com",
    "fb.com",
    "instagram.com",
    "t.co",
    "twitter.com",
    "x.com",
    "linkedin.com",
    "lnkd.in",
    "reddit.com",
    "pinterest.com",
    "youtube.com",
    "tiktok.com",
    "threads.net",
    "snapchat.com",
    "whatsapp.com",
    "bsky.app",
    "mastodon.social",
)
SOCIAL_SOURCES = frozenset(
    {"facebook", "fb", "instagram", "ig", "meta", "twitter", "x", "linkedin", "tiktok", "reddit",
     "pinterest", "youtube", "snapchat", "threads"}
)  # fmt: skip
_MEDIUM_CHANNEL = [
    ({"cpc", "ppc", "paidsearch", "paid-search", "paid_search", "sem", "search-ads"}, "paid search"),
    ({"paid-social", "paidsocial", "paid_social", "social-paid", "social_paid"}, "paid social"),
    ({"display", "paid-display", "paid_display", "banner", "cpm", "expandable", "interstitial"}, "display"),
    ({"email", "e-mail", "e_mail", "newsletter", "mail"}, "email"),
    ({"push", "mobile-notification", "notification", "sms"}, "push"),
    ({"affiliate", "affiliates", "partner", "partners"}, "affiliate"),
    ({"organic-social", "organic_social", "social", "social-network", "social-media"}, "organic social"),
    ({"organic", "organic-search", "seo"}, "organic search"),
    ({"referral", "news", "blog", "pr", "press", "earned", "link"}, "referral"),
    ({"video", "paid-video", "ctv"}, "video"),
]  # fmt: skip


@dataclass(frozen=True)
class ChannelRule:
    """A configured rule: a touch matching every non-empty condition gets `channel`."""

    channel: str
    medium_in: tuple[str, ...] = ()
    source_in: tuple[str, ...] = ()
    campaign_contains: str = ""
    kind_in: tuple[str, ...] = ()
    referrer_domain_in: tuple[str, ...] = ()

    def matches(self, t: TouchFacts) -> bool:
        if self.medium_in and (t.medium or "").lower() not in {x.lower() for x in self.medium_in}:
            return False
        if self.source_in and (t.source or "").lower() not in {x.lower() for x in self.source_in}:
            return False
        if self.campaign_contains and self.campaign_contains.lower() not in (t.campaign or "").lower():
            return False
        if self.kind_in and t.kind not in self.kind_in:
            return False
        if self.referrer_domain_in:
            d = (t.referrer_domain or "").lower()
            if not any(d == x.lower() or d.endswith("." + x.lower()) for x in self.referrer_domain_in):
                return False
        return True

    def as_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "medium_in": list(self.medium_in),
            "source_in": list(self.source_in),
            "campaign_contains": self.campaign_contains,
            "kind_in": list(self.kind_in),
            "referrer_domain_in": list(self.referrer_domain_in),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChannelRule:
        return cls(
            channel=str(d["channel"]),
            medium_in=tuple(d.get("medium_in") or ()),
            source_in=tuple(d.get("source_in") or ()),
            campaign_contains=str(d.get("campaign_contains") or ""),
            kind_in=tuple(d.get("kind_in") or ()),
            referrer_domain_in=tuple(d.get("referrer_domain_in") or ()),
        )


def _domain_in(domain: str, patterns: Sequence[str]) -> bool:
    for p in patterns:
        if p.endswith("."):  # a name under any top-level domain (google.com, google.co.uk)
            if domain.startswith(p) or ("." + p) in domain:
                return True
        elif domain == p or domain.endswith("." + p):
            return True
    return False


def classify_referrer(domain: str) -> str:
    """organic search, organic social or referral, from the referrer's domain."""
    d = domain.lower()
    if _domain_in(d, SEARCH_DOMAINS):
        return "organic search"
    if _domain_in(d, SOCIAL_DOMAINS):
        return "organic social"
    return "referral"


def default_channel(t: TouchFacts) -> str:
    """The default channel grouping (after configured rules)."""
    if t.kind == "direct":
        return "direct"
    if t.kind == "referrer":
        return classify_referrer(t.referrer_domain or "")
    medium = (t.medium or "").strip().lower()
    source = (t.source or "").strip().lower()
    if medium:
        for media, channel in _MEDIUM_CHANNEL:
            if medium in media:
                if channel == "display" and source in SOCIAL_SOURCES and medium == "cpm":
                    return "paid social"
                return channel
        if "paid" in medium or "cpc" in medium or "ppc" in medium:
            return "paid social" if source in SOCIAL_SOURCES else "paid other"
        if "social" in medium:
            return "organic social"
        if "email" in medium or "mail" in medium:
            return "email"
    if t.network:
        return PAID_NETWORK_CHANNEL.get(t.network, "paid other")
    if t.kind == "email":
        return "email"
    if t.kind == "push":
        return "push"
    if source in SOCIAL_SOURCES:
        return "organic social"
    if t.referrer_domain:
        return classify_referrer(t.referrer_domain)
    return "other" if (medium or source or t.campaign) else "direct"


def channel_of(t: TouchFacts, rules: Sequence[ChannelRule]) -> str:
    for rule in rules:
        if rule.matches(t):
            return rule.channel
    return default_channel(t)


# ------------------------------------------------------------------------------------------
# Touches and conversions from events


@dataclass(frozen=True, slots=True)
class TouchFacts:
    """What an event says about marketing: the fields a channel is derived from."""

    kind: str
    campaign: str | None = None
    source: str | None = None
    medium: str | None = None
    content: str | None = None
    term: str | None = None
    network: str | None = None
    referrer_domain: str | None = None


def _str(value: Any) -> str | None:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        s = str(value).strip()
        return s or None
    return None


def _host(url: Any) -> str | None:
    """The lower-case host of a URL without "www." (string operations: this runs per page view)."""
    if not isinstance(url, str):
        return None
    u = url.strip()
    i = u.find("//")
    rest = u[i + 2 :] if i >= 0 else u
    for sep in "/?#":
        j = rest.find(sep)
        if j >= 0:
            rest = rest[:j]
    host = rest.rpartition("@")[2].partition(":")[0].lower()
    if not host:
        return None
    return host[4:] if host.startswith("www.") else host


def _campaign_from_properties(props: Mapping[str, Any]) -> dict[str, str]:
    """Campaign fields of an engagement event: properties.campaign {name, source, ...}, flat
    campaign_name/campaign_source/..., utm_* keys, or the UTM parameters of properties.url."""
    out: dict[str, str] = {}
    nested = props.get("campaign")
    if isinstance(nested, Mapping):
        for key in CAMPAIGN_FIELDS:
            v = _str(nested.get(key))
            if v:
                out[key] = v
    elif _str(nested):
        out["name"] = str(_str(nested))
    for key in CAMPAIGN_FIELDS:
        for alias in (f"campaign_{key}", f"utm_{'campaign' if key == 'name' else key}"):
            v = _str(props.get(alias))
            if v and key not in out:
                out[key] = v
    url = props.get("url") or props.get("link_url") or props.get("link")
    if isinstance(url, str):
        parsed, _ = parse_campaign(url)
        for key in CAMPAIGN_FIELDS:
            if key in parsed and key not in out:
                out[key] = str(parsed[key])
    return out


def _facts(kind: str, fields: Mapping[str, str], network: str | None) -> TouchFacts:
    return TouchFacts(
        kind,
        campaign=fields.get("name"),
        source=fields.get("source"),
        medium=fields.get("medium"),
        content=fields.get("content"),
        term=fields.get("term"),
        network=network,
    )


def touch_of(ev: LogEvent) -> TouchFacts | None:
    """The touch an event is, or None (most events are not touches)."""
    props = ev.properties or {}
    camp = {k: str(v) for k, v in (ev.campaign or {}).items() if _str(v)}
    network = next(
        (c.get("network") or CLICK_ID_NETWORKS.get(c.get("kind", ""), "") for c in ev.click_ids), None
    )
    network = network or None
    if ev.type == "track" and ev.event in ENGAGEMENT_EVENTS:
        kind, default_medium = ENGAGEMENT_EVENTS[ev.event]
        fields = _campaign_from_properties(props)
        for key in CAMPAIGN_FIELDS:
            if key not in fields and key in camp:
                fields[key] = camp[key]
        if not fields.get("medium") and default_medium:
            fields["medium"] = default_medium
        return _facts(kind, fields, network)
    if any(camp.get(k) for k in ("name", "source", "medium")):
        return _facts("utm", camp, network)
    if network:
        return TouchFacts("click_id", network=network)
    if ev.type != "page":
        return None
    context = ev.context or {}
    page = context.get("page") if isinstance(context.get("page"), dict) else {}
    assert isinstance(page, dict)
    referrer = page.get("referrer") or context.get("referrer")
    if isinstance(referrer, dict):
        referrer = referrer.get("url") or referrer.get("link")
    ref_host = _host(referrer)
    page_host = _host(page.get("url"))
    if ref_host and ref_host != page_host and not (page_host and ref_host.endswith("." + page_host)):
        return TouchFacts("referrer", referrer_domain=ref_host)
    if not ref_host:
        return TouchFacts("direct")
    return None  # internal navigation


@dataclass(frozen=True, slots=True)
class ConversionFacts:
    conversion_id: str
    event: str
    value: float
    currency: str
    offline: bool


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        f = float(value)
    elif isinstance(value, str):
        try:
            f = float(value.strip().replace(",", ""))
        except ValueError:
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def conversion_of(ev: LogEvent, conversion_events: Collection[str]) -> ConversionFacts | None:
    """The conversion an event is, or None. Its id is the order id (dedup) or the message id."""
    if ev.type != "track" or ev.event not in conversion_events:
        return None
    props = ev.properties or {}
    value = 0.0
    for key in VALUE_KEYS:
        v = _number(props.get(key))
        if v is not None:
            value = v
            break
    currency = _str(props.get("currency")) or "USD"
    order_id = _str(props.get("order_id")) or _str(props.get("orderId"))
    context = ev.context or {}
    offline = (
        str(context.get("channel") or "").lower() in OFFLINE_CHANNELS
        or str(props.get("channel") or "").lower() in OFFLINE_CHANNELS
        or props.get("offline") is True
    )
    return ConversionFacts(order_id or ev.message_id, ev.event or "", value, currency.upper(), offline)


# ------------------------------------------------------------------------------------------
# Settings of a space


@dataclass(frozen=True)
class SpaceSettings:
    space_id: str
    conversion_events: tuple[str, ...] = DEFAULT_CONVERSION_EVENTS
    lookback_days: Mapping[str, float] = field(default_factory=dict)
    default_lookback_days: float = m.DEFAULT_LOOKBACK_DAYS
    channel_rules: tuple[ChannelRule, ...] = ()
    version: int = 0

    def lookback_seconds(self, event: str) -> float:
        days = self.lookback_days.get(event, self.default_lookback_days)
        return m.clamp_lookback_days(days) * m.DAY_SECONDS

    @property
    def max_lookback_seconds(self) -> float:
        days = [self.default_lookback_days, *self.lookback_days.values()]
        return max(m.clamp_lookback_days(d) for d in days) * m.DAY_SECONDS


# ------------------------------------------------------------------------------------------
# Report assembly


@dataclass(frozen=True, slots=True)
class TouchRow:
    profile: str
    time: float  # unix seconds
    dims: tuple[str, ...]  # campaign, source, medium, content, term, channel
    kind: str
    identifier: str


@dataclass(frozen=True, slots=True)
class ConversionRow:
    conversion_id: str
    event: str
    profile: str
    time: float
    value: float
    currency: str
    offline: bool


DIRECT_DIMS = (NONE, "(direct)", NONE, NONE, NONE, "direct")


@dataclass
class Assembled:
    """Conversion paths and non-converting paths, labelled by the grouping."""

    group_by: tuple[int, ...]  # indices into DIMENSIONS
    conversions: list[ConversionRow]
    # Per conversion: the touches of its lookback window (indices into touches), oldest first;
    # empty when it had none (it is then credited to a synthetic direct touch).
    paths: list[list[int]]
    touches: list[TouchRow]
    null_paths: list[list[int]]
    _labels: list[str] = field(default_factory=list, repr=False)
    _steps: dict[tuple[str, m.Transform], list[list[tuple[str, list[int]]]]] = field(
        default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        g = self.group_by
        self._labels = ["\x1f".join([t.dims[i] for i in g]) for t in self.touches]
        self._direct_label = self.label(DIRECT_DIMS)

    def label(self, dims: tuple[str, ...]) -> str:
        return "\x1f".join(dims[i] for i in self.group_by)

    def touch_label(self, i: int) -> str:
        return self._labels[i] if i >= 0 else self._direct_label

    def steps(self, which: str, transform: m.Transform) -> list[list[tuple[str, list[int]]]]:
        """The transformed steps of every conversion path ("conv") or non-converting path ("null")."""
        key = (which, transform)
        if key not in self._steps:
            paths = self.paths if which == "conv" else self.null_paths
            self._steps[key] = [_steps(self, p, transform) for p in paths]
        return self._steps[key]

    def group_dims(self, label: str) -> dict[str, str]:
        parts = label.split("\x1f")
        return {DIMENSIONS[g]: v for g, v in zip(self.group_by, parts, strict=True)}


def assemble(
    conversions: Sequence[ConversionRow],
    touches: Sequence[TouchRow],
    settings: SpaceSettings,
    group_by: Sequence[int],
    *,
    null_start: float,
    null_end: float,
) -> Assembled:
    """Each conversion's path: its profile's touches in [t − lookback(event), t]. Non-converting
    paths: per profile, the touches in [null_start, null_end] after its last conversion."""
    by_profile: dict[str, list[int]] = {}
    order = sorted(range(len(touches)), key=lambda i: (touches[i].profile, touches[i].time))
    for i in order:
        by_profile.setdefault(touches[i].profile, []).append(i)
    times = {p: [touches[i].time for i in idx] for p, idx in by_profile.items()}
    paths: list[list[int]] = []
    last_conv: dict[str, float] = {}
    for c in conversions:
        idx = by_profile.get(c.profile, [])
        t = times.get(c.profile, [])
        lo = bisect_left(t, c.time - settings.lookback_seconds(c.event))
        hi = bisect_right(t, c.time)
        paths.append(idx[lo:hi])
        last_conv[c.profile] = max(last_conv.get(c.profile, -math.inf), c.time)
    null_paths: list[list[int]] = []
    for p, idx in by_profile.items():
        t = times[p]
        lo = bisect_right(t, max(last_conv.get(p, -math.inf), null_start - 1e-9))
        hi = bisect_right(t, null_end)
        if hi > lo:
            null_paths.append(idx[lo:hi])
    return Assembled(tuple(group_by), list(conversions), paths, list(touches), null_paths)


@dataclass
class Credit:
    """Per-label credit of one model, and each conversion's per-touch shares."""

    model: m.Model
    allocation: str
    conversions: dict[str, float]
    revenue: dict[str, float]
    # Per conversion, the share of each of its touches (same order as Assembled.paths; a
    # conversion without touches has one share for its synthetic direct touch).
    shares: list[list[float]]


def _steps(a: Assembled, path: list[int], transform: m.Transform) -> list[tuple[str, list[int]]]:
    ids = path if path else [-1]
    labels = [a.touch_label(i) for i in ids]
    return [(label, [ids[j] for j in pos]) for label, pos in m.transform_path(labels, transform)]


def compute_credit(
    a: Assembled,
    model: m.Model,
    settings: m.ModelSettings,
    transform: m.Transform,
    currency: str,
) -> Credit:
    """Credit per label under one model (see models.py for the allocations)."""
    conv_steps = a.steps("conv", transform)
    values = [c.value if c.currency == currency else 0.0 for c in a.conversions]
    ages: list[list[float]] = []
    for c, steps in zip(a.conversions, conv_steps, strict=True):
        ages.append(
            [c.time - max((a.touches[i].time if i >= 0 else c.time) for i in idx) for _, idx in steps]
        )
    paths = m.Paths.from_sequences(
        [[label for label, _ in steps] for steps in conv_steps],
        [1.0] * len(conv_steps),
        values,
        None,
        ages=ages,
        aggregate=False,
    )
    paths.direct = np.array(
        [
            all(i < 0 or a.touches[i].dims[5] == "direct" for i in idx)
            for steps in conv_steps
            for _, idx in steps
        ],
        dtype=bool,
    )
    fitted = None
    if model in m.DATA_DRIVEN_MODELS:
        null_steps = a.steps("null", transform)
        fit_paths = m.Paths.from_sequences(
            [[label for label, _ in s] for s in conv_steps + null_steps],
            [1.0] * len(conv_steps) + [0.0] * len(null_steps),
            values + [0.0] * len(null_steps),
            [0.0] * len(conv_steps) + [1.0] * len(null_steps),
        )
        fitted = m.fit(fit_paths, model, settings)
    weights = m.touch_weights(paths, model, settings, fitted) if paths.n_paths else np.zeros(0)

    conv_credit: dict[str, float] = {}
    rev_credit: dict[str, float] = {}
    shares: list[list[float]] = []
    for p, (steps, value) in enumerate(zip(conv_steps, values, strict=True)):
        lo = int(paths.offsets[p])
        n_touch = max(1, len(a.paths[p]))
        per_touch = [0.0] * n_touch
        pos = {i: j for j, i in enumerate(a.paths[p] or [-1])}
        for k, (_, idx) in enumerate(steps):
            w = float(weights[lo + k])
            for i in idx:
                share = w / len(idx)
                per_touch[pos[i]] += share
                label = a.touch_label(i)
                conv_credit[label] = conv_credit.get(label, 0.0) + share
                rev_credit[label] = rev_credit.get(label, 0.0) + share * value
        shares.append(per_touch)

    allocation = "per_conversion"
    if model is m.Model.MARKOV and isinstance(fitted, m.MarkovResult) and fitted.labels:
        # Global share: the chain's states are step labels; a frequency-transformed state
        # "X(n)" belongs to label X.
        allocation = "global_share"
        total_conv = float(len(a.conversions))
        total_value = float(sum(values))
        conv_credit, rev_credit = {}, {}
        for state, s, vs in zip(fitted.labels, fitted.share, fitted.value_share, strict=True):
            label = _base_label(state, transform)
            conv_credit[label] = conv_credit.get(label, 0.0) + total_conv * float(s)
            rev_credit[label] = rev_credit.get(label, 0.0) + total_value * float(vs)
    return Credit(model, allocation, conv_credit, rev_credit, shares)


def _base_label(state: str, transform: m.Transform) -> str:
    if transform is m.Transform.FREQUENCY and state.endswith(")") and "(" in state:
        return state[: state.rindex("(")]
    return state


def touched_conversions(a: Assembled) -> dict[str, int]:
    out: dict[str, int] = {}
    for path in a.paths:
        for label in {a.touch_label(i) for i in (path or [-1])}:
            out[label] = out.get(label, 0) + 1
    return out


@dataclass(frozen=True)
class SpendRow:
    campaign: str
    source: str
    medium: str
    content: str
    amount: float


def spend_by_label(group_by: Sequence[int], spend: Sequence[SpendRow]) -> dict[str, float]:
    """Spend at each row's grain or finer: an entry goes to the row of its values when it names
    every grouped dimension (entries that name more roll up, e.g. placements into their source);
    an entry coarser than the rows is not split. Term and channel rows get no spend."""
    keyed = {"campaign": 0, "source": 1, "medium": 2, "content": 3}
    out: dict[str, float] = {}
    for s in spend:
        fields = {"campaign": s.campaign, "source": s.source, "medium": s.medium, "content": s.content}
        values: list[str] = []
        ok = True
        for g in group_by:
            name = DIMENSIONS[g]
            if name not in keyed or not fields[name]:
                ok = False
                break
            values.append(fields[name])
        if ok:
            label = "\x1f".join(values)
            out[label] = out.get(label, 0.0) + s.amount
    return out


def to_unix(t: datetime) -> float:
    return t.timestamp()


# ------------------------------------------------------------------------------------------
# Facts of narrow log rows (what the live consumer reads: store.LOG_COLUMNS)

_CACHE_LIMIT = 200_000


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


def narrow_event(
    space_id: str,
    source_id: str,
    message_id: str,
    type_: str,
    user_id: str | None,
    anonymous_id: str | None,
    event: str | None,
    campaign: str | None,
    click_ids: str | None,
    properties: str | None,
    page: str | None,
    referrer: str | None,
    channel: str | None,
) -> LogEvent:
    """A LogEvent carrying only what touch_of and conversion_of read: the JSON columns as the
    consumer selected them (text), context reduced to its page, referrer and channel keys (the
    times are not read and left at the epoch)."""
    context: dict[str, Any] = {}
    for key, text in (("page", page), ("referrer", referrer), ("channel", channel)):
        if text is not None:
            context[key] = orjson.loads(text)
    return LogEvent(
        0, 0, space_id, source_id, message_id, type_, user_id, anonymous_id, None, None, event, None,
        _EPOCH, _EPOCH, _loads(properties) or {}, {}, context, _loads(campaign) or {},
        _loads(click_ids) or [],
    )  # fmt: skip


class RowFacts:
    """touch_of and channel_of over narrow log rows, memoised on the columns they read.

    Most events are not touches and are skipped without parsing anything; a touch is a pure
    function of its campaign, click ids, (engagement) properties and (page) referrer, and its
    channel of those and the space's rules (settings.version changes with them); those repeat a
    lot (a campaign's landing URLs), so each distinct combination is derived once."""

    def __init__(self) -> None:
        self._touches: dict[tuple[Any, ...], tuple[TouchFacts, str] | None] = {}

    def touch(
        self,
        settings: SpaceSettings,
        type_: str,
        event: str | None,
        campaign: str | None,
        click_ids: str | None,
        properties: str | None,
        page: str | None,
        referrer: str | None,
    ) -> tuple[TouchFacts, str] | None:
        """(the touch, its channel) of a row, or None when it is not a touch."""
        engagement = type_ == "track" and event in ENGAGEMENT_EVENTS
        if not (engagement or campaign or click_ids or type_ == "page"):
            return None
        key = (
            settings.space_id,
            settings.version,
            type_ if type_ in ("page", "track") else "",
            event if engagement else None,
            campaign,
            click_ids,
            properties if engagement else None,
            page,
            referrer,
        )
        try:
            return self._touches[key]
        except KeyError:
            pass
        ev = narrow_event("", "", "", key[2], None, None, event, campaign, click_ids, key[6], page,
                          referrer, None)  # fmt: skip
        facts = touch_of(ev)
        found = None if facts is None else (facts, channel_of(facts, settings.channel_rules))
        if len(self._touches) >= _CACHE_LIMIT:
            self._touches.clear()
        self._touches[key] = found
        return found
