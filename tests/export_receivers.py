"""Local stand-ins for Meta's Conversions API, Google Ads uploadClickConversions and the Google
Data Manager API, on a real HTTP socket.

Every payload is checked strictly (field names, formats, hashing, batch sizes, time windows);
anything wrong is recorded in ``problems`` and answered the way the platform answers it. Each
platform deduplicates as the real one does (Meta by event_name + event_id, Google by order id /
transaction id) and counts effects: ``*_effects`` holds the first accepted row per key, and
``*_deliveries`` counts how often a key arrived in an accepted request (a resend shows as 2).
Faults are injected per platform: a queue of HTTP statuses to answer before recovering, and a
delay before every answer.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

HEX64 = re.compile(r"^[0-9a-f]{64}$")
FBC = re.compile(r"^fb\.1\.(\d{13})\.(\S+)$")
GOOGLE_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)([+-]\d\d:\d\d)$")
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")

META_HASHED = {"em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country", "external_id"}
META_PLAIN = {"client_ip_address", "client_user_agent", "fbc", "fbp", "madid"}
META_EVENT_KEYS = {"event_name", "event_time", "action_source", "event_id", "user_data", "custom_data"}
META_CUSTOM_KEYS = {"value", "currency", "order_id", "contents"}
GOOGLE_CONVERSION_KEYS = {
    "gclid", "gbraid", "wbraid", "conversionAction", "conversionDateTime", "conversionValue",
    "currencyCode", "orderId", "userIdentifiers", "consent",
}  # fmt: skip
DM_EVENT_KEYS = {
    "transactionId", "eventTimestamp", "eventSource", "adIdentifiers", "userData", "conversionValue",
    "currency", "consent",
}  # fmt: skip


@dataclass
class Fault:
    status: int
    retry_after: str | None = None


@dataclass
class Platform:
    """What one platform received and did."""

    name: str
    effects: dict[str, dict[str, Any]] = field(default_factory=dict)
    deliveries: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    faults_answered: int = 0
    # Seconds between applying a request's effect and answering it.
    delay: float = 0.0
    # Requests applied and not yet answered.
    in_flight: int = 0


class Receivers:
    def __init__(
        self,
        *,
        meta_token: str = "meta-token",
        google_token: str = "google-token",
        developer_token: str = "dev-token",
        dm_token: str = "dm-token",
    ) -> None:
        self.meta_token = meta_token
        self.google_token = google_token
        self.developer_token = developer_token
        self.dm_token = dm_token
        self.meta = Platform("meta")
        self.google = Platform("google_ads")
        self.dm = Platform("data_manager")
        # gclid -> click time: the clicks Google knows (for the time-window checks).
        self.google_clicks: dict[str, datetime] = {}
        # Every strict-validation failure: tests of good payloads assert this stays empty.
        self.problems: list[str] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{version}/{dataset}/events", self._meta)
        app.router.add_post("/{version}/customers/{customer}:uploadClickConversions", self._google_ads)
        app.router.add_post("/v1/events:ingest", self._data_manager)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def fail(self, platform: Platform, *statuses: int, retry_after: str | None = None) -> None:
        """Answers the next requests to `platform` with these statuses, then recovers."""
        platform.faults.extend(Fault(s, retry_after) for s in statuses)

    # --- shared ----------------------------------------------------------------------------

    def _problem(self, platform: str, text: str) -> str:
        self.problems.append(f"{platform}: {text}")
        return text

    async def _enter(self, platform: Platform) -> Fault | None:
        platform.requests += 1
        if platform.faults:
            platform.faults_answered += 1
            return platform.faults.popleft()
        return None

    @staticmethod
    async def _linger(platform: Platform) -> None:
        """Waits `delay` after the effect and before the answer: a client that dies meanwhile
        never learns that its rows arrived, and sends them again (the platform dedups them)."""
        if platform.delay:
            platform.in_flight += 1
            try:
                await asyncio.sleep(platform.delay)
            finally:
                platform.in_flight -= 1

    @staticmethod
    async def _json(request: web.Request) -> Any:
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return None

    # --- Meta --------------------------------------------------------------------------------

    @staticmethod
    def _graph_error(status: int, message: str, code: int = 100, transient: bool = False) -> web.Response:
        body = {"error": {"message": message, "type": "OAuthException", "code": code,
                          "is_transient": transient, "fbtrace_id": "AbCdEf"}}  # fmt: skip
        return web.json_response(body, status=status)

    async def _meta(self, request: web.Request) -> web.Response:
        p = self.meta
        fault = await self._enter(p)
        if fault is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            if fault.status == 429:
                return web.json_response(
                    {"error": {"message": "slow down", "code": 80004}}, status=429, headers=headers
                )
            return self._graph_error(
                fault.status, "An unexpected error has occurred.", code=2, transient=True
            )
        body = await self._json(request)
        if not isinstance(body, dict):
            return self._graph_error(400, self._problem("meta", "body is not a JSON object"))
        if body.get("access_token") != self.meta_token:
            return self._graph_error(401, "Invalid OAuth access token.", code=190)
        unknown = set(body) - {"data", "access_token", "test_event_code"}
        if unknown:
            return self._graph_error(400, self._problem("meta", f"unknown body fields {sorted(unknown)}"))
        data = body.get("data")
        if not isinstance(data, list) or not 1 <= len(data) <= 1000:
            return self._graph_error(400, self._problem("meta", "data must hold 1 to 1000 events"))
        now = datetime.now(UTC)
        # One bad event fails the whole request, as at Meta.
        for i, event in enumerate(data):
            error = self._meta_event_error(event, now)
            if error:
                return self._graph_error(400, f"data[{i}]: {error}")
        p.batch_sizes.append(len(data))
        for event in data:
            key = f"{event['event_name']}:{event['event_id']}"
            p.deliveries[key] += 1
            p.effects.setdefault(key, event)
        await self._linger(p)
        return web.json_response({"events_received": len(data), "messages": [], "fbtrace_id": "AbCdEf"})

    def _meta_event_error(self, e: Any, now: datetime) -> str | None:
        if not isinstance(e, dict):
            return self._problem("meta", "an event is not an object")
        if set(e) - META_EVENT_KEYS:
            return self._problem("meta", f"unknown event fields {sorted(set(e) - META_EVENT_KEYS)}")
        for key in ("event_name", "event_time", "action_source", "event_id", "user_data"):
            if key not in e:
                return self._problem("meta", f"{key} is missing")
        if e["action_source"] != "physical_store":
            return self._problem("meta", "action_source must be physical_store")
        if not isinstance(e["event_time"], int):
            return self._problem("meta", "event_time must be unix seconds (an integer)")
        t = datetime.fromtimestamp(e["event_time"], UTC)
        if t < now - timedelta(days=62):
            return "event_time is more than 62 days ago"  # Meta's own refusal: a row-level error
        if t > now + timedelta(minutes=10):
            return self._problem("meta", "event_time is in the future")
        if not isinstance(e["event_id"], str) or not e["event_id"]:
            return self._problem("meta", "event_id must be a non-empty string")
        ud = e["user_data"]
        if not isinstance(ud, dict) or not ud:
            return self._problem("meta", "user_data must be a non-empty object")
        for key, value in ud.items():
            if key in META_HASHED:
                if not isinstance(value, str) or not HEX64.match(value):
                    return self._problem("meta", f"user_data.{key} is not a lower-case SHA-256 hex digest")
            elif key in META_PLAIN:
                if key == "fbc" and not FBC.match(str(value)):
                    return self._problem("meta", f"user_data.fbc {value!r} is not fb.1.<ms>.<fbclid>")
            else:
                return self._problem("meta", f"unknown user_data field {key}")
        cd = e.get("custom_data", {})
        if set(cd) - META_CUSTOM_KEYS:
            return self._problem("meta", f"unknown custom_data fields {sorted(set(cd) - META_CUSTOM_KEYS)}")
        if "value" in cd:
            if not isinstance(cd["value"], int | float) or cd["value"] < 0:
                return self._problem("meta", "custom_data.value must be a non-negative number")
            if not re.match(r"^[a-zA-Z]{3}$", str(cd.get("currency", ""))):
                return self._problem("meta", "custom_data.currency must be an ISO 4217 code")
        if cd.get("order_id") != e["event_id"]:
            return self._problem("meta", "custom_data.order_id must equal event_id (the order id)")
        return None

    # --- Google Ads ----------------------------------------------------------------------------

    @staticmethod
    def _google_error(status: int, code: str, message: str) -> web.Response:
        return web.json_response(
            {"error": {"code": status, "message": message, "status": code}}, status=status
        )

    async def _google_ads(self, request: web.Request) -> web.Response:
        p = self.google
        fault = await self._enter(p)
        if fault is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            status = "RESOURCE_EXHAUSTED" if fault.status == 429 else "UNAVAILABLE"
            return web.json_response(
                {"error": {"code": fault.status, "message": "try later", "status": status}},
                status=fault.status,
                headers=headers,
            )
        if request.headers.get("Authorization") != f"Bearer {self.google_token}":
            return self._google_error(401, "UNAUTHENTICATED", "bad OAuth token")
        if request.headers.get("developer-token") != self.developer_token:
            return self._google_error(403, "PERMISSION_DENIED", "bad developer token")
        customer = request.match_info["customer"]
        if not customer.isdigit():
            return self._google_error(
                400, "INVALID_ARGUMENT", self._problem("google", "customer id not digits")
            )
        body = await self._json(request)
        if not isinstance(body, dict) or set(body) - {"conversions", "partialFailure", "validateOnly"}:
            return self._google_error(400, "INVALID_ARGUMENT", self._problem("google", "bad body fields"))
        if body.get("partialFailure") is not True:
            return self._google_error(
                400, "INVALID_ARGUMENT", self._problem("google", "partialFailure must be true")
            )
        rows = body.get("conversions")
        if not isinstance(rows, list) or not 1 <= len(rows) <= 2000:
            return self._google_error(
                400, "INVALID_ARGUMENT", self._problem("google", "conversions must hold 1 to 2000 rows")
            )
        p.batch_sizes.append(len(rows))
        now = datetime.now(UTC)
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        seen_in_request: set[str] = set()
        for i, row in enumerate(rows):
            code: str | None = self._google_row_error(row, customer, now)
            if code is None:
                order = row["orderId"]
                if order in p.effects or order in seen_in_request:
                    code = "ORDER_ID_ALREADY_IN_USE" if order in p.effects else "DUPLICATE_ORDER_ID"
            if code is not None:
                results.append({})
                errors.append({
                    "errorCode": {"conversionUploadError": code},
                    "message": code.replace("_", " ").lower(),
                    "location": {"fieldPathElements": [{"fieldName": "conversions", "index": i}]},
                })  # fmt: skip
                continue
            seen_in_request.add(row["orderId"])
            p.deliveries[row["orderId"]] += 1
            p.effects[row["orderId"]] = row
            click = {k: row[k] for k in ("gclid", "gbraid", "wbraid") if k in row}
            results.append({**click, "conversionAction": row["conversionAction"],
                            "conversionDateTime": row["conversionDateTime"]})  # fmt: skip
        answer: dict[str, Any] = {"results": results, "jobId": str(p.requests)}
        if errors:
            answer["partialFailureError"] = {
                "code": 3,
                "message": f"{len(errors)} conversions failed",
                "details": [{"@type": "type.googleapis.com/google.ads.googleads.v21.errors.GoogleAdsFailure",
                             "errors": errors}],
            }  # fmt: skip
        await self._linger(p)
        return web.json_response(answer)

    def _google_row_error(self, row: Any, customer: str, now: datetime) -> str | None:
        def bad(text: str) -> str:
            self._problem("google", text)
            return "INVALID_FORMAT"

        if not isinstance(row, dict):
            return bad("a conversion is not an object")
        if set(row) - GOOGLE_CONVERSION_KEYS:
            return bad(f"unknown conversion fields {sorted(set(row) - GOOGLE_CONVERSION_KEYS)}")
        clicks = [k for k in ("gclid", "gbraid", "wbraid") if row.get(k)]
        if len(clicks) != 1:
            return bad(f"exactly one of gclid, gbraid, wbraid is needed, got {clicks}")
        if not re.match(rf"^customers/{customer}/conversionActions/\d+$", str(row.get("conversionAction"))):
            return bad(
                f"conversionAction {row.get('conversionAction')!r} is not customers/{{c}}/conversionActions/N"
            )
        m = GOOGLE_TIME.match(str(row.get("conversionDateTime", "")))
        if not m:
            return bad(
                f"conversionDateTime {row.get('conversionDateTime')!r} is not yyyy-mm-dd hh:mm:ss+hh:mm"
            )
        when = datetime.strptime(m.group(1) + m.group(2).replace(":", ""), "%Y-%m-%d %H:%M:%S%z")
        if not isinstance(row.get("orderId"), str) or not row["orderId"]:
            return bad("orderId is required")
        if "conversionValue" in row and (
            not isinstance(row["conversionValue"], int | float) or row["conversionValue"] < 0
        ):
            return bad("conversionValue must be a non-negative number")
        if "currencyCode" in row and not re.match(r"^[A-Z]{3}$", str(row["currencyCode"])):
            return bad("currencyCode must be an upper-case ISO 4217 code")
        idents = row.get("userIdentifiers", [])
        if not isinstance(idents, list) or len(idents) > 5:
            return bad("userIdentifiers holds at most 5")
        for ident in idents:
            if not isinstance(ident, dict) or len(ident) != 1:
                return bad("each user identifier has exactly one field")
            ((key, value),) = ident.items()
            if key not in ("hashedEmail", "hashedPhoneNumber") or not HEX64.match(str(value)):
                return bad(f"user identifier {key} is not a SHA-256 hex digest")
        click_time = self.google_clicks.get(row.get("gclid", ""))
        if click_time is not None:
            if when < click_time:
                return "CONVERSION_PRECEDES_EVENT"
            if now - click_time > timedelta(days=90) or when - click_time > timedelta(days=90):
                return "EXPIRED_EVENT"
        return None

    # --- Data Manager ----------------------------------------------------------------------------

    async def _data_manager(self, request: web.Request) -> web.Response:
        p = self.dm
        fault = await self._enter(p)
        if fault is not None:
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
            return (
                self._google_error(fault.status, "UNAVAILABLE", "try later")
                if not headers
                else web.json_response(
                    {"error": {"code": fault.status, "status": "RESOURCE_EXHAUSTED"}},
                    status=fault.status,
                    headers=headers,
                )
            )
        if request.headers.get("Authorization") != f"Bearer {self.dm_token}":
            return self._google_error(401, "UNAUTHENTICATED", "bad OAuth token")
        body = await self._json(request)
        if not isinstance(body, dict) or set(body) - {
            "destinations",
            "events",
            "encoding",
            "consent",
            "validateOnly",
        }:
            return self._google_error(400, "INVALID_ARGUMENT", self._problem("dm", "bad body fields"))
        if body.get("encoding") != "HEX":
            return self._google_error(400, "INVALID_ARGUMENT", self._problem("dm", "encoding must be HEX"))
        dests = body.get("destinations")
        if not isinstance(dests, list) or not dests:
            return self._google_error(400, "INVALID_ARGUMENT", self._problem("dm", "destinations required"))
        for d in dests:
            acct = d.get("operatingAccount", {})
            if acct.get("accountType") != "GOOGLE_ADS" or not str(acct.get("accountId", "")).isdigit():
                return self._google_error(
                    400, "INVALID_ARGUMENT", self._problem("dm", "bad operatingAccount")
                )
            if not d.get("productDestinationId"):
                return self._google_error(
                    400, "INVALID_ARGUMENT", self._problem("dm", "productDestinationId required")
                )
        events = body.get("events")
        if not isinstance(events, list) or not 1 <= len(events) <= 2000:
            return self._google_error(
                400, "INVALID_ARGUMENT", self._problem("dm", "events must hold 1 to 2000")
            )
        violations = []
        for i, e in enumerate(events):
            error = self._dm_event_error(e)
            if error:
                violations.append({"field": f"events[{i}]", "description": error})
        if violations:
            return web.json_response(
                {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "invalid events",
                           "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                        "fieldViolations": violations}]}},
                status=400,
            )  # fmt: skip
        p.batch_sizes.append(len(events))
        for e in events:
            p.deliveries[e["transactionId"]] += 1
            p.effects.setdefault(e["transactionId"], e)
        await self._linger(p)
        return web.json_response({"requestId": f"req-{p.requests}"})

    def _dm_event_error(self, e: Any) -> str | None:
        if not isinstance(e, dict) or set(e) - DM_EVENT_KEYS:
            return self._problem("dm", f"unknown event fields {sorted(set(e) - DM_EVENT_KEYS)}")
        if not e.get("transactionId"):
            return self._problem("dm", "transactionId required")
        if not RFC3339_Z.match(str(e.get("eventTimestamp", ""))):
            return self._problem("dm", "eventTimestamp must be RFC 3339 UTC")
        if e.get("eventSource") not in ("WEB", "APP", "IN_STORE", "PHONE", "OTHER"):
            return self._problem("dm", "bad eventSource")
        ad = e.get("adIdentifiers", {})
        if len([k for k in ("gclid", "gbraid", "wbraid") if ad.get(k)]) > 1:
            return self._problem("dm", "at most one click id")
        idents = (e.get("userData") or {}).get("userIdentifiers", [])
        if len(idents) > 10:
            return self._problem("dm", "at most 10 user identifiers")
        for ident in idents:
            ((key, value),) = ident.items()
            if key not in ("emailAddress", "phoneNumber") or not HEX64.match(str(value)):
                return self._problem("dm", f"user identifier {key} is not a SHA-256 hex digest")
        if "currency" in e and not re.match(r"^[A-Z]{3}$", str(e["currency"])):
            return self._problem("dm", "currency must be upper-case ISO 4217")
        return None


# --- a stand-in for identity's published view ----------------------------------------------------

IDENTITY_STAND_IN = """
create schema if not exists identity;
create view identity.profile_identifiers as
with linked as (
    select space_id, user_id, anonymous_id,
           lower(trim(coalesce(traits->>'email', context->'traits'->>'email'))) as email,
           coalesce(traits->>'phone', context->'traits'->>'phone') as phone
    from ingest.event_log where user_id is not null
)
select space_id, 'user_id' as kind, user_id as value, 'p_' || user_id as profile_id from linked
union select space_id, 'anonymous_id', anonymous_id, 'p_' || user_id from linked where anonymous_id is not null
union select space_id, 'email', email, 'p_' || user_id from linked where email is not null
union select space_id, 'phone', phone, 'p_' || user_id from linked where phone is not null
"""


async def ensure_identity_view(pool: Any) -> bool:
    """Creates a stand-in for ``identity.profile_identifiers`` (one profile per user_id, with the
    anonymous ids, emails and phones seen with it) unless identity's own view is there.
    Returns True when the stand-in was created."""
    if await pool.fetchval("select to_regclass('identity.profile_identifiers') is not null"):
        return False
    await pool.execute(IDENTITY_STAND_IN)
    return True
