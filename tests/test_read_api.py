"""The cross-device journey of the product brief, end to end over HTTP: events through the
gateway, one profile from the identity service, credit from the attribution service, all read
back through the gateway's read API (GET /v1/profiles/..., /v1/reports/...)."""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from services.attribution.app import AttributionApp, AttributionSettings, start_attribution
from services.gateway.app import GatewayServer, build_app, open_ingest_channel, serve
from services.gateway.read_api import ReadApi
from services.gateway.settings import GatewaySettings
from services.identity.app import IdentityApp, IdentitySettings, start_identity
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.attribution.v1 import attribution_service_pb2_grpc as apb_grpc
from touchpoint.identity.v1 import identity_service_pb2_grpc as ipb_grpc
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from touchpoint.platform.testing import eventually

READ_KEY = "rk_" + secrets.token_hex(8)


@pytest.fixture(scope="module")
async def stack(pool: asyncpg.Pool) -> AsyncIterator[dict[str, Any]]:
    ingest: IngestApp = await start_ingest(pool, IngestSettings.for_tests())
    identity: IdentityApp = await start_identity(pool, IdentitySettings.for_tests(ingest_addr=ingest.address))
    attribution: AttributionApp = await start_attribution(pool, AttributionSettings.for_tests())
    ich = open_ingest_channel(ingest.address)
    idch = grpc.aio.insecure_channel(identity.address)
    ach = grpc.aio.insecure_channel(attribution.address)
    settings = GatewaySettings.for_tests(ingest.address)
    app = build_app(
        pb_grpc.IngestServiceStub(ich),
        settings,
        health=health_pb2_grpc.HealthStub(ich),
        read_api=ReadApi(READ_KEY, ipb_grpc.IdentityServiceStub(idch), apb_grpc.AttributionServiceStub(ach)),
    )
    server: GatewayServer = await serve(app, settings)
    key = "wk_" + secrets.token_hex(8)
    await create_source(pool, write_key=key, name="web")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield {"url": server.url, "key": key, "http": http, "identity": identity}
    await server.stop()
    for ch in (ich, idch, ach):
        await ch.close()
    await attribution.stop()
    await identity.stop()
    await ingest.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


async def get(stack: dict[str, Any], path: str, key: str = READ_KEY) -> tuple[int, Any]:
    async with stack["http"].get(stack["url"] + path, headers=auth(key)) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


LANDING = (
    "https://shop.example/toasters?utm_campaign=national-toastday&utm_source=facebook"
    "&utm_medium=paid-social&utm_content=carousel"
)


async def test_cross_device_journey_one_profile_and_credit(stack: dict[str, Any]) -> None:
    http, url, key = stack["http"], stack["url"], stack["key"]
    laptop, phone, user = (
        "anon-laptop-" + secrets.token_hex(3),
        "anon-phone-" + secrets.token_hex(3),
        "u-" + secrets.token_hex(3),
    )
    batch = [
        # The laptop lands from a Facebook ad, the phone browses directly, both anonymously.
        {"type": "page", "anonymousId": laptop, "name": "Toasters", "timestamp": "2026-11-20T10:00:00Z",
         "context": {"page": {"url": LANDING, "referrer": "https://www.facebook.com/"}}},
        {"type": "page", "anonymousId": phone, "name": "Home", "timestamp": "2026-11-20T11:00:00Z",
         "context": {"page": {"url": "https://shop.example/"}}},
        # The person logs in on both devices.
        {"type": "identify", "anonymousId": laptop, "userId": user, "timestamp": "2026-11-20T12:00:00Z",
         "traits": {"email": "Toast.Fan@Example.com", "name": "Toast Fan"}},
        {"type": "identify", "anonymousId": phone, "userId": user, "timestamp": "2026-11-21T09:00:00Z"},
        # ... and buys on the phone.
        {"type": "track", "userId": user, "anonymousId": phone, "event": "Order Completed",
         "timestamp": "2026-11-21T09:05:00Z",
         "properties": {"order_id": "o-" + secrets.token_hex(3), "revenue": 25.0, "currency": "USD"}},
    ]  # fmt: skip
    async with http.post(f"{url}/v1/batch", json={"batch": batch}, headers=auth(key)) as resp:
        assert resp.status == 200, await resp.text()
    await stack["identity"].wait_caught_up()

    status, resolved = await get(stack, f"/v1/profiles/resolve?kind=anonymous_id&value={phone}")
    assert status == 200, resolved
    profile_id = resolved["profile"].removeprefix("profiles/")
    status, same = await get(stack, "/v1/profiles/resolve?kind=email&value=toast.fan@example.com")
    assert status == 200 and same["profile"] == resolved["profile"]

    status, body = await get(stack, f"/v1/profiles/{profile_id}")
    assert status == 200, body
    ids = {(i["identifier"]["kind"], i["identifier"]["value"]) for i in body["profile"]["identifiers"]}
    assert {("anonymous_id", laptop), ("anonymous_id", phone), ("user_id", user)} <= ids

    status, journey = await get(stack, f"/v1/profiles/{profile_id}/events")
    assert status == 200, journey
    events = journey["events"]
    assert [e.get("anonymous_id") for e in events] == [laptop, phone, laptop, phone, phone]
    assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
    assert events[0]["campaign"]["name"] == "national-toastday"

    # The phone purchase is credited to the laptop's Facebook ad.
    async def report() -> Any:
        status, rep = await get(stack, "/v1/reports/campaigns?model=last_non_direct&group_by=source,medium")
        assert status == 200, rep
        rows = [r for r in rep.get("rows", []) if float(r.get("conversions", 0)) > 0]
        return rows or None

    rows = await eventually(report, timeout=15)
    assert len(rows) == 1, rows
    assert rows[0]["dimensions"] if "dimensions" in rows[0] else rows[0]
    flat = str(rows[0])
    assert "facebook" in flat and "paid-social" in flat
    assert float(rows[0]["conversions"]) == pytest.approx(1.0)

    status, csv = await get(stack, "/v1/reports/campaigns?model=linear&group_by=source&format=csv")
    assert status == 200 and "facebook" in csv


async def test_read_api_refuses_bad_keys_and_names_bad_parameters(stack: dict[str, Any]) -> None:
    status, body = await get(stack, "/v1/profiles/resolve?kind=user_id&value=x", key="wrong")
    assert status == 401 and body["code"] == "invalid_read_key"
    status, body = await get(
        stack, "/v1/profiles/resolve?kind=user_id&value=x", key=stack["key"]
    )  # a write key
    assert status == 401
    status, body = await get(stack, "/v1/reports/campaigns?model=magic")
    assert status == 400 and body["field"] == "model"
    status, body = await get(stack, "/v1/reports/campaigns?model=linear&start_time=yesterday")
    assert status == 400 and body["field"] == "start_time"
    status, body = await get(stack, "/v1/profiles/resolve?kind=user_id")
    assert status == 400 and body["field"] == "value"
    status, body = await get(stack, "/v1/profiles/p_not_a_profile_id")
    assert status == 400 and body["errors"][0]["field"] == "name", body
    status, body = await get(stack, "/v1/profiles/p" + "0" * 20)
    assert status == 404 and body["code"] == "profile_not_found", body
    status, body = await get(stack, "/v1/profiles/resolve?kind=user_id&value=nobody-" + secrets.token_hex(4))
    assert status == 404, body
