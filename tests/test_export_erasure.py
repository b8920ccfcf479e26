"""GDPR erasure across services: DeleteProfile on the real identity service erases the profile's
events (identity.erased_events), and the real export service drops what it derived from them:
the clicks kept from the event log and the clicks matched to store purchases. Real Postgres,
ingest, identity and export over gRPC."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import orjson
import pytest

from services.export import store as export_store
from services.export.app import ExportApp, ExportSettings, start_export
from services.identity.app import IdentityApp, IdentitySettings, start_identity
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.events.v1 import event_pb2
from touchpoint.export.v1 import export_service_pb2 as export_pb
from touchpoint.export.v1 import export_service_pb2_grpc as export_grpc
from touchpoint.identity.v1 import identity_service_pb2 as identity_pb
from touchpoint.identity.v1 import identity_service_pb2_grpc as identity_grpc
from touchpoint.ingest.v1 import ingest_service_pb2 as ingest_pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from touchpoint.platform.eventlog import LogEvent
from touchpoint.platform.testing import eventually

NOW = datetime.now(UTC).replace(microsecond=0)
FB_URL = (
    "https://shop.example/toast?utm_campaign=toastday&utm_source=facebook&utm_medium=paid-social&fbclid={}"
)
G_URL = "https://shop.example/toast?utm_campaign=toastday&utm_source=google&utm_medium=cpc&gclid={}"


@dataclass
class World:
    pool: asyncpg.Pool
    ingest: ingest_grpc.IngestServiceStub
    identity_app: IdentityApp
    identity: identity_grpc.IdentityServiceStub
    export_app: ExportApp
    export: export_grpc.ExportServiceStub


@pytest.fixture(scope="module")
async def world(pool: asyncpg.Pool) -> AsyncIterator[World]:
    ingest: IngestApp = await start_ingest(pool, IngestSettings.for_tests())
    identity = await start_identity(pool, IdentitySettings.for_tests(ingest.address))
    export = await start_export(pool, ExportSettings.for_tests(deliver=False))
    try:
        async with (
            grpc.aio.insecure_channel(ingest.address) as c1,
            grpc.aio.insecure_channel(identity.address) as c2,
            grpc.aio.insecure_channel(export.address) as c3,
        ):
            yield World(
                pool,
                ingest_grpc.IngestServiceStub(c1),
                identity,
                identity_grpc.IdentityServiceStub(c2),
                export,
                export_grpc.ExportServiceStub(c3),
            )
    finally:
        await export.stop()
        await identity.stop()
        await ingest.stop()


def event(
    kind: int, mid: str, when: datetime, *, anon: str = "", user: str = "", url: str = "", traits: Any = None
) -> event_pb2.Event:
    e = event_pb2.Event(
        type=kind,  # type: ignore[arg-type]
        message_id=mid,
        anonymous_id=anon,
        user_id=user,
        name="Landing" if kind == event_pb2.EVENT_TYPE_PAGE else "",
        context_json=orjson.dumps({"page": {"url": url}}) if url else b"",
        traits_json=orjson.dumps(traits) if traits else b"",
    )
    e.timestamp.FromDatetime(when)
    return e


def purchase(order_id: str, user: str, when: datetime) -> export_pb.OfflineConversion:
    c = export_pb.OfflineConversion(order_id=order_id, external_id=user, value=10.0, currency="USD")
    c.event_time.FromDatetime(when)
    return c


async def clicks(pool: asyncpg.Pool, space: str) -> set[tuple[str, str, str, str]]:
    rows = await pool.fetch(
        "select holder_kind, holder, kind, value from export.clicks where space_id = $1", space
    )
    return {(r["holder_kind"], r["holder"], r["kind"], r["value"]) for r in rows}


async def test_erased_events_view_has_the_published_columns(world: World) -> None:
    rows = await world.pool.fetch(
        """select a.attname, format_type(a.atttypid, a.atttypmod) as type
           from pg_attribute a where a.attrelid = 'identity.erased_events'::regclass
             and a.attnum > 0 and not a.attisdropped order by a.attnum"""
    )
    assert [(r["attname"], r["type"]) for r in rows] == [
        ("xid", "xid8"),
        ("seq", "bigint"),
        ("space_id", "text"),
        ("source_id", "text"),
        ("message_id", "text"),
        ("profile_id", "text"),
        ("received_at", "timestamp with time zone"),
    ]


async def test_delete_profile_drops_the_clicks_export_derived_from_its_events(world: World) -> None:
    w = world
    space = "sp_" + secrets.token_hex(4)
    key = "wk_" + secrets.token_hex(8)
    source = await create_source(w.pool, write_key=key, name="web", space_id=space)
    page, identify = event_pb2.EVENT_TYPE_PAGE, event_pb2.EVENT_TYPE_IDENTIFY
    ada_fb, ada_g, ben_g = NOW - timedelta(days=5), NOW - timedelta(days=3), NOW - timedelta(days=4)
    events = [
        # Ada: a Facebook ad on her phone, a Google ad on her laptop, logged in on both.
        event(page, "ada-1", ada_fb, anon="ada-phone", url=FB_URL.format("FB-ADA")),
        event(identify, "ada-2", ada_fb + timedelta(minutes=5), anon="ada-phone", user="u-ada"),
        event(page, "ada-3", ada_g, anon="ada-laptop", url=G_URL.format("G-ADA")),
        event(identify, "ada-4", ada_g + timedelta(minutes=2), anon="ada-laptop", user="u-ada"),
        # Ben: a Google ad, logged in; he stays.
        event(page, "ben-1", ben_g, anon="ben-laptop", url=G_URL.format("G-BEN")),
        event(identify, "ben-2", ben_g + timedelta(minutes=1), anon="ben-laptop", user="u-ben"),
    ]
    resp = await w.ingest.WriteEvents(ingest_pb.WriteEventsRequest(write_key=key, events=events))
    assert resp.accepted == len(events)
    await w.identity_app.wait_caught_up()
    ada_clicks = {
        ("anonymous_id", "ada-phone", "fbclid", "FB-ADA"),
        ("anonymous_id", "ada-laptop", "gclid", "G-ADA"),
    }
    ben_clicks = {("anonymous_id", "ben-laptop", "gclid", "G-BEN")}
    await eventually(
        lambda: _has(w.pool, space, ada_clicks | ben_clicks), message="export did not keep the clicks"
    )
    # Store purchases matched to both buyers (by loyalty id = user id) and to their clicks.
    up = await w.export.UploadOfflineConversions(
        export_pb.UploadOfflineConversionsRequest(
            space_id=space,
            source="pos",
            conversions=[
                purchase("A-1", "u-ada", NOW - timedelta(hours=2)),
                purchase("B-1", "u-ben", NOW - timedelta(hours=2)),
            ],
        )
    )
    assert [r.outcome for r in up.results] == [export_pb.OUTCOME_ACCEPTED] * 2
    before = await conversions(w.pool, space)
    assert before["A-1"][:2] == ("gclid", "G-ADA") and before["A-1"][2].endswith(".FB-ADA")
    assert before["A-1"][3] is not None
    assert before["B-1"][:2] == ("gclid", "G-BEN")

    profile = await w.identity.ResolveProfile(
        identity_pb.ResolveProfileRequest(
            space_id=space, identifier=event_pb2.Identifier(kind="user_id", value="u-ada")
        )
    )
    deleted = await w.identity.DeleteProfile(identity_pb.DeleteProfileRequest(name=profile.profile))
    assert deleted.events_deleted == 4

    # Identity published one erasure per erased event, under the profile.
    erased = await w.pool.fetch(
        "select source_id, message_id, profile_id from identity.erased_events where space_id = $1", space
    )
    assert sorted((r["source_id"], r["message_id"], r["profile_id"]) for r in erased) == [
        (source, m, profile.profile.removeprefix("profiles/")) for m in ("ada-1", "ada-2", "ada-3", "ada-4")
    ]

    async def ada_dropped() -> bool:
        return await clicks(w.pool, space) == ben_clicks

    await eventually(ada_dropped, message="export kept clicks of erased events")
    assert not await w.pool.fetchval(
        "select count(*) from export.click_events where source_id = $1 and message_id like 'ada-%'", source
    )
    after = await conversions(w.pool, space)
    assert after["A-1"] == (None, None, None, None), "the purchase keeps a click of erased events"
    assert after["B-1"] == before["B-1"]

    # The click consumer meeting an erased event late (it lags behind ingest's deletion) keeps
    # nothing of it.
    late = LogEvent(
        0, 0, space, source, "ada-3", "page", None, "ada-laptop", None, None, None, "Landing",
        ada_g, ada_g, {}, {}, {}, {}, [{"kind": "gclid", "value": "G-ADA"}],
    )  # fmt: skip
    async with w.pool.acquire() as conn, conn.transaction():
        await export_store.apply_click_events(conn, [late])
    assert await clicks(w.pool, space) == ben_clicks


async def _has(pool: asyncpg.Pool, space: str, want: set[tuple[str, str, str, str]]) -> bool:
    return want <= await clicks(pool, space)


async def conversions(pool: asyncpg.Pool, space: str) -> dict[str, tuple[Any, ...]]:
    rows = await pool.fetch(
        "select order_id, click_kind, click_value, fbc, campaign from export.conversions where space_id = $1",
        space,
    )
    return {r["order_id"]: (r["click_kind"], r["click_value"], r["fbc"], r["campaign"]) for r in rows}
