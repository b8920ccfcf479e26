"""Google Data Manager API ``events:ingest`` (where Google sends new adopters from 2026-06-15).

At most 2,000 events per request and 10 user identifiers per event. Errors are request-level
google.rpc errors; when their BadRequest field violations name ``events[i]``, those rows fail
and the rest of the batch is sent again at once, so one bad row never sinks the others.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

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
from services.export.destinations.google_ads import check_click_window, click_id

MAX_EVENTS = 2000
MAX_IDENTIFIERS = 10
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_EVENT_INDEX = re.compile(r"^events\[(\d+)\]")


def rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class GoogleDataManager:
    kind = "google_data_manager"

    def __init__(
        self,
        *,
        base_url: str,
        account_id: str,
        product_destination_id: str,
        secrets: Secrets,
        account_type: str = "GOOGLE_ADS",
        login_account_id: str = "",
        click_through_days: int = 90,
        max_batch: int = MAX_EVENTS,
        timeout: float = 30.0,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/v1/events:ingest"
        destination: dict[str, Any] = {
            "operatingAccount": {"accountType": account_type, "accountId": account_id.replace("-", "")},
            "productDestinationId": product_destination_id,
        }
        if login_account_id:
            destination["loginAccount"] = {
                "accountType": account_type,
                "accountId": login_account_id.replace("-", ""),
            }
        self.destinations = [destination]
        self.secrets = secrets
        self.window = timedelta(days=min(max(click_through_days, 1), 90))
        self.max_batch = min(max_batch, MAX_EVENTS)
        self.timeout = timeout

    def prepare(self, conv: Outgoing, now: datetime) -> dict[str, Any]:
        click = click_id(conv)
        idents = []
        for key, field in (("hashed_email", "emailAddress"), ("hashed_phone_number", "phoneNumber")):
            value = conv.google_user.get(key)
            if value:
                if not _HEX64.match(value):
                    raise invalid("USER_IDENTIFIER_NOT_HASHED", f"{key} is not a SHA-256 hex digest")
                idents.append({field: value})
        if click is None and not idents:
            raise skip("NO_IDENTIFIERS", "no click id, email or phone: Google cannot match it")
        check_click_window(conv, now, self.window)
        event: dict[str, Any] = {
            "transactionId": conv.order_id,
            "eventTimestamp": rfc3339(conv.event_time),
            "eventSource": "IN_STORE",
        }
        if click is not None:
            event["adIdentifiers"] = {click[0]: click[1]}
        if idents:
            event["userData"] = {"userIdentifiers": idents[:MAX_IDENTIFIERS]}
        if conv.value is not None:
            if not conv.currency:
                raise invalid("CURRENCY_REQUIRED", "a value needs a currency")
            event["conversionValue"] = money(conv.value)
            event["currency"] = conv.currency.upper()
        return event

    async def send(self, session: aiohttp.ClientSession, rows: Sequence[dict[str, Any]]) -> BatchResult:
        results: list[RowResult | None] = [None] * len(rows)
        pending = list(range(len(rows)))
        requests = 0
        last = BatchResult([])
        while pending:
            requests += 1
            last = await self._send_once(session, [rows[i] for i in pending])
            bad = {i for i, r in enumerate(last.rows) if r.outcome is Outcome.FAILED}
            isolated = last.http_status == 400 and 0 < len(bad) < len(pending)
            for j, i in enumerate(pending):
                if not isolated or j in bad:
                    results[i] = last.rows[j]
            if not isolated:
                break
            pending = [i for j, i in enumerate(pending) if j not in bad]
        out = [r if r is not None else DELIVERED for r in results]
        return BatchResult(out, last.http_status, last.response, last.retry_after, requests)

    async def _send_once(self, session: aiohttp.ClientSession, rows: list[dict[str, Any]]) -> BatchResult:
        n = len(rows)
        body = {"destinations": self.destinations, "encoding": "HEX", "events": rows}
        headers = {"Authorization": f"Bearer {self.secrets.get('access_token')}"}
        answer = await post_json(session, self.url, body, headers=headers, request_timeout=self.timeout)
        fixed = transport_result(n, answer)
        if fixed is not None:
            return fixed
        if 200 <= answer.status < 300:
            return BatchResult(all_rows(n, DELIVERED), answer.status, excerpt(answer.body))
        doc = answer.json()
        error = doc.get("error", {}) if isinstance(doc, dict) else {}
        error = error if isinstance(error, dict) else {}
        status = str(error.get("status") or f"HTTP_{answer.status}")
        message = str(error.get("message") or f"Data Manager answered {answer.status}")[:500]
        rows_bad: dict[int, str] = {}
        for detail in error.get("details") or []:
            for violation in (detail or {}).get("fieldViolations") or []:
                m = _EVENT_INDEX.match(str(violation.get("field", "")))
                if m:
                    rows_bad[int(m.group(1))] = str(violation.get("description", ""))[:500]
        if rows_bad and answer.status == 400:
            out = [
                RowResult(Outcome.FAILED, status, rows_bad[i])
                if i in rows_bad
                else RowResult(Outcome.RETRY, "", "")
                for i in range(n)
            ]
            return BatchResult(out, answer.status, excerpt(answer.body))
        return BatchResult(
            all_rows(n, RowResult(Outcome.FAILED, status, message)), answer.status, excerpt(answer.body)
        )
