"""Real client libraries, unchanged, sending through the gateway to a real ingest and Postgres:
Segment's analytics-python (gzip, Basic auth, /v1/batch), RudderStack's Python SDK (data plane
URL = the gateway), and analytics.js's wire format (text/plain bodies with writeKey, /v1/t, /v1/b).

The Python clients block on HTTP, so they run in threads: the gateway serves on this test's
event loop.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import rudderstack.analytics as rudder_analytics
from grpc_health.v1 import health_pb2_grpc
from segment.analytics import Client as SegmentClient

from services.gateway.app import build_app, open_ingest_channel, serve
from services.gateway.settings import GatewaySettings
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
async def ingest(pool: asyncpg.Pool) -> AsyncIterator[IngestApp]:
    app = await start_ingest(pool, IngestSettings.for_tests())
    yield app
    await app.stop()


@pytest.fixture(scope="module")
async def gateway(ingest: IngestApp) -> AsyncIterator[str]:
    channel = open_ingest_channel(ingest.address)
    settings = GatewaySettings.for_tests(ingest.address)
    app = build_app(pb_grpc.IngestServiceStub(channel), settings, health=health_pb2_grpc.HealthStub(channel))
    server = await serve(app, settings)
    yield server.url
    await server.stop()
    await channel.close()


@pytest.fixture
async def source(pool: asyncpg.Pool) -> tuple[str, str]:
    key = "wk_" + secrets.token_hex(8)
    return key, await create_source(pool, write_key=key, name="client-test")


async def stored(pool: asyncpg.Pool, source_id: str) -> dict[str, asyncpg.Record]:
    """The source's rows by type (each test sends one of each)."""
    rows = await pool.fetch("select * from ingest.events where source_id = $1", source_id)
    by_type = {r["type"]: r for r in rows}
    assert len(by_type) == len(rows), [r["type"] for r in rows]
    return by_type


WHEN = datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)


def segment_calls(client: Any) -> None:
    """One call of each kind, as an application would make them."""
    client.identify("user-42", {"email": "ada@example.com", "plan": "pro"}, timestamp=WHEN)
    client.track("user-42", "Order Completed", {"revenue": 12.5, "currency": "EUR"}, message_id="order-1001")
    client.page("user-42", "Docs", "Pricing", {"url": "https://shop.example/pricing"})
    client.screen("user-42", "Onboarding", "Welcome")
    client.group("user-42", "acme", {"employees": 30})
    client.alias("anon-7", "user-42")


def check_segment_rows(rows: dict[str, asyncpg.Record]) -> None:
    assert set(rows) == {"identify", "track", "page", "screen", "group", "alias"}
    identify, track, page = rows["identify"], rows["track"], rows["page"]
    assert identify["user_id"] == "user-42"
    assert identify["traits"] == {"email": "ada@example.com", "plan": "pro"}
    assert identify["original_timestamp"] == WHEN
    assert identify["context"]["library"]["name"] == "analytics-python"
    assert identify["context"]["ip"] == "127.0.0.1"
    assert track["sent_at"] is not None
    assert (track["event"], track["message_id"]) == ("Order Completed", "order-1001")
    assert track["properties"] == {"revenue": 12.5, "currency": "EUR"}
    assert page["name"] == "Pricing"
    assert page["properties"] == {"url": "https://shop.example/pricing", "category": "Docs"}
    assert rows["screen"]["name"] == "Welcome"
    assert rows["group"]["group_id"] == "acme"
    assert rows["group"]["traits"] == {"employees": 30}
    assert (rows["alias"]["previous_id"], rows["alias"]["user_id"]) == ("anon-7", "user-42")


async def test_analytics_python_sync_mode_with_gzip(
    gateway: str, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    key, sid = source
    client = SegmentClient(key, host=gateway, gzip=True, sync_mode=True)
    # In sync mode every call posts a /v1/batch and raises APIError unless the answer is 2xx.
    await asyncio.to_thread(segment_calls, client)
    check_segment_rows(await stored(pool, sid))


async def test_analytics_python_background_batches_and_flush(
    gateway: str, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    key, sid = source
    errors: list[Any] = []
    client = SegmentClient(
        key, host=gateway, gzip=True, on_error=lambda e, batch: errors.append(e), max_retries=0
    )
    try:
        segment_calls(client)  # only queues
        await asyncio.to_thread(client.flush)
    finally:
        await asyncio.to_thread(client.shutdown)
    assert errors == []
    check_segment_rows(await stored(pool, sid))


async def test_analytics_python_sees_the_errors(
    gateway: str, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    """Its APIError carries our code and message (it reads payload["code"] and ["message"])."""
    from segment.analytics.request import APIError

    key, sid = source
    client = SegmentClient("wk_unknown_" + secrets.token_hex(4), host=gateway, gzip=True, sync_mode=True)
    with pytest.raises(APIError) as info:
        await asyncio.to_thread(client.track, "u", "e")
    assert (info.value.status, info.value.code) == (401, "invalid_write_key")
    client = SegmentClient(key, host=gateway, gzip=True, sync_mode=True)
    with pytest.raises(APIError) as info:
        await asyncio.to_thread(client.track, "undefined", "e")
    assert (info.value.status, info.value.code) == (400, "invalid_messages")
    assert "JUNK_ID" in info.value.message
    assert await stored(pool, sid) == {}


async def test_rudderstack_sdk(gateway: str, pool: asyncpg.Pool, source: tuple[str, str]) -> None:
    key, sid = source
    errors: list[Any] = []
    rudder_analytics.write_key = key
    rudder_analytics.dataPlaneUrl = gateway
    rudder_analytics.on_error = lambda e, batch: errors.append(e)
    rudder_analytics.max_retries = 0
    try:
        rudder_analytics.identify("user-7", {"email": "grace@example.com"}, anonymous_id="anon-7")
        rudder_analytics.track("user-7", "Product Viewed", {"sku": "toaster-9"})
        rudder_analytics.page("user-7", "Shop", "Toasters", {"path": "/toasters"})
        await asyncio.to_thread(rudder_analytics.flush)
    finally:
        if rudder_analytics.default_client is not None:
            await asyncio.to_thread(rudder_analytics.shutdown)
        rudder_analytics.default_client = None
    assert errors == []
    rows = await stored(pool, sid)
    assert set(rows) == {"identify", "track", "page"}
    identify = rows["identify"]
    assert (identify["user_id"], identify["anonymous_id"]) == ("user-7", "anon-7")
    # RudderStack sends identify traits in context.traits only: kept there.
    assert identify["traits"] is None
    assert identify["context"]["traits"] == {"email": "grace@example.com"}
    assert identify["integrations"] == {"All": True}
    assert rows["track"]["event"] == "Product Viewed"
    assert rows["track"]["properties"] == {"sku": "toaster-9"}
    assert rows["page"]["name"] == "Toasters"
    assert rows["page"]["properties"] == {"path": "/toasters", "category": "Shop"}
    assert all(r["context"]["ip"] == "127.0.0.1" for r in rows.values())


# -- analytics.js: the wire format of the browser library ----------------------------------

LANDING = (
    "https://shop.example/?utm_source=newsletter&utm_medium=email&utm_campaign=national-toastday&gclid=G-1"
)


def ajs_message(key: str, type_name: str, **fields: Any) -> dict[str, Any]:
    """A message as analytics.js (analytics-next) builds it."""
    return {
        "timestamp": "2024-05-01T12:00:00.123Z",
        "integrations": {},
        "type": type_name,
        "context": {
            "page": {
                "path": "/",
                "referrer": "https://www.google.com/",
                "search": LANDING.split("/", 3)[3][1:],
                "title": "Toast shop",
                "url": LANDING,
            },
            "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36",
            "locale": "en-GB",
            "library": {"name": "analytics.js", "version": "npm:next-1.70.0"},
        },
        "messageId": "ajs-next-" + secrets.token_hex(8),
        "anonymousId": "3f2c1a9e-5f8d-4c7b-9a0e-0c1d2e3f4a5b",
        "writeKey": key,
        "userId": None,
        "sentAt": "2024-05-01T12:00:00.140Z",
        "_metadata": {"bundled": ["Segment.io"], "unbundled": [], "bundledIds": []},
        **fields,
    }


async def test_analytics_js_wire_format(gateway: str, pool: asyncpg.Pool, source: tuple[str, str]) -> None:
    key, sid = source
    page = ajs_message(key, "page", name=None, category=None, properties={"path": "/", "url": LANDING})
    track = ajs_message(key, "track", event="Added to Cart", properties={"sku": "t-1"})
    identify = ajs_message(key, "identify", userId="user-99", traits={"email": "x@example.com"})
    group = ajs_message(key, "group", groupId="acme", traits={"name": "Acme"})
    screen = ajs_message(key, "screen", name="Home")
    alias = ajs_message(key, "alias", userId="user-99", previousId="3f2c1a9e-5f8d-4c7b-9a0e-0c1d2e3f4a5b")
    headers = {"Content-Type": "text/plain"}  # analytics.js avoids a CORS preflight this way
    async with aiohttp.ClientSession() as http:
        for route, msg in (("p", page), ("t", track), ("i", identify)):
            async with http.post(f"{gateway}/v1/{route}", data=orjson.dumps(msg), headers=headers) as resp:
                assert (resp.status, await resp.json()) == (200, {"success": True})
                # a browser lets the page read the answer only with this
                assert resp.headers["Access-Control-Allow-Origin"] == "*"
        # Its batching delivery strategy posts to /v1/b with the key at the top.
        body = {"batch": [group, screen, alias], "sentAt": "2024-05-01T12:00:01.000Z", "writeKey": key}
        async with http.post(f"{gateway}/v1/b", data=orjson.dumps(body), headers=headers) as resp:
            assert (resp.status, await resp.json()) == (200, {"success": True})
    rows = await stored(pool, sid)
    assert set(rows) == {"page", "track", "identify", "group", "screen", "alias"}
    page_row = rows["page"]
    assert page_row["anonymous_id"] == "3f2c1a9e-5f8d-4c7b-9a0e-0c1d2e3f4a5b"
    assert page_row["user_id"] is None
    assert page_row["context"]["userAgent"].startswith("Mozilla/5.0")
    assert page_row["context"]["ip"] == "127.0.0.1"
    # ingest's UTM and click-id parsing sees the landing URL the gateway passed through
    assert page_row["campaign"] == {"name": "national-toastday", "source": "newsletter", "medium": "email"}
    assert [c["kind"] for c in page_row["click_ids"]] == ["gclid"]
    assert rows["track"]["event"] == "Added to Cart"
    assert rows["identify"]["traits"] == {"email": "x@example.com"}
    assert rows["group"]["group_id"] == "acme"
    assert rows["screen"]["name"] == "Home"
    assert rows["alias"]["previous_id"] == "3f2c1a9e-5f8d-4c7b-9a0e-0c1d2e3f4a5b"
    # The messages' own sentAt (analytics.js sets one per message) wins over the batch's.
    assert rows["group"]["sent_at"] == datetime(2024, 5, 1, 12, 0, 0, 140000, tzinfo=UTC)
    assert rows["track"]["original_timestamp"] == datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)


async def test_cors_preflight_for_json_bodies_from_browsers(gateway: str) -> None:
    """A page posting application/json with an Authorization header makes the browser ask first."""
    headers = {
        "Origin": "https://shop.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with aiohttp.ClientSession() as http, http.options(f"{gateway}/v1/track", headers=headers) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "content-encoding"} <= allowed
