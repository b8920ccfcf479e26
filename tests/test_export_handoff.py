"""The fast path from intake to delivery, against real Postgres and a local Meta receiver: rows
handed by intake to the lanes of its own process (leased at insert, no claim), handed rows a lane
cannot send in time or at shutdown going back to pending, lanes that do not keep up taking no
hand-off, the COPY intake losing a race to a concurrent upload of the same order id, and the
compact attempts history (a delivered attempt kept on the outbox row)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from services.export import store
from services.export.app import ExportApp, ExportSettings, start_export
from services.export.credentials import SecretBox
from tests.export_receivers import Receivers
from touchpoint.export.v1 import export_service_pb2 as pb
from touchpoint.export.v1 import export_service_pb2_grpc as pb_grpc
from touchpoint.platform.testing import eventually

# One key for every app of this module: they share the destinations (and their credentials).
KEY = SecretBox.new_key()


@pytest.fixture
async def receivers() -> AsyncIterator[Receivers]:
    r = Receivers()
    await r.start()
    yield r
    await r.stop()


def settings(**delivery: object) -> ExportSettings:
    base = ExportSettings.for_tests(secret_key=KEY)
    return dataclasses.replace(base, delivery=dataclasses.replace(base.delivery, **delivery))  # type: ignore[arg-type]


async def meta_destination(app: ExportApp, r: Receivers, event: str, **overrides: object) -> str:
    async with grpc.aio.insecure_channel(app.address) as channel:
        d = await pb_grpc.ExportServiceStub(channel).CreateDestination(
            pb.CreateDestinationRequest(
                destination=pb.Destination(
                    kind=pb.DESTINATION_KIND_META_CAPI,
                    base_url=r.base_url,
                    settings={"dataset_id": "1"},
                    credentials={"access_token": "meta-token"},
                    event_names=[event],
                    enabled=True,
                    **overrides,  # type: ignore[arg-type]
                )
            )
        )
    assert app.deliverer is not None
    await app.deliverer.reload_now()
    return d.name.removeprefix("destinations/")


def conversion(order: str, event: str, value: float = 42.5) -> pb.OfflineConversion:
    c = pb.OfflineConversion(
        order_id=order, event_name=event, value=value, currency="EUR", email=f"{order}@example.com"
    )
    c.event_time.FromDatetime(datetime.now(UTC) - timedelta(minutes=30))
    return c


async def upload(app: ExportApp, *convs: pb.OfflineConversion) -> pb.UploadOfflineConversionsResponse:
    async with grpc.aio.insecure_channel(app.address) as channel:
        return await pb_grpc.ExportServiceStub(channel).UploadOfflineConversions(
            pb.UploadOfflineConversionsRequest(source="pos", conversions=convs)
        )


async def outbox_rows(pool: asyncpg.Pool, event: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        """select c.order_id, o.state, o.attempts, o.lease_token, o.request_id
           from export.outbox o join export.conversions c on c.id = o.conversion_id
           where c.event_name = $1 order by c.order_id""",
        event,
    )


async def test_intake_hands_new_rows_to_its_lanes_and_each_is_sent_once(
    pool: asyncpg.Pool, receivers: Receivers, monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = f"Handoff {uuid.uuid4().hex[:6]}"
    claims: list[int] = []
    real_claim = store.claim

    async def counting_claim(*args: object, **kw: object) -> list[asyncpg.Record]:
        rows = await real_claim(*args, **kw)  # type: ignore[arg-type]
        claims.append(len(rows))
        return rows

    monkeypatch.setattr(store, "claim", counting_claim)
    app = await start_export(pool, settings())
    try:
        dest = await meta_destination(app, receivers, ev, max_batch_size=10)
        orders = [f"h-{i:03d}-{ev[-6:]}" for i in range(35)]
        resp = await upload(app, *[conversion(o, ev) for o in orders])
        assert resp.accepted == 35
        await eventually(lambda: all(f"{ev}:{o}" in receivers.meta.effects for o in orders), timeout=5.0)
        rows = await eventually(
            lambda: _all_delivered(pool, ev, 35), timeout=5.0, message="results not recorded"
        )
        assert all(r["attempts"] == 1 and r["request_id"] is not None for r in rows)
        assert all(receivers.meta.deliveries[f"{ev}:{o}"] == 1 for o in orders)
        assert receivers.meta.batch_sizes[-4:] == [10, 10, 10, 5]
        assert sum(claims) == 0, "handed rows were claimed from the outbox"
        # The delivered attempt is kept on the row, and shows in the status like any other.
        async with grpc.aio.insecure_channel(app.address) as channel:
            st = await pb_grpc.ExportServiceStub(channel).GetDeliveryStatus(
                pb.GetDeliveryStatusRequest(source="pos", order_ids=orders[:2])
            )
        for c in st.conversions:
            (d,) = c.deliveries
            assert d.destination == f"destinations/{dest}"
            assert d.state == pb.DELIVERY_STATE_DELIVERED and d.attempt_count == 1
            assert [(a.outcome, a.http_status) for a in d.attempts] == [("delivered", 200)]
        assert not await pool.fetchval(
            "select count(*) from export.attempts a join export.outbox o on o.id = a.outbox_id "
            "where o.destination_id = $1",
            dest,
        )
        assert receivers.problems == []
    finally:
        await app.stop()


async def _all_delivered(pool: asyncpg.Pool, event: str, n: int) -> list[asyncpg.Record] | None:
    rows = await outbox_rows(pool, event)
    return rows if len(rows) == n and all(r["state"] == "delivered" for r in rows) else None


async def test_handed_rows_not_sent_within_half_their_lease_go_back_to_pending_and_are_sent_once(
    pool: asyncpg.Pool, receivers: Receivers, monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = f"Late {uuid.uuid4().hex[:6]}"
    released: list[int] = []
    real_release = store.release

    async def counting_release(p: asyncpg.Pool, token: int, ids: list[int]) -> None:
        released.extend(ids)
        await real_release(p, token, ids)

    monkeypatch.setattr(store, "release", counting_release)
    receivers.meta.delay = 0.3
    app = await start_export(pool, settings(lease_seconds=1.0, concurrency_per_destination=1))
    try:
        await meta_destination(app, receivers, ev, max_batch_size=1)
        orders = [f"late-{i}-{ev[-6:]}" for i in range(6)]
        await upload(app, *[conversion(o, ev) for o in orders])
        rows = await eventually(lambda: _all_delivered(pool, ev, 6), timeout=10.0)
        # One batch at a time, 0.3 s each: the later ones outlived half their lease (0.5 s).
        assert released, "no handed batch went back to pending"
        assert all(receivers.meta.deliveries[f"{ev}:{o}"] == 1 for o in orders)
        assert all(r["attempts"] == 1 for r in rows), "an attempt not sent was counted"
    finally:
        await app.stop()


async def test_stopping_sends_in_flight_batches_and_puts_the_rest_back_for_any_worker(
    pool: asyncpg.Pool, receivers: Receivers
) -> None:
    ev = f"Stop {uuid.uuid4().hex[:6]}"
    receivers.meta.delay = 0.3
    first = await start_export(pool, settings(concurrency_per_destination=1))
    await meta_destination(first, receivers, ev, max_batch_size=1)
    orders = [f"stop-{i}-{ev[-6:]}" for i in range(4)]
    await upload(first, *[conversion(o, ev) for o in orders])
    await eventually(lambda: receivers.meta.in_flight > 0, timeout=5.0, interval=0.005)
    await first.stop()
    rows = await outbox_rows(pool, ev)
    assert [r["state"] for r in rows].count("delivered") >= 1
    waiting = [r for r in rows if r["state"] != "delivered"]
    assert waiting, "everything was sent before the stop"
    # Not left leased until the lease runs out: pending, no attempt counted.
    assert all(r["state"] == "pending" and r["attempts"] == 0 and r["lease_token"] is None for r in waiting)

    receivers.meta.delay = 0.0
    second = await start_export(pool, settings())
    try:
        await eventually(lambda: _all_delivered(pool, ev, 4), timeout=5.0)
        assert all(receivers.meta.deliveries[f"{ev}:{o}"] == 1 for o in orders)
    finally:
        await second.stop()


async def test_a_lane_held_back_by_retry_after_takes_no_hand_off(
    pool: asyncpg.Pool, receivers: Receivers
) -> None:
    ev = f"Paused {uuid.uuid4().hex[:6]}"
    app = await start_export(pool, settings())
    try:
        dest = await meta_destination(app, receivers, ev)
        assert app.deliverer is not None
        lane = app.deliverer.lanes[dest]
        assert dest in app.deliverer.intake_leases()
        lane.paused_until = time.monotonic() + 1.5
        assert dest not in app.deliverer.intake_leases()
        await upload(app, conversion(f"p-{ev[-6:]}", ev))
        (row,) = await outbox_rows(pool, ev)
        assert (row["state"], row["attempts"], row["lease_token"]) == ("pending", 0, None)
        # Queued like any other row: claimed once the pause is over.
        await eventually(lambda: _all_delivered(pool, ev, 1), timeout=5.0)
        assert receivers.meta.deliveries[f"{ev}:p-{ev[-6:]}"] == 1
    finally:
        await app.stop()


async def test_an_order_id_stored_by_a_concurrent_upload_after_the_check_is_a_duplicate(
    pool: asyncpg.Pool, receivers: Receivers, monkeypatch: pytest.MonkeyPatch
) -> None:
    ev = f"Race {uuid.uuid4().hex[:6]}"
    app = await start_export(pool, dataclasses.replace(settings(), deliver=False))
    try:
        first = await upload(app, conversion(f"race-a-{ev[-6:]}", ev))
        real_existing = store.existing_orders
        blind = [True]

        async def existing_once_blind(*args: object) -> dict[str, int]:
            # The first look misses what a concurrent request has just committed.
            if blind[0]:
                blind[0] = False
                return {}
            return await real_existing(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "existing_orders", existing_once_blind)
        resp = await upload(app, conversion(f"race-a-{ev[-6:]}", ev), conversion(f"race-b-{ev[-6:]}", ev))
        assert [r.outcome for r in resp.results] == [pb.OUTCOME_DUPLICATE, pb.OUTCOME_ACCEPTED]
        assert resp.results[0].name == first.results[0].name
        assert (resp.accepted, resp.duplicates) == (1, 1)
        stored = await pool.fetch(
            "select order_id, value::text as value from export.conversions where event_name = $1 "
            "order by order_id",
            ev,
        )
        assert [(r["order_id"], r["value"]) for r in stored] == [
            (f"race-a-{ev[-6:]}", "42.5"),
            (f"race-b-{ev[-6:]}", "42.5"),
        ]
    finally:
        await app.stop()


async def test_copy_intake_stores_what_the_json_path_stores(pool: asyncpg.Pool) -> None:
    ev = f"Copy {uuid.uuid4().hex[:6]}"
    app = await start_export(pool, dataclasses.replace(settings(), deliver=False))
    try:
        c = conversion(f"copy-{ev[-6:]}", ev, value=0.1)
        c.event_time.FromDatetime(datetime(2026, 5, 1, 12, 30, 15, 123456, tzinfo=UTC))
        c.time_zone, c.gclid, c.store_id = "Europe/Paris", "gclid-copy", "store-7"
        c.first_name, c.country = "Mary", "FR"
        await upload(app, c)
        row = await pool.fetchrow(
            "select * from export.conversions where event_name = $1 and order_id = $2", ev, c.order_id
        )
        assert row is not None
        assert row["event_time"] == datetime(2026, 5, 1, 12, 30, 15, 123456, tzinfo=UTC)
        # The number sent, not the binary expansion of the float (0.1000000000000000055...).
        assert str(row["value"]) == "0.1" and row["currency"] == "EUR"
        assert (row["time_zone"], row["gclid"], row["store_id"]) == ("Europe/Paris", "gclid-copy", "store-7")
        assert set(row["meta_user_data"]) == {"em", "fn", "country"} and set(row["google_user"]) == {
            "hashed_email"
        }
        assert row["campaign"] is None and row["profile_id"] is None
        assert row["xid"] is not None
    finally:
        await app.stop()


async def test_a_replayed_dead_letter_shows_every_attempt_up_to_its_delivery(
    pool: asyncpg.Pool, receivers: Receivers
) -> None:
    ev = f"History {uuid.uuid4().hex[:6]}"
    app = await start_export(pool, settings())
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = pb_grpc.ExportServiceStub(channel)
            dest = await stub.CreateDestination(
                pb.CreateDestinationRequest(
                    destination=pb.Destination(
                        kind=pb.DESTINATION_KIND_META_CAPI,
                        base_url=receivers.base_url,
                        settings={"dataset_id": "1"},
                        credentials={"access_token": "wrong"},
                        event_names=[ev],
                        enabled=True,
                    )
                )
            )
            assert app.deliverer is not None
            await app.deliverer.reload_now()
            resp = await upload(app, conversion(f"hist-{ev[-6:]}", ev))
            name = resp.results[0].name

            async def dead() -> bool:
                st = await stub.GetDeliveryStatus(pb.GetDeliveryStatusRequest(names=[name]))
                return st.conversions[0].deliveries[0].state == pb.DELIVERY_STATE_DEAD

            await eventually(dead, timeout=5.0)
            await stub.UpdateDestination(
                pb.UpdateDestinationRequest(
                    destination=pb.Destination(name=dest.name, credentials={"access_token": "meta-token"}),
                    update_mask=field_mask_pb2.FieldMask(paths=["credentials"]),
                )
            )
            await app.deliverer.reload_now()
            assert (
                await stub.ReplayDeadLetters(pb.ReplayDeadLettersRequest(destination=dest.name))
            ).replayed == 1
            await eventually(lambda: _all_delivered(pool, ev, 1), timeout=5.0)
            st = await stub.GetDeliveryStatus(pb.GetDeliveryStatusRequest(names=[name]))
            (d,) = st.conversions[0].deliveries
            assert d.attempt_count == 2
            assert [(a.outcome, a.reason, a.http_status) for a in d.attempts] == [
                ("failed", "UNAUTHORIZED", 401),
                ("delivered", "", 200),
            ]
            # A delivery recorded before migration 0002 (its delivered attempt in export.attempts
            # as well) is not shown twice.
            await pool.execute(
                """insert into export.attempts (outbox_id, attempt, request_id, outcome)
                   select id, attempts, request_id, 'delivered' from export.outbox
                   where conversion_id = $1""",
                int(name.removeprefix("conversions/")),
            )
            st = await stub.GetDeliveryStatus(pb.GetDeliveryStatusRequest(names=[name]))
            assert [a.outcome for a in st.conversions[0].deliveries[0].attempts] == ["failed", "delivered"]
    finally:
        await app.stop()
