"""Each destination against its local receiver over real HTTP: payload shapes, hashing, per-row
results, batch isolation of a bad row, retryable answers, and the CSV files."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from services.export.destinations import base
from services.export.destinations.base import Outcome, Outgoing, Rejected, Secrets
from services.export.destinations.data_manager import GoogleDataManager
from services.export.destinations.files import GoogleAdsCsv, MetaCsv
from services.export.destinations.google_ads import GoogleAdsClickConversions, conversion_date_time
from services.export.destinations.meta import MetaCapi
from services.export.normalize import Contact, normalise_contact
from tests.export_receivers import Receivers

NOW = datetime.now(UTC).replace(microsecond=0)


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def outgoing(i: int, **kw: object) -> Outgoing:
    norm = normalise_contact(
        Contact(email=f"Buyer.{i}@Gmail.com", phone=f"+1 650 555 {1000 + i}", first_name="Mary")
    )
    fields: dict[str, object] = dict(
        outbox_id=i,
        conversion_id=i,
        order_id=f"order-{i}",
        event_name="Purchase",
        event_time=NOW - timedelta(hours=2),
        time_zone="America/Los_Angeles",
        value=19.99,
        currency="USD",
        meta_user_data=norm.meta,
        google_user=norm.google,
        gclid=f"gclid-{i}",
        click_time=NOW - timedelta(days=3),
        fbc=f"fb.1.{int((NOW - timedelta(days=4)).timestamp() * 1000)}.fbclid{i}",
    )
    fields.update(kw)
    return Outgoing(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def receivers() -> AsyncIterator[Receivers]:
    r = Receivers()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def meta(r: Receivers) -> MetaCapi:
    return MetaCapi(
        base_url=r.base_url,
        dataset_id="123",
        api_version="v24.0",
        secrets=Secrets({"access_token": "meta-token"}),
    )


def google(r: Receivers) -> GoogleAdsClickConversions:
    return GoogleAdsClickConversions(
        base_url=r.base_url,
        customer_id="123-456-7890",
        conversion_action_id="555",
        secrets=Secrets({"access_token": "google-token", "developer_token": "dev-token"}),
    )


async def test_meta_batch_is_hashed_and_counted_once(
    receivers: Receivers, session: aiohttp.ClientSession
) -> None:
    dest = meta(receivers)
    rows = [dest.prepare(outgoing(i), NOW) for i in range(3)]
    result = await dest.send(session, rows)
    assert [r.outcome for r in result.rows] == [Outcome.DELIVERED] * 3
    event = receivers.meta.effects["Purchase:order-1"]
    assert event["user_data"]["em"] == sha("buyer.1@gmail.com")  # Meta keeps the dots
    assert event["user_data"]["ph"] == sha("16505551001")
    assert event["user_data"]["fn"] == "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"
    assert event["user_data"]["fbc"].endswith(".fbclid1")
    assert event["custom_data"] == {"order_id": "order-1", "value": 19.99, "currency": "usd"}
    assert event["event_time"] == int((NOW - timedelta(hours=2)).timestamp())
    assert receivers.problems == []


@pytest.mark.parametrize(
    "user_data",
    [
        {"em": "A" * 64},  # upper case: not as Meta hashes
        {"em": "a" * 63},
        {"em": "a" * 64 + "," + "b" * 64},  # two digests in one value
        {"em": "a" * 63 + ",", "ph": "b" * 64},
        {"nickname": "a" * 64},  # not a key Meta hashes
    ],
)
def test_meta_refuses_user_data_that_is_not_one_digest_per_key(
    receivers: Receivers, user_data: dict[str, str]
) -> None:
    with pytest.raises(Rejected) as err:
        meta(receivers).prepare(outgoing(1, meta_user_data=user_data), NOW)
    assert err.value.result.reason == "USER_DATA_NOT_HASHED"
    assert meta(receivers).prepare(outgoing(1, meta_user_data={"em": "a" * 64}), NOW)["user_data"]["em"] == (
        "a" * 64
    )


async def test_meta_bad_rows_never_sink_a_batch(receivers: Receivers, session: aiohttp.ClientSession) -> None:
    dest = meta(receivers)
    with pytest.raises(Rejected) as err:
        dest.prepare(outgoing(10, event_time=NOW - timedelta(days=63)), NOW)
    assert err.value.result.reason == "EVENT_TOO_OLD"
    with pytest.raises(Rejected) as err:
        dest.prepare(outgoing(10, meta_user_data={}, fbc=""), NOW)
    assert err.value.result.outcome is Outcome.SKIPPED
    # A row Meta refuses although it passed our checks: the batch is split until it stands alone.
    rows = [dest.prepare(outgoing(i), NOW) for i in range(20, 27)]
    rows[4]["event_time"] = int((NOW - timedelta(days=70)).timestamp())
    result = await dest.send(session, rows)
    outcomes = [r.outcome for r in result.rows]
    assert outcomes == [Outcome.DELIVERED] * 4 + [Outcome.FAILED] + [Outcome.DELIVERED] * 2
    assert "62 days" in result.rows[4].detail
    assert result.requests > 1
    assert "Purchase:order-24" not in receivers.meta.effects
    assert all(receivers.meta.deliveries[f"Purchase:order-{i}"] == 1 for i in (20, 21, 22, 23, 25, 26))


async def test_meta_transient_and_rate_limits_are_retried(
    receivers: Receivers, session: aiohttp.ClientSession
) -> None:
    dest = meta(receivers)
    rows = [dest.prepare(outgoing(30), NOW)]
    receivers.fail(receivers.meta, 429, retry_after="7")
    result = await dest.send(session, rows)
    assert result.rows[0].outcome is Outcome.RETRY and result.retry_after == 7.0
    receivers.fail(receivers.meta, 500)
    result = await dest.send(session, rows)
    assert (result.rows[0].outcome, result.rows[0].reason) == (Outcome.RETRY, "TRANSIENT")
    bad_token = MetaCapi(
        base_url=receivers.base_url, dataset_id="1", api_version="v24.0", secrets=Secrets({})
    )
    result = await bad_token.send(session, rows)
    assert (result.rows[0].outcome, result.rows[0].reason) == (Outcome.FAILED, "UNAUTHORIZED")


def test_google_conversion_date_time_keeps_the_offset() -> None:
    when = datetime(2026, 3, 1, 18, 30, 5, tzinfo=UTC)
    assert conversion_date_time(when, "America/Los_Angeles") == "2026-03-01 10:30:05-08:00"
    assert conversion_date_time(when, "Asia/Kolkata") == "2026-03-02 00:00:05+05:30"
    assert conversion_date_time(when) == "2026-03-01 18:30:05+00:00"


def test_google_refuses_what_google_would_refuse() -> None:
    dest = google(Receivers())
    cases: list[tuple[dict[str, object], Outcome, str]] = [
        (dict(gclid="", click_time=None), Outcome.SKIPPED, "NO_CLICK_ID"),
        (dict(click_time=NOW - timedelta(days=91)), Outcome.FAILED, "EXPIRED_EVENT"),
        (dict(click_time=NOW - timedelta(hours=1)), Outcome.FAILED, "CONVERSION_PRECEDES_EVENT"),
        (dict(click_time=None, event_time=NOW - timedelta(days=91)), Outcome.FAILED, "EXPIRED_EVENT"),
    ]
    for kw, outcome, reason in cases:
        with pytest.raises(Rejected) as err:
            dest.prepare(outgoing(1, **kw), NOW)
        assert (err.value.result.outcome, err.value.result.reason) == (outcome, reason), kw
    row = dest.prepare(outgoing(1, gclid="", gbraid="gb-1", wbraid="wb-1"), NOW)
    assert row["gbraid"] == "gb-1" and "wbraid" not in row and "gclid" not in row


async def test_google_partial_failure_keeps_per_row_results(
    receivers: Receivers, session: aiohttp.ClientSession
) -> None:
    dest = google(receivers)
    rows = [dest.prepare(outgoing(i), NOW) for i in range(40, 44)]
    # Google knows a click later than the conversion for row 2 (a time-zone mistake upstream).
    receivers.google_clicks["gclid-42"] = NOW
    result = await dest.send(session, rows)
    assert [r.outcome for r in result.rows] == [
        Outcome.DELIVERED,
        Outcome.DELIVERED,
        Outcome.FAILED,
        Outcome.DELIVERED,
    ]
    assert result.rows[2].reason == "CONVERSION_PRECEDES_EVENT"
    sent = receivers.google.effects["order-40"]
    assert sent["conversionAction"] == "customers/1234567890/conversionActions/555"
    assert sent["conversionDateTime"] == conversion_date_time(NOW - timedelta(hours=2), "America/Los_Angeles")
    assert sent["userIdentifiers"] == [
        {"hashedEmail": sha("buyer40@gmail.com")},
        {"hashedPhoneNumber": sha("+16505551040")},
    ]
    assert (sent["conversionValue"], sent["currencyCode"]) == (19.99, "USD")
    # A resend (after a crash) is answered ORDER_ID_ALREADY_IN_USE: already there, so delivered.
    again = await dest.send(session, rows[:1])
    assert again.rows[0].outcome is Outcome.DELIVERED and again.rows[0].reason == "ORDER_ID_ALREADY_IN_USE"
    assert receivers.google.deliveries["order-40"] == 1
    assert receivers.problems == []


async def test_google_5xx_and_timeouts_are_retryable(
    receivers: Receivers, session: aiohttp.ClientSession
) -> None:
    dest = google(receivers)
    rows = [dest.prepare(outgoing(50), NOW)]
    receivers.fail(receivers.google, 503)
    assert (await dest.send(session, rows)).rows[0].reason == "HTTP_503"
    receivers.google.delay = 0.5
    dest.timeout = 0.1
    try:
        assert (await dest.send(session, rows)).rows[0].reason == "TIMEOUT"
    finally:
        receivers.google.delay = 0.0
    assert "order-50" not in receivers.google.effects or receivers.google.deliveries["order-50"] == 1


async def test_data_manager_isolates_rows_google_refuses(
    receivers: Receivers, session: aiohttp.ClientSession
) -> None:
    dest = GoogleDataManager(
        base_url=receivers.base_url,
        account_id="123-456-7890",
        product_destination_id="555",
        secrets=Secrets({"access_token": "dm-token"}),
    )
    rows = [dest.prepare(outgoing(i, gclid="" if i == 61 else f"gclid-{i}"), NOW) for i in range(60, 64)]
    assert "adIdentifiers" not in rows[1] and rows[1]["userData"]["userIdentifiers"]
    rows[2]["currency"] = "usd"  # Google wants upper case: this one row must fail alone
    problems_before = len(receivers.problems)
    result = await dest.send(session, rows)
    assert [r.outcome for r in result.rows] == [
        Outcome.DELIVERED,
        Outcome.DELIVERED,
        Outcome.FAILED,
        Outcome.DELIVERED,
    ]
    assert set(receivers.dm.effects) >= {"order-60", "order-61", "order-63"}
    assert "order-62" not in receivers.dm.effects
    event = receivers.dm.effects["order-60"]
    assert event["adIdentifiers"] == {"gclid": "gclid-60"}
    assert event["eventSource"] == "IN_STORE"
    del receivers.problems[problems_before:]  # the one deliberate bad row


def test_google_ads_csv_file_format(tmp_path: Path) -> None:
    dest = GoogleAdsCsv(
        directory=str(tmp_path), conversion_name="Store purchase", time_zone="America/New_York"
    )
    when = datetime(2026, 3, 1, 18, 30, 5, tzinfo=UTC)
    row = dest.prepare(
        outgoing(1, event_time=when, click_time=when - timedelta(days=1)), when + timedelta(days=1)
    )
    assert dest.render([row]) == (
        "Parameters:TimeZone=America/New_York\n"
        "Google Click ID,Conversion Name,Conversion Time,Conversion Value,Conversion Currency\n"
        "gclid-1,Store purchase,2026-03-01 13:30:05,19.99,USD\n"
    )
    with pytest.raises(Rejected):
        dest.prepare(outgoing(2, gclid="", gbraid="x"), when)


async def test_csv_files_are_written_whole(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    gdest = GoogleAdsCsv(directory=str(tmp_path / "g"), conversion_name="Store purchase")
    mdest = MetaCsv(directory=str(tmp_path / "m"))
    g = await gdest.send(session, [gdest.prepare(outgoing(i), NOW) for i in range(3)])
    m = await mdest.send(session, [mdest.prepare(outgoing(i), NOW) for i in range(3)])
    assert all(r.outcome is Outcome.DELIVERED for r in g.rows + m.rows)
    (gfile,) = (tmp_path / "g").glob("*.csv")
    assert gfile.read_text().splitlines()[0] == "Parameters:TimeZone=UTC"
    (mfile,) = (tmp_path / "m").glob("*.csv")
    lines = mfile.read_text().splitlines()
    assert lines[0].startswith("event_id,event_name,event_time,action_source,email,phone")
    assert sha("buyer.0@gmail.com") in lines[1] and "@" not in lines[1]


def test_secrets_never_show_their_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TP_TEST_TOKEN", "s3cr3t-from-env")
    s = Secrets({"developer_token": "s3cr3t-stored"}, env={"access_token": "TP_TEST_TOKEN"})
    assert s.get("access_token") == "s3cr3t-from-env" and s.get("developer_token") == "s3cr3t-stored"
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in str(s) and "s3cr3t" not in f"{s}"


def test_retry_after_in_seconds_or_as_a_date() -> None:
    assert base.parse_retry_after("3") == 3.0
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert base.parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now) == 30.0
    assert base.parse_retry_after("soon") is None
