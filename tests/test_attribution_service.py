"""AttributionService end to end: events written through the real IngestService, consumed from the
event log, reports over a real gRPC channel. The National Toast Day scenario is checked against
credit computed by hand under every model."""

from __future__ import annotations

import csv
import io
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import asyncpg
import grpc
import orjson
import pytest

from services.attribution.app import AttributionApp, AttributionSettings, start_attribution
from services.ingest.app import IngestApp, IngestSettings, start_ingest
from services.ingest.store import create_source
from tests.test_attribution_models import reference_markov
from touchpoint.attribution.v1 import attribution_service_pb2 as pb
from touchpoint.attribution.v1 import attribution_service_pb2_grpc as pb_grpc
from touchpoint.events.v1 import event_pb2 as ev
from touchpoint.ingest.v1 import ingest_service_pb2 as ipb
from touchpoint.ingest.v1 import ingest_service_pb2_grpc as ipb_grpc
from touchpoint.platform.errors import details_of
from touchpoint.platform.testing import eventually

D0 = datetime(2026, 5, 1, tzinfo=UTC)
H = timedelta(hours=1)
SITE = "https://toast.example/national-toast-day"
CAMPAIGN = "national-toastday"


@pytest.fixture(scope="module")
async def ingest(pool: asyncpg.Pool) -> AsyncIterator[IngestApp]:
    app = await start_ingest(pool, IngestSettings.for_tests())
    yield app
    await app.stop()


@pytest.fixture(scope="module")
async def attribution(pool: asyncpg.Pool, ingest: IngestApp) -> AsyncIterator[AttributionApp]:
    app = await start_attribution(pool, AttributionSettings.for_tests())
    yield app
    await app.stop()


@pytest.fixture(scope="module")
async def istub(ingest: IngestApp) -> AsyncIterator[ipb_grpc.IngestServiceStub]:
    async with grpc.aio.insecure_channel(ingest.address) as channel:
        yield ipb_grpc.IngestServiceStub(channel)


@pytest.fixture(scope="module")
async def stub(attribution: AttributionApp) -> AsyncIterator[pb_grpc.AttributionServiceStub]:
    async with grpc.aio.insecure_channel(attribution.address) as channel:
        yield pb_grpc.AttributionServiceStub(channel)


def _event(kind: int, at: datetime, **kw: Any) -> ev.Event:
    e = ev.Event(type=kind, message_id=kw.pop("message_id", secrets.token_hex(8)))  # type: ignore[arg-type]
    for key in ("user_id", "anonymous_id", "event"):
        if key in kw:
            setattr(e, key, kw.pop(key))
    for key in ("properties", "context", "traits"):
        if key in kw:
            setattr(e, f"{key}_json", orjson.dumps(kw.pop(key)))
    assert not kw, kw
    e.original_timestamp.FromDatetime(at)
    return e


def page(at: datetime, url: str, referrer: str = "", **kw: Any) -> ev.Event:
    ctx: dict[str, Any] = {"page": {"url": url, **({"referrer": referrer} if referrer else {})}}
    return _event(ev.EVENT_TYPE_PAGE, at, context=ctx, **kw)


def utm(source: str, medium: str, content: str = "", campaign: str = CAMPAIGN, extra: str = "") -> str:
    url = f"{SITE}?utm_campaign={campaign}&utm_source={source}&utm_medium={medium}"
    return url + (f"&utm_content={content}" if content else "") + extra


def track(at: datetime, name: str, properties: dict[str, Any] | None = None, **kw: Any) -> ev.Event:
    return _event(ev.EVENT_TYPE_TRACK, at, event=name, properties=properties or {}, **kw)


def identify(at: datetime, **kw: Any) -> ev.Event:
    return _event(ev.EVENT_TYPE_IDENTIFY, at, **kw)


async def write(istub: ipb_grpc.IngestServiceStub, write_key: str, events: list[ev.Event]) -> None:
    resp = await istub.WriteEvents(ipb.WriteEventsRequest(write_key=write_key, events=events))
    assert resp.accepted == len(events), resp


def query(space: str = "default", **kw: Any) -> pb.ReportQuery:
    q = pb.ReportQuery(space_id=space, group_by=kw.pop("group_by", []), **kw)
    q.start_time.FromDatetime(D0 - timedelta(days=1))
    q.end_time.FromDatetime(D0 + timedelta(days=10))
    return q


SMC = [pb.DIMENSION_SOURCE, pb.DIMENSION_MEDIUM, pb.DIMENSION_CONTENT]
E = ("customer.io", "email", "(none)")
DTOP = ("adroll", "display", "banner-top")
DSIDE = ("adroll", "display", "sidebar")
F = ("facebook", "paid-social", "(none)")
N = ("toastnation", "news", "(none)")
T = ("twitter", "organic-social", "(none)")
DIRECT = ("(direct)", "(none)", "(none)")


def rows_by_smc(rows: Any) -> dict[tuple[str, str, str], Any]:
    return {(r.dimensions.source, r.dimensions.medium, r.dimensions.content): r for r in rows}


@pytest.fixture(scope="module")
async def toast_day(
    pool: asyncpg.Pool, istub: ipb_grpc.IngestServiceStub, attribution: AttributionApp
) -> str:
    """The National Toast Day campaign: five channels, two display placements, a purchase on a
    phone after clicks on a laptop, one in a store, one anonymous, one after direct, one journey
    that did not convert, and a duplicate order."""
    web = "wk_web_" + secrets.token_hex(4)
    server = "wk_srv_" + secrets.token_hex(4)
    await create_source(pool, write_key=web, name="web")
    await create_source(pool, write_key=server, name="customer.io + store")
    email_campaign = {"name": CAMPAIGN, "source": "customer.io", "medium": "email"}
    await write(
        istub,
        server,
        [
            # Alice opens the email (customer.io, through the pixel): a touch on her user id.
            track(D0 + 8 * H, "Email Opened", {"campaign": email_campaign}, user_id="alice"),
            # Bob buys in the store, two days after his online touches.
            track(
                D0 + 3 * 24 * H + 15 * H,
                "Order Completed",
                {"order_id": "o-2", "revenue": 100, "currency": "USD", "channel": "store"},
                user_id="bob",
            ),
        ],
    )
    await write(
        istub,
        web,
        [
            # Alice clicks the adroll banner on her laptop, then logs in there.
            page(D0 + 36 * H, utm("adroll", "display", "banner-top"), anonymous_id="a-laptop"),
            identify(D0 + 36 * H + timedelta(minutes=5), anonymous_id="a-laptop", user_id="alice"),
            # ... and buys on her phone.
            track(
                D0 + 2 * 24 * H + 19 * H,
                "Order Completed",
                {"order_id": "o-1", "revenue": 40},
                anonymous_id="a-phone",
                user_id="alice",
            ),
            # Bob: facebook ad (with fbclid), login, then the toastnation article.
            page(D0 + 10 * H, utm("facebook", "paid-social", extra="&fbclid=FB.1"), anonymous_id="b-laptop"),
            identify(D0 + 10 * H + timedelta(minutes=1), anonymous_id="b-laptop", user_id="bob"),
            page(D0 + 33 * H, utm("toastnation", "news"), anonymous_id="b-laptop"),
            # Carol, anonymous: twitter post, then the adroll sidebar, then she buys (sent twice).
            page(D0 + 32 * H, utm("twitter", "organic-social"), anonymous_id="c-1"),
            page(
                D0 + 32 * H + timedelta(minutes=30), utm("adroll", "display", "sidebar"), anonymous_id="c-1"
            ),
            page(D0 + 33 * H, SITE + "/cart", referrer=SITE, anonymous_id="c-1"),  # internal: no touch
            track(D0 + 33 * H, "Order Completed", {"order_id": "o-3", "revenue": 30}, anonymous_id="c-1"),
            track(
                D0 + 33 * H + timedelta(minutes=1),
                "Order Completed",
                {"order_id": "o-3", "revenue": 30},
                anonymous_id="c-1",
            ),
            # Dave: twitter then facebook, no purchase.
            page(D0 + 5 * H, utm("twitter", "organic-social"), anonymous_id="d-1"),
            page(D0 + 30 * H, utm("facebook", "paid-social"), anonymous_id="d-1"),
            # Erin: toastnation, then she comes back direct and buys.
            page(D0 + 20 * H, utm("toastnation", "news"), anonymous_id="e-1"),
            page(D0 + 44 * H, SITE, anonymous_id="e-1"),
            track(D0 + 45 * H, "Order Completed", {"order_id": "o-4", "total": "10.00"}, anonymous_id="e-1"),
        ],
    )

    async def all_in() -> bool:
        r = await attribution_report(pool, attribution, pb.MODEL_LAST_TOUCH)
        return r.totals.conversions == 4

    await eventually(all_in, timeout=20, message="the four conversions never showed in a report")
    return web


async def attribution_report(
    pool: asyncpg.Pool, app: AttributionApp, model: pb.Model.ValueType
) -> pb.GetCampaignReportResponse:
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        return await stub.GetCampaignReport(
            pb.GetCampaignReportRequest(query=query(group_by=SMC), model=model)
        )


def _time_decay_pair(gap: timedelta) -> tuple[float, float]:
    """Shares (older, newer) of two touches `gap` apart under a 7-day half-life."""
    ratio = 2 ** (gap / timedelta(days=7))
    return 1 / (1 + ratio), ratio / (1 + ratio)


def hand_credit() -> dict[Any, dict[tuple[str, str, str], float]]:
    half = {E: 0.5, DTOP: 0.5, F: 0.5, N: 1.0, T: 0.5, DSIDE: 0.5, DIRECT: 0.5}
    a_old, a_new = _time_decay_pair(28 * H)  # Alice: email D0 08:00, banner D1 12:00
    b_old, b_new = _time_decay_pair(23 * H)  # Bob: facebook D0 10:00, news D1 09:00
    c_old, c_new = _time_decay_pair(timedelta(minutes=30))  # Carol
    e_old, e_new = _time_decay_pair(24 * H)  # Erin: news D0 20:00, direct D1 20:00
    return {
        pb.MODEL_FIRST_TOUCH: {E: 1.0, F: 1.0, T: 1.0, N: 1.0},
        pb.MODEL_LAST_TOUCH: {DTOP: 1.0, N: 1.0, DSIDE: 1.0, DIRECT: 1.0},
        pb.MODEL_LAST_NON_DIRECT: {DTOP: 1.0, N: 2.0, DSIDE: 1.0},
        pb.MODEL_LINEAR: half,
        pb.MODEL_POSITION_BASED: half,  # two touches: 50/50
        pb.MODEL_TIME_DECAY: {
            E: a_old,
            DTOP: a_new,
            F: b_old,
            N: b_new + e_old,
            T: c_old,
            DSIDE: c_new,
            DIRECT: e_new,
        },
        # Every converting label set converts at rate 1 and no single label was seen alone:
        # each pair splits 50/50.
        pb.MODEL_SHAPLEY: half,
    }


def hand_revenue() -> dict[Any, dict[tuple[str, str, str], float]]:
    a_old, a_new = _time_decay_pair(28 * H)
    b_old, b_new = _time_decay_pair(23 * H)
    c_old, c_new = _time_decay_pair(timedelta(minutes=30))
    e_old, e_new = _time_decay_pair(24 * H)
    half: dict[tuple[str, str, str], float] = {E: 20, DTOP: 20, F: 50, N: 55, T: 15, DSIDE: 15, DIRECT: 5}
    return {
        pb.MODEL_FIRST_TOUCH: {E: 40.0, F: 100.0, T: 30.0, N: 10.0},
        pb.MODEL_LAST_TOUCH: {DTOP: 40.0, N: 100.0, DSIDE: 30.0, DIRECT: 10.0},
        pb.MODEL_LAST_NON_DIRECT: {DTOP: 40.0, N: 110.0, DSIDE: 30.0},
        pb.MODEL_LINEAR: half,
        pb.MODEL_POSITION_BASED: half,
        pb.MODEL_TIME_DECAY: {
            E: 40 * a_old,
            DTOP: 40 * a_new,
            F: 100 * b_old,
            N: 100 * b_new + 10 * e_old,
            T: 30 * c_old,
            DSIDE: 30 * c_new,
            DIRECT: 10 * e_new,
        },
        pb.MODEL_SHAPLEY: half,
    }


TOAST_PATHS = [(E, DTOP), (F, N), (T, DSIDE), (N, DIRECT), (T, F)]


def markov_by_hand() -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str, str], float]]:
    """Global-share Markov credit from the exact rational chain of the five journeys."""
    labels = [tuple("|".join(x) for x in p) for p in TOAST_PATHS]
    _, re, rev = reference_markov(labels, [1, 1, 1, 1, 0], [40, 100, 30, 10, 0], [0, 0, 0, 0, 1])
    total, total_v = sum(re.values()), sum(rev.values())
    conv = {tuple(k.split("|")): float(4 * v / total) for k, v in re.items()}
    revenue = {tuple(k.split("|")): float(180 * v / total_v) for k, v in rev.items()}
    assert abs(sum(conv.values()) - 4) < 1e-9 and total > 0
    assert all(v > 0 for v in re.values()) and Fraction(0) not in re.values()
    return conv, revenue  # type: ignore[return-value]


@pytest.mark.parametrize(
    "model",
    [
        pb.MODEL_FIRST_TOUCH,
        pb.MODEL_LAST_TOUCH,
        pb.MODEL_LAST_NON_DIRECT,
        pb.MODEL_LINEAR,
        pb.MODEL_POSITION_BASED,
        pb.MODEL_TIME_DECAY,
        pb.MODEL_MARKOV,
        pb.MODEL_SHAPLEY,
    ],
)
async def test_toast_day_by_source_medium_content(
    toast_day: str, stub: pb_grpc.AttributionServiceStub, model: pb.Model.ValueType
) -> None:
    resp = await stub.GetCampaignReport(pb.GetCampaignReportRequest(query=query(group_by=SMC), model=model))
    assert resp.totals.conversions == 4  # o-3 was sent twice: counted once
    assert resp.totals.revenue == pytest.approx(180)
    assert resp.totals.conversions_without_touches == 0
    if model == pb.MODEL_MARKOV:
        expected, revenue = markov_by_hand()
        assert resp.allocation == "global_share"
    else:
        expected, revenue = hand_credit()[model], hand_revenue()[model]
        assert resp.allocation == "per_conversion"
    got = rows_by_smc(resp.rows)
    for key in set(got) | set(expected):
        row = got.get(key)
        assert (row.conversions if row else 0.0) == pytest.approx(expected.get(key, 0.0), abs=1e-9), key
        assert (row.revenue if row else 0.0) == pytest.approx(revenue.get(key, 0.0), abs=1e-9), key
    assert sum(r.conversions for r in resp.rows) == pytest.approx(4.0, abs=1e-9)


async def test_toast_day_by_campaign_with_spend_roas_cpa(
    toast_day: str, stub: pb_grpc.AttributionServiceStub
) -> None:
    entries = [
        pb.SpendEntry(campaign=CAMPAIGN, day="2026-05-01", amount=30, source="facebook", medium="paid-social"),
        pb.SpendEntry(campaign=CAMPAIGN, day="2026-05-02", amount=20, source="facebook", medium="paid-social"),
        pb.SpendEntry(campaign=CAMPAIGN, day="2026-05-01", amount=20, source="adroll", medium="display",
                      content="banner-top"),
        pb.SpendEntry(campaign=CAMPAIGN, day="2026-05-01", amount=10, source="adroll", medium="display",
                      content="sidebar"),
        pb.SpendEntry(campaign=CAMPAIGN, day="2026-05-01", amount=5, source="customer.io", medium="email"),
    ]  # fmt: skip
    resp = await stub.ImportSpend(pb.ImportSpendRequest(entries=entries, request_id="spend-1"))
    assert resp.stored == 5
    again = await stub.ImportSpend(pb.ImportSpendRequest(entries=entries[:1], request_id="spend-1"))
    assert again.stored == 5  # the retry had no effect

    by_campaign = await stub.GetCampaignReport(
        pb.GetCampaignReportRequest(
            query=query(group_by=[pb.DIMENSION_CAMPAIGN]), model=pb.MODEL_LAST_NON_DIRECT
        )
    )
    row = next(r for r in by_campaign.rows if r.dimensions.campaign == CAMPAIGN)
    assert row.conversions == pytest.approx(4) and row.revenue == pytest.approx(180)
    assert row.has_spend and row.spend == pytest.approx(85)
    assert row.roas == pytest.approx(180 / 85) and row.cpa == pytest.approx(85 / 4)
    assert by_campaign.totals.spend == pytest.approx(85)

    placements = rows_by_smc(
        (
            await stub.GetCampaignReport(
                pb.GetCampaignReportRequest(query=query(group_by=SMC), model=pb.MODEL_LINEAR)
            )
        ).rows
    )
    assert placements[DTOP].spend == pytest.approx(20) and placements[DTOP].roas == pytest.approx(20 / 20)
    assert placements[DSIDE].cpa == pytest.approx(10 / 0.5)
    # Spend named at source/medium level is not split over placements.
    assert not placements[F].has_spend

    by_source_medium = await stub.GetCampaignReport(
        pb.GetCampaignReportRequest(
            query=query(group_by=[pb.DIMENSION_SOURCE, pb.DIMENSION_MEDIUM]), model=pb.MODEL_LINEAR
        )
    )
    fb = next(r for r in by_source_medium.rows if r.dimensions.source == "facebook")
    assert fb.spend == pytest.approx(50) and fb.roas == pytest.approx(50 / 50)
    adroll = next(r for r in by_source_medium.rows if r.dimensions.source == "adroll")
    assert adroll.spend == pytest.approx(30)  # both placements roll up


async def test_toast_day_by_channel(toast_day: str, stub: pb_grpc.AttributionServiceStub) -> None:
    resp = await stub.GetCampaignReport(
        pb.GetCampaignReportRequest(query=query(group_by=[pb.DIMENSION_CHANNEL]), model=pb.MODEL_FIRST_TOUCH)
    )
    got = {r.dimensions.channel: r.conversions for r in resp.rows}
    # Channels that touched a conversion but got no first-touch credit are listed with 0.
    assert got == {
        "email": 1,
        "paid social": 1,
        "organic social": 1,
        "referral": 1,
        "display": 0,
        "direct": 0,
    }
    touched = {r.dimensions.channel: r.touched_conversions for r in resp.rows}
    assert touched == {
        "email": 1,
        "paid social": 1,
        "organic social": 1,
        "referral": 2,
        "display": 2,
        "direct": 1,
    }


async def test_conversion_path_across_devices(toast_day: str, stub: pb_grpc.AttributionServiceStub) -> None:
    resp = await stub.GetConversionPath(pb.GetConversionPathRequest(name="conversions/o-1", group_by=SMC))
    assert resp.conversion.value == 40 and resp.conversion.profile == "user_id:alice"
    assert not resp.conversion.offline
    assert [t.identifier for t in resp.touches] == ["user_id:alice", "anonymous_id:a-laptop"]
    assert [(t.dimensions.source, t.kind) for t in resp.touches] == [
        ("customer.io", "email"),
        ("adroll", "utm"),
    ]
    assert resp.touches[1].dimensions.channel == "display"
    for i in range(len(resp.touches[0].credits)):
        assert sum(t.credits[i].conversions for t in resp.touches) == pytest.approx(1.0, abs=1e-9)
    first = {c.model: c.conversions for c in resp.touches[0].credits}
    assert first[pb.MODEL_FIRST_TOUCH] == 1 and first[pb.MODEL_LAST_TOUCH] == 0
    assert first[pb.MODEL_TIME_DECAY] == pytest.approx(_time_decay_pair(28 * H)[0])

    store_purchase = await stub.GetConversionPath(pb.GetConversionPathRequest(name="conversions/o-2"))
    assert store_purchase.conversion.offline
    assert [t.dimensions.channel for t in store_purchase.touches] == ["paid social", "referral"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetConversionPath(pb.GetConversionPathRequest(name="conversions/nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_compare_models_and_csv(toast_day: str, stub: pb_grpc.AttributionServiceStub) -> None:
    cmp = await stub.CompareModels(pb.CompareModelsRequest(query=query(group_by=SMC)))
    assert len(cmp.models) == 8
    for i, model in enumerate(cmp.models):
        assert sum(r.credits[i].conversions for r in cmp.rows) == pytest.approx(4.0, abs=1e-9), model
    dtop = rows_by_smc(cmp.rows)[DTOP]
    by_model = {c.model: c.conversions for c in dtop.credits}
    assert by_model[pb.MODEL_LAST_TOUCH] == 1 and by_model[pb.MODEL_FIRST_TOUCH] == 0

    out = await stub.ExportReport(
        pb.ExportReportRequest(
            campaign_report=pb.GetCampaignReportRequest(
                query=query(group_by=SMC), model=pb.MODEL_LAST_NON_DIRECT
            )
        )
    )
    lines = list(csv.reader(io.StringIO(out.csv)))
    assert lines[0] == ["source", "medium", "content", "conversions", "revenue", "spend", "roas", "cpa",
                        "touched_conversions"]  # fmt: skip
    assert lines[1][:5] == ["toastnation", "news", "(none)", "2", "110"]
    out = await stub.ExportReport(
        pb.ExportReportRequest(compare_models=pb.CompareModelsRequest(query=query()))
    )
    header = next(csv.reader(io.StringIO(out.csv)))
    assert header[:4] == ["channel", "spend", "first_touch_conversions", "first_touch_revenue"]


async def test_new_events_show_within_seconds(
    toast_day: str,
    pool: asyncpg.Pool,
    istub: ipb_grpc.IngestServiceStub,
    stub: pb_grpc.AttributionServiceStub,
) -> None:
    space = "incremental"
    key = "wk_inc_" + secrets.token_hex(4)
    await create_source(pool, write_key=key, name="inc", space_id=space)
    await write(istub, key, [page(D0 + H, utm("twitter", "organic-social"), anonymous_id="z")])
    await write(istub, key, [track(D0 + 2 * H, "Signed Up", {}, anonymous_id="z")])

    async def shown() -> pb.GetCampaignReportResponse | None:
        r = await stub.GetCampaignReport(
            pb.GetCampaignReportRequest(
                query=query(space, group_by=[pb.DIMENSION_SOURCE]), model=pb.MODEL_LINEAR
            )
        )
        return r if r.totals.conversions == 1 else None

    r = await eventually(shown, timeout=10)
    assert [(x.dimensions.source, x.conversions) for x in r.rows] == [("twitter", 1.0)]


async def test_settings_change_and_recompute_with_progress(
    toast_day: str,
    pool: asyncpg.Pool,
    istub: ipb_grpc.IngestServiceStub,
    stub: pb_grpc.AttributionServiceStub,
) -> None:
    space = "recompute"
    key = "wk_rc_" + secrets.token_hex(4)
    await create_source(pool, write_key=key, name="rc", space_id=space)
    await write(
        istub,
        key,
        [
            page(D0 + H, utm("toastnation", "news"), anonymous_id="r"),
            track(D0 + 2 * H, "Trial Started", {"value": 7}, anonymous_id="r"),
            track(D0 + 3 * H, "Order Completed", {"order_id": "r-1", "revenue": 9}, anonymous_id="r"),
        ],
    )
    channel_q = query(space, group_by=[pb.DIMENSION_CHANNEL])

    async def report() -> pb.GetCampaignReportResponse:
        return await stub.GetCampaignReport(
            pb.GetCampaignReportRequest(query=channel_q, model=pb.MODEL_LAST_TOUCH)
        )

    async def one_order() -> bool:
        return (await report()).totals.conversions == 1

    await eventually(one_order, timeout=10)
    assert [r.dimensions.channel for r in (await report()).rows] == ["referral"]

    settings = await stub.GetAttributionSettings(pb.GetAttributionSettingsRequest(space_id=space))
    assert list(settings.conversion_events) == ["Order Completed", "Signed Up"]
    settings.conversion_events.append("Trial Started")
    settings.channel_rules.add(channel="earned media", medium_in=["news"])
    settings.lookback_windows.add(event="Trial Started", days=7)
    updated = await stub.UpdateAttributionSettings(pb.UpdateAttributionSettingsRequest(settings=settings))
    assert updated.version == settings.version + 1

    job = await stub.RecomputeAttribution(pb.RecomputeAttributionRequest(space_id=space, request_id="rc-1"))
    assert job.total_events == 3 and job.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED)
    same = await stub.RecomputeAttribution(pb.RecomputeAttributionRequest(space_id=space, request_id="rc-1"))
    assert same.name == job.name

    async def done() -> pb.RecomputeJob | None:
        j = await stub.GetRecomputeJob(pb.GetRecomputeJobRequest(name=job.name))
        assert j.state != pb.JOB_STATE_FAILED, j.error
        return j if j.state == pb.JOB_STATE_SUCCEEDED else None

    finished = await eventually(done, timeout=15)
    assert finished.progress == 1.0 and finished.processed_events == 3
    r = await report()
    assert r.totals.conversions == 2
    assert [(x.dimensions.channel, x.conversions) for x in r.rows] == [("earned media", 2.0)]


async def test_invalid_requests_name_the_field(stub: pb_grpc.AttributionServiceStub) -> None:
    q = pb.ReportQuery(options=pb.ModelOptions(markov_order=5))
    q.start_time.FromDatetime(D0)
    q.end_time.FromDatetime(D0 - H)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetCampaignReport(pb.GetCampaignReportRequest(query=q, model=pb.MODEL_MARKOV))
    d = details_of(err.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in d.violations} == {"query.end_time", "query.options.markov_order"}

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ImportSpend(
            pb.ImportSpendRequest(entries=[pb.SpendEntry(campaign="", day="2026-13-01", amount=-1)])
        )
    d = details_of(err.value)
    assert {f for f, _ in d.violations} == {"entries[0].campaign", "entries[0].day"}

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.UpdateAttributionSettings(
            pb.UpdateAttributionSettingsRequest(
                settings=pb.AttributionSettings(
                    space_id="bad", conversion_events=["Order Completed"], default_lookback_days=120
                )
            )
        )
    assert details_of(err.value).violations[0][0] == "settings.default_lookback_days"


async def test_paths_follow_the_identity_view_when_published(
    toast_day: str,
    pool: asyncpg.Pool,
    istub: ipb_grpc.IngestServiceStub,
    stub: pb_grpc.AttributionServiceStub,
) -> None:
    space = "idview"
    key = "wk_id_" + secrets.token_hex(4)
    await create_source(pool, write_key=key, name="id", space_id=space)
    await write(
        istub,
        key,
        [
            page(D0 + H, utm("facebook", "paid-social"), anonymous_id="v-laptop"),
            track(D0 + 2 * H, "Order Completed", {"order_id": "v-1", "revenue": 5}, anonymous_id="v-phone"),
        ],
    )
    q = query(space, group_by=[pb.DIMENSION_SOURCE])

    async def report() -> pb.GetCampaignReportResponse:
        return await stub.GetCampaignReport(pb.GetCampaignReportRequest(query=q, model=pb.MODEL_LAST_TOUCH))

    async def converted() -> bool:
        return (await report()).totals.conversions == 1

    await eventually(converted, timeout=10)
    # Nothing ties the two devices together yet: the purchase has no touch (credited to direct).
    before = await report()
    assert before.totals.conversions_without_touches == 1
    assert [(r.dimensions.source, r.conversions) for r in before.rows if r.conversions] == [("(direct)", 1.0)]

    # The identity service publishes that both devices are one profile: the path follows.
    await pool.execute(
        """create schema identity;
           create table identity.test_identifiers (space_id text, kind text, value text, profile_id text);
           insert into identity.test_identifiers values
               ('idview', 'anonymous_id', 'v-laptop', 'p-1'), ('idview', 'anonymous_id', 'v-phone', 'p-1');
           create view identity.profile_identifiers as select * from identity.test_identifiers;"""
    )
    try:
        after = await report()
        assert after.totals.conversions_without_touches == 0
        assert [(r.dimensions.source, r.conversions) for r in after.rows] == [("facebook", 1.0)]
        path = await stub.GetConversionPath(
            pb.GetConversionPathRequest(space_id=space, name="conversions/v-1")
        )
        assert path.conversion.profile == "profile:p-1"
        assert [t.identifier for t in path.touches] == ["anonymous_id:v-laptop"]
        # A split in the identity service splits the path again.
        await pool.execute("delete from identity.test_identifiers where value = 'v-laptop'")
        assert (await report()).totals.conversions_without_touches == 1
    finally:
        await pool.execute("drop schema identity cascade")
