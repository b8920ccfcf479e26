"""Attribution with the services around it: store purchases that the real export service matched
(export.offline_conversions) become offline conversions credited through the buyer's touches on
other devices, deduplicated by order id against online orders; DeleteProfile on the real
identity service (identity.erased_events) removes every touch, conversion and identity link
attribution derived from the erased events. Real Postgres; ingest, identity, export and
attribution over gRPC."""

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

from services.attribution import store
from services.attribution.app import AttributionApp, AttributionSettings, start_attribution
from services.export.app import ExportApp, ExportSettings, start_export
from services.identity.app import IdentityApp, IdentitySettings, start_identity
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.attribution.v1 import attribution_service_pb2 as pb
from touchpoint.attribution.v1 import attribution_service_pb2_grpc as pb_grpc
from touchpoint.events.v1 import event_pb2
from touchpoint.export.v1 import export_service_pb2 as export_pb
from touchpoint.export.v1 import export_service_pb2_grpc as export_grpc
from touchpoint.identity.v1 import identity_service_pb2 as identity_pb
from touchpoint.identity.v1 import identity_service_pb2_grpc as identity_grpc
from touchpoint.ingest.v1 import ingest_service_pb2 as ingest_pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from touchpoint.platform.testing import eventually

NOW = datetime.now(UTC).replace(microsecond=0)
H = timedelta(hours=1)


def utm(source: str, medium: str, click: str = "") -> str:
    return f"https://toast.example/?utm_campaign=toastday&utm_source={source}&utm_medium={medium}{click}"


@dataclass
class World:
    pool: asyncpg.Pool
    ingest: ingest_grpc.IngestServiceStub
    identity_app: IdentityApp
    identity: identity_grpc.IdentityServiceStub
    export: export_grpc.ExportServiceStub
    attribution_app: AttributionApp
    attribution: pb_grpc.AttributionServiceStub


@pytest.fixture(scope="module")
async def world(pool: asyncpg.Pool) -> AsyncIterator[World]:
    ingest: IngestApp = await start_ingest(pool, IngestSettings.for_tests())
    identity = await start_identity(pool, IdentitySettings.for_tests(ingest.address))
    export: ExportApp = await start_export(pool, ExportSettings.for_tests(deliver=False))
    attribution = await start_attribution(pool, AttributionSettings.for_tests())
    try:
        async with (
            grpc.aio.insecure_channel(ingest.address) as c1,
            grpc.aio.insecure_channel(identity.address) as c2,
            grpc.aio.insecure_channel(export.address) as c3,
            grpc.aio.insecure_channel(attribution.address) as c4,
        ):
            yield World(
                pool,
                ingest_grpc.IngestServiceStub(c1),
                identity,
                identity_grpc.IdentityServiceStub(c2),
                export_grpc.ExportServiceStub(c3),
                attribution,
                pb_grpc.AttributionServiceStub(c4),
            )
    finally:
        await attribution.stop()
        await export.stop()
        await identity.stop()
        await ingest.stop()


def event(
    kind: int, mid: str, when: datetime, *, anon: str = "", user: str = "", url: str = "", **kw: Any
) -> event_pb2.Event:
    e = event_pb2.Event(
        type=kind,  # type: ignore[arg-type]
        message_id=mid,
        anonymous_id=anon,
        user_id=user,
        context_json=orjson.dumps({"page": {"url": url}}) if url else b"",
        **kw,
    )
    e.timestamp.FromDatetime(when)
    return e


def page(mid: str, when: datetime, anon: str, url: str, user: str = "") -> event_pb2.Event:
    return event(event_pb2.EVENT_TYPE_PAGE, mid, when, anon=anon, user=user, url=url)


def identify(mid: str, when: datetime, anon: str, user: str) -> event_pb2.Event:
    return event(event_pb2.EVENT_TYPE_IDENTIFY, mid, when, anon=anon, user=user)


def order(mid: str, when: datetime, order_id: str, revenue: float, **ids: str) -> event_pb2.Event:
    return event(
        event_pb2.EVENT_TYPE_TRACK,
        mid,
        when,
        event="Order Completed",
        properties_json=orjson.dumps({"order_id": order_id, "revenue": revenue}),
        **ids,
    )


def purchase(order_id: str, user: str, value: float, when: datetime) -> export_pb.OfflineConversion:
    c = export_pb.OfflineConversion(
        order_id=order_id, event_name="Order Completed", external_id=user, value=value, currency="usd"
    )
    c.event_time.FromDatetime(when)
    return c


async def setup_space(w: World, events: list[event_pb2.Event]) -> tuple[str, str]:
    space = "sp_" + secrets.token_hex(4)
    key = "wk_" + secrets.token_hex(8)
    source = await create_source(w.pool, write_key=key, name="web", space_id=space)
    resp = await w.ingest.WriteEvents(ingest_pb.WriteEventsRequest(write_key=key, events=events))
    assert resp.accepted == len(events)
    await w.identity_app.wait_caught_up()
    return space, source


async def upload(w: World, space: str, *convs: export_pb.OfflineConversion) -> None:
    up = await w.export.UploadOfflineConversions(
        export_pb.UploadOfflineConversionsRequest(space_id=space, source="pos", conversions=convs)
    )
    assert [r.outcome for r in up.results] == [export_pb.OUTCOME_ACCEPTED] * len(convs), up


async def report(w: World, space: str, model: pb.Model.ValueType = pb.MODEL_LAST_NON_DIRECT) -> Any:
    q = pb.ReportQuery(space_id=space, group_by=[pb.DIMENSION_SOURCE])
    q.start_time.FromDatetime(NOW - timedelta(days=2))
    q.end_time.FromDatetime(NOW + H)
    return await w.attribution.GetCampaignReport(pb.GetCampaignReportRequest(query=q, model=model))


def credited(r: Any) -> dict[str, float]:
    return {x.dimensions.source: x.conversions for x in r.rows if x.conversions}


async def test_store_purchases_are_credited_to_clicks_on_other_devices_and_deduplicated(world: World) -> None:
    w = world
    space, _ = await setup_space(
        w,
        [
            # Ivy clicks a Facebook ad on her laptop and logs in there.
            page("ivy-1", NOW - 30 * H, "ivy-laptop", utm("facebook", "paid-social", "&fbclid=FB-IVY")),
            identify("ivy-2", NOW - 29 * H, "ivy-laptop", "u-ivy"),
            # ... and orders online on her phone (order W-1).
            order("ivy-3", NOW - 5 * H, "W-1", 7.0, anon="ivy-phone", user="u-ivy"),
            # Jon reads a news article, logs in; he buys only in the store.
            page("jon-1", NOW - 20 * H, "jon-laptop", utm("toastnation", "news")),
            identify("jon-2", NOW - 19 * H, "jon-laptop", "u-jon"),
        ],
    )

    async def online_order_in() -> bool:
        return (await report(w, space)).totals.conversions == 1

    await eventually(online_order_in, timeout=20, message="the online order never showed")
    await upload(
        w,
        space,
        # Ivy in the store: matched by her loyalty id (her user id), credited to the laptop click.
        purchase("S-1", "u-ivy", 25.0, NOW - 2 * H),
        # The online order W-1 sent again by the store system: the online one stays.
        purchase("W-1", "u-ivy", 99.0, NOW - 4 * H),
        purchase("S-2", "u-jon", 40.0, NOW - 3 * H),
        # Nobody known: export cannot match it, attribution does not count it.
        purchase("S-3", "u-nobody", 12.0, NOW - 3 * H),
    )

    async def store_sales_in() -> Any:
        r = await report(w, space)
        return r if r.totals.conversions == 3 else None

    r = await eventually(store_sales_in, timeout=20, message="the store purchases never showed")
    assert r.totals.revenue == pytest.approx(7 + 25 + 40)
    assert credited(r) == {"facebook": 2.0, "toastnation": 1.0}
    path = await w.attribution.GetConversionPath(
        pb.GetConversionPathRequest(space_id=space, name="conversions/S-1")
    )
    assert path.conversion.offline and path.conversion.value == 25
    assert path.conversion.profile.startswith("profile:")
    assert [(t.dimensions.source, t.identifier) for t in path.touches] == [
        ("facebook", "anonymous_id:ivy-laptop")
    ]
    online = await w.attribution.GetConversionPath(
        pb.GetConversionPathRequest(space_id=space, name="conversions/W-1")
    )
    assert not online.conversion.offline and online.conversion.value == 7
    rows = await w.pool.fetch(
        "select conversion_id, offline, user_id from attribution.conversions where space_id = $1", space
    )
    assert sorted((r["conversion_id"], r["offline"], r["user_id"]) for r in rows) == [
        ("S-1", True, "u-ivy"),
        ("S-2", True, "u-jon"),
        ("W-1", False, "u-ivy"),
    ]


async def test_delete_profile_removes_what_attribution_derived_from_its_events(world: World) -> None:
    w = world
    space, source = await setup_space(
        w,
        [
            # Kim: a Google ad on her laptop, logs in, orders online, and buys in the store.
            page("kim-1", NOW - 30 * H, "kim-laptop", utm("google", "cpc", "&gclid=G-KIM")),
            identify("kim-2", NOW - 29 * H, "kim-laptop", "u-kim"),
            order("kim-3", NOW - 6 * H, "K-1", 10.0, anon="kim-phone", user="u-kim"),
            # Lou: a Facebook ad, logs in, orders online; Lou stays.
            page("lou-1", NOW - 20 * H, "lou-laptop", utm("facebook", "paid-social")),
            identify("lou-2", NOW - 19 * H, "lou-laptop", "u-lou"),
            order("lou-3", NOW - 4 * H, "L-1", 20.0, anon="lou-laptop", user="u-lou"),
        ],
    )
    await upload(w, space, purchase("K-2", "u-kim", 30.0, NOW - 2 * H))

    async def all_in() -> Any:
        r = await report(w, space)
        return r if r.totals.conversions == 3 else None

    r = await eventually(all_in, timeout=20, message="the conversions never showed")
    assert credited(r) == {"google": 2.0, "facebook": 1.0}
    assert await w.pool.fetchval(
        "select count(*) from attribution.identity_links where space_id = $1 and user_id = 'u-kim'", space
    )

    profile = await w.identity.ResolveProfile(
        identity_pb.ResolveProfileRequest(
            space_id=space, identifier=event_pb2.Identifier(kind="user_id", value="u-kim")
        )
    )
    deleted = await w.identity.DeleteProfile(identity_pb.DeleteProfileRequest(name=profile.profile))
    assert deleted.events_deleted == 3

    async def kim_gone() -> Any:
        r = await report(w, space)
        return r if r.totals.conversions == 1 else None

    r = await eventually(kim_gone, timeout=20, message="attribution kept conversions of the erased profile")
    assert credited(r) == {"facebook": 1.0} and r.totals.revenue == 20
    left = await w.pool.fetch(
        """select 'touch' as what, message_id from attribution.touches where space_id = $1
           union all select 'conversion', conversion_id from attribution.conversions where space_id = $1
           union all select 'link', anonymous_id from attribution.identity_links where space_id = $1""",
        space,
    )
    assert sorted((x["what"], x["message_id"]) for x in left) == [
        ("conversion", "L-1"),
        ("link", "lou-laptop"),
        ("touch", "lou-1"),
    ]
    assert (
        await w.pool.fetchval("select count(*) from attribution.erased_events where source_id = $1", source)
        == 3
    )

    # The live consumer meeting an erased event late (it may lag behind ingest's deletion)
    # derives nothing from it.
    late = (0, 0, space, source, "kim-1", "page", None, "kim-laptop", None, None,
            (NOW - 30 * H).isoformat(), '{"name": "toastday", "source": "google", "medium": "cpc"}',
            None, None, None, None, None)  # fmt: skip
    fresh = (*late[:4], "new-1", *late[5:])
    async with w.pool.acquire() as conn, conn.transaction():
        touches, _ = await store.apply_rows(conn, [late, fresh], only_space=space)
    assert touches == 1
    rows = await w.pool.fetch("select message_id from attribution.touches where space_id = $1", space)
    assert sorted(r["message_id"] for r in rows) == ["lou-1", "new-1"]
