"""The gateway over real HTTP sockets, against a real ingest gRPC server and a real Postgres.

Each test uses its own source (write key), and asserts both the HTTP answer and the rows in
ingest.events: a 200 must mean stored, an error must mean nothing stored.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.app import GatewayServer, build_app, open_ingest_channel, serve
from services.gateway.segment import MAX_BATCH_MESSAGES, MAX_BODY_BYTES, MAX_MESSAGE_BYTES
from services.gateway.settings import GatewaySettings, parse_networks
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from touchpoint.platform.errors import ServiceError, resource_exhausted, unavailable
from touchpoint.platform.testing import eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
PIXEL_ROUTE = "/v1/pixel/{type}"


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def ingest(pool: asyncpg.Pool) -> AsyncIterator[IngestApp]:
    app = await start_ingest(pool, IngestSettings.for_tests())
    yield app
    await app.stop()


async def start_gateway(ingest_addr: str, **overrides: Any) -> tuple[GatewayServer, grpc.aio.Channel]:
    channel = open_ingest_channel(ingest_addr)
    settings = GatewaySettings.for_tests(ingest_addr, **overrides)
    app = build_app(pb_grpc.IngestServiceStub(channel), settings, health=health_pb2_grpc.HealthStub(channel))
    return await serve(app, settings), channel


@pytest.fixture(scope="module")
async def gateway(ingest: IngestApp) -> AsyncIterator[str]:
    """The gateway's base URL; it trusts no proxy."""
    server, channel = await start_gateway(ingest.address)
    yield server.url
    await server.stop()
    await channel.close()


@pytest.fixture(scope="module")
async def proxied_gateway(ingest: IngestApp) -> AsyncIterator[str]:
    """A gateway behind a trusted proxy on 127.0.0.1 (where the tests connect from)."""
    server, channel = await start_gateway(ingest.address, trusted_proxies=parse_networks(("127.0.0.0/8",)))
    yield server.url
    await server.stop()
    await channel.close()


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
async def source(pool: asyncpg.Pool) -> tuple[str, str]:
    """A fresh source: (write_key, source_id)."""
    key = "wk_" + secrets.token_hex(8)
    return key, await create_source(pool, write_key=key, name="gateway-test")


# -- helpers -------------------------------------------------------------------------------


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: Any = None,
    *,
    key: str | None = None,
    raw: bytes | None = None,
    gzipped: bool = False,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Any]:
    """POSTs JSON (or `raw` bytes); answers (status, JSON body, headers)."""
    data = raw if raw is not None else orjson.dumps(body)
    hdrs = {"Content-Type": content_type, **(headers or {})}
    if key is not None:
        hdrs["Authorization"] = basic(key)
    if gzipped:
        data = gzip.compress(data)
        hdrs["Content-Encoding"] = "gzip"
    async with http.post(url, data=data, headers=hdrs) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json(), resp.headers


async def stored(pool: asyncpg.Pool, source_id: str) -> list[asyncpg.Record]:
    return await pool.fetch("select * from ingest.events where source_id = $1 order by seq", source_id)


async def stored_message(pool: asyncpg.Pool, message_id: str) -> int:
    """Rows with this message id under any source (for requests whose key matches no source)."""
    return int(await pool.fetchval("select count(*) from ingest.events where message_id = $1", message_id))


def mid() -> str:
    return "m_" + secrets.token_hex(8)


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def requests_count(route: str, code: int) -> float:
    return sample("touchpoint_gateway_http_requests_total", {"route": route, "code": str(code)})


# -- the routes ----------------------------------------------------------------------------

SINGLE = [
    ("identify", "identify", {"traits": {"email": "a@example.com"}}),
    ("i", "identify", {}),
    ("track", "track", {"event": "Signed Up"}),
    ("t", "track", {"event": "Signed Up"}),
    ("page", "page", {"name": "Home"}),
    ("p", "page", {}),
    ("screen", "screen", {"name": "Feed"}),
    ("s", "screen", {}),
    ("group", "group", {"groupId": "acme"}),
    ("g", "group", {"groupId": "acme"}),
    ("alias", "alias", {"previousId": "old-id"}),
    ("a", "alias", {"previousId": "old-id"}),
]


@pytest.mark.parametrize(("route", "type_name", "extra"), SINGLE)
async def test_single_routes_store_the_event(
    http: aiohttp.ClientSession,
    gateway: str,
    pool: asyncpg.Pool,
    source: tuple[str, str],
    route: str,
    type_name: str,
    extra: dict[str, Any],
) -> None:
    key, sid = source
    before = requests_count(f"/v1/{route}", 200)
    message_id = mid()
    body = {"userId": "user-1", "messageId": message_id, "timestamp": "2024-05-01T12:00:00.250Z", **extra}
    status, answer, _ = await post(http, f"{gateway}/v1/{route}", body, key=key)
    assert (status, answer) == (200, {"success": True})
    rows = await stored(pool, sid)
    assert len(rows) == 1
    row = rows[0]
    assert (row["type"], row["message_id"], row["user_id"]) == (type_name, message_id, "user-1")
    assert row["original_timestamp"].isoformat() == "2024-05-01T12:00:00.250000+00:00"
    for field, value in extra.items():
        column = {"groupId": "group_id", "previousId": "previous_id"}.get(field, field)
        assert row[column] == value
    assert row["context"]["ip"] == "127.0.0.1"  # filled from the request
    assert requests_count(f"/v1/{route}", 200) == before + 1


async def test_write_key_in_the_body_with_text_plain(
    http: aiohttp.ClientSession, gateway: str, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    key, sid = source
    body = {"writeKey": key, "anonymousId": "anon-1", "event": "Clicked", "properties": {"n": 1}}
    status, answer, _ = await post(http, f"{gateway}/v1/t", body, content_type="text/plain;charset=UTF-8")
    assert (status, answer) == (200, {"success": True})
    rows = await stored(pool, sid)
    assert [(r["anonymous_id"], r["event"], r["properties"]) for r in rows] == [
        ("anon-1", "Clicked", {"n": 1})
    ]
    assert rows[0]["message_id"]  # assigned by ingest


@pytest.mark.parametrize("route", ["batch", "b", "import"])
async def test_gzip_batch_with_top_level_context_and_sent_at(
    http: aiohttp.ClientSession, gateway: str, pool: asyncpg.Pool, source: tuple[str, str], route: str
) -> None:
    key, sid = source
    body = {
        "batch": [
            {
                "type": "identify",
                "userId": "u1",
                "traits": {"plan": "pro"},
                "timestamp": "2024-05-01T11:59:58Z",
            },
            {
                "type": "track",
                "userId": "u1",
                "event": "Order Completed",
                "context": {"locale": "fr-FR", "ip": "198.51.100.7"},
                "integrations": {"Mixpanel": False},
                "originalTimestamp": "2024-05-01T11:59:59Z",
            },
        ],
        "context": {"library": {"name": "analytics-go", "version": "3"}, "locale": "en-US"},
        "integrations": {"All": True},
        "sentAt": "2024-05-01T12:00:00Z",
    }
    status, answer, _ = await post(http, f"{gateway}/v1/{route}", body, key=key, gzipped=True)
    assert (status, answer) == (200, {"success": True})
    # (ingest does not keep a batch's order in the log: order by the device time instead)
    rows = sorted(await stored(pool, sid), key=lambda r: r["original_timestamp"])
    assert [r["type"] for r in rows] == ["identify", "track"]
    identify, track = rows
    assert identify["traits"] == {"plan": "pro"}
    assert identify["context"] == {
        "library": {"name": "analytics-go", "version": "3"},
        "locale": "en-US",
        "ip": "127.0.0.1",
    }
    assert track["context"] == {
        "library": {"name": "analytics-go", "version": "3"},
        "locale": "fr-FR",  # the message's own value wins
        "ip": "198.51.100.7",  # sent by the client: kept
    }
    assert identify["integrations"] == {"All": True}
    assert track["integrations"] == {"All": True, "Mixpanel": False}
    for row in rows:
        assert row["sent_at"].isoformat() == "2024-05-01T12:00:00+00:00"
        # timestamp = receivedAt - (sentAt - originalTimestamp): the device clock skew removed
        skew = row["sent_at"] - row["original_timestamp"]
        assert abs((row["received_at"] - skew) - row["timestamp"]).total_seconds() < 0.001
    assert (track["sent_at"] - track["original_timestamp"]).total_seconds() == 1


# -- the pixel -----------------------------------------------------------------------------


async def get_pixel(http: aiohttp.ClientSession, url: str) -> None:
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/gif"
        assert "no-store" in resp.headers["Cache-Control"]
        body = await resp.read()
        assert body.startswith(b"GIF89a") and len(body) < 64


@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
async def test_pixel_stores_the_email_open(
    http: aiohttp.ClientSession, gateway: str, pool: asyncpg.Pool, source: tuple[str, str], encode: Any
) -> None:
    key, sid = source
    # '?' and '>' make both alphabets differ ('/' and '+' against '_' and '-').
    payload = {
        "writeKey": key,
        "userId": "reader>>1",
        "event": "Email Opened",
        "properties": {"subject": "??>"},
    }
    data = encode(orjson.dumps(payload)).decode().rstrip("=")
    before = requests_count(PIXEL_ROUTE, 200)
    await get_pixel(http, f"{gateway}/v1/pixel/track?data={data}")
    rows = await stored(pool, sid)
    assert [(r["type"], r["user_id"], r["event"], r["properties"]) for r in rows] == [
        ("track", "reader>>1", "Email Opened", {"subject": "??>"})
    ]
    assert requests_count(PIXEL_ROUTE, 200) == before + 1


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("data=%%%not-base64", 400),
        ("", 400),
        ("data=" + base64.b64encode(b"{broken json").decode(), 400),
        ("data={good}", 401),  # a well-formed payload with a bad write key
        ("data={no_user}", 400),  # ingest rejects it: no userId or anonymousId
    ],
)
async def test_pixel_errors_still_answer_the_gif_and_are_counted(
    http: aiohttp.ClientSession,
    gateway: str,
    pool: asyncpg.Pool,
    source: tuple[str, str],
    query: str,
    code: int,
) -> None:
    key, sid = source
    good = base64.b64encode(orjson.dumps({"writeKey": "wk_nope", "userId": "u", "event": "Email Opened"}))
    no_user = base64.urlsafe_b64encode(orjson.dumps({"writeKey": key, "event": "Email Opened"}))
    query = query.replace("{good}", good.decode()).replace("{no_user}", no_user.decode())
    before = requests_count(PIXEL_ROUTE, code)
    await get_pixel(http, f"{gateway}/v1/pixel/track?{query}")
    assert await stored(pool, sid) == []
    assert requests_count(PIXEL_ROUTE, code) == before + 1


async def test_pixel_unknown_type_answers_the_gif(http: aiohttp.ClientSession, gateway: str) -> None:
    before = requests_count(PIXEL_ROUTE, 400)
    await get_pixel(http, f"{gateway}/v1/pixel/launch?data=e30")
    assert requests_count(PIXEL_ROUTE, 400) == before + 1


# -- client IP -----------------------------------------------------------------------------


async def test_x_forwarded_for_only_from_trusted_proxies(
    http: aiohttp.ClientSession,
    gateway: str,
    proxied_gateway: str,
    pool: asyncpg.Pool,
    source: tuple[str, str],
) -> None:
    key, sid = source
    xff = {"X-Forwarded-For": "6.6.6.6, 203.0.113.50"}
    body = {"userId": "u", "event": "e"}
    for url in (gateway, proxied_gateway):
        status, _, _ = await post(http, f"{url}/v1/track", {**body, "messageId": mid()}, key=key, headers=xff)
        assert status == 200
    rows = await stored(pool, sid)
    # Untrusted peer: its header is ignored. Behind the trusted proxy: the hop it saw, not the
    # address the client claimed on the left.
    assert [r["context"]["ip"] for r in rows] == ["127.0.0.1", "203.0.113.50"]


# -- bad input: the JSON error, and nothing stored -----------------------------------------


def big_message(message_id: str) -> dict[str, Any]:
    return {
        "userId": "u",
        "event": "e",
        "messageId": message_id,
        "properties": {"b": "x" * MAX_MESSAGE_BYTES},
    }


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], str, str]] = [
    # (id, route, request options, code, words in the message)
    ("bad json", "track", {"raw": b'{"userId": "u", "event": '}, "invalid_json", "not valid JSON"),
    ("empty body", "track", {"raw": b""}, "invalid_json", "empty"),
    ("json array", "batch", {"raw": b"[]"}, "invalid_body", "JSON object"),
    (
        "bad gzip",
        "track",
        {"raw": b"plain text", "headers": {"Content-Encoding": "gzip"}},
        "invalid_gzip",
        "gzip",
    ),
    ("brotli", "track", {"raw": b"{}", "headers": {"Content-Encoding": "br"}}, "unsupported_encoding", "br"),
    (
        "form",
        "track",
        {"raw": b"a=1", "content_type": "application/x-www-form-urlencoded"},
        "unsupported_content_type",
        "Content-Type",
    ),
    ("oversize message", "track", {"message": big_message}, "message_too_large", str(MAX_MESSAGE_BYTES)),
    ("oversize body", "batch", {"oversize_body": True}, "body_too_large", str(MAX_BODY_BYTES)),
    ("gzip bomb", "batch", {"bomb": True}, "body_too_large", str(MAX_BODY_BYTES)),
    ("too many", "batch", {"too_many": True}, "too_many_messages", str(MAX_BATCH_MESSAGES)),
    ("no batch", "batch", {"body": {"context": {}}}, "invalid_body", "batch"),
    ("bad sentAt", "batch", {"batch_top": {"sentAt": "last tuesday"}}, "invalid_body", "sentAt"),
]


@pytest.mark.parametrize(
    ("route", "opts", "code", "words"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_requests_are_400_and_store_nothing(
    http: aiohttp.ClientSession,
    gateway: str,
    pool: asyncpg.Pool,
    source: tuple[str, str],
    route: str,
    opts: dict[str, Any],
    code: str,
    words: str,
) -> None:
    key, sid = source
    message_id = mid()
    good = {"type": "track", "userId": "u", "event": "e", "messageId": message_id}
    kwargs: dict[str, Any] = {
        "key": key,
        "headers": opts.get("headers"),
        "content_type": opts.get("content_type", "application/json"),
    }
    if "raw" in opts:
        kwargs["raw"] = opts["raw"]
    elif "message" in opts:
        kwargs["raw"] = orjson.dumps(opts["message"](message_id))
    elif opts.get("oversize_body"):
        # Every message under 32 KB, the whole over 500 KB.
        filler = "x" * (20 * 1024)
        messages = [
            {**good, "messageId": f"{message_id}-{i}", "properties": {"f": filler}} for i in range(26)
        ]
        kwargs["raw"] = orjson.dumps({"batch": [good, *messages]})
        assert len(kwargs["raw"]) > MAX_BODY_BYTES
    elif opts.get("bomb"):
        # 600 KB of JSON that gzips to a few KB: refused after decompressing, not stored.
        kwargs["raw"] = orjson.dumps({"batch": [good], "pad": " " * (600 * 1024)})
        kwargs["gzipped"] = True
    elif opts.get("too_many"):
        kwargs["raw"] = orjson.dumps({"batch": [good] + [{"type": "track"}] * MAX_BATCH_MESSAGES})
    elif "body" in opts:
        kwargs["raw"] = orjson.dumps(opts["body"])
    elif "batch_top" in opts:
        kwargs["raw"] = orjson.dumps({"batch": [good], **opts["batch_top"]})
    before = requests_count(f"/v1/{route}", 400)
    status, answer, _ = await post(http, f"{gateway}/v1/{route}", **kwargs)
    assert status == 400
    assert answer["code"] == code
    assert words in answer["message"]
    assert await stored(pool, sid) == []
    assert await stored_message(pool, message_id) == 0
    assert requests_count(f"/v1/{route}", 400) == before + 1


async def test_chunked_body_is_capped_while_streaming(
    http: aiohttp.ClientSession, gateway: str, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    """No Content-Length to refuse early: the cap applies while reading."""
    key, sid = source

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"batch": [{"type": "track", "userId": "u", "event": "e"}], "pad": "'
        for _ in range(60):
            yield b"x" * 10_000
        yield b'"}'

    headers = {"Authorization": basic(key), "Content-Type": "application/json"}
    async with http.post(f"{gateway}/v1/batch", data=chunks(), headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["code"] == "body_too_large"
    assert await stored(pool, sid) == []


async def test_pixel_head_records_nothing(
    http: aiohttp.ClientSession, gateway: str, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    key, sid = source
    data = base64.b64encode(orjson.dumps({"writeKey": key, "userId": "u", "event": "Email Opened"})).decode()
    async with http.head(f"{gateway}/v1/pixel/track?data={data}") as resp:
        assert resp.status == 405
    assert await stored(pool, sid) == []


@pytest.mark.parametrize(
    ("route", "body", "field", "reason"),
    [
        ("track", {"event": "e"}, "userId", "REQUIRED"),
        ("identify", {"userId": "undefined"}, "userId", "JUNK_ID"),
        ("track", {"userId": "u"}, "event", "REQUIRED"),
        ("alias", {"userId": "u"}, "previousId", "REQUIRED"),
        ("group", {"userId": "u"}, "groupId", "REQUIRED"),
        ("track", {"userId": {"id": 1}, "event": "e"}, "userId", "INVALID_TYPE"),
        ("track", {"userId": "u", "event": "e", "properties": [1, 2]}, "properties", "INVALID_TYPE"),
        ("track", {"userId": "u", "event": "e", "timestamp": "soon"}, "timestamp", "INVALID_TIMESTAMP"),
    ],
)
async def test_invalid_single_message_names_field_and_reason(
    http: aiohttp.ClientSession,
    gateway: str,
    pool: asyncpg.Pool,
    source: tuple[str, str],
    route: str,
    body: dict[str, Any],
    field: str,
    reason: str,
) -> None:
    key, sid = source
    message_id = mid()
    status, answer, _ = await post(http, f"{gateway}/v1/{route}", {**body, "messageId": message_id}, key=key)
    assert status == 400
    assert answer["code"] == "invalid_messages"
    assert (answer["accepted"], answer["duplicates"]) == (0, 0)
    assert [(e["index"], e["messageId"], e["field"], e["reason"]) for e in answer["errors"]] == [
        (0, message_id, field, reason)
    ]
    assert field in answer["message"] and reason in answer["message"]
    assert await stored(pool, sid) == []


@pytest.mark.parametrize("how", ["unknown", "disabled", "missing", "basic beats body"])
async def test_bad_write_key_is_401_and_stores_nothing(
    http: aiohttp.ClientSession, gateway: str, pool: asyncpg.Pool, source: tuple[str, str], how: str
) -> None:
    key, sid = source
    message_id = mid()
    body: dict[str, Any] = {"userId": "u", "event": "e", "messageId": message_id}
    auth: str | None = None
    expected = "invalid_write_key"
    if how == "unknown":
        auth = "wk_unknown_" + secrets.token_hex(4)
    elif how == "disabled":
        auth = "wk_off_" + secrets.token_hex(8)
        await create_source(pool, write_key=auth, name="off", enabled=False)
    elif how == "missing":
        expected = "missing_write_key"
    else:
        auth, body["writeKey"] = "wk_unknown_" + secrets.token_hex(4), key
    before = sample("touchpoint_gateway_messages_total", {"outcome": "failed"})
    status, answer, _ = await post(http, f"{gateway}/v1/track", body, key=auth)
    assert status == 401
    assert answer["code"] == expected
    assert answer["message"]
    assert await stored_message(pool, message_id) == 0
    assert await stored(pool, sid) == []
    assert sample("touchpoint_gateway_messages_total", {"outcome": "failed"}) == before + 1


async def test_bad_key_is_401_even_when_no_message_translates(
    http: aiohttp.ClientSession, gateway: str
) -> None:
    status, answer, _ = await post(http, f"{gateway}/v1/batch", {"batch": [{"type": "nope"}]}, key="wk_nope")
    assert (status, answer["code"]) == (401, "invalid_write_key")


# -- batches: partial success, duplicates --------------------------------------------------


async def test_partial_batch_stores_the_good_and_lists_the_bad(
    http: aiohttp.ClientSession, gateway: str, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    key, sid = source
    ids = [mid() for _ in range(7)]
    big = {**big_message(ids[6]), "type": "track"}
    batch = [
        {"type": "track", "userId": "u", "event": "ok-0", "messageId": ids[0]},
        {"type": "track", "userId": "u", "messageId": ids[1]},  # ingest: event REQUIRED
        {"type": "launch", "userId": "u", "messageId": ids[2]},  # gateway: unknown type
        {"type": "page", "anonymousId": "a", "name": "ok-3", "messageId": ids[3]},
        {"type": "track", "event": "e", "messageId": ids[4], "properties": "nope"},  # gateway
        {"type": "identify", "userId": "null", "messageId": ids[5]},  # ingest: junk id
        big,  # gateway: over 32 KB
    ]
    status, answer, _ = await post(http, f"{gateway}/v1/batch", {"batch": batch}, key=key)
    assert status == 400
    assert answer["code"] == "invalid_messages"
    assert (answer["accepted"], answer["duplicates"]) == (2, 0)
    assert "5 of 7 messages were not stored (2 stored)" in answer["message"]
    assert [(e["index"], e["messageId"], e["field"], e["reason"]) for e in answer["errors"]] == [
        (1, ids[1], "event", "REQUIRED"),
        (2, ids[2], "type", "INVALID_VALUE"),
        (4, ids[4], "properties", "INVALID_TYPE"),
        (5, ids[5], "userId", "JUNK_ID"),
        (6, ids[6], "message", "TOO_LARGE"),
    ]
    assert all(e["description"] for e in answer["errors"])
    rows = await stored(pool, sid)
    assert {(r["message_id"], r["event"] or r["name"]) for r in rows} == {(ids[0], "ok-0"), (ids[3], "ok-3")}


async def test_duplicate_message_id_is_stored_once(
    http: aiohttp.ClientSession, gateway: str, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    key, sid = source
    message_id = mid()
    msg = {"type": "track", "userId": "u", "event": "Paid", "messageId": message_id}
    for _ in range(2):  # a client retry after a lost answer
        assert (await post(http, f"{gateway}/v1/track", msg, key=key))[:2] == (200, {"success": True})
    # ... and twice within one batch
    status, answer, _ = await post(http, f"{gateway}/v1/batch", {"batch": [msg, msg]}, key=key)
    assert (status, answer) == (200, {"success": True})
    assert [r["message_id"] for r in await stored(pool, sid)] == [message_id]


async def test_empty_batch_with_a_good_key_is_success(
    http: aiohttp.ClientSession, gateway: str, source: tuple[str, str]
) -> None:
    key, _ = source
    assert (await post(http, f"{gateway}/v1/batch", {"batch": []}, key=key))[:2] == (200, {"success": True})
    assert (await post(http, f"{gateway}/v1/batch", {"batch": []}, key="wk_nope"))[0] == 401


# -- ingest down, shedding load, failing ---------------------------------------------------


async def test_unreachable_ingest_is_503_and_unhealthy(http: aiohttp.ClientSession) -> None:
    server, channel = await start_gateway(f"127.0.0.1:{free_port()}")
    try:
        before = requests_count("/v1/track", 503)
        status, answer, _ = await post(
            http, f"{server.url}/v1/track", {"userId": "u", "event": "e"}, key="wk"
        )
        assert status == 503
        assert answer["code"] == "unavailable"
        assert requests_count("/v1/track", 503) == before + 1
        async with http.get(f"{server.url}/health") as resp:
            assert resp.status == 503
            assert "ingest unreachable" in (await resp.json())["detail"]
    finally:
        await server.stop()
        await channel.close()


async def test_health_is_ok_when_ingest_serves(http: aiohttp.ClientSession, gateway: str) -> None:
    async with http.get(f"{gateway}/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


class StandIn(pb_grpc.IngestServiceServicer):
    """A real IngestService server that fails on purpose; the write key says how."""

    async def WriteEvents(
        self, request: pb.WriteEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.WriteEventsResponse:
        failures: dict[str, ServiceError] = {
            "shed-3": resource_exhausted("OVERLOADED", "ingest is busy", 2.2),
            "db-down": unavailable("DATABASE_UNAVAILABLE", "the database cannot be reached"),
            "internal": ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", "boom"),
        }
        if request.write_key in failures:
            await context.abort_with_status(rpc_status.to_status(failures[request.write_key].to_status()))
        if request.write_key == "shed-plain":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        if request.write_key == "slow":
            await asyncio.sleep(5)
        # "short": claims success without accounting for the events.
        return pb.WriteEventsResponse()

    async def GetEvents(
        self, request: pb.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEventsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "stand-in")
        raise AssertionError("abort raises")

    async def DeleteEvents(
        self, request: pb.DeleteEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteEventsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "stand-in")
        raise AssertionError("abort raises")

    async def SuppressIdentifiers(
        self, request: pb.SuppressIdentifiersRequest, context: grpc.aio.ServicerContext
    ) -> pb.SuppressIdentifiersResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "stand-in")
        raise AssertionError("abort raises")


@pytest.fixture(scope="module")
async def stand_in() -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_IngestServiceServicer_to_server(StandIn(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.mark.parametrize(
    ("key", "status", "code", "retry_after"),
    [
        ("shed-3", 429, "rate_limited", "3"),  # RetryInfo 2.2 s, rounded up
        ("shed-plain", 429, "rate_limited", "1"),  # no RetryInfo: 1 s
        ("db-down", 503, "unavailable", None),
        ("slow", 503, "unavailable", None),  # past the deadline
        ("internal", 500, "internal", None),
        ("short", 500, "internal", None),  # never a 200 for events ingest did not account for
    ],
)
async def test_ingest_failures_map_to_retryable_answers(
    http: aiohttp.ClientSession, stand_in: str, key: str, status: int, code: str, retry_after: str | None
) -> None:
    server, channel = await start_gateway(stand_in, ingest_timeout_seconds=0.5)
    try:
        got, answer, headers = await post(
            http,
            f"{server.url}/v1/batch",
            {"batch": [{"type": "track", "userId": "u", "event": "e"}]},
            key=key,
        )
        assert (got, answer["code"]) == (status, code)
        assert headers.get("Retry-After") == retry_after
    finally:
        await server.stop()
        await channel.close()


# -- metrics -------------------------------------------------------------------------------


async def test_metrics_are_served_with_route_templates(
    http: aiohttp.ClientSession, gateway: str, source: tuple[str, str]
) -> None:
    key, _ = source
    await post(
        http, f"{gateway}/v1/batch", {"batch": [{"type": "track", "userId": "u", "event": "e"}]}, key=key
    )
    async with http.get(f"{gateway}/v1/pixel/track?data=e30") as resp:
        assert resp.status == 200
    async with http.get(f"{gateway}/no/such/{secrets.token_hex(4)}") as resp:
        assert resp.status == 404
    async with http.get(f"{gateway}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    routes = {s.labels["route"] for s in families["touchpoint_gateway_http_requests"].samples}
    assert {"/v1/batch", PIXEL_ROUTE, "unmatched"} <= routes
    assert all(r.startswith("/") or r == "unmatched" for r in routes)
    assert not any("no/such" in r for r in routes)
    outcomes = {
        s.labels["outcome"]: s.value
        for s in families["touchpoint_gateway_messages"].samples
        if s.name.endswith("_total")
    }
    assert outcomes["accepted"] >= 1
    durations = [
        s
        for s in families["touchpoint_gateway_http_request_duration_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert any(s.labels["route"] == "/v1/batch" and s.value >= 1 for s in durations)


# -- the composition root ------------------------------------------------------------------


async def test_python_m_services_gateway_serves_and_stops_on_sigterm(
    http: aiohttp.ClientSession, ingest: IngestApp, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    key, sid = source
    env = {
        **os.environ,
        "TOUCHPOINT_GATEWAY_LISTEN": "127.0.0.1:0",
        "TOUCHPOINT_INGEST_ADDR": ingest.address,
        "TOUCHPOINT_GATEWAY_TRUSTED_PROXIES": "127.0.0.1",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.gateway", cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    try:
        port = None
        async with asyncio.timeout(20):
            while port is None:
                line = await proc.stderr.readline()
                assert line, "the gateway exited before serving"
                record = orjson.loads(line)
                if record.get("msg") == "serving":
                    port = record["port"]
        url = f"http://127.0.0.1:{port}"

        async def healthy() -> bool:
            async with http.get(f"{url}/health") as resp:
                return resp.status == 200

        await eventually(healthy, message="the gateway never became healthy")
        headers = {"X-Forwarded-For": "203.0.113.77"}
        status, answer, _ = await post(
            http, f"{url}/v1/track", {"userId": "u", "event": "e"}, key=key, headers=headers
        )
        assert (status, answer) == (200, {"success": True})
        assert [r["context"]["ip"] for r in await stored(pool, sid)] == ["203.0.113.77"]
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_batch_context_merged_past_ingest_limit_is_sent_in_parts(
    gateway: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    """A body under 500 KB whose batch-level context, merged into every message, makes the
    ingest request larger than ingest accepts: every message is still stored."""
    key, sid = source
    context = {"app": {"name": "toaster", "build": "x" * 3000}}
    batch = [{"type": "track", "event": "E", "userId": "u", "messageId": f"c{i}"} for i in range(400)]
    status, body, _ = await post(http, f"{gateway}/v1/batch", {"batch": batch, "context": context}, key=key)
    assert status == 200, body
    rows = await pool.fetch("select message_id, context from ingest.events where source_id = $1", sid)
    assert len(rows) == 400
    assert all(r["context"]["app"]["build"] == "x" * 3000 for r in rows)


async def test_answers_of_a_request_sent_in_parts_keep_the_batch_indices(
    gateway: str, http: aiohttp.ClientSession, pool: asyncpg.Pool, source: tuple[str, str]
) -> None:
    """Ingest answers only the exceptions, indexed within each part: the gateway must report
    them against the client's batch, whichever part they were in."""
    key, sid = source
    context = {"app": {"name": "toaster", "build": "x" * 3000}}
    batch: list[dict[str, Any]] = [
        {"type": "track", "event": "E", "userId": "u", "messageId": f"p{i}"} for i in range(400)
    ]
    del batch[5]["userId"]  # first part
    batch[250]["messageId"] = "p3"  # a later part repeats a message of the first
    batch[399]["userId"] = "undefined"  # last part
    status, body, _ = await post(http, f"{gateway}/v1/batch", {"batch": batch, "context": context}, key=key)
    assert status == 400, body
    assert (body["accepted"], body["duplicates"]) == (397, 1)
    assert [(e["index"], e["messageId"], e["field"], e["reason"]) for e in body["errors"]] == [
        (5, "p5", "userId", "REQUIRED"),
        (399, "p399", "userId", "JUNK_ID"),
    ]
    assert int(await pool.fetchval("select count(*) from ingest.events where source_id = $1", sid)) == 397


async def test_writer_spreads_calls_over_its_connections(ingest: IngestApp, pool: asyncpg.Pool) -> None:
    from services.gateway.app import IngestWriter

    key = "wk_" + secrets.token_hex(8)
    await create_source(pool, write_key=key, name="rr")
    channels = [open_ingest_channel(ingest.address, own_connection=True) for _ in range(3)]
    writer = IngestWriter([pb_grpc.IngestServiceStub(c) for c in channels])
    try:
        for _ in range(6):
            await writer.WriteEvents(pb.WriteEventsRequest(write_key=key))
        assert writer._next == 6
        states = [c.get_state() for c in channels]
        assert all(s == grpc.ChannelConnectivity.READY for s in states), states  # each one was used
    finally:
        for c in channels:
            await c.close()
