"""What every destination shares: the conversion as it goes out, per-row results, secrets, and the
classification of HTTP answers into delivered / retry later / failed for good.

A destination is two steps: ``prepare`` turns one conversion into the platform's payload or
rejects it (so one bad row never reaches, and never fails, a batch), and ``send`` delivers a
batch of prepared payloads and answers one result per row.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
import orjson

# Characters of a response body kept with an attempt (enough for an error, never a whole dump).
RESPONSE_EXCERPT_CHARS = 2000


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    # Transient: send again later (429, 5xx, timeouts, errors the platform marks transient).
    RETRY = "retry"
    # Permanent: this row can never succeed as it is; it goes to the dead letters.
    FAILED = "failed"
    # Not for this destination (e.g. no click id for Google Ads click conversions): not an error.
    SKIPPED = "skipped"


@dataclass(slots=True)
class Outgoing:
    """One conversion on its way to one destination (PII already normalised and hashed).
    Treated as read-only (not frozen: a frozen dataclass costs several times more to build, and
    one is built per conversion and destination)."""

    outbox_id: int
    conversion_id: int
    order_id: str
    event_name: str
    # When the purchase happened (aware).
    event_time: datetime
    # IANA zone of the store ("" = UTC), used to render local times.
    time_zone: str
    value: float | None
    currency: str
    # Meta user_data keys (em, ph, fn, ...) to SHA-256 hex digests.
    meta_user_data: Mapping[str, str]
    # Google's hashed_email / hashed_phone_number (SHA-256 hex, Google's own normalisation).
    google_user: Mapping[str, str]
    gclid: str = ""
    gbraid: str = ""
    wbraid: str = ""
    # When the Google click happened, if it came from the event log (None: given by the store).
    click_time: datetime | None = None
    # fb.1.<unix ms first seen>.<fbclid>, or "".
    fbc: str = ""
    store_id: str = ""


@dataclass(frozen=True, slots=True)
class RowResult:
    outcome: Outcome
    # Stable reason code (e.g. "HTTP_503", "RATE_LIMITED", "EXPIRED_EVENT"); "" when delivered.
    reason: str = ""
    # A sentence or the platform's message for this row.
    detail: str = ""


DELIVERED = RowResult(Outcome.DELIVERED)


@dataclass(slots=True)
class BatchResult:
    """The answer to one request: a result per row (in the order sent) and what the platform said."""

    rows: list[RowResult]
    http_status: int = 0
    response: str = ""
    # Seconds the platform asked us to wait (Retry-After), for the whole destination.
    retry_after: float | None = None
    # How many HTTP requests it took (a batch split to isolate a bad row takes more).
    requests: int = 1


class Rejected(Exception):
    """A conversion a destination cannot take: SKIPPED (not for it) or FAILED (invalid)."""

    def __init__(self, outcome: Outcome, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.result = RowResult(outcome, reason, detail)


def skip(reason: str, detail: str) -> Rejected:
    return Rejected(Outcome.SKIPPED, reason, detail)


def invalid(reason: str, detail: str) -> Rejected:
    return Rejected(Outcome.FAILED, reason, detail)


class Secrets:
    """A destination's credentials: values from environment variables named in the config, or
    decrypted from the database. Never printed: repr and str show only the keys."""

    def __init__(self, values: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})
        self._env = dict(env or {})

    def get(self, key: str) -> str:
        if key in self._env:
            return os.environ.get(self._env[key], "")
        return self._values.get(key, "")

    def keys(self) -> list[str]:
        return sorted({*self._values, *self._env})

    def __repr__(self) -> str:
        return f"Secrets(keys={self.keys()})"

    __str__ = __repr__


class Destination(Protocol):
    """One configured place conversions go to."""

    kind: str
    # Rows per request (the platform's limit or less).
    max_batch: int

    def prepare(self, conv: Outgoing, now: datetime) -> dict[str, Any]:
        """The platform payload of one conversion; raises Rejected when it cannot be sent."""
        ...

    async def send(self, session: aiohttp.ClientSession, rows: Sequence[dict[str, Any]]) -> BatchResult:
        """Delivers prepared payloads; never raises for what the platform or the network did."""
        ...


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def excerpt(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    return text[:RESPONSE_EXCERPT_CHARS]


def all_rows(n: int, result: RowResult) -> list[RowResult]:
    return [result] * n


@dataclass(slots=True)
class HttpAnswer:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    # Set when no HTTP answer came (timeout, connection refused, reset).
    error: str = ""

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    request_timeout: float = 30.0,
) -> HttpAnswer:
    """POSTs JSON; network failures come back as an answer with `error` set, never raised."""
    try:
        async with session.post(
            url,
            data=orjson.dumps(payload),
            headers={"Content-Type": "application/json", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=request_timeout),
        ) as resp:
            body = await resp.read()
            return HttpAnswer(resp.status, body, dict(resp.headers))
    except TimeoutError:
        return HttpAnswer(0, b"", error="TIMEOUT")
    except (aiohttp.ClientError, OSError) as exc:
        return HttpAnswer(0, b"", error=f"NETWORK: {type(exc).__name__}")
    except asyncio.CancelledError:
        raise


def transport_result(n: int, answer: HttpAnswer) -> BatchResult | None:
    """The batch result when the answer alone decides every row: no answer, 429, 5xx, auth.
    None when the body has to be read per platform."""
    if answer.error:
        reason = "TIMEOUT" if answer.error == "TIMEOUT" else "NETWORK_ERROR"
        return BatchResult(all_rows(n, RowResult(Outcome.RETRY, reason, answer.error)), 0, answer.error)
    status = answer.status
    retry_after = parse_retry_after(answer.headers.get("Retry-After"))
    if status == 429:
        row = RowResult(Outcome.RETRY, "RATE_LIMITED", "the platform answered 429")
        return BatchResult(all_rows(n, row), status, excerpt(answer.body), retry_after)
    if status >= 500 or status == 408:
        row = RowResult(Outcome.RETRY, f"HTTP_{status}", "the platform answered a server error")
        return BatchResult(all_rows(n, row), status, excerpt(answer.body), retry_after)
    if status in (401, 403):
        row = RowResult(Outcome.FAILED, "UNAUTHORIZED", f"the platform refused the credentials ({status})")
        return BatchResult(all_rows(n, row), status, excerpt(answer.body))
    return None


def money(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
