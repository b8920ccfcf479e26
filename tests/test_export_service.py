"""The export service over real gRPC with real Postgres and local platform receivers: per-row
intake validation, destinations API, delivery within 5 s, outage recovery exactly once, dead
letters and replay."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from services.export.app import ExportApp, ExportSettings, start_export
from services.ingest.app import MIGRATIONS as INGEST_MIGRATIONS
from tests.export_receivers import Receivers, ensure_identity_view
from touchpoint.export.v1 import export_service_pb2 as pb
from touchpoint.export.v1 import export_service_pb2_grpc as pb_grpc
from touchpoint.platform.db import migrate
from touchpoint.platform.errors import details_of
from touchpoint.platform.testing import eventually


@dataclass
class Stack:
    pool: asyncpg.Pool
    app: ExportApp
    stub: pb_grpc.ExportServiceStub
    receivers: Receivers


@pytest.fixture(scope="module")
async def stack(pool: asyncpg.Pool) -> AsyncIterator[Stack]:
    await migrate(pool, "ingest", INGEST_MIGRATIONS)
    await ensure_identity_view(pool)
    receivers = Receivers()
    await receivers.start()
    app = await start_export(pool, ExportSettings.for_tests())
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            yield Stack(pool, app, pb_grpc.ExportServiceStub(channel), receivers)
    finally:
        await app.stop()
        await receivers.stop()


async def add_destinations(s: Stack, event: str, **overrides: object) -> dict[str, str]:
    """Meta, Google Ads and Data Manager destinations taking only `event`; their names by kind."""
    specs = {
        "meta": (pb.DESTINATION_KIND_META_CAPI, {"dataset_id": "987654"}, {"access_token": "meta-token"}),
        "google": (
            pb.DESTINATION_KIND_GOOGLE_ADS,
            {"customer_id": "123-456-7890", "conversion_action_id": "555"},
            {"access_token": "google-token", "developer_token": "dev-token"},
        ),
        "dm": (
            pb.DESTINATION_KIND_GOOGLE_DATA_MANAGER,
            {"account_id": "1234567890", "product_destination_id": "555"},
            {"access_token": "dm-token"},
        ),
    }
    names = {}
    for key, (kind, settings, creds) in specs.items():
        d = await s.stub.CreateDestination(
            pb.CreateDestinationRequest(
                destination=pb.Destination(
                    display_name=f"{key} {event}",
                    kind=kind,
                    base_url=s.receivers.base_url,
                    settings=settings,
                    credentials=creds,
                    event_names=[event],
                    enabled=True,
                    **overrides,  # type: ignore[arg-type]
                )
            )
        )
        names[key] = d.name
    return names


def conversion(order: str, event: str, minutes_ago: int = 30, **kw: object) -> pb.OfflineConversion:
    fields: dict[str, object] = {
        "order_id": order,
        "event_name": event,
        "value": 42.5,
        "currency": "usd",
        "email": f"{order}@example.com",
        "time_zone": "America/Chicago",
    }
    fields.update(kw)
    c = pb.OfflineConversion(**fields)  # type: ignore[arg-type]
    c.event_time.FromDatetime(datetime.now(UTC) - timedelta(minutes=minutes_ago))
    return c


async def upload(
    s: Stack, *convs: pb.OfflineConversion, source: str = "pos"
) -> pb.UploadOfflineConversionsResponse:
    return await s.stub.UploadOfflineConversions(
        pb.UploadOfflineConversionsRequest(source=source, conversions=convs)
    )


async def test_each_bad_row_names_field_and_reason_and_good_rows_are_stored(stack: Stack) -> None:
    ev = "Intake Test"
    future = conversion("in-future", ev)
    future.event_time.FromDatetime(datetime.now(UTC) + timedelta(hours=3))
    no_time = pb.OfflineConversion(order_id="no-time", event_name=ev)
    resp = await upload(
        stack,
        conversion("good-1", ev),
        conversion("", ev),
        future,
        no_time,
        conversion("bad-currency", ev, currency="dollars"),
        conversion("bad-click", ev, gclid="has spaces"),
        conversion("bad-phone", ev, phone="call me maybe"),
        conversion("good-1", ev),
    )
    got = [(r.order_id, r.outcome, [(v.field, v.reason) for v in r.violations]) for r in resp.results]
    assert got == [
        ("good-1", pb.OUTCOME_ACCEPTED, []),
        ("", pb.OUTCOME_REJECTED, [("order_id", "REQUIRED")]),
        ("in-future", pb.OUTCOME_REJECTED, [("event_time", "IN_FUTURE")]),
        ("no-time", pb.OUTCOME_REJECTED, [("event_time", "REQUIRED")]),
        ("bad-currency", pb.OUTCOME_REJECTED, [("currency", "INVALID_CURRENCY")]),
        ("bad-click", pb.OUTCOME_REJECTED, [("gclid", "INVALID_CLICK_ID")]),
        ("bad-phone", pb.OUTCOME_ACCEPTED, []),
        ("good-1", pb.OUTCOME_DUPLICATE, []),
    ]
    assert [(w.field, w.reason) for w in resp.results[6].warnings] == [("phone", "INVALID_PHONE")]
    assert (resp.accepted, resp.duplicates, resp.rejected) == (2, 1, 5)
    assert resp.results[7].name == resp.results[0].name
    again = await upload(stack, conversion("good-1", ev))
    assert again.results[0].outcome == pb.OUTCOME_DUPLICATE and again.results[0].name == resp.results[0].name
    assert await stack.pool.fetchval("select count(*) from export.conversions where event_name = $1", ev) == 2
    # The same order id from another source is another conversion.
    other = await upload(stack, conversion("good-1", ev), source="pos-2")
    assert other.results[0].outcome == pb.OUTCOME_ACCEPTED
    # Plain PII is never stored: only hashes.
    row = await stack.pool.fetchrow("select * from export.conversions where order_id = 'good-1' limit 1")
    assert "good-1@example.com" not in str(dict(row))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.stub.UploadOfflineConversions(
            pb.UploadOfflineConversionsRequest(conversions=[conversion("x", ev)])
        )
    assert details_of(err.value).violations[0][0] == "source"


async def test_destinations_api_never_returns_credentials(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = await stack.stub.CreateDestination(
        pb.CreateDestinationRequest(
            destination_id="meta-main",
            destination=pb.Destination(
                kind=pb.DESTINATION_KIND_META_CAPI,
                settings={"dataset_id": "1"},
                credentials={"access_token": "very-secret-token"},
                credential_env={"app_secret": "META_APP_SECRET"},
                event_names=["Nothing Here"],
                enabled=False,
            ),
        )
    )
    assert created.name == "destinations/meta-main"
    assert list(created.credentials) == [] and sorted(created.credential_keys) == [
        "access_token",
        "app_secret",
    ]
    assert "very-secret-token" not in str(created)
    raw = await stack.pool.fetchval(
        "select credentials_encrypted from export.destinations where id = 'meta-main'"
    )
    assert b"very-secret-token" not in raw
    got = await stack.stub.GetDestination(pb.GetDestinationRequest(name="destinations/meta-main"))
    assert got == created
    updated = await stack.stub.UpdateDestination(
        pb.UpdateDestinationRequest(
            destination=pb.Destination(name="destinations/meta-main", display_name="Meta", credential_env={}),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name", "credential_env"]),
        )
    )
    assert updated.display_name == "Meta" and list(updated.credential_keys) == ["access_token"]
    listed = await stack.stub.ListDestinations(pb.ListDestinationsRequest(page_size=500))
    assert "destinations/meta-main" in [d.name for d in listed.destinations]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.stub.CreateDestination(
            pb.CreateDestinationRequest(
                destination=pb.Destination(kind=pb.DESTINATION_KIND_GOOGLE_ADS, settings={})
            )
        )
    fields = [f for f, _ in details_of(err.value).violations]
    assert fields == ["destination.settings.customer_id", "destination.settings.conversion_action_id"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stack.stub.GetDestination(pb.GetDestinationRequest(name="destinations/nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_delivered_to_every_destination_within_5_seconds(stack: Stack) -> None:
    ev = f"Fast {uuid.uuid4().hex[:6]}"
    names = await add_destinations(stack, ev)
    orders = [f"fast-{i}-{ev[-6:]}" for i in range(5)]
    resp = await upload(stack, *[conversion(o, ev, gclid=f"gclid-{o}") for o in orders])
    assert resp.accepted == 5
    r = stack.receivers

    def all_there() -> bool:
        return all(
            f"{ev}:{o}" in r.meta.effects and o in r.google.effects and o in r.dm.effects for o in orders
        )

    await eventually(all_there, timeout=5.0, message="not delivered within 5 s")
    sent = r.google.effects[orders[0]]
    assert sent["gclid"] == f"gclid-{orders[0]}" and sent["currencyCode"] == "USD"
    assert sent["conversionDateTime"][-6:] in ("-05:00", "-06:00")  # America/Chicago
    status = await stack.stub.GetDeliveryStatus(
        pb.GetDeliveryStatusRequest(source="pos", order_ids=orders[:1])
    )
    (conv,) = status.conversions

    async def delivered_everywhere() -> bool:
        st = await stack.stub.GetDeliveryStatus(pb.GetDeliveryStatusRequest(names=[conv.name]))
        return all(d.state == pb.DELIVERY_STATE_DELIVERED for d in st.conversions[0].deliveries)

    await eventually(delivered_everywhere, timeout=5.0)
    st = await stack.stub.GetDeliveryStatus(pb.GetDeliveryStatusRequest(names=[conv.name]))
    assert {d.destination for d in st.conversions[0].deliveries} == set(names.values())
    assert all(d.attempts[0].http_status == 200 for d in st.conversions[0].deliveries)
    assert st.conversions[0].match_reason == "NO_PROFILE"
    assert r.problems == []


async def test_outage_of_500s_and_429s_then_recovery_delivers_each_exactly_once(stack: Stack) -> None:
    ev = f"Outage {uuid.uuid4().hex[:6]}"
    r = stack.receivers
    r.fail(r.meta, 500, 503, 429, 500, retry_after="0.3")
    r.fail(r.google, 429, 500, 502, 429, retry_after="0.2")
    r.fail(r.dm, 503, 503, 500)
    await add_destinations(stack, ev, max_batch_size=7)
    orders = [f"out-{i}-{ev[-6:]}" for i in range(40)]
    for chunk in range(0, 40, 10):
        await upload(stack, *[conversion(o, ev, gclid=f"g-{o}") for o in orders[chunk : chunk + 10]])

    def all_there() -> bool:
        return all(
            f"{ev}:{o}" in r.meta.effects and o in r.google.effects and o in r.dm.effects for o in orders
        )

    await eventually(all_there, timeout=20.0, message="not every conversion delivered after the outage")
    assert not r.meta.faults and not r.google.faults and not r.dm.faults
    assert all(r.meta.deliveries[f"{ev}:{o}"] == 1 for o in orders)
    assert all(r.google.deliveries[o] == 1 for o in orders)
    assert all(r.dm.deliveries[o] == 1 for o in orders)
    retried = await stack.pool.fetchval(
        """select count(*) from export.attempts a join export.outbox o on o.id = a.outbox_id
           join export.conversions c on c.id = o.conversion_id where c.event_name = $1 and a.outcome = 'retry'""",
        ev,
    )
    assert retried > 0
    st = await stack.stub.GetDeliveryStatus(pb.GetDeliveryStatusRequest(source="pos", order_ids=orders))
    assert len(st.conversions) == 40
    # The first rows went through the outage: their attempts show the 5xx/429 answers.
    reasons = {a.reason for c in st.conversions for d in c.deliveries for a in d.attempts}
    assert {"RATE_LIMITED"} <= reasons and ({"HTTP_503", "HTTP_500", "TRANSIENT"} & reasons)
    assert r.problems == []


async def test_never_succeeding_rows_are_dead_lettered_and_replayed(stack: Stack) -> None:
    ev = f"Dead {uuid.uuid4().hex[:6]}"
    r = stack.receivers
    dest = await stack.stub.CreateDestination(
        pb.CreateDestinationRequest(
            destination=pb.Destination(
                kind=pb.DESTINATION_KIND_META_CAPI,
                base_url=r.base_url,
                settings={"dataset_id": "42"},
                credentials={"access_token": "wrong"},
                event_names=[ev],
                enabled=True,
            )
        )
    )
    old = conversion(f"old-{ev[-6:]}", ev, minutes_ago=63 * 24 * 60)
    await upload(stack, conversion(f"ok-{ev[-6:]}", ev), old)

    async def two_dead() -> list[pb.DeadLetter]:
        resp = await stack.stub.ListDeadLetters(pb.ListDeadLettersRequest(destination=dest.name))
        return list(resp.dead_letters) if len(resp.dead_letters) == 2 else []

    dead = await eventually(two_dead, timeout=5.0)
    assert {(d.order_id, d.reason) for d in dead} == {
        (f"ok-{ev[-6:]}", "UNAUTHORIZED"),
        (old.order_id, "EVENT_TOO_OLD"),
    }
    await stack.stub.UpdateDestination(
        pb.UpdateDestinationRequest(
            destination=pb.Destination(name=dest.name, credentials={"access_token": "meta-token"}),
            update_mask=field_mask_pb2.FieldMask(paths=["credentials"]),
        )
    )
    assert stack.app.deliverer is not None
    await stack.app.deliverer.reload_now()  # (the update also triggers a reload; this makes it now)
    replayed = await stack.stub.ReplayDeadLetters(pb.ReplayDeadLettersRequest(destination=dest.name))
    assert replayed.replayed == 2
    await eventually(lambda: f"{ev}:ok-{ev[-6:]}" in r.meta.effects, timeout=5.0)

    # The too-old one can never succeed: back in the dead letters, with both tries in its history.
    async def only_old_dead() -> pb.ListDeadLettersResponse | None:
        resp = await stack.stub.ListDeadLetters(pb.ListDeadLettersRequest(destination=dest.name))
        return resp if [d.order_id for d in resp.dead_letters] == [old.order_id] else None

    resp = await eventually(only_old_dead, timeout=5.0)
    st = await stack.stub.GetDeliveryStatus(
        pb.GetDeliveryStatusRequest(names=[resp.dead_letters[0].conversion])
    )
    assert [a.reason for a in st.conversions[0].deliveries[0].attempts] == ["EVENT_TOO_OLD", "EVENT_TOO_OLD"]
    assert (
        await stack.stub.ReplayDeadLetters(pb.ReplayDeadLettersRequest(names=["deliveries/999999999"]))
    ).replayed == 0
