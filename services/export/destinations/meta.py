"""Meta Conversions API, store events (action_source physical_store).

``POST {base}/{api_version}/{dataset_id}/events`` with ``data=[...]`` (at most 1,000 events). Meta
fails a whole request for one bad event, so every event is validated in ``prepare`` and, should
Meta still refuse a batch for good, the batch is split in halves until the bad event stands alone:
the others are delivered, the bad one is dead-lettered with Meta's message.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import aiohttp

from services.export.destinations.base import (
    DELIVERED,
    BatchResult,
    HttpAnswer,
    Outcome,
    Outgoing,
    RowResult,
    Secrets,
    all_rows,
    excerpt,
    invalid,
    money,
    parse_retry_after,
    post_json,
    skip,
    transport_result,
)
from services.export.normalize import META_HASHED

MAX_EVENTS = 1000
# physical_store events are accepted up to 62 days after they happened.
MAX_AGE = timedelta(days=62)
# Clock skew tolerated for an event time in the future.
MAX_FUTURE = timedelta(minutes=10)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX64_RUN = re.compile(r"[0-9a-f]{64}(?:,[0-9a-f]{64})*")
_HASHED_KEYS = frozenset(META_HASHED)
_FBC = re.compile(r"^fb\.1\.\d{13}\.\S+$")
# Keys that let Meta match a person (at least one is needed).
_MATCH_KEYS = frozenset({"em", "ph", "external_id", "fbc", "fbp", "madid", "fn", "ln"})
# Graph error codes that mean "slow down" even when is_transient is absent.
_THROTTLE_CODES = frozenset({4, 17, 32, 613, 80004})


class MetaCapi:
    kind = "meta_capi"

    def __init__(
        self,
        *,
        base_url: str,
        dataset_id: str,
        api_version: str,
        secrets: Secrets,
        test_event_code: str = "",
        max_batch: int = MAX_EVENTS,
        timeout: float = 30.0,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/{api_version}/{dataset_id}/events"
        self.secrets = secrets
        self.test_event_code = test_event_code
        self.max_batch = min(max_batch, MAX_EVENTS)
        self.timeout = timeout

    def prepare(self, conv: Outgoing, now: datetime) -> dict[str, Any]:
        if not conv.event_name:
            raise invalid("EVENT_NAME_REQUIRED", "Meta needs an event_name")
        if conv.event_time < now - MAX_AGE:
            raise invalid("EVENT_TOO_OLD", "Meta takes physical_store events up to 62 days old")
        if conv.event_time > now + MAX_FUTURE:
            raise invalid("EVENT_IN_FUTURE", "the event time is in the future")
        hashed = conv.meta_user_data
        # One pass over every value (the common case: all good); the culprit is looked for after.
        # n runs of 64 hex digits joined by n - 1 commas: no value holds a comma, each is a digest.
        joined = ",".join(hashed.values())
        if not (
            _HASHED_KEYS.issuperset(hashed)
            and len(joined) == 65 * len(hashed) - 1
            and _HEX64_RUN.fullmatch(joined)
        ):
            for key, value in hashed.items():
                if key not in _HASHED_KEYS or not _HEX64.match(value):
                    raise invalid("USER_DATA_NOT_HASHED", f"user_data.{key} is not a SHA-256 hex digest")
        user_data = dict(hashed)
        if conv.fbc:
            if not _FBC.match(conv.fbc):
                raise invalid("INVALID_FBC", "fbc must be fb.1.<unix ms>.<fbclid>")
            user_data["fbc"] = conv.fbc
        if not _MATCH_KEYS.intersection(user_data):
            raise skip("NO_USER_DATA", "no email, phone, name, external id or fbc to match the buyer with")
        custom: dict[str, Any] = {"order_id": conv.order_id}
        if conv.value is not None:
            if not conv.currency:
                raise invalid("CURRENCY_REQUIRED", "a value needs a currency")
            custom["value"] = money(conv.value)
            custom["currency"] = conv.currency.lower()
        return {
            "event_name": conv.event_name,
            "event_time": int(conv.event_time.timestamp()),
            "action_source": "physical_store",
            "event_id": conv.order_id,
            "user_data": user_data,
            "custom_data": custom,
        }

    async def send(self, session: aiohttp.ClientSession, rows: Sequence[dict[str, Any]]) -> BatchResult:
        return await self._send(session, list(rows), depth=0)

    async def _send(
        self, session: aiohttp.ClientSession, rows: list[dict[str, Any]], depth: int
    ) -> BatchResult:
        body: dict[str, Any] = {"data": rows, "access_token": self.secrets.get("access_token")}
        if self.test_event_code:
            body["test_event_code"] = self.test_event_code
        answer = await post_json(session, self.url, body, request_timeout=self.timeout)
        result = self._classify(len(rows), answer)
        if (
            len(rows) > 1
            and result.http_status == 400
            and all(r.outcome is Outcome.FAILED for r in result.rows)
            and depth < 12
        ):
            # One bad event fails Meta's whole request: split until it stands alone.
            half = len(rows) // 2
            left = await self._send(session, rows[:half], depth + 1)
            right = await self._send(session, rows[half:], depth + 1)
            return BatchResult(
                left.rows + right.rows,
                right.http_status or left.http_status,
                right.response or left.response,
                max(left.retry_after or 0, right.retry_after or 0) or None,
                1 + left.requests + right.requests,
            )
        return result

    def _classify(self, n: int, answer: HttpAnswer) -> BatchResult:
        doc = answer.json()
        error = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(error, dict) and not answer.error:
            code = error.get("code")
            message = str(error.get("error_user_msg") or error.get("message") or "")[:500]
            if error.get("is_transient") or code in _THROTTLE_CODES:
                reason = "RATE_LIMITED" if code in _THROTTLE_CODES else "TRANSIENT"
                row = RowResult(Outcome.RETRY, reason, message)
                wait = parse_retry_after(answer.headers.get("Retry-After"))
                return BatchResult(all_rows(n, row), answer.status, excerpt(answer.body), wait)
        fixed = transport_result(n, answer)
        if fixed is not None:
            return fixed
        if 200 <= answer.status < 300:
            received = doc.get("events_received") if isinstance(doc, dict) else None
            if received is not None and received != n:
                row = RowResult(Outcome.RETRY, "PARTIALLY_RECEIVED", f"Meta received {received} of {n}")
                return BatchResult(all_rows(n, row), answer.status, excerpt(answer.body))
            return BatchResult(all_rows(n, DELIVERED), answer.status, excerpt(answer.body))
        reason = "INVALID_EVENT"
        message = f"Meta answered {answer.status}"
        if isinstance(error, dict):
            reason = f"GRAPH_{error.get('code', 'ERROR')}" + (
                f"_{error['error_subcode']}" if error.get("error_subcode") else ""
            )
            message = str(error.get("error_user_msg") or error.get("message") or message)[:500]
        return BatchResult(
            all_rows(n, RowResult(Outcome.FAILED, reason, message)), answer.status, excerpt(answer.body)
        )
