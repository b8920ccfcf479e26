"""Google Ads click conversions (``customers/{c}:uploadClickConversions``, REST JSON).

At most 2,000 conversions per request with ``partialFailure`` on: Google answers every row, and
rows that fail come back in ``partialFailureError`` with their index, so each row keeps its own
result. A resend of an order id already uploaded is answered ORDER_ID_ALREADY_IN_USE: the
conversion is there, which is what we wanted, so it counts as delivered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

from services.export.destinations.base import (
    DELIVERED,
    BatchResult,
    Outcome,
    Outgoing,
    RowResult,
    Secrets,
    all_rows,
    excerpt,
    invalid,
    money,
    post_json,
    skip,
    transport_result,
)

MAX_CONVERSIONS = 2000
MAX_USER_IDENTIFIERS = 5
# Google keeps clicks for 90 days at most; a conversion action's window can be shorter.
MAX_CLICK_AGE = timedelta(days=90)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# Per-row error codes meaning the conversion is already recorded (a resend after a crash).
ALREADY_THERE = frozenset(
    {"ORDER_ID_ALREADY_IN_USE", "DUPLICATE_ORDER_ID", "CLICK_CONVERSION_ALREADY_EXISTS"}
)
# Per-row error codes worth trying again later (the click is not yet known to Google).
TRANSIENT = frozenset(
    {"TOO_RECENT_EVENT", "TOO_RECENT_CONVERSION_ACTION", "INTERNAL_ERROR", "TRANSIENT_ERROR"}
)


def conversion_date_time(when: datetime, time_zone: str = "") -> str:
    """``yyyy-mm-dd hh:mm:ss+hh:mm`` in the store's zone (the offset is mandatory)."""
    local = when.astimezone(ZoneInfo(time_zone) if time_zone else UTC)
    text = local.strftime("%Y-%m-%d %H:%M:%S%z")
    return text[:-2] + ":" + text[-2:]


def click_id(conv: Outgoing) -> tuple[str, str] | None:
    """The one click id Google gets: gclid, else gbraid, else wbraid."""
    for kind in ("gclid", "gbraid", "wbraid"):
        value = getattr(conv, kind)
        if value:
            return kind, value
    return None


def check_click_window(conv: Outgoing, now: datetime, window: timedelta) -> None:
    """Google refuses clicks older than 90 days (or the action's window) and conversions that
    precede their click: refuse them here, with the reason, rather than lose them there."""
    if conv.event_time > now + timedelta(minutes=10):
        raise invalid("EVENT_IN_FUTURE", "the conversion time is in the future")
    if conv.click_time is not None:
        if conv.event_time < conv.click_time:
            raise invalid("CONVERSION_PRECEDES_EVENT", "the conversion happened before the click")
        if conv.event_time - conv.click_time > window:
            raise invalid("EXPIRED_EVENT", f"the click is more than {window.days} days before the conversion")
        if now - conv.click_time > MAX_CLICK_AGE:
            raise invalid("EXPIRED_EVENT", "the click is more than 90 days old")
    elif now - conv.event_time > MAX_CLICK_AGE:
        raise invalid("EXPIRED_EVENT", "the conversion is more than 90 days old")


class GoogleAdsClickConversions:
    kind = "google_ads"

    def __init__(
        self,
        *,
        base_url: str,
        customer_id: str,
        conversion_action_id: str,
        secrets: Secrets,
        api_version: str = "v21",
        login_customer_id: str = "",
        click_through_days: int = 90,
        max_batch: int = MAX_CONVERSIONS,
        timeout: float = 30.0,
    ) -> None:
        self.customer_id = customer_id.replace("-", "")
        self.url = f"{base_url.rstrip('/')}/{api_version}/customers/{self.customer_id}:uploadClickConversions"
        self.conversion_action = f"customers/{self.customer_id}/conversionActions/{conversion_action_id}"
        self.secrets = secrets
        self.login_customer_id = login_customer_id.replace("-", "")
        self.window = timedelta(days=min(max(click_through_days, 1), 90))
        self.max_batch = min(max_batch, MAX_CONVERSIONS)
        self.timeout = timeout

    def prepare(self, conv: Outgoing, now: datetime) -> dict[str, Any]:
        click = click_id(conv)
        if click is None:
            raise skip("NO_CLICK_ID", "no gclid, gbraid or wbraid: Google cannot tie it to an ad click")
        check_click_window(conv, now, self.window)
        out: dict[str, Any] = {
            click[0]: click[1],
            "conversionAction": self.conversion_action,
            "conversionDateTime": conversion_date_time(conv.event_time, conv.time_zone),
            "orderId": conv.order_id,
        }
        if conv.value is not None:
            if not conv.currency:
                raise invalid("CURRENCY_REQUIRED", "a value needs a currency")
            out["conversionValue"] = money(conv.value)
            out["currencyCode"] = conv.currency.upper()
        idents = []
        for key, field in (("hashed_email", "hashedEmail"), ("hashed_phone_number", "hashedPhoneNumber")):
            value = conv.google_user.get(key)
            if value:
                if not _HEX64.match(value):
                    raise invalid("USER_IDENTIFIER_NOT_HASHED", f"{key} is not a SHA-256 hex digest")
                idents.append({field: value})
        if idents:
            out["userIdentifiers"] = idents[:MAX_USER_IDENTIFIERS]
        return out

    def headers(self) -> dict[str, str]:
        out = {
            "Authorization": f"Bearer {self.secrets.get('access_token')}",
            "developer-token": self.secrets.get("developer_token"),
        }
        if self.login_customer_id:
            out["login-customer-id"] = self.login_customer_id
        return out

    async def send(self, session: aiohttp.ClientSession, rows: Sequence[dict[str, Any]]) -> BatchResult:
        n = len(rows)
        body = {"conversions": list(rows), "partialFailure": True}
        answer = await post_json(
            session, self.url, body, headers=self.headers(), request_timeout=self.timeout
        )
        fixed = transport_result(n, answer)
        if fixed is not None:
            return fixed
        doc = answer.json()
        if not (200 <= answer.status < 300) or not isinstance(doc, dict):
            error = doc.get("error", {}) if isinstance(doc, dict) else {}
            reason = (
                str(error.get("status") or f"HTTP_{answer.status}") if isinstance(error, dict) else "INVALID"
            )
            message = str(error.get("message", "")) if isinstance(error, dict) else ""
            row = RowResult(Outcome.FAILED, reason, message[:500] or f"Google Ads answered {answer.status}")
            return BatchResult(all_rows(n, row), answer.status, excerpt(answer.body))
        results = [DELIVERED] * n
        for index, code, message in partial_failures(doc):
            if not 0 <= index < n:
                continue
            if code in ALREADY_THERE:
                results[index] = RowResult(Outcome.DELIVERED, code, "already recorded by Google")
            elif code in TRANSIENT:
                results[index] = RowResult(Outcome.RETRY, code, message)
            else:
                results[index] = RowResult(Outcome.FAILED, code, message)
        return BatchResult(results, answer.status, excerpt(answer.body))


def partial_failures(doc: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(row index, error code, message) of each row error in a partialFailureError."""
    failure = doc.get("partialFailureError")
    if not isinstance(failure, dict):
        return []
    out = []
    for detail in failure.get("details") or []:
        for error in (detail or {}).get("errors") or []:
            index = -1
            for element in ((error.get("location") or {}).get("fieldPathElements")) or []:
                if element.get("fieldName") == "conversions" and "index" in element:
                    index = int(element["index"])
                    break
            codes = error.get("errorCode") or {}
            code = next(iter(codes.values()), "UNKNOWN") if isinstance(codes, dict) else "UNKNOWN"
            out.append((index, str(code), str(error.get("message", ""))[:500]))
    return out
