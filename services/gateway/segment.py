"""Segment's HTTP tracking API as Touchpoint Events: body decoding and translation, no I/O.

The gateway only checks what the JSON types make impossible to carry in an Event (an object
that is not an object, an id that is an array, a timestamp that is not ISO-8601, an unknown
type). Everything the protocol requires of the values (userId or anonymousId, track's event,
junk ids, messageId length...) is ingest's job, so that every gateway and gRPC client gets the
same rules.

The hot path is `translate()`: per message it does a few dict lookups, one orjson.dumps per
free-form object and builds one protobuf Event in place in the request. Free-form objects stay
JSON bytes (no google.protobuf.Struct), see event.proto.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from touchpoint.events.v1 import event_pb2
from touchpoint.ingest.v1 import ingest_service_pb2

# Segment's limits. The body limit applies after gunzip; a message is measured as compact JSON.
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BODY_BYTES = 500 * 1024
MAX_BATCH_MESSAGES = 2500

EVENT_TYPES: dict[str, int] = {
    "identify": event_pb2.EVENT_TYPE_IDENTIFY,
    "track": event_pb2.EVENT_TYPE_TRACK,
    "page": event_pb2.EVENT_TYPE_PAGE,
    "screen": event_pb2.EVENT_TYPE_SCREEN,
    "group": event_pb2.EVENT_TYPE_GROUP,
    "alias": event_pb2.EVENT_TYPE_ALIAS,
}
# Route name -> the type of its message; analytics.js posts to the one-letter forms.
SINGLE_ROUTES: dict[str, str] = {
    **{name: name for name in EVENT_TYPES},
    "i": "identify",
    "t": "track",
    "p": "page",
    "s": "screen",
    "g": "group",
    "a": "alias",
}
# Routes whose body is {"batch": [...]}; /v1/import is Segment's route for historical batches.
BATCH_ROUTES = ("batch", "b", "import")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ID_FIELDS = (
    ("messageId", "message_id"),
    ("userId", "user_id"),
    ("anonymousId", "anonymous_id"),
    ("previousId", "previous_id"),
    ("groupId", "group_id"),
)
_PAGE_TYPES = (event_pb2.EVENT_TYPE_PAGE, event_pb2.EVENT_TYPE_SCREEN)


class RequestError(Exception):
    """The whole request is refused with HTTP 400; `code` names what is wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class MessageError:
    """One problem with one message of a request; `index` is its position in the request."""

    index: int
    message_id: str
    field: str
    reason: str
    description: str

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "messageId": self.message_id,
            "field": self.field,
            "reason": self.reason,
            "description": self.description,
        }


@dataclass(slots=True)
class Translation:
    """The IngestService request, and the messages that could not be translated.

    The events are built in place inside the request: copying 100 events into a request costs
    as much as building them. `indices[i]` is the position in the client's batch of
    `events[i]`, so that ingest's per-event results can be reported against that batch.
    """

    # write_key and client_ip are left for the caller to set.
    request: ingest_service_pb2.WriteEventsRequest
    indices: list[int]
    errors: list[MessageError]
    # The write key found in the body ("" when none).
    write_key: str
    # Messages in the request.
    total: int

    @property
    def events(self) -> Sequence[event_pb2.Event]:
        return self.request.events


@dataclass(slots=True)
class Outcome:
    """A request's result once ingest has answered."""

    accepted: int
    duplicates: int
    # Dropped by ingest because they carry an identifier suppressed by a deletion (GDPR): a
    # final, deliberate outcome that the client must not retry, so not an error.
    suppressed: int
    # Translation errors and ingest's rejections, by index in the request.
    errors: list[MessageError]


class _Invalid(Exception):
    def __init__(self, field: str, reason: str, description: str) -> None:
        super().__init__(description)
        self.field = field
        self.reason = reason
        self.description = description


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- body decoding -------------------------------------------------------------------------


def write_key_from_authorization(header: str | None) -> str:
    """The write key of an `Authorization: Basic base64(key:)` header ("" when there is none).

    Segment puts the key in the user name with an empty password; a password is ignored."""
    if not header:
        return ""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0]


def gunzip(data: bytes, limit: int = MAX_BODY_BYTES) -> bytes:
    """Decompresses a gzip body (several members allowed), refusing more than `limit` bytes.

    Decompression stops as soon as the output passes the limit, so a small gzip bomb costs
    at most `limit` bytes of memory, never what it would expand to."""
    out: list[bytes] = []
    size = 0
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(data, limit - size + 1)
        except zlib.error as exc:
            raise RequestError("invalid_gzip", f"the body is not valid gzip ({exc})") from None
        size += len(chunk)
        if size > limit:
            raise RequestError(
                "body_too_large", f"the decompressed body is larger than the limit of {limit} bytes"
            )
        out.append(chunk)
        if not inflater.eof:
            raise RequestError("invalid_gzip", "the gzip body is truncated")
        data = inflater.unused_data
        if not data:
            return b"".join(out)


def parse_json_object(data: bytes) -> dict[str, Any]:
    """The body as a JSON object, or RequestError naming what is wrong with it."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if not data.strip():
            raise RequestError("invalid_json", "the body is empty; send a JSON object") from None
        raise RequestError("invalid_json", f"the body is not valid JSON: {exc}") from None
    if type(body) is not dict:
        raise RequestError("invalid_body", f"the body must be a JSON object, got {_kind(body)}")
    return body


def decode_pixel_data(data: str | None) -> dict[str, Any]:
    """The JSON object of a pixel's `data` parameter, in standard or URL-safe base64.

    Padding may be missing, and a '+' that was not percent-encoded arrives as a space (the
    query string is form-decoded), so both are repaired."""
    if not data or not data.strip():
        raise RequestError("missing_data", "the data query parameter (base64 JSON) is required")
    text = data.strip().replace(" ", "+").replace("-", "+").replace("_", "/").rstrip("=")
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("invalid_data", "the data parameter is not base64") from None
    return parse_json_object(raw)


# -- translation ---------------------------------------------------------------------------


def _id(value: Any, field: str) -> str:
    # Segment clients send numeric ids as JSON numbers (analytics-python's stringify_id
    # accepts ints); they mean the same id as its decimal string.
    if type(value) is str:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(field, "INVALID_TYPE", f"{field} must be a string or a number, got {_kind(value)}")
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))  # 42.0 is the id 42, as JavaScript would print it
    return str(value)


def _str(value: Any, field: str) -> str:
    if type(value) is str:
        return value
    raise _Invalid(field, "INVALID_TYPE", f"{field} must be a string, got {_kind(value)}")


def _object(value: Any, field: str) -> dict[str, Any]:
    if type(value) is dict:
        return value
    raise _Invalid(field, "INVALID_TYPE", f"{field} must be a JSON object, got {_kind(value)}")


def parse_timestamp(value: Any, field: str) -> dict[str, int]:
    """An ISO-8601 string ('Z' or an offset, any fraction digits) as a Timestamp; no offset
    means UTC. Precision is kept to the microsecond, as Postgres stores it.

    The result is the Timestamp as a dict, which the Event constructor takes at a third of the
    cost of a Timestamp object."""
    if type(value) is not str:
        raise _Invalid(field, "INVALID_TYPE", f"{field} must be an ISO-8601 string, got {_kind(value)}")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise _Invalid(
            field, "INVALID_TIMESTAMP", f"{field} is not an ISO-8601 date-time: {value[:64]!r}"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return {"seconds": delta.days * 86400 + delta.seconds, "nanos": delta.microseconds * 1000}


@dataclass(slots=True)
class _BatchDefaults:
    """A batch's top-level context, integrations and sentAt, which apply to each message."""

    context: dict[str, Any] | None = None
    context_json: bytes = b""
    integrations: dict[str, Any] | None = None
    integrations_json: bytes = b""
    sent_at: dict[str, int] | None = None
    # The last per-message sentAt string parsed, and its value: clients that put sentAt on
    # each message give the whole batch the same one, so it is parsed once.
    last_sent_at: str = ""
    last_sent_at_value: dict[str, int] | None = None


_NO_DEFAULTS = _BatchDefaults()


def _set_mirrors(context: dict[str, Any], kw: dict[str, Any]) -> None:
    """The typed copies of context fields that services act on without parsing the JSON."""
    value = context.get("ip")
    if type(value) is str and value:
        kw["ip"] = value
    value = context.get("userAgent")
    if type(value) is str and value:
        kw["user_agent"] = value
    page = context.get("page")
    referrer = None
    if type(page) is dict:
        value = page.get("url")
        if type(value) is str and value:
            kw["page_url"] = value
        referrer = page.get("referrer")
    if not (type(referrer) is str and referrer):
        ref = context.get("referrer")
        referrer = ref.get("url") if type(ref) is dict else None
    if type(referrer) is str and referrer:
        kw["referrer"] = referrer
    device = context.get("device")
    if type(device) is dict:
        value = device.get("id")
        if type(value) is str and value:
            kw["device_id"] = value
        value = device.get("advertisingId")
        if type(value) is str and value:
            kw["advertising_id"] = value
        value = device.get("token")
        if type(value) is str and value:
            kw["device_token"] = value


def translate_message(
    msg: dict[str, Any], event_type: int, defaults: _BatchDefaults = _NO_DEFAULTS
) -> event_pb2.Event:
    """One Segment message as an Event; raises _Invalid naming the first bad field."""
    return event_pb2.Event(**_event_fields(msg, event_type, defaults))


def _event_fields(msg: dict[str, Any], event_type: int, defaults: _BatchDefaults) -> dict[str, Any]:
    """One Segment message as Event constructor arguments, so that the event can be built in
    place with `request.events.add(**fields)`; raises _Invalid naming the first bad field."""
    kw: dict[str, Any] = {"type": event_type}
    get = msg.get
    for json_name, proto_name in _ID_FIELDS:
        value = get(json_name)
        if value is not None:
            kw[proto_name] = _id(value, json_name)
    value = get("event")
    if value is not None:
        kw["event"] = _str(value, "event")

    properties = get("properties")
    if properties is not None:
        properties = _object(properties, "properties")
    if event_type in _PAGE_TYPES:
        name = get("name")
        if name is not None:
            kw["name"] = _str(name, "name")
        elif properties is not None and type(properties.get("name")) is str:
            kw["name"] = properties["name"]
        # The Event has no category: keep Segment's page/screen category in the properties,
        # where analytics.js puts it too.
        category = get("category")
        if type(category) is str and category:
            if properties is None:
                properties = {"category": category}
            elif "category" not in properties:
                properties["category"] = category
    else:
        name = get("name")
        if name is not None:
            kw["name"] = _str(name, "name")
    if properties:
        kw["properties_json"] = orjson.dumps(properties)

    traits = get("traits")
    if traits is not None and _object(traits, "traits"):
        kw["traits_json"] = orjson.dumps(traits)

    context = get("context")
    if context is None:
        context = defaults.context
        if defaults.context_json:
            kw["context_json"] = defaults.context_json
    else:
        context = _object(context, "context")
        if defaults.context:
            # Top-level keys of the message's own context win over the batch's.
            context = {**defaults.context, **context}
        if context:
            kw["context_json"] = orjson.dumps(context)
    if context:
        _set_mirrors(context, kw)

    integrations = get("integrations")
    if integrations is None:
        if defaults.integrations_json:
            kw["integrations_json"] = defaults.integrations_json
    else:
        integrations = _object(integrations, "integrations")
        if defaults.integrations:
            integrations = {**defaults.integrations, **integrations}
        if integrations:
            kw["integrations_json"] = orjson.dumps(integrations)

    # Segment's "timestamp" is the device time of the call; RudderStack names it
    # originalTimestamp. When both are sent, the explicit "timestamp" wins (it is the field
    # Segment's import and backfill docs tell callers to set).
    value = get("timestamp")
    if value is not None:
        kw["original_timestamp"] = parse_timestamp(value, "timestamp")
    else:
        value = get("originalTimestamp")
        if value is not None:
            kw["original_timestamp"] = parse_timestamp(value, "originalTimestamp")
    value = get("sentAt")
    if value is not None:
        if value == defaults.last_sent_at and defaults.last_sent_at_value is not None:
            kw["sent_at"] = defaults.last_sent_at_value
        else:
            parsed = parse_timestamp(value, "sentAt")
            kw["sent_at"] = parsed
            if defaults is not _NO_DEFAULTS:
                defaults.last_sent_at, defaults.last_sent_at_value = value, parsed
    elif defaults.sent_at is not None:
        kw["sent_at"] = defaults.sent_at
    return kw


def _message_id(msg: Any) -> str:
    value = msg.get("messageId") if type(msg) is dict else None
    return value if type(value) is str else ""


def translate_single(body: dict[str, Any], type_name: str, body_size: int) -> Translation:
    """The body of /v1/{identify,track,...} (or a pixel's payload): one message of `type_name`."""
    if body_size > MAX_MESSAGE_BYTES:
        raise RequestError(
            "message_too_large", f"the message is {body_size} bytes; the limit is {MAX_MESSAGE_BYTES}"
        )
    key = body.get("writeKey")
    write_key = key if type(key) is str else ""
    request = ingest_service_pb2.WriteEventsRequest()
    try:
        request.events.add(**_event_fields(body, EVENT_TYPES[type_name], _NO_DEFAULTS))
    except _Invalid as bad:
        error = MessageError(0, _message_id(body), bad.field, bad.reason, bad.description)
        return Translation(request, [], [error], write_key, 1)
    return Translation(request, [0], [], write_key, 1)


def _batch_defaults(body: dict[str, Any]) -> _BatchDefaults:
    # A bad top-level field would spoil every message, so it refuses the whole request.
    defaults = _BatchDefaults()
    try:
        value = body.get("context")
        if value is not None and _object(value, "context"):
            defaults.context = value
            defaults.context_json = orjson.dumps(value)
        value = body.get("integrations")
        if value is not None and _object(value, "integrations"):
            defaults.integrations = value
            defaults.integrations_json = orjson.dumps(value)
        value = body.get("sentAt")
        if value is not None:
            defaults.sent_at = parse_timestamp(value, "sentAt")
    except _Invalid as bad:
        raise RequestError("invalid_body", f"{bad.description} (top level of the batch)") from None
    return defaults


def translate_batch(body: dict[str, Any], body_size: int) -> Translation:
    """The body of /v1/batch, /v1/b or /v1/import: {"batch": [...], "context", "integrations", "sentAt"}."""
    batch = body.get("batch")
    if batch is None:
        raise RequestError("invalid_body", 'the body needs "batch", an array of messages')
    if type(batch) is not list:
        raise RequestError("invalid_body", f"batch must be an array of messages, got {_kind(batch)}")
    if len(batch) > MAX_BATCH_MESSAGES:
        raise RequestError(
            "too_many_messages", f"the batch has {len(batch)} messages; the limit is {MAX_BATCH_MESSAGES}"
        )
    key = body.get("writeKey")
    write_key = key if type(key) is str else ""
    defaults = _batch_defaults(body)
    # No message can be over the limit when the whole body is not: skip measuring then.
    measure = body_size > MAX_MESSAGE_BYTES
    request = ingest_service_pb2.WriteEventsRequest()
    add = request.events.add
    indices: list[int] = []
    errors: list[MessageError] = []
    for index, msg in enumerate(batch):
        if type(msg) is not dict:
            errors.append(
                MessageError(
                    index, "", "message", "INVALID_TYPE", f"a message must be a JSON object, got {_kind(msg)}"
                )
            )
            continue
        if measure:
            size = len(orjson.dumps(msg))
            if size > MAX_MESSAGE_BYTES:
                errors.append(
                    MessageError(
                        index,
                        _message_id(msg),
                        "message",
                        "TOO_LARGE",
                        f"the message is {size} bytes; the limit is {MAX_MESSAGE_BYTES}",
                    )
                )
                continue
        type_name = msg.get("type")
        event_type = EVENT_TYPES.get(type_name) if type(type_name) is str else None
        if event_type is None:
            if type_name is None:
                error = MessageError(
                    index, _message_id(msg), "type", "REQUIRED", "each message of a batch needs a type"
                )
            else:
                error = MessageError(
                    index,
                    _message_id(msg),
                    "type",
                    "INVALID_VALUE",
                    "type must be identify, track, page, screen, group or alias, "
                    f"got {str(type_name)[:40]!r}",
                )
            errors.append(error)
            continue
        try:
            add(**_event_fields(msg, event_type, defaults))
        except _Invalid as bad:
            errors.append(MessageError(index, _message_id(msg), bad.field, bad.reason, bad.description))
            continue
        indices.append(index)
    return Translation(request, indices, errors, write_key, len(batch))


def translate(body: dict[str, Any], route: str, body_size: int) -> Translation:
    """The Events of a request to /v1/{route}; `body_size` is the decompressed body's length."""
    if route in BATCH_ROUTES:
        return translate_batch(body, body_size)
    return translate_single(body, SINGLE_ROUTES[route], body_size)


_REJECTED = ingest_service_pb2.OUTCOME_REJECTED
_ACCEPTED = ingest_service_pb2.OUTCOME_ACCEPTED
_DUPLICATE = ingest_service_pb2.OUTCOME_DUPLICATE
_SUPPRESSED = ingest_service_pb2.OUTCOME_SUPPRESSED


def merge_results(translation: Translation, response: ingest_service_pb2.WriteEventsResponse) -> Outcome:
    """Ingest's per-event results joined with the translation errors, indexed as the client's batch."""
    results = response.results
    if len(results) != len(translation.events):
        # Never report success for events ingest did not account for.
        raise RuntimeError(f"ingest answered {len(results)} results for {len(translation.events)} events")
    accepted = duplicates = suppressed = 0
    errors = list(translation.errors)
    indices = translation.indices
    for position, result in enumerate(results):
        outcome = result.outcome
        if outcome == _ACCEPTED:
            accepted += 1
        elif outcome == _DUPLICATE:
            duplicates += 1
        elif outcome == _SUPPRESSED:
            suppressed += 1
        else:
            index = indices[position]
            if result.violations:
                for v in result.violations:
                    errors.append(MessageError(index, result.message_id, v.field, v.reason, v.description))
            else:
                errors.append(
                    MessageError(index, result.message_id, "", "REJECTED", "ingest rejected the message")
                )
    if translation.errors and len(errors) > len(translation.errors):
        errors.sort(key=lambda e: e.index)  # stable: a message's violations keep their order
    return Outcome(accepted, duplicates, suppressed, errors)
