"""Pure export logic: validating an offline conversion, choosing the clicks a match attaches, the
fbc value, and the retry schedule. No I/O here."""

from __future__ import annotations

import math
import operator
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.export import normalize
from touchpoint.export.v1 import export_service_pb2 as pb

MAX_ORDER_ID_CHARS = 128
MAX_EVENT_NAME_CHARS = 100
MAX_CLICK_ID_CHARS = 512
MAX_BATCH = 10_000
DEFAULT_EVENT_NAME = "Purchase"
# Clock skew tolerated for an event time in the future.
MAX_FUTURE = timedelta(minutes=10)
# Google keeps clicks at most 90 days: no click window is longer.
MAX_CLICK_WINDOW_DAYS = 90

GOOGLE_CLICK_KINDS = ("gclid", "gbraid", "wbraid")
EXPORTED_CLICK_KINDS = frozenset({*GOOGLE_CLICK_KINDS, "fbclid"})

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_CLICK_ID = re.compile(r"^[A-Za-z0-9_\-.~]+$")

MATCHED = "matched"
UNMATCHED = "unmatched"


@dataclass(frozen=True, slots=True)
class Violation:
    field: str
    reason: str
    description: str


@dataclass(slots=True)
class Prepared:
    """A valid conversion, ready to store and to match.

    `email`, `phone`, `external_id` are the plain values used for matching inside the intake
    transaction; they are not stored.
    """

    order_id: str
    event_name: str
    event_time: datetime
    time_zone: str
    value: float | None
    currency: str
    store_id: str
    meta_user_data: dict[str, str]
    google_user: dict[str, str]
    gclid: str
    gbraid: str
    wbraid: str
    fbclid: str
    email: str | None
    phone: str | None
    external_id: str | None
    warnings: list[Violation] = field(default_factory=list)


def _ts(msg: pb.OfflineConversion) -> datetime | None:
    if not msg.HasField("event_time"):
        return None
    t = msg.event_time
    try:
        return datetime.fromtimestamp(t.seconds + t.nanos / 1e9, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


# Every string field of OfflineConversion, in field-number order, read in one call.
_STRING_FIELDS = (
    "order_id", "event_name", "time_zone", "currency", "email", "phone", "first_name", "last_name",
    "city", "state", "zip", "country", "external_id", "store_id", "gclid", "gbraid", "wbraid", "fbclid",
    "gender", "date_of_birth",
)  # fmt: skip
_strings = operator.attrgetter(*_STRING_FIELDS)
_CLICK_FIELDS = (*GOOGLE_CLICK_KINDS, "fbclid")
# Time zone names already checked (a few per store chain).
_valid_zones: set[str] = set()


def _valid_zone(name: str) -> bool:
    if name in _valid_zones:
        return True
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    if len(_valid_zones) < 10_000:
        _valid_zones.add(name)
    return True


def prepare(
    msg: pb.OfflineConversion, *, now: datetime, default_region: str = "US"
) -> Prepared | list[Violation]:
    """Validates and normalises one conversion: the row to store, or what is wrong with it.

    Structural fields (order id, time, value, currency, click ids) reject the conversion; a
    customer field that cannot be normalised (an unreadable phone) is dropped with a warning,
    because the purchase itself is still worth reporting.
    """
    values: tuple[str, ...] = _strings(msg)
    if "\x00" in "".join(values):
        # Postgres text cannot hold NUL: refuse it here rather than fail the batch's commit.
        return [
            Violation(name, "NUL_CHARACTER", f"{name} contains a NUL character")
            for name, v in zip(_STRING_FIELDS, values, strict=True)
            if "\x00" in v
        ]
    (
        raw_order_id, raw_event_name, raw_time_zone, raw_currency, email, phone, first_name, last_name,
        city, state, zip_, country, external_id, store_id, gclid, gbraid, wbraid, fbclid, gender,
        date_of_birth,
    ) = values  # fmt: skip
    bad: list[Violation] = []

    order_id = raw_order_id.strip()
    if not order_id:
        bad.append(Violation("order_id", "REQUIRED", "order_id is required: it makes the upload idempotent"))
    elif len(order_id) > MAX_ORDER_ID_CHARS:
        bad.append(
            Violation("order_id", "TOO_LONG", f"order_id is longer than {MAX_ORDER_ID_CHARS} characters")
        )

    event_name = raw_event_name.strip() or DEFAULT_EVENT_NAME
    if len(event_name) > MAX_EVENT_NAME_CHARS:
        bad.append(
            Violation(
                "event_name", "TOO_LONG", f"event_name is longer than {MAX_EVENT_NAME_CHARS} characters"
            )
        )

    event_time = _ts(msg)
    if event_time is None:
        bad.append(Violation("event_time", "REQUIRED", "event_time is required"))
    elif event_time > now + MAX_FUTURE:
        bad.append(Violation("event_time", "IN_FUTURE", "event_time is in the future (check the time zone)"))

    time_zone = raw_time_zone.strip()
    if time_zone and not _valid_zone(time_zone):
        bad.append(Violation("time_zone", "INVALID_TIME_ZONE", f"{time_zone!r} is not an IANA time zone"))

    value: float | None = None
    currency = raw_currency.strip().upper()
    amount = msg.value
    if not math.isfinite(amount) or amount < 0:
        bad.append(Violation("value", "INVALID_VALUE", "value must be a non-negative number"))
    elif amount > 0 or currency:
        value = float(amount)
        if not currency:
            bad.append(Violation("currency", "REQUIRED", "a value needs an ISO 4217 currency"))
    if currency and not _CURRENCY.match(currency):
        bad.append(Violation("currency", "INVALID_CURRENCY", "currency must be an ISO 4217 code like USD"))

    clicks = [gclid, gbraid, wbraid, fbclid]
    for k, raw in enumerate(clicks):
        if not raw:
            continue
        raw = clicks[k] = raw.strip()
        if raw and (len(raw) > MAX_CLICK_ID_CHARS or not _CLICK_ID.match(raw)):
            kind = _CLICK_FIELDS[k]
            bad.append(Violation(kind, "INVALID_CLICK_ID", f"{kind} has characters a click id never has"))
    if bad:
        return bad
    assert event_time is not None

    norm = normalize.normalise_values(
        email,
        phone,
        first_name,
        last_name,
        city,
        state,
        zip_,
        country,
        external_id,
        gender,
        date_of_birth,
        default_region,
    )
    return Prepared(
        order_id=order_id,
        event_name=event_name,
        event_time=event_time,
        time_zone=time_zone,
        value=value,
        currency=currency,
        store_id=store_id.strip(),
        meta_user_data=norm.meta,
        google_user=norm.google,
        gclid=clicks[0],
        gbraid=clicks[1],
        wbraid=clicks[2],
        fbclid=clicks[3],
        email=norm.email,
        phone=norm.phone,
        external_id=norm.external_id,
        warnings=[Violation(f, r, d) for f, r, d in norm.problems] if norm.problems else [],
    )


def fbc(fbclid: str, first_seen: datetime) -> str:
    """Meta's click cookie value: fb.1.<unix ms first seen>.<fbclid>."""
    return f"fb.1.{int(first_seen.timestamp() * 1000)}.{fbclid}"


@dataclass(frozen=True, slots=True)
class Click:
    """An ad click found for a profile: its id, when it was first seen, and its campaign."""

    kind: str
    value: str
    first_seen: datetime
    campaign: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ClickChoice:
    google: Click | None
    meta: Click | None

    @property
    def campaign(self) -> dict[str, Any] | None:
        """The campaign of the most recent click chosen."""
        clicks = [c for c in (self.google, self.meta) if c is not None]
        if not clicks:
            return None
        return max(clicks, key=lambda c: c.first_seen).campaign


def choose_clicks(candidates: list[Click], event_time: datetime, window: timedelta) -> ClickChoice:
    """The most recent eligible Google click (gclid, gbraid or wbraid: Google takes exactly one)
    and the most recent fbclid, both first seen within `window` before the conversion.

    A click id seen by several devices of the profile counts from the first time it was seen.
    """
    first: dict[tuple[str, str], Click] = {}
    for c in candidates:
        key = (c.kind, c.value)
        if key not in first or c.first_seen < first[key].first_seen:
            first[key] = c
    eligible = [c for c in first.values() if event_time - window <= c.first_seen <= event_time]
    google = [c for c in eligible if c.kind in GOOGLE_CLICK_KINDS]
    meta = [c for c in eligible if c.kind == "fbclid"]
    # Newest first; on a tie prefer gclid over gbraid over wbraid.
    pick_g = max(google, key=lambda c: (c.first_seen, -GOOGLE_CLICK_KINDS.index(c.kind)), default=None)
    pick_m = max(meta, key=lambda c: c.first_seen, default=None)
    return ClickChoice(pick_g, pick_m)


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with jitter for the `attempt`-th failure (1-based), never shorter than
    the platform's Retry-After: half of base·2^(attempt-1) (capped) plus a random half."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    delay = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
