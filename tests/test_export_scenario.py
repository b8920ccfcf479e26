"""The done-when scenario: buyers clicked a Facebook ad and a Google ad on other devices days
before buying in a store. Their clicks go through the real IngestService; a CSV of the store's
purchases goes through the real import command; the conversions come out at the Meta, Google Ads
and Data Manager receivers matched, with the right click ids and hashes, exactly once, and the
import report shows the per-row errors and the match rate."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import grpc
import orjson
import pytest

from services.export.app import ExportApp, ExportSettings, start_export
from services.ingest import store as ingest_store
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from tests.export_receivers import Receivers, ensure_identity_view
from touchpoint.events.v1 import event_pb2
from touchpoint.export.v1 import export_service_pb2 as pb
from touchpoint.export.v1 import export_service_pb2_grpc as pb_grpc
from touchpoint.ingest.v1 import ingest_service_pb2 as ingest_pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from touchpoint.platform.testing import eventually

NOW = datetime.now(UTC).replace(microsecond=0)
NY = ZoneInfo("America/New_York")
ROOT = Path(__file__).resolve().parent.parent


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


@dataclass
class World:
    pool: asyncpg.Pool
    ingest: IngestApp
    export: ExportApp
    receivers: Receivers
    stub: pb_grpc.ExportServiceStub


@pytest.fixture(scope="module")
async def world(pool: asyncpg.Pool) -> AsyncIterator[World]:
    ingest = await start_ingest(pool, IngestSettings.for_tests())
    await ensure_identity_view(pool)
    receivers = Receivers()
    await receivers.start()
    export = await start_export(pool, ExportSettings.for_tests())
    try:
        async with grpc.aio.insecure_channel(export.address) as channel:
            yield World(pool, ingest, export, receivers, pb_grpc.ExportServiceStub(channel))
    finally:
        await export.stop()
        await receivers.stop()
        await ingest.stop()


def page(anon: str, url: str, when: datetime, user_id: str = "") -> event_pb2.Event:
    ev = event_pb2.Event(
        type=event_pb2.EVENT_TYPE_PAGE,
        anonymous_id=anon,
        user_id=user_id,
        name="Landing",
        context_json=orjson.dumps({"page": {"url": url}}),
    )
    ev.timestamp.FromDatetime(when)
    return ev


def identify(anon: str, user_id: str, traits: dict[str, Any], when: datetime) -> event_pb2.Event:
    ev = event_pb2.Event(
        type=event_pb2.EVENT_TYPE_IDENTIFY,
        anonymous_id=anon,
        user_id=user_id,
        traits_json=orjson.dumps(traits),
    )
    ev.timestamp.FromDatetime(when)
    return ev


FB_URL = "https://shop.example/toast?utm_campaign=national-toastday&utm_source=facebook&utm_medium=paid-social&fbclid={}"
G_URL = "https://shop.example/toast?utm_campaign=national-toastday&utm_source=google&utm_medium=cpc&gclid={}"

# When each click happened.
ADA_FB = NOW - timedelta(days=5)
ADA_G = NOW - timedelta(days=3)
BEN_G = NOW - timedelta(days=10)
BEN_G_OLD = NOW - timedelta(days=120)
CY_FB = NOW - timedelta(days=1, hours=2)
# When each purchase happened (store time, New York).
ADA_BUY = (NOW - timedelta(hours=20)).astimezone(NY)
BEN_BUY = (NOW - timedelta(hours=30)).astimezone(NY)
CY_BUY = (NOW - timedelta(hours=5)).astimezone(NY)
DEE_BUY = (NOW - timedelta(hours=6)).astimezone(NY)
EVE_BUY = (NOW - timedelta(hours=7)).astimezone(ZoneInfo("Europe/Paris"))


async def write_clicks(w: World) -> None:
    await ingest_store.create_source(w.pool, write_key="web-key", name="web")
    events = [
        # Ada: a Facebook ad on her phone, a Google ad on her laptop, logged in on both.
        page("ada-phone", FB_URL.format("FB-ADA"), ADA_FB),
        identify("ada-phone", "u-ada", {"email": "Ada.Lovelace@gmail.com"}, ADA_FB + timedelta(minutes=5)),
        page("ada-laptop", G_URL.format("G-ADA"), ADA_G),
        identify("ada-laptop", "u-ada", {}, ADA_G + timedelta(minutes=3)),
        # Ben: a Google ad 120 days ago (too old) and one 10 days ago; a Facebook ad after buying.
        page("ben-laptop", G_URL.format("G-BEN-OLD"), BEN_G_OLD),
        page("ben-laptop", G_URL.format("G-BEN"), BEN_G),
        identify("ben-laptop", "u-ben", {"phone": "+16505550002"}, BEN_G + timedelta(minutes=1)),
        page("ben-phone", FB_URL.format("FB-BEN-LATE"), BEN_BUY + timedelta(hours=2), user_id="u-ben"),
        # Cy: a Facebook ad on his tablet; the store knows him by loyalty id (= his user id).
        page("cy-tablet", FB_URL.format("FB-CY"), CY_FB),
        identify("cy-tablet", "u-cy", {}, CY_FB + timedelta(minutes=1)),
    ]
    async with grpc.aio.insecure_channel(w.ingest.address) as channel:
        resp = await ingest_grpc.IngestServiceStub(channel).WriteEvents(
            ingest_pb.WriteEventsRequest(write_key="web-key", events=events)
        )
    assert resp.accepted == len(events), resp


def write_csv(path: Path) -> None:
    header = "order_id,event_time,time_zone,value,currency,email,phone,first_name,last_name,city,state,zip,country,external_id,store_id,gclid\n"
    rows = [
        f"A-1001,{ADA_BUY.isoformat()},America/New_York,129.90,USD, ada.lovelace@gmail.com ,,Ada,Lovelace,New York,NY,10001-2345,US,,nyc-5th,",
        f"A-1002,{BEN_BUY.isoformat()},America/New_York,54.00,USD,,(650) 555-0002,Ben,Okri,Brooklyn,New York,11201,US,,nyc-bk,",
        f"A-1003,{CY_BUY.isoformat()},America/New_York,12.50,usd,,,,,,,,,u-cy,nyc-5th,",
        f"A-1004,{DEE_BUY.isoformat()},America/New_York,80,USD,dee@example.org,,Dee,Nguyen,,,,US,,nyc-5th,",
        # A naive local time read in the row's zone; the till captured a gclid from a coupon.
        f"A-1005,{EVE_BUY.replace(tzinfo=None).isoformat(sep=' ')},Europe/Paris,33.3,EUR,eve@example.fr,,,,,,,FR,,paris-1,G-COUPON",
        # Bad rows: each must come back with its field and reason.
        f",{ADA_BUY.isoformat()},,1,USD,x@example.com,,,,,,,,,,",
        f"A-1007,{ADA_BUY.replace(tzinfo=None).isoformat()},,1,USD,x@example.com,,,,,,,,,,",
        f"A-1008,{ADA_BUY.isoformat()},,12 dollars,USD,x@example.com,,,,,,,,,,",
        f"A-1009,{(NOW + timedelta(days=2)).isoformat()},,1,USD,x@example.com,,,,,,,,,,",
    ]
    path.write_text(header + "\n".join(rows) + "\n")


async def add_destinations(w: World, tmp: Path) -> None:
    r = w.receivers
    specs: list[tuple[int, dict[str, str], dict[str, str]]] = [
        (pb.DESTINATION_KIND_META_CAPI, {"dataset_id": "987654"}, {"access_token": "meta-token"}),
        (
            pb.DESTINATION_KIND_GOOGLE_ADS,
            {"customer_id": "123-456-7890", "conversion_action_id": "555", "click_through_days": "30"},
            {"access_token": "google-token", "developer_token": "dev-token"},
        ),
        (
            pb.DESTINATION_KIND_GOOGLE_DATA_MANAGER,
            {"account_id": "1234567890", "product_destination_id": "555"},
            {"access_token": "dm-token"},
        ),
        (
            pb.DESTINATION_KIND_GOOGLE_ADS_CSV,
            {
                "directory": str(tmp / "google"),
                "conversion_name": "Store purchase",
                "time_zone": "America/New_York",
            },
            {},
        ),
    ]
    for kind, settings, creds in specs:
        await w.stub.CreateDestination(
            pb.CreateDestinationRequest(
                destination=pb.Destination(
                    kind=kind,  # type: ignore[arg-type]
                    base_url=r.base_url if creds else "",
                    settings=settings,
                    credentials=creds,
                    enabled=True,
                )
            )
        )


async def test_store_purchases_reach_meta_and_google_matched_exactly_once(
    world: World, tmp_path: Path
) -> None:
    w, r = world, world.receivers
    await write_clicks(w)
    # The export service keeps the clicks from the event log; wait until it has them all.
    await eventually(
        lambda: w.pool.fetchval("select count(*) = 7 from export.clicks"),
        timeout=10,
        message="clicks not consumed",
    )
    await add_destinations(w, tmp_path)
    csv_path = tmp_path / "purchases.csv"
    write_csv(csv_path)

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.export.importcsv", str(csv_path), "--source", "pos-nyc",
        "--address", w.export.address, "--errors", str(tmp_path / "errors.csv"),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    report = out.decode()
    assert proc.returncode == 1, (report, err.decode())  # rows were refused
    assert (
        "rows 9: accepted 5, duplicates 0, rejected 4; matched 3 of 5 accepted (match rate 60.0%)" in report
    )
    assert "row 7 (order ?): error order_id REQUIRED" in report
    assert "row 8 (order A-1007): error event_time TIME_ZONE_MISSING" in report
    assert "row 9 (order A-1008): error value INVALID_VALUE" in report
    assert "row 10 (order A-1009): error event_time IN_FUTURE" in report
    assert "importing" in err.decode()  # the progress bar
    assert (tmp_path / "errors.csv").read_text().count("\n") == 5

    orders = ["A-1001", "A-1002", "A-1003", "A-1004", "A-1005"]

    def delivered() -> bool:
        return (
            all(f"Purchase:{o}" in r.meta.effects for o in orders)
            and {"A-1001", "A-1002", "A-1005"} <= set(r.google.effects)
            and {"A-1001", "A-1002", "A-1004", "A-1005"} <= set(r.dm.effects)
        )

    await eventually(delivered, timeout=10, message="purchases not delivered")

    # Meta: hashed by Meta's rules (gmail dots kept), fbc from the phone's Facebook click.
    ada = r.meta.effects["Purchase:A-1001"]
    assert ada["action_source"] == "physical_store" and ada["event_id"] == "A-1001"
    assert ada["event_time"] == int(ADA_BUY.timestamp())
    assert ada["user_data"] == {
        "em": sha("ada.lovelace@gmail.com"),
        "fn": sha("ada"),
        "ln": sha("lovelace"),
        "ct": sha("newyork"),
        "st": sha("ny"),
        "zp": sha("10001"),
        "country": sha("us"),
        "fbc": f"fb.1.{ms(ADA_FB)}.FB-ADA",
    }
    assert ada["custom_data"] == {"order_id": "A-1001", "value": 129.9, "currency": "usd"}
    ben = r.meta.effects["Purchase:A-1002"]
    assert (
        ben["user_data"]["ph"] == sha("16505550002") and "fbc" not in ben["user_data"]
    )  # clicked after buying
    assert ben["user_data"]["st"] == sha("ny")  # "New York" the state
    assert r.meta.effects["Purchase:A-1003"]["user_data"] == {
        "external_id": sha("u-cy"),
        "fbc": f"fb.1.{ms(CY_FB)}.FB-CY",
    }
    assert set(r.meta.effects["Purchase:A-1005"]["user_data"]) == {"em", "country"}

    # Google Ads: the most recent eligible click, local store time with its offset, Google's hashing.
    g_ada = r.google.effects["A-1001"]
    assert g_ada["gclid"] == "G-ADA"
    assert (
        g_ada["conversionDateTime"]
        == ADA_BUY.strftime("%Y-%m-%d %H:%M:%S")
        + ADA_BUY.strftime("%z")[:3]
        + ":"
        + ADA_BUY.strftime("%z")[3:]
    )
    assert g_ada["userIdentifiers"] == [{"hashedEmail": sha("adalovelace@gmail.com")}]
    assert (g_ada["conversionValue"], g_ada["currencyCode"], g_ada["orderId"]) == (129.9, "USD", "A-1001")
    assert r.google.effects["A-1002"]["gclid"] == "G-BEN"  # not the 120-day-old one
    assert r.google.effects["A-1002"]["userIdentifiers"] == [{"hashedPhoneNumber": sha("+16505550002")}]
    assert r.google.effects["A-1005"]["gclid"] == "G-COUPON"
    assert r.google.effects["A-1005"]["conversionDateTime"].endswith(
        EVE_BUY.strftime("%z")[:3] + ":" + EVE_BUY.strftime("%z")[3:]
    )
    assert "A-1003" not in r.google.effects and "A-1004" not in r.google.effects  # no Google click
    assert r.dm.effects["A-1001"]["adIdentifiers"] == {"gclid": "G-ADA"}
    assert r.dm.effects["A-1004"]["userData"] == {
        "userIdentifiers": [{"emailAddress": sha("dee@example.org")}]
    }

    # Exactly once, everywhere.
    assert set(r.meta.deliveries.values()) == {1}
    assert set(r.google.deliveries.values()) == {1}
    assert set(r.dm.deliveries.values()) == {1}
    assert r.problems == []

    # The Google Ads import file holds the gclid conversions in the account's time zone.
    async def google_file() -> list[str]:
        files = list((tmp_path / "google").glob("*.csv"))
        return [line for f in files for line in f.read_text().splitlines()]

    lines = await eventually(google_file, timeout=5)
    assert lines[:2] == [
        "Parameters:TimeZone=America/New_York",
        "Google Click ID,Conversion Name,Conversion Time,Conversion Value,Conversion Currency",
    ]
    assert f"G-ADA,Store purchase,{ADA_BUY.strftime('%Y-%m-%d %H:%M:%S')},129.9,USD" in lines

    # Status per conversion: how it matched and where it went.
    st = await w.stub.GetDeliveryStatus(pb.GetDeliveryStatusRequest(source="pos-nyc", order_ids=orders))
    by_order = {c.order_id: c for c in st.conversions}
    assert [(o, by_order[o].match_reason) for o in orders] == [
        ("A-1001", "MATCHED_BY_EMAIL"),
        ("A-1002", "MATCHED_BY_PHONE"),
        ("A-1003", "MATCHED_BY_EXTERNAL_ID"),
        ("A-1004", "NO_PROFILE"),
        ("A-1005", "NO_PROFILE"),
    ]
    a = by_order["A-1001"]
    assert (a.profile_id, a.gclid, a.fbc) == ("p_u-ada", "G-ADA", f"fb.1.{ms(ADA_FB)}.FB-ADA")
    assert dict(a.campaign) == {"name": "national-toastday", "source": "google", "medium": "cpc"}

    async def settled() -> bool:
        s = await w.stub.GetDeliveryStatus(pb.GetDeliveryStatusRequest(source="pos-nyc", order_ids=orders))
        return all(
            d.state in (pb.DELIVERY_STATE_DELIVERED, pb.DELIVERY_STATE_SKIPPED)
            for c in s.conversions
            for d in c.deliveries
        )

    await eventually(settled, timeout=5)
    st = await w.stub.GetDeliveryStatus(pb.GetDeliveryStatusRequest(source="pos-nyc", order_ids=["A-1003"]))
    skipped = [d for d in st.conversions[0].deliveries if d.state == pb.DELIVERY_STATE_SKIPPED]
    assert sorted(d.reason for d in skipped) == ["NO_CLICK_ID", "NO_GCLID", "NO_IDENTIFIERS"]

    # Published for attribution.
    rows = await w.pool.fetch(
        "select order_id, profile_id, gclid, fbc from export.offline_conversions order by order_id"
    )
    assert [(x["order_id"], x["profile_id"], x["gclid"]) for x in rows][:2] == [
        ("A-1001", "p_u-ada", "G-ADA"),
        ("A-1002", "p_u-ben", "G-BEN"),
    ]

    # Importing the same file again changes nothing and sends nothing.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.export.importcsv", str(csv_path), "--source", "pos-nyc",
        "--address", w.export.address, "--no-progress", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert "accepted 0, duplicates 5, rejected 4" in out.decode()
    assert set(r.meta.deliveries.values()) == {1} and set(r.google.deliveries.values()) == {1}
