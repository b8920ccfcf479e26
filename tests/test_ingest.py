"""IngestService against a real Postgres and a real gRPC channel."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source, set_source_enabled
from touchpoint.events.v1 import event_pb2 as ev
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as pb_grpc
from touchpoint.platform.errors import details_of

TRACK = ev.EVENT_TYPE_TRACK
IDENTIFY = ev.EVENT_TYPE_IDENTIFY


@pytest.fixture(scope="module")
async def ingest(pool: asyncpg.Pool) -> AsyncIterator[IngestApp]:
    app = await start_ingest(pool, IngestSettings.for_tests())
    yield app
    await app.stop()


@pytest.fixture(scope="module")
async def stub(ingest: IngestApp) -> AsyncIterator[pb_grpc.IngestServiceStub]:
    async with grpc.aio.insecure_channel(ingest.address) as channel:
        yield pb_grpc.IngestServiceStub(channel)


@pytest.fixture
async def source(pool: asyncpg.Pool) -> tuple[str, str]:
    """A fresh source: (write_key, source_id)."""
    key = "wk_" + secrets.token_hex(8)
    return key, await create_source(pool, write_key=key, name="test")


async def stored(pool: asyncpg.Pool, source_id: str) -> list[asyncpg.Record]:
    return await pool.fetch("select * from ingest.events where source_id = $1 order by seq", source_id)


def track(mid: str = "", **kw: object) -> ev.Event:
    base: dict[str, object] = {"type": TRACK, "event": "Order Completed", "user_id": "u1", "message_id": mid}
    base.update(kw)
    return ev.Event(**base)  # type: ignore[arg-type]


async def test_accepts_and_stores_with_normalised_campaign(stub, pool, source) -> None:
    key, sid = source
    ctx = (
        b'{"page":{"url":"https://shop.example/land?utm_campaign=national-toastday&utm_source=facebook'
        b'&utm_medium=paid-social&utm_content=carousel&utm_term=toast&utm_audience=bakers&fbclid=FB1&gclid=G1"},'
        b'"campaign":{"source":"fb-explicit"}}'
    )
    resp = await stub.WriteEvents(
        pb.WriteEventsRequest(
            write_key=key,
            client_ip="203.0.113.9",
            events=[track("m1", context_json=ctx, properties_json=b'{"revenue":12.5}')],
        )
    )
    assert (resp.accepted, resp.duplicates, resp.rejected) == (1, 0, 0)
    assert resp.results[0].outcome == pb.OUTCOME_ACCEPTED and resp.results[0].message_id == "m1"
    rows = await stored(pool, sid)
    assert len(rows) == 1
    row = rows[0]
    assert row["campaign"] == {
        "name": "national-toastday",
        "source": "fb-explicit",  # explicit context.campaign wins
        "medium": "paid-social",
        "content": "carousel",
        "term": "toast",
        "audience": "bakers",  # any other utm_x kept as x
    }
    assert {c["kind"]: (c["network"], c["value"]) for c in row["click_ids"]} == {
        "fbclid": ("meta", "FB1"),
        "gclid": ("google", "G1"),
    }
    assert row["context"]["ip"] == "203.0.113.9"
    assert row["properties"] == {"revenue": 12.5}
    assert row["type"] == "track" and row["user_id"] == "u1"


async def test_client_ip_does_not_override_context_ip(stub, pool, source) -> None:
    key, sid = source
    await stub.WriteEvents(
        pb.WriteEventsRequest(
            write_key=key, client_ip="1.1.1.1", events=[track("m1", context_json=b'{"ip":"9.9.9.9"}')]
        )
    )
    assert (await stored(pool, sid))[0]["context"]["ip"] == "9.9.9.9"


async def test_message_id_assigned_when_missing(stub, pool, source) -> None:
    key, sid = source
    resp = await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[track(""), track("")]))
    assert resp.accepted == 2
    ids = [r.message_id for r in resp.results]
    assert all(ids) and ids[0] != ids[1] and all(len(i) <= 100 for i in ids)
    assert sorted(r["message_id"] for r in await stored(pool, sid)) == sorted(ids)


async def test_duplicates_answer_success_and_are_stored_once(stub, pool, source) -> None:
    key, sid = source
    first = await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[track("d1"), track("d1")]))
    assert [r.outcome for r in first.results] == [pb.OUTCOME_ACCEPTED, pb.OUTCOME_DUPLICATE]
    again = await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[track("d1")]))
    assert again.results[0].outcome == pb.OUTCOME_DUPLICATE and again.duplicates == 1
    assert len(await stored(pool, sid)) == 1


async def test_concurrent_replicas_store_a_message_once(pool, source) -> None:
    """Two ingest servers (replicas) receive the same messages at the same moment."""
    key, sid = source
    a = await start_ingest(pool, IngestSettings.for_tests())
    b = await start_ingest(pool, IngestSettings.for_tests())
    try:
        async with grpc.aio.insecure_channel(a.address) as ca, grpc.aio.insecure_channel(b.address) as cb:
            sa, sb = pb_grpc.IngestServiceStub(ca), pb_grpc.IngestServiceStub(cb)
            batch = [track(f"r{i}") for i in range(200)]
            calls = [s.WriteEvents(pb.WriteEventsRequest(write_key=key, events=batch)) for s in (sa, sb) * 3]
            answers = await asyncio.gather(*calls)
        assert sum(r.accepted for r in answers) == 200
        assert sum(r.duplicates for r in answers) == 200 * 5
    finally:
        await a.stop()
        await b.stop()
    rows = await stored(pool, sid)
    assert len(rows) == 200 and len({r["message_id"] for r in rows}) == 200


async def test_good_messages_stored_when_others_rejected(stub, pool, source) -> None:
    key, sid = source
    resp = await stub.WriteEvents(
        pb.WriteEventsRequest(
            write_key=key,
            events=[
                track("ok1"),
                ev.Event(type=TRACK, event="x", message_id="noid"),  # no userId / anonymousId
                ev.Event(type=TRACK, user_id="u1", message_id="noevent"),  # track without event
                track("ok2", anonymous_id="a1", user_id=""),
            ],
        )
    )
    assert [r.outcome for r in resp.results] == [
        pb.OUTCOME_ACCEPTED,
        pb.OUTCOME_REJECTED,
        pb.OUTCOME_REJECTED,
        pb.OUTCOME_ACCEPTED,
    ]
    assert [(v.field, v.reason) for v in resp.results[1].violations] == [("userId", "REQUIRED")]
    assert [(v.field, v.reason) for v in resp.results[2].violations] == [("event", "REQUIRED")]
    assert sorted(r["message_id"] for r in await stored(pool, sid)) == ["ok1", "ok2"]


@pytest.mark.parametrize(
    ("event", "field", "reason"),
    [
        (ev.Event(type=TRACK, event="e", user_id="undefined"), "userId", "JUNK_ID"),
        (ev.Event(type=TRACK, event="e", anonymous_id="NULL"), "anonymousId", "JUNK_ID"),
        (ev.Event(type=TRACK, event="e", user_id="[object Object]"), "userId", "JUNK_ID"),
        (ev.Event(type=TRACK, event="   ", user_id="u1"), "event", "REQUIRED"),
        (ev.Event(type=ev.EVENT_TYPE_ALIAS, user_id="u1"), "previousId", "REQUIRED"),
        (ev.Event(type=ev.EVENT_TYPE_ALIAS, previous_id="a1", anonymous_id="a1"), "userId", "REQUIRED"),
        (ev.Event(type=ev.EVENT_TYPE_ALIAS, previous_id="guest", user_id="u1"), "previousId", "JUNK_ID"),
        (ev.Event(type=ev.EVENT_TYPE_GROUP, user_id="u1"), "groupId", "REQUIRED"),
        (ev.Event(type=ev.EVENT_TYPE_UNSPECIFIED, user_id="u1"), "type", "INVALID_TYPE"),
        (ev.Event(type=TRACK, event="e", user_id="u1", message_id="m" * 101), "messageId", "TOO_LONG"),
        (
            ev.Event(type=TRACK, event="e", user_id="u1", properties_json=b"[1,2]"),
            "properties",
            "NOT_AN_OBJECT",
        ),
        (ev.Event(type=TRACK, event="e", user_id="u1", context_json=b"{nope"), "context", "INVALID_JSON"),
        (ev.Event(type=IDENTIFY, user_id="u1", traits_json=b'{"a":"\\u0000"}'), "traits", "NUL_CHARACTER"),
        (ev.Event(type=TRACK, event="e", user_id="u\x001"), "userId", "NUL_CHARACTER"),
        (
            ev.Event(type=TRACK, event="e", user_id="u1", properties_json=b'{"x":"' + b"a" * 33_000 + b'"}'),
            "message",
            "TOO_LARGE",
        ),
    ],
)
async def test_bad_message_rejected_with_field_and_reason(stub, pool, source, event, field, reason) -> None:
    key, sid = source
    resp = await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[event]))
    assert resp.rejected == 1 and resp.results[0].outcome == pb.OUTCOME_REJECTED
    got = [(v.field, v.reason) for v in resp.results[0].violations]
    assert (field, reason) in got, got
    assert all(v.description for v in resp.results[0].violations)
    assert await stored(pool, sid) == []


async def test_junk_user_id_with_real_anonymous_id_is_stored_without_it(stub, pool, source) -> None:
    key, sid = source
    resp = await stub.WriteEvents(
        pb.WriteEventsRequest(write_key=key, events=[track("j1", user_id="undefined", anonymous_id="anon-1")])
    )
    assert resp.accepted == 1
    row = (await stored(pool, sid))[0]
    assert row["user_id"] is None and row["anonymous_id"] == "anon-1"


async def test_unknown_and_disabled_write_keys_are_unauthenticated(stub, pool, source) -> None:
    key, sid = source
    for bad_key in ("", "wk_unknown_" + secrets.token_hex(4)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.WriteEvents(pb.WriteEventsRequest(write_key=bad_key, events=[track("x")]))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert details_of(err.value).reason in ("NO_WRITE_KEY", "UNKNOWN_WRITE_KEY")
    await set_source_enabled(pool, sid, False)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[track("x")]))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert details_of(err.value).reason == "SOURCE_DISABLED"
    assert await stored(pool, sid) == []


async def test_batch_limits_refuse_the_whole_request(stub, pool, source) -> None:
    key, sid = source
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.WriteEvents(
            pb.WriteEventsRequest(write_key=key, events=[track(f"b{i}") for i in range(2501)])
        )
    d = details_of(err.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "BATCH_TOO_LARGE"
    assert d.violations and d.violations[0][0] == "batch"
    big = [track(f"s{i}", properties_json=b'{"x":"' + b"a" * 20_000 + b'"}') for i in range(30)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=big))
    assert details_of(err.value).reason == "REQUEST_TOO_LARGE"
    assert await stored(pool, sid) == []


async def test_timestamp_corrected_for_clock_skew(stub, pool, source) -> None:
    key, sid = source
    e = track("t1")
    # The device clock is one hour ahead: it called at 10:00 and sent at 10:00:05 device time.
    e.original_timestamp.FromJsonString("2026-01-01T10:00:00Z")
    e.sent_at.FromJsonString("2026-01-01T10:00:05Z")
    await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[e]))
    row = (await stored(pool, sid))[0]
    assert (row["received_at"] - row["timestamp"]).total_seconds() == pytest.approx(5.0, abs=1e-6)
    assert row["original_timestamp"].isoformat() == "2026-01-01T10:00:00+00:00"
    only = track("t2")
    only.original_timestamp.FromJsonString("2025-06-01T00:00:00Z")
    await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[only]))
    row2 = (await stored(pool, sid))[1]
    assert row2["timestamp"].isoformat() == "2025-06-01T00:00:00+00:00"


async def test_get_events_round_trips_the_envelope(stub, source) -> None:
    key, sid = source
    e = track(
        "g1", anonymous_id="a1", context_json=b'{"page":{"url":"https://x/?utm_source=s"},"userAgent":"UA"}'
    )
    await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[e]))
    got = await stub.GetEvents(pb.GetEventsRequest(source_id=sid, message_ids=["g1", "missing"]))
    assert len(got.events) == 1
    g = got.events[0]
    assert (g.type, g.event, g.user_id, g.anonymous_id) == (TRACK, "Order Completed", "u1", "a1")
    assert g.campaign.source == "s" and g.user_agent == "UA" and g.source_id == sid
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetEvents(pb.GetEventsRequest(source_id="", message_ids=["x"]))
    assert details_of(err.value).violations[0][0] == "source_id"


async def test_suppressed_identifiers_are_dropped_and_events_deleted(stub, pool) -> None:
    space = "space_" + secrets.token_hex(4)
    key = "wk_" + secrets.token_hex(8)
    sid = await create_source(pool, write_key=key, name="s", space_id=space)
    await stub.WriteEvents(
        pb.WriteEventsRequest(
            write_key=key, events=[track("k1", user_id="gone"), track("k2", user_id="stay")]
        )
    )
    sup = await stub.SuppressIdentifiers(
        pb.SuppressIdentifiersRequest(
            space_id=space,
            identifiers=[
                ev.Identifier(kind="user_id", value="gone"),
                ev.Identifier(kind="email", value=" Gone@X.com "),
            ],
            reason="test",
        )
    )
    assert sup.suppressed == 2
    deleted = await stub.DeleteEvents(
        pb.DeleteEventsRequest(events=[ev.EventRef(source_id=sid, message_id="k1")])
    )
    assert deleted.deleted == 1
    resp = await stub.WriteEvents(
        pb.WriteEventsRequest(
            write_key=key,
            events=[
                track("k3", user_id="gone"),
                ev.Event(
                    type=IDENTIFY, anonymous_id="a9", message_id="k4", traits_json=b'{"email":"gone@x.com"}'
                ),
                track("k5", user_id="stay"),
            ],
        )
    )
    assert [r.outcome for r in resp.results] == [
        pb.OUTCOME_SUPPRESSED,
        pb.OUTCOME_SUPPRESSED,
        pb.OUTCOME_ACCEPTED,
    ]
    assert resp.suppressed == 2
    assert sorted(r["message_id"] for r in await stored(pool, sid)) == ["k2", "k5"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.SuppressIdentifiers(
            pb.SuppressIdentifiersRequest(identifiers=[ev.Identifier(kind="user_id")])
        )
    fields = [f for f, _ in details_of(err.value).violations]
    assert fields == ["space_id", "identifiers[0]"]


async def test_database_down_answers_unavailable_and_stores_nothing(pool, source) -> None:
    """A pool pointed at a closed port: the call fails UNAVAILABLE, never OK."""
    from touchpoint.platform.db import create_pool

    key, _ = source
    app = await start_ingest(pool, IngestSettings.for_tests())
    dead = await create_pool("postgresql://postgres@127.0.0.1:1/none", min_size=0, max_size=2)
    app.writer.pool = dead  # the writer's database goes away
    try:
        async with grpc.aio.insecure_channel(app.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.IngestServiceStub(ch).WriteEvents(
                    pb.WriteEventsRequest(write_key=key, events=[track("z")])
                )
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details_of(err.value).reason == "DATABASE_UNAVAILABLE"
    finally:
        app.writer.pool = pool
        await app.stop()
        await dead.close()


async def test_log_keeps_the_batch_order(stub, pool, source) -> None:
    """An identify followed by a track in one batch is read back in that order."""
    key, sid = source
    ids = ["zz-identify", "aa-track", "mm-page"]  # sorted order differs from batch order
    events = [
        ev.Event(type=IDENTIFY, user_id="u1", message_id=ids[0]),
        track(ids[1]),
        ev.Event(type=ev.EVENT_TYPE_PAGE, user_id="u1", message_id=ids[2]),
    ]
    await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=events))
    rows = await pool.fetch(
        "select message_id from ingest.event_log where source_id = $1 order by xid, seq", sid
    )
    assert [r["message_id"] for r in rows] == ids


async def test_nul_in_message_id_or_write_key_and_extreme_clocks_are_clean_answers(
    stub, pool, source
) -> None:
    key, sid = source
    resp = await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[track("m\x00x")]))
    assert [(v.field, v.reason) for v in resp.results[0].violations] == [("messageId", "NUL_CHARACTER")]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.WriteEvents(pb.WriteEventsRequest(write_key="k\x00", events=[track("x")]))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    e = track("clock")
    e.original_timestamp.FromJsonString("0001-01-01T00:00:00Z")
    e.sent_at.FromJsonString("9999-12-31T23:59:59Z")
    resp = await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[e]))
    assert resp.accepted == 1
    assert [r["message_id"] for r in await stored(pool, sid)] == ["clock"]


async def test_rows_whose_caller_gave_up_are_not_written(pool, source) -> None:
    """Under overload a call can time out while its rows wait; they must not be committed later
    (the client retries them), and the caller gets DEADLINE_EXCEEDED, never success."""
    from datetime import UTC, datetime

    from services.ingest.domain import Prepared, Source, prepare
    from services.ingest.writer import BatchWriter
    from touchpoint.platform.errors import ServiceError
    from touchpoint.platform.testing import eventually

    _, sid = source
    writer = BatchWriter(pool, concurrency=1)
    writer.start()
    src = Source(sid, "default", True)
    rows = []
    for mid in ("late1", "late2"):
        p = prepare(track(mid), source=src, received_at=datetime.now(UTC), client_ip="")
        assert isinstance(p, Prepared)
        rows.append(p.row)
    await writer._slots.acquire()  # the only flush slot is busy
    try:
        pending = asyncio.ensure_future(writer.write(rows, timeout=0.05))
        loop = asyncio.get_running_loop()
        start = loop.time()
        await eventually(lambda: loop.time() - start > 0.1)
    finally:
        writer._slots.release()
    with pytest.raises(ServiceError) as err:
        await pending
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await writer.stop()
    assert await stored(pool, sid) == []


# -- the lean form (messages_json) and compact answers ---------------------------------------


def js(**fields: object) -> bytes:
    """One message of the lean form: a Segment JSON object."""
    import orjson

    return orjson.dumps(fields)


async def test_json_messages_are_normalised_and_stored_like_events(stub, pool, source) -> None:
    key, sid = source
    context = {
        "page": {
            "url": "https://shop.example/land?utm_campaign=toastday&utm_source=facebook&utm_x=y&fbclid=FB1",
            "referrer": "https://www.facebook.com/",
        },
        "campaign": {"medium": "paid-social"},
    }
    resp = await stub.WriteEvents(
        pb.WriteEventsRequest(
            write_key=key,
            client_ip="198.51.100.7",
            messages_json=[
                js(type="track", messageId="j1", userId=42, event="Order Completed",
                   properties={"total": 12.5}, context=context,
                   timestamp="2026-01-01T10:00:00Z", sentAt="2026-01-01T10:00:05Z"),
                js(type="page", messageId="j2", anonymousId="a1", category="Docs", properties={"name": "Pricing"}),
            ],
        )
    )  # fmt: skip
    assert [r.outcome for r in resp.results] == [pb.OUTCOME_ACCEPTED, pb.OUTCOME_ACCEPTED]
    assert [r.message_id for r in resp.results] == ["j1", "j2"]
    rows = {r["message_id"]: r for r in await stored(pool, sid)}
    j1, j2 = rows["j1"], rows["j2"]
    assert (j1["type"], j1["user_id"], j1["event"], j1["properties"]) == (
        "track",
        "42",
        "Order Completed",
        {"total": 12.5},
    )
    assert j1["campaign"] == {"name": "toastday", "source": "facebook", "medium": "paid-social", "x": "y"}
    assert j1["context"]["campaign"] == j1["campaign"]
    assert j1["context"]["ip"] == "198.51.100.7"  # the device's IP when the client sent none
    assert j1["click_ids"] == [{"kind": "fbclid", "network": "meta", "value": "FB1"}]
    assert (j1["received_at"] - j1["timestamp"]).total_seconds() == pytest.approx(5.0, abs=1e-6)
    assert j1["original_timestamp"].isoformat() == "2026-01-01T10:00:00+00:00"
    assert (j2["type"], j2["name"], j2["properties"]) == (
        "page",
        "Pricing",
        {"name": "Pricing", "category": "Docs"},
    )


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (js(type="track", event="e", userId="undefined"), "userId", "JUNK_ID"),
        (js(type="track", event="e"), "userId", "REQUIRED"),
        (js(type="track", userId="u1"), "event", "REQUIRED"),
        (js(type="alias", userId="u1", previousId="guest"), "previousId", "JUNK_ID"),
        (js(type="group", userId="u1"), "groupId", "REQUIRED"),
        (js(type="launch", userId="u1"), "type", "INVALID_VALUE"),
        (js(userId="u1"), "type", "REQUIRED"),
        (js(type="track", event="e", userId=["u1"]), "userId", "INVALID_TYPE"),
        (js(type="track", event="e", userId="u1", properties=[1]), "properties", "INVALID_TYPE"),
        (js(type="track", event="e", userId="u1", timestamp="yesterday"), "timestamp", "INVALID_TIMESTAMP"),
        (js(type="track", event="e", userId="u1", messageId="m" * 101), "messageId", "TOO_LONG"),
        (js(type="track", event="e", userId="u\x001"), "userId", "NUL_CHARACTER"),
        (js(type="identify", userId="u1", traits={"a": "\x00"}), "traits", "NUL_CHARACTER"),
        (js(type="track", event="e", userId="u1", properties={"x": "a" * 33_000}), "message", "TOO_LARGE"),
        (b"{nope", "message", "INVALID_JSON"),
        (b"[1]", "message", "INVALID_TYPE"),
    ],
)
async def test_bad_json_message_rejected_with_field_and_reason(
    stub, pool, source, data, field, reason
) -> None:
    key, sid = source
    resp = await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, messages_json=[data]))
    assert resp.rejected == 1 and resp.results[0].outcome == pb.OUTCOME_REJECTED
    got = [(v.field, v.reason) for v in resp.results[0].violations]
    assert (field, reason) in got, got
    assert all(v.description for v in resp.results[0].violations)
    assert await stored(pool, sid) == []


async def test_compact_answers_list_only_the_exceptions_with_their_index(stub, pool, source) -> None:
    """omit_accepted_results: events first, then messages_json, indexed over both; accepted
    messages are only counted. A message stored before is a duplicate, the others of the same
    batch are still stored (the dedup insert falls back from COPY to ON CONFLICT)."""
    key, sid = source
    await stub.WriteEvents(pb.WriteEventsRequest(write_key=key, events=[track("old")]))
    resp = await stub.WriteEvents(
        pb.WriteEventsRequest(
            write_key=key,
            omit_accepted_results=True,
            events=[track("e0"), track("old"), ev.Event(type=TRACK, event="x", message_id="e2")],
            messages_json=[
                js(type="track", messageId="j3", userId="u1", event="e"),
                js(type="track", messageId="j4", event="e"),
                js(type="track", messageId="e0", userId="u1", event="e"),
            ],
        )
    )
    assert (resp.accepted, resp.duplicates, resp.rejected, resp.suppressed) == (2, 2, 2, 0)
    assert [(r.index, r.message_id, r.outcome) for r in resp.results] == [
        (1, "old", pb.OUTCOME_DUPLICATE),
        (2, "e2", pb.OUTCOME_REJECTED),
        (4, "j4", pb.OUTCOME_REJECTED),
        (5, "e0", pb.OUTCOME_DUPLICATE),  # repeated within the request
    ]
    assert [(v.field, v.reason) for v in resp.results[1].violations] == [("userId", "REQUIRED")]
    assert sorted(r["message_id"] for r in await stored(pool, sid)) == ["e0", "j3", "old"]
    everything = await stub.WriteEvents(
        pb.WriteEventsRequest(write_key=key, omit_accepted_results=True, messages_json=[js(type="track", messageId="j9", userId="u", event="e")])
    )  # fmt: skip
    assert (everything.accepted, list(everything.results)) == (1, [])


async def test_json_messages_count_against_the_batch_limits(stub, pool, source) -> None:
    key, sid = source
    one = js(type="track", userId="u1", event="e")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.WriteEvents(
            pb.WriteEventsRequest(write_key=key, events=[track("x")], messages_json=[one] * 2500)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(err.value).reason == "BATCH_TOO_LARGE"
    assert await stored(pool, sid) == []


async def test_json_messages_with_suppressed_identifiers_are_dropped(stub, pool) -> None:
    space = "space_" + secrets.token_hex(4)
    key = "wk_" + secrets.token_hex(8)
    sid = await create_source(pool, write_key=key, name="s", space_id=space)
    await stub.SuppressIdentifiers(
        pb.SuppressIdentifiersRequest(space_id=space, identifiers=[ev.Identifier(kind="email", value="gone@x.com")])
    )  # fmt: skip
    resp = await stub.WriteEvents(
        pb.WriteEventsRequest(
            write_key=key,
            omit_accepted_results=True,
            messages_json=[
                js(type="identify", messageId="s1", anonymousId="a1", traits={"email": " Gone@X.com"}),
                js(type="track", messageId="s2", userId="u1", event="e", context={"traits": {"email": "gone@x.com"}}),
                js(type="track", messageId="s3", userId="u1", event="e"),
            ],
        )
    )  # fmt: skip
    assert [(r.index, r.outcome) for r in resp.results] == [
        (0, pb.OUTCOME_SUPPRESSED),
        (1, pb.OUTCOME_SUPPRESSED),
    ]
    assert [r["message_id"] for r in await stored(pool, sid)] == ["s3"]


async def test_an_idle_writer_gives_its_connections_back_unchanged(ingest, pool, source) -> None:
    """The writer keeps a connection with its own codecs between commits, and closes it once
    idle: other users of the pool never get it, and an idle writer holds none of the pool."""
    from datetime import UTC, datetime

    from services.ingest.domain import Prepared, Source, prepare
    from services.ingest.writer import BatchWriter
    from touchpoint.platform.testing import eventually

    _, sid = source
    writer = BatchWriter(pool)
    writer.start()
    try:
        p = prepare(
            track("idle1"), source=Source(sid, "default", True), received_at=datetime.now(UTC), client_ip=""
        )
        assert isinstance(p, Prepared)
        assert await writer.write([p.row]) == set()
        assert len(writer._idle) == 1
        await eventually(lambda: not writer._idle)
    finally:
        await writer.stop()
    assert [r["message_id"] for r in await stored(pool, sid)] == ["idle1"]
    for _ in range(10):  # whichever connection the pool hands out keeps the shared codecs
        assert await pool.fetchval("""select '{"a": 1}'::jsonb""") == {"a": 1}
