"""The gateway's pure parts: body decoding, Segment JSON -> ingest request translation (checked
through ingest's own parsing of the lean form, the pure half of the path), result merging, client
IP resolution and settings. Each bad input must come back naming its field and reason."""

from __future__ import annotations

import base64
import gzip
import ipaddress
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from services.gateway import segment
from services.gateway.app import resolve_client_ip
from services.gateway.segment import RequestError
from services.gateway.settings import GatewaySettings, parse_listen, parse_networks
from services.ingest import domain
from services.ingest.store import EVENT_COLUMNS
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.platform.settings import SettingsError

SOURCE = domain.Source("src_unit", "default", True)
RECEIVED = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
JSON_COLUMNS = ("properties", "traits", "context", "integrations", "campaign", "click_ids")
TIME_COLUMNS = ("timestamp", "original_timestamp", "sent_at", "received_at")


def stored(data: bytes) -> domain.Prepared | domain.Rejected:
    """What ingest makes of one message of the lean form."""
    return domain.prepare_json(data, source=SOURCE, received_at=RECEIVED, client_ip="")


def as_row(p: domain.Prepared) -> dict[str, Any]:
    """The stored row as a dict, JSON columns parsed, instants as datetimes."""
    row = dict(zip(EVENT_COLUMNS, p.row, strict=True))
    for column in JSON_COLUMNS:
        if row[column] is not None:
            assert row[column][:1] == domain.JSONB
            row[column] = orjson.loads(row[column][1:])
    for column in TIME_COLUMNS:
        if row[column] is not None:
            row[column] = domain.from_pg_time(row[column])
    return row


def one(body: dict[str, Any], route: str = "track") -> dict[str, Any]:
    """The stored row of a single-message body; fails when it was not stored."""
    raw = orjson.dumps(body)
    tr = segment.translate(orjson.loads(raw), route, len(raw))
    assert tr.errors == [], tr.errors
    assert len(tr.messages) == 1
    p = stored(tr.messages[0])
    assert isinstance(p, domain.Prepared), p
    return as_row(p)


def bad(body: dict[str, Any], route: str = "track") -> tuple[str, str, str, str]:
    """(message id, field, reason, description) of the one problem of a single-message body."""
    raw = orjson.dumps(body)
    tr = segment.translate(orjson.loads(raw), route, len(raw))
    assert tr.errors == []
    p = stored(tr.messages[0])
    assert isinstance(p, domain.Rejected), p
    assert len(p.violations) == 1, p.violations
    v = p.violations[0]
    return p.message_id, v.field, v.reason, v.description


def refused(fn: Any, *args: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args)
    return info.value


def ts(seconds: int, nanos: int = 0) -> tuple[int, int]:
    return seconds, nanos


def as_tuple(t: Any) -> tuple[int, int]:
    return t.seconds, t.nanos


# -- write key, gzip, JSON, pixel data -----------------------------------------------------


def basic(user_pass: str) -> str:
    return "Basic " + base64.b64encode(user_pass.encode()).decode()


@pytest.mark.parametrize(
    ("header", "key"),
    [
        (basic("wk_123:"), "wk_123"),
        (basic("wk_123"), "wk_123"),
        (basic("wk_123:ignored"), "wk_123"),
        ("basic " + base64.b64encode(b"lower:").decode(), "lower"),
        ("Bearer abc", ""),
        ("Basic %%%not-base64", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_write_key_from_authorization(header: str | None, key: str) -> None:
    assert segment.write_key_from_authorization(header) == key


def test_gunzip_roundtrip_and_several_members() -> None:
    assert segment.gunzip(gzip.compress(b'{"a":1}')) == b'{"a":1}'
    assert segment.gunzip(gzip.compress(b"ab") + gzip.compress(b"cd")) == b"abcd"


def test_gunzip_bomb_is_refused_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (50 * 1024 * 1024))  # 50 MB of zeros in ~50 KB
    assert len(bomb) < segment.MAX_BODY_BYTES
    err = refused(segment.gunzip, bomb)
    assert err.code == "body_too_large"
    # Exactly at the limit is fine, one byte more is not.
    assert len(segment.gunzip(gzip.compress(b"x" * 1000), 1000)) == 1000
    assert refused(segment.gunzip, gzip.compress(b"x" * 1001), 1000).code == "body_too_large"


@pytest.mark.parametrize(
    "data", [b"not gzip at all", gzip.compress(b'{"a": 1}')[:-12], b"", gzip.compress(b"{}") + b"junk"]
)
def test_gunzip_bad_input(data: bytes) -> None:
    err = refused(segment.gunzip, data)
    assert err.code == "invalid_gzip"
    assert "gzip" in err.message


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b"{not json", "invalid_json", "not valid JSON"),
        (b"", "invalid_json", "empty"),
        (b"   ", "invalid_json", "empty"),
        (b"\xff\xfe", "invalid_json", "not valid JSON"),
        (b"[1, 2]", "invalid_body", "an array"),
        (b'"text"', "invalid_body", "a string"),
    ],
)
def test_parse_json_object_errors(data: bytes, code: str, words: str) -> None:
    err = refused(segment.parse_json_object, data)
    assert err.code == code
    assert words in err.message


def test_pixel_data_standard_and_url_safe_base64() -> None:
    # Chosen so that the standard encoding has '+' and '/' and needs padding.
    payload = {"writeKey": "wk", "userId": "u>>>?", "event": "Email Opened", "properties": {"x": "~~~?"}}
    raw = orjson.dumps(payload)
    std = base64.b64encode(raw).decode()
    safe = base64.urlsafe_b64encode(raw).decode()
    assert "+" in std or "/" in std
    assert std != safe
    for data in (std, safe, safe.rstrip("="), std.replace("+", " ")):
        assert segment.decode_pixel_data(data) == payload


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (None, "missing_data"),
        ("", "missing_data"),
        ("***", "invalid_data"),
        ("a", "invalid_data"),
        (base64.b64encode(b"not json").decode(), "invalid_json"),
        (base64.b64encode(b"[1]").decode(), "invalid_body"),
    ],
)
def test_pixel_data_errors(data: str | None, code: str) -> None:
    assert refused(segment.decode_pixel_data, data).code == code


# -- single messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ("identify", "identify"),
        ("i", "identify"),
        ("track", "track"),
        ("t", "track"),
        ("page", "page"),
        ("p", "page"),
        ("screen", "screen"),
        ("s", "screen"),
        ("group", "group"),
        ("g", "group"),
        ("alias", "alias"),
        ("a", "alias"),
    ],
)
def test_route_gives_the_type(route: str, expected: str) -> None:
    # The route wins over a "type" in the body.
    body = {"userId": "u", "event": "e", "groupId": "g", "previousId": "p"}
    assert one({**body, "type": "screen" if route != "screen" else "track"}, route)["type"] == expected


def test_track_fields_are_copied() -> None:
    body = {
        "writeKey": "wk",
        "messageId": "m-1",
        "userId": "u-1",
        "anonymousId": "a-1",
        "event": "Order Completed",
        "properties": {"total": 12.5, "products": [{"sku": "x"}], "ü": "ñ"},
        "integrations": {"All": False, "Mixpanel": True},
    }
    raw = orjson.dumps(body)
    tr = segment.translate(orjson.loads(raw), "track", len(raw))
    assert tr.write_key == "wk"
    assert tr.indices == [0]
    assert tr.total == 1
    assert tr.request.omit_accepted_results
    row = as_row(stored(tr.messages[0]))  # type: ignore[arg-type]
    assert (row["message_id"], row["user_id"], row["anonymous_id"], row["event"]) == (
        "m-1",
        "u-1",
        "a-1",
        "Order Completed",
    )
    assert row["properties"] == body["properties"]
    assert row["integrations"] == body["integrations"]
    assert row["context"] is None
    assert row["traits"] is None
    assert row["original_timestamp"] is None
    assert row["sent_at"] is None
    assert row["timestamp"] == row["received_at"] == RECEIVED


def test_alias_and_group_ids() -> None:
    row = one({"userId": "new", "previousId": "old"}, "alias")
    assert (row["user_id"], row["previous_id"]) == ("new", "old")
    row = one({"userId": "u", "groupId": "acme", "traits": {"plan": "pro"}}, "group")
    assert row["group_id"] == "acme"
    assert row["traits"] == {"plan": "pro"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(42, "42"), (-7, "-7"), (12345678901234567890, "12345678901234567890"), (42.0, "42"), (1.5, "1.5")],
)
def test_numeric_ids_become_strings(value: Any, expected: str) -> None:
    row = one({"userId": value, "anonymousId": value, "messageId": value, "event": "e"})
    assert row["user_id"] == row["anonymous_id"] == row["message_id"] == expected
    assert one({"userId": value, "groupId": value}, "group")["group_id"] == expected
    assert one({"userId": "u", "previousId": value}, "alias")["previous_id"] == expected


def test_null_fields_are_absent() -> None:
    # analytics-python sends "anonymousId": null next to a userId.
    row = one(
        {
            "userId": "u",
            "anonymousId": None,
            "properties": None,
            "context": None,
            "timestamp": None,
            "event": "e",
        }
    )
    assert row["anonymous_id"] is None
    assert row["properties"] is None
    assert row["original_timestamp"] is None


@pytest.mark.parametrize("field", ["userId", "anonymousId", "previousId", "groupId", "messageId"])
@pytest.mark.parametrize(
    ("value", "kind"), [({"id": 1}, "an object"), ([1], "an array"), (True, "a boolean")]
)
def test_ids_that_are_not_strings_or_numbers(field: str, value: Any, kind: str) -> None:
    _, got_field, reason, description = bad({"userId": "u", "event": "e", field: value})
    assert (got_field, reason) == (field, "INVALID_TYPE")
    assert kind in description


@pytest.mark.parametrize("field", ["properties", "traits", "context", "integrations"])
@pytest.mark.parametrize(("value", "kind"), [([1], "an array"), ("x", "a string"), (3, "a number")])
def test_free_form_fields_must_be_objects(field: str, value: Any, kind: str) -> None:
    message_id, got_field, reason, description = bad({"userId": "u", "messageId": "m-9", field: value})
    assert (got_field, reason, message_id) == (field, "INVALID_TYPE", "m-9")
    assert f"{field} must be a JSON object, got {kind}" == description


@pytest.mark.parametrize(("field", "value"), [("event", 5), ("event", {"a": 1}), ("name", ["x"])])
def test_event_and_name_must_be_strings(field: str, value: Any) -> None:
    _, got_field, reason, _ = bad({"userId": "u", field: value}, "page" if field == "name" else "track")
    assert (got_field, reason) == (field, "INVALID_TYPE")


def at(seconds: int, micros: int = 0) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds, microseconds=micros)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", at(1714564800)),
        ("2024-05-01T12:00:00.123Z", at(1714564800, 123_000)),
        ("2024-05-01T12:00:00.123456789Z", at(1714564800, 123_456)),
        ("2024-05-01T14:00:00+02:00", at(1714564800)),
        ("2024-05-01T07:30:00.5-04:30", at(1714564800, 500_000)),
        ("2024-05-01T12:00:00", at(1714564800)),  # no offset: UTC
        ("1969-12-31T23:59:59.5Z", at(-1, 500_000)),
    ],
)
def test_timestamps(text: str, expected: datetime) -> None:
    row = one({"userId": "u", "event": "e", "timestamp": text, "sentAt": text})
    assert row["original_timestamp"] == expected
    assert row["sent_at"] == expected
    assert row["original_timestamp"].utcoffset() == timedelta(0)
    # No clock skew between the call and the send: the event happened when it was received.
    assert row["timestamp"] == RECEIVED


def test_original_timestamp_is_accepted_and_timestamp_wins() -> None:
    row = one({"userId": "u", "event": "e", "originalTimestamp": "2024-05-01T12:00:00Z"})
    assert row["original_timestamp"] == at(1714564800)
    row = one(
        {
            "userId": "u",
            "event": "e",
            "originalTimestamp": "2024-05-01T12:00:00Z",
            "timestamp": "2024-05-01T12:00:01Z",
        }
    )
    assert row["original_timestamp"] == at(1714564801)


def test_clocks_at_the_ends_of_the_calendar_are_clean_answers() -> None:
    # The skew correction would leave the calendar: the device's own time is kept.
    row = one(
        {"userId": "u", "event": "e", "timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T23:59:59Z"}
    )
    assert row["timestamp"] == row["original_timestamp"] == datetime(1, 1, 1, tzinfo=UTC)
    # An instant before year 1 in UTC cannot be stored: it counts as not sent.
    row = one({"userId": "u", "event": "e", "timestamp": "0001-01-01T00:00:00+01:00"})
    assert row["original_timestamp"] is None
    assert row["timestamp"] == RECEIVED


@pytest.mark.parametrize("field", ["timestamp", "originalTimestamp", "sentAt"])
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("yesterday", "INVALID_TIMESTAMP"),
        ("2024-13-01T00:00:00Z", "INVALID_TIMESTAMP"),
        ("", "INVALID_TIMESTAMP"),
        (1714564800000, "INVALID_TYPE"),
        ({"t": 1}, "INVALID_TYPE"),
    ],
)
def test_bad_timestamps(field: str, value: Any, reason: str) -> None:
    _, got_field, got_reason, description = bad({"userId": "u", "event": "e", field: value})
    assert (got_field, got_reason) == (field, reason)
    assert field in description


def test_page_name_falls_back_to_properties_and_keeps_category() -> None:
    row = one(
        {"userId": "u", "properties": {"name": "Pricing", "path": "/pricing"}, "category": "Docs"}, "page"
    )
    assert row["name"] == "Pricing"
    assert row["properties"] == {"name": "Pricing", "path": "/pricing", "category": "Docs"}
    row = one({"userId": "u", "name": "Home", "properties": {"name": "Other"}}, "page")
    assert row["name"] == "Home"
    row = one({"userId": "u", "category": "Onboarding"}, "screen")
    assert row["properties"] == {"category": "Onboarding"}
    # Only page and screen take the name from the properties.
    row = one({"userId": "u", "event": "e", "properties": {"name": "x"}}, "track")
    assert row["name"] is None


def test_identify_traits_in_context_stay_in_context() -> None:
    row = one({"anonymousId": "a", "context": {"traits": {"email": "x@example.com"}}}, "identify")
    assert row["traits"] is None
    assert row["context"]["traits"] == {"email": "x@example.com"}


def test_context_is_kept_and_a_mobile_referrer_counts_as_the_page_referrer() -> None:
    context = {
        "ip": "203.0.113.9",
        "userAgent": "Mozilla/5.0",
        "page": {"url": "https://shop.example/", "referrer": "https://news.example/"},
        "device": {"id": "dev-1", "advertisingId": "idfa-1", "token": "push-1"},
    }
    row = one({"userId": "u", "context": context}, "page")
    assert row["context"] == context
    # A mobile referrer (deep link) when there is no page referrer; odd types are left as they are.
    row = one(
        {"userId": "u", "event": "e", "context": {"referrer": {"url": "app://x"}, "ip": 5, "device": "phone"}}
    )
    assert row["context"] == {
        "referrer": {"url": "app://x"},
        "ip": 5,
        "device": "phone",
        "page": {"referrer": "app://x"},
    }


def test_single_message_over_32_kb_is_refused() -> None:
    body = {"userId": "u", "event": "e", "properties": {"blob": "x" * segment.MAX_MESSAGE_BYTES}}
    raw = orjson.dumps(body)
    err = refused(segment.translate, orjson.loads(raw), "track", len(raw))
    assert err.code == "message_too_large"
    assert str(segment.MAX_MESSAGE_BYTES) in err.message


# -- batches -------------------------------------------------------------------------------


def batch(messages: list[Any], **top: Any) -> segment.Translation:
    raw = orjson.dumps({"batch": messages, **top})
    return segment.translate(orjson.loads(raw), "batch", len(raw))


def rows(tr: segment.Translation) -> list[dict[str, Any]]:
    out = []
    for data in tr.messages:
        p = stored(data)
        assert isinstance(p, domain.Prepared), p
        out.append(as_row(p))
    return out


def test_batch_types_and_top_level_fields_apply_to_each_message() -> None:
    tr = batch(
        [
            {"type": "identify", "userId": "u", "traits": {"a": 1}},
            {
                "type": "track",
                "userId": "u",
                "event": "e",
                "context": {"locale": "fr", "library": {"name": "mine"}},
            },
            {"type": "page", "userId": "u", "integrations": {"X": False}, "sentAt": "2024-05-01T00:00:00Z"},
            {"type": "screen", "userId": "u"},
            {"type": "group", "userId": "u", "groupId": "g"},
            {"type": "alias", "userId": "u", "previousId": "p"},
        ],
        writeKey="wk",
        context={"library": {"name": "analytics-go"}, "ip": "198.51.100.1"},
        integrations={"All": True, "X": True},
        sentAt="2024-05-01T12:00:00Z",
    )
    assert tr.errors == []
    assert tr.write_key == "wk"
    assert tr.indices == [0, 1, 2, 3, 4, 5]
    got = rows(tr)
    assert [r["type"] for r in got] == ["identify", "track", "page", "screen", "group", "alias"]
    assert got[0]["context"] == {"library": {"name": "analytics-go"}, "ip": "198.51.100.1"}
    # The message's own keys win, key by key at the top level.
    assert got[1]["context"] == {"library": {"name": "mine"}, "ip": "198.51.100.1", "locale": "fr"}
    assert all(r["context"]["ip"] == "198.51.100.1" for r in got)
    assert got[0]["integrations"] == {"All": True, "X": True}
    assert got[2]["integrations"] == {"All": True, "X": False}
    assert got[0]["sent_at"] == at(1714564800)
    assert got[2]["sent_at"] == at(1714521600)


def test_repeated_per_message_sent_at_is_parsed_once_and_right() -> None:
    tr = batch(
        [
            {"type": "track", "userId": "u", "event": "e", "sentAt": "2024-05-01T00:00:00Z"},
            {"type": "track", "userId": "u", "event": "e", "sentAt": "2024-05-01T00:00:00Z"},
            {"type": "track", "userId": "u", "event": "e", "sentAt": "2024-05-01T00:00:01Z"},
            {"type": "track", "userId": "u", "event": "e"},
        ]
    )
    times: dict[str, domain.PgTime | None] = {}
    got = []
    for data in tr.messages:
        p = domain.prepare_json(data, source=SOURCE, received_at=RECEIVED, client_ip="", times=times)
        assert isinstance(p, domain.Prepared)
        got.append(as_row(p)["sent_at"])
    assert got == [at(1714521600), at(1714521600), at(1714521601), None]
    assert len(times) == 2


def test_batch_per_message_errors_keep_batch_indices() -> None:
    tr = batch(
        [
            {"type": "track", "userId": "u", "event": "ok-0"},
            {"type": "launch", "userId": "u"},
            {"userId": "u", "messageId": "m-2"},
            "not an object",
            {"type": "track", "userId": {"id": 1}, "messageId": "m-4"},
            {"type": "track", "userId": "u", "event": "ok-5"},
            {"type": ["track"], "userId": "u"},
        ]
    )
    # The gateway refuses what it cannot send; a field of the wrong type is ingest's to reject.
    assert tr.indices == [0, 4, 5]
    assert tr.total == 7
    got = [(e.index, e.message_id, e.field, e.reason) for e in tr.errors]
    assert got == [
        (1, "", "type", "INVALID_VALUE"),
        (2, "m-2", "type", "REQUIRED"),
        (3, "", "message", "INVALID_TYPE"),
        (6, "", "type", "INVALID_VALUE"),
    ]
    assert "'launch'" in tr.errors[0].description
    rejected = stored(tr.messages[1])
    assert isinstance(rejected, domain.Rejected)
    assert rejected.message_id == "m-4"
    assert [(v.field, v.reason) for v in rejected.violations] == [("userId", "INVALID_TYPE")]


def test_oversize_message_in_a_batch_is_rejected_alone() -> None:
    big = {"type": "track", "userId": "u", "event": "e", "properties": {"b": "x" * segment.MAX_MESSAGE_BYTES}}
    tr = batch([{"type": "track", "userId": "u", "event": "small"}, big])
    assert [r["event"] for r in rows(tr)] == ["small"]
    assert [(e.index, e.field, e.reason) for e in tr.errors] == [(1, "message", "TOO_LARGE")]


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({}, "invalid_body", '"batch"'),
        ({"batch": {"type": "track"}}, "invalid_body", "an object"),
        ({"batch": [], "context": [1]}, "invalid_body", "context must be a JSON object"),
        ({"batch": [], "integrations": "x"}, "invalid_body", "integrations"),
        ({"batch": [], "sentAt": "nope"}, "invalid_body", "sentAt"),
        ({"batch": [{}] * (segment.MAX_BATCH_MESSAGES + 1)}, "too_many_messages", "2501"),
    ],
)
def test_batch_request_errors(body: dict[str, Any], code: str, words: str) -> None:
    raw = orjson.dumps(body)
    err = refused(segment.translate, orjson.loads(raw), "batch", len(raw))
    assert err.code == code
    assert words in err.message


def test_import_and_b_routes_are_batches() -> None:
    for route in ("import", "b"):
        raw = orjson.dumps({"batch": [{"type": "track", "userId": "u", "event": "e"}]})
        assert len(segment.translate(orjson.loads(raw), route, len(raw)).messages) == 1


def test_exactly_2500_messages_is_allowed() -> None:
    tr = batch([{"type": "track", "userId": str(i), "event": "e"} for i in range(segment.MAX_BATCH_MESSAGES)])
    assert len(tr.messages) == segment.MAX_BATCH_MESSAGES


# -- merging ingest's answer ---------------------------------------------------------------


def test_merge_results_maps_to_batch_indices() -> None:
    tr = batch(
        [
            {"type": "track", "userId": "u", "event": "a", "messageId": "m0"},
            {"type": "nope"},
            {"type": "track", "event": "b", "messageId": "m2"},
            {"type": "track", "userId": "u", "event": "c", "messageId": "m3"},
            {"type": "track", "messageId": "m4"},
        ]
    )
    assert tr.indices == [0, 2, 3, 4]
    # Only the exceptions, each with its index in the request (accepted ones are implied).
    response = pb.WriteEventsResponse(
        results=[
            pb.MessageResult(
                index=1,
                message_id="m2",
                outcome=pb.OUTCOME_REJECTED,
                violations=[pb.FieldViolation(field="userId", reason="REQUIRED", description="need an id")],
            ),
            pb.MessageResult(index=2, message_id="m3", outcome=pb.OUTCOME_DUPLICATE),
            pb.MessageResult(
                index=3,
                message_id="m4",
                outcome=pb.OUTCOME_REJECTED,
                violations=[
                    pb.FieldViolation(field="userId", reason="REQUIRED", description="need an id"),
                    pb.FieldViolation(field="event", reason="REQUIRED", description="need an event"),
                ],
            ),
        ],
        accepted=1,
        duplicates=1,
        rejected=2,
    )
    out = segment.merge_results(tr, response)
    assert (out.accepted, out.duplicates, out.suppressed) == (1, 1, 0)
    assert [(e.index, e.message_id, e.field, e.reason) for e in out.errors] == [
        (1, "", "type", "INVALID_VALUE"),
        (2, "m2", "userId", "REQUIRED"),
        (4, "m4", "userId", "REQUIRED"),
        (4, "m4", "event", "REQUIRED"),
    ]
    assert out.errors[1].to_json() == {
        "index": 2,
        "messageId": "m2",
        "field": "userId",
        "reason": "REQUIRED",
        "description": "need an id",
    }


def test_suppressed_messages_are_not_errors() -> None:
    tr = batch(
        [{"type": "track", "userId": "u", "event": "a"}, {"type": "track", "userId": "gone", "event": "b"}]
    )
    response = pb.WriteEventsResponse(
        results=[pb.MessageResult(index=1, message_id="m1", outcome=pb.OUTCOME_SUPPRESSED)],
        accepted=1,
        suppressed=1,
    )
    out = segment.merge_results(tr, response)
    assert (out.accepted, out.duplicates, out.suppressed, out.errors) == (1, 0, 1, [])


@pytest.mark.parametrize(
    "response",
    [
        # A message neither accepted nor answered for.
        pb.WriteEventsResponse(accepted=1),
        # An answer for a message the request does not have.
        pb.WriteEventsResponse(accepted=1, results=[pb.MessageResult(index=2, outcome=pb.OUTCOME_DUPLICATE)]),
        # An accepted message listed among the exceptions (an ingest that ignored the option).
        pb.WriteEventsResponse(
            results=[
                pb.MessageResult(outcome=pb.OUTCOME_ACCEPTED),
                pb.MessageResult(outcome=pb.OUTCOME_ACCEPTED),
            ]
        ),
    ],
)
def test_merge_results_refuses_an_answer_that_does_not_add_up(response: pb.WriteEventsResponse) -> None:
    tr = batch(
        [{"type": "track", "userId": "u", "event": "a"}, {"type": "track", "userId": "u", "event": "b"}]
    )
    with pytest.raises(RuntimeError):
        segment.merge_results(tr, response)


# -- client IP and settings ----------------------------------------------------------------

PROXIES = parse_networks(("10.0.0.0/8", "192.0.2.7", "fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.5", [], "203.0.113.5"),
        ("203.0.113.5", ["1.1.1.1"], "203.0.113.5"),  # not a proxy: its header is not believed
        ("10.1.2.3", ["198.51.100.4"], "198.51.100.4"),
        ("10.1.2.3", ["6.6.6.6, 198.51.100.4"], "198.51.100.4"),  # the client's own claim is ignored
        ("10.1.2.3", ["198.51.100.4, 192.0.2.7"], "198.51.100.4"),  # two proxies
        ("10.1.2.3", ["198.51.100.4", "10.9.9.9"], "198.51.100.4"),  # several headers
        ("10.1.2.3", ["10.5.5.5"], "10.5.5.5"),  # only proxies: the farthest one
        ("10.1.2.3", ["198.51.100.4, garbage, 10.9.9.9"], "10.9.9.9"),
        ("10.1.2.3", [], "10.1.2.3"),
        ("10.1.2.3", ["198.51.100.4:5555"], "198.51.100.4"),
        ("10.1.2.3", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("::ffff:10.1.2.3", ["198.51.100.4"], "198.51.100.4"),
        ("::ffff:203.0.113.5", ["1.1.1.1"], "203.0.113.5"),
        ("fd00::1", ["2001:db8::2"], "2001:db8::2"),
    ],
)
def test_resolve_client_ip(peer: str, xff: list[str], expected: str) -> None:
    assert resolve_client_ip(peer, xff, PROXIES) == expected


def test_resolve_client_ip_without_trusted_proxies_ignores_the_header() -> None:
    assert resolve_client_ip("10.1.2.3", ["198.51.100.4"], ()) == "10.1.2.3"


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOUCHPOINT_GATEWAY_LISTEN", raising=False)
    monkeypatch.delenv("TOUCHPOINT_INGEST_ADDR", raising=False)
    monkeypatch.delenv("TOUCHPOINT_GATEWAY_TRUSTED_PROXIES", raising=False)
    s = GatewaySettings.from_env()
    assert (s.listen, s.ingest_addr, s.trusted_proxies) == ("0.0.0.0:8080", "127.0.0.1:50051", ())
    monkeypatch.setenv("TOUCHPOINT_GATEWAY_LISTEN", "[::]:9000")
    monkeypatch.setenv("TOUCHPOINT_INGEST_ADDR", "ingest:50051")
    monkeypatch.setenv("TOUCHPOINT_GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7")
    s = GatewaySettings.from_env()
    assert parse_listen(s.listen) == ("::", 9000)
    assert s.ingest_addr == "ingest:50051"
    assert s.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.7/32"))
    monkeypatch.setenv("TOUCHPOINT_GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip")
    with pytest.raises(SettingsError, match="not-an-ip"):
        GatewaySettings.from_env()
    monkeypatch.setenv("TOUCHPOINT_GATEWAY_TRUSTED_PROXIES", "")
    monkeypatch.setenv("TOUCHPOINT_GATEWAY_LISTEN", "8080")
    with pytest.raises(SettingsError, match="host:port"):
        GatewaySettings.from_env()
