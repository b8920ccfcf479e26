"""IdentityService end to end: events written through IngestService.WriteEvents, stitched by the
identity consumer from the event log, read back over a real gRPC channel, on a real Postgres."""

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
from prometheus_client import REGISTRY

from services.identity.app import IdentityApp, IdentitySettings, start_identity
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source
from touchpoint.events.v1 import event_pb2 as ev
from touchpoint.identity.v1 import identity_service_pb2 as pb
from touchpoint.identity.v1 import identity_service_pb2_grpc as pb_grpc
from touchpoint.ingest.v1 import ingest_service_pb2 as ingest_pb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ingest_grpc
from touchpoint.platform.errors import details_of
from touchpoint.platform.testing import eventually

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
IDENTIFY, TRACK, PAGE, ALIAS = (
    ev.EVENT_TYPE_IDENTIFY,
    ev.EVENT_TYPE_TRACK,
    ev.EVENT_TYPE_PAGE,
    ev.EVENT_TYPE_ALIAS,
)


@pytest.fixture(scope="module")
async def ingest(pool: asyncpg.Pool) -> AsyncIterator[IngestApp]:
    app = await start_ingest(pool, IngestSettings.for_tests())
    yield app
    await app.stop()


@pytest.fixture(scope="module")
async def identity(pool: asyncpg.Pool, ingest: IngestApp) -> AsyncIterator[IdentityApp]:
    app = await start_identity(pool, IdentitySettings.for_tests(ingest.address))
    yield app
    await app.stop()


@pytest.fixture(scope="module")
async def ingest_stub(ingest: IngestApp) -> AsyncIterator[ingest_grpc.IngestServiceStub]:
    async with grpc.aio.insecure_channel(ingest.address) as channel:
        yield ingest_grpc.IngestServiceStub(channel)


@pytest.fixture(scope="module")
async def stub(identity: IdentityApp) -> AsyncIterator[pb_grpc.IdentityServiceStub]:
    async with grpc.aio.insecure_channel(identity.address) as channel:
        yield pb_grpc.IdentityServiceStub(channel)


@dataclass
class Space:
    """A fresh space with one source: each test stitches in its own."""

    id: str
    write_key: str
    source_id: str
    ingest: ingest_grpc.IngestServiceStub
    identity: IdentityApp

    async def write(self, *events: ev.Event, settle: bool = True) -> ingest_pb.WriteEventsResponse:
        resp = await self.ingest.WriteEvents(
            ingest_pb.WriteEventsRequest(write_key=self.write_key, events=events)
        )
        if settle:
            await self.identity.wait_caught_up()
        return resp


async def new_space(pool: asyncpg.Pool, ingest_stub: Any, identity: IdentityApp) -> Space:
    space = "sp_" + secrets.token_hex(4)
    key = "wk_" + secrets.token_hex(8)
    sid = await create_source(pool, write_key=key, name="web", space_id=space)
    return Space(space, key, sid, ingest_stub, identity)


@pytest.fixture
async def space(pool: asyncpg.Pool, ingest_stub: Any, identity: IdentityApp) -> Space:
    return await new_space(pool, ingest_stub, identity)


def event(
    kind: int,
    mid: str,
    minute: float,
    *,
    user: str = "",
    anon: str = "",
    previous: str = "",
    name: str = "",
    traits: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
) -> ev.Event:
    e = ev.Event(
        type=kind,  # type: ignore[arg-type]
        message_id=mid,
        user_id=user,
        anonymous_id=anon,
        previous_id=previous,
        event=name if kind == TRACK else "",
        name=name if kind == PAGE else "",
        traits_json=orjson.dumps(traits) if traits else b"",
        context_json=orjson.dumps(context) if context else b"",
    )
    e.timestamp.FromDatetime(T0 + timedelta(minutes=minute))
    return e


def ident(kind: str, value: str) -> ev.Identifier:
    return ev.Identifier(kind=kind, value=value)


async def resolve(stub: pb_grpc.IdentityServiceStub, space: Space, kind: str, value: str) -> str:
    resp = await stub.ResolveProfile(
        pb.ResolveProfileRequest(space_id=space.id, identifier=ident(kind, value))
    )
    return resp.profile


async def error_of(call: Any) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return details_of(info.value)


def idents_of(profile: pb.Profile) -> set[tuple[str, str]]:
    return {(i.identifier.kind, i.identifier.value) for i in profile.identifiers}


# ---------------------------------------------------------------------------------------------


async def test_cross_device_journey_is_one_profile(stub: pb_grpc.IdentityServiceStub, space: Space) -> None:
    laptop = {"userAgent": "Mozilla/5.0 (Macintosh)", "page": {"url": "https://toast.example/"}}
    landing = {
        "userAgent": "Mozilla/5.0 (Macintosh)",
        "page": {
            "url": "https://toast.example/land?utm_campaign=national-toastday&utm_source=adroll&utm_medium=paid-display"
        },
    }
    phone = {"userAgent": "Mozilla/5.0 (iPhone)", "device": {"type": "ios", "model": "iPhone15,2"}}
    await space.write(
        event(PAGE, "lap-1", 0, anon="anon-laptop", name="Landing", context=landing),
        event(PAGE, "ph-1", 1, anon="anon-phone", name="Home", context=phone),
        event(TRACK, "lap-2", 2, anon="anon-laptop", name="Product Viewed", context=laptop),
        event(TRACK, "ph-2", 3, anon="anon-phone", name="Product Viewed", context=phone),
    )
    # Before login: two anonymous profiles.
    assert await resolve(stub, space, "anonymous_id", "anon-laptop") != await resolve(
        stub, space, "anonymous_id", "anon-phone"
    )
    await space.write(
        event(
            IDENTIFY,
            "lap-3",
            4,
            user="u-42",
            anon="anon-laptop",
            traits={"email": "Toast@Example.com", "plan": "free"},
        ),
        event(TRACK, "ph-3", 5, user="u-42", anon="anon-phone", name="Signed In", context=phone),
        event(IDENTIFY, "ph-4", 6, user="u-42", anon="anon-phone", traits={"plan": "pro"}, context=phone),
    )
    name = await resolve(stub, space, "user_id", "u-42")
    assert name == await resolve(stub, space, "anonymous_id", "anon-laptop")
    assert name == await resolve(stub, space, "anonymous_id", "anon-phone")
    # Named after its oldest identifier: the laptop's anonymous id, seen first.
    assert name == await resolve(stub, space, "email", " toast@EXAMPLE.com ")

    profile = (await stub.GetProfile(pb.GetProfileRequest(name=name))).profile
    assert idents_of(profile) == {
        ("user_id", "u-42"),
        ("email", "toast@example.com"),
        ("anonymous_id", "anon-laptop"),
        ("anonymous_id", "anon-phone"),
    }
    assert profile.identifiers[0].identifier.kind == "user_id"  # priority order
    traits = {t.key: (orjson.loads(t.value_json), t.event.message_id) for t in profile.traits}
    assert traits == {"email": ("Toast@Example.com", "lap-3"), "plan": ("pro", "ph-4")}  # latest wins
    devices = {d.identifier.value: d for d in profile.devices}
    assert devices["anon-phone"].type == "ios" and devices["anon-phone"].model == "iPhone15,2"
    assert devices["anon-laptop"].user_agent == "Mozilla/5.0 (Macintosh)"
    assert profile.first_seen_time.ToDatetime(UTC) == T0
    assert profile.last_seen_time.ToDatetime(UTC) == T0 + timedelta(minutes=6)
    # Identifiers seen again in a later batch keep their first sighting and move their last.
    seen = {
        i.identifier.value: (i.first_seen_time.ToDatetime(UTC), i.last_seen_time.ToDatetime(UTC))
        for i in profile.identifiers
    }
    assert seen["anon-laptop"] == (T0, T0 + timedelta(minutes=4))
    assert seen["anon-phone"] == (T0 + timedelta(minutes=1), T0 + timedelta(minutes=6))
    assert seen["u-42"] == (T0 + timedelta(minutes=4), T0 + timedelta(minutes=6))

    # The whole journey, both devices, anonymous activity included, in time order, paged.
    got: list[ev.Event] = []
    token = ""
    while True:
        page = await stub.ListProfileEvents(
            pb.ListProfileEventsRequest(name=name, page_size=3, page_token=token)
        )
        got.extend(page.events)
        token = page.next_page_token
        if not token:
            break
    assert [e.message_id for e in got] == ["lap-1", "ph-1", "lap-2", "ph-2", "lap-3", "ph-3", "ph-4"]
    assert got[0].campaign.name == "national-toastday" and got[0].campaign.source == "adroll"
    window = pb.ListProfileEventsRequest(name=name)
    window.start_time.FromDatetime(T0 + timedelta(minutes=2))
    window.end_time.FromDatetime(T0 + timedelta(minutes=5))
    assert [e.message_id for e in (await stub.ListProfileEvents(window)).events] == ["lap-2", "ph-2", "lap-3"]

    # The merge of the phone's anonymous profile is logged with its event.
    merges = (await stub.ListProfileMerges(pb.ListProfileMergesRequest(name=name))).entries
    assert [(m.action, m.event.message_id) for m in merges] == [(pb.MERGE_ACTION_MERGED, "ph-3")]

    # The published views.
    assert (
        await space.identity.stitcher.pool.fetchval(
            "select count(*) from identity.identifies where space_id = $1 and user_id = 'u-42'", space.id
        )
        == 2
    )
    users = await space.identity.stitcher.pool.fetchrow(
        "select * from identity.users where space_id = $1", space.id
    )
    assert users["id"] == "u-42" and users["traits"]["plan"] == "pro"


async def test_shared_device_never_merges_two_users_and_split_undoes_a_bad_link(
    stub: pb_grpc.IdentityServiceStub, space: Space
) -> None:
    await space.write(
        event(IDENTIFY, "a-login", 0, user="alice", anon="tablet"),
        event(IDENTIFY, "b-login", 1, user="bob", anon="tablet"),
    )
    alice = await resolve(stub, space, "user_id", "alice")
    bob = await resolve(stub, space, "user_id", "bob")
    assert alice != bob
    assert await resolve(stub, space, "anonymous_id", "tablet") == alice
    refusals = (await stub.ListProfileMerges(pb.ListProfileMergesRequest(name=bob))).entries
    assert len(refusals) == 1
    r = refusals[0]
    assert r.action == pb.MERGE_ACTION_REFUSED and r.reason == "LIMIT_EXCEEDED" and r.limit_kind == "user_id"
    assert (r.event.source_id, r.event.message_id) == (space.source_id, "b-login")
    assert [(i.kind, i.value) for i in r.identifiers] == [("anonymous_id", "tablet")]
    assert r.profile == bob and list(r.other_profiles) == [alice]
    # The refusal shows in alice's log too.
    assert [
        e.id for e in (await stub.ListProfileMerges(pb.ListProfileMergesRequest(name=alice))).entries
    ] == [r.id]

    # A wrong alias links carol's anonymous browsing into dave's profile.
    await space.write(
        event(IDENTIFY, "d-login", 2, user="dave", anon="dave-laptop"),
        event(IDENTIFY, "c-anon", 3, anon="carol-phone", traits={"email": "carol@example.com"}),
        event(ALIAS, "bad-alias", 4, user="dave", previous="carol-phone"),
    )
    dave = await resolve(stub, space, "user_id", "dave")
    assert await resolve(stub, space, "email", "carol@example.com") == dave
    merge = (await stub.ListProfileMerges(pb.ListProfileMergesRequest(name=dave))).entries[-1]
    assert merge.action == pb.MERGE_ACTION_MERGED and merge.event.message_id == "bad-alias"

    split = await stub.SplitProfile(
        pb.SplitProfileRequest(name=dave, link=merge.event, reason="ticket 4711", request_id="split-1")
    )
    carol = await resolve(stub, space, "email", "carol@example.com")
    assert carol != dave == await resolve(stub, space, "anonymous_id", "dave-laptop")
    assert await resolve(stub, space, "anonymous_id", "carol-phone") == carol
    assert sorted(split.profiles) == sorted([dave, carol])
    assert split.entry.action == pb.MERGE_ACTION_SPLIT and split.entry.reason == "LINK_CUT"
    assert split.entry.note == "ticket 4711" and split.entry.event.message_id == "bad-alias"
    # The old merge is superseded (kept as history) and the cut stays cut.
    current = (await stub.ListProfileMerges(pb.ListProfileMergesRequest(name=dave))).entries
    assert [e.action for e in current] == [pb.MERGE_ACTION_SPLIT]
    history = await stub.ListProfileMerges(pb.ListProfileMergesRequest(name=dave, include_superseded=True))
    assert any(e.id == merge.id and e.HasField("superseded_time") for e in history.entries)
    await space.write(event(ALIAS, "bad-alias-again", 9, user="dave", previous="carol-phone"))
    assert await resolve(stub, space, "email", "carol@example.com") == carol
    # A retried split (same request id) has one effect.
    again = await stub.SplitProfile(pb.SplitProfileRequest(name=dave, link=merge.event, request_id="split-1"))
    assert again.entry.id == split.entry.id

    # Detaching an identifier: the tablet leaves alice's profile for good.
    detached = await stub.SplitProfile(
        pb.SplitProfileRequest(name=alice, identifier=ident("anonymous_id", "tablet"))
    )
    tablet = await resolve(stub, space, "anonymous_id", "tablet")
    assert tablet != alice and set(detached.profiles) == {alice, tablet}
    await space.write(event(TRACK, "a-again", 10, user="alice", anon="tablet", name="Opened"))
    assert await resolve(stub, space, "anonymous_id", "tablet") == tablet


async def test_junk_ids_never_link_and_values_are_normalised(
    stub: pb_grpc.IdentityServiceStub, space: Space
) -> None:
    junk_ctx = {"device": {"id": "unknown", "advertisingId": "00000000-0000-0000-0000-000000000000"}}
    await space.write(
        event(
            IDENTIFY,
            "j1",
            0,
            user="u-junk-1",
            traits={"email": "  Jane.Doe@Example.COM ", "phone": "(650) 253-0000"},
            context=junk_ctx,
        ),
        event(IDENTIFY, "j2", 1, user="u-junk-2", traits={"email": "null"}, context=junk_ctx),
        event(
            TRACK,
            "j3",
            2,
            user="u-junk-3",
            anon="undefined",
            name="Clicked",
            context={"device": {"id": "NaN"}},
        ),
    )
    p1 = await resolve(stub, space, "user_id", "u-junk-1")
    assert await resolve(stub, space, "email", "jane.doe@example.com") == p1
    assert await resolve(stub, space, "phone", "+16502530000") == p1
    assert await resolve(stub, space, "phone", "650.253.0000") == p1  # looked up normalised too
    assert await resolve(stub, space, "user_id", "u-junk-2") != p1
    for kind, value in (("device_id", "unknown"), ("advertising_id", "00000000-0000-0000-0000-000000000000")):
        err = await error_of(
            stub.ResolveProfile(pb.ResolveProfileRequest(space_id=space.id, identifier=ident(kind, value)))
        )
        assert err.code == grpc.StatusCode.NOT_FOUND
    profile = (await stub.GetProfile(pb.GetProfileRequest(name=p1))).profile
    assert idents_of(profile) == {
        ("user_id", "u-junk-1"),
        ("email", "jane.doe@example.com"),
        ("phone", "+16502530000"),
    }
    assert REGISTRY.get_sample_value(
        "touchpoint_identity_refused_merges_total", {"reason": "BLOCKED_VALUE", "kind": "device_id"}
    )


async def test_limits_and_priority_drop(stub: pb_grpc.IdentityServiceStub, space: Space) -> None:
    await space.write(
        *(event(TRACK, f"l{i}", i, user="u-many", anon=f"browser-{i}", name="Viewed") for i in range(6))
    )
    owner = await resolve(stub, space, "user_id", "u-many")
    holders = [await resolve(stub, space, "anonymous_id", f"browser-{i}") for i in range(6)]
    assert holders[:5] == [owner] * 5 and holders[5] != owner
    refusal = (await stub.ListProfileMerges(pb.ListProfileMergesRequest(name=owner))).entries[-1]
    assert refusal.limit_kind == "anonymous_id" and refusal.event.message_id == "l5"

    # Bob signs in on alice's browser with a new device id: the browser (lowest priority among
    # what conflicts) is dropped, the new device joins bob.
    await space.write(
        event(IDENTIFY, "pa", 10, user="alice", anon="family-pc"),
        event(IDENTIFY, "pb", 11, user="bob", anon="family-pc", context={"device": {"id": "bobs-pixel"}}),
    )
    bob = await resolve(stub, space, "user_id", "bob")
    assert await resolve(stub, space, "device_id", "bobs-pixel") == bob
    assert await resolve(stub, space, "anonymous_id", "family-pc") == await resolve(
        stub, space, "user_id", "alice"
    )


async def test_rules_are_configurable_per_space(
    pool: asyncpg.Pool, stub: pb_grpc.IdentityServiceStub, space: Space
) -> None:
    await pool.execute(
        """insert into identity.space_rules (space_id, limits, blocked_pattern)
           values ($1, '{"email": 1}', '^test-')""",
        space.id,
    )
    await space.write(
        event(IDENTIFY, "r1", 0, user="rule-user", traits={"email": "one@example.com"}),
        event(IDENTIFY, "r2", 1, user="rule-user", traits={"email": "two@example.com"}),
        event(IDENTIFY, "r3", 2, user="rule-user", anon="test-device"),
    )
    owner = await resolve(stub, space, "user_id", "rule-user")
    assert await resolve(stub, space, "email", "one@example.com") == owner
    assert await resolve(stub, space, "email", "two@example.com") != owner  # one email per profile here
    err = await error_of(
        stub.ResolveProfile(
            pb.ResolveProfileRequest(space_id=space.id, identifier=ident("anonymous_id", "test-device"))
        )
    )
    assert err.code == grpc.StatusCode.NOT_FOUND  # blocked by the space's pattern
    refusal = (await stub.ListProfileMerges(pb.ListProfileMergesRequest(name=owner))).entries[-1]
    assert refusal.limit_kind == "email" and refusal.event.message_id == "r2"


async def test_two_arrival_orders_give_the_same_partition(
    pool: asyncpg.Pool, stub: pb_grpc.IdentityServiceStub, ingest_stub: Any, identity: IdentityApp
) -> None:
    events = [
        event(IDENTIFY, "o1", 1, user="ann", anon="kiosk"),
        event(IDENTIFY, "o2", 2, user="ben", anon="kiosk", traits={"email": "ben@example.com"}),
        event(TRACK, "o3", 3, anon="kiosk", name="Tapped", context={"device": {"id": "kiosk-hw"}}),
        event(IDENTIFY, "o4", 4, user="ben", anon="ben-phone"),
        # The earliest event, arriving last in the second order: cem used the kiosk first.
        event(IDENTIFY, "o0", 0, user="cem", anon="kiosk"),
    ]
    in_order = await new_space(pool, ingest_stub, identity)
    await in_order.write(*sorted(events, key=lambda e: e.timestamp.ToDatetime()))
    shuffled = await new_space(pool, ingest_stub, identity)
    for e in (events[2], events[3], events[1], events[0], events[4]):
        await shuffled.write(e)  # each applied before the next arrives

    async def partition(space: Space) -> set[frozenset[tuple[str, str]]]:
        rows = await pool.fetch(
            "select kind, value, profile_id from identity.profile_identifiers where space_id = $1", space.id
        )
        groups: dict[str, set[tuple[str, str]]] = {}
        for r in rows:
            groups.setdefault(r["profile_id"], set()).add((r["kind"], r["value"]))
        return {frozenset(g) for g in groups.values()}

    expected = await partition(in_order)
    assert await partition(shuffled) == expected
    assert frozenset({("user_id", "cem"), ("anonymous_id", "kiosk"), ("device_id", "kiosk-hw")}) in expected
    # The merge logs agree too, once superseded decisions are left out.
    logs = []
    for s in (in_order, shuffled):
        rows = await pool.fetch(
            """select action, limit_kind, identifiers, message_id from identity.merge_log
               where space_id = $1 and superseded_time is null order by message_id""",
            s.id,
        )
        logs.append([tuple(r) for r in rows])
    assert logs[0] == logs[1] and logs[0]
    assert REGISTRY.get_sample_value("touchpoint_identity_recomputed_components_total")


async def test_delete_profile_removes_events_and_suppresses_identifiers(
    pool: asyncpg.Pool, stub: pb_grpc.IdentityServiceStub, space: Space
) -> None:
    await space.write(
        event(PAGE, "d1", 0, anon="del-anon", name="Home"),
        event(
            IDENTIFY,
            "d2",
            1,
            user="del-user",
            anon="del-anon",
            traits={"email": "gone@example.com", "phone": "+44 20 7946 0958"},
        ),
        event(TRACK, "d3", 2, user="del-user", name="Bought"),
        event(IDENTIFY, "keep", 3, user="someone-else", anon="other-anon"),
    )
    name = await resolve(stub, space, "user_id", "del-user")
    resp = await stub.DeleteProfile(pb.DeleteProfileRequest(name=name, reason="gdpr 17", request_id="del-1"))
    assert resp.events_deleted == 3 and resp.identifiers_deleted == 4

    left = await pool.fetch("select message_id from ingest.events where source_id = $1", space.source_id)
    assert [r["message_id"] for r in left] == ["keep"]
    err = await error_of(stub.GetProfile(pb.GetProfileRequest(name=name)))
    assert err.code == grpc.StatusCode.NOT_FOUND and err.reason == "PROFILE_DELETED"
    err = await error_of(
        stub.ResolveProfile(
            pb.ResolveProfileRequest(space_id=space.id, identifier=ident("user_id", "del-user"))
        )
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert (
        await pool.fetchval(
            "select count(*) from identity.identifiers where space_id = $1 and kind <> 'user_id' and value like 'del%'",
            space.id,
        )
        == 0
    )
    assert (
        await pool.fetchval("select reason from identity.deleted_profiles where profile_id = $1", name[9:])
        == "gdpr 17"
    )

    later = await space.write(
        event(TRACK, "d4", 5, user="del-user", name="Back"),
        event(PAGE, "d5", 5, anon="del-anon", name="Home"),
        event(IDENTIFY, "d6", 5, anon="fresh", traits={"email": "GONE@example.com"}),
    )
    assert [r.outcome for r in later.results] == [ingest_pb.OUTCOME_SUPPRESSED] * 3
    # A phone is not suppressed at ingest: identity refuses to stitch it and deletes the event.
    await space.write(event(IDENTIFY, "d7", 6, anon="fresh-2", traits={"phone": "+44 20-7946-0958", "x": 1}))

    async def d7_gone() -> bool:
        return not await pool.fetchval(
            "select count(*) from ingest.events where source_id = $1 and message_id = 'd7'", space.source_id
        )

    await eventually(d7_gone, message="the late event of a deleted phone was not deleted")
    err = await error_of(
        stub.ResolveProfile(
            pb.ResolveProfileRequest(space_id=space.id, identifier=ident("anonymous_id", "fresh-2"))
        )
    )
    assert err.code == grpc.StatusCode.NOT_FOUND
    # A retry succeeds and deletes nothing more.
    again = await stub.DeleteProfile(pb.DeleteProfileRequest(name=name, request_id="del-1"))
    assert again.events_deleted == 0 and again.delete_time == resp.delete_time


async def test_bad_requests_name_the_field(stub: pb_grpc.IdentityServiceStub, space: Space) -> None:
    cases: list[tuple[Any, str]] = [
        (stub.ResolveProfile(pb.ResolveProfileRequest(identifier=ident("user_id", "x"))), "space_id"),
        (stub.ResolveProfile(pb.ResolveProfileRequest(space_id=space.id)), "identifier"),
        (
            stub.ResolveProfile(pb.ResolveProfileRequest(space_id=space.id, identifier=ident("", "x"))),
            "identifier.kind",
        ),
        (
            stub.ResolveProfile(
                pb.ResolveProfileRequest(space_id=space.id, identifier=ident("User Id", "x"))
            ),
            "identifier.kind",
        ),
        (
            stub.ResolveProfile(
                pb.ResolveProfileRequest(space_id=space.id, identifier=ident("email", "nope"))
            ),
            "identifier.value",
        ),
        (
            stub.ResolveProfile(pb.ResolveProfileRequest(space_id=space.id, identifier=ident("phone", "12"))),
            "identifier.value",
        ),
        (stub.BatchResolveProfiles(pb.BatchResolveProfilesRequest(space_id=space.id)), "identifiers"),
        (
            stub.BatchResolveProfiles(
                pb.BatchResolveProfilesRequest(space_id=space.id, identifiers=[ident("user_id", "a")] * 1001)
            ),
            "identifiers",
        ),
        (
            stub.BatchResolveProfiles(
                pb.BatchResolveProfilesRequest(
                    space_id=space.id, identifiers=[ident("user_id", "a"), ident("email", "")]
                )
            ),
            "identifiers[1].value",
        ),
        (stub.GetProfile(pb.GetProfileRequest(name="")), "name"),
        (stub.GetProfile(pb.GetProfileRequest(name="users/p0123")), "name"),
        (stub.ListProfileEvents(pb.ListProfileEventsRequest(name="profiles/x")), "name"),
        (
            stub.ListProfileEvents(pb.ListProfileEventsRequest(name="profiles/p" + "0" * 20, page_size=-1)),
            "page_size",
        ),
        (
            stub.ListProfileEvents(
                pb.ListProfileEventsRequest(name="profiles/p" + "0" * 20, page_token="zzz")
            ),
            "page_token",
        ),
        (
            stub.ListProfileMerges(
                pb.ListProfileMergesRequest(name="profiles/p" + "0" * 20, page_token="e30")
            ),
            "page_token",
        ),
        (stub.SplitProfile(pb.SplitProfileRequest(name="profiles/p" + "0" * 20)), "identifier"),
        (
            stub.SplitProfile(
                pb.SplitProfileRequest(name="profiles/p" + "0" * 20, link=ev.EventRef(source_id="s"))
            ),
            "link.message_id",
        ),
        (stub.DeleteProfile(pb.DeleteProfileRequest(name="p" + "0" * 20)), "name"),
        (
            stub.DeleteProfile(pb.DeleteProfileRequest(name="profiles/p" + "0" * 20, reason="x" * 1001)),
            "reason",
        ),
    ]
    window = pb.ListProfileEventsRequest(name="profiles/p" + "0" * 20)
    window.start_time.FromDatetime(T0)
    window.end_time.FromDatetime(T0 - timedelta(days=1))
    cases.append((stub.ListProfileEvents(window), "end_time"))
    for call, field in cases:
        err = await error_of(call)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in [f for f, _ in err.violations], (field, err.violations)

    unknown = "profiles/p" + "0" * 20
    for call in (
        stub.GetProfile(pb.GetProfileRequest(name=unknown)),
        stub.ListProfileEvents(pb.ListProfileEventsRequest(name=unknown)),
        stub.ListProfileMerges(pb.ListProfileMergesRequest(name=unknown)),
        stub.SplitProfile(pb.SplitProfileRequest(name=unknown, identifier=ident("user_id", "x"))),
        stub.DeleteProfile(pb.DeleteProfileRequest(name=unknown)),
        stub.ResolveProfile(
            pb.ResolveProfileRequest(space_id=space.id, identifier=ident("user_id", "never-seen"))
        ),
    ):
        err = await error_of(call)
        assert err.code == grpc.StatusCode.NOT_FOUND and err.reason

    # Batch resolution answers unknown identifiers with an empty profile, in request order.
    await space.write(event(IDENTIFY, "b1", 0, user="known", traits={"email": "k@example.com"}))
    batch = await stub.BatchResolveProfiles(
        pb.BatchResolveProfilesRequest(
            space_id=space.id,
            identifiers=[
                ident("user_id", "nobody"),
                ident("email", " K@EXAMPLE.COM"),
                ident("user_id", "known"),
            ],
        )
    )
    known = await resolve(stub, space, "user_id", "known")
    assert [(r.identifier.value, r.profile) for r in batch.results] == [
        ("nobody", ""),
        ("k@example.com", known),
        ("known", known),
    ]
    # Splitting needs an identifier of that profile.
    err = await error_of(
        stub.SplitProfile(pb.SplitProfileRequest(name=known, identifier=ident("user_id", "nobody")))
    )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.violations[0][0] == "identifier"


async def test_metrics_report_profiles(identity: IdentityApp, space: Space) -> None:
    await space.write(event(IDENTIFY, "m1", 0, user="metric-user", anon="metric-anon"))

    def reported() -> bool:
        profiles = REGISTRY.get_sample_value("touchpoint_identity_profiles") or 0
        two = REGISTRY.get_sample_value("touchpoint_identity_profile_identifiers_bucket", {"le": "2.0"})
        return profiles > 0 and bool(two)

    await eventually(reported, message="identity metrics were not refreshed")
    applied = REGISTRY.get_sample_value(
        "touchpoint_eventlog_consumer_applied_total", {"consumer": "identity"}
    )
    assert applied and applied > 0
    assert REGISTRY.get_sample_value("touchpoint_identity_merges_total") is not None


async def test_api_only_replicas_make_no_maintenance_scans(
    pool: asyncpg.Pool, ingest: IngestApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    # From the environment: maintenance (the profile metrics' scan, deletion retries) follows
    # TOUCHPOINT_IDENTITY_CONSUME unless set on its own.
    for consume, maintenance, expected in (
        (None, None, (True, True)),
        ("false", None, (False, False)),
        ("false", "true", (False, True)),
        ("true", "false", (True, False)),
    ):
        for name, value in (
            ("TOUCHPOINT_IDENTITY_CONSUME", consume),
            ("TOUCHPOINT_IDENTITY_MAINTENANCE", maintenance),
        ):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        got = IdentitySettings.from_env()
        assert (got.consume, got.maintenance) == expected, (consume, maintenance)
    # An API-only replica runs no background task at all.
    api = await start_identity(
        pool, IdentitySettings.for_tests(ingest.address, consume=False, maintenance=False)
    )
    try:
        assert api.tasks == []
    finally:
        await api.stop(1)
