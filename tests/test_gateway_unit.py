"""The gateway's pure parts: body decoding, Segment JSON -> Event translation, result merging,
client IP resolution and settings. Each bad input must come back naming its field and reason."""

from __future__ import annotations

import base64
import gzip
import ipaddress
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from services.gateway import segment
from services.gateway.app import resolve_client_ip
from services.gateway.segment import MessageError, RequestError
from services.gateway.settings import GatewaySettings, parse_listen, parse_networks
from touchpoint.events.v1 import event_pb2
from touchpoint.ingest.v1 import ingest_service_pb2 as pb
from touchpoint.platform.settings import SettingsError


def one(body: dict[str, Any], route: str = "track") -> event_pb2.Event:
    """The event of a single-message body; fails when it was not translated."""
    raw = orjson.dumps(body)
    tr = segment.translate(orjson.loads(raw), route, len(raw))
    assert tr.errors == [], tr.errors
    assert len(tr.events) == 1
    return tr.events[0]


def bad(body: dict[str, Any], route: str = "track") -> MessageError:
    """The one error of a single-message body."""
    raw = orjson.dumps(body)
    tr = segment.translate(orjson.loads(raw), route, len(raw))
    assert tr.events == []
    assert len(tr.errors) == 1
    return tr.errors[0]


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
        ("identify", event_pb2.EVENT_TYPE_IDENTIFY),
        ("i", event_pb2.EVENT_TYPE_IDENTIFY),
        ("track", event_pb2.EVENT_TYPE_TRACK),
        ("t", event_pb2.EVENT_TYPE_TRACK),
        ("page", event_pb2.EVENT_TYPE_PAGE),
        ("p", event_pb2.EVENT_TYPE_PAGE),
        ("screen", event_pb2.EVENT_TYPE_SCREEN),
        ("s", event_pb2.EVENT_TYPE_SCREEN),
        ("group", event_pb2.EVENT_TYPE_GROUP),
        ("g", event_pb2.EVENT_TYPE_GROUP),
        ("alias", event_pb2.EVENT_TYPE_ALIAS),
        ("a", event_pb2.EVENT_TYPE_ALIAS),
    ],
)
def test_route_gives_the_type(route: str, expected: int) -> None:
    # The route wins over a "type" in the body.
    assert one({"userId": "u", "type": "screen" if route != "screen" else "track"}, route).type == expected


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
    ev = tr.events[0]
    assert (ev.message_id, ev.user_id, ev.anonymous_id, ev.event) == ("m-1", "u-1", "a-1", "Order Completed")
    assert orjson.loads(ev.properties_json) == body["properties"]
    assert orjson.loads(ev.integrations_json) == body["integrations"]
    assert ev.context_json == b""
    assert ev.traits_json == b""
    assert not ev.HasField("original_timestamp")
    assert not ev.HasField("sent_at")


def test_alias_and_group_ids() -> None:
    ev = one({"userId": "new", "previousId": "old"}, "alias")
    assert (ev.user_id, ev.previous_id) == ("new", "old")
    ev = one({"userId": "u", "groupId": "acme", "traits": {"plan": "pro"}}, "group")
    assert ev.group_id == "acme"
    assert orjson.loads(ev.traits_json) == {"plan": "pro"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(42, "42"), (-7, "-7"), (12345678901234567890, "12345678901234567890"), (42.0, "42"), (1.5, "1.5")],
)
def test_numeric_ids_become_strings(value: Any, expected: str) -> None:
    ev = one(
        {"userId": value, "anonymousId": value, "groupId": value, "previousId": value, "messageId": value}
    )
    assert ev.user_id == ev.anonymous_id == ev.group_id == ev.previous_id == ev.message_id == expected


def test_null_fields_are_absent() -> None:
    # analytics-python sends "anonymousId": null next to a userId.
    ev = one(
        {
            "userId": "u",
            "anonymousId": None,
            "properties": None,
            "context": None,
            "timestamp": None,
            "event": None,
        }
    )
    assert ev.anonymous_id == ""
    assert ev.properties_json == b""
    assert not ev.HasField("original_timestamp")


@pytest.mark.parametrize("field", ["userId", "anonymousId", "previousId", "groupId", "messageId"])
@pytest.mark.parametrize(
    ("value", "kind"), [({"id": 1}, "an object"), ([1], "an array"), (True, "a boolean")]
)
def test_ids_that_are_not_strings_or_numbers(field: str, value: Any, kind: str) -> None:
    err = bad({"userId": "u", field: value})
    assert (err.index, err.field, err.reason) == (0, field, "INVALID_TYPE")
    assert kind in err.description


@pytest.mark.parametrize("field", ["properties", "traits", "context", "integrations"])
@pytest.mark.parametrize(("value", "kind"), [([1], "an array"), ("x", "a string"), (3, "a number")])
def test_free_form_fields_must_be_objects(field: str, value: Any, kind: str) -> None:
    err = bad({"userId": "u", "messageId": "m-9", field: value})
    assert (err.field, err.reason, err.message_id) == (field, "INVALID_TYPE", "m-9")
    assert f"{field} must be a JSON object, got {kind}" == err.description


@pytest.mark.parametrize(("field", "value"), [("event", 5), ("event", {"a": 1}), ("name", ["x"])])
def test_event_and_name_must_be_strings(field: str, value: Any) -> None:
    err = bad({"userId": "u", field: value}, "page" if field == "name" else "track")
    assert (err.field, err.reason) == (field, "INVALID_TYPE")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", ts(1714564800)),
        ("2024-05-01T12:00:00.123Z", ts(1714564800, 123_000_000)),
        ("2024-05-01T12:00:00.123456789Z", ts(1714564800, 123_456_000)),
        ("2024-05-01T14:00:00+02:00", ts(1714564800)),
        ("2024-05-01T07:30:00.5-04:30", ts(1714564800, 500_000_000)),
        ("2024-05-01T12:00:00", ts(1714564800)),  # no offset: UTC
        ("1969-12-31T23:59:59.5Z", ts(-1, 500_000_000)),
    ],
)
def test_timestamps(text: str, expected: tuple[int, int]) -> None:
    ev = one({"userId": "u", "timestamp": text, "sentAt": text})
    assert as_tuple(ev.original_timestamp) == expected
    assert as_tuple(ev.sent_at) == expected
    assert ev.original_timestamp.ToDatetime(tzinfo=UTC) <= datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC)


def test_original_timestamp_is_accepted_and_timestamp_wins() -> None:
    ev = one({"userId": "u", "originalTimestamp": "2024-05-01T12:00:00Z"})
    assert as_tuple(ev.original_timestamp) == ts(1714564800)
    ev = one(
        {"userId": "u", "originalTimestamp": "2024-05-01T12:00:00Z", "timestamp": "2024-05-01T12:00:01Z"}
    )
    assert as_tuple(ev.original_timestamp) == ts(1714564801)


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
    err = bad({"userId": "u", field: value})
    assert (err.field, err.reason) == (field, reason)
    assert field in err.description


def test_page_name_falls_back_to_properties_and_keeps_category() -> None:
    ev = one(
        {"userId": "u", "properties": {"name": "Pricing", "path": "/pricing"}, "category": "Docs"}, "page"
    )
    assert ev.name == "Pricing"
    assert orjson.loads(ev.properties_json) == {"name": "Pricing", "path": "/pricing", "category": "Docs"}
    ev = one({"userId": "u", "name": "Home", "properties": {"name": "Other"}}, "page")
    assert ev.name == "Home"
    ev = one({"userId": "u", "category": "Onboarding"}, "screen")
    assert orjson.loads(ev.properties_json) == {"category": "Onboarding"}
    # Only page and screen take the name from the properties.
    ev = one({"userId": "u", "event": "e", "properties": {"name": "x"}}, "track")
    assert ev.name == ""


def test_identify_traits_in_context_stay_in_context() -> None:
    ev = one({"anonymousId": "a", "context": {"traits": {"email": "x@example.com"}}}, "identify")
    assert ev.traits_json == b""
    assert orjson.loads(ev.context_json)["traits"] == {"email": "x@example.com"}


def test_typed_mirrors_come_from_context() -> None:
    context = {
        "ip": "203.0.113.9",
        "userAgent": "Mozilla/5.0",
        "page": {"url": "https://shop.example/?utm_source=x", "referrer": "https://news.example/"},
        "device": {"id": "dev-1", "advertisingId": "idfa-1", "token": "push-1"},
    }
    ev = one({"userId": "u", "context": context}, "page")
    assert (ev.ip, ev.user_agent, ev.page_url, ev.referrer) == (
        "203.0.113.9",
        "Mozilla/5.0",
        "https://shop.example/?utm_source=x",
        "https://news.example/",
    )
    assert (ev.device_id, ev.advertising_id, ev.device_token) == ("dev-1", "idfa-1", "push-1")
    assert orjson.loads(ev.context_json) == context
    # A mobile referrer (deep link) when there is no page referrer; odd types are left in context only.
    ev = one({"userId": "u", "context": {"referrer": {"url": "app://x"}, "ip": 5, "device": "phone"}})
    assert (ev.referrer, ev.ip, ev.device_id) == ("app://x", "", "")


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
    assert [e.type for e in tr.events] == [1, 2, 3, 4, 5, 6]
    contexts = [orjson.loads(e.context_json) for e in tr.events]
    assert contexts[0] == {"library": {"name": "analytics-go"}, "ip": "198.51.100.1"}
    # The message's own keys win, key by key at the top level.
    assert contexts[1] == {"library": {"name": "mine"}, "ip": "198.51.100.1", "locale": "fr"}
    assert all(e.ip == "198.51.100.1" for e in tr.events)
    assert orjson.loads(tr.events[0].integrations_json) == {"All": True, "X": True}
    assert orjson.loads(tr.events[2].integrations_json) == {"All": True, "X": False}
    assert as_tuple(tr.events[0].sent_at) == ts(1714564800)
    assert as_tuple(tr.events[2].sent_at) == ts(1714521600)


def test_repeated_per_message_sent_at_is_parsed_once_and_right() -> None:
    tr = batch(
        [
            {"type": "track", "userId": "u", "event": "e", "sentAt": "2024-05-01T00:00:00Z"},
            {"type": "track", "userId": "u", "event": "e", "sentAt": "2024-05-01T00:00:00Z"},
            {"type": "track", "userId": "u", "event": "e", "sentAt": "2024-05-01T00:00:01Z"},
            {"type": "track", "userId": "u", "event": "e"},
        ]
    )
    assert [as_tuple(e.sent_at) for e in tr.events[:3]] == [ts(1714521600), ts(1714521600), ts(1714521601)]
    assert not tr.events[3].HasField("sent_at")


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
    assert [e.event for e in tr.events] == ["ok-0", "ok-5"]
    assert tr.indices == [0, 5]
    assert tr.total == 7
    got = [(e.index, e.message_id, e.field, e.reason) for e in tr.errors]
    assert got == [
        (1, "", "type", "INVALID_VALUE"),
        (2, "m-2", "type", "REQUIRED"),
        (3, "", "message", "INVALID_TYPE"),
        (4, "m-4", "userId", "INVALID_TYPE"),
        (6, "", "type", "INVALID_VALUE"),
    ]
    assert "'launch'" in tr.errors[0].description


def test_oversize_message_in_a_batch_is_rejected_alone() -> None:
    big = {"type": "track", "userId": "u", "event": "e", "properties": {"b": "x" * segment.MAX_MESSAGE_BYTES}}
    tr = batch([{"type": "track", "userId": "u", "event": "small"}, big])
    assert [e.event for e in tr.events] == ["small"]
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
        assert len(segment.translate(orjson.loads(raw), route, len(raw)).events) == 1


def test_exactly_2500_messages_is_allowed() -> None:
    tr = batch([{"type": "track", "userId": str(i), "event": "e"} for i in range(segment.MAX_BATCH_MESSAGES)])
    assert len(tr.events) == segment.MAX_BATCH_MESSAGES


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
    response = pb.WriteEventsResponse(
        results=[
            pb.MessageResult(message_id="m0", outcome=pb.OUTCOME_ACCEPTED),
            pb.MessageResult(
                message_id="m2",
                outcome=pb.OUTCOME_REJECTED,
                violations=[pb.FieldViolation(field="userId", reason="REQUIRED", description="need an id")],
            ),
            pb.MessageResult(message_id="m3", outcome=pb.OUTCOME_DUPLICATE),
            pb.MessageResult(
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
        results=[
            pb.MessageResult(message_id="m0", outcome=pb.OUTCOME_ACCEPTED),
            pb.MessageResult(message_id="m1", outcome=pb.OUTCOME_SUPPRESSED),
        ]
    )
    out = segment.merge_results(tr, response)
    assert (out.accepted, out.duplicates, out.suppressed, out.errors) == (1, 0, 1, [])


def test_merge_results_refuses_a_short_answer() -> None:
    tr = batch(
        [{"type": "track", "userId": "u", "event": "a"}, {"type": "track", "userId": "u", "event": "b"}]
    )
    with pytest.raises(RuntimeError):
        segment.merge_results(
            tr, pb.WriteEventsResponse(results=[pb.MessageResult(outcome=pb.OUTCOME_ACCEPTED)])
        )


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
